#!/usr/bin/env python
"""Dynamic compute on the shipped demo model: quality against measured compute, per router and budget.

The evidence of issue 12. For every routing (a router at one budget) on the shipped WordNet demo
model (OLMoE architecture, 16 experts, native top-4, 4 MoE layers):

1. perplexity on held-out WordNet text: the very blocks of the demo's ``training_report.json``
   (``pack(corpus(load_wordnet(), "heldout"), tokenizer, block_size)[:eval_blocks]``);
2. experts per token measured with ``hmp.collect_stats`` on those blocks, overall and per MoE
   layer; for causal (calibrated) routers, the relative deviation of each layer from the budget
   (PASS when within --budget-tolerance, 5% by default);
3. the WordNet MTEB mean with MoEE ``moee_sum`` (the local WordNet tasks of ``make demo``);
4. forward time: interleaved rounds (every routing once per round, in a freshly shuffled, seeded
   order) of a ``no_grad`` forward on fixed held-out blocks, reported as the median ratio to the
   native router with the 25th-75th percentile of the paired (same-round) ratios, at each
   --threads count; an A/A control (a second unpatched copy of the model) shows the noise;
5. generation: greedy ``model.generate`` with a KV cache on a batch of left-padded held-out
   prompts: tokens/s as a ratio to native (interleaved like 4), and cached-vs-uncached agreement
   (the same generation with ``use_cache=False``, which recomputes the whole prefix each step).

Causal routers are calibrated on WordNet *train* documents (a seeded sample), never on held-out
text; their thresholds are recorded and reused (the MTEB runner and the timing models get them as
options, with no text).

Resumable routing by routing: each routing's measurements (1, 2, 3 and generation agreement) are
cached as ``routings/<label>.json`` in the output folder, and each timing table as
``timing/<kind>-t<threads>.json``; a rerun reuses them unless --overwrite (or unless a setting
that changes them differs). mteb's own result cache lives in ``<out>/mteb_cache``.

Outputs in --out: results.json, README.md (report with machine, versions, seeds, command, wall
time, tables and findings computed from the numbers), pareto_perplexity.png, pareto_mteb.png,
pareto_time.png.

Example:
    python eval/dynamic_compute.py                 # the full run (~25 min on 2 CPU cores)
    python eval/dynamic_compute.py --quick --out /tmp/dc   # smoke run (< 1 min)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import random
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))  # eval/_common.py, also when loaded by path
from _common import (ROOT, apply_defaults, fmt_duration, key_of, machine_info, quantiles, read_json,  # noqa: E402
                     setup_run, slug, task_build, write_json)
DEFAULT_OUT = ROOT / "eval" / "results" / "dynamic_compute"
SCRIPT = "eval/dynamic_compute.py"

log = logging.getLogger("dynamic_compute")

# The local WordNet tasks that `make demo` (hf-moe-patch demo) evaluates; kept equal to
# hf_moe_patch.cli.evaluate.LOCAL_TASKS (checked at run time).
DEMO_TASKS = ("WordNetLexnameClassification", "WordNetSameLemmaPairClassification", "WordNetWuPalmerSTS",
              "WordNetExampleRetrieval", "WordNetLexnameClustering")

FAMILIES = ("topk", "usmoe", "usmoe causal", "expert_choice", "expert_choice causal", "top_p")
FAMILY_STYLE = {  # colour, marker, line style per router family in the figures
    "topk": ("#1f77b4", "o", "-"),
    "usmoe": ("#ff7f0e", "s", "--"),
    "usmoe causal": ("#d62728", "D", "-"),
    "expert_choice": ("#2ca02c", "^", "--"),
    "expert_choice causal": ("#9467bd", "v", "-"),
    "top_p": ("#8c564b", "P", ":"),
}
# Where each family's point labels sit (offset points), so that labels of coinciding points do not overlap.
LABEL_OFFSET = {"topk": (5, 4), "usmoe": (5, -11), "usmoe causal": (-30, 5), "expert_choice": (5, -11),
                "expert_choice causal": (-30, -11), "top_p": (5, 4)}
# Bands of measured experts/token used by the findings: (low, high, name).
BANDS = ((0.0, 1.25, "about 1 expert/token (< 1.25)"), (1.25, 1.75, "about 1.5 experts/token [1.25, 1.75)"),
         (1.75, 2.5, "about 2 experts/token [1.75, 2.5)"), (2.5, 3.5, "about 3 experts/token [2.5, 3.5)"),
         (3.5, math.inf, "about 4 experts/token (>= 3.5)"))

NATIVE = "topk (native)"
AA_CONTROL = "topk (native, A/A copy)"

# Defaults of the full run and of --quick; a flag given on the command line wins over both.
FULL = dict(eval_blocks=None, calibration_docs=256, tasks=list(DEMO_TASKS), task_sizes=None, timing_blocks=8,
            timing_rounds=40, timing_warmup=2, threads=[1, 2], gen_prompts=4, max_new_tokens=24, gen_rounds=20,
            gen_threads=[1, 2])
QUICK = dict(eval_blocks=16, calibration_docs=32, tasks=["WordNetWuPalmerSTS"],
             task_sizes={"WordNetWuPalmerSTS": {"n_pairs": 100}}, timing_blocks=2, timing_rounds=3, timing_warmup=1,
             threads=[1], gen_prompts=4, max_new_tokens=8, gen_rounds=2, gen_threads=[1])


def _num(x: float) -> str:
    """``2`` for 2.0, ``1.5`` for 1.5."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


@dataclass
class Routing:
    """One routing: a router at one budget."""

    label: str
    family: str
    method: str
    options: dict[str, Any]
    budget: float | None  # the nominal experts/token (None: no budget, top_p)
    calibrate: bool = False  # causal: thresholds fitted on train text
    native: bool = False

    @property
    def point(self) -> str:
        """The short name of its point in the figures (the budget or p)."""
        if self.native:
            return "native k=4"
        if self.method == "top_p":
            return f"p={_num(self.options['p'])}"
        return f"{'k' if self.method == 'topk' else 'b'}={_num(self.budget)}"


def all_routings() -> list[Routing]:
    out = [Routing(NATIVE, "topk", "topk", {}, 4.0, native=True)]
    out += [Routing(f"topk:top_k={k}", "topk", "topk", {"top_k": k}, float(k)) for k in (3, 2, 1)]
    out += [Routing(f"usmoe:top_k={_num(b)}", "usmoe", "usmoe", {"top_k": b}, float(b)) for b in (4, 3, 2, 1.5, 1)]
    out += [Routing(f"usmoe:top_k={_num(b)},causal", "usmoe causal", "usmoe", {"top_k": b, "causal": True}, float(b),
                    calibrate=True) for b in (4, 3, 2, 1.5, 1)]
    out += [Routing(f"expert_choice:top_k={k}", "expert_choice", "expert_choice", {"top_k": k}, float(k)) for k in (4, 2)]
    out += [Routing(f"expert_choice:top_k={k},causal", "expert_choice causal", "expert_choice",
                    {"top_k": k, "causal": True}, float(k), calibrate=True) for k in (4, 2)]
    out += [Routing(f"top_p:p={_num(p)}", "top_p", "top_p", {"p": p}, None) for p in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)]
    return out


QUICK_LABELS = (NATIVE, "topk:top_k=2", "usmoe:top_k=2", "usmoe:top_k=2,causal", "expert_choice:top_k=2,causal",
                "top_p:p=0.5")


# --- command line ------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=SCRIPT, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\nExample:")[0],
        epilog="Every run is seeded (--seed); the order of the timed calls is shuffled per round from the seed too.")
    p.add_argument("--out", default=str(DEFAULT_OUT),
                   help="output folder: results.json, README.md, PNGs, routings/*.json, timing/*.json, mteb_cache/ "
                        "(default: eval/results/dynamic_compute)")
    p.add_argument("--overwrite", action="store_true", help="recompute every routing and timing table, ignoring the cache")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: routings {', '.join(QUICK_LABELS)}; {QUICK['eval_blocks']} held-out blocks, "
                        f"{QUICK['calibration_docs']} calibration documents, 1 small MTEB task, "
                        f"{QUICK['timing_rounds']} timing rounds, {QUICK['max_new_tokens']} new tokens")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the calibration sample, the generation prompts and the timing order (default: %(default)s)")
    p.add_argument("--only", nargs="+", metavar="LABEL",
                   help="run only these routings (labels as in the table, e.g. 'usmoe:top_k=2,causal'); the native "
                        "router is always included")
    p.add_argument("--families", nargs="+", choices=FAMILIES, metavar="FAMILY",
                   help=f"run only these router families ({', '.join(FAMILIES)}); native is always included")
    p.add_argument("--eval-blocks", type=int,
                   help="held-out blocks for perplexity and experts/token (default: eval_blocks of the demo's "
                        "training_report.json, 256; quick: 16)")
    p.add_argument("--ppl-batch-size", type=int, default=32, help="blocks per forward for perplexity (default: %(default)s)")
    p.add_argument("--calibration-docs", type=int,
                   help="WordNet train documents (seeded sample) to calibrate causal routers on (default: 256; quick: 32)")
    p.add_argument("--calibration-format", default="blocks", choices=["documents", "blocks"],
                   help="blocks: the calibration documents packed into blocks of block_size tokens, as the held-out "
                        "text is (calibrate on text shaped like the text routed); documents: each document tokenized "
                        "alone (BOS, padded batches; patch(calibration=texts, tokenizer=tok)) (default: %(default)s)")
    p.add_argument("--budget-tolerance", type=float, default=0.05,
                   help="causal routers: largest relative deviation of a layer's measured experts/token from the "
                        "budget that passes (default: %(default)s)")
    p.add_argument("--tasks", nargs="+", metavar="TASK",
                   help=f"local WordNet MTEB tasks (default: those of make demo: {', '.join(DEMO_TASKS)}; quick: "
                        "WordNetWuPalmerSTS with 100 pairs)")
    p.add_argument("--mteb-batch-size", type=int, default=32, help="texts per forward in the MTEB encoder (default: %(default)s)")
    p.add_argument("--no-mteb", action="store_true", help="skip the MTEB evaluation")
    p.add_argument("--timing-blocks", type=int, help="held-out blocks per timed forward (default: 8; quick: 2)")
    p.add_argument("--timing-rounds", type=int, help="interleaved timing rounds of forwards (default: 40; quick: 3)")
    p.add_argument("--timing-warmup", type=int, help="untimed forwards per routing first (default: 2; quick: 1)")
    p.add_argument("--threads", nargs="+", type=int, metavar="N",
                   help="torch thread counts of the forward timing (default: 1 2; quick: 1)")
    p.add_argument("--gen-threads", nargs="+", type=int, metavar="N",
                   help="torch thread counts of the generation timing (default: 1 2; quick: 1)")
    p.add_argument("--gen-prompts", type=int, help="held-out prompts in the generation batch (default: 4)")
    p.add_argument("--max-new-tokens", type=int, help="tokens generated per prompt (default: 24; quick: 8)")
    p.add_argument("--gen-rounds", type=int, help="interleaved generation timing rounds (default: 20; quick: 2)")
    p.add_argument("--no-timing", action="store_true", help="skip the forward and generation timing")
    p.add_argument("--wordnet", help="folder of WordNet's data.* files (default: $HF_MOE_PATCH_WORDNET or /usr/share/wordnet)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"], help="(default: %(default)s)")
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the flags not given from the full or the quick defaults; check the values."""
    apply_defaults(args, QUICK if args.quick else FULL)
    for name in ("ppl_batch_size", "calibration_docs", "mteb_batch_size", "timing_blocks", "timing_rounds",
                 "gen_prompts", "max_new_tokens", "gen_rounds"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')}={getattr(args, name)} is not valid; an integer >= 1")
    if args.timing_warmup < 0:
        raise SystemExit(f"--timing-warmup={args.timing_warmup} is not valid; an integer >= 0")
    if args.eval_blocks is not None and args.eval_blocks < 1:
        raise SystemExit(f"--eval-blocks={args.eval_blocks} is not valid; an integer >= 1")
    if any(t < 1 for t in args.threads + args.gen_threads):
        raise SystemExit("--threads / --gen-threads take integers >= 1")
    unknown = [t for t in args.tasks if t not in DEMO_TASKS]
    if unknown:
        raise SystemExit(f"--tasks: unknown task(s) {unknown}; the local WordNet tasks are {', '.join(DEMO_TASKS)}")
    return args


def select_routings(args: argparse.Namespace) -> list[Routing]:
    routings = all_routings()
    if args.quick and not args.only and not args.families:
        routings = [r for r in routings if r.label in QUICK_LABELS]
    if args.only:
        known = {r.label for r in routings}
        unknown = [x for x in args.only if x not in known]
        if unknown:
            raise SystemExit(f"--only: unknown routing(s) {unknown}; known: {', '.join(sorted(known))}")
        routings = [r for r in routings if r.native or r.label in args.only]
    if args.families:
        routings = [r for r in routings if r.native or r.family in args.families]
    return routings


# --- small helpers -----------------------------------------------------------------------------

# --- data --------------------------------------------------------------------------------------

@dataclass
class Data:
    eval_blocks: Any  # (n, block_size) long tensor
    block_size: int
    calibration_texts: list[str]
    calibration_input: Any  # what patch(calibration=...) gets: the texts, or packed blocks as batches
    prompts: list[str]
    report: dict[str, Any]
    heldout_docs: int
    train_docs: int


def load_data(args: argparse.Namespace, tokenizer, model_dir: Path) -> Data:
    from hf_moe_patch.data.wordnet import load_wordnet
    from hf_moe_patch.training.demo_model import corpus, pack

    report = json.loads((model_dir / "training_report.json").read_text())
    block_size = int(report["args"]["block_size"])
    n_blocks = args.eval_blocks or int(report["args"]["eval_blocks"])
    wordnet = load_wordnet(args.wordnet)
    heldout, train = corpus(wordnet, "heldout"), corpus(wordnet, "train")
    blocks = pack(heldout, tokenizer, block_size)[:n_blocks]
    rng = random.Random(args.seed)
    calibration = rng.sample(train, min(args.calibration_docs, len(train)))
    if args.calibration_format == "blocks":
        packed = pack(calibration, tokenizer, block_size)
        calibration_input = [{"input_ids": b, "attention_mask": b.new_ones(b.shape)} for b in packed.split(8)]
    else:
        calibration_input = calibration
    # Prompts: the head of a held-out document, "<lemmas> (<part of speech>):", whose gloss the model
    # then writes; heads differ in length, so the batch is left-padded.
    heads = sorted({doc.split("):", 1)[0] + "):" for doc in heldout if "):" in doc})
    prompts = random.Random(args.seed + 1).sample(heads, args.gen_prompts)
    return Data(blocks, block_size, calibration, calibration_input, prompts, report, len(heldout), len(train))


# --- measurements of one routing ---------------------------------------------------------------

def layer_stats(stats) -> list[dict[str, Any]]:
    return [{"layer": d["layer"], "experts_per_token_mean": d["experts_per_token_mean"], "tokens": d["tokens"],
             "tokens_without_expert": d["tokens_without_expert"], "maxvio": d["maxvio"],
             "experts_per_token_hist": d["experts_per_token_hist"]} for d in stats.to_dict()["layers"]]


def generation(model, tokenizer, prompts: list[str], max_new_tokens: int, use_cache: bool):
    import torch

    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                             use_cache=use_cache, pad_token_id=tokenizer.pad_token_id)
    return out[:, enc["input_ids"].shape[1]:]


def agreement(a, b) -> dict[str, Any]:
    import torch

    n = max(a.shape[1], b.shape[1])
    pad = lambda t: torch.nn.functional.pad(t, (0, n - t.shape[1]), value=-1)  # noqa: E731
    a, b = pad(a), pad(b)
    same = a == b
    first = [int((~row).nonzero()[0]) if bool((~row).any()) else None for row in same]
    return {"token_agreement": float(same.float().mean()), "exact": bool(same.all()),
            "sequences_exact": [bool(row.all()) for row in same], "first_divergence": first}


def measure_routing(r: Routing, model, tokenizer, data: Data, args: argparse.Namespace, out: Path,
                    native_generation: list[list[int]] | None) -> dict[str, Any]:
    """Patch (calibrating a causal router on train text), measure, unpatch; returns the record."""
    import torch

    import hf_moe_patch as hmp
    from hf_moe_patch.training.demo_model import perplexity

    started = time.perf_counter()
    record: dict[str, Any] = {"label": r.label, "family": r.family, "method": r.method, "options": r.options,
                              "budget": r.budget, "native": r.native, "causal": bool(r.options.get("causal"))}
    torch.manual_seed(args.seed)
    if r.native:
        pass  # the unpatched model is the native router
    elif r.calibrate:
        t0 = time.perf_counter()
        hmp.patch(model, r.method, calibration=data.calibration_input, tokenizer=tokenizer, **r.options)
        record["calibration_seconds"] = time.perf_counter() - t0
    else:
        hmp.patch(model, r.method, **r.options)
    config = hmp.routing_config(model)
    record["routing_config"] = config
    full = {k: v for k, v in (config or {}).items() if k != "method"}
    # What the MTEB runner and the timing models are patched with: for a causal router, the
    # calibrated thresholds (no text needed again).
    record["patch_options"] = ({**r.options, "thresholds": full["thresholds"], "calibration_info": full["calibration_info"]}
                               if r.calibrate else dict(r.options))
    if r.calibrate:
        record["thresholds"] = full["thresholds"]
        record["calibration_info"] = full["calibration_info"]
    try:
        # (1) + (2): perplexity and experts/token on the held-out blocks.
        with hmp.collect_stats(model) as stats:
            ppl = perplexity(model, data.eval_blocks, batch_size=args.ppl_batch_size)
        record["perplexity"] = ppl
        record["experts_per_token"] = stats.summary()["experts_per_token_mean"]
        record["tokens_without_expert_frac"] = stats.summary()["tokens_without_expert_frac"]
        record["maxvio"] = stats.summary()["maxvio"]
        record["layers"] = layer_stats(stats)
        if r.budget is not None:
            for layer in record["layers"]:
                dev = (layer["experts_per_token_mean"] - r.budget) / r.budget
                layer["relative_deviation_from_budget"] = dev
                layer["within_tolerance"] = abs(dev) <= args.budget_tolerance
        # (5, agreement) generation with and without the KV cache.
        cached = generation(model, tokenizer, data.prompts, args.max_new_tokens, use_cache=True)
        uncached = generation(model, tokenizer, data.prompts, args.max_new_tokens, use_cache=False)
        record["generation"] = {"cached_vs_uncached": agreement(cached, uncached), "cached_tokens": cached.tolist(),
                                "uncached_tokens": uncached.tolist(),
                                "cached_text": tokenizer.batch_decode(cached, skip_special_tokens=True)}
        if native_generation is not None:
            record["generation"]["cached_vs_native"] = agreement(cached, torch.tensor(native_generation))
    finally:
        hmp.unpatch(model)
    # (3) MTEB, patched by evaluate_routings itself with the same options.
    if not args.no_mteb:
        record["mteb"] = run_mteb(r, record["patch_options"], model, tokenizer, args, out)
    record["seconds"] = time.perf_counter() - started
    return record


MAX_TAG = 120
# The work-arounds below that actually changed something during the current routing's MTEB run.
FIRED: set[str] = set()


def shorten_routing_tags() -> None:
    """Work around hf_moe_patch.embeddings.moee.routing_tag (issue found while writing this
    script): it puts every non-default option in the mteb model name, so a causal router's
    thresholds and calibration_info make a folder name longer than the file system allows
    (OSError: File name too long). Here a tag longer than MAX_TAG characters keeps its short
    options and replaces the long ones by a hash of their values; the mteb revision (a hash of
    the full routing config, thresholds included) still tells runs apart. Tags that fit are
    unchanged."""
    from hf_moe_patch.embeddings import moee

    if getattr(moee.routing_tag, "_shortened", False):
        return
    original = moee.routing_tag

    def routing_tag(model) -> str:
        tag = original(model)
        if len(tag) <= MAX_TAG:
            return tag
        import hf_moe_patch as hmp

        config = hmp.routing_config(model) or {}
        long = {k: config[k] for k in ("thresholds", "calibration_info") if k in config}
        head = tag.split("-thresholds=")[0].split("-calibration_info=")[0]
        short = f"{head}-calibrated={key_of(long)[:10]}"
        short = short if len(short) <= MAX_TAG else f"{config.get('method', 'routing')}-{key_of(config)[:16]}"
        FIRED.add("routing_tag")
        return short

    routing_tag._shortened = True  # type: ignore[attr-defined]
    moee.routing_tag = routing_tag


def run_mteb(r: Routing, options: dict[str, Any], model, tokenizer, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from hf_moe_patch.embeddings.evaluation import evaluate_routings
    from hf_moe_patch.report import RoutingCase

    shorten_routing_tags()
    FIRED.clear()
    with model_aware_option_checks(model, r, options):
        result = _run_mteb(r, options, model, tokenizer, args, out)
    result["workarounds"] = sorted(FIRED)
    return result


@contextlib.contextmanager
def model_aware_option_checks(model, r: Routing, options: dict[str, Any]):
    """Work around hf_moe_patch.validation.parse_routings (issue found while writing this script):
    its model-free check of per-expert thresholds (expert_choice with causal=True) compares each
    row's length with the number of experts of a symbolic "any model" (2**62), so every real
    list of N thresholds is refused and evaluate_routings cannot run a calibrated causal expert
    choice. Only when the package's own model-free check refuses these options, model-free option
    checks are made against this model's native routing (N=16, k=4) instead; evaluate_routings
    then checks the routing against the model again, as always. Once the package accepts them,
    this does nothing."""
    from hf_moe_patch import validation
    from hf_moe_patch.errors import InvalidOptionError
    from hf_moe_patch.report import RoutingCase

    try:
        validation.parse_routings([RoutingCase(r.label, r.method, dict(options))])
    except InvalidOptionError:
        FIRED.add("per_expert_threshold_check")
    else:
        yield
        return

    native = validation.native_from_config(model.config)
    original = validation.check_method_options

    def check(method, options, native_=None):
        return original(method, options, native if native_ is None else native_)

    validation.check_method_options = check
    try:
        yield
    finally:
        validation.check_method_options = original


def _run_mteb(r: Routing, options: dict[str, Any], model, tokenizer, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from hf_moe_patch.embeddings.evaluation import evaluate_routings
    from hf_moe_patch.report import RoutingCase


    t0 = time.perf_counter()
    report = evaluate_routings(
        model, tokenizer, [RoutingCase(r.label, r.method, dict(options))], list(args.tasks), embedding="moee_sum",
        batch_size=args.mteb_batch_size, cache_dir=out / "mteb_cache", out_dir=None, overwrite=args.overwrite,
        progress=False, wordnet_kwargs={"path": args.wordnet, "split": "heldout", "sizes": args.task_sizes})
    run = report.runs[0]
    return {"scores": run.scores, "metrics": run.metrics, "task_types": run.task_types, "mean": report.mean(run),
            "experts_per_token_on_mteb_texts": run.stats.get("experts_per_token_mean"),
            "encode_seconds": run.encode_seconds, "from_mteb_cache": run.cached, "revision": run.revision,
            "seconds": time.perf_counter() - t0}


def infer_workarounds(r: Routing, rec: dict[str, Any], out: Path) -> None:
    """For a cached record without the list of work-arounds that fired: the tag was shortened when
    mteb's cache holds this routing under the shortened name; the threshold check was needed when
    the package refuses these options now."""
    mteb = rec.get("mteb")
    if mteb is None or "workarounds" in mteb:
        return
    fired = []
    if r.calibrate:
        marker = f"calibrated={key_of({k: rec['patch_options'][k] for k in ('thresholds', 'calibration_info')})[:10]}"
        results = out / "mteb_cache" / "results"
        if results.is_dir() and any(marker in p.name for p in results.iterdir()):
            fired.append("routing_tag")
        from hf_moe_patch import validation
        from hf_moe_patch.errors import InvalidOptionError
        from hf_moe_patch.report import RoutingCase

        try:
            validation.parse_routings([RoutingCase(r.label, r.method, dict(rec["patch_options"]))])
        except InvalidOptionError:
            fired.append("per_expert_threshold_check")
    mteb["workarounds"] = fired


# --- timing ------------------------------------------------------------------------------------

def timing_models(base, routings: list[Routing], records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One copy of the model per routing, patched once (thresholds from the records), plus the A/A copy."""
    import hf_moe_patch as hmp

    models = {}
    for r in routings:
        m = copy.deepcopy(base).eval()
        if not r.native:
            hmp.patch(m, r.method, **records[r.label]["patch_options"])
        models[r.label] = m
    models[AA_CONTROL] = copy.deepcopy(base).eval()
    return models


def interleaved(calls: dict[str, Any], rounds: int, warmup: int, seed: int, desc: str) -> dict[str, list[float]]:
    """Seconds of each call per round; every round runs every call once in a fresh seeded order."""
    for name, call in calls.items():
        for _ in range(warmup):
            call()
    rng = random.Random(seed)
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for i in range(rounds):
        order = names[:]
        rng.shuffle(order)
        for name in order:
            t0 = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - t0)
        log.debug("%s: round %d/%d done", desc, i + 1, rounds)
    return times


def summarise_times(times: dict[str, list[float]], work: float, unit: str) -> dict[str, Any]:
    """Per call: the median of the paired ratios to native (time ratio, and the rate ratio = 1 /
    time ratio per round), with their 25th-75th percentiles, and the median absolute seconds."""
    base = times[NATIVE]
    out = {}
    for name, ts in times.items():
        ratios = [t / b for t, b in zip(ts, base)]
        out[name] = {"time_ratio": quantiles(ratios), "rate_ratio": quantiles([1 / x for x in ratios]),
                     "median_seconds": statistics.median(ts), f"median_{unit}_per_second": work / statistics.median(ts)}
    return out


def run_timing(kind: str, threads: int, base, routings: list[Routing], records: dict[str, dict[str, Any]],
               data: Data, tokenizer, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    import torch

    settings = {"kind": kind, "threads": threads, "routings": [r.label for r in routings], "seed": args.seed,
                "patch_options": {r.label: records[r.label]["patch_options"] for r in routings}}
    if kind == "forward":
        settings.update(blocks=args.timing_blocks, block_size=data.block_size, rounds=args.timing_rounds,
                        warmup=args.timing_warmup)
    else:
        settings.update(prompts=data.prompts, max_new_tokens=args.max_new_tokens, rounds=args.gen_rounds,
                        warmup=args.timing_warmup)
    path = out / "timing" / f"{kind}-t{threads}.json"
    saved = None if args.overwrite else read_json(path)
    if saved is not None and saved.get("settings_key") == key_of(settings):
        log.info("timing %s at %d thread(s): from the cache (%s)", kind, threads, path)
        saved["from_cache"] = True
        return saved
    log.info("timing %s at %d thread(s): %d routings + A/A control, %d rounds", kind, threads, len(routings),
             settings["rounds"])
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    try:
        models = timing_models(base, routings, records)
        if kind == "forward":
            ids = data.eval_blocks[: args.timing_blocks]

            def forward(m):
                with torch.no_grad():
                    m(input_ids=ids, use_cache=False)

            calls = {name: (lambda m=m: forward(m)) for name, m in models.items()}
            work, unit = float(ids.numel()), "tokens"
            rounds = args.timing_rounds
        else:
            calls = {name: (lambda m=m: generation(m, tokenizer, data.prompts, args.max_new_tokens, True))
                     for name, m in models.items()}
            work, unit = float(len(data.prompts) * args.max_new_tokens), "generated_tokens"
            rounds = args.gen_rounds
        times = interleaved(calls, rounds, args.timing_warmup, args.seed + threads + (0 if kind == "forward" else 100),
                            f"{kind} t{threads}")
    finally:
        torch.set_num_threads(previous)
    result = {"settings_key": key_of(settings), "settings": settings, "seconds": time.perf_counter() - t0,
              "load_average_1min_before": load_before,
              "load_average_1min_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
              "raw_seconds": times, "summary": summarise_times(times, work, unit)}
    write_json(path, result)
    result["from_cache"] = False
    return result


# --- analysis ----------------------------------------------------------------------------------

def pareto(points: list[tuple[str, float, float]], lower_is_better: bool) -> list[str]:
    """Labels on the Pareto front of (label, compute, quality): no other point has less or equal
    compute and better or equal quality, with one strictly."""
    front = []
    for label, x, y in points:
        better = lambda y2, y1: y2 < y1 if lower_is_better else y2 > y1  # noqa: E731
        dominated = any((x2 <= x and (better(y2, y) or y2 == y) and (x2 < x or better(y2, y)))
                        for l2, x2, y2 in points if l2 != label)
        if not dominated:
            front.append(label)
    return front


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    if len(a) < 3:
        return None

    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.mean(ra), statistics.mean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / var if var else None


def band_of(x: float) -> str:
    return next(name for lo, hi, name in BANDS if lo <= x < hi)


def findings(records: list[dict[str, Any]], timing: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """Sentences computed from the numbers (nothing here is written in advance)."""
    out = []
    native = next(r for r in records if r["native"])
    has_mteb = all("mteb" in r for r in records)
    # Per band of measured compute: the best router by perplexity and by MTEB.
    for lo, hi, name in BANDS:
        inside = [r for r in records if lo <= r["experts_per_token"] < hi]
        if not inside:
            continue
        best = min(inside, key=lambda r: r["perplexity"])
        others = sorted(inside, key=lambda r: r["perplexity"])[1:]
        text = (f"At {name} ({len(inside)} routings), the lowest held-out perplexity is {best['label']} "
                f"({best['perplexity']:.2f} at {best['experts_per_token']:.2f} experts/token")
        text += f"; next {others[0]['label']} at {others[0]['perplexity']:.2f})" if others else ", the only routing there)"
        if has_mteb:
            top = max(inside, key=lambda r: r["mteb"]["mean"])
            text += (f"; the highest WordNet MTEB mean is {top['label']} ({100 * top['mteb']['mean']:.2f}, "
                     f"native {100 * native['mteb']['mean']:.2f})")
        out.append(text + ".")
    # Per nominal budget (routers that take one; top_p has none and is placed by the bands above).
    for b in sorted({r["budget"] for r in records if r["budget"] is not None}):
        same = [r for r in records if r["budget"] == b]
        if len(same) < 2:
            continue
        by_ppl = sorted(same, key=lambda r: r["perplexity"])
        text = (f"At a nominal budget of {_num(b)} experts/token, by perplexity: "
                + " < ".join(f"{r['label']} ({r['perplexity']:.2f})" for r in by_ppl))
        if has_mteb:
            by_mteb = sorted(same, key=lambda r: -r["mteb"]["mean"])
            text += "; by MTEB mean: " + " > ".join(f"{r['label']} ({100 * r['mteb']['mean']:.2f})" for r in by_mteb)
        out.append(text + ".")
    pts = [(r["label"], r["experts_per_token"], r["perplexity"]) for r in records]
    front = pareto(pts, lower_is_better=True)
    out.append("Pareto front of perplexity against measured experts/token (no routing has both less compute and "
               "lower perplexity): " + ", ".join(f"{l} ({x:.2f}, {y:.2f})" for l, x, y in sorted(pts, key=lambda p: p[1])
                                                   if l in front) + ".")
    if has_mteb:
        pts = [(r["label"], r["experts_per_token"], r["mteb"]["mean"]) for r in records]
        front = pareto(pts, lower_is_better=False)
        out.append("Pareto front of the WordNet MTEB mean against measured experts/token: "
                   + ", ".join(f"{l} ({x:.2f}, {100 * y:.2f})" for l, x, y in sorted(pts, key=lambda p: p[1]) if l in front) + ".")
    # Budget adherence of causal routers.
    causal = [r for r in records if r["causal"]]
    if causal:
        cells = [(r["label"], layer) for r in causal for layer in r["layers"]]
        passed = sum(layer["within_tolerance"] for _, layer in cells)
        worst_label, worst = max(cells, key=lambda c: abs(c[1]["relative_deviation_from_budget"]))
        out.append(f"Causal routers on held-out text: {passed} of {len(cells)} (routing, layer) cells are within "
                   f"{100 * args.budget_tolerance:g}% of the budget; the largest deviation is "
                   f"{100 * worst['relative_deviation_from_budget']:+.1f}% ({worst_label}, layer {worst['layer']}).")
        for fam in ("usmoe causal", "expert_choice causal"):
            rs = [r for r in causal if r["family"] == fam]
            if rs:
                bad = [f"{r['label']} layer {layer['layer']} ({100 * layer['relative_deviation_from_budget']:+.1f}%)"
                       for r in rs for layer in r["layers"] if not layer["within_tolerance"]]
                out.append(f"{fam}: " + ("every layer of every budget PASSES." if not bad else
                                         f"{len(bad)} layer(s) FAIL: " + ", ".join(bad) + "."))
    # Generation.
    exact = [r["label"] for r in records if r["generation"]["cached_vs_uncached"]["exact"]]
    differ = [(r["label"], r["generation"]["cached_vs_uncached"]["token_agreement"]) for r in records
              if not r["generation"]["cached_vs_uncached"]["exact"]]
    out.append(f"Generation with the KV cache equals recomputation exactly for {len(exact)} of {len(records)} routings"
               + (f"; it differs for {', '.join(f'{l} ({100 * a:.0f}% of tokens equal)' for l, a in differ)}." if differ
                  else "."))
    # Speed.
    fwd = timing.get("forward") or {}
    if fwd:
        threads = sorted(fwd, key=int)[0]
        summ = fwd[threads]["summary"]
        labelled = [r for r in records if r["label"] in summ]
        rho = spearman([r["experts_per_token"] for r in labelled], [summ[r["label"]]["time_ratio"]["median"] for r in labelled])
        others = [r for r in labelled if not r["native"]] or labelled
        fastest = min(others, key=lambda r: summ[r["label"]]["time_ratio"]["median"])
        slowest = max(others, key=lambda r: summ[r["label"]]["time_ratio"]["median"])
        aa = summ.get(AA_CONTROL, {}).get("time_ratio")
        text = (f"Forward time at {threads} thread(s), relative to native: fastest non-native {fastest['label']} "
                f"({summ[fastest['label']]['time_ratio']['median']:.2f}x), slowest {slowest['label']} "
                f"({summ[slowest['label']]['time_ratio']['median']:.2f}x)")
        if aa:
            text += f"; the A/A control (native vs an identical copy) reads {aa['median']:.2f}x [{aa['q25']:.2f}-{aa['q75']:.2f}]"
        if rho is not None:
            text += f"; Spearman rank correlation of forward time with measured experts/token: {rho:+.2f}"
        out.append(text + ".")
        cheaper = [r for r in labelled if not r["native"] and summ[r["label"]]["time_ratio"]["q75"] < 1.0]
        out.append(f"{len(cheaper)} of {len(labelled) - 1} non-native routings are faster than native in at least "
                   f"75% of the paired forward rounds at {threads} thread(s)"
                   + (f" ({', '.join(r['label'] for r in cheaper)})." if cheaper else "."))
    gen = timing.get("generate") or {}
    if gen:
        threads = sorted(gen, key=int)[0]
        summ = gen[threads]["summary"]
        labelled = [r for r in records if r["label"] in summ]
        best = max(labelled, key=lambda r: summ[r["label"]]["rate_ratio"]["median"])
        worst = min(labelled, key=lambda r: summ[r["label"]]["rate_ratio"]["median"])
        out.append(f"generate tokens/s relative to native at {threads} thread(s): from "
                   f"{summ[worst['label']]['rate_ratio']['median']:.2f}x ({worst['label']}) to "
                   f"{summ[best['label']]['rate_ratio']['median']:.2f}x ({best['label']}).")
    return out


# --- figures -----------------------------------------------------------------------------------

def _series(records: list[dict[str, Any]], family: str) -> list[dict[str, Any]]:
    return sorted([r for r in records if r["family"] == family and not r["native"]], key=lambda r: r["experts_per_token"])


def pareto_figure(records: list[dict[str, Any]], quality: str, path: Path, source: str, x_key: str = "experts_per_token",
                  timing_summary: dict[str, Any] | None = None, ax=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def xval(r):
        if x_key == "experts_per_token":
            return r["experts_per_token"]
        return timing_summary[r["label"]]["time_ratio"]["median"]

    def yval(r):
        return r["perplexity"] if quality == "perplexity" else 100 * r["mteb"]["mean"]

    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(10.5, 6.2))
    records = [r for r in records if x_key == "experts_per_token" or r["label"] in timing_summary]
    pts = [(r["label"], xval(r), yval(r)) for r in records]
    front = set(pareto(pts, lower_is_better=quality == "perplexity"))
    fr = sorted([p for p in pts if p[0] in front], key=lambda p: p[1])
    if len(fr) > 1:
        ax.step([p[1] for p in fr], [p[2] for p in fr], where="post", color="0.6", lw=4, alpha=0.45, zorder=1,
                label="Pareto front (all routers)")
    native = next((r for r in records if r["native"]), None)
    for fam in FAMILIES:
        rs = _series(records, fam)
        if not rs:
            continue
        color, marker, ls = FAMILY_STYLE[fam]
        rs = sorted(rs, key=xval)
        xs, ys = [xval(r) for r in rs], [yval(r) for r in rs]
        if x_key != "experts_per_token":
            errs = [[xval(r) - timing_summary[r["label"]]["time_ratio"]["q25"] for r in rs],
                    [timing_summary[r["label"]]["time_ratio"]["q75"] - xval(r) for r in rs]]
            ax.errorbar(xs, ys, xerr=errs, fmt="none", ecolor=color, alpha=0.6, zorder=2)
        ax.plot(xs, ys, color=color, marker=marker, ls=ls if x_key == "experts_per_token" else "none", lw=1.6, ms=7, zorder=3,
                label=f"{fam} ({', '.join(r['point'] if 'point' in r else '' for r in rs)})")
        offset = LABEL_OFFSET[fam]
        for r, x, y in zip(rs, xs, ys):
            ax.annotate(r.get("point", ""), (x, y), textcoords="offset points", xytext=offset, fontsize=7, color=color)
    if native is not None:
        ax.plot([xval(native)], [yval(native)], marker="*", color="black", ms=16, ls="none", zorder=4,
                label=(f"native topk k=4 ({xval(native):.2f} experts/token, {yval(native):.2f})"
                       if x_key == "experts_per_token" else "native topk k=4 (time ratio 1 by definition)"))
    if quality == "perplexity":
        from matplotlib.ticker import FixedLocator, FuncFormatter

        ax.set_yscale("log")
        ys_all = [p[2] for p in pts]
        lo, hi = min(ys_all) / 1.05, max(ys_all) * 1.08
        nice = [v * 10 ** e for e in range(0, 5) for v in (1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0, 8.0)]
        ticks = [v for v in nice if lo <= v <= hi]
        ax.set_ylim(lo, hi)
        ax.yaxis.set_major_locator(FixedLocator(ticks))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_locator(FixedLocator([]))
        ax.set_ylabel("perplexity on held-out WordNet text (log scale; lower is better)")
    else:
        ax.set_ylabel("WordNet MTEB mean main score x 100 (moee_sum; higher is better)")
    if x_key == "experts_per_token":
        ax.set_xlabel("measured experts per token (held-out WordNet, mean over the 4 MoE layers)")
    else:
        ax.set_xlabel(f"forward time relative to native (median of paired ratios; bars: 25th-75th pct)")
        ax.axvline(1.0, color="0.5", lw=0.8, ls="--")
    ax.grid(True, which="both", alpha=0.3)
    if own:
        what = "held-out perplexity" if quality == "perplexity" else "WordNet MTEB mean (moee_sum)"
        ax.set_title(f"{what} against measured experts/token, per router and budget\n"
                     f"demo model (OLMoE, 16 experts, native top-4)\n{source}", fontsize=9)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return path


def time_figure(records: list[dict[str, Any]], summary: dict[str, Any], threads: int, path: Path, has_mteb: bool) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = 2 if has_mteb else 1
    fig, axes = plt.subplots(1, n, figsize=(8.0 * n, 7.0), squeeze=False)
    pareto_figure(records, "perplexity", path, "", x_key="time", timing_summary=summary, ax=axes[0][0])
    axes[0][0].set_title("held-out perplexity vs forward time", fontsize=10)
    if has_mteb:
        pareto_figure(records, "mteb", path, "", x_key="time", timing_summary=summary, ax=axes[0][1])
        axes[0][1].set_title("WordNet MTEB mean vs forward time", fontsize=10)
    fig.suptitle(f"Quality against measured forward time ({threads} torch thread(s), no_grad forward on held-out "
                 f"blocks; ratio to native, same machine)", fontsize=10)
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.03 + 0.035 * -(-len(labels) // 3), 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- report ------------------------------------------------------------------------------------

def _ratio_cell(summary: dict[str, Any] | None, label: str, key: str = "time_ratio") -> str:
    if not summary or label not in summary:
        return "-"
    q = summary[label][key]
    return f"{q['median']:.2f}x [{q['q25']:.2f}-{q['q75']:.2f}]"


def markdown(results: dict[str, Any]) -> str:
    records = results["routings"]
    s = results["settings"]
    env = results["environment"]
    timing = results["timing"]
    fwd = timing.get("forward") or {}
    gen = timing.get("generate") or {}
    has_mteb = all("mteb" in r for r in records)
    L = ["# Dynamic compute on the demo model: quality against measured compute, per router and budget", ""]
    L += ["Issue 12's evidence, produced by `eval/dynamic_compute.py` (every number below is computed by that "
          "script; the findings are generated from the numbers).", ""]
    m = results.get("measured_by") or {}
    L += ["## Run", ""]
    if m and not results.get("measured_by_this_run", True):
        L += [f"- measured by: `{m['command']}`, finished {m.get('finished_utc')}, wall time "
              f"{fmt_duration(m['wall_seconds']) if m.get('wall_seconds') is not None else '?'} "
              f"({m.get('routings_from_cache', '?')} routings and {m.get('timing_from_cache', '?')} timing tables read "
              "back from the cache)",
              f"- this report written by: `{results['command']}` ({fmt_duration(results['wall_seconds'])}; every number "
              "read back from the cache of the run above)"]
    else:
        L += [f"- command: `{results['command']}`",
              f"- finished: {results['finished_utc']}; wall time: {fmt_duration(results['wall_seconds'])}"
              f" ({results['routings_from_cache']} of {len(records)} routings and "
              f"{results['timing_from_cache']} of {results['timing_tables']} timing tables read back from this "
              "folder's cache)"]
    L += [f"- time spent measuring the routings (as recorded per routing): {fmt_duration(results['routing_seconds_total'])}; "
          "timing tables: " + ", ".join(f"{kind} at {t} thr. {fmt_duration(x['seconds'])}"
                                        for kind in ("forward", "generate") for t, x in sorted(timing.get(kind, {}).items()))
          + " (load average over 1 min before/after each: "
          + ", ".join(f"{x.get('load_average_1min_before', 0):.2f}/{x.get('load_average_1min_after', 0):.2f}"
                      for kind in ("forward", "generate") for t, x in sorted(timing.get(kind, {}).items())) + ")",
          f"- machine: {env['cpu']}, {env['cpu_count']} CPU cores, GPU: {'yes' if env['gpu'] else 'none'}; {env['platform']}",
          f"- versions: python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, "
          f"mteb {env.get('mteb', '-')}, hf_moe_patch {env['hf_moe_patch']} (git {str(env.get('git_commit'))[:12]}"
          f"{', with uncommitted changes under hf_moe_patch/' if env.get('hf_moe_patch_uncommitted_changes') else ''})",
          f"- seeds: {s['seed']} (calibration sample: random.Random({s['seed']}); generation prompts: "
          f"random.Random({s['seed'] + 1}); timing order: random.Random(seed + threads [+100 for generate]); "
          f"torch.manual_seed({s['seed']}) before each routing)",
          f"- model: {s['model']} (float32), {s['model_description']}",
          f"- held-out text: {s['eval_blocks']} blocks x {s['block_size']} tokens = {s['eval_tokens']} tokens of "
          f"WordNet held-out documents (the demo report's validation blocks; perplexity counts "
          f"{s['eval_blocks'] * (s['block_size'] - 1)} next-token predictions)",
          f"- calibration of causal routers: {s['calibration_docs']} WordNet **train** documents (seeded sample), "
          + ("each tokenized alone (`patch(..., calibration=texts, tokenizer=tok)`)"
             if s.get("calibration_format", "documents") == "documents"
             else f"packed into blocks of {s['block_size']} tokens like the held-out text"),
          f"- MTEB: {', '.join(s['tasks'])} (moee_sum, prompteol, split heldout"
          f"{', sizes ' + json.dumps(s['task_sizes']) if s['task_sizes'] else ''}); mean of the tasks' main scores",
          f"- forward timing: {s['timing_blocks']} blocks x {s['block_size']} tokens, no_grad, {s['timing_rounds']} "
          f"interleaved rounds after {s['timing_warmup']} warm-up call(s), threads {s['threads']}",
          f"- generation: {s['gen_prompts']} left-padded held-out prompts, greedy, max_new_tokens={s['max_new_tokens']} "
          f"(min_new_tokens the same, so every routing decodes the same number of tokens), KV cache; "
          f"{s['gen_rounds']} interleaved timing rounds at threads {s['gen_threads']}; agreement against "
          f"`use_cache=False` recomputation", ""]
    tag_fixes = [r["label"] for r in records if "routing_tag" in r.get("mteb", {}).get("workarounds", [])]
    check_fixes = [r["label"] for r in records if "per_expert_threshold_check" in r.get("mteb", {}).get("workarounds", [])]
    if tag_fixes or check_fixes:
        L += ["Work-arounds inside this script for hf_moe_patch issues found while writing it (they change no number; "
              "they only let the MTEB runs happen, and each does nothing once the package no longer needs it):", ""]
        if tag_fixes:
            L.append(f"- (a) for {', '.join(tag_fixes)}: `hf_moe_patch.embeddings.moee.routing_tag` gave an mteb model name "
                     f"over {MAX_TAG} characters (a causal router's thresholds and calibration_info in full, a folder name "
                     "longer than the file system allows: `OSError: File name too long`); it was shortened to the "
                     "method, its short options and a hash of the thresholds (the mteb revision still hashes the full "
                     "routing).")
        if check_fixes:
            L.append(f"- ({'b' if tag_fixes else 'a'}) for {', '.join(check_fixes)}: "
                     "`hf_moe_patch.validation.parse_routings` (called by `evaluate_routings`) refuses every list of "
                     "per-expert thresholds, because its model-free check compares each row's length with a symbolic "
                     "2**62 experts; for these routings the model-free check was made against the demo model's own "
                     "N=16, k=4 (evaluate_routings then checks the routing against the model, as always).")
        L.append("")
    L += ["## Findings", ""] + [f"- {f}" for f in results["findings"]] + [""]
    L += ["Caveat computed into no number above: the non-causal routers (usmoe and expert_choice without causal) choose a "
          "token's experts with the whole 128-token block in view (a per-sequence budget), so their perplexity uses "
          "look-ahead that a causal LM cannot have at generation time; the causal routers, top_p and topk do not.", ""]
    # Main table.
    t1 = sorted(fwd, key=int)
    g1 = sorted(gen, key=int)
    head = ["routing", "budget", "experts/token (held-out)", "perplexity", "MTEB mean x100" if has_mteb else None]
    head += [f"forward time vs native ({t} thr.)" for t in t1]
    head += [f"generate tokens/s vs native ({t} thr.)" for t in g1]
    head += ["cached = uncached tokens", "cached = uncached (all sequences)"]
    head = [h for h in head if h is not None]
    L += ["## Results", "", "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in records:
        g = r["generation"]["cached_vs_uncached"]
        cells = [r["label"].replace("|", "\\|"), "-" if r["budget"] is None else _num(r["budget"]),
                 f"{r['experts_per_token']:.3f}", f"{r['perplexity']:.2f}"]
        if has_mteb:
            cells.append(f"{100 * r['mteb']['mean']:.2f}")
        cells += [_ratio_cell(fwd[t]["summary"], r["label"]) for t in t1]
        cells += [_ratio_cell(gen[t]["summary"], r["label"], "rate_ratio") for t in g1]
        cells += [f"{100 * g['token_agreement']:.1f}%", "yes" if g["exact"] else "**no**"]
        L.append("| " + " | ".join(cells) + " |")
    for t in t1:
        cells = [AA_CONTROL + " (noise control)", "4", "-", "-"] + (["-"] if has_mteb else [])
        cells += [_ratio_cell(fwd[x]["summary"], AA_CONTROL) for x in t1]
        cells += [_ratio_cell(gen[x]["summary"], AA_CONTROL, "rate_ratio") for x in g1]
        cells += ["-", "-"]
        L.append("| " + " | ".join(cells) + " |")
        break
    L += ["", "Ratios: median over rounds of the paired ratio (routing / native in the same round) [25th-75th "
          "percentile]. Forward time: lower is faster; generate tokens/s: higher is faster. Absolute medians (this "
          f"machine only: {env['cpu']}): "
          + "; ".join(f"native forward at {t} thr. {1000 * fwd[t]['summary'][NATIVE]['median_seconds']:.1f} ms" for t in t1)
          + ("; " if t1 and g1 else "")
          + "; ".join(f"native generate at {t} thr. {gen[t]['summary'][NATIVE]['median_generated_tokens_per_second']:.0f} "
                      f"tokens/s" for t in g1) + ".", ""]
    if has_mteb:
        tasks = s["tasks"]
        L += ["## MTEB per task (main score x 100)", "",
              "| routing | " + " | ".join(f"{t} ({records[0]['mteb']['metrics'].get(t, '')})" for t in tasks)
              + " | mean | experts/token on the MTEB texts |", "|---|" + "---:|" * (len(tasks) + 2)]
        for r in records:
            m = r["mteb"]
            ept = m.get("experts_per_token_on_mteb_texts")
            L.append(f"| {r['label']} | " + " | ".join(f"{100 * m['scores'][t]:.2f}" for t in tasks)
                     + f" | {100 * m['mean']:.2f} | {'-' if ept is None else f'{ept:.3f}'} |")
        L.append("")
    # Per layer.
    layers = [layer["layer"] for layer in records[0]["layers"]]
    L += ["## Measured experts/token per MoE layer (held-out blocks)", "",
          "| routing | budget | " + " | ".join(f"layer {x}" for x in layers) + " | mean |",
          "|---|---:|" + "---:|" * (len(layers) + 1)]
    for r in records:
        L.append(f"| {r['label']} | {'-' if r['budget'] is None else _num(r['budget'])} | "
                 + " | ".join(f"{layer['experts_per_token_mean']:.3f}" for layer in r["layers"])
                 + f" | {r['experts_per_token']:.3f} |")
    L.append("")
    causal = [r for r in records if r["causal"]]
    if causal:
        tol = 100 * s["budget_tolerance"]
        L += [f"## Budget adherence of the causal routers (held-out blocks; PASS: within {tol:g}% of the budget)", "",
              "| routing | budget | " + " | ".join(f"layer {x}" for x in layers) + " | mean | thresholds (per layer) |",
              "|---|---:|" + "---:|" * (len(layers) + 1) + "---|"]
        for r in causal:
            cells = [f"{layer['experts_per_token_mean']:.3f} ({100 * layer['relative_deviation_from_budget']:+.1f}%, "
                     f"{'PASS' if layer['within_tolerance'] else '**FAIL**'})" for layer in r["layers"]]
            dev = (r["experts_per_token"] - r["budget"]) / r["budget"]
            th = r["thresholds"]
            th_text = (", ".join(f"{t:.4f}" for t in th) if th and not isinstance(th[0], list)
                       else f"{len(th)} layers x {len(th[0])} per-expert thresholds (results.json)")
            L.append(f"| {r['label']} | {_num(r['budget'])} | " + " | ".join(cells)
                     + f" | {r['experts_per_token']:.3f} ({100 * dev:+.1f}%) | {th_text} |")
        info = causal[0]["calibration_info"]
        L += ["", f"Calibrated on {info.get('tokens', '?')} tokens in {info.get('sequences', '?')} sequences "
              f"({'one per train document' if s.get('calibration_format', 'documents') == 'documents' else 'packed blocks of train documents'}) "
              f"(fingerprint {info.get('fingerprint', '?')}); each routing's calibration_info is in results.json.", ""]
    # Generation detail.
    L += ["## Generation: KV cache against recomputation", "",
          "| routing | tokens equal | sequences equal | first divergence per sequence | equal to native's tokens |",
          "|---|---:|---:|---|---:|"]
    for r in records:
        g = r["generation"]["cached_vs_uncached"]
        nat = r["generation"].get("cached_vs_native")
        L.append(f"| {r['label']} | {100 * g['token_agreement']:.1f}% | {sum(g['sequences_exact'])}/{len(g['sequences_exact'])} "
                 f"| {', '.join('-' if d is None else str(d) for d in g['first_divergence'])} | "
                 f"{'-' if nat is None else format(100 * nat['token_agreement'], '.1f') + '%'} |")
    L += ["", "Prompts: " + "; ".join(f"`{p}`" for p in s["prompts"]) + ".", ""]
    L += ["## Figures", "", "- `pareto_perplexity.png`: held-out perplexity against measured experts/token",
          "- `pareto_mteb.png`: WordNet MTEB mean against measured experts/token" if has_mteb else "",
          "- `pareto_time.png`: both against the measured forward-time ratio" if fwd else "", "",
          "![perplexity](pareto_perplexity.png)", ""]
    if has_mteb:
        L += ["![mteb](pareto_mteb.png)", ""]
    if fwd:
        L += ["![time](pareto_time.png)", ""]
    L += ["## Files", "", "- `results.json`: every number above, per-layer statistics, thresholds, generated tokens, "
          "raw timing rounds", "- `routings/*.json`: the per-routing cache (reused by a rerun unless --overwrite)",
          "- `timing/*.json`: the timing cache (raw seconds per round)", "- `mteb_cache/`: mteb's result cache", ""]
    return "\n".join(x for x in L if x is not None) + "\n"


# --- main --------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = resolve(build_parser().parse_args(argv))
    setup_run(args.log_level)
    started = time.perf_counter()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_moe_patch as hmp
    from hf_moe_patch.cli.common import quiet_bars
    from hf_moe_patch.cli.evaluate import LOCAL_TASKS

    if tuple(LOCAL_TASKS) != DEMO_TASKS:
        log.warning("make demo's tasks (%s) differ from this script's default (%s)", LOCAL_TASKS, DEMO_TASKS)
    quiet_bars(datasets=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    routings = select_routings(args)
    methods = set(hmp.supported_methods())
    missing = sorted({r.method for r in routings} - methods)
    if missing:
        raise SystemExit(f"routing method(s) {missing} are not in this hf_moe_patch yet (it has {sorted(methods)})")

    model_dir = Path(hmp.demo_model_path())
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    for r in routings:  # every option checked before any work
        if not r.calibrate:
            hmp.check_routing(model, r.method, **r.options)
    data = load_data(args, tokenizer, model_dir)
    cfg = model.config
    settings = {
        "seed": args.seed, "model": str(model_dir.relative_to(ROOT) if model_dir.is_relative_to(ROOT) else model_dir),
        "model_description": f"{cfg.model_type}, {cfg.num_hidden_layers} layers, {cfg.num_experts} experts, native "
                             f"top-{cfg.num_experts_per_tok}, vocabulary {cfg.vocab_size}, "
                             f"{sum(p.numel() for p in model.parameters()):,} parameters",
        "eval_blocks": int(data.eval_blocks.shape[0]), "block_size": data.block_size,
        "eval_tokens": int(data.eval_blocks.numel()), "ppl_batch_size": args.ppl_batch_size,
        "calibration_docs": len(data.calibration_texts), "calibration_format": args.calibration_format,
        "budget_tolerance": args.budget_tolerance,
        "tasks": list(args.tasks), "task_sizes": args.task_sizes, "mteb": not args.no_mteb,
        "mteb_batch_size": args.mteb_batch_size, "timing_blocks": args.timing_blocks, "timing_rounds": args.timing_rounds,
        "timing_warmup": args.timing_warmup, "threads": args.threads, "gen_threads": args.gen_threads,
        "gen_prompts": args.gen_prompts, "max_new_tokens": args.max_new_tokens, "gen_rounds": args.gen_rounds,
        "prompts": data.prompts, "quick": args.quick,
    }
    # Whatever changes a routing's own measurements: a cached routing is reused only when it matches.
    measure_keys = ("seed", "eval_blocks", "block_size", "ppl_batch_size", "calibration_docs", "budget_tolerance",
                    "tasks", "task_sizes", "mteb", "mteb_batch_size", "max_new_tokens", "prompts")
    env = machine_info()
    measure_settings = {**{k: settings[k] for k in measure_keys}, "torch": env["torch"],
                        "transformers": env["transformers"], "hf_moe_patch": env["hf_moe_patch"]}
    measure_settings["calibration_format"] = args.calibration_format
    if not args.no_mteb:
        measure_settings["task_build"] = settings["task_build"] = task_build(args.wordnet)
    skey = key_of(measure_settings)
    log.info("%d routings on %s (%d held-out blocks x %d tokens; MTEB %s; timing %s) -> %s", len(routings),
             settings["model"], settings["eval_blocks"], data.block_size,
             "off" if args.no_mteb else f"{len(args.tasks)} task(s)", "off" if args.no_timing else f"threads {args.threads}", out)

    # Phase 1: per routing (resumable).
    records: dict[str, dict[str, Any]] = {}
    from_cache, computed = 0, []
    native_generation = None
    for i, r in enumerate(routings, 1):
        path = out / "routings" / f"{slug(r.label)}.json"
        saved = None if args.overwrite else read_json(path)
        elapsed = time.perf_counter() - started
        if saved is not None and saved.get("settings_key") == skey:
            rec, how = saved, "from the cache"
            from_cache += 1
        else:
            if saved is not None:
                log.info("%s: cached result was measured with other settings; measuring again", r.label)
            eta = (f"ETA {fmt_duration(statistics.mean(computed) * (len(routings) - i + 1))}" if computed
                   else "ETA after the first routing")
            log.info("[%d/%d] %s: measuring (elapsed %s, %s)", i, len(routings), r.label, fmt_duration(elapsed), eta)
            rec = measure_routing(r, model, tokenizer, data, args, out, native_generation)
            rec["settings_key"] = skey
            write_json(path, rec)
            computed.append(rec["seconds"])
            how = f"measured in {fmt_duration(rec['seconds'])}"
        rec["point"] = r.point
        if r.native:
            native_generation = rec["generation"]["cached_tokens"]
        records[r.label] = rec
        g = rec["generation"]["cached_vs_uncached"]
        log.info("[%d/%d] %s: experts/token %.3f, perplexity %.2f%s, cached=uncached %s (%s)", i, len(routings), r.label,
                 rec["experts_per_token"], rec["perplexity"],
                 f", MTEB mean {100 * rec['mteb']['mean']:.2f}" if "mteb" in rec else "",
                 "yes" if g["exact"] else f"no ({100 * g['token_agreement']:.0f}% of tokens)", how)
    # Cached-vs-native agreement of routings read back before the native one was measured.
    for r in routings:
        rec = records[r.label]
        if "cached_vs_native" not in rec["generation"] and native_generation is not None:
            rec["generation"]["cached_vs_native"] = agreement(torch.tensor(rec["generation"]["cached_tokens"]),
                                                              torch.tensor(native_generation))

    # Records measured before this script recorded its work-arounds: infer them (see infer_workarounds).
    for r in routings:
        infer_workarounds(r, records[r.label], out)

    # Phase 2: timing, interleaved over all routings (resumable per table).
    timing: dict[str, dict[str, Any]] = {"forward": {}, "generate": {}}
    timing_from_cache, timing_tables = 0, 0
    if not args.no_timing:
        for kind, threads_list in (("forward", args.threads), ("generate", args.gen_threads)):
            for threads in threads_list:
                result = run_timing(kind, threads, model, routings, records, data, tokenizer, args, out)
                timing_tables += 1
                timing_from_cache += bool(result.get("from_cache"))
                timing[kind][str(threads)] = result

    # Phase 3: results, figures, report.
    ordered = [records[r.label] for r in routings]
    for rec in ordered:
        rec.pop("settings_key", None)
    results = {
        "issue": 12, "command": "python " + SCRIPT + (" " + shlex.join(argv) if argv else ""),
        "finished_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "wall_seconds": time.perf_counter() - started, "routings_from_cache": from_cache,
        "routing_seconds_total": sum(r.get("seconds", 0.0) for r in ordered),
        "timing_from_cache": int(timing_from_cache), "timing_tables": timing_tables,
        "environment": env, "settings": settings, "routings": ordered, "timing": timing,
        "demo_training_report": {k: data.report.get(k) for k in ("validation_perplexity", "validation_perplexity_fp32",
                                                                   "validation_tokens")},
    }
    # The run that measured these numbers: this one, unless everything came from the cache (then the
    # one recorded in the previous results.json, whose numbers these are).
    previous = read_json(out / "results.json") or {}
    this_run = {"command": results["command"], "finished_utc": results["finished_utc"], "wall_seconds": None,
                "routings_from_cache": from_cache, "timing_from_cache": int(timing_from_cache)}
    everything_cached = from_cache == len(routings) and timing_from_cache == timing_tables
    if everything_cached and previous:
        results["measured_by"] = previous.get("measured_by") or {
            k: previous.get(k) for k in ("command", "finished_utc", "wall_seconds", "routings_from_cache", "timing_from_cache")}
    else:
        results["measured_by"] = this_run
    results["measured_by_this_run"] = results["measured_by"] is this_run
    results["findings"] = findings(ordered, timing, args)
    source = f"{settings['eval_blocks']} held-out WordNet blocks x {data.block_size} tokens"
    pareto_figure(ordered, "perplexity", out / "pareto_perplexity.png", f"perplexity and experts/token over {source}")
    if not args.no_mteb:
        pareto_figure(ordered, "mteb", out / "pareto_mteb.png",
                      f"MTEB: mean of {len(args.tasks)} local WordNet task(s) (make demo's); experts/token over {source}")
    if timing["forward"]:
        t = sorted(timing["forward"], key=int)[0]
        time_figure(ordered, timing["forward"][t]["summary"], int(t), out / "pareto_time.png", not args.no_mteb)
    results["wall_seconds"] = time.perf_counter() - started
    if results["measured_by"] is this_run:
        this_run["wall_seconds"] = results["wall_seconds"]
    write_json(out / "results.json", results)
    (out / "README.md").write_text(markdown(results))
    log.info("done in %s: %s", fmt_duration(results["wall_seconds"]), ", ".join(
        str(out / n) for n in ("results.json", "README.md", "pareto_perplexity.png", "pareto_mteb.png", "pareto_time.png")
        if (out / n).exists()))
    for f in results["findings"]:
        log.info("finding: %s", f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
