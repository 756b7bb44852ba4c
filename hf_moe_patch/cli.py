"""The ``hf-moe-patch`` command line: ``demo``, ``mteb``, ``train-demo``, ``methods``, ``stats``, ``push``.

Run ``hf-moe-patch SUBCOMMAND --help`` for each subcommand's options.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import NoReturn, Sequence

logger = logging.getLogger("hf_moe_patch")

DEFAULT_CASES = [
    "topk",
    "usmoe",
    "usmoe:top_k=1.5",
    "usmoe:top_k=1.0",
    "expert_choice",
    "ssr:inference=sinkhorn",
]
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


def split_methods(items: Sequence[str]) -> list[str]:
    """Method specs from command-line words, each word a spec or a comma-separated list of specs;
    a ``key=value`` piece without a method name belongs to the spec before it.

    Example:
        >>> split_methods(["topk,usmoe:top_k=1.5,scope=batch,expert_choice", "ssr"])
        ['topk', 'usmoe:top_k=1.5,scope=batch', 'expert_choice', 'ssr']
    """
    specs: list[str] = []
    for item in items:
        for piece in filter(None, (p.strip() for p in item.split(","))):
            if "=" in piece and ":" not in piece and specs:
                specs[-1] += ("," if ":" in specs[-1] else ":") + piece
            else:
                specs.append(piece)
    return specs


def _cmd_methods(args: argparse.Namespace) -> int:
    import dataclasses

    from .methods import METHODS
    from .methods.base import NativeRouting

    example = NativeRouting(num_experts=64, top_k=8)
    print("Valid ranges shown for a model with N=64 experts and k=8.\n")
    for name, cls in METHODS.items():
        print(f"{name}: {(cls.__doc__ or '').strip().splitlines()[0]}")
        for f in dataclasses.fields(cls):
            rule = cls.OPTIONS.get(f.name)
            print(f"    {f.name} = {f.default!r}" + (f"    ({rule.describe(example)})" if rule else ""))
    return 0


def _cases(model, texts: Sequence[str], top_k: Sequence[str] | None = None):
    """Routing cases from command-line words; ``top_k`` may be a multiple of the native k."""
    from .embeddings.evaluation import expand_cases

    budgets = split_methods(top_k) if top_k else None
    return expand_cases(split_methods(texts), int(model.config.num_experts_per_tok), budgets)


def _run_comparison(model, batches, cases, out_dir: Path, title: str) -> int:
    from .io import atomic_write_text
    from .report import compare_routings, markdown_table, plot_load

    rows = compare_routings(model, batches, cases)
    table = markdown_table(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "routing_stats.json", json.dumps(rows, indent=2, default=str))
    atomic_write_text(out_dir / "routing_stats.md", f"# {title}\n\n{table}\n")
    png = plot_load(rows, out_dir / "routing_load.png")
    print(f"\n{title}\n\n{table}\n")
    print(f"wrote {out_dir / 'routing_stats.json'}, {out_dir / 'routing_stats.md'} and {png}")
    return 0


def _load(model: str, revision: str | None, dtype: str, device: str | None):
    """Model (eval mode, on ``device``) and tokenizer; ``demo`` is the shipped demo model."""
    from .lm import load_model_and_tokenizer

    loaded, tokenizer = load_model_and_tokenizer(model, revision=revision, dtype=dtype)
    if device:
        loaded.to(device)
    return loaded.eval(), tokenizer


def _evaluate(args: argparse.Namespace, model, tokenizer, title: str):
    from .data.corruption import parse_corruption
    from .embeddings.evaluation import evaluate_routings
    from .data.wordnet_tasks import WORDNET_TASKS

    tasks = split_methods(args.tasks) if args.tasks else list(WORDNET_TASKS)
    report = evaluate_routings(
        model, tokenizer, split_methods(args.methods), tasks, embedding=args.embedding, prompt=args.prompt,
        instruction=args.instruction, sum_weight=args.sum_weight, batch_size=args.batch_size,
        max_length=args.max_length, top_k=split_methods(args.top_k) if args.top_k else None,
        corruption=parse_corruption(args.corrupt), cache_dir=args.cache_dir, out_dir=args.out,
        overwrite=args.overwrite, title=title,
        wordnet_kwargs={"path": args.wordnet, "split": args.wordnet_split,
                        "sizes": json.loads(args.wordnet_sizes) if args.wordnet_sizes else None},
    )
    print(f"\n{title}\n\n{report.to_markdown()}\n")
    print(f"wrote {Path(args.out) / 'mteb_comparison.md'}, .json and .png")
    return report


def _cmd_mteb(args: argparse.Namespace) -> int:
    model, tokenizer = _load(args.model, args.revision, args.dtype, args.device)
    title = f"MTEB ({args.embedding}, prompt {args.prompt}) of {args.model} under each routing"
    if args.corrupt:
        title += f", texts corrupted with {args.corrupt}"
    _evaluate(args, model, tokenizer, title)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from .data.corruption import parse_corruption
    from .training.demo_model import corpus
    from .data.wordnet import load_wordnet

    model, tokenizer = _load("demo", None, "float32", None)
    title = (f"MTEB ({args.embedding}, prompt {args.prompt}) of the shipped WordNet demo model "
             f"(OLMoE architecture, {model.config.num_experts} experts, top-{model.config.num_experts_per_tok}) under each routing")
    _evaluate(args, model, tokenizer, title)
    # Routing statistics on held-out WordNet text (no padding: one packed block per row).
    texts = corpus(load_wordnet(args.wordnet), "heldout")[: args.stats_texts]
    corruption = parse_corruption(args.corrupt)
    if corruption is not None:
        texts = corruption.apply(texts)
    ids = torch.tensor([i for doc in tokenizer(texts)["input_ids"] for i in doc])
    n = len(ids) // 128
    batches = [{"input_ids": block, "attention_mask": torch.ones_like(block)} for block in ids[: n * 128].view(n, 128).split(8)]
    return _run_comparison(model, batches, _cases(model, args.methods, args.top_k), Path(args.out),
                           "Routing statistics of the demo model on held-out WordNet text")


def _fail(message: str) -> NoReturn:
    """Exit with one line on stderr, ``hf-moe-patch: error: MESSAGE``, and status 2 (argparse's
    status for bad arguments)."""
    print(f"hf-moe-patch: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _cmd_train_demo(args: argparse.Namespace) -> int:
    import dataclasses

    from .training.demo_model import DemoTrainingArgs, demo_output_dir, train_demo_model
    from .data.wordnet import load_wordnet

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(DemoTrainingArgs)
             if getattr(args, f.name, None) is not None}
    # Arguments and output folder are checked before the corpus, the tokenizer or the model is
    # built: a bad value fails in a second, and never after a run has replaced a folder.
    try:
        train_args = DemoTrainingArgs(**given)
        out = demo_output_dir(args.out, train_args.arch, force=args.force)
    except (ValueError, FileExistsError) as exc:
        _fail(str(exc))
    wordnet = load_wordnet(args.wordnet) if args.wordnet else None
    out = train_demo_model(out, train_args, wordnet=wordnet, force=args.force)
    print((out / "README.md").read_text())
    return 0


def _sft_config(args: argparse.Namespace):
    """An SFTConfig from the command line; ``--config`` starts from a saved run's configuration."""
    import dataclasses

    from .report import parse_case
    from .training.sft import SFTConfig

    base = SFTConfig.from_json(args.config) if args.config else SFTConfig()
    given = {k: v for k, v in vars(args).items() if v is not None and k in {f.name for f in dataclasses.fields(SFTConfig)}}
    if args.method_spec is not None:
        case = parse_case(args.method_spec)
        given.update(method=case.method, options=case.options)
    if args.report_to is not None:
        given["report_to"] = [] if args.report_to == ["none"] else args.report_to
    if args.num_train_epochs is not None and args.max_steps is None:
        given["max_steps"] = None  # epochs decide the length
    return dataclasses.replace(base, **given)


def _cmd_sft(args: argparse.Namespace) -> int:
    from .training.sft import run_sft

    config = _sft_config(args)
    results = run_sft(config)
    print(json.dumps(results, indent=2, default=str))
    return 0


def _cmd_sft_compare(args: argparse.Namespace) -> int:
    from .training.compare import DEFAULT_CASES, compare_sft

    for flag, value in (("--method", args.method_spec), ("--output-dir", args.output_dir),
                        ("--resume-from-checkpoint", args.resume_from_checkpoint)):
        if value is not None:
            raise SystemExit(f"sft-compare: {flag} does not apply (routings come from --methods, runs go to --out/<routing>)")

    report = compare_sft(_sft_config(args), split_methods(args.methods) if args.methods else DEFAULT_CASES, args.out)
    print(f"\n{report['markdown']}\n\nwrote {Path(args.out) / 'comparison.md'}, .json and .png")
    return 0


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
    return _run_comparison(model, batches, _cases(model, args.methods), Path(args.out), f"Routing of {args.model}")


def _cmd_push(args: argparse.Namespace) -> int:
    from .sharing.hub import from_pretrained, push_to_hub

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


def add_demo_training_options(p: argparse.ArgumentParser) -> None:
    """One option per numeric field of DemoTrainingArgs (``--steps``, ``--batch-size``, ...),
    default: the field's default (the shipped model's setting)."""
    import dataclasses

    from .training.demo_model import DemoTrainingArgs

    for f in dataclasses.fields(DemoTrainingArgs):
        if f.type in ("int", "float", int, float):
            kind = int if f.type in ("int", int) else float
            p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, metavar=kind.__name__.upper(),
                           help=f"default {f.default}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-moe-patch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("methods", help="list routing methods, their options, defaults and valid ranges")
    p.set_defaults(func=_cmd_methods)

    method_help = ("routings to compare, each METHOD[:key=value,...] with JSON values, e.g. "
                   "'usmoe:top_k=1.5,scope=batch' (default: %(default)s)")
    def add_eval_options(p: argparse.ArgumentParser, methods: list[str]) -> None:
        p.add_argument("--methods", nargs="+", default=methods,
                       help="routings, comma-separated or space-separated, each METHOD[:key=value,...] "
                            "(JSON values; top_k may be a multiple of the native k such as 0.75x); "
                            "default: %(default)s")
        p.add_argument("--top-k", nargs="+", help="budgets to sweep for every method with a top_k option that "
                                                  "does not set it, e.g. 1x 0.75x 0.5x or 4 3")
        p.add_argument("--tasks", nargs="+", help="mteb task names (default: the local WordNet tasks); MTEB "
                                                  "tasks download when online")
        p.add_argument("--embedding", default="moee_sum", choices=["hs", "rw", "moee_concat", "moee_sum"])
        p.add_argument("--prompt", default="prompteol", choices=["none", "prompteol"])
        p.add_argument("--instruction", help="a task instruction put before every text, or 'task' for mteb's own")
        p.add_argument("--sum-weight", type=float, default=1.0, help="w in cos(hs) + w cos(rw) for moee_sum")
        p.add_argument("--corrupt", help="corrupt every task text: KIND:RATE[:SEED], KIND junk or char, "
                                         "e.g. junk:0.1 (see hf_moe_patch.data.corruption)")
        p.add_argument("--batch-size", type=int, default=32)
        p.add_argument("--max-length", type=int, default=512)
        p.add_argument("--cache-dir", default="mteb_cache", help="mteb result cache (one entry per routing and settings)")
        p.add_argument("--overwrite", action="store_true", help="recompute cached results")
        p.add_argument("--wordnet", help="folder of WordNet's data.* files (default: /usr/share/wordnet)")
        p.add_argument("--wordnet-split", default="heldout", choices=["heldout", "train", "all"],
                       help="WordNet synsets the local tasks draw from (heldout: words the demo model never saw)")
        p.add_argument("--wordnet-sizes", help="JSON overrides of the local tasks' sizes, e.g. "
                                               "'{\"WordNetWuPalmerSTS\": {\"n_pairs\": 200}}'")

    p = sub.add_parser("demo", help="the main job on the shipped demo model: MTEB WordNet tasks and routing "
                                    "statistics under each routing, with tables and plots")
    add_eval_options(p, DEMO_CASES)
    p.add_argument("--stats-texts", type=int, default=2000, help="held-out WordNet documents for the routing statistics")
    p.add_argument("--out", default="demo_out", help="folder for the JSON, markdown tables and PNG plots")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("mteb", help="MTEB evaluation of a model's MoE embeddings (MoEE) under each routing")
    p.add_argument("model", nargs="?", default="demo", help="Hub id, local folder, or 'demo' (default)")
    p.add_argument("--revision", default=None)
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPUs that support it, else float32), float32, bfloat16")
    p.add_argument("--device", default=None, help="e.g. cuda (default: where from_pretrained puts it)")
    add_eval_options(p, ["topk", "usmoe", "expert_choice"])
    p.add_argument("--out", default="mteb_out")
    p.set_defaults(func=_cmd_mteb)

    p = sub.add_parser("train-demo", help="pretrain the demo model on WordNet from nothing (about 30 min on 2 CPU cores)")
    p.add_argument("--arch", default="olmoe", choices=["olmoe", "mixtral"])
    add_demo_training_options(p)
    p.add_argument("--wordnet", help="folder of WordNet's data.* files (default: /usr/share/wordnet)")
    p.add_argument("--out", help="output folder (default: ./demo-ARCH-wordnet in the working directory)")
    p.add_argument("--force", action="store_true",
                   help="write into a folder that is not empty, or into the package's shipped assets "
                        "(replacing the shipped demo model)")
    p.set_defaults(func=_cmd_train_demo)

    def add_sft_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="start from a run's saved sft_config.json (other options override it)")
        p.add_argument("--revision")
        p.add_argument("--method", dest="method_spec", help="routing during training, METHOD[:key=value,...], "
                                                            "e.g. ssr, ssr:p=1, usmoe:top_k=3 (default topk)")
        p.add_argument("--aux-loss", choices=["auto", "on", "off"],
                       help="the model's auxiliary balancing loss: auto (on for topk only), on (ssr still turns it off), off")
        p.add_argument("--dataset", help="'wordnet' (built-in WordNet-Alpaca, default), a Hub id such as "
                                         "tatsu-lab/alpaca, or a local .json/.jsonl/.parquet in Alpaca format")
        p.add_argument("--dataset-revision")
        p.add_argument("--max-train-samples", type=int)
        p.add_argument("--validation-size", type=float, help="share (< 1) or count of examples held out (default 0.05)")
        p.add_argument("--max-length", type=int)
        p.add_argument("--packing", action="store_true", default=None)
        p.add_argument("--corruption", help="corrupt training text, KIND:RATE[:SEED] (e.g. junk:0.1)")
        p.add_argument("--eval-corruption", help="corruption of the second validation perplexity (default junk:0.1)")
        p.add_argument("--peft", choices=["lora", "none"], help="LoRA adapters (default) or full fine-tuning")
        p.add_argument("--lora-r", type=int)
        p.add_argument("--lora-alpha", type=int)
        p.add_argument("--lora-dropout", type=float)
        p.add_argument("--no-lora-attention", dest="lora_attention", action="store_false", default=None)
        p.add_argument("--no-lora-experts", dest="lora_experts", action="store_false", default=None)
        p.add_argument("--router", choices=["frozen", "train", "lora"], help="the router's weights (default frozen)")
        p.add_argument("--output-dir")
        p.add_argument("--seed", type=int)
        p.add_argument("--max-steps", type=int)
        p.add_argument("--num-train-epochs", type=float)
        p.add_argument("--learning-rate", type=float)
        p.add_argument("--per-device-train-batch-size", type=int)
        p.add_argument("--per-device-eval-batch-size", type=int)
        p.add_argument("--gradient-accumulation-steps", type=int)
        p.add_argument("--logging-steps", type=int)
        p.add_argument("--save-steps", type=int)
        p.add_argument("--resume-from-checkpoint", help="a checkpoint folder of this run's output dir")
        p.add_argument("--allow-routing-change", action="store_true", default=None,
                       help="resume from a checkpoint trained under another routing (method, options or aux loss); "
                            "refused without it")
        p.add_argument("--merge", action="store_true", default=None, help="also save the adapter merged into the model")
        p.add_argument("--dtype", help="auto (bf16 on GPUs that support it, else float32), float32, bfloat16")
        p.add_argument("--gradient-checkpointing", action="store_true", default=None)
        p.add_argument("--report-to", nargs="+", help="Trainer loggers, e.g. tensorboard wandb (default none)")

    p = sub.add_parser("sft", help="fine-tune a patched model on Alpaca-format data with peft and Trainer "
                                   "(runs under `accelerate launch` too)")
    p.add_argument("model", nargs="?", default=None, help="Hub id, local folder, or 'demo' (default)")
    add_sft_options(p)
    p.set_defaults(func=_cmd_sft)

    p = sub.add_parser("sft-compare", help="the same fine-tuning run once per routing, with a comparison table and plot")
    p.add_argument("model", nargs="?", default=None, help="Hub id, local folder, or 'demo' (default)")
    p.add_argument("--methods", nargs="+", default=None,
                   help="routings, METHOD[:key=value,...] with the extra key aux_loss=on|off|auto; the first is "
                        "the baseline (default: topk topk:aux_loss=off ssr ssr:p=1 usmoe expert_choice)")
    p.add_argument("--out", default="sft_compare", help="folder for the runs and comparison.{md,json,png}")
    add_sft_options(p)
    p.set_defaults(func=_cmd_sft_compare, method_spec=None)

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
