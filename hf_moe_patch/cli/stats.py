"""``hf-moe-patch stats``: routing statistics of a model under each routing, on given texts."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import EXIT_STATUS, check_cases_for_config, check_out, fail, locate, quiet_bars, split_methods, text_lines

DEFAULT_CASES = [
    "topk",
    "usmoe",
    "usmoe:top_k=1.5",
    "usmoe:top_k=1.0",
    "expert_choice",
    "ssr:inference=sinkhorn",
    "top_p",
]

DESCRIPTION = """\
Routing statistics of a model under each routing, measured on the given texts: experts per token,
tokens without an expert, MaxVio, load CV, router entropy, Sinkhorn calls and the KL divergence
of the next-token distribution from the native model's. Prints a table and writes
routing_stats.{json,md} and routing_load.png to --out.

MODEL is 'demo' (the shipped demo model), a local folder or a Hub id."""


def add_parser(sub, parents) -> None:
    from ..lm import DTYPES

    p = sub.add_parser("stats", parents=parents, help="routing statistics of a model ('demo', a folder or a Hub id) on texts",
                       description=DESCRIPTION, epilog=EXIT_STATUS, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="'demo', a local folder, or a Hub id such as allenai/OLMoE-1B-7B-0924")
    p.add_argument("--revision", default=None, help="the model's revision on the Hub (default: main)")
    p.add_argument("--methods", nargs="+", default=DEFAULT_CASES, metavar="SPEC",
                   help="routings to compare, each METHOD[:key=value,...] with JSON values, e.g. "
                        "'usmoe:top_k=1.5,scope=batch' (default: %(default)s)")
    p.add_argument("--text", default="Mixture-of-experts models route each token to a few experts.",
                   help="the text to route (default: %(default)r)")
    p.add_argument("--texts", help="a file with one text per line (overrides --text)")
    p.add_argument("--batch-size", type=int, default=8, help="texts per forward pass (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=512, help="tokens per text at most (default: %(default)s)")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: the checkpoint's own dtype (default: %(default)s)")
    p.add_argument("--device-map", default=None, help="passed to from_pretrained, e.g. auto (default: none)")
    p.add_argument("--calibration-file", metavar="PATH",
                   help="texts, one per line, to calibrate causal routings (causal=true without thresholds) on; "
                        "needed only by such routings (default: none)")
    p.add_argument("--out", default="stats_out", help="folder for routing_stats.{json,md} and routing_load.png (default: %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .evaluate import run_comparison
    from ..validation import parse_routings

    specs = split_methods(args.methods)
    parse_routings(specs, flag="--methods")
    if args.texts:
        texts = Path(args.texts).read_text().splitlines()
        where = f"the {{n}} non-empty lines of {args.texts}"
    else:
        texts, where = [args.text], "the --text text"
    texts = [t for t in texts if t.strip()]
    if not texts:
        fail(f"no text to route: {args.texts or '--text'} is empty")
    if args.batch_size < 1 or args.max_length < 1:
        fail("--batch-size and --max-length must be integers >= 1")
    check_out(args.out, "--out")
    path, extra, config = locate(args.model, args.revision)
    cases = check_cases_for_config(specs, config)
    from ..report import needs_calibration

    calibration = None
    if any(needs_calibration(c) for c in cases):
        if args.calibration_file is None:
            fail("a causal routing without thresholds needs text to calibrate on: pass --calibration-file PATH "
                 "(one text per line; better not the texts measured here)")
        calibration = text_lines(args.calibration_file, "--calibration-file")
    quiet_bars()
    tokenizer = AutoTokenizer.from_pretrained(path, revision=args.revision, **extra)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else "auto"
    model = AutoModelForCausalLM.from_pretrained(path, revision=args.revision, dtype=dtype,
                                                 device_map=args.device_map, **extra).eval()
    batches = []
    for i in range(0, len(texts), args.batch_size):
        enc = tokenizer(texts[i:i + args.batch_size], return_tensors="pt", padding=True, truncation=True,
                        max_length=args.max_length)
        batch = {k: v.to(model.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        # Positions from the mask, as generate() computes them: left padding must not shift them.
        batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)
        batches.append(batch)
    if calibration is not None:
        from ..report import calibrate_cases

        cases = calibrate_cases(model, cases, calibration, tokenizer)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    source = f"{where.format(n=len(texts))} ({tokens} tokens, padding excluded)"
    return run_comparison(model, batches, cases, Path(args.out), f"Routing of {args.model}", source)
