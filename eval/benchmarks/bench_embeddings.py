"""Speed of MoEE embedding (``MoEEncoder.embed``) under each routing, relative to native ``hs``.

The timing method is bench_routing's: every variant is built and warmed up first, then each
round embeds the same texts once per variant in a new seeded random order, and a variant is
reported as the median over rounds of ``its time / the baseline's time in the same round``
(25th-75th percentile in brackets). The baseline is the unpatched model producing ``hs`` (the
last hidden state alone, no router hooks); an A/A control (an identical second copy) shows the
noise floor.

Texts are real: the first held-out WordNet glosses (needs ``wordnet-base``), embedded in batches
of 32 with the PromptEOL template. Two models:

- ``demo``: the shipped demo model (OLMoE architecture, 16 experts, top-4), float32;
- ``olmoe-64x8``: an OLMoE-shaped random model closer to the real expert count (hidden 256,
  64 experts, top-8, expert FFN 128, 4 layers, the demo tokenizer), float32.

Run ``python eval/benchmarks/bench_embeddings.py --help``; ``--quick`` is a smoke run.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from bench_routing import Variant, fmt_ratio, interleaved, machine_info, summarise  # noqa: E402

import hf_moe_patch as hmp  # noqa: E402
from hf_moe_patch.lm import demo_model_path  # noqa: E402
from hf_moe_patch.embeddings.moee import MoEEncoder  # noqa: E402
from hf_moe_patch.data.wordnet import load_wordnet, split_of  # noqa: E402

# (label, embedding, method or None for unpatched, options)
VARIANTS = [
    ("native hs", "hs", None, {}),
    ("native hs (A/A)", "hs", None, {}),
    ("native moee_sum", "moee_sum", None, {}),
    ("topk moee_sum", "moee_sum", "topk", {}),
    ("usmoe moee_sum", "moee_sum", "usmoe", {}),
    ("usmoe 0.5x moee_sum", "moee_sum", "usmoe", {"top_k": "0.5x"}),
    ("expert_choice moee_sum", "moee_sum", "expert_choice", {}),
    ("ssr sinkhorn moee_sum", "moee_sum", "ssr", {"inference": "sinkhorn", "scope": "sequence"}),
]


def build_models(which: list[str]):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = demo_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    models = {}
    if "demo" in which:
        models["demo"] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if "olmoe-64x8" in which:
        torch.manual_seed(0)
        config = AutoConfig.for_model(
            "olmoe", vocab_size=len(tokenizer), hidden_size=256, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=4, num_experts=64, num_experts_per_tok=8,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        models["olmoe-64x8"] = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return models, tokenizer


def variants_for(model, tokenizer, texts: list[str]) -> list[Variant]:
    out = []
    k = model.config.num_experts_per_tok
    for label, embedding, method, options in VARIANTS:
        m = copy.deepcopy(model)
        if method is not None:
            options = {key: (float(v[:-1]) * k if isinstance(v, str) and v.endswith("x") else v) for key, v in options.items()}
            hmp.patch(m, method, **options)
        encoder = MoEEncoder(m, tokenizer, embedding=embedding, batch_size=32, progress=False)
        out.append(Variant(label, lambda e=encoder: e.embed(texts, progress=False),
                           baseline=None if label == "native hs" else "native hs"))
    return out


def render(info: dict, results: dict, args, elapsed: float) -> str:
    lines = [
        "# MoEE embedding speed by routing",
        "",
        f"Run {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, {elapsed:.0f} s, command "
        f"`python eval/benchmarks/bench_embeddings.py {' '.join(sys.argv[1:])}`.",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['threads']} torch threads; torch {info['torch']}, "
        f"transformers {info['transformers']}, hf_moe_patch {info['hf_moe_patch']}.",
        "",
        f"{args.texts} held-out WordNet glosses, PromptEOL, batches of 32, float32 on CPU; "
        f"{args.repeats} interleaved rounds after {args.warmup} warm-up rounds. Ratio: median of "
        "paired per-round ratios to `native hs` (25th-75th percentile).",
        "",
    ]
    for name, summary in results.items():
        lines += [f"## {name}", "", "| variant | ms per call (median) | time vs native hs |", "|---|---:|---:|"]
        for label, row in summary.items():
            ratio = fmt_ratio(row) if "ratio" in row else "1 (baseline)"
            lines.append(f"| {label} | {row['ms']:.1f} | {ratio} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["demo", "olmoe-64x8"], choices=["demo", "olmoe-64x8"])
    parser.add_argument("--texts", type=int, default=256, help="held-out WordNet glosses per call")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="smoke run: 32 texts, 2 rounds, the demo model")
    parser.add_argument("--out", help="also write the markdown report here")
    args = parser.parse_args(argv)
    if args.quick:
        args.texts, args.repeats, args.models = 32, 2, ["demo"]
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    info = machine_info(args.threads)
    texts = [s.definition for s in load_wordnet() if split_of(s) == "heldout"][: args.texts]
    models, tokenizer = build_models(args.models)
    results = {}
    for name, model in models.items():
        variants = variants_for(model, tokenizer, texts)
        with tqdm(total=len(variants) * args.repeats, desc=f"embedding {name}") as bar:
            interleaved(variants, repeats=args.repeats, warmup=args.warmup, number=1, bar=bar)
        results[name] = summarise(variants)
    report = render(info, results, args, time.perf_counter() - start)
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
