"""The ``hf-moe-patch`` command line: ``demo``, ``methods``, ``stats``, ``push``.

Run ``hf-moe-patch SUBCOMMAND --help`` for each subcommand's options.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

logger = logging.getLogger("hf_moe_patch")

DEFAULT_CASES = [
    "topk",
    "usmoe",
    "usmoe:top_k=1.5",
    "usmoe:top_k=1.0",
    "expert_choice",
    "ssr:inference=sinkhorn",
]


def _cmd_methods(args: argparse.Namespace) -> int:
    import dataclasses

    from .methods import METHODS
    from .methods.base import NativeRouting

    example = NativeRouting(num_experts=64, top_k=8)
    print(f"Valid ranges shown for a model with N=64 experts and k=8.\n")
    for name, cls in METHODS.items():
        print(f"{name}: {(cls.__doc__ or '').strip().splitlines()[0]}")
        for f in dataclasses.fields(cls):
            rule = cls.OPTIONS.get(f.name)
            print(f"    {f.name} = {f.default!r}" + (f"    ({rule.describe(example)})" if rule else ""))
    return 0


def _cases(texts: Sequence[str]):
    from .report import parse_case

    return [parse_case(t) for t in texts]


def _run_comparison(model, batches, cases, out_dir: Path, title: str) -> int:
    from .report import compare_routings, markdown_table, plot_load

    rows = compare_routings(model, batches, cases)
    table = markdown_table(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "routing_stats.json").write_text(json.dumps(rows, indent=2, default=str))
    (out_dir / "routing_stats.md").write_text(f"# {title}\n\n{table}\n")
    png = plot_load(rows, out_dir / "routing_load.png")
    print(f"\n{title}\n\n{table}\n")
    print(f"wrote {out_dir / 'routing_stats.json'}, {out_dir / 'routing_stats.md'} and {png}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from .testing import tiny_model

    # initializer_range 0.1 (not 0.02) so that the experts visibly move the predictions.
    model = tiny_model(args.model_type, seed=args.seed, hidden_size=64, num_hidden_layers=4, initializer_range=0.1,
                       **({"num_experts": 16, "num_experts_per_tok": 4} if args.model_type == "olmoe" else {}))
    gen = torch.Generator().manual_seed(args.seed)
    batches = []
    for _ in range(args.batches):
        ids = torch.randint(3, model.config.vocab_size, (4, 64), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, 48:] = 0  # one right-padded sequence: padding takes no experts and is not counted
        batches.append({"input_ids": ids, "attention_mask": mask})
    title = (f"Routing on a randomly initialised tiny {args.model_type} "
             f"({model.config.num_hidden_layers} layers; demo model of issue 3 pending)")
    return _run_comparison(model, batches, _cases(args.methods), Path(args.out), title)


def _cmd_stats(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model, revision=args.revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else "auto"
    model = AutoModelForCausalLM.from_pretrained(args.model, revision=args.revision, dtype=dtype,
                                                 device_map=args.device_map).eval()
    texts = Path(args.texts).read_text().splitlines() if args.texts else [args.text]
    texts = [t for t in texts if t.strip()]
    batches = []
    for i in range(0, len(texts), args.batch_size):
        enc = tokenizer(texts[i:i + args.batch_size], return_tensors="pt", padding=True, truncation=True,
                        max_length=args.max_length)
        batches.append({k: v.to(model.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")})
    return _run_comparison(model, batches, _cases(args.methods), Path(args.out), f"Routing of {args.model}")


def _cmd_push(args: argparse.Namespace) -> int:
    from .hub import from_pretrained, push_to_hub

    model = from_pretrained(args.path)
    tokenizer = None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.path)
    except (OSError, ValueError):
        logger.info("no tokenizer in %s; pushing the model alone", args.path)
    stats = json.loads(Path(args.stats_json).read_text()) if args.stats_json else None
    if isinstance(stats, dict) and "summary" in stats:
        stats = stats["summary"]
    results = json.loads(Path(args.eval_json).read_text()) if args.eval_json else None
    info = push_to_hub(
        model, args.repo_id, tokenizer, private=args.private, commit_message=args.commit_message,
        token=args.token, revision=args.revision, create_pr=args.create_pr, remote_code=args.remote_code,
        base_model=args.base_model, stats=stats, eval_results=results,
    )
    print(f"pushed {args.path} to {args.repo_id}: {getattr(info, 'commit_url', info)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-moe-patch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("methods", help="list routing methods, their options, defaults and valid ranges")
    p.set_defaults(func=_cmd_methods)

    method_help = ("routings to compare, each METHOD[:key=value,...] with JSON values, e.g. "
                   "'usmoe:top_k=1.5,scope=batch' (default: %(default)s)")
    p = sub.add_parser("demo", help="patch a locally built tiny model with each method and compare routing statistics")
    p.add_argument("--model-type", default="olmoe", choices=["olmoe", "qwen2_moe", "qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3"])
    p.add_argument("--methods", nargs="+", default=DEFAULT_CASES, help=method_help)
    p.add_argument("--batches", type=int, default=4, help="batches of 4 x 64 random tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="demo_out", help="folder for the JSON, markdown table and PNG plot")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("stats", help="routing statistics of a pretrained model (Hub id or local path) on texts")
    p.add_argument("model", help="e.g. allenai/OLMoE-1B-7B-0924 or a local folder")
    p.add_argument("--revision", default=None)
    p.add_argument("--methods", nargs="+", default=DEFAULT_CASES, help=method_help)
    p.add_argument("--text", default="Mixture-of-experts models route each token to a few experts.")
    p.add_argument("--texts", help="a file with one text per line (overrides --text)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--device-map", default=None, help="passed to from_pretrained, e.g. auto")
    p.add_argument("--out", default="stats_out")
    p.set_defaults(func=_cmd_stats)

    p = sub.add_parser("push", help="upload a saved patched model (or peft adapter) with its routing and a model card")
    p.add_argument("path", help="a folder written by save_pretrained / hf_moe_patch.save_pretrained")
    p.add_argument("repo_id", help="user/name on the Hub (created if missing)")
    p.add_argument("--private", action="store_true", default=None)
    p.add_argument("--remote-code", action="store_true",
                   help="also upload code so that trust_remote_code=True loads the routing without hf_moe_patch")
    p.add_argument("--commit-message")
    p.add_argument("--revision")
    p.add_argument("--create-pr", action="store_true")
    p.add_argument("--token", help="defaults to the saved Hugging Face login")
    p.add_argument("--base-model", help="base_model for the card's metadata (default: config._name_or_path)")
    p.add_argument("--stats-json", help="routing statistics JSON (RoutingStats.to_json) for the card")
    p.add_argument("--eval-json", help="{task: score} JSON for the card")
    p.set_defaults(func=_cmd_push)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
