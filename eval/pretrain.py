#!/usr/bin/env python
"""Pre-training from scratch, per router: SSR's and USMoE's language-modelling claims, scaled down.

Experiment 1 of issue 11. Identical small OLMoE-architecture models (the shape of the shipped demo
model's config, smaller) are pretrained on the WordNet corpus (one document per synset, the
``train`` side of the split) with the shipped demo model's tokenizer, for the same token budget and
from the same seeds, routed by:

==================  ===============================================  ===========================
router              training routing                                  inference routing
==================  ===============================================  ===========================
topk_aux            native top-k + OLMoE's auxiliary loss (0.01)     native top-k
topk_noaux          native top-k, no auxiliary loss                  native top-k
sinkhorn            ``ssr`` with ``p=1`` (every forward: the plan)    the Sinkhorn plan
                                                                      (``inference="sinkhorn"``)
ssr_p0.001/0.01/0.1 ``ssr`` with that ``p``, no auxiliary loss        native top-k (SSR's default)
expert_choice       ``expert_choice`` (capacity k*T/N per sequence)   expert choice (non-causal)
usmoe               ``usmoe`` (budget k per token, per sequence)      USMoE (non-causal)
==================  ===============================================  ===========================

The routing is applied with ``hmp.patch`` before training; validation is measured with the
routing of the right-hand column (the method's own inference behaviour). For the SSR models the
perplexity under the other inference routing is recorded as well.

Per run (router, seed): validation perplexity on the held-out WordNet documents (packed blocks,
the demo model's first ``eval_blocks``), perplexity on the same documents corrupted by
``hf_moe_patch.data.corruption.Corruption`` (junk and char, rate 0.1 by default) then packed,
routing statistics on held-out text, load balance over training (top-k and top-1 MaxVio and dead
experts per window of ``--log-every`` steps, from ``hmp.collect_stats``), and step times.

Resumable run by run: each finished run writes ``runs/<router>_seed<k>.json`` in --out
atomically; a rerun skips runs whose JSON exists with the same settings. The three ``topk_aux``
models are kept under ``models/topk_aux_seed<k>/`` (weights and tokenizer) for later
experiments. At the end (or with --report-only) every run present is aggregated into
results.json, README.md (tables of mean ± std over seeds; which claims hold, computed from the
numbers) and PNG figures.

Example:
    python eval/pretrain.py                                   # all 24 runs (~90 min on 2 CPU cores)
    python eval/pretrain.py --routers topk_aux usmoe --seeds 0 # a part; rerun later for the rest
    python eval/pretrain.py --report-only                     # aggregate what exists
    python eval/pretrain.py --quick --out /tmp/pt             # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))  # eval/_common.py, also when loaded by path
from _common import ROOT, apply_defaults, machine_info, mean_std, quantiles, read_json, verdict, write_json  # noqa: E402
DEFAULT_OUT = ROOT / "eval" / "results" / "pretrain"
SCRIPT = "eval/pretrain.py"

log = logging.getLogger("pretrain")

# router name -> (method, patch options, router_aux_loss_coef, inference description)
ROUTERS: dict[str, tuple[str, dict[str, Any], float, str]] = {
    "topk_aux": ("topk", {}, 0.01, "native top-k"),
    "topk_noaux": ("topk", {}, 0.0, "native top-k"),
    "sinkhorn": ("ssr", {"p": 1.0, "inference": "sinkhorn"}, 0.0, "Sinkhorn plan (inference='sinkhorn')"),
    "ssr_p0.001": ("ssr", {"p": 0.001}, 0.0, "native top-k (SSR default inference='topk')"),
    "ssr_p0.01": ("ssr", {"p": 0.01}, 0.0, "native top-k (SSR default inference='topk')"),
    "ssr_p0.1": ("ssr", {"p": 0.1}, 0.0, "native top-k (SSR default inference='topk')"),
    "expert_choice": ("expert_choice", {}, 0.0, "expert choice, capacity k*T/N per sequence (non-causal)"),
    "usmoe": ("usmoe", {}, 0.0, "USMoE, budget k per token per sequence (non-causal)"),
}
BASELINE = "topk_aux"
STYLE = {  # colour, marker
    "topk_aux": ("#1f77b4", "o"), "topk_noaux": ("#aec7e8", "o"), "sinkhorn": ("#d62728", "s"),
    "ssr_p0.001": ("#ff9896", "^"), "ssr_p0.01": ("#ff7f0e", "^"), "ssr_p0.1": ("#8c564b", "^"),
    "expert_choice": ("#2ca02c", "v"), "usmoe": ("#9467bd", "D"),
}

# Model and training settings: the full run and --quick. A flag given on the command line wins
# over both. Sizing of the full run: on 2 quiet CPU cores a training step of this model (923k
# parameters) took 0.105-0.132 s for every router (short calibration runs; 0.12 s typical), i.e.
# about 1/6 of the demo model's 0.69 s step, as its FLOPs per step predict; 1800 steps + ~5 s of
# evaluation is about 225 s per run, 24 runs about 90 min. The price: 3.7M training tokens instead
# of the demo's 12.3M on a model a third of its size; topk_aux seed 0 reached 52.1 validation
# perplexity (the demo model: 22.2).
FULL = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=48, num_experts=16,
            num_experts_per_tok=4, block_size=128, batch_size=16, steps=1800, learning_rate=3e-3, warmup_steps=100,
            weight_decay=0.1, eval_blocks=256, eval_batch_size=32, log_every=50, train_docs=None, heldout_docs=None,
            corruption_rate=0.1, threads=1, seeds=[0, 1, 2])
QUICK = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, num_experts=4,
             num_experts_per_tok=2, block_size=32, batch_size=4, steps=6, learning_rate=3e-3, warmup_steps=2,
             weight_decay=0.1, eval_blocks=4, eval_batch_size=4, log_every=2, train_docs=2000, heldout_docs=300,
             corruption_rate=0.1, threads=1, seeds=[0])
SETTING_KEYS = tuple(k for k in FULL if k != "seeds")

# Claims tested, each a comparison of one metric between two routers. "lower": the claim is that
# router A has a lower value than router B, judged on paired seeds by _common.verdict.
METRICS = {
    "val_ppl": "validation perplexity",
    "junk_ppl_ratio": "perplexity ratio junk-corrupted / clean",
    "char_ppl_ratio": "perplexity ratio char-corrupted / clean",
    "train_maxvio": "training MaxVio (top-k), mean over the second half of training",
    "train_maxvio_top1": "training MaxVio (top-1), mean over the second half of training",
    "step_time_rel": "training step time relative to topk_aux (interleaved timing; pairs are timing rounds)",
}
CLAIMS = [
    ("SSR (p=0.001) reaches a lower validation perplexity than top-k with aux loss", "ssr_p0.001", "topk_aux", "val_ppl"),
    ("SSR (p=0.01) reaches a lower validation perplexity than top-k with aux loss", "ssr_p0.01", "topk_aux", "val_ppl"),
    ("SSR (p=0.1) reaches a lower validation perplexity than top-k with aux loss", "ssr_p0.1", "topk_aux", "val_ppl"),
    ("SSR (p=0.01) reaches a lower validation perplexity than full Sinkhorn (p=1)", "ssr_p0.01", "sinkhorn", "val_ppl"),
    ("SSR (p=0.01) balances load better during training than top-k without aux loss (top-k MaxVio)",
     "ssr_p0.01", "topk_noaux", "train_maxvio"),
    ("SSR (p=0.01) balances load better during training than top-k with aux loss (top-k MaxVio)",
     "ssr_p0.01", "topk_aux", "train_maxvio"),
    ("full Sinkhorn (p=1) balances load better during training than top-k with aux loss (top-k MaxVio)",
     "sinkhorn", "topk_aux", "train_maxvio"),
    ("SSR (p=0.01) trains faster per step than full Sinkhorn (p=1)", "ssr_p0.01", "sinkhorn", "step_time_rel"),
    ("USMoE reaches a lower validation perplexity than top-k with aux loss", "usmoe", "topk_aux", "val_ppl"),
    ("USMoE degrades less than top-k with aux loss under junk-token corruption", "usmoe", "topk_aux", "junk_ppl_ratio"),
    ("USMoE degrades less than top-k with aux loss under character corruption", "usmoe", "topk_aux", "char_ppl_ratio"),
    ("USMoE reaches a lower validation perplexity than expert choice", "usmoe", "expert_choice", "val_ppl"),
    ("SSR (p=0.01) degrades less than top-k with aux loss under junk-token corruption", "ssr_p0.01", "topk_aux",
     "junk_ppl_ratio"),
    ("SSR (p=0.01) degrades less than top-k with aux loss under character corruption", "ssr_p0.01", "topk_aux",
     "char_ppl_ratio"),
    ("the aux loss improves balance: top-k with aux loss has a lower training MaxVio than without",
     "topk_aux", "topk_noaux", "train_maxvio"),
]


# --- command line ------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=SCRIPT, formatter_class=argparse.RawDescriptionHelpFormatter,
                                description=__doc__.split("\n\nExample:")[0])
    p.add_argument("--out", default=str(DEFAULT_OUT),
                   help="output folder: runs/*.json, models/, results.json, README.md, PNGs (default: eval/results/pretrain)")
    p.add_argument("--routers", nargs="+", choices=list(ROUTERS), metavar="ROUTER",
                   help=f"routers to train (default: all: {', '.join(ROUTERS)})")
    p.add_argument("--seeds", nargs="+", type=int, metavar="K", help="seeds (default: 0 1 2; quick: 0)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model, a few steps, 1 seed")
    p.add_argument("--report-only", action="store_true", help="train nothing; aggregate the runs present in --out")
    p.add_argument("--jobs", type=int, default=2,
                   help="runs trained at once, each in its own process with --threads threads (default: %(default)s: "
                        "one per core of a 2-core machine)")
    p.add_argument("--no-report", action="store_true", help="train only; leave the report to a later run")
    p.add_argument("--timing-only", action="store_true",
                   help="train nothing: measure every router's training step interleaved in one process (timing.json), "
                        "then write the report")
    p.add_argument("--timing-rounds", type=int, default=8, help="interleaved rounds of the step timing (default: %(default)s)")
    p.add_argument("--timing-steps", type=int, default=10, help="training steps per router per round (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="retrain the selected runs even when their JSON exists")
    for key, value in FULL.items():
        if key == "seeds":
            continue
        kind = float if isinstance(value, float) else int
        p.add_argument("--" + key.replace("_", "-"), type=kind,
                       help=f"(default: {value}; quick: {QUICK[key]})" + (" None = all documents" if key.endswith("_docs") else ""))
    p.add_argument("--wordnet", help="folder of WordNet's data.* files (default: $HF_MOE_PATCH_WORDNET or /usr/share/wordnet)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"], help="(default: %(default)s)")
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    apply_defaults(args, QUICK if args.quick else FULL)
    args.routers = args.routers or list(ROUTERS)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "num_experts",
                "num_experts_per_tok", "block_size", "batch_size", "steps", "eval_blocks", "eval_batch_size", "log_every",
                "threads"):
        if getattr(args, key) < 1:
            raise SystemExit(f"--{key.replace('_', '-')}={getattr(args, key)} is not valid; an integer >= 1")
    if not 0.0 <= args.corruption_rate <= 1.0:
        raise SystemExit(f"--corruption-rate={args.corruption_rate} is not valid; a number in [0, 1]")
    if args.jobs < 1 or args.threads < 1:
        raise SystemExit("--jobs and --threads take integers >= 1")
    if any(s < 0 for s in args.seeds):
        raise SystemExit("--seeds take integers >= 0")
    return args


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in SETTING_KEYS}


# --- helpers -----------------------------------------------------------------------------------

def run_path(out: Path, router: str, seed: int) -> Path:
    return out / "runs" / f"{router}_seed{seed}.json"


def mean_and_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """(mean, sample std) of the finite values; (None, None) when there are none."""
    s = mean_std(values)
    return (s["mean"], s["std"]) if s["n"] else (None, None)


def fmt(mean: float | None, std: float | None, digits: int = 2) -> str:
    if mean is None:
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


# --- data --------------------------------------------------------------------------------------

class Data:
    """Tokenizer, packed training blocks and the three held-out evaluation sets (clean, junk, char)."""

    def __init__(self, args: argparse.Namespace) -> None:
        from transformers import AutoTokenizer

        import hf_moe_patch as hmp
        from hf_moe_patch.data.corruption import Corruption
        from hf_moe_patch.data.wordnet import load_wordnet
        from hf_moe_patch.training.demo_model import corpus, pack

        self.tokenizer = AutoTokenizer.from_pretrained(hmp.demo_model_path())
        wordnet = load_wordnet(args.wordnet) if args.wordnet else load_wordnet()
        train = corpus(wordnet, "train")
        if args.train_docs:
            train = train[: args.train_docs]
        heldout = corpus(wordnet, "heldout")
        if args.heldout_docs:
            heldout = heldout[: args.heldout_docs]
        self.train_blocks = pack(train, self.tokenizer, args.block_size)
        self.eval_sets = {"clean": pack(heldout, self.tokenizer, args.block_size)[: args.eval_blocks]}
        for kind in ("junk", "char"):
            texts = Corruption(kind, args.corruption_rate, seed=0).apply(heldout)
            self.eval_sets[kind] = pack(texts, self.tokenizer, args.block_size)[: args.eval_blocks]
        self.train_docs, self.heldout_docs = len(train), len(heldout)
        if not len(self.train_blocks) or any(not len(b) for b in self.eval_sets.values()):
            raise SystemExit(f"--block-size={args.block_size}: no full block of text to train or evaluate on")


# --- one run -----------------------------------------------------------------------------------

def build_model(args: argparse.Namespace, router: str, seed: int, tokenizer, state_dict: dict | None = None):
    import torch
    from transformers import AutoModelForCausalLM

    import hf_moe_patch as hmp
    from hf_moe_patch.training.demo_model import DemoTrainingArgs, build_config

    method, options, aux_coef, _ = ROUTERS[router]
    demo_args = DemoTrainingArgs(
        seed=seed, hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads, intermediate_size=args.intermediate_size,
        num_experts=args.num_experts, num_experts_per_tok=args.num_experts_per_tok, router_aux_loss_coef=aux_coef,
        block_size=args.block_size, batch_size=args.batch_size, steps=args.steps, learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay)
    config = build_config(demo_args, tokenizer)
    torch.manual_seed(seed)  # same seed: the same initial weights for every router
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    # The aux loss enters the loss only with output_router_logits (and a coefficient > 0).
    model.config.output_router_logits = aux_coef > 0
    if method == "ssr":
        options = {**options, "seed": seed}
    hmp.patch(model, method, **options)
    return model, options


def window_stats(stats) -> dict[str, float]:
    """Balance over one window of training steps: MaxVio (top-k, top-1) mean over layers, dead experts."""
    layers = [layer.to_dict() for layer in stats.layers]
    dead = sum(sum(1 for c in d["tokens_per_expert"] if c == 0) for d in layers)
    dead_top1 = sum(sum(1 for c in d["top1_tokens_per_expert"] if c == 0) for d in layers)
    n = max(len(layers), 1)
    return {"maxvio": sum(d["maxvio"] for d in layers) / n, "maxvio_top1": sum(d["maxvio_top1"] for d in layers) / n,
            "dead_experts": dead, "dead_experts_top1": dead_top1,
            "experts_per_token": sum(d["experts_per_token_mean"] for d in layers) / n}


def train_one(args: argparse.Namespace, data: Data, router: str, seed: int, out: Path) -> dict[str, Any]:
    import torch

    import hf_moe_patch as hmp
    from hf_moe_patch.lm import perplexity
    from hf_moe_patch.training.demo_model import optimizer_and_schedule, training_step

    method, _, aux_coef, inference = ROUTERS[router]
    model, options = build_model(args, router, seed, data.tokenizer)
    # The demo model's optimizer, schedule and step.
    optimizer, scheduler = optimizer_and_schedule(model, args.learning_rate, args.weight_decay, args.warmup_steps, args.steps)
    blocks = data.train_blocks
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))
    history: list[dict[str, Any]] = []
    step_times: list[float] = []
    model.train()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    start = time.perf_counter()
    losses: list[float] = []
    aux_losses: list[float] = []
    stats_cm = hmp.collect_stats(model)
    stats = stats_cm.__enter__()
    try:
        for step in range(args.steps):
            rows = order[(torch.arange(args.batch_size) + step * args.batch_size) % len(order)]
            t0 = time.perf_counter()
            output = training_step(model, optimizer, scheduler, blocks[rows])
            step_times.append(time.perf_counter() - t0)
            losses.append(float(output.loss.detach()))
            aux = getattr(output, "aux_loss", None)
            aux_losses.append(float(aux.detach()) if aux is not None and aux_coef > 0 else float("nan"))
            if (step + 1) % args.log_every == 0 or step == args.steps - 1:
                entry = {"step": step + 1, "loss": statistics.fmean(losses),
                         "aux_loss": statistics.fmean(aux_losses) if aux_coef > 0 else None,
                         "seconds": time.perf_counter() - start, **window_stats(stats)}
                history.append(entry)
                losses, aux_losses = [], []
                stats_cm.__exit__(None, None, None)
                stats_cm = hmp.collect_stats(model)
                stats = stats_cm.__enter__()
                log.info("%s seed %d step %d/%d loss %.3f maxvio %.3f", router, seed, step + 1, args.steps,
                         entry["loss"], entry["maxvio"])
    finally:
        stats_cm.__exit__(None, None, None)
    train_seconds = time.perf_counter() - start
    # Step times are only comparable between runs on an equally loaded machine: record the load.
    load = {"load_average_1min_start": load_before,
            "load_average_1min_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    model.config.output_router_logits = False
    model.eval()

    def ppl(name: str) -> float:
        b = data.eval_sets[name]
        return perplexity(model, ({"input_ids": x, "labels": x} for x in b.split(args.eval_batch_size)))

    with hmp.collect_stats(model) as heldout_stats:
        val_ppl = ppl("clean")
    heldout = heldout_stats.summary()
    heldout.update({k: v for k, v in window_stats(heldout_stats).items() if k.startswith("dead")})
    junk_ppl, char_ppl = ppl("junk"), ppl("char")
    alt = None
    if method == "ssr":  # the other inference routing, for reference
        other = "topk" if ROUTERS[router][1].get("inference") == "sinkhorn" else "sinkhorn"
        hmp.unpatch(model)
        hmp.patch(model, "ssr", **{**options, "inference": other})
        alt = {"inference": other, "val_ppl": ppl("clean")}
        hmp.unpatch(model)
        hmp.patch(model, "ssr", **options)
    elif method in ("usmoe", "expert_choice"):
        # Their own inference is non-causal (a token's experts depend on later tokens), which can
        # flatter perplexity; the causal variant, calibrated on training text, is the fair number.
        hmp.unpatch(model)
        hmp.patch(model, method, **options, causal=True, calibration={"input_ids": data.train_blocks[:64]})
        alt = {"inference": "causal, calibrated on 64 training blocks", "val_ppl": ppl("clean")}
        hmp.unpatch(model)
        hmp.patch(model, method, **options)

    if router == BASELINE:
        save_model(model, data.tokenizer, out / "models" / f"{router}_seed{seed}")

    half = [h for h in history if h["step"] > args.steps / 2] or history
    sorted_times = sorted(step_times[min(5, len(step_times) - 1):])  # the first steps warm up
    return {
        "router": router, "seed": seed, "method": method, "options": options, "router_aux_loss_coef": aux_coef,
        "inference_routing": inference, "settings": settings_of(args),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_tokens": args.steps * args.batch_size * args.block_size,
        "val_ppl": val_ppl, "junk_ppl": junk_ppl, "char_ppl": char_ppl,
        "junk_ppl_ratio": junk_ppl / val_ppl, "char_ppl_ratio": char_ppl / val_ppl, "val_ppl_other_inference": alt,
        "heldout_routing": heldout,
        "train_maxvio": statistics.fmean(h["maxvio"] for h in half),
        "train_maxvio_top1": statistics.fmean(h["maxvio_top1"] for h in half),
        "train_dead_experts_last": history[-1]["dead_experts"] if history else None,
        "final_train_loss": history[-1]["loss"] if history else None,
        "step_time_median": sorted_times[len(sorted_times) // 2], "step_time_mean": statistics.fmean(sorted_times),
        "train_seconds": train_seconds, **load, "history": history,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(),
    }


def save_model(model, tokenizer, target: Path) -> None:
    """save_pretrained (float32) + tokenizer into a temporary folder, then renamed into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --- aggregation -------------------------------------------------------------------------------

def load_runs(out: Path, settings: dict[str, Any]) -> tuple[list[dict], list[str]]:
    runs, ignored = [], []
    for path in sorted((out / "runs").glob("*.json")):
        run = read_json(path)
        if not isinstance(run, dict) or "router" not in run:
            ignored.append(f"{path.name} (unreadable)")
        elif run.get("settings") != settings:
            ignored.append(f"{path.name} (other settings)")
        else:
            runs.append(run)
    return runs, ignored


def compare(a: dict[int, float], b: dict[int, float]) -> tuple[str, float | None, float | None, int]:
    """The claim "router a has the lower value" on the seeds both have: every router starts a seed
    from the same weights and data order, so the runs pair by seed. Verdict by
    ``_common.verdict`` on the paired differences a - b (lower is the claimed side); returns the
    verdict, the mean difference, its standard error and the number of pairs."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[k] - b[k] for k in seeds]
    if not diffs:
        return "inconclusive (fewer than 2 seeds)", None, None, 0
    s = mean_std(diffs)
    se = s["std"] / math.sqrt(s["n"]) if s["n"] > 1 else None
    return verdict(diffs, better="lower"), s["mean"], se, len(diffs)


def aggregate(runs: list[dict], timing: dict[str, Any] | None = None) -> dict[str, Any]:
    by_router: dict[str, list[dict]] = {}
    for run in runs:
        by_router.setdefault(run["router"], []).append(run)
    table: dict[str, Any] = {}
    for router in ROUTERS:
        rs = sorted(by_router.get(router, []), key=lambda r: r["seed"])
        if not rs:
            continue
        row: dict[str, Any] = {"seeds": [r["seed"] for r in rs], "inference_routing": rs[0]["inference_routing"]}
        for key in ("val_ppl", "junk_ppl", "char_ppl", "junk_ppl_ratio", "char_ppl_ratio", "train_maxvio",
                    "train_maxvio_top1", "train_dead_experts_last", "step_time_median", "train_seconds",
                    "final_train_loss"):
            m, s = mean_and_std([r.get(key) for r in rs])
            row[key] = {"mean": m, "std": s, "values": [r.get(key) for r in rs]}
        for key in ("maxvio", "maxvio_top1", "dead_experts", "experts_per_token_mean"):
            m, s = mean_and_std([r["heldout_routing"].get(key) for r in rs])
            row["heldout_" + key] = {"mean": m, "std": s}
        alts = [r["val_ppl_other_inference"] for r in rs if r.get("val_ppl_other_inference")]
        if alts:
            m, s = mean_and_std([a["val_ppl"] for a in alts])
            row["val_ppl_other_inference"] = {"inference": alts[0]["inference"], "mean": m, "std": s}
        ratios = (timing or {}).get("ratio_to_topk_aux", {}).get(router)
        row["step_time_rel"] = quantiles(ratios) if ratios else None
        table[router] = row
    claims = []
    for text, a, b, metric in CLAIMS:
        if metric == "step_time_rel":  # paired by interleaved timing round, not by seed
            rounds = (timing or {}).get("ratio_to_topk_aux", {})
            va, vb = dict(enumerate(rounds.get(a, []))), dict(enumerate(rounds.get(b, [])))
        else:
            va = {r["seed"]: r.get(metric) for r in by_router.get(a, []) if r.get(metric) is not None}
            vb = {r["seed"]: r.get(metric) for r in by_router.get(b, []) if r.get(metric) is not None}
        result, diff, se, pairs = compare(va, vb)
        paper = "SSR" if a.startswith(("ssr", "sinkhorn")) else "USMoE" if a == "usmoe" else "baseline"
        claims.append({"paper": paper, "claim": text, "a": a, "b": b, "metric": metric, "verdict": result, "difference": diff,
                       "standard_error": se, "seeds_a": len(va), "seeds_b": len(vb), "paired_seeds": pairs})
    return {"routers": table, "claims": claims}


def plot(out: Path, runs: list[dict], agg: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hf_moe_patch.io import atomic_path

    names = list(agg["routers"])
    written = []

    def save(fig, name):
        with atomic_path(out / name) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(name)

    def nseeds(r):
        return len(agg["routers"][r]["seeds"])

    def bars(ax, key, ylabel, title, ref=None, points=False, ref_label=None):
        # A router without the metric (no topk_aux run for the step-time ratio) gets no bar.
        means = [math.nan if agg["routers"][r][key]["mean"] is None else agg["routers"][r][key]["mean"] for r in names]
        stds = [0.0 if agg["routers"][r][key]["std"] is None else agg["routers"][r][key]["std"] for r in names]
        x = range(len(names))
        if points:  # a zoomed axis: points, not bars whose height would mislead
            for i, r in enumerate(names):
                ax.errorbar([i], [means[i]], yerr=[stds[i]], color=STYLE[r][0], marker=STYLE[r][1], capsize=5,
                            markersize=7, label="mean ± std over seeds" if i == 0 else None)
        else:
            ax.bar(x, means, yerr=stds, capsize=4, color=[STYLE[r][0] for r in names], label="mean ± std over seeds")
        ax.set_xticks(list(x), [f"{r}\n(n={nseeds(r)})" for r in names], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("router (n = seeds)")
        ax.set_title(title)
        if ref is not None:
            ax.axhline(ref, color="k", linestyle=":", linewidth=1, label=ref_label or f"{ref:g}")
        ax.legend(fontsize=8)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    bars(ax, "val_ppl", "validation perplexity (held-out WordNet, lower is better)",
         f"Validation perplexity per router ({settings['steps']} steps, mean ± std over seeds)", points=True)
    ax.grid(axis="y", alpha=0.3)
    lo = min(agg["routers"][r]["val_ppl"]["mean"] for r in names)
    hi = max(agg["routers"][r]["val_ppl"]["mean"] + agg["routers"][r]["val_ppl"]["std"] for r in names)
    ax.set_ylim(max(0.0, lo - 0.2 * (hi - lo) - 1), hi + 0.1 * (hi - lo) + 1)
    save(fig, "val_ppl.png")

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, kind in ((axes[0], "junk_ppl_ratio", "junk tokens"), (axes[1], "char_ppl_ratio", "character edits")):
        bars(ax, key, "perplexity corrupted / clean (ratio, lower is better)",
             f"Degradation under {kind} (rate {settings['corruption_rate']:g})", ref=1.0, points=True,
             ref_label="ratio 1: no degradation")
        vals = [agg["routers"][r][key]["mean"] for r in names if agg["routers"][r][key]["mean"] is not None]
        if vals:
            lo, hi = min(min(vals), 1.0), max(vals)
            pad = 0.1 * (hi - lo) + 0.005
            ax.set_ylim(lo - pad, hi + pad)
    save(fig, "corruption.png")

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    for ax, key, label in ((axes[0], "maxvio", "MaxVio, top-k choices (mean over layers)"),
                           (axes[1], "maxvio_top1", "MaxVio, top-1 choices (mean over layers)"),
                           (axes[2], "dead_experts", "dead experts (no token in the window, sum over layers)")):
        for r in names:
            rs = [run for run in runs if run["router"] == r]
            steps = [h["step"] for h in rs[0]["history"]]
            series = [[run["history"][i][key] for run in rs if i < len(run["history"])] for i in range(len(steps))]
            means = [statistics.fmean(v) for v in series]
            stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in series]
            colour, marker = STYLE[r]
            ax.errorbar(steps, means, yerr=stds, color=colour, marker=marker, markersize=3, capsize=2, linewidth=1,
                        label=f"{r} (n={len(rs)})")
        ax.set_xlabel(f"training step (window of {settings['log_every']} steps)")
        ax.set_ylabel(label)
        ax.set_title(f"{label.split(' (')[0]} over training")
        if key != "dead_experts":
            ax.set_yscale("symlog", linthresh=0.1)
    axes[0].legend(fontsize=7)
    save(fig, "balance_training.png")

    timed = [r for r in names if agg["routers"][r].get("step_time_rel")]
    if timed:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        q = [agg["routers"][r]["step_time_rel"] for r in timed]
        ax.bar(range(len(timed)), [x["median"] for x in q], color=[STYLE[r][0] for r in timed],
               yerr=[[x["median"] - x["q25"] for x in q], [x["q75"] - x["median"] for x in q]], capsize=4,
               label="median over interleaved rounds (error bars: 25th-75th percentile)")
        ax.axhline(1.0, color="k", linestyle=":", linewidth=1, label="ratio 1: as fast as topk_aux")
        ax.set_xticks(range(len(timed)), timed, rotation=30, ha="right", fontsize=8)
        ax.set_xlabel("router")
        ax.set_ylabel("training step time / topk_aux's (ratio)")
        ax.set_title(f"Training step time relative to top-k with aux loss ({q[0]['n']} interleaved rounds)")
        ax.legend(fontsize=8)
        save(fig, "step_time.png")

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in names:
        rs = [run for run in runs if run["router"] == r]
        steps = [h["step"] for h in rs[0]["history"]]
        series = [[run["history"][i]["loss"] for run in rs if i < len(run["history"])] for i in range(len(steps))]
        colour, marker = STYLE[r]
        ax.errorbar(steps, [statistics.fmean(v) for v in series],
                    yerr=[statistics.stdev(v) if len(v) > 1 else 0.0 for v in series], color=colour, linewidth=1,
                    capsize=1, label=f"{r} (n={len(rs)})")
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss (nats/token, window mean, with aux loss where on)")
    ax.set_yscale("log")
    ax.set_title("Training loss per router (mean ± std over seeds)")
    ax.legend(fontsize=7)
    save(fig, "train_loss.png")
    return written


def write_report(out: Path, args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    import hf_moe_patch as hmp

    settings = settings_of(args)
    runs, ignored = load_runs(out, settings)
    if not runs:
        log.warning("no finished runs with these settings in %s: no report", out)
        return {}
    timing = read_json(out / "timing.json")
    if timing is not None and (timing.get("key") or {}).get("settings") != settings:
        timing = None  # measured for other settings
    agg = aggregate(runs, timing)
    demo = read_json(Path(hmp.demo_model_path()) / "training_report.json") or {}
    demo_args = demo.get("args", {})
    tokens = settings["steps"] * settings["batch_size"] * settings["block_size"]
    results = {
        "issue": 11, "experiment": 1, "command": "python " + SCRIPT + (" " + shlex.join(argv) if argv else ""),
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(),
        "settings": settings, "train_tokens": tokens, "seeds": sorted({r["seed"] for r in runs}),
        "runs_present": sorted(f"{r['router']}_seed{r['seed']}" for r in runs), "runs_ignored": ignored,
        "parameters": runs[0]["parameters"],
        "demo_model": {"validation_perplexity": demo.get("validation_perplexity_fp32"), "parameters": demo.get("parameters"),
                       "train_tokens": demo.get("train_tokens_seen"), "train_seconds": demo.get("train_seconds")},
        **agg,
        "runs": [{k: v for k, v in r.items() if k != "history"} for r in runs],
    }
    figures = plot(out, runs, agg, settings)
    write_json(out / "results.json", results)

    rows = agg["routers"]
    lines = [
        "# Pre-training from scratch per router (issue 11, experiment 1)", "",
        f"Generated by `{results['command']}` on {results['generated']}; machine: {results['machine']['cpu']}, "
        f"{results['machine']['torch_threads']} torch threads, {results['machine']['platform']}; torch "
        f"{results['machine']['torch']}, transformers {results['machine']['transformers']}.", "",
        f"Model: OLMoE architecture, hidden {settings['hidden_size']}, {settings['num_hidden_layers']} layers, "
        f"{settings['num_attention_heads']} heads, {settings['num_experts']} experts (width {settings['intermediate_size']}) "
        f"top-{settings['num_experts_per_tok']}, {results['parameters']:,} parameters, the demo model's tokenizer. "
        f"Training: {settings['steps']} steps x batch {settings['batch_size']} x block {settings['block_size']} = "
        f"{tokens:,} tokens of WordNet train documents, AdamW lr {settings['learning_rate']:g} (warm-up "
        f"{settings['warmup_steps']}, cosine to 10%), the same initial weights and data order for every router at a "
        f"given seed. Seeds present: {results['seeds']}.", "",
        f"Validation: the first {settings['eval_blocks']} packed held-out blocks (as the demo model's report); "
        f"corrupted: the held-out documents corrupted (`Corruption(kind, {settings['corruption_rate']:g}, seed=0)`) then "
        f"packed, first {settings['eval_blocks']} blocks.", "",
    ]
    if demo:
        base = rows.get(BASELINE, {}).get("val_ppl", {}).get("mean")
        lines += [f"Scale: the shipped demo model (hidden {demo_args.get('hidden_size')}, {demo.get('parameters'):,} "
                  f"parameters, {demo.get('train_tokens_seen'):,} tokens, {demo.get('train_seconds')} s) reaches "
                  f"{demo.get('validation_perplexity_fp32')} validation perplexity with the same routing as `topk_aux`"
                  + (f"; here `topk_aux` reaches {base:.2f} ({base / demo['validation_perplexity_fp32']:.2f}x), the price "
                     f"of a model and token budget small enough for all runs to fit in about 90 minutes." if base else "."), ""]
    walls = [r.get("wall_seconds") for r in runs if r.get("wall_seconds")]
    if walls:
        lines += [f"Wall time of the {len(walls)} runs present: {sum(walls) / 60:.1f} min in all, "
                  f"{statistics.fmean(walls):.0f} s per run on average (training and evaluation; 2 shared CPU cores, "
                  f"so other load on the machine lengthens it).", ""]
    lines += ["## Perplexity", "",
              "| router | inference routing | seeds | validation ppl | junk ppl | char ppl | junk / clean | char / clean |",
              "|---|---|---|---|---|---|---|---|"]
    for r, row in rows.items():
        lines.append(f"| {r} | {row['inference_routing']} | {len(row['seeds'])} | {fmt(**_ms(row['val_ppl']))} | "
                     f"{fmt(**_ms(row['junk_ppl']))} | {fmt(**_ms(row['char_ppl']))} | "
                     f"{fmt(**_ms(row['junk_ppl_ratio']), digits=3)} | {fmt(**_ms(row['char_ppl_ratio']), digits=3)} |")
    alts = [(r, row["val_ppl_other_inference"]) for r, row in rows.items() if "val_ppl_other_inference" in row]
    if alts:
        lines += ["", "The same models under another inference routing (SSR: the other of top-k and the plan; USMoE and expert choice: causal, calibrated on training text, since their own inference lets a token's experts depend on later tokens): " + "; ".join(
            f"{r} with inference='{a['inference']}': {fmt(a['mean'], a['std'])}" for r, a in alts) + "."]
    lines += ["", "## Load balance and speed", "",
              "Training MaxVio: mean over the windows of the second half of training (per window of "
              f"{settings['log_every']} steps, the load of every choice made in training forwards, mean over layers). "
              "Dead experts: experts (summed over layers) that got no token in the last training window. "
              "Held-out: on the validation blocks, with the inference routing. Step time during its run: median of "
              "forward + backward + optimizer step over the run; runs trained at different times under different "
              "machine loads, so these are not compared. Step time / topk_aux, interleaved: `--timing-only` times every "
              "router's step side by side in one process (each router's model takes `--timing-steps` steps on one "
              "fixed batch per round, the order shuffled every round), median ratio to topk_aux's time of the same "
              "round [25th-75th percentile]; SSR at p < 1 takes its Sinkhorn branch on that share of the steps, as "
              "in training.", "",
              "| router | seeds | train MaxVio top-k | train MaxVio top-1 | dead experts (last window) | held-out MaxVio top-k "
              "| held-out MaxVio top-1 | held-out experts/token | step time during its run (s) | step time / topk_aux, interleaved |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r, row in rows.items():
        lines.append(f"| {r} | {len(row['seeds'])} | {fmt(**_ms(row['train_maxvio']), digits=3)} | "
                     f"{fmt(**_ms(row['train_maxvio_top1']), digits=3)} | {fmt(**_ms(row['train_dead_experts_last']), digits=1)} | "
                     f"{fmt(**_ms(row['heldout_maxvio']), digits=3)} | {fmt(**_ms(row['heldout_maxvio_top1']), digits=3)} | "
                     f"{fmt(**_ms(row['heldout_experts_per_token_mean']), digits=2)} | "
                     f"{fmt(**_ms(row['step_time_median']), digits=3)} | {_q(row['step_time_rel'])} |")
    lines += ["", "## Claims", "",
              "Each claim compares one metric of two routers on the seeds both have (a seed starts every router from "
              "the same weights and data order, so the runs pair by seed): **holds** when router A's value is lower "
              "than router B's on every seed and the mean paired difference is more than 2 standard errors below 0, "
              "**does not hold** when the same is true the other way, **inconclusive** otherwise or with fewer than "
              "2 paired seeds. These are the papers' claims at this small scale only.", "",
              "| claim | metric | A − B (mean over seeds) | standard error | paired seeds | verdict |",
              "|---|---|---|---|---|---|"]
    for c in agg["claims"]:
        diff = "–" if c["difference"] is None else f"{c['difference']:+.4g}"
        se = "–" if c["standard_error"] is None else f"{c['standard_error']:.3g}"
        lines.append(f"| {c['claim']} | {METRICS[c['metric']]} | {diff} | {se} | {c['paired_seeds']} | "
                     f"**{c['verdict']}** |")
    lines += ["", "Caveats: expert choice and USMoE (sequence scope) are non-causal: a token's experts depend on later "
              "tokens of its sequence, in training and in validation, which a causal LM cannot do at generation time; "
              "their perplexities are therefore not a like-for-like comparison with token-choice routers. "
              "Full Sinkhorn and SSR plans span the whole batch (scope 'batch').", "",
              "## Figures", ""]
    lines += [f"![{f}]({f})" for f in figures]
    if ignored:
        lines += ["", "Runs ignored (unreadable or other settings): " + ", ".join(ignored)]
    missing = [f"{r}_seed{s}" for r in ROUTERS for s in args.seeds if not run_path(out, r, s).exists()]
    if missing:
        lines += ["", f"Runs missing (not yet trained): {', '.join(missing)}"]
    from hf_moe_patch.io import atomic_write_text

    atomic_write_text(out / "README.md", "\n".join(lines) + "\n")
    log.info("report written to %s", out / "README.md")
    return results


def _q(q: dict[str, Any] | None) -> str:
    return "not measured (--timing-only)" if not q else f"{q['median']:.2f}x [{q['q25']:.2f}-{q['q75']:.2f}]"


def _ms(d: dict[str, Any]) -> dict[str, Any]:
    return {"mean": d.get("mean"), "std": d.get("std")}


# --- main --------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = resolve(build_parser().parse_args(argv))
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import torch

    # One thread by default: step times are part of the results, and with two threads on two
    # cores any other process makes torch's threads wait for each other (steps measured 5-20x
    # slower). Runs at another thread count are other settings: they never mix in one report.
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    settings = settings_of(args)
    if args.timing_only:
        measure_step_times(args, out)
    elif not args.report_only:
        todo = []
        for seed in args.seeds:  # every router at one seed before the next seed: a partial set still compares
            for router in args.routers:
                existing = read_json(run_path(out, router, seed))
                if existing is not None and existing.get("settings") == settings and not args.overwrite:
                    log.info("skipping %s seed %d: finished (%s)", router, seed, run_path(out, router, seed))
                    continue
                todo.append((router, seed))
        if todo and args.jobs > 1:
            run_in_children(args, todo)
        elif todo:
            data = Data(args)
            log.info("data: %d train blocks of %d tokens, eval blocks %s", len(data.train_blocks), args.block_size,
                     {k: len(v) for k, v in data.eval_sets.items()})
            for i, (router, seed) in enumerate(todo):
                log.info("run %d/%d: %s seed %d", i + 1, len(todo), router, seed)
                t0 = time.perf_counter()
                result = train_one(args, data, router, seed, out)
                result["wall_seconds"] = time.perf_counter() - t0
                result["command"] = "python " + SCRIPT + (" " + shlex.join(argv) if argv else "")
                write_json(run_path(out, router, seed), result)
                log.info("%s seed %d: val ppl %.3f, %.0f s", router, seed, result["val_ppl"], result["wall_seconds"])
    if not args.no_report:
        write_report(out, args, argv)
    return 0


def measure_step_times(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Every router's training step timed side by side: each router's model (the trained
    topk_aux seed-0 weights when they exist, else seed 0's initialisation) takes ``--timing-steps`` steps on one fixed batch per round, in a freshly shuffled
    order every round, so that all routers see the same machine load; per round, each router's
    time per step is divided by topk_aux's of the same round. Cached in ``timing.json`` (same
    settings and routers: reused). The step times recorded during the training runs are kept in
    the runs but not compared: the runs trained at different times under different loads."""
    import random

    import torch

    from hf_moe_patch.training.demo_model import optimizer_and_schedule, training_step

    key = {"settings": settings_of(args), "routers": list(args.routers), "rounds": args.timing_rounds,
           "steps": args.timing_steps}
    saved = read_json(out / "timing.json")
    if saved is not None and {k: v for k, v in saved.get("key", {}).items() if k != "weights"} == key and not args.overwrite:
        log.info("step timing: from %s", out / "timing.json")
        return saved
    routers = [BASELINE, *[r for r in args.routers if r != BASELINE]]
    data = Data(args)
    batch = data.train_blocks[: args.batch_size]
    # A trained router where one exists: Sinkhorn needs more iterations on a trained router's
    # peaked scores than on the near-uniform ones of a fresh model.
    trained = out / "models" / f"{BASELINE}_seed0"
    state = None
    if (trained / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        state = AutoModelForCausalLM.from_pretrained(trained, dtype=torch.float32).state_dict()
    key["weights"] = str(trained.relative_to(out)) if state is not None else "seed 0 initialisation"
    models = {}
    for router in routers:
        model, _ = build_model(args, router, 0, data.tokenizer, state)
        model.train()
        optimizer, scheduler = optimizer_and_schedule(model, args.learning_rate, args.weight_decay, args.warmup_steps,
                                                      args.steps)
        models[router] = (model, optimizer, scheduler)
        for _ in range(2):  # warm-up
            training_step(model, optimizer, scheduler, batch)
    rng = random.Random(0)
    per_step: dict[str, list[float]] = {r: [] for r in routers}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    for _ in range(args.timing_rounds):
        order = list(routers)
        rng.shuffle(order)
        for router in order:
            model, optimizer, scheduler = models[router]
            t0 = time.perf_counter()
            for _ in range(args.timing_steps):
                training_step(model, optimizer, scheduler, batch)
            per_step[router].append((time.perf_counter() - t0) / args.timing_steps)
    ratios = {r: [t / b for t, b in zip(per_step[r], per_step[BASELINE])] for r in routers}
    result = {"key": key, "per_step_seconds": per_step, "ratio_to_topk_aux": ratios,
              "median_ratio": {r: statistics.median(v) for r, v in ratios.items()},
              "threads": torch.get_num_threads(), "load_average_1min_start": load,
              "load_average_1min_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
              "machine": machine_info(), "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_json(out / "timing.json", result)
    log.info("step timing: %s", ", ".join(f"{r} {v:.2f}x" for r, v in result["median_ratio"].items()))
    return result


def child_command(args: argparse.Namespace, router: str, seed: int) -> list[str]:
    """This script for one run, with every setting explicit (so the child has the same settings)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--out", str(args.out), "--routers", router, "--seeds", str(seed),
           "--jobs", "1", "--no-report", "--log-level", args.log_level]
    for key in SETTING_KEYS:
        value = getattr(args, key)
        if value is not None:
            cmd += ["--" + key.replace("_", "-"), str(value)]
    if args.wordnet:
        cmd += ["--wordnet", args.wordnet]
    if args.overwrite:
        cmd.append("--overwrite")
    return cmd


def run_in_children(args: argparse.Namespace, todo: list[tuple[str, int]]) -> None:
    """Run ``todo`` in ``args.jobs`` child processes at a time (each with ``args.threads`` threads),
    in order; each child writes its own run file. A failed child fails the whole command after the
    others finish, naming the runs."""
    import subprocess

    pending, running, failed = list(todo), [], []
    while pending or running:
        while pending and len(running) < args.jobs:
            router, seed = pending.pop(0)
            log.info("starting %s seed %d (%d left to start)", router, seed, len(pending))
            running.append((router, seed, subprocess.Popen(child_command(args, router, seed))))
        time.sleep(1.0)
        for item in list(running):
            router, seed, proc = item
            if proc.poll() is not None:
                running.remove(item)
                if proc.returncode:
                    failed.append(f"{router} seed {seed} (exit {proc.returncode})")
    if failed:
        raise SystemExit(f"{SCRIPT}: error: runs failed: {', '.join(failed)}")


if __name__ == "__main__":
    sys.exit(main())
