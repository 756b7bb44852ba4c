"""``hf-moe-patch sft`` and ``sft-compare``: fine-tune a patched model with peft and Trainer, once
or once per routing. The model, the routing and its options, the data set and the output folder
are checked before the model loads."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from .common import EXIT_STATUS, check_out, fail, locate, quiet_bars, split_methods

SFT_DESCRIPTION = """\
Fine-tune a patched MoE model on Alpaca-format data with peft (LoRA by default) and transformers'
Trainer, which runs on accelerate: "accelerate launch -m hf_moe_patch.cli sft ..." scales it out
with no change. MODEL is 'demo' (the shipped demo model, the default), a local folder or a Hub id.

Writes into --output-dir: checkpoints, final/ (the adapter or model with its routing),
sft_config.json (every setting and the versions; --config repeats the run), sft_results.json,
routing_stats.jsonl and routing_balance.png. The results are printed as JSON (after the Trainer's
log lines), then where everything was written."""

COMPARE_DESCRIPTION = """\
The same fine-tuning run once per routing (model, data, seed, steps and adapters shared), then
comparison.{md,json,png} in --out: losses, validation perplexity on clean and corrupted text,
load balance (MaxVio) and step time. Each run goes to --out/<routing>. The first routing is the
baseline."""


def _defaults() -> dict[str, Any]:
    from ..training.sft import SFTConfig

    return {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())  # type: ignore[misc]
            for f in dataclasses.fields(SFTConfig)}


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, dict)) and not value:
        return "none"
    return str(value)


def add_sft_options(p: argparse.ArgumentParser) -> None:
    """Every SFTConfig setting as an option; each help ends with the default."""
    from ..lm import DTYPES
    from ..training.sft import AUX_LOSS, ROUTER_MODES

    d = _defaults()

    def add(flag: str, help: str, *, default_of: str | None = None, default_text: str | None = None, **kwargs: Any) -> None:
        name = default_of or flag.lstrip("-").replace("-", "_")
        text = default_text if default_text is not None else _show(d.get(name))
        p.add_argument(flag, help=f"{help} (default: {text})", **kwargs)

    add("--config", "start from a run's saved sft_config.json; the other options override it", default_text="none",
        metavar="FILE")
    add("--revision", "the model's revision on the Hub", default_text="main")
    add("--method", "routing during training and evaluation, METHOD[:key=value,...], e.g. ssr, ssr:p=1, usmoe:top_k=3 "
        "(see hf-moe-patch methods)", dest="method_spec", default_of="method", metavar="SPEC")
    add("--aux-loss", "the model's auxiliary balancing loss: auto (on for topk only), on (ssr still turns it off), off",
        choices=AUX_LOSS)
    add("--dataset", "'wordnet' (the built-in WordNet-Alpaca set), a Hub data set id such as tatsu-lab/alpaca (needs "
        "the Hub or its cache), or a local .json/.jsonl/.parquet file in Alpaca format", metavar="NAME")
    add("--dataset-revision", "the data set's revision on the Hub", default_text="main")
    add("--max-train-samples", "use at most this many training examples", type=int, default_text="all")
    add("--validation-size", "share (< 1) or count of examples held out for validation", type=float)
    add("--max-length", "tokens per example at most", type=int)
    add("--packing", "concatenate examples into full blocks (EOS-separated)", action="store_true", default=None)
    add("--corruption", "corrupt the training text, KIND junk or char (e.g. junk:0.1)", default_text="clean",
        metavar="KIND:RATE[:SEED]")
    add("--eval-corruption", "corruption of the second validation perplexity", metavar="KIND:RATE[:SEED]")
    add("--peft", "lora: LoRA adapters; none: full fine-tuning (the router stays frozen unless --router train)",
        choices=["lora", "none"])
    add("--lora-r", "LoRA rank", type=int)
    add("--lora-alpha", "LoRA alpha (scaling alpha / r)", type=int)
    add("--lora-dropout", "LoRA dropout", type=float)
    add("--no-lora-attention", "no LoRA on the attention projections", dest="lora_attention", action="store_false",
        default=None, default_text="LoRA on the attention projections")
    add("--no-lora-experts", "no LoRA on the fused expert weights", dest="lora_experts", action="store_false",
        default=None, default_text="LoRA on the expert weights")
    add("--router", "the router's weights: frozen, train (in full) or lora", choices=ROUTER_MODES)
    add("--output-dir", "folder for checkpoints, the final adapter and the run's records", metavar="DIR")
    add("--seed", "seed of data order, initialisation and SSR's coins", type=int)
    add("--max-steps", "optimizer steps; give --num-train-epochs alone to train by epochs", type=int)
    add("--num-train-epochs", "epochs, used when --max-steps is not given", type=float)
    add("--learning-rate", "peak learning rate", type=float)
    add("--weight-decay", "AdamW weight decay", type=float)
    add("--warmup-steps", "linear warm-up steps", type=int)
    add("--per-device-train-batch-size", "training examples per device and step", type=int)
    add("--per-device-eval-batch-size", "validation examples per device and forward", type=int)
    add("--gradient-accumulation-steps", "micro-batches per optimizer step", type=int)
    add("--logging-steps", "log loss and routing statistics every this many steps (and at checkpoints and the end)", type=int)
    add("--save-steps", "save a checkpoint every this many steps", type=int)
    add("--save-total-limit", "keep at most this many checkpoints", type=int)
    add("--resume-from-checkpoint", "a checkpoint folder of this run's output dir to continue from", default_text="start afresh",
        metavar="DIR")
    add("--allow-routing-change", "resume from a checkpoint trained under another routing (method, options or aux "
        "loss); refused without it", action="store_true", default=None)
    add("--merge", "also save the adapter merged into the model (merged/)", action="store_true", default=None)
    add("--dtype", "auto: bfloat16 on GPUs that support it, else float32", choices=DTYPES)
    add("--gradient-checkpointing", "recompute activations in the backward pass to save memory", action="store_true", default=None)
    add("--report-to", "Trainer loggers, e.g. tensorboard wandb", nargs="+", metavar="LOGGER")


def add_parsers(sub, parents, options: bool = True) -> None:
    """``sft`` and ``sft-compare``; without ``options`` only their names (training.sft, which
    their options read, takes a second to import)."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("sft", parents=parents, help="fine-tune a patched model on Alpaca-format data with peft and Trainer "
                       "(runs under accelerate launch too)", description=SFT_DESCRIPTION, epilog=EXIT_STATUS, formatter_class=fmt)
    p.add_argument("model", nargs="?", default=None, help="'demo' (the shipped model), a local folder or a Hub id (default: demo)")
    if options:
        add_sft_options(p)
    p.set_defaults(func=run_sft_command)

    p = sub.add_parser("sft-compare", parents=parents, help="the same fine-tuning run once per routing, with a comparison "
                       "table and plot", description=COMPARE_DESCRIPTION, epilog=EXIT_STATUS, formatter_class=fmt)
    p.add_argument("model", nargs="?", default=None, help="'demo' (the shipped model), a local folder or a Hub id (default: demo)")
    p.add_argument("--methods", nargs="+", default=None, metavar="SPEC",
                   help="routings, METHOD[:key=value,...] with the extra key aux_loss=on|off|auto; the first is the "
                        "baseline (default: topk topk:aux_loss=off ssr ssr:p=1 usmoe expert_choice)")
    p.add_argument("--out", default="sft_compare", help="folder for the runs and comparison.{md,json,png} (default: %(default)s)")
    if options:
        add_sft_options(p)
    p.set_defaults(func=run_compare_command, method_spec=None)


def _sft_config(args: argparse.Namespace):
    """An SFTConfig from the command line; ``--config`` starts from a saved run's configuration."""
    from ..report import parse_case
    from ..training.sft import SFTConfig

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


def check_dataset(source: str) -> None:
    """The data set of a run, checked before the model loads: the built-in set needs WordNet, a
    local file must exist, a Hub data set needs the Hub or the local cache."""
    from ..hub_access import HubUnreachableError, hub_dataset_cached, is_repo_id, offline_reason
    from ..training.data import LOCAL_EXTENSIONS, WORDNET_SOURCE

    if source == WORDNET_SOURCE:
        from ..data.wordnet import find_wordnet_dir

        find_wordnet_dir()
        return
    path = Path(source).expanduser()
    if path.exists():
        return
    if path.suffix.lower() in LOCAL_EXTENSIONS or not is_repo_id(source):
        raise FileNotFoundError(f"no such data file or folder: {source!r} (--dataset is 'wordnet', a local "
                                f".json/.jsonl/.parquet file, or a Hub data set id)")
    reason = offline_reason()
    if reason is not None and not hub_dataset_cached(source):
        raise HubUnreachableError(
            f"data set {source!r} is not in the local cache and the Hugging Face Hub is offline ({reason}); use "
            f"--dataset wordnet (built in) or a local .json/.jsonl/.parquet file in Alpaca format")


def check_run(config, specs: list[str] | None = None) -> None:
    """Everything a run needs, checked before the model loads: routing names and options (also
    their ranges, from the model's config), the model, the data set, the output folder."""
    from ..validation import check_routings, native_from_config, parse_routings

    flag = "--methods" if specs is not None else "--method"
    cases = parse_routings(specs if specs is not None else [_spec(config.method, config.options)], flag=flag)
    for case in cases:
        if isinstance(case.options.get("top_k"), str):
            fail(f"{flag}: top_k={case.options['top_k']!r} in {case.label!r}: fine-tuning takes a number of experts "
                 f"(e.g. top_k=3); multiples of the native k are for demo and mteb")
    check_dataset(config.dataset)
    _, _, model_config = locate(config.model, config.revision)
    check_routings(cases, native_from_config(model_config))


def _spec(method: str, options: dict[str, Any]) -> str:
    return method + (":" + ",".join(f"{k}={json.dumps(v)}" for k, v in options.items()) if options else "")


def _quiet_training() -> None:
    quiet_bars(datasets=True)


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def run_sft_command(args: argparse.Namespace) -> int:
    from ..training.sft import CONFIG_FILE, RESULTS_FILE, run_sft

    if args.method_spec is not None:
        from ..validation import parse_routings

        parse_routings([args.method_spec], flag="--method")  # names with suggestions, before SFTConfig's check
    config = _sft_config(args)
    check_out(config.output_dir, "--output-dir")
    check_run(config)
    _quiet_training()
    results = run_sft(config)
    print(json.dumps(results, indent=2, default=str))
    if _is_main_process():
        out = Path(config.output_dir)
        print(f"wrote {out / 'final'} (the {'adapter' if config.peft == 'lora' else 'model'} with its routing), "
              f"{out / CONFIG_FILE}, {out / RESULTS_FILE}, {out / 'routing_stats.jsonl'}, {out / 'routing_balance.png'}"
              f"{' and ' + str(out / 'merged') if config.merge and config.peft == 'lora' else ''}")
    return 0


def run_compare_command(args: argparse.Namespace) -> int:
    from ..report import parse_case
    from ..training.compare import DEFAULT_CASES, compare_sft
    from ..training.sft import AUX_LOSS

    for flag, value in (("--method", args.method_spec), ("--output-dir", args.output_dir),
                        ("--resume-from-checkpoint", args.resume_from_checkpoint)):
        if value is not None:
            fail(f"sft-compare: {flag} does not apply (routings come from --methods, runs go to --out/<routing>)")
    specs = split_methods(args.methods) if args.methods is not None else list(DEFAULT_CASES)
    if not specs:
        fail("--methods was given no routing; e.g. --methods topk ssr")
    routings = []
    for spec in specs:
        case = parse_case(spec)
        aux = case.options.pop("aux_loss", "auto")
        if aux not in AUX_LOSS:
            fail(f"aux_loss={aux!r} in {spec!r} is not valid; valid: {', '.join(AUX_LOSS)}")
        routings.append(_spec(case.method, case.options))
    config = _sft_config(args)
    check_out(args.out, "--out")
    check_run(config, routings)
    _quiet_training()
    report = compare_sft(config, specs, args.out)
    print(f"\n{report['markdown']}\n\nwrote {Path(args.out) / 'comparison.md'}, .json and .png")
    return 0
