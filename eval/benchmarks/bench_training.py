"""Training-step time of each router relative to native top-k with the auxiliary balancing loss.

One *training step* is what a fine-tuning loop does per micro-batch: ``model.train()``, forward
with labels (and an all-ones attention mask), ``loss.backward()``, ``AdamW.step()``,
``zero_grad(set_to_none=True)``. Every variant is its own deep copy of the model with its own
optimizer, fed the same sequence of batches (one per step, cycled).

The timing method is bench_routing's: every variant is built and warmed up first, then each
round runs one training step per variant in a new seeded random order, and a variant is reported
as the median over rounds of ``its step time / the baseline's step time in the same round``
(25th-75th percentile in brackets). An A/A control (a second, identical copy of the baseline)
shows the noise floor.

Variants:

- ``topk + aux`` (baseline): the unpatched model (native top-k; the ``topk`` patch reproduces it
  exactly) with ``config.output_router_logits = True``, so transformers computes the auxiliary
  load-balancing loss and adds ``router_aux_loss_coef`` times it to the loss: what native MoE
  training does;
- ``topk + aux (A/A)``: the same, a second copy;
- ``topk, no aux``: unpatched, ``output_router_logits = False`` (the cost of the aux loss alone);
- ``ssr p=0.01``, ``ssr p=1``: SSR patched (``seed=0``). SSR replaces the auxiliary loss (the
  patch sets ``router_aux_loss_coef`` to 0), so these run as an SSR fine-tune would, with
  ``output_router_logits = False``: recording router logits only to multiply their loss by 0
  would be wasted work. p=1 is full Sinkhorn routing on every step;
- ``usmoe`` (native budget) and ``expert_choice``: patched, trained, ``output_router_logits =
  False`` (transformers' aux loss assumes plain top-k routing; expert choice is balanced by
  construction).

SSR at p=0.01 draws a Sinkhorn step on about 1 % of steps, so a run of a few dozen steps sees
few or none: its median ratio is the cost of the common (native-routing) step. The report also
gives its mean ratio over the timed steps (mean time / baseline mean time), the number of
Sinkhorn steps among them, and the expected cost per step at rate p, ``(1 - p) * ratio(p=0.01)
+ p * ratio(p=1)``, from the measured full-Sinkhorn step.

Models, float32 on CPU, batches of real text (held-out WordNet documents packed into blocks):

- ``demo``: the shipped demo model (OLMoE architecture, 16 experts, top-4, 3.2M parameters),
  full fine-tuning;
- ``olmoe-64x8``: an OLMoE-shaped random model closer to real expert counts (hidden 256,
  64 experts, top-8, expert FFN 128, 4 layers, the demo tokenizer's vocabulary), full
  fine-tuning; router weights drawn with std 1/sqrt(hidden) so routing is clearly non-uniform;
- ``demo-lora``: the demo model with peft LoRA (r=8) on the attention projections and on the
  fused expert weights (``target_parameters``), the rest (routers included) frozen.

Run ``python eval/benchmarks/bench_training.py --help``; ``--quick`` is a smoke run of every code path.
"""

from __future__ import annotations

import argparse
import copy
import gc
import logging
import math
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

sys.path.insert(0, str(Path(__file__).parent))
from bench_routing import Variant, router_info, _load, fmt_ratio, interleaved, start_run, summarise, write_report  # noqa: E402

import hf_moe_patch as hmp  # noqa: E402
from hf_moe_patch.training.demo_model import corpus, demo_model_path, pack  # noqa: E402
from hf_moe_patch.data.wordnet import load_wordnet  # noqa: E402

logger = logging.getLogger("bench_training")

BASELINE, AA = "topk + aux", "topk + aux (A/A)"
SSR_P = 0.01
# (label, method or None for unpatched, options, output_router_logits)
VARIANTS = [
    (BASELINE, None, {}, True),
    (AA, None, {}, True),
    ("topk, no aux", None, {}, False),
    ("ssr p=0.01", "ssr", {"p": SSR_P, "seed": 0}, False),
    ("ssr p=1", "ssr", {"p": 1.0, "seed": 0}, False),
    ("usmoe", "usmoe", {}, False),
    ("expert_choice", "expert_choice", {}, False),
]
MODELS = ["demo", "olmoe-64x8", "demo-lora"]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
LORA_EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
TARGET = ("SSR p=0.01 training step within 1.05x of topk+aux", "ssr p=0.01", 1.05)


# --- models and data -------------------------------------------------------------------------


def build_base(name: str, tokenizer, seed: int):
    """The model ``name`` in float32, before any variant's changes; and a description of it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if name in ("demo", "demo-lora"):
        model = AutoModelForCausalLM.from_pretrained(demo_model_path(), dtype=torch.float32)
    else:
        torch.manual_seed(seed)
        config = AutoConfig.for_model(
            "olmoe", vocab_size=len(tokenizer), hidden_size=256, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=4, num_experts=64, num_experts_per_tok=8,
            router_aux_loss_coef=0.01, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for layer in model.model.layers:
                gate = layer.mlp.gate.weight
                gate.copy_(torch.randn(gate.shape, generator=gen) / math.sqrt(config.hidden_size))
    c = model.config
    params = sum(p.numel() for p in model.parameters())
    desc = (
        f"OLMoE architecture, hidden {c.hidden_size}, {c.num_experts} experts, top-{c.num_experts_per_tok}, "
        f"expert FFN {c.intermediate_size}, {c.num_hidden_layers} layers, vocab {c.vocab_size}, "
        f"{params / 1e6:.1f}M parameters, router_aux_loss_coef {c.router_aux_loss_coef}"
    )
    return model, desc


def make_trainable(model, name: str):
    """Wrap for LoRA (``demo-lora``) or leave as is; returns the model and the trained parameters."""
    if name != "demo-lora":
        return model, [p for p in model.parameters() if p.requires_grad]
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS, target_parameters=LORA_EXPERT_PARAMS)
    model = get_peft_model(model, config)
    return model, [p for p in model.parameters() if p.requires_grad]


def batches(tokenizer, *, batch: int, seq: int, count: int) -> list[torch.Tensor]:
    """``count`` batches of ``batch`` x ``seq`` tokens: held-out WordNet documents, packed."""
    blocks = pack(corpus(load_wordnet(), "heldout"), tokenizer, seq)
    need = batch * count
    if len(blocks) < need:
        raise SystemExit(f"only {len(blocks)} blocks of {seq} tokens in the held-out text; need {need}")
    return list(blocks[:need].view(count, batch, seq))


# --- variants --------------------------------------------------------------------------------


class Trainer:
    """One variant's model, optimizer and position in the batch sequence."""

    def __init__(self, model, params, data: list[torch.Tensor], lr: float) -> None:
        self.model, self.data, self.i = model, data, 0
        self.optimizer = torch.optim.AdamW(params, lr=lr)
        self.mask = torch.ones_like(data[0])
        self.aux_seen = False  # whether the last step's output carried an aux loss

    def step(self):
        ids = self.data[self.i % len(self.data)]
        self.i += 1
        out = self.model(input_ids=ids, attention_mask=self.mask, labels=ids)
        out.loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.aux_seen = getattr(out, "aux_loss", None) is not None
        return out.loss

    def router_info(self) -> dict:
        """What the first patched router reported about its last call (SSR: ``sinkhorn``)."""
        return router_info(self.model)


def build_variants(base, name: str, data: list[torch.Tensor], lr: float) -> tuple[list[Variant], dict, dict]:
    variants, facts, trainers = [], {}, {}
    for label, method, options, router_logits in VARIANTS:
        model = copy.deepcopy(base)
        model.config.output_router_logits = router_logits
        model, params = make_trainable(model, name)
        if method is not None:
            hmp.patch(model, method, **options)
        model.train()
        trainer = Trainer(model, params, data, lr)
        fact = {"aux": router_logits, "trained_params": sum(p.numel() for p in params)}
        after = None
        if method == "ssr":
            fact.update(sinkhorn_steps=0, timed_steps=0, iterations=[])

            def after(trainer=trainer, fact=fact):  # untimed: count the timed steps that were Sinkhorn steps
                info = trainer.router_info()  # layer 0's router, last call
                fact["timed_steps"] += 1
                if info.get("sinkhorn"):
                    fact["sinkhorn_steps"] += 1
                    fact["iterations"].append(int(info["iterations"]))

        variants.append(Variant(label, trainer.step, None if label == BASELINE else BASELINE, after))
        facts[label] = fact
        trainers[label] = trainer
    return variants, facts, trainers


def check_aux(trainers: dict) -> dict[str, str]:
    """After warm-up: which variants' loss really included an aux term (and at which coefficient)."""
    out = {}
    for label, trainer in trainers.items():
        coef = max((m.__dict__.get("router_aux_loss_coef", -1.0) for m in trainer.model.modules()), default=-1.0)
        if trainer.aux_seen and coef > 0:
            out[label] = f"aux loss x {coef:g} in the loss"
        elif trainer.aux_seen:
            out[label] = "aux loss computed, coefficient 0"
        else:
            out[label] = "no aux loss"
    expected = {lab: ("aux loss x" if logits else "no aux loss") for lab, _, _, logits in VARIANTS}
    for label, text in out.items():
        if not text.startswith(expected[label]):
            logger.warning("%s: expected %r, got %r", label, expected[label], text)
    return out


def bench_model(name: str, tokenizer, data, args, bar: tqdm) -> dict:
    base, desc = build_base(name, tokenizer, args.seed)
    logger.info("%s: %s; building %d variants", name, desc, len(VARIANTS))
    variants, facts, trainers = build_variants(base, name, data, args.lr)
    # Warm-up is part of interleaved(); the aux check reads the last warm-up step, so run one here.
    for v in variants:
        v.run()
    aux = check_aux(trainers)
    interleaved(variants, repeats=args.repeats, warmup=max(0, args.warmup - 1), number=1, bar=bar, seed=args.seed)
    stats = summarise(variants)
    by_label = {v.label: v for v in variants}
    base_mean = statistics.fmean(by_label[BASELINE].times)
    for v in variants:
        stats[v.label]["mean_ms"] = statistics.fmean(v.times) * 1e3
        stats[v.label]["mean_ratio"] = statistics.fmean(v.times) / base_mean
    p1, pp = stats["ssr p=1"]["ratio"], stats["ssr p=0.01"]["ratio"]
    expected = (1 - SSR_P) * pp + SSR_P * p1
    lora = ""
    if name == "demo-lora":
        lora = (f"; LoRA r=8 on {', '.join(LORA_TARGETS)} and {', '.join(LORA_EXPERT_PARAMS)}, "
                f"{facts[BASELINE]['trained_params'] / 1e3:.0f}k trained parameters")
    del variants, trainers, by_label, base
    gc.collect()
    return {"name": name, "desc": desc + lora, "stats": stats, "facts": facts, "aux": aux, "expected_p": expected}


# --- report ----------------------------------------------------------------------------------


def render(args, info: dict, runs: list[dict], elapsed: float) -> str:
    lines = [
        "# Training-step time by routing",
        "",
        f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Machine: {info['cpu']}, {info['cores']} cores; torch.set_num_threads({info['threads']})",
        f"- torch {info['torch']}, transformers {info['transformers']}, hf_moe_patch {info['hf_moe_patch']}, "
        f"Python {info['python']}",
        f"- Load average before / after: {_load(info['load_before'])} / {_load(info.get('load_after'))}",
        f"- Command: `{' '.join(['python', Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}`",
        f"- Wall time: {elapsed:.0f} s",
        "",
        f"One training step: `model.train()`, forward with labels on {args.batch} x {args.seq} tokens of held-out "
        f"WordNet text (packed; {args.batches} distinct batches, cycled), backward, AdamW (lr {args.lr:g}) step, "
        f"`zero_grad`; float32 on CPU. {args.repeats} interleaved rounds after {args.warmup} warm-up rounds, every "
        "variant its own copy of the model and optimizer. Ratio: median over rounds of (variant step time / "
        f"`{BASELINE}` step time in the same round), 25th-75th percentile in parentheses; below 1 is faster. "
        "Mean ratio: mean step time / mean baseline step time over the timed steps (it includes any rare "
        "Sinkhorn step). Milliseconds are this machine's and only meaningful with it.",
        "",
        f"`{BASELINE}`: unpatched model with `output_router_logits=True` (native top-k plus the auxiliary "
        "load-balancing loss); `topk, no aux`: unpatched, `output_router_logits=False`. The patched variants run "
        "with `output_router_logits=False`: SSR replaces the aux loss (its patch zeroes `router_aux_loss_coef`), "
        "and transformers' aux loss assumes plain top-k. SSR uses `seed=0`; `ssr p=1` is full Sinkhorn routing "
        "every step.",
        "",
    ]
    if args.quick:
        lines += ["**Quick run: too few rounds and a small batch; the numbers below mean nothing.**", ""]
    for run in runs:
        st, facts, aux = run["stats"], run["facts"], run["aux"]
        lines += [f"## {run['name']}", "", run["desc"] + ".", "",
                  "| variant | ratio (p25-p75) | mean ratio | median ms | notes |", "|---|---|---|---|---|"]
        for label, row in st.items():
            ratio = fmt_ratio(row) if "ratio" in row else "1 (baseline)"
            notes = [aux.get(label, "")]
            fact = facts[label]
            if "timed_steps" in fact:
                notes.append(f"{fact['sinkhorn_steps']} of {fact['timed_steps']} timed steps were Sinkhorn steps")
                if fact["iterations"]:
                    its = fact["iterations"]
                    notes.append(f"Sinkhorn iterations (layer 0) {min(its)}-{max(its)}, median {statistics.median(its):g}")
            if label == "ssr p=0.01":
                notes.append(f"expected per step at p={SSR_P:g}: {run['expected_p']:.2f}")
            lines.append(f"| {label} | {ratio} | {row['mean_ratio']:.2f} | {row['ms']:.1f} | {'; '.join(n for n in notes if n)} |")
        lines.append("")
    lines += [
        "## Targets",
        "",
        "Measured value: the median paired ratio of `ssr p=0.01` to `topk + aux`; in parentheses the expected "
        f"cost per step at p={SSR_P:g}, (1 - p) x ratio(p=0.01) + p x ratio(p=1). Met: both are within the threshold."
        + (" **Quick run: the verdicts mean nothing.**" if args.quick else ""),
        "",
        "| model | target | measured | met |",
        "|---|---|---|---|",
    ]
    for name, desc, ratio, expected, met in target_rows(runs):
        lines.append(f"| {name} | {desc} | {ratio:.2f} (expected {expected:.2f}) | {'yes' if met else 'NO'} |")
    lines.append("")
    return "\n".join(lines)


def target_rows(runs: list[dict]) -> list[tuple[str, str, float, float, bool]]:
    desc, label, threshold = TARGET
    out = []
    for run in runs:
        ratio = run["stats"][label]["ratio"]
        out.append((run["name"], desc, ratio, run["expected_p"], ratio <= threshold and run["expected_p"] <= threshold))
    return out


# --- CLI -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Interleaved CPU benchmark of training-step time per router, as ratios to native top-k + aux loss.",
        epilog="Example: python eval/benchmarks/bench_training.py --out eval/benchmarks/TRAINING.md",
    )
    parser.add_argument("--out", type=Path, help="write the markdown report here (it is always printed too)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 x 64 tokens, 2 distinct batches, 3 rounds after 1 warm-up (under a minute)")
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS,
                        help="models to run, in this order (default: all)")
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (at least 1)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch.set_num_threads (default 1: multi-threaded timings are erratic on a small shared machine)",
    )
    parser.add_argument("--batch", type=int, default=8, help="sequences per batch")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--batches", type=int, default=8, help="distinct batches, cycled")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup, args.batch, args.seq, args.batches = 3, 1, 2, 64, 2
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the first step allocates the optimizer state)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = start_run(args)
    from transformers import AutoTokenizer

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(demo_model_path())
    data = batches(tokenizer, batch=args.batch, seq=args.seq, count=args.batches)
    runs = []
    total = len(args.models) * len(VARIANTS) * args.repeats
    with logging_redirect_tqdm(), tqdm(total=total, unit="step", desc="timing", mininterval=1.0) as bar:
        for name in args.models:
            runs.append(bench_model(name, tokenizer, data, args, bar))
    info["load_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    report = render(args, info, runs, time.perf_counter() - start)
    print(report)
    if args.out is not None:
        write_report(args.out, report)
    for name, desc, ratio, expected, met in target_rows(runs):
        logger.info("target %s: %s: %.2f (expected %.2f) %s", name, desc, ratio, expected, "met" if met else "MISSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
