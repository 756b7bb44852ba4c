"""Speed of hf_moe_patch's routers relative to the native transformers router, on CPU.

Every comparison is measured *interleaved* in one process: after a warm-up, each round times
every variant once, in a freshly shuffled order (seeded), and each variant is reported as the
median over rounds of ``time / baseline time of the same round``, with the 25th-75th percentile
of those paired ratios. An A/A control (a second, identical unpatched model timed as if it were
a variant) shows how far from 1 a ratio can drift by noise alone. Absolute times are printed
too, but only ratios are comparable across machines.

Every timed section runs at each torch thread count of ``--threads`` (default 1 and 2) and at
each router sharpness of ``--sharpness``:

* ``peaked``: router weights drawn from N(0, 0.5), as in an independent check of this package;
  with hidden 256 the router logits of a token spread over experts with a standard deviation of
  about 8, far more peaked than a trained router;
* ``realistic``: router weights scaled so that the logits have the spread of a trained router,
  the shipped demo model's, measured at the start of the run on fixed English sentences
  (``--realistic-spread`` sets it instead).

Sections:

1. ``router``: the router module's forward alone on random hidden states, for the (N, k) of
   Mixtral (8, 2), Qwen1.5-MoE (60, 4) and OLMoE (64, 8) (``--router-grid full``: every N in 8,
   60, 64 with every k in 2, 4, 8), each at T = 512, 4096 and 16384 tokens laid out as sequences
   of 256, at the first thread count. Inference variants run under ``torch.no_grad``; SSR at
   p=1 runs in a training forward with autograd recording and is compared with the native
   router under the same conditions.
2. ``layer``: one OLMoE MoE layer's experts (hidden 256, 64 experts, expert FFN 128) on the
   4 x 256 tokens of the end-to-end batch, given the (token, expert) pairs that each router
   chose in the model: native ``grouped_mm`` and eager kernels on the native top-8 slots
   (8192 pairs), a reference per-expert loop over a dense selection mask (the official USMoE
   code's way of running experts), and hf_moe_patch's pair dispatch, for every method.
3. ``e2e``: the whole OLMoE-shaped model (2 layers, batch 4 x 256 tokens) with transformers'
   default experts implementation (``grouped_mm``): inference forwards, and training steps
   (forward + backward), plus the native model with ``experts_implementation="eager"``.
4. ``impls``: the native model with ``batched_mm`` vs the same patched (first thread count and
   sharpness only; seconds per forward on CPU).
5. ``profile``: where one layer's time goes: layer 0's router and experts calls of the native and
   USMoE models timed apart, and torch.profiler's busiest operators.

Run ``python eval/benchmarks/bench_routing.py --help`` for the options; ``--quick`` is a smoke run of
every code path in a few minutes.
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
PEAKED_STD = 0.5

# Fixed English text on which the demo model's router logit spread is measured.
SPREAD_SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "A dog is a domesticated carnivorous mammal that typically has a long snout.",
    "She opened the window to let the cool evening air into the room.",
    "The committee postponed its decision until more evidence could be gathered.",
    "Photosynthesis converts light energy into chemical energy stored in sugars.",
    "He played the violin at the concert while the audience listened in silence.",
    "An instrument used for measuring the temperature of a liquid or gas.",
    "The city council approved a new budget for public libraries and parks.",
    "Rain fell steadily through the night, and by morning the streets were flooded.",
    "A large body of salt water that covers most of the surface of the earth.",
    "The children built a small boat out of wood and painted it bright red.",
    "To move quickly on foot so that both feet leave the ground at each step.",
    "The doctor explained the treatment and answered every question patiently.",
    "A written account of the events of a person's life, composed by someone else.",
    "Farmers harvest wheat in late summer when the grain has fully ripened.",
    "The museum displays ancient pottery, coins and tools from many civilizations.",
]


def router_shapes(grid: str) -> list[tuple[int, int]]:
    """(N, k) pairs of the router section: the three models' own, or every N with every k."""
    return ROUTER_SHAPES if grid == "models" else [(n, k) for n in ROUTER_EXPERTS for k in ROUTER_TOPK]


ROUTER_TOKENS = [512, 4096, 16384]


# --- timing ----------------------------------------------------------------------------------


@dataclass
class Variant:
    """One thing to time. ``run`` is timed; ``after`` (untimed) may record facts of the call.

    ``baseline``: label of the variant the ratio is taken against; ``reference``: optional label
    of a second variant against which a second paired ratio is reported.
    """

    label: str
    run: Callable[[], object]
    baseline: str | None = None
    after: Callable[[], None] | None = None
    times: list[float] = field(default_factory=list)
    reference: str | None = None


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
    """Per variant: median ms, and the median / p25 / p75 of its paired ratio to its baseline
    (``ref_ratio``, ``ref_p25``, ``ref_p75``: to its reference, when it has one)."""
    by_label = {v.label: v for v in variants}
    out = {}
    for v in variants:
        row = {"ms": statistics.median(v.times) * 1e3}
        if v.baseline is not None:
            ratios = paired_ratios(v, by_label[v.baseline])
            row.update(ratio=statistics.median(ratios), p25=quantile(ratios, 0.25), p75=quantile(ratios, 0.75))
        if v.reference is not None:
            ratios = paired_ratios(v, by_label[v.reference])
            row.update(ref_ratio=statistics.median(ratios), ref_p25=quantile(ratios, 0.25), ref_p75=quantile(ratios, 0.75))
        out[v.label] = row
    return out


# --- router sharpness ------------------------------------------------------------------------


@dataclass
class Sharpness:
    """How peaked the routers of the benchmark models are.

    ``router_std``: standard deviation of router weights in the router section (random N(0, 1)
    hidden states, so the logits spread by ``router_std * sqrt(HIDDEN)``). ``weights``: the
    routers of the end-to-end model, one ``(64, HIDDEN)`` tensor per layer. ``spreads``: the
    logit spread they give per layer on the end-to-end batch.
    """

    name: str
    description: str
    router_std: float
    weights: list[torch.Tensor]
    spreads: list[float]


def logit_spread(logits: torch.Tensor) -> float:
    """Root mean square over tokens of each token's standard deviation of logits over experts."""
    return float(logits.float().std(dim=-1).pow(2).mean().sqrt())


def demo_logit_spread() -> float:
    """The shipped demo model's router logit spread on :data:`SPREAD_SENTENCES`, over all its
    MoE layers and real (non-padding) tokens."""
    from hf_moe_patch.lm import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("demo", dtype=torch.float32)
    logits = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, o: logits.append(o[0].detach())) for layer in model.model.layers]
    batch = tokenizer(SPREAD_SENTENCES, return_tensors="pt", padding=True)
    with torch.no_grad():
        model(**batch)
    for hook in hooks:
        hook.remove()
    real = batch["attention_mask"].reshape(-1).bool()
    return logit_spread(torch.cat([z[real] for z in logits]))


def model_logit_spreads(model, ids: torch.Tensor) -> list[float]:
    logits = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, o: logits.append(o[0].detach())) for layer in model.model.layers]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    return [logit_spread(z) for z in logits]


def make_sharpness(name: str, args, realistic_spread: float | None) -> Sharpness:
    """The routers of one sharpness: N(0, 0.5) weights, or weights scaled per layer until the
    logits on the end-to-end batch have the target spread (three passes: a layer's input
    depends on the routing of the layers before it)."""
    ids = e2e_ids(args)
    if name == "peaked":
        model = build_model(num_experts=64, top_k=8, layers=args.layers, intermediate=128, experts_impl=None,
                            seed=args.seed, max_len=args.seq, router=PEAKED_STD)
        weights = [layer.mlp.gate.weight.detach().clone() for layer in model.model.layers]
        spreads = model_logit_spreads(model, ids)
        return Sharpness(name, f"router weights N(0, {PEAKED_STD})", PEAKED_STD, weights, spreads)
    model = build_model(num_experts=64, top_k=8, layers=args.layers, intermediate=128, experts_impl=None,
                        seed=args.seed, max_len=args.seq, router=1.0)
    for _ in range(3):
        with torch.no_grad():
            for layer, spread in zip(model.model.layers, model_logit_spreads(model, ids)):
                layer.mlp.gate.weight.mul_(realistic_spread / spread)
    weights = [layer.mlp.gate.weight.detach().clone() for layer in model.model.layers]
    spreads = model_logit_spreads(model, ids)
    return Sharpness(
        name, f"router weights scaled to the demo model's logit spread {realistic_spread:.2f}",
        realistic_spread / math.sqrt(HIDDEN), weights, spreads,
    )


# --- models ----------------------------------------------------------------------------------


def build_model(
    *, num_experts: int, top_k: int, layers: int, intermediate: int, experts_impl: str | None, seed: int,
    max_len: int = 512, router: float | list[torch.Tensor] | None = None,
):
    """A randomly initialised OLMoE-shaped causal LM; the same seed gives the same weights.

    ``router``: a standard deviation for N(0, std) router weights (drawn from seed + 1), or one
    weight tensor per layer; None is 1/sqrt(hidden) (logits of about unit spread).
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
    std = 1 / math.sqrt(HIDDEN) if router is None else router
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            gate = layer.mlp.gate.weight
            if isinstance(std, list):
                gate.copy_(std[i])
            else:
                gate.copy_(torch.randn(gate.shape, generator=gen) * std)
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


def e2e_ids(args) -> torch.Tensor:
    return torch.randint(3, 128, (args.batch, args.seq), generator=torch.Generator().manual_seed(args.seed))


def e2e_model(args, sharp: Sharpness, method: str | None, options: dict, experts_impl: str | None = None):
    """The end-to-end model with ``sharp``'s routers, patched with ``method``."""
    model = build_model(num_experts=64, top_k=8, layers=args.layers, intermediate=128, experts_impl=experts_impl,
                        seed=args.seed, max_len=args.seq, router=sharp.weights)
    options = dict(options)
    if options.get("calibration") == "random":
        # Four batches of other random ids: with one, the thresholds of these random routers fit
        # the timed batch's budget to only about +-8 % (see the experts/token column).
        gen = torch.Generator().manual_seed(args.seed + 7)
        options["calibration"] = [{"input_ids": torch.randint(3, 128, (args.batch, args.seq), generator=gen)}
                                  for _ in range(4)]
    native_top_k = options.pop("native_top_k", None)
    if native_top_k is not None:  # the unpatched router with a smaller k (read at every call)
        for layer in model.model.layers:
            layer.mlp.gate.top_k = native_top_k
    return patch_variant(model, method, options)


# --- section 1: router alone -----------------------------------------------------------------

# (label, method, options, mode); mode "infer": no_grad eval forward; "train": autograd on, training.
ROUTER_VARIANTS = [
    ("native", None, {}, "infer"),
    ("topk", "topk", {}, "infer"),
    ("usmoe k", "usmoe", {"top_k": "k"}, "infer"),
    ("usmoe k/2", "usmoe", {"top_k": "k/2"}, "infer"),
    # Causal USMoE: each token against a calibrated threshold ("fit": on these hidden states).
    ("usmoe causal k", "usmoe", {"top_k": "k", "causal": True, "thresholds": "fit"}, "infer"),
    ("usmoe causal k/2", "usmoe", {"top_k": "k/2", "causal": True, "thresholds": "fit"}, "infer"),
    ("expert_choice", "expert_choice", {}, "infer"),
    ("ssr inference=sinkhorn", "ssr", {"inference": "sinkhorn"}, "infer"),
    ("native (train, grad)", None, {}, "train"),
    ("ssr p=1 (train, grad)", "ssr", {"p": 1.0, "seed": 0}, "train"),
    ("A/A control", None, {}, "infer"),
]


def _resolve(options: dict, k: int) -> dict:
    budgets = {"k": float(k), "k/2": k / 2}
    return {key: budgets.get(val, val) if isinstance(val, str) else val for key, val in options.items()}


def bench_router(args, sharp: Sharpness, bar: tqdm) -> list[dict]:
    rows = []
    tokens = [512] if args.quick else ROUTER_TOKENS
    for num_experts, k in router_shapes(args.router_grid):
        for T in tokens:
            logger.info("router (%s): T=%d N=%d k=%d", sharp.name, T, num_experts, k)
            ids = torch.randint(3, 128, (T // SEQ, SEQ), generator=torch.Generator().manual_seed(args.seed))
            h = torch.randn(T, HIDDEN, generator=torch.Generator().manual_seed(args.seed + 2))
            variants, models = [], {}
            for label, method, options, mode in ROUTER_VARIANTS:
                # One persistent model per variant (same weights): SSR's coin generator keeps
                # running across calls, and no patching happens between timed calls.
                model = build_model(num_experts=num_experts, top_k=k, layers=1, intermediate=16, experts_impl="eager",
                                    seed=args.seed, router=sharp.router_std)
                resolved = _resolve(options, k)
                if resolved.get("thresholds") == "fit":
                    resolved["thresholds"] = [fit_threshold(model.model.layers[0].mlp.gate, h, resolved["top_k"])]
                model = patch_variant(model, method, resolved)
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


def fit_threshold(gate, h: torch.Tensor, budget: float) -> float:
    """Causal USMoE's threshold for ``budget`` experts per token on the hidden states ``h``."""
    from hf_moe_patch.ops import budget_threshold, unified_score

    with torch.no_grad():
        return budget_threshold(unified_score(torch.nn.functional.linear(h, gate.weight)), budget)


def _router_infer_call(gate, h):
    with torch.no_grad():
        return gate(h)


def _router_train_call(gate, h):
    with torch.enable_grad():
        return gate(h)


# --- section 2: one MoE layer's experts --------------------------------------------------------

# Routers whose (token, expert) pairs the layer section runs: (label, method, options).
LAYER_SELECTIONS = [
    ("usmoe k=8", "usmoe", {"top_k": 8}),
    ("usmoe k=4", "usmoe", {"top_k": 4}),
    ("expert_choice", "expert_choice", {}),
    ("ssr inference=sinkhorn", "ssr", {"inference": "sinkhorn"}),
]
LAYER_BASELINE = "native grouped_mm, top-8"


def capture_layer_call(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (hidden, index, weights) that layer 0's experts receive in a forward of ``model``."""
    captured = {}
    experts = model.model.layers[0].mlp.experts

    def hook(module, args):
        captured["call"] = tuple(a.detach().clone() for a in args[:3])

    handle = experts.register_forward_pre_hook(hook)
    with torch.no_grad():
        model(ids)
    handle.remove()
    return captured["call"]


def dense_selection(index: torch.Tensor, weights: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(T, N)`` bool mask and gate matrix of ``(T, K)`` slots (sentinel ``N``: empty)."""
    T = index.shape[0]
    mask = torch.zeros(T, num_experts + 1, dtype=torch.bool).scatter_(1, index, True)[:, :num_experts]
    gates = torch.zeros(T, num_experts + 1, dtype=weights.dtype).scatter_(1, index, weights)[:, :num_experts]
    return mask.contiguous(), gates.contiguous()


def reference_expert_loop(experts, hidden: torch.Tensor, mask: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """The official USMoE code's way of running experts, as a reference: a dense ``(T, N)``
    selection mask; for each expert with any selected token, index_select its tokens, run the
    expert MLP, multiply by the gate, index_add_ into the output."""
    out = torch.zeros_like(hidden)
    for e in mask.any(dim=0).nonzero().flatten().tolist():
        tokens = mask[:, e].nonzero().flatten()
        x = hidden.index_select(0, tokens)
        gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
        y = torch.nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[e])
        out.index_add_(0, tokens, y * gates[tokens, e].unsqueeze(-1))
    return out


def layer_variants(args, sharp: Sharpness) -> tuple[list[Variant], dict]:
    """Variants of the layer section, on layer 0's experts of a native (grouped_mm) model."""
    from hf_moe_patch.dispatch import PairDispatch

    ids = e2e_ids(args)
    native = e2e_model(args, sharp, None, {})
    experts = native.model.layers[0].mlp.experts
    N = experts.num_experts
    eager_forward = type(experts).forward.__wrapped__  # the class's own (eager) forward
    h, idx8, w8 = capture_layer_call(native, ids)
    mask8, gates8 = dense_selection(idx8, w8, N)
    ours = PairDispatch(experts.forward, N, experts)
    # The native kernel on the pairs laid out one per row (the path of GPUs and of modules the
    # CPU loop does not recognise; the only path before the CPU loop existed).
    via_native = PairDispatch(lambda *a: experts.forward(*a), N, experts)
    facts = {}

    def pairs(index):
        return {"pairs": int((index < N).sum()), "k_max": index.shape[1]}

    with torch.no_grad():
        ref = experts.forward(h, idx8, w8)
        checks = {"ours": ours(h, idx8, w8), "reference loop": reference_expert_loop(experts, h, mask8, gates8)}
    facts[LAYER_BASELINE] = pairs(idx8)
    variants = [
        Variant(LAYER_BASELINE, lambda: experts.forward(h, idx8, w8)),
        Variant("native eager, top-8", lambda: eager_forward(experts, h, idx8, w8), LAYER_BASELINE),
        Variant("A/A control (native grouped_mm, top-8)", lambda: experts.forward(h, idx8, w8), LAYER_BASELINE),
        Variant("reference loop, top-8", lambda: reference_expert_loop(experts, h, mask8, gates8), LAYER_BASELINE),
        Variant("hf_moe_patch dispatch, top-8", lambda: ours(h, idx8, w8), LAYER_BASELINE,
                reference="reference loop, top-8"),
    ]
    facts["hf_moe_patch dispatch, top-8"] = {"max_abs_diff": max(float((c - ref).abs().max()) for c in checks.values())}
    for label, method, options in LAYER_SELECTIONS:
        model = e2e_model(args, sharp, method, options)
        _, idx, w = capture_layer_call(model, ids)
        del model
        mask, gates = dense_selection(idx, w, N)
        loop_label = f"reference loop, {label}"
        variants += [
            Variant(loop_label, lambda mask=mask, gates=gates: reference_expert_loop(experts, h, mask, gates), LAYER_BASELINE),
            Variant(f"hf_moe_patch dispatch, {label}", lambda idx=idx, w=w: ours(h, idx, w), LAYER_BASELINE,
                    reference=loop_label),
            Variant(f"pairs through native grouped_mm, {label}", lambda idx=idx, w=w: via_native(h, idx, w),
                    LAYER_BASELINE, reference=loop_label),
        ]
        with torch.no_grad():
            a, b, c = ours(h, idx, w), reference_expert_loop(experts, h, mask, gates), via_native(h, idx, w)
        facts[loop_label] = pairs(idx)
        facts[f"hf_moe_patch dispatch, {label}"] = {"max_abs_diff": max(float((a - b).abs().max()), float((c - b).abs().max()))}
    return variants, facts


def bench_layer(args, sharp: Sharpness, threads: int, built: tuple[list[Variant], dict], bar: tqdm) -> dict:
    variants, facts = built
    for v in variants:
        v.times.clear()
    logger.info("layer (%s, %d threads): %d variants, %d rounds", sharp.name, threads, len(variants), args.layer_repeats)
    with torch.no_grad():
        interleaved(variants, repeats=args.layer_repeats, warmup=args.warmup, number=1, bar=bar, seed=args.seed)
    return {"sharpness": sharp.name, "threads": threads, "stats": summarise(variants), "facts": facts,
            "repeats": args.layer_repeats, "warmup": args.warmup}


# --- section 5: where one layer's time goes ------------------------------------------------------

PROFILE_VARIANTS = [("native", None, {}), ("usmoe k=8", "usmoe", {"top_k": 8}), ("usmoe k=4", "usmoe", {"top_k": 4})]
PROFILE_TOP_OPS = 8


def profile_layer(args, sharp: Sharpness, threads: int, bar: tqdm) -> dict:
    """Layer 0's router and experts calls of the native and the USMoE models, timed apart
    (interleaved), and torch.profiler's busiest operators of each model's router + experts."""
    from torch.profiler import ProfilerActivity, profile

    ids = e2e_ids(args)
    variants, calls, models = [], {}, []
    for label, method, options in PROFILE_VARIANTS:
        model = e2e_model(args, sharp, method, options)
        models.append(model)  # the last forward's layout stays current for the router calls below
        h, index, weights = capture_layer_call(model, ids)
        mlp = model.model.layers[0].mlp
        router = lambda mlp=mlp, h=h: mlp.gate(h)
        experts = lambda mlp=mlp, h=h, i=index, w=weights: mlp.experts(h, i, w)
        calls[label] = (router, experts)
        variants += [Variant(f"{label}: router", router, None if method is None else "native: router"),
                     Variant(f"{label}: experts", experts, None if method is None else "native: experts")]
    logger.info("profile (%s, %d threads): %d variants, %d rounds", sharp.name, threads, len(variants), args.profile_repeats)
    with torch.no_grad():
        interleaved(variants, repeats=args.profile_repeats, warmup=args.warmup, number=1, bar=bar, seed=args.seed)
        tops = {}
        for label, (router, experts) in calls.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(5):
                    router()
                    experts()
            events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
            total = sum(e.self_cpu_time_total for e in events) or 1.0
            tops[label] = [(e.key, e.count / 5, e.self_cpu_time_total / 5 / 1e3, e.self_cpu_time_total / total)
                           for e in events[:PROFILE_TOP_OPS]]
    del models
    return {"sharpness": sharp.name, "threads": threads, "stats": summarise(variants), "tops": tops,
            "repeats": args.profile_repeats}


# --- sections 3 and 4: end to end --------------------------------------------------------------

# (label, method, options, mode, experts_impl); mode "infer": eval + no_grad forward; "train":
# forward + backward. experts_impl None: transformers' default (grouped_mm).
E2E_VARIANTS = [
    ("native", None, {}, "infer", None),
    ("native, experts_implementation=eager", None, {}, "infer", "eager"),
    ("topk", "topk", {}, "infer", None),
    ("usmoe k=8", "usmoe", {"top_k": 8}, "infer", None),
    ("usmoe k=4", "usmoe", {"top_k": 4}, "infer", None),
    # Causal USMoE, calibrated on other random ids of the same shape ("random").
    ("usmoe causal k=8", "usmoe", {"top_k": 8, "causal": True, "calibration": "random"}, "infer", None),
    ("usmoe causal k=4", "usmoe", {"top_k": 4, "causal": True, "calibration": "random"}, "infer", None),
    # The floor for half budget: the unpatched model told to take its top 4 (same weights).
    ("native top-4 (num_experts_per_tok=4)", None, {"native_top_k": 4}, "infer", None),
    ("expert_choice", "expert_choice", {}, "infer", None),
    ("ssr inference=sinkhorn", "ssr", {"inference": "sinkhorn"}, "infer", None),
    ("A/A control", None, {}, "infer", None),
    ("native train step", None, {}, "train", None),
    ("usmoe k=8 train step", "usmoe", {"top_k": 8}, "train", None),
    ("ssr p=0.01 train step", "ssr", {"p": 0.01, "seed": 0}, "train", None),
    ("ssr p=1 train step", "ssr", {"p": 1.0, "seed": 0}, "train", None),
    ("A/A control train step", None, {}, "train", None),
]
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


def e2e_variants(args, sharp: Sharpness, labels: list[str], experts_impl: str | None = None) -> tuple[list[Variant], dict]:
    ids = e2e_ids(args)
    variants, facts = [], {}
    native_logits = None
    for label, method, options, mode, impl in E2E_VARIANTS:
        if label not in labels:
            continue
        model = e2e_model(args, sharp, method, options, experts_impl or impl)
        fact = {}
        if mode == "infer":
            counter = PairCounter(model, 64)
            with torch.no_grad():
                logits = model(ids).logits
            counter.handle.remove()
            fact.update(experts_per_token=counter.pairs / counter.tokens, k_max=counter.k_max)
            if label == "native":
                native_logits = logits
            elif label in ("topk", "native, experts_implementation=eager") and native_logits is not None:
                fact["identical_to_native"] = bool(torch.equal(logits, native_logits))
                fact["max_abs_diff"] = float((logits - native_logits).abs().max())
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


def bench_e2e(args, sharp: Sharpness, threads: int, built: tuple[list[Variant], dict], repeats: int, bar: tqdm,
              impl: str = "grouped_mm", warmup: int | None = None) -> dict:
    variants, facts = built
    for v in variants:
        v.times.clear()
        if "sinkhorn_steps" in facts[v.label]:
            facts[v.label]["sinkhorn_steps"] = 0
    logger.info("e2e (%s, %d threads, %s): %d variants, %d rounds", sharp.name, threads, impl, len(variants), repeats)
    warmup = args.warmup if warmup is None else warmup
    interleaved(variants, repeats=repeats, warmup=warmup, number=1, bar=bar, seed=args.seed)
    stats = summarise(variants)
    run_facts = {label: dict(f) for label, f in facts.items()}
    for v in variants:
        # The after-hooks run in timed rounds only (reset above, so each setting counts its own).
        if "sinkhorn_steps" in run_facts[v.label]:
            run_facts[v.label]["timed_steps"] = len(v.times)
        stats[v.label]["mean_ms"] = statistics.fmean(v.times) * 1e3
    return {"impl": impl, "sharpness": sharp.name, "threads": threads, "stats": stats, "facts": run_facts,
            "repeats": repeats, "warmup": warmup}


# --- report ----------------------------------------------------------------------------------


def machine_info(threads) -> dict:
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


def fmt_ref_ratio(row: dict) -> str:
    return f"{row['ref_ratio']:.2f} ({row['ref_p25']:.2f}-{row['ref_p75']:.2f})" if "ref_ratio" in row else ""


E2E_TARGETS = [
    # (description, label, threshold)
    ("topk patch within 1.05x of native", "topk", 1.05),
    ("USMoE at native budget (k=8) <= 1.05x", "usmoe k=8", 1.05),
    ("USMoE at half budget (k=4) <= 0.72x", "usmoe k=4", 0.72),
    ("causal USMoE at native budget (k=8) <= 1.05x", "usmoe causal k=8", 1.05),
    ("causal USMoE at half budget (k=4) <= 0.72x", "usmoe causal k=4", 0.72),
    ("SSR p=0.01 training step <= 1.05x", "ssr p=0.01 train step", 1.05),
]


# Router-alone targets (section 1), per shape and sharpness: (description, label, threshold).
ROUTER_TARGETS = [
    ("router: causal USMoE at native budget <= 1.2x native", "usmoe causal k", 1.2),
    ("router: causal USMoE at half budget <= 1.2x native", "usmoe causal k/2", 1.2),
]


def target_rows(e2e_runs: list[dict], layer_runs: list[dict], router_runs: list[dict] | None = None,
                ) -> list[tuple[str, str, str, float, float, bool]]:
    """(setting, target, measured text, measured, threshold, met) for every setting."""
    out = []
    for run in router_runs or []:
        for row in run["rows"]:
            setting = f"{run['sharpness']}, {run['threads']} thr, T={row['T']} N={row['N']} k={row['k']}"
            for desc, label, threshold in ROUTER_TARGETS:
                st = row["stats"].get(label)
                if st is not None and "ratio" in st:
                    out.append((setting, desc, fmt_ratio(st), st["ratio"], threshold, st["ratio"] <= threshold))
    for run in e2e_runs:
        if run["impl"] != "grouped_mm":
            continue
        setting = f"{run['sharpness']}, {run['threads']} thr"
        for desc, label, threshold in E2E_TARGETS:
            row = run["stats"].get(label)
            if row is not None:
                out.append((setting, desc, fmt_ratio(row), row["ratio"], threshold, row["ratio"] <= threshold))
    for run in layer_runs:
        setting = f"{run['sharpness']}, {run['threads']} thr"
        for label, _, _ in LAYER_SELECTIONS:
            row = run["stats"][f"hf_moe_patch dispatch, {label}"]
            out.append((setting, f"layer: dispatch vs reference loop, {label} (<= 1.00)", fmt_ref_ratio(row),
                        row["ref_ratio"], 1.0, row["ref_ratio"] <= 1.0))
    return out


def render(args, info: dict, sharps: dict[str, Sharpness], realistic_spread: float | None, router_runs: list[dict],
           layer_runs: list[dict], e2e_runs: list[dict], elapsed: float, profile_runs: list[dict] | None = None) -> str:
    lines = ["# hf_moe_patch routing benchmark", ""]
    lines += [
        f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Machine: {info['cpu']}, {info['cores']} cores; torch.set_num_threads in {', '.join(map(str, args.threads))}",
        f"- torch {info['torch']}, transformers {info['transformers']}, hf_moe_patch {info['hf_moe_patch']}, "
        f"Python {info['python']}",
        f"- Load average before / after: {_load(info['load_before'])} / {_load(info.get('load_after'))}",
        f"- Command: `{' '.join(['python'] + [Path(sys.argv[0]).as_posix()] + sys.argv[1:])}`",
        f"- Seeds: model and batch seed {args.seed} (router weights seed {args.seed + 1}), round order seed {args.seed}",
        f"- Wall time: {elapsed:.0f} s",
        "",
        "Ratios are the median over interleaved rounds of (variant time / baseline time in the same round); "
        "the 25th-75th percentile of those paired ratios is in parentheses. Below 1 is faster than the baseline.",
        "",
        "Router sharpness (logit spread: root mean square over tokens of each token's standard deviation of "
        "router logits over experts):",
        "",
    ]
    if realistic_spread is not None:
        source = "given with --realistic-spread" if args.realistic_spread is not None else (
            f"measured on the shipped demo model ({len(SPREAD_SENTENCES)} fixed English sentences, all 4 MoE layers)")
        lines.append(f"- Trained router's logit spread: {realistic_spread:.2f} ({source}).")
    for sharp in sharps.values():
        lines.append(f"- `{sharp.name}`: {sharp.description}; end-to-end model's logit spread per layer "
                     + ", ".join(f"{s:.2f}" for s in sharp.spreads) + f"; router section: weights N(0, {sharp.router_std:.3g}).")
    lines.append("")
    if router_runs:
        labels = [lab for lab, *_ in ROUTER_VARIANTS]
        lines += [
            "## 1. Router module alone",
            "",
            f"Router forward on random hidden states (d={HIDDEN}), T tokens as T/{SEQ} sequences of {SEQ}; "
            f"{args.router_repeats} rounds after {args.warmup} warm-up rounds, each sample the mean of `calls` calls, "
            "at each thread count. Inference variants under `torch.no_grad` vs `native`; `ssr p=1` with "
            "autograd recording in a training forward vs `native (train, grad)`. Shapes: "
            + ("every N in 8, 60, 64 with every k in 2, 4, 8" if args.router_grid == "full"
               else "(N, k) of Mixtral, Qwen1.5-MoE and OLMoE") + ", each at every T.",
            "",
        ]
        for run in router_runs:
            lines += [
                f"### Router sharpness `{run['sharpness']}`, {run['threads']} thread(s)",
                "",
                "| T | N | k | calls | native ms | " + " | ".join(labels[1:]) + " | Sinkhorn iters |",
                "|---|---|---|---|---|" + "---|" * (len(labels) - 1) + "---|",
            ]
            for row in run["rows"]:
                st = row["stats"]
                cells = [fmt_ratio(st[lab]) if "ratio" in st[lab] else f"{st[lab]['ms']:.2f} ms" for lab in labels[1:]]
                lines.append(
                    f"| {row['T']} | {row['N']} | {row['k']} | {row['number']} | {st['native']['ms']:.3f} | "
                    + " | ".join(cells) + f" | {row['sinkhorn_iters']} |"
                )
            lines.append("")
    if layer_runs:
        lines += [
            "## 2. One MoE layer's experts",
            "",
            f"Layer 0's experts of the end-to-end model (hidden {HIDDEN}, 64 experts, expert FFN 128) on the "
            f"{args.batch} x {args.seq} tokens of the end-to-end batch, under `torch.no_grad`, given the slots each "
            "router produced for this layer in the model (captured by a forward pre-hook). Ratios vs native "
            "`grouped_mm` on the native top-8 slots (8 pairs per token); the second ratio is vs the reference loop "
            "on the same pairs. *Reference loop*: the official USMoE code's way of running experts (dense "
            "(T, N) selection mask; per expert with any selected token: `index_select` its tokens, expert MLP, "
            "times the gate, `index_add_`), written from its description. *hf_moe_patch dispatch*: the "
            "`PairDispatch` the patch installs (on CPU, its per-expert loop). *Pairs through native grouped_mm*: "
            "the real pairs laid out one per row and given to the native kernel (the dispatch's path on GPU and "
            f"for experts modules it does not recognise). {args.layer_repeats} rounds after {args.warmup} warm-up "
            "rounds.",
            "",
        ]
        for run in layer_runs:
            st, facts = run["stats"], run["facts"]
            lines += [
                f"### `{run['sharpness']}`, {run['threads']} thread(s)",
                "",
                "| variant | vs native grouped_mm (p25-p75) | vs reference loop, same pairs | median ms | notes |",
                "|---|---|---|---|---|",
            ]
            for label, row in st.items():
                ratio = fmt_ratio(row) if "ratio" in row else "1 (baseline)"
                lines.append(f"| {label} | {ratio} | {fmt_ref_ratio(row)} | {row['ms']:.2f} | {_facts(facts.get(label, {}))} |")
            lines.append("")
    grouped = [r for r in e2e_runs if r["impl"] == "grouped_mm"]
    if grouped:
        lines += [
            "## 3. End to end",
            "",
            f"OLMoE-shaped model: hidden {HIDDEN}, 64 experts, top-8, expert FFN 128, {args.layers} layers, "
            f"vocab 128, batch {args.batch} x {args.seq} tokens, experts_implementation = `grouped_mm` "
            f"(transformers' default) unless named. {args.e2e_repeats} rounds after {args.warmup} warm-up rounds. "
            "Inference variants: eval mode, `torch.no_grad`, vs `native`. Train steps: `model.train()`, "
            "forward with labels + backward + zero_grad, vs `native train step`. "
            "`native, experts_implementation=eager` is the unpatched model with transformers' eager experts loop.",
            "",
        ]
        for run in grouped:
            lines += [f"### `{run['sharpness']}`, {run['threads']} thread(s)", ""] + _e2e_table(run)
    for run in (r for r in e2e_runs if r["impl"] != "grouped_mm"):
        lines += [
            f"## 4. experts_implementation = {run['impl']}",
            "",
            f"Same model, `{run['sharpness']}`, {run['threads']} thread(s), {run['repeats']} rounds after "
            f"{run['warmup']} warm-up round(s); ratios vs the native model with the same implementation. The patched "
            "models run hf_moe_patch's CPU loop instead of the kernel.",
            "",
        ] + _e2e_table(run)
    if profile_runs:
        lines += [
            "## 5. Where one layer's time goes",
            "",
            "Layer 0 of the end-to-end models: the router's and the experts' calls timed apart (interleaved, "
            f"{args.profile_repeats} rounds, medians; ratios vs the native model's same part), then torch.profiler's "
            f"{PROFILE_TOP_OPS} operators with the most self CPU time over the router + experts calls (ms per layer call, "
            "profiler overhead included, share of the profiled self time). The experts of the USMoE models are "
            "hf_moe_patch's dispatch.",
            "",
        ]
        for run in profile_runs:
            st = run["stats"]
            lines += [f"### `{run['sharpness']}`, {run['threads']} thread(s)", "",
                      "| part | median ms | ratio vs native (p25-p75) |", "|---|---|---|"]
            for label, row in st.items():
                lines.append(f"| {label} | {row['ms']:.2f} | {fmt_ratio(row) if 'ratio' in row else '1 (baseline)'} |")
            lines.append("")
            for label, top in run["tops"].items():
                ops = "; ".join(f"`{name}` {ms:.2f} ms ({share:.0%}, {calls:g} calls)" for name, calls, ms, share in top)
                lines.append(f"- {label}: {ops}")
            lines.append("")
    targets = target_rows(e2e_runs, layer_runs, router_runs)
    if targets:
        lines += [
            "## Targets",
            "",
            "Router targets from section 1, end-to-end targets from section 3 (`grouped_mm`), layer targets from section 2."
            + (" **Quick run: the model, batch and round counts are smaller than the targets assume, so these "
               "verdicts mean nothing; run without --quick.**" if args.quick else ""),
            "",
            "| setting | target | measured (p25-p75) | met |",
            "|---|---|---|---|",
        ]
        for setting, desc, text, _, _, met in targets:
            lines.append(f"| {setting} | {desc} | {text} | {'yes' if met else 'NO'} |")
        lines.append("")
    return "\n".join(lines)


def _e2e_table(run: dict) -> list[str]:
    """The markdown table of one end-to-end run (sections 3 and 4), then a blank line."""
    lines = ["| variant | ratio (p25-p75) | median ms | mean ms | notes |", "|---|---|---|---|---|"]
    for label, row in run["stats"].items():
        ratio = fmt_ratio(row) if "ratio" in row else "1 (baseline)"
        lines.append(f"| {label} | {ratio} | {row['ms']:.1f} | {row['mean_ms']:.1f} | {_facts(run['facts'].get(label, {}))} |")
    return lines + [""]


def _load(load) -> str:
    return "n/a" if load is None else " ".join(f"{x:.2f}" for x in load)


def _facts(fact: dict) -> str:
    parts = []
    if "experts_per_token" in fact:
        parts.append(f"{fact['experts_per_token']:.2f} experts/token, k_max {fact['k_max']}")
    if "pairs" in fact:
        parts.append(f"{fact['pairs']} pairs, k_max {fact['k_max']}")
    if "identical_to_native" in fact:
        parts.append("outputs identical to native" if fact["identical_to_native"]
                     else f"logits differ from native by at most {fact['max_abs_diff']:.1e}")
    elif "max_abs_diff" in fact:
        parts.append(f"outputs within {fact['max_abs_diff']:.1e} of the reference")
    if "timed_steps" in fact:
        parts.append(f"{fact['sinkhorn_steps']} of {fact['timed_steps']} timed steps were Sinkhorn steps")
    return "; ".join(parts)


# --- CLI -------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Interleaved CPU benchmark of hf_moe_patch routers, reported as ratios to the native router.",
        epilog="Example: python eval/benchmarks/bench_routing.py --out eval/benchmarks/RESULTS.md",
    )
    parser.add_argument("--out", type=Path, help="write the markdown report here (it is always printed too)")
    parser.add_argument(
        "--quick", action="store_true",
        help="smoke run of every section at every thread count and sharpness: T=512 only in the router section, a "
        "1-layer model on 2 x 128 tokens, 3 rounds (overrides the round counts; a few minutes)",
    )
    parser.add_argument(
        "--threads", type=_int_list, default=[1, 2],
        help="comma-separated torch.set_num_threads values, each timed in turn (default 1,2). On a small shared "
        "machine, multi-threaded timings are noisier: OpenMP threads wait for descheduled siblings",
    )
    parser.add_argument("--sharpness", default="peaked,realistic", help="comma-separated subset of peaked,realistic")
    parser.add_argument(
        "--realistic-spread", type=float, default=None,
        help="logit spread of the realistic routers (default: measured on the shipped demo model)",
    )
    parser.add_argument("--sections", default="router,layer,e2e,impls,profile",
                        help="comma-separated subset of router,layer,e2e,impls,profile")
    parser.add_argument("--router-repeats", type=int, default=9, help="timed rounds per router shape")
    parser.add_argument(
        "--router-grid", choices=["full", "models"], default="models",
        help="router section: only the (N, k) of Mixtral, Qwen1.5-MoE and OLMoE (models, default), or every N in "
        "8, 60, 64 with every k in 2, 4, 8 (full)",
    )
    parser.add_argument("--layer-repeats", type=int, default=25, help="timed rounds of the layer section")
    parser.add_argument("--e2e-repeats", type=int, default=25, help="timed rounds end to end")
    parser.add_argument("--profile-repeats", type=int, default=15, help="timed rounds of the profile section")
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
        args.router_repeats, args.layer_repeats, args.e2e_repeats, args.batched_mm_repeats = 3, 3, 3, 1
        args.profile_repeats = 3
        args.warmup, args.target_s, args.layers, args.batch, args.seq = 1, 0.005, 1, 2, 128
    unknown = set(args.sections.split(",")) - {"router", "layer", "e2e", "impls", "profile"}
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    bad = set(args.sharpness.split(",")) - {"peaked", "realistic"}
    if bad:
        parser.error(f"unknown sharpness: {', '.join(sorted(bad))}")
    if not args.threads or min(args.threads) < 1:
        parser.error("--threads needs positive thread counts")
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
    """Logging, torch threads (the first of ``args.threads`` when it is a list) and the machine
    facts of a benchmark run (also used by the other benchmark scripts)."""
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("hf_moe_patch").setLevel(logging.WARNING)  # one "patched ..." line per model otherwise
    threads = args.threads[0] if isinstance(args.threads, list) else args.threads
    torch.set_num_threads(threads)
    info = machine_info(args.threads)
    logging.getLogger("bench").info("%s, %s cores, torch threads %s, load %s", info["cpu"], info["cores"], args.threads,
                                    _load(info["load_before"]))
    return info


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = start_run(args)
    sections = args.sections.split(",")
    names = args.sharpness.split(",")
    realistic_spread = None
    if "realistic" in names:
        realistic_spread = args.realistic_spread if args.realistic_spread is not None else demo_logit_spread()
        logger.info("realistic router logit spread %.3f", realistic_spread)
    sharps = {name: make_sharpness(name, args, realistic_spread) for name in names}
    e2e_labels = [lab for lab, *_ in E2E_VARIANTS]

    n_router = len(router_shapes(args.router_grid)) * (1 if args.quick else len(ROUTER_TOKENS)) * len(ROUTER_VARIANTS)
    n_layer = 5 + 3 * len(LAYER_SELECTIONS)
    settings = len(names) * len(args.threads)
    total = (n_router * args.router_repeats * settings if "router" in sections else 0)
    total += n_layer * args.layer_repeats * settings if "layer" in sections else 0
    total += len(E2E_VARIANTS) * args.e2e_repeats * settings if "e2e" in sections else 0
    total += len(BATCHED_MM_LABELS) * args.batched_mm_repeats if "impls" in sections else 0
    total += 2 * len(PROFILE_VARIANTS) * args.profile_repeats * settings if "profile" in sections else 0

    start = time.perf_counter()
    router_runs, layer_runs, e2e_runs, profile_runs = [], [], [], []
    with logging_redirect_tqdm(), tqdm(total=total, unit="sample", desc="timing", mininterval=1.0) as bar:
        if "router" in sections:
            for threads in args.threads:
                torch.set_num_threads(threads)
                for sharp in sharps.values():
                    router_runs.append({"sharpness": sharp.name, "threads": threads, "rows": bench_router(args, sharp, bar)})
        for sharp in sharps.values():
            # Models are built once per sharpness and timed at every thread count.
            layer_built = layer_variants(args, sharp) if "layer" in sections else None
            e2e_built = e2e_variants(args, sharp, e2e_labels) if "e2e" in sections else None
            for threads in args.threads:
                torch.set_num_threads(threads)
                if layer_built is not None:
                    layer_runs.append(bench_layer(args, sharp, threads, layer_built, bar))
                if e2e_built is not None:
                    e2e_runs.append(bench_e2e(args, sharp, threads, e2e_built, args.e2e_repeats, bar))
                if "profile" in sections:
                    profile_runs.append(profile_layer(args, sharp, threads, bar))
            del layer_built, e2e_built
            gc.collect()
        if "impls" in sections:
            # Last: batched_mm materialises one weight matrix per (token, expert) pair (GBs here).
            torch.set_num_threads(args.threads[0])
            sharp = next(iter(sharps.values()))
            built = e2e_variants(args, sharp, BATCHED_MM_LABELS, experts_impl="batched_mm")
            e2e_runs.append(bench_e2e(args, sharp, args.threads[0], built, args.batched_mm_repeats, bar,
                                      impl="batched_mm", warmup=1))
            del built
    info["load_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    report = render(args, info, sharps, realistic_spread, router_runs, layer_runs, e2e_runs, time.perf_counter() - start,
                    profile_runs)
    print(report)
    if args.out is not None:
        write_report(args.out, report)
    for setting, desc, text, _, threshold, met in target_rows(e2e_runs, layer_runs, router_runs):
        logger.info("target [%s] %-60s %s (<= %.2f) %s", setting, desc, text, threshold, "met" if met else "MISSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
