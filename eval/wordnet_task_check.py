#!/usr/bin/env python
"""Is each WordNet task informative for a model of the demo model's size? (issue 11)

For every local WordNet task (default sizes, seed 0, heldout side) this evaluates through mteb:

* **demo model**: the shipped demo model, native routing, MoEE(sum), PromptEOL, through the
  package's own :func:`hf_moe_patch.embeddings.evaluation.evaluate_routings`;
* **chance**: random Gaussian embeddings (one vector per distinct text, drawn from a generator
  seeded by the seed and the text), over ``--chance-seeds`` seeds: mean +- sample std;
* **lexical**: bag-of-words TF-IDF cosine (scikit-learn, vocabulary and IDF fitted on the
  documents of every heldout synset: lemmas, gloss, examples), a reference point.

Verdict per task, from the numbers (main scores x100, ceiling 100): *informative* when
demo > chance mean + 3 chance std and demo < 0.95 x ceiling; *at chance* or *at ceiling*
otherwise.

Outputs in --out: results.json, README.md (the table). Example:
    python eval/wordnet_task_check.py          # ~5 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, mean_std, write_json, write_text  # noqa: E402

import mteb  # noqa: E402
from mteb.models.abs_encoder import AbsEncoder  # noqa: E402
from mteb.models.model_meta import ModelMeta, ScoringFunction  # noqa: E402

from hf_moe_patch.data.wordnet import load_wordnet  # noqa: E402
from hf_moe_patch.data.wordnet_tasks import BUILD_VERSION, WORDNET_TASKS, synset_pool, wordnet_tasks  # noqa: E402
from hf_moe_patch.training.demo_model import synset_document  # noqa: E402

CEILING = 100.0


def _meta(name: str, dim: int) -> ModelMeta:
    return ModelMeta.create_empty(overwrites={
        "name": f"wordnet-task-check/{name}", "revision": "1", "embed_dim": dim,
        "similarity_fn_name": ScoringFunction.COSINE, "modalities": ["text"], "framework": [],
    })


class RandomEncoder(AbsEncoder):
    """Chance: a Gaussian vector per distinct text, fixed by (seed, text)."""

    def __init__(self, seed: int, dim: int = 256) -> None:
        self.seed, self.dim = seed, dim
        self.mteb_model_meta = _meta(f"random-seed{seed}", dim)

    def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs):
        rows = []
        for batch in inputs:
            for text in batch["text"]:
                digest = hashlib.sha256(f"{self.seed}|{text}".encode()).digest()
                rows.append(np.random.default_rng(int.from_bytes(digest[:8], "little")).standard_normal(self.dim))
        return np.asarray(rows, dtype=np.float32)


class TfidfEncoder(AbsEncoder):
    """Lexical reference: L2-normalised TF-IDF vectors (dense) of a vectorizer fitted once."""

    def __init__(self, documents: list[str]) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer

        self.vectorizer = TfidfVectorizer(sublinear_tf=True, max_features=4096).fit(documents)
        self.mteb_model_meta = _meta("tfidf", len(self.vectorizer.vocabulary_))

    def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs):
        texts = [t for batch in inputs for t in batch["text"]]
        return self.vectorizer.transform(texts).toarray().astype(np.float32)


def _main_scores(encoder: AbsEncoder, cache_dir: Path, seed: int) -> dict[str, float]:
    tasks = wordnet_tasks(seed=seed)
    result = mteb.evaluate(encoder, tasks, cache=mteb.ResultCache(cache_dir), overwrite_strategy="always",
                           show_progress_bar=False)
    return {r.task_name: 100 * float(r.scores["test"][0]["main_score"]) for r in result.task_results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "wordnet_tasks")
    parser.add_argument("--chance-seeds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="task sampling seed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.manual_seed(0)
    started = time.perf_counter()
    results: dict[str, dict] = {name: {} for name in WORDNET_TASKS}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        chance_runs = [_main_scores(RandomEncoder(s), tmp / f"random{s}", args.seed) for s in range(args.chance_seeds)]
        print(f"chance done ({time.perf_counter() - started:.0f}s)", file=sys.stderr)
        wn = load_wordnet()
        lexical = _main_scores(TfidfEncoder([synset_document(s) for s in synset_pool(wn)]), tmp / "tfidf", args.seed)
        print(f"lexical done ({time.perf_counter() - started:.0f}s)", file=sys.stderr)

        from transformers import AutoTokenizer

        from hf_moe_patch import demo_model_path
        from hf_moe_patch.embeddings.evaluation import evaluate_routings
        from hf_moe_patch.sharing.hub import from_pretrained

        path = demo_model_path()
        model = from_pretrained(str(path), dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        report = evaluate_routings(model, tokenizer, ["topk"], list(WORDNET_TASKS), embedding="moee_sum",
                                   prompt="prompteol", cache_dir=tmp / "demo", out_dir=None, overwrite=True,
                                   progress=False, wordnet_kwargs={"seed": args.seed})
        demo = {k: 100 * v for k, v in report.runs[0].scores.items()}
        print(f"demo model done ({time.perf_counter() - started:.0f}s)", file=sys.stderr)
        revisions = {t.metadata.name: t.metadata.revision for t in wordnet_tasks(seed=args.seed)}

    for name in WORDNET_TASKS:
        chance = mean_std([run[name] for run in chance_runs])
        threshold = chance["mean"] + 3 * chance["std"]
        model_score = demo[name]
        if model_score <= threshold:
            verdict = "at chance"
        elif model_score >= 0.95 * CEILING:
            verdict = "at ceiling"
        else:
            verdict = "informative"
        results[name] = {"chance": chance, "lexical_tfidf": lexical[name], "demo_moee_sum": model_score,
                         "chance_plus_3std": threshold, "ceiling": CEILING, "verdict": verdict,
                         "dataset_revision": revisions[name]}
    elapsed = time.perf_counter() - started
    out = {"tasks": results, "settings": {"seed": args.seed, "chance_seeds": args.chance_seeds, "sizes": "default",
                                          "split": "heldout", "build_version": BUILD_VERSION, "demo": "native top-k, MoEE(sum), PromptEOL, float32",
                                          "rule": "informative if demo > chance mean + 3 std and demo < 0.95 x 100"},
           "seconds": round(elapsed, 1), "machine": machine_info()}
    write_json(args.out / "results.json", out)
    lines = [
        "# WordNet tasks: chance, lexical and demo-model scores",
        "",
        f"`python eval/wordnet_task_check.py` ({elapsed / 60:.1f} min on this machine). Main score x100 of each "
        f"task at default sizes (heldout side, sampling seed {args.seed}, WordNet task build v{BUILD_VERSION}). "
        f"**chance**: random Gaussian embeddings (one per distinct text), mean +- std over {args.chance_seeds} seeds. "
        "**lexical**: TF-IDF cosine (bag of words, fitted on every heldout synset's document, 4096 most frequent words). "
        "**demo model**: the shipped demo model, native routing, MoEE(sum), PromptEOL (the package's "
        "`evaluate_routings`). Verdict: *informative* when demo > chance + 3 std and demo < 95 (ceiling 100).",
        "",
        "| task (metric) | chance | lexical (TF-IDF) | demo model | verdict |",
        "|---|---:|---:|---:|---|",
    ]
    for name in WORDNET_TASKS:
        r = results[name]
        metric = next(t.metadata.main_score for t in wordnet_tasks([name]))
        lines.append(f"| {name} ({metric}) | {r['chance']['mean']:.2f} +- {r['chance']['std']:.2f} | "
                     f"{r['lexical_tfidf']:.2f} | {r['demo_moee_sum']:.2f} | {r['verdict']} |")
    write_text(args.out / "README.md", "\n".join(lines) + "\n")
    print("\n".join(lines[-2 - len(WORDNET_TASKS):]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
