"""Speed of hf_moe_patch's routers relative to the native transformers router, on CPU.

Every comparison is measured *interleaved* in one process: after a warm-up, each round times
every variant once, in a freshly shuffled order (seeded), and each variant is reported as the
median over rounds of ``time / native time of the same round``, with the 25th-75th percentile
of those paired ratios. An A/A control (a second, identical unpatched model timed as if it were
a variant) shows how far from 1 a ratio can drift by noise alone. Absolute times are printed
too, but only ratios are comparable across machines.

Sections:

1. ``router``: the router module's forward alone on random hidden states, for every N experts
   in 8, 60, 64 with every top-k in 2, 4, 8 (``--router-grid models``: only the pairs of Mixtral
   (8, 2), Qwen1.5-MoE (60, 4) and OLMoE (64, 8)), each at T = 512, 4096 and 16384 tokens laid
   out as sequences of 256. Inference variants run under
   ``torch.no_grad``; SSR at p=1 runs in a training forward with autograd recording and is
   compared with the native router under the same conditions.
2. ``e2e``: a whole small OLMoE-shaped model (hidden 256, 64 experts, top-8, expert FFN 128,
   2 layers, batch 4 x 256 tokens) with transformers' default experts implementation
   (``grouped_mm``): inference forwards, and training steps (forward + backward).
3. ``impls``: the same model with the ``eager`` and ``batched_mm`` experts implementations.

Run ``python benchmarks/bench_routing.py --help`` for the options; ``--quick`` is a smoke run of
every code path in well under a minute.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

logger = logging.getLogger("bench_routing")

HIDDEN = 256
NOTES_HEADING = "## Notes"
SEQ = 256  # router section: T tokens are laid out as T / SEQ sequences of SEQ tokens
ROUTER_SHAPES = [(8, 2), (60, 4), (64, 8)]  # (experts, top-k): Mixtral, Qwen1.5-MoE, OLMoE
ROUTER_EXPERTS, ROUTER_TOPK = [8, 60, 64], [2, 4, 8]  # the full grid: every N with every k


def router_shapes(grid: str) -> list[tuple[int, int]]:
    """(N, k) pairs of the router section: the three models' own, or every N with every k."""
    return ROUTER_SHAPES if grid == "models" else [(n, k) for n in ROUTER_EXPERTS for k in ROUTER_TOPK]
ROUTER_TOKENS = [512, 4096, 16384]


# --- timing ----------------------------------------------------------------------------------


@dataclass
class Variant:
    """One thing to time. ``run`` is timed; ``after`` (untimed) may record facts of the call."""

    label: str
    run: Callable[[], object]
    baseline: str | None = None  # label of the variant the ratio is taken against
    after: Callable[[], None] | None = None
    times: list[float] = field(default_factory=list)


def paired_ratios(variant: Variant, base: Variant) -> list[float]:
    return [t / b for t, b in zip(variant.times, base.times)]


def quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def interleaved(variants: list[Variant], *, repeats: int, warmup: int, number: int, bar: tqdm, seed: int = 0) -> None:
    """Time ``variants`` round-robin: ``warmup`` untimed rounds, then ``repeats`` timed rounds.

    Each round runs every variant once in a new random order, so that no variant is always
    first, last, or next to the same neighbour (a variant that follows a memory-hungry one can
    run measurably slower). Each timed sample is the mean of ``number`` back-to-back calls (so
    sub-millisecond calls are not dominated by timer resolution). The garbage collector is off
    while timing, as in timeit.
    """
    rng = random.Random(seed)
    for _ in range(warmup):
        for v in variants:
            v.run()
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for r in range(repeats):
            order = rng.sample(variants, len(variants))
            for v in order:
                start = time.perf_counter()
                for _ in range(number):
                    v.run()
                v.times.append((time.perf_counter() - start) / number)
                if v.after is not None:
                    v.after()
                bar.update(1)
    finally:
        if gc_was_enabled:
            gc.enable()


def calibrate(run: Callable[[], object], target_s: float) -> int:
    """Calls per sample so that one sample lasts about ``target_s`` (at least 1)."""
    run()
    start = time.perf_counter()
    run()
    once = time.perf_counter() - start
    return max(1, min(1000, math.ceil(target_s / max(once, 1e-7))))


def summarise(variants: list[Variant]) -> dict[str, dict[str, float]]:
    """Per variant: median ms, and the median / p25 / p75 of its paired ratio to its baseline."""
    by_label = {v.label: v for v in variants}
    out = {}
    for v in variants:
        row = {"ms": statistics.median(v.times) * 1e3}
        if v.baseline is not None:
            ratios = paired_ratios(v, by_label[v.baseline])
            row.update(ratio=statistics.median(ratios), p25=quantile(ratios, 0.25), p75=quantile(ratios, 0.75))
        out[v.label] = row
    return out


# --- models ----------------------------------------------------------------------------------


def build_model(
    *, num_experts: int, top_k: int, layers: int, intermediate: int, experts_impl: str | None, seed: int, max_len: int = 512
):
    """A randomly initialised OLMoE-shaped causal LM; the same seed gives the same weights.

    Router weights get standard deviation 1/sqrt(hidden), so router logits have about unit
    spread: routing is clearly non-uniform (the default init of 0.02 makes it nearly uniform,
    which would flatter Sinkhorn and USMoE) without being degenerate.
    """
    from transformers import AutoModelForCausalLM

    from hf_moe_patch.testing import tiny_config

    config = tiny_config(
        "olmoe",
        hidden_size=HIDDEN,
        intermediate_size=intermediate,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        num_hidden_layers=layers,
        max_position_embeddings=max(SEQ, max_len),
    )
    torch.manual_seed(seed)
    kwargs = {} if experts_impl is None else {"experts_implementation": experts_impl}
    model = AutoModelForCausalLM.from_config(config, **kwargs)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.model.layers:
            gate = layer.mlp.gate.weight
            gate.copy_(torch.randn(gate.shape, generator=gen) / math.sqrt(HIDDEN))
    return model.eval()


def patch_variant(model, method: str | None, options: dict):
    import hf_moe_patch as hmp

    if method is not None:
        hmp.patch(model, method, **options)
    return model


def router_info(model) -> dict:
    """What the first patched router reported about its last call in this thread (SSR: ``sinkhorn``)."""
    from hf_moe_patch.patching import find_record

    record = find_record(model)
    step = record.slot.current() if record is not None else None
    return dict(step.info.get(0, {})) if step is not None else {}


# --- section 1: router alone -----------------------------------------------------------------

# (label, method, options, mode); mode "infer": no_grad eval forward; "train": autograd on, training.
ROUTER_VARIANTS = [
    ("native", None, {}, "infer"),
    ("topk", "topk", {}, "infer"),
    ("usmoe k", "usmoe", {"top_k": "k"}, "infer"),
    ("usmoe k/2", "usmoe", {"top_k": "k/2"}, "infer"),
    ("expert_choice", "expert_choice", {}, "infer"),
    ("ssr inference=sinkhorn", "ssr", {"inference": "sinkhorn"}, "infer"),
    ("native (train, grad)", None, {}, "train"),
    ("ssr p=1 (train, grad)", "ssr", {"p": 1.0, "seed": 0}, "train"),
    ("A/A control", None, {}, "infer"),
]


def _resolve(options: dict, k: int) -> dict:
    budgets = {"k": float(k), "k/2": k / 2}
    return {key: budgets.get(val, val) if isinstance(val, str) else val for key, val in options.items()}


def bench_router(args, bar: tqdm) -> list[dict]:
    rows = []
    tokens = [512] if args.quick else ROUTER_TOKENS
    for num_experts, k in router_shapes(args.router_grid):
        for T in tokens:
            logger.info("router: T=%d N=%d k=%d", T, num_experts, k)
            ids = torch.randint(3, 128, (T // SEQ, SEQ), generator=torch.Generator().manual_seed(args.seed))
            h = torch.randn(T, HIDDEN, generator=torch.Generator().manual_seed(args.seed + 2))
            variants, models = [], {}
            for label, method, options, mode in ROUTER_VARIANTS:
                # One persistent model per variant (same weights): SSR's coin generator keeps
                # running across calls, and no patching happens between timed calls.
                model = patch_variant(
                    build_model(num_experts=num_experts, top_k=k, layers=1, intermediate=16, experts_impl="eager", seed=args.seed),
                    method,
                    _resolve(options, k),
                )
                gate = model.model.layers[0].mlp.gate
                if mode == "train":
                    model.train()
                    model(ids)  # records the batch layout and draws the training-step coin
                    run = lambda gate=gate: _router_train_call(gate, h)
                else:
                    with torch.no_grad():
                        model(ids)  # records the batch layout
                    run = lambda gate=gate: _router_infer_call(gate, h)
                baseline = None if label in ("native", "native (train, grad)") else (
                    "native" if mode == "infer" else "native (train, grad)"
                )
                variants.append(Variant(label, run, baseline))
                models[label] = model
            number = calibrate(variants[0].run, args.target_s)
            interleaved(variants, repeats=args.router_repeats, warmup=args.warmup, number=number, bar=bar, seed=args.seed)
            stats = summarise(variants)
            sinkhorn_iters = router_info(models["ssr inference=sinkhorn"]).get("iterations")
            rows.append({"T": T, "N": num_experts, "k": k, "number": number, "stats": stats, "sinkhorn_iters": sinkhorn_iters})
            del variants, models
            gc.collect()
    return rows


def _router_infer_call(gate, h):
    with torch.no_grad():
        return gate(h)


def _router_train_call(gate, h):
    with torch.enable_grad():
        return gate(h)


# --- sections 2 and 3: end to end --------------------------------------------------------------

# (label, method, options, mode); mode "infer": eval + no_grad forward; "train": forward + backward.
E2E_VARIANTS = [
    ("native", None, {}, "infer"),
    ("topk", "topk", {}, "infer"),
    ("usmoe k=8", "usmoe", {"top_k": 8}, "infer"),
    ("usmoe k=4", "usmoe", {"top_k": 4}, "infer"),
    ("expert_choice", "expert_choice", {}, "infer"),
    ("ssr inference=sinkhorn", "ssr", {"inference": "sinkhorn"}, "infer"),
    ("A/A control", None, {}, "infer"),
    ("native train step", None, {}, "train"),
    ("ssr p=0.01 train step", "ssr", {"p": 0.01, "seed": 0}, "train"),
    ("ssr p=1 train step", "ssr", {"p": 1.0, "seed": 0}, "train"),
    ("A/A control train step", None, {}, "train"),
]
IMPL_LABELS = ["native", "topk", "usmoe k=8", "usmoe k=4", "expert_choice", "A/A control"]
BATCHED_MM_LABELS = ["native", "usmoe k=8", "usmoe k=4"]  # batched_mm is slow on CPU: the essentials


class PairCounter:
    """Counts (token, expert) pairs given to layer 0's experts, through a forward hook.

    The hook sees the router's ``(T, k_max)`` slots before any pair-list dispatch.
    """

    def __init__(self, model, num_experts: int):
        self.num_experts = num_experts
        self.tokens = self.pairs = self.k_max = 0
        self.handle = model.model.layers[0].mlp.experts.register_forward_hook(self.hook)

    def hook(self, module, args, output):
        index = args[1]
        self.tokens += index.shape[0]
        self.pairs += int((index < self.num_experts).sum())
        self.k_max = max(self.k_max, index.shape[1])


def e2e_variants(args, experts_impl: str | None, labels: list[str]) -> tuple[list[Variant], dict]:
    batch, seq = args.batch, args.seq
    ids = torch.randint(3, 128, (batch, seq), generator=torch.Generator().manual_seed(args.seed))
    variants, facts = [], {}
    native_logits = None
    for label, method, options, mode in E2E_VARIANTS:
        if label not in labels:
            continue
        model = patch_variant(
            build_model(
                num_experts=64, top_k=8, layers=args.layers, intermediate=128, experts_impl=experts_impl, seed=args.seed,
                max_len=args.seq,
            ),
            method,
            options,
        )
        fact = {}
        if mode == "infer":
            counter = PairCounter(model, 64)
            with torch.no_grad():
                logits = model(ids).logits
            counter.handle.remove()
            fact.update(experts_per_token=counter.pairs / counter.tokens, k_max=counter.k_max)
            if label == "native":
                native_logits = logits
            elif label == "topk" and native_logits is not None:
                fact["identical_to_native"] = bool(torch.equal(logits, native_logits))
            run = lambda model=model: _infer_step(model, ids)
            baseline = None if label == "native" else "native"
            after = None
        else:
            model.train()
            run = lambda model=model: _train_step(model, ids)
            baseline = None if label == "native train step" else "native train step"
            after = None
            if method == "ssr":
                fact["sinkhorn_steps"] = 0

                # Count the timed steps that drew a Sinkhorn coin (SSR reports it per router call).
                def after(model=model, fact=fact):
                    fact["sinkhorn_steps"] += int(bool(router_info(model).get("sinkhorn")))
        variants.append(Variant(label, run, baseline, after))
        facts[label] = fact
    return variants, facts


def _infer_step(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _train_step(model, ids):
    loss = model(ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss


def bench_e2e(args, experts_impl: str, labels: list[str], repeats: int, bar: tqdm, warmup: int | None = None) -> dict:
    logger.info("e2e: experts_implementation=%s, %d variants, %d rounds", experts_impl, len(labels), repeats)
    variants, facts = e2e_variants(args, experts_impl, labels)
    warmup = args.warmup if warmup is None else warmup
    interleaved(variants, repeats=repeats, warmup=warmup, number=1, bar=bar, seed=args.seed)
    stats = summarise(variants)
    for v in variants:
        # Warm-up rounds also ran the after-hooks' model; only timed rounds are counted.
        if "sinkhorn_steps" in facts[v.label]:
            facts[v.label]["timed_steps"] = len(v.times)
        stats[v.label]["mean_ms"] = statistics.fmean(v.times) * 1e3
    del variants
    gc.collect()
    return {"impl": experts_impl, "stats": stats, "facts": facts, "repeats": repeats, "warmup": warmup}


# --- report ----------------------------------------------------------------------------------


def machine_info(threads: int) -> dict:
    import transformers

    import hf_moe_patch

    cpu = platform.processor() or platform.machine()
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    if "model name" in fields:
        # Virtual machines often report a bare brand ("AMD EPYC"): family/model say which generation.
        cpu = f"{fields['model name']} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"
        if "hypervisor" in fields.get("flags", "").split():
            cpu += ", virtualised"
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hf_moe_patch": hf_moe_patch.__version__,
        "python": platform.python_version(),
        "load_before": load,
    }


def fmt_ratio(row: dict) -> str:
    return f"{row['ratio']:.2f} ({row['p25']:.2f}-{row['p75']:.2f})"


TARGETS = [
    # (description, label, op, threshold)
    ("topk patch within 1.05x of native", "topk", "<=", 1.05),
    ("USMoE at native budget (k=8) within 1.15x", "usmoe k=8", "<=", 1.15),
    ("USMoE at half budget (k=4) at most 0.80x", "usmoe k=4", "<=", 0.80),
    ("SSR p=0.01 training step within 1.05x", "ssr p=0.01 train step", "<=", 1.05),
]


def target_rows(e2e: dict) -> list[tuple[str, float, float, bool]]:
    out = []
    for desc, label, _, threshold in TARGETS:
        row = e2e["stats"].get(label)
        if row is None:
            continue
        out.append((desc, row["ratio"], threshold, row["ratio"] <= threshold))
    return out


def render(args, info: dict, router_rows: list[dict], e2e_runs: list[dict], elapsed: float) -> str:
    lines = ["# hf_moe_patch routing benchmark", ""]
    lines += [
        f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Machine: {info['cpu']}, {info['cores']} cores; torch.set_num_threads({info['threads']})",
        f"- torch {info['torch']}, transformers {info['transformers']}, hf_moe_patch {info['hf_moe_patch']}, "
        f"Python {info['python']}",
        f"- Load average before / after: {_load(info['load_before'])} / {_load(info.get('load_after'))}",
        f"- Command: `{' '.join(['python'] + [Path(sys.argv[0]).as_posix()] + sys.argv[1:])}`",
        f"- Wall time: {elapsed:.0f} s",
        "",
        "Ratios are the median over interleaved rounds of (variant time / baseline time in the same round); "
        "the 25th-75th percentile of those paired ratios is in parentheses. Below 1 is faster than native.",
        "",
    ]
    if router_rows:
        labels = [lab for lab, *_ in ROUTER_VARIANTS]
        lines += [
            "## 1. Router module alone",
            "",
            f"Router forward on random hidden states (d={HIDDEN}), T tokens as T/{SEQ} sequences of {SEQ}; "
            f"{args.router_repeats} rounds after {args.warmup} warm-up rounds, each sample the mean of `calls` calls. "
            "Inference variants under `torch.no_grad` vs `native`; `ssr p=1` with autograd recording in a "
            "training forward vs `native (train, grad)`. Shapes: " + ("every N in 8, 60, 64 with every k in 2, 4, 8" if args.router_grid == "full" else "(N, k) of Mixtral, Qwen1.5-MoE and OLMoE") + ", each at every T.",
            "",
            "| T | N | k | calls | native ms | " + " | ".join(labels[1:]) + " | Sinkhorn iters |",
            "|---|---|---|---|---|" + "---|" * (len(labels) - 1) + "---|",
        ]
        for row in router_rows:
            st = row["stats"]
            cells = []
            for lab in labels[1:]:
                cells.append(fmt_ratio(st[lab]) if "ratio" in st[lab] else f"{st[lab]['ms']:.2f} ms")
            lines.append(
                f"| {row['T']} | {row['N']} | {row['k']} | {row['number']} | {st['native']['ms']:.3f} | "
                + " | ".join(cells)
                + f" | {row['sinkhorn_iters']} |"
            )
        lines.append("")
    for run in e2e_runs:
        st, facts = run["stats"], run["facts"]
        title = "## 2. End to end" if run is e2e_runs[0] else f"### experts_implementation = {run['impl']}"
        if run is e2e_runs[0]:
            lines += [
                title,
                "",
                f"OLMoE-shaped model: hidden {HIDDEN}, 64 experts, top-8, expert FFN 128, {args.layers} layers, "
                f"vocab 128, batch {args.batch} x {args.seq} tokens, experts_implementation = `{run['impl']}` "
                f"(transformers' default). {run['repeats']} rounds after {run['warmup']} warm-up rounds. Inference "
                "variants: eval mode, `torch.no_grad`, vs `native`. Train steps: `model.train()`, "
                "forward with labels + backward + zero_grad, vs `native train step`.",
                "",
            ]
        else:
            if run is e2e_runs[1]:
                lines += ["## 3. Experts implementations", "", "Same model and settings, other experts kernels.", ""]
            lines += [title, "", f"{run['repeats']} rounds after {run['warmup']} warm-up rounds.", ""]
        lines += ["| variant | ratio (p25-p75) | median ms | mean ms | notes |", "|---|---|---|---|---|"]
        for label, row in st.items():
            ratio = fmt_ratio(row) if "ratio" in row else "1 (baseline)"
            lines.append(f"| {label} | {ratio} | {row['ms']:.1f} | {row['mean_ms']:.1f} | {_facts(facts.get(label, {}))} |")
        lines.append("")
    if e2e_runs:
        lines += [
            "## Targets",
            "",
            f"Measured end to end with `{e2e_runs[0]['impl']}` (section 2)."
            + (" **Quick run: the model and batch are smaller than the targets assume, so these verdicts mean "
               "nothing; run without --quick.**" if args.quick else ""),
            "",
            "| target | measured | met |",
            "|---|---|---|",
        ]
        for desc, ratio, threshold, met in target_rows(e2e_runs[0]):
            lines.append(f"| {desc} | {ratio:.2f} | {'yes' if met else 'NO'} |")
        lines.append("")
    return "\n".join(lines)


def _load(load) -> str:
    return "n/a" if load is None else " ".join(f"{x:.2f}" for x in load)


def _facts(fact: dict) -> str:
    parts = []
    if "experts_per_token" in fact:
        parts.append(f"{fact['experts_per_token']:.2f} experts/token, k_max {fact['k_max']}")
    if "identical_to_native" in fact:
        parts.append("outputs identical to native" if fact["identical_to_native"] else "OUTPUTS DIFFER from native")
    if "timed_steps" in fact:
        parts.append(f"{fact['sinkhorn_steps']} of {fact['timed_steps']} timed steps were Sinkhorn steps")
    return "; ".join(parts)


# --- CLI -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Interleaved CPU benchmark of hf_moe_patch routers, reported as ratios to the native router.",
        epilog="Example: python benchmarks/bench_routing.py --out benchmarks/RESULTS.md",
    )
    parser.add_argument("--out", type=Path, help="write the markdown report here (it is always printed too)")
    parser.add_argument(
        "--quick", action="store_true",
        help="smoke run: T=512 only in the router section, a 1-layer model on 2 x 128 tokens, 3 rounds (overrides the "
        "round counts; well under a minute)",
    )
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch.set_num_threads (default 1: on a small shared machine, OpenMP threads that wait for a "
        "descheduled sibling make multi-threaded timings erratic)",
    )
    parser.add_argument("--sections", default="router,e2e,impls", help="comma-separated subset of router,e2e,impls")
    parser.add_argument("--router-repeats", type=int, default=9, help="timed rounds per router shape")
    parser.add_argument(
        "--router-grid", choices=["full", "models"], default="full",
        help="router section: every N in 8, 60, 64 with every k in 2, 4, 8 (full), or only the (N, k) of "
        "Mixtral, Qwen1.5-MoE and OLMoE (models)",
    )
    parser.add_argument("--e2e-repeats", type=int, default=25, help="timed rounds end to end (grouped_mm, eager)")
    parser.add_argument(
        "--batched-mm-repeats", type=int, default=3, help="timed rounds for batched_mm (seconds per forward on CPU; one warm-up round)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--target-s", type=float, default=0.02, help="router section: seconds per timed sample")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the end-to-end model")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    if args.quick:
        args.router_repeats, args.e2e_repeats, args.batched_mm_repeats = 3, 3, 2
        args.warmup, args.target_s, args.layers, args.batch, args.seq = 1, 0.005, 1, 2, 128
    unknown = set(args.sections.split(",")) - {"router", "e2e", "impls"}
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    return args


def write_report(path: Path, report: str) -> None:
    """Write ``report`` to ``path``, keeping the hand-written notes (from a "## Notes" heading on)
    of the file it replaces."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.exists() else ""
    notes = old[old.index(NOTES_HEADING):] if NOTES_HEADING in old else ""
    path.write_text(report + "\n" + ("\n" + notes if notes else ""))
    logging.getLogger("bench").info("wrote %s", path)


def start_run(args) -> dict:
    """Logging, torch threads and the machine facts of a benchmark run (also used by the other
    benchmark scripts)."""
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("hf_moe_patch").setLevel(logging.WARNING)  # one "patched ..." line per model otherwise
    torch.set_num_threads(args.threads)
    info = machine_info(args.threads)
    logging.getLogger("bench").info("%s, %s cores, torch threads %d, load %s", info["cpu"], info["cores"], args.threads,
                                    _load(info["load_before"]))
    return info


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = start_run(args)
    sections = args.sections.split(",")

    router_count = len(router_shapes(args.router_grid)) * (1 if args.quick else len(ROUTER_TOKENS)) * len(ROUTER_VARIANTS) * args.router_repeats
    total = (router_count if "router" in sections else 0)
    total += len(E2E_VARIANTS) * args.e2e_repeats if "e2e" in sections else 0
    if "impls" in sections:
        impl_runs = 1 if "e2e" in sections else 2  # without section 2, grouped_mm is measured here too
        total += impl_runs * len(IMPL_LABELS) * args.e2e_repeats + len(BATCHED_MM_LABELS) * args.batched_mm_repeats

    start = time.perf_counter()
    router_rows, e2e_runs = [], []
    with logging_redirect_tqdm(), tqdm(total=total, unit="sample", desc="timing", mininterval=1.0) as bar:
        if "router" in sections:
            router_rows = bench_router(args, bar)
        if "e2e" in sections:
            e2e_runs.append(bench_e2e(args, "grouped_mm", [lab for lab, *_ in E2E_VARIANTS], args.e2e_repeats, bar))
        if "impls" in sections:
            if not e2e_runs:  # the impls tables are read next to the default implementation
                e2e_runs.append(bench_e2e(args, "grouped_mm", IMPL_LABELS, args.e2e_repeats, bar))
            e2e_runs.append(bench_e2e(args, "eager", IMPL_LABELS, args.e2e_repeats, bar))
            # Last: batched_mm materialises one weight matrix per (token, expert) pair (GBs here).
            e2e_runs.append(bench_e2e(args, "batched_mm", BATCHED_MM_LABELS, args.batched_mm_repeats, bar, warmup=1))
    info["load_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    report = render(args, info, router_rows, e2e_runs, time.perf_counter() - start)
    print(report)
    if args.out is not None:
        write_report(args.out, report)
    if e2e_runs:
        for desc, ratio, threshold, met in target_rows(e2e_runs[0]):
            logger.info("target %-45s %.2f (<= %.2f) %s", desc, ratio, threshold, "met" if met else "MISSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
