#!/usr/bin/env python
"""Routers at real model widths on one GPU: prefill throughput, training-step time and peak memory
as ratios to the native router, measured side by side in one run.

Random-weight models are built from config (no download) at the real widths and expert counts of

- OLMoE-1B-7B (allenai/OLMoE-1B-7B-0924): hidden 2048, expert FFN 1024, 64 experts top-8,
  16 heads, vocabulary 50304 (16 layers in the real model);
- Mixtral-8x7B: hidden 4096, expert FFN 14336, 8 experts top-2, 32 heads, 8 KV heads,
  vocabulary 32000 (32 layers in the real model);

with fewer layers (``--layers``, default 4 and 2), in bfloat16. Every layer is the same, so time
and memory per layer scale with the layer count; the ratios to native are those of the full depth
up to the embedding and LM-head share. Router weights are drawn so that router logits have the
spread of a trained router (``--router-spread``, 1.48: the shipped demo model's, see
``eval/benchmarks/RESULTS.md``): with the default init (std 0.02) every router would be almost
uniform and the variable-compute routers (top_p, usmoe) would behave unlike on a trained model.

Routers: native (unpatched), an A/A copy of native (a second unpatched variant: the noise floor),
``topk`` (the package's native rule), ``usmoe`` at the native budget and at half of it,
``expert_choice``, ``ssr`` p=0.01 (its Sinkhorn step fires on ~1% of training forwards; in eval it
routes as top-k), ``ssr`` p=1 (every training forward routes by the Sinkhorn plan: the upper bound
of its cost) and ``top_p`` p=0.6.

Measurements, per model, on one model patched and unpatched in turn (the patch is outside the
timed region):

1. prefill: ``no_grad`` eval forward of ``--batch`` x ``--seq`` random tokens, last-token logits
   only (``logits_to_keep=1``, as generation's prefill); tokens/s;
2. training step: train-mode forward with ``labels`` + backward (no optimizer), grads freed;
3. peak memory: ``torch.cuda.max_memory_allocated`` of one prefill and one training step after a
   reset, absolute (weights included) and above what was allocated before the call;
4. experts per token measured with ``hmp.collect_stats`` on one prefill (untimed).

Timing: ``--warmup`` untimed calls per variant, then interleaved rounds: each round runs every
(router, prefill/train) variant once in a freshly shuffled, seeded order, each call timed between
``torch.cuda.synchronize()`` calls. Each router is reported as the median over rounds of the paired
(same-round) ratio to native, with the 25th-75th percentile. ``--max-seconds`` bounds the whole
run: the time left is split over the models still to run, and a model stops adding rounds when
its share is spent (at least ``--min-repeats`` rounds; the report says when this happened).

On CUDA (the default) the script stops at once with a clear message when no CUDA device is
present. ``--device cpu --quick`` is a smoke run on tiny widths (same expert counts) in seconds;
on CPU peak memory is not measured (null).

Outputs in --out (default eval/results/gpu_scale/): results.json, README.md, gpu_scale.png.

Example:
    python eval/gpu_scale.py                                 # on a GPU, ~2-4 minutes
    python eval/gpu_scale.py --device cpu --quick --out /tmp/gs   # smoke run (< 20 s)
"""

from __future__ import annotations

import argparse
import math
import random
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))  # eval/_common.py, also when loaded by path
from _common import ROOT, machine_info, quantiles, write_json  # noqa: E402
DEFAULT_OUT = ROOT / "eval" / "results" / "gpu_scale"
SCRIPT = "eval/gpu_scale.py"

NATIVE = "native"
AA = "native (A/A copy)"

# The real shapes (layer count aside: --layers).
SHAPES: dict[str, dict[str, Any]] = {
    "olmoe": dict(
        name="OLMoE-1B-7B shape", real="allenai/OLMoE-1B-7B-0924", real_layers=16, default_layers=4,
        config=dict(hidden_size=2048, intermediate_size=1024, num_experts=64, num_experts_per_tok=8,
                    num_attention_heads=16, num_key_value_heads=16, vocab_size=50304, max_position_embeddings=4096,
                    norm_topk_prob=False),
    ),
    "mixtral": dict(
        name="Mixtral-8x7B shape", real="mistralai/Mixtral-8x7B-v0.1", real_layers=32, default_layers=2,
        config=dict(hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2,
                    num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768),
    ),
}
# --quick: tiny widths, the same expert counts and top-k.
QUICK_WIDTHS = dict(hidden_size=64, intermediate_size=32, num_attention_heads=4, num_key_value_heads=4, vocab_size=512,
                    max_position_embeddings=256)
QUICK_WIDTHS_MIXTRAL = dict(QUICK_WIDTHS, num_key_value_heads=2)

FULL = dict(batch=8, seq=2048, warmup=2, repeats=10)
QUICK = dict(batch=2, seq=32, warmup=1, repeats=3)


def routers(k: int) -> list[tuple[str, str | None, dict[str, Any]]]:
    """(label, method, options) of every router; method None is the unpatched model. The labels
    name budgets relative to the native ``k`` so that both models share them (OLMoE: usmoe k = 8,
    k/2 = 4; Mixtral: 2 and 1)."""
    half = k / 2
    return [
        (NATIVE, None, {}),
        (AA, None, {}),
        ("topk", "topk", {}),
        ("usmoe k", "usmoe", {"top_k": k}),
        ("usmoe k/2", "usmoe", {"top_k": half}),
        ("expert_choice", "expert_choice", {}),
        ("ssr p=0.01", "ssr", {"p": 0.01, "seed": 0}),
        ("ssr p=1", "ssr", {"p": 1.0, "seed": 0}),
        ("top_p p=0.6", "top_p", {"p": 0.6}),
    ]


# --- command line ------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=SCRIPT, formatter_class=argparse.RawDescriptionHelpFormatter,
                                description=__doc__.split("\n\nExample:")[0])
    p.add_argument("--device", default="cuda", help="cuda (default; fails at once without a CUDA device) or cpu")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: tiny widths (hidden 64), batch {QUICK['batch']} x {QUICK['seq']} tokens, "
                        f"{QUICK['warmup']} warm-up, {QUICK['repeats']} rounds")
    p.add_argument("--models", nargs="+", choices=sorted(SHAPES), default=["olmoe", "mixtral"],
                   help="model shapes to run (default: olmoe mixtral)")
    p.add_argument("--layers", nargs="+", type=int, metavar="N",
                   help="decoder layers per model, one number for all or one per --models entry "
                        "(default: 4 for OLMoE, 2 for Mixtral)")
    p.add_argument("--batch", type=int, help=f"sequences per call (default: {FULL['batch']}; quick: {QUICK['batch']})")
    p.add_argument("--seq", type=int, help=f"tokens per sequence (default: {FULL['seq']}; quick: {QUICK['seq']})")
    p.add_argument("--warmup", type=int, help=f"untimed calls per variant (default: {FULL['warmup']}; quick: {QUICK['warmup']})")
    p.add_argument("--repeats", type=int,
                   help=f"interleaved timing rounds per model (default: {FULL['repeats']}; quick: {QUICK['repeats']})")
    p.add_argument("--min-repeats", type=int, default=3,
                   help="rounds a model runs even past its share of --max-seconds (default: %(default)s)")
    p.add_argument("--max-seconds", type=float, default=300.0,
                   help="time budget of the whole run; a model stops adding rounds when its share is spent "
                        "(default: %(default)s)")
    p.add_argument("--dtype", choices=["bfloat16", "float32", "float16"],
                   help="parameter dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--router-spread", type=float, default=1.48,
                   help="standard deviation of router logits the random router weights are drawn for "
                        "(default: %(default)s, the shipped demo model's)")
    p.add_argument("--threads", type=int,
                   help="torch CPU threads (default: 1 with --device cpu, where 2 threads on cores shared with other jobs "
                        "ran up to 9x slower; torch's default on CUDA)")
    p.add_argument("--skip", nargs="+", default=[], metavar="LABEL", help="router labels to leave out")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, tokens and timing order (default: %(default)s)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: eval/results/gpu_scale)")
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"--threads={args.threads} is not valid; an integer >= 1")
    for name in ("batch", "seq", "repeats", "min_repeats"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')}={getattr(args, name)} is not valid; an integer >= 1")
    if args.warmup < 0:
        raise SystemExit(f"--warmup={args.warmup} is not valid; an integer >= 0")
    if args.max_seconds <= 0:
        raise SystemExit(f"--max-seconds={args.max_seconds} is not valid; a positive number")
    if args.layers is None:
        args.layers = [1 if args.quick else SHAPES[m]["default_layers"] for m in args.models]
    elif len(args.layers) == 1:
        args.layers = args.layers * len(args.models)
    elif len(args.layers) != len(args.models):
        raise SystemExit(f"--layers takes one number or one per model ({len(args.models)}); got {args.layers}")
    if any(n < 1 for n in args.layers):
        raise SystemExit(f"--layers={args.layers} is not valid; integers >= 1")
    return args


def check_device(device: str) -> None:
    """Fail at once, with a clear message, when the device is missing."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {device}: no CUDA device is available (torch {torch.__version__}, "
                             f"CUDA build {torch.version.cuda or 'none'}); run on a GPU machine, or use --device cpu --quick "
                             "for a smoke run")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SystemExit(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif dev.type != "cpu":
        raise SystemExit(f"--device {device} is not supported; cuda or cpu")


# --- helpers -----------------------------------------------------------------------------------

def environment(device) -> dict[str, Any]:
    """The machine (``_common.machine_info``) plus the CUDA device's details."""
    import torch

    info: dict[str, Any] = {**machine_info(), "cuda": torch.version.cuda, "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=torch.cuda.get_device_name(device), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    gpu_capability=f"{props.major}.{props.minor}", cudnn=torch.backends.cudnn.version())
    return info


def build_model(family: str, layers: int, args, device, dtype):
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig, OlmoeConfig

    shape = dict(SHAPES[family]["config"])
    if args.quick:
        shape.update(QUICK_WIDTHS_MIXTRAL if family == "mixtral" else QUICK_WIDTHS)
    shape["max_position_embeddings"] = max(shape["max_position_embeddings"], args.seq)
    cls = OlmoeConfig if family == "olmoe" else MixtralConfig
    config = cls(num_hidden_layers=layers, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                 **shape)
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    n_experts = shape.get("num_experts") or shape.get("num_local_experts")
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    std = args.router_spread / math.sqrt(shape["hidden_size"])
    routers_set = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight") and param.dim() == 2 and param.shape[0] == n_experts:
                param.copy_(torch.randn(param.shape, generator=gen, device=device, dtype=torch.float32) * std)
                routers_set += 1
    if routers_set != layers:
        raise RuntimeError(f"{family}: found {routers_set} router weights for {layers} layers")
    return model.eval(), config


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- measurement -------------------------------------------------------------------------------

def run_model(family: str, layers: int, args, device, dtype, deadline: float, log: Callable[[str], None]) -> dict[str, Any]:
    import torch

    import hf_moe_patch as hmp

    t_build = time.perf_counter()
    model, config = build_model(family, layers, args, device, dtype)
    sync(device)
    build_seconds = time.perf_counter() - t_build
    k = int(config.num_experts_per_tok)
    n_experts = int(getattr(config, "num_experts", None) or config.num_local_experts)
    variants = [r for r in routers(k) if r[0] not in args.skip or r[0] == NATIVE]
    for label, method, options in variants:  # every option checked before any timing
        if method is not None:
            hmp.check_routing(model, method, **options)
    gen = torch.Generator(device="cpu").manual_seed(args.seed + 2)
    ids = torch.randint(3, config.vocab_size, (args.batch, args.seq), generator=gen).to(device)
    tokens = args.batch * args.seq
    params = sum(p.numel() for p in model.parameters())
    log(f"{family}: {layers} layer(s), {params / 1e6:,.1f}M parameters ({dtype}), batch {args.batch} x {args.seq}, "
        f"built in {build_seconds:.1f}s")

    def prefill():
        model.eval()
        with torch.no_grad():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)

    def train_step():
        model.train()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        model.eval()

    calls = {"prefill": prefill, "train": train_step}

    def with_router(method, options, fn):
        if method is not None:
            hmp.patch(model, method, **options)
        try:
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            return time.perf_counter() - t0
        finally:
            if method is not None:
                hmp.unpatch(model)

    def measure_once(label, method, options, rec):
        for _ in range(args.warmup):
            for fn in calls.values():
                with_router(method, options, fn)
        if method is not None:
            hmp.patch(model, method, **options)
        try:
            with hmp.collect_stats(model) as stats:
                prefill()
            summary = stats.summary()
            rec["experts_per_token"] = float(summary["experts_per_token_mean"])
            rec["maxvio"] = summary.get("maxvio")
            rec["memory"] = {}
            for kind, fn in calls.items():
                if device.type == "cuda":
                    sync(device)
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                    before = torch.cuda.memory_allocated(device)
                    fn()
                    sync(device)
                    peak = torch.cuda.max_memory_allocated(device)
                    rec["memory"][kind] = {"peak_bytes": peak, "peak_above_start_bytes": peak - before}
                else:
                    rec["memory"][kind] = None
        finally:
            if method is not None:
                hmp.unpatch(model)

    records: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    # Warm-up, experts/token and peak memory (untimed), router by router. A router that fails
    # (an unsupported kernel, out of memory) is recorded and left out of the timing; native must run.
    for label, method, options in variants:
        rec = records[label] = {"method": method, "options": options, "times": {"prefill": [], "train": []}}
        try:
            measure_once(label, method, options, rec)
        except Exception as exc:  # noqa: BLE001 - one failing router must not lose the others' numbers
            if label == NATIVE:
                raise
            failed[label] = f"{type(exc).__name__}: {exc}"[:500]
            log(f"{family}: {label} failed and is left out: {failed[label]}")
            model.zero_grad(set_to_none=True)
            model.eval()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for label in failed:
        records.pop(label)
    variants = [v for v in variants if v[0] not in failed]

    # Interleaved timing rounds.
    rng = random.Random(args.seed)
    order = [(label, kind) for label, _, _ in variants for kind in calls]
    options_of = {label: (method, options) for label, method, options in variants}
    started = time.perf_counter()
    rounds, stopped_by_budget = 0, False
    while rounds < args.repeats:
        if rounds >= args.min_repeats and time.perf_counter() > deadline:
            stopped_by_budget = True
            break
        rng.shuffle(order)
        for label, kind in order:
            method, options = options_of[label]
            records[label]["times"][kind].append(with_router(method, options, calls[kind]))
        rounds += 1
    timing_seconds = time.perf_counter() - started
    log(f"{family}: {rounds} round(s) in {timing_seconds:.1f}s" + (" (stopped by --max-seconds)" if stopped_by_budget else ""))

    base = records[NATIVE]
    for label, rec in records.items():
        out: dict[str, Any] = {}
        for kind in calls:
            ts, bs = rec["times"][kind], base["times"][kind]
            ratios = [t / b for t, b in zip(ts, bs)]
            out[kind] = {"median_seconds": statistics.median(ts), "time_ratio": quantiles(ratios),
                         "rate_ratio": quantiles([1 / r for r in ratios])}
        out["prefill"]["median_tokens_per_second"] = tokens / out["prefill"]["median_seconds"]
        out["train"]["median_tokens_per_second"] = tokens / out["train"]["median_seconds"]
        for kind in calls:
            mem, bmem = rec["memory"][kind], base["memory"][kind]
            if mem is not None and bmem is not None:
                mem["peak_ratio"] = mem["peak_bytes"] / bmem["peak_bytes"]
                mem["peak_above_start_ratio"] = (mem["peak_above_start_bytes"] / bmem["peak_above_start_bytes"]
                                                 if bmem["peak_above_start_bytes"] else None)
        rec["summary"] = out
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"family": family, "name": SHAPES[family]["name"], "real_model": SHAPES[family]["real"],
            "real_layers": SHAPES[family]["real_layers"], "layers": layers, "parameters": params,
            "config": {k: getattr(config, k, None) for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                             "num_key_value_heads", "vocab_size", "num_experts_per_tok")},
            "num_experts": n_experts, "top_k": k, "batch": args.batch, "seq": args.seq, "tokens_per_call": tokens,
            "build_seconds": build_seconds, "rounds": rounds, "stopped_by_budget": stopped_by_budget,
            "timing_seconds": timing_seconds, "routers": records, "failed_routers": failed}


# --- report ------------------------------------------------------------------------------------

def _gib(b: int | None) -> str:
    return "n/a" if b is None else f"{b / 2**30:.2f}"


def _ratio(q: dict[str, float]) -> str:
    return f"{q['median']:.3f} [{q['q25']:.3f}, {q['q75']:.3f}]"


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    lines = [
        "# Routers at real widths on one GPU: speed and memory relative to native",
        "",
        f"Generated by `{results['command']}` on {results['finished_utc']} in {results['wall_seconds']:.0f} s.",
        "",
        f"- device: {env.get('gpu') or 'CPU (' + str(env['device']) + ')'}"
        + (f", {env['gpu_memory_gib']} GiB, compute capability {env['gpu_capability']}" if env.get("gpu") else ""),
        f"- torch {env['torch']} (CUDA {env.get('cuda')}), transformers {env['transformers']}, hf_moe_patch "
        f"{env['hf_moe_patch']}, Python {env['python']}, git {env.get('git_commit')}",
        f"- dtype {results['settings']['dtype']}, seed {results['settings']['seed']}, router logit spread "
        f"{results['settings']['router_spread']}, warm-up {results['settings']['warmup']} call(s) per variant, "
        f"--max-seconds {results['settings']['max_seconds']:g}" + (" (quick smoke run: tiny widths)" if results["settings"]["quick"] else ""),
        "",
        "Ratios are medians over interleaved rounds of the paired (same-round) ratio to the native (unpatched) "
        "router, with the 25th-75th percentile in brackets; the A/A row is a second unpatched variant (noise floor). "
        "Prefill throughput ratio > 1: faster than native; train-step time ratio > 1: slower; peak memory ratio: "
        "`max_memory_allocated` of one call (weights included) over native's, and in brackets the ratio of the "
        "peak above what was allocated before the call (activations, grads).",
        "",
    ]
    for m in results["models"]:
        lines += [f"## {m['name']} ({m['layers']} of {m['real_layers']} layers)", "",
                  f"{m['num_experts']} experts, top-{m['top_k']}, hidden {m['config']['hidden_size']}, expert FFN "
                  f"{m['config']['intermediate_size']}, {m['parameters'] / 1e6:,.1f}M parameters; batch {m['batch']} x "
                  f"{m['seq']} tokens; {m['rounds']} round(s)" + (" (cut short by --max-seconds)" if m["stopped_by_budget"] else "")
                  + f"; built in {m['build_seconds']:.1f} s, timed in {m['timing_seconds']:.1f} s.", "",
                  "| router | experts/token | prefill tokens/s | prefill throughput ratio | train step ms | "
                  "train time ratio | peak GiB prefill | peak ratio prefill | peak GiB train | peak ratio train |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for label, rec in m["routers"].items():
            s = rec["summary"]
            mem = rec["memory"]

            def mem_cells(kind):
                x = mem[kind]
                if x is None:
                    return "n/a", "n/a"
                extra = x.get("peak_above_start_ratio")
                return _gib(x["peak_bytes"]), f"{x['peak_ratio']:.3f}" + (f" ({extra:.3f})" if extra is not None else "")

            pg, pr = mem_cells("prefill")
            tg, tr = mem_cells("train")
            lines.append(f"| {label} | {rec['experts_per_token']:.2f} | {s['prefill']['median_tokens_per_second']:,.0f} | "
                         f"{_ratio(s['prefill']['rate_ratio'])} | {1e3 * s['train']['median_seconds']:.1f} | "
                         f"{_ratio(s['train']['time_ratio'])} | {pg} | {pr} | {tg} | {tr} |")
        for label, error in m.get("failed_routers", {}).items():
            lines.append(f"- **{label} failed** and is left out: `{error}`")
        lines.append("")
    lines += ["## Figure", "", "![ratios to native](gpu_scale.png)", "",
              "## Notes", "",
              "- Random weights: the routers see logits of a trained router's spread, but not a trained router's "
              "structure; expert loads (and so the cost of expert_choice, usmoe and top_p) differ on a trained model.",
              "- Fewer layers than the real model: each layer is identical, so per-layer costs scale with depth; "
              "embedding and LM head weigh more here than in the full-depth model.",
              "- `ssr p=0.01` fires its Sinkhorn step on ~1% of training forwards (seeded coin), so its train time is "
              "mostly top-k's; `ssr p=1` routes every training forward by the plan.",
              "- Experts/token is measured on one prefill batch; top_p's depends on the router's sharpness.",
              "",
              "Reproduce: `" + results["command"] + "`", ""]
    return "\n".join(lines)


def figure(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    panels = [("prefill throughput ratio to native (x)", lambda r: r["summary"]["prefill"]["rate_ratio"]),
              ("training-step time ratio to native (x)", lambda r: r["summary"]["train"]["time_ratio"]),
              ("peak memory ratio to native, training step (x)",
               lambda r: None if r["memory"]["train"] is None else {"median": r["memory"]["train"]["peak_ratio"]})]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5.2))
    labels = list(dict.fromkeys(label for m in models for label in m["routers"]))
    width = 0.8 / max(1, len(models))
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"]
    for ax, (title, get) in zip(axes, panels):
        for j, m in enumerate(models):
            xs, ys, lo, hi = [], [], [], []
            for i, label in enumerate(labels):
                rec = m["routers"].get(label)
                q = get(rec) if rec else None
                if q is None:
                    continue
                xs.append(i + (j - (len(models) - 1) / 2) * width)
                ys.append(q["median"])
                lo.append(q["median"] - q.get("q25", q["median"]))
                hi.append(q.get("q75", q["median"]) - q["median"])
            if xs:
                ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, color=colors[j % len(colors)],
                       label=f"{m['name']} ({m['layers']} layers)")
        ax.axhline(1.0, color="black", lw=0.8, ls="--", label="native = 1")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=40, ha="right", fontsize=8)
        ax.set_ylabel(title)
        ax.set_xlabel("router")
        ax.set_title(title.replace(" (x)", ""), fontsize=10)
        if not any(get(m["routers"][lab]) for m in models for lab in labels if lab in m["routers"]):
            ax.text(0.5, 0.5, "not measured on CPU", transform=ax.transAxes, ha="center")
        ax.legend(fontsize=7)
    env = results["environment"]
    fig.suptitle(f"Routers vs native at real widths on {env.get('gpu') or 'CPU'} ({results['settings']['dtype']}); "
                 "bars: median of paired ratios, error bars: 25th-75th percentile", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- main --------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = resolve(build_parser().parse_args(argv))
    started = time.perf_counter()
    check_device(args.device)  # before transformers is imported: a missing GPU fails in about a second

    import warnings

    import torch

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    device = torch.device(args.device)
    if args.threads is not None or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {msg}", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    log(f"device {env.get('gpu') or device}, torch {env['torch']}, transformers {env['transformers']}")
    models = []
    for i, (family, layers) in enumerate(zip(args.models, args.layers)):
        left = args.max_seconds - (time.perf_counter() - started)
        share = left / (len(args.models) - i)
        deadline = time.perf_counter() + share * 0.9  # leave room for the report
        models.append(run_model(family, layers, args, device, dtype, deadline, log))
    results = {
        "command": "python " + SCRIPT + (" " + shlex.join(argv) if argv else ""),
        "finished_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "wall_seconds": time.perf_counter() - started, "environment": env,
        "settings": {"dtype": str(dtype).replace("torch.", ""), "seed": args.seed, "router_spread": args.router_spread,
                     "warmup": args.warmup, "repeats": args.repeats, "min_repeats": args.min_repeats,
                     "max_seconds": args.max_seconds, "quick": args.quick, "batch": args.batch, "seq": args.seq,
                     "models": args.models, "layers": args.layers, "skip": args.skip},
        "models": models,
    }
    for m in models:  # raw per-round times stay in the JSON
        for rec in m["routers"].values():
            rec["times_seconds"] = rec.pop("times")
    figure(results, out / "gpu_scale.png")
    results["wall_seconds"] = time.perf_counter() - started
    write_json(out / "results.json", results)
    (out / "README.md").write_text(markdown(results))
    log(f"done in {results['wall_seconds']:.1f}s: {out / 'results.json'}, {out / 'README.md'}, {out / 'gpu_scale.png'}")
    for m in models:
        for label, rec in m["routers"].items():
            s = rec["summary"]
            mem = rec["memory"]["train"]
            log(f"{m['family']:8s} {label:20s} e/t {rec['experts_per_token']:5.2f}  prefill x{s['prefill']['rate_ratio']['median']:.3f}"
                f"  train time x{s['train']['time_ratio']['median']:.3f}"
                + (f"  train peak mem x{mem['peak_ratio']:.3f}" if mem else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
