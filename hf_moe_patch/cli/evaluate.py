"""``hf-moe-patch demo`` and ``hf-moe-patch mteb``: MTEB evaluation of MoE embeddings under each
routing, and routing statistics; both check every argument before the model loads."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .common import (
    EXIT_STATUS,
    check_cases_for_config,
    check_out,
    fail,
    locate,
    quiet_bars,
    split_methods,
    text_lines,
    words,
)

# The main job: native and fractional USMoE budgets (multiples of the native k), expert choice,
# and SSR's balanced plan at inference. SSR's plan is per sequence here so that an embedding never
# depends on its batch-mates (its default, scope=batch, spans the micro-batch).
DEMO_CASES = [
    "topk",
    "usmoe",
    "usmoe:top_k=0.75x",
    "usmoe:top_k=0.5x",
    "expert_choice",
    "ssr:inference=sinkhorn,scope=sequence",
]
# hf_moe_patch.data.wordnet_tasks.WORDNET_TASKS, named here so that --help needs no mteb import.
LOCAL_TASKS = ("WordNetLexnameClassification", "WordNetSameLemmaPairClassification", "WordNetWuPalmerSTS",
               "WordNetExampleRetrieval", "WordNetLexnameClustering")

DEMO_DESCRIPTION = """\
The main job on the shipped demo model (an OLMoE-architecture MoE pretrained on WordNet): its MoE
embeddings (MoEE) on the local WordNet mteb tasks under each routing, then routing statistics on
held-out WordNet text. Prints the tables and writes them, with plots, to --out. Runs offline.

Tables: each task's mteb main score x 100 (its metric named), the change vs topk in brackets,
the measured experts per token, MaxVio and encode time; the notes under each table say what each
row is measured on."""

MTEB_DESCRIPTION = """\
MTEB evaluation of a model's training-free MoE embeddings (MoEE) under each routing, side by side.
MODEL is 'demo' (the shipped demo model, the default), a local folder or a Hub id. Routings,
options, task names, dtype and the output folders are checked before the model loads.

Tasks are the local WordNet tasks (no download) or MTEB task names, whose data comes from the
Hugging Face Hub (or its local cache when the Hub cannot be reached)."""


def add_eval_options(p: argparse.ArgumentParser, methods: list[str]) -> None:
    p.add_argument("--methods", nargs="+", default=methods, metavar="SPEC",
                   help="routings, comma- or space-separated, each METHOD[:key=value,...] (JSON values; top_k may be "
                        "a multiple of the native k such as 0.75x; see hf-moe-patch methods); default: %(default)s")
    p.add_argument("--top-k", nargs="+", metavar="BUDGET",
                   help="budgets to sweep for every method with a top_k option that does not set it (topk, the "
                        "baseline, excepted), e.g. 1x 0.75x 0.5x or 4 3 (default: none)")
    p.add_argument("--tasks", nargs="+", metavar="TASK",
                   help=f"mteb task names (default: the local WordNet tasks {', '.join(LOCAL_TASKS)}); MTEB tasks "
                        "need the Hub or its local cache")
    p.add_argument("--embedding", default="moee_sum", choices=["hs", "rw", "moee_concat", "moee_sum"],
                   help="hs: last hidden state; rw: router logits of every MoE layer; moee_concat / moee_sum: both "
                        "(default: %(default)s)")
    p.add_argument("--prompt", default="prompteol", choices=["none", "prompteol"],
                   help="prompteol wraps each text as: This sentence : \"TEXT\" means in one word:\" (default: %(default)s)")
    p.add_argument("--instruction", help="a task instruction put before every text, or 'task' for mteb's own (default: none)")
    p.add_argument("--sum-weight", type=float, default=1.0, help="w in cos(hs) + w cos(rw) for moee_sum (default: %(default)s)")
    p.add_argument("--reference", action="store_true",
                   help="the official MoEE pipeline (tianyi-lab/MoE-Embedding) instead of our per-text one: cleaned "
                        "text, GritLM instructions inside the quotes (--instruction defaults to 'task'; '' for none), "
                        "HS and RW z-scored over each batch of --batch-size texts in input order (the official runs "
                        "used 128), no position_ids; with moee_sum, classification and clustering average the "
                        "predictions of separate HS and RW runs")
    p.add_argument("--corrupt", metavar="KIND:RATE[:SEED]",
                   help="corrupt every task text, KIND junk or char, e.g. junk:0.1 (default: clean text)")
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=512, help="tokens per text at most (default: %(default)s)")
    p.add_argument("--cache-dir", default="mteb_cache",
                   help="mteb result cache, one entry per routing and settings (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="recompute cached results")
    p.add_argument("--wordnet", help="folder of WordNet's data.* files (default: $HF_MOE_PATCH_WORDNET or /usr/share/wordnet)")
    p.add_argument("--wordnet-split", default="heldout", choices=["heldout", "train", "all"],
                   help="WordNet synsets the local tasks draw from; heldout: words the demo model never saw (default: %(default)s)")
    p.add_argument("--calibration-file", metavar="PATH",
                   help="texts, one per line, to calibrate causal routings (causal=true without thresholds) on "
                        "(default: WordNet train-split documents, see --calibration-texts)")
    p.add_argument("--calibration-texts", type=int, default=256,
                   help="WordNet train-split documents (a seeded sample) to calibrate causal routings on, when "
                        "--calibration-file is not given (default: %(default)s)")
    p.add_argument("--wordnet-sizes", metavar="JSON",
                   help="JSON overrides of the local tasks' sizes, e.g. '{\"WordNetWuPalmerSTS\": {\"n_pairs\": 200}}'")


def add_parsers(sub, parents) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("demo", parents=parents, help="the main job on the shipped demo model: MTEB WordNet tasks and "
                       "routing statistics under each routing, with tables and plots",
                       description=DEMO_DESCRIPTION, epilog=EXIT_STATUS, formatter_class=fmt)
    add_eval_options(p, DEMO_CASES)
    p.add_argument("--stats-texts", type=int, default=2000,
                   help="held-out WordNet documents for the routing statistics (default: %(default)s)")
    p.add_argument("--out", default="demo_out", help="folder for the JSON, markdown tables and PNG plots (default: %(default)s)")
    p.set_defaults(func=run_demo)

    from ..lm import DTYPES

    p = sub.add_parser("mteb", parents=parents, help="MTEB evaluation of a model's MoE embeddings (MoEE) under each routing",
                       description=MTEB_DESCRIPTION, epilog=EXIT_STATUS, formatter_class=fmt)
    p.add_argument("model", nargs="?", default="demo", help="'demo' (the shipped model), a local folder or a Hub id (default: demo)")
    p.add_argument("--revision", default=None, help="the model's revision on the Hub (default: main)")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="auto: bfloat16 on GPUs that support it, else float32 (default: %(default)s)")
    p.add_argument("--device", default=None, help="e.g. cuda (default: where from_pretrained puts it)")
    add_eval_options(p, ["topk", "usmoe", "expert_choice"])
    p.add_argument("--out", default="mteb_out", help="folder for mteb_comparison.{md,json,png} (default: %(default)s)")
    p.set_defaults(func=run_mteb)


def check_evaluation(args: argparse.Namespace) -> dict[str, Any]:
    """Every argument of demo / mteb that can be checked without the model; returns the parsed
    values (specs, budgets, tasks, corruption, WordNet options)."""
    from ..data.corruption import parse_corruption
    from ..embeddings.evaluation import check_tasks
    from ..validation import parse_routings, resolve_budget

    specs = split_methods(args.methods)
    parse_routings(specs, flag="--methods")
    budgets = words(args.top_k, "--top-k", "1x 0.75x")
    for budget in budgets or []:
        resolve_budget(budget, 1)
    tasks = words(args.tasks, "--tasks", "WordNetWuPalmerSTS")
    tasks = list(LOCAL_TASKS) if tasks is None else tasks
    check_tasks(tasks, flag="--tasks")
    corruption = parse_corruption(args.corrupt)
    try:
        sizes = json.loads(args.wordnet_sizes) if args.wordnet_sizes else None
    except json.JSONDecodeError as exc:
        fail(f"--wordnet-sizes is not valid JSON ({exc.msg} at character {exc.pos}); e.g. '{{\"WordNetWuPalmerSTS\": {{\"n_pairs\": 200}}}}'")
    if any(t in LOCAL_TASKS for t in tasks):
        from ..data.wordnet import find_wordnet_dir

        find_wordnet_dir(args.wordnet)
    for flag, value in (("--batch-size", args.batch_size), ("--max-length", args.max_length)):
        if value < 1:
            fail(f"{flag}={value} is not valid; an integer >= 1")
    check_out(args.out, "--out")
    check_out(args.cache_dir, "--cache-dir")
    if args.calibration_texts < 1:
        fail(f"--calibration-texts={args.calibration_texts} is not valid; an integer >= 1")
    calibration = None if args.calibration_file is None else text_lines(args.calibration_file, "--calibration-file")
    return {"specs": specs, "budgets": budgets, "tasks": tasks, "corruption": corruption, "sizes": sizes,
            "calibration": calibration}


def calibration_texts(args: argparse.Namespace, checked: dict[str, Any], cases) -> list[str] | None:
    """The text causal routings are calibrated on, or None when no case needs any."""
    import random

    from ..report import needs_calibration

    if not any(needs_calibration(c) for c in cases):
        return None
    if checked["calibration"] is not None:
        return checked["calibration"]
    from ..data.wordnet import load_wordnet
    from ..training.demo_model import corpus

    docs = corpus(load_wordnet(args.wordnet), "train")  # never the held-out text the tasks draw from
    random.Random(0).shuffle(docs)
    return docs[: args.calibration_texts]


def calibrated(args: argparse.Namespace, checked: dict[str, Any], cases, model, tokenizer):
    """``cases`` with the thresholds of their causal routings fitted (see calibrate_cases)."""
    from ..report import calibrate_cases

    return calibrate_cases(model, cases, calibration_texts(args, checked, cases), tokenizer)


def evaluate(args: argparse.Namespace, checked: dict[str, Any], model, tokenizer, title: str, cases):
    from ..embeddings.evaluation import evaluate_routings

    quiet_bars(datasets=True)
    report = evaluate_routings(
        model, tokenizer, cases, checked["tasks"], embedding=args.embedding, prompt=args.prompt,
        instruction=args.instruction, sum_weight=args.sum_weight, reference=args.reference, batch_size=args.batch_size,
        max_length=args.max_length, corruption=checked["corruption"], cache_dir=args.cache_dir,
        out_dir=args.out, overwrite=args.overwrite, title=title,
        wordnet_kwargs={"path": args.wordnet, "split": args.wordnet_split, "sizes": checked["sizes"]},
    )
    print(f"\n{title}\n\n{report.to_markdown()}\n")
    print(f"wrote {Path(args.out) / 'mteb_comparison.md'}, .json and .png")
    return report


def load(name: str, revision: str | None, dtype: str, device: str | None):
    """Model (eval mode, on ``device``) and tokenizer; ``demo`` is the shipped demo model."""
    from ..lm import load_model_and_tokenizer

    quiet_bars()
    loaded, tokenizer = load_model_and_tokenizer(name, revision=revision, dtype=dtype)
    if device:
        loaded.to(device)
    return loaded.eval(), tokenizer


def run_mteb(args: argparse.Namespace) -> int:
    checked = check_evaluation(args)
    _, _, config = locate(args.model, args.revision)
    cases = check_cases_for_config(checked["specs"], config, checked["budgets"])
    model, tokenizer = load(args.model, args.revision, args.dtype, args.device)
    title = f"MTEB ({args.embedding}, prompt {args.prompt}) of {args.model} under each routing"
    if args.corrupt:
        title += f", texts corrupted with {args.corrupt}"
    evaluate(args, checked, model, tokenizer, title, calibrated(args, checked, cases, model, tokenizer))
    return 0


def run_comparison(model, batches, cases, out_dir: Path, title: str, source: str) -> int:
    """Routing statistics of ``cases`` on ``batches``: printed, and written to ``out_dir``."""
    from ..io import atomic_write_text
    from ..report import compare_routings, markdown_table, plot_load

    rows = compare_routings(model, batches, cases)
    table = markdown_table(rows, source)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "routing_stats.json", json.dumps(rows, indent=2, default=str))
    atomic_write_text(out_dir / "routing_stats.md", f"# {title}\n\n{table}\n")
    png = plot_load(rows, out_dir / "routing_load.png", source)
    print(f"\n{title}\n\n{table}\n")
    print(f"wrote {out_dir / 'routing_stats.json'}, {out_dir / 'routing_stats.md'} and {png}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    import torch

    from ..data.corruption import parse_corruption
    from ..data.wordnet import load_wordnet
    from ..training.demo_model import corpus

    checked = check_evaluation(args)
    if args.stats_texts < 1:
        fail(f"--stats-texts={args.stats_texts} is not valid; an integer >= 1")
    _, _, config = locate("demo")
    cases = check_cases_for_config(checked["specs"], config, checked["budgets"])
    model, tokenizer = load("demo", None, "float32", None)
    title = (f"MTEB ({args.embedding}, prompt {args.prompt}) of the shipped WordNet demo model "
             f"(OLMoE architecture, {model.config.num_experts} experts, top-{model.config.num_experts_per_tok}) under each routing")
    cases = calibrated(args, checked, cases, model, tokenizer)
    evaluate(args, checked, model, tokenizer, title, cases)
    # Routing statistics on held-out WordNet text (no padding: one packed block per row).
    texts = corpus(load_wordnet(args.wordnet), "heldout")[: args.stats_texts]
    corruption = parse_corruption(args.corrupt)
    if corruption is not None:
        texts = corruption.apply(texts)
    ids = torch.tensor([i for doc in tokenizer(texts)["input_ids"] for i in doc])
    n = len(ids) // 128
    if n == 0:
        fail(f"--stats-texts={args.stats_texts} gives {len(ids)} tokens, fewer than one block of 128")
    batches = [{"input_ids": block, "attention_mask": torch.ones_like(block)} for block in ids[: n * 128].view(n, 128).split(8)]
    source = (f"{len(texts)} held-out WordNet documents ({n * 128} tokens in {n} blocks of 128"
              f"{', corrupted with ' + args.corrupt if args.corrupt else ''})")
    return run_comparison(model, batches, cases, Path(args.out), "Routing statistics of the demo model on held-out WordNet text", source)
