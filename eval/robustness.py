#!/usr/bin/env python
"""Experiment 3: robustness of each router to corrupted text, training-free and after training.

For each router and each corruption of the input text (:class:`hf_moe_patch.data.corruption.
Corruption`: ``junk`` inserts junk tokens after words, ``char`` edits characters; at rates 0,
0.1, 0.2 by default, rate 0 being the clean text shared by both kinds, each corrupted setting
drawn with three noise seeds):

1. **training-free, on the shipped demo model** (OLMoE architecture, 16 experts, native top-4,
   pretrained on WordNet with the native router): held-out perplexity and the WordNet MTEB mean
   (the five local tasks of ``make demo``, MoEE ``moee_sum`` embedding, every task text corrupted
   through ``evaluate_routings(corruption=...)``);
2. **after training** (``--models DIR [DIR ...]``, by default experiment 1's checkpoints
   ``eval/results/pretrain/models/topk_aux_seed*/`` when they exist): held-out perplexity under
   corruption per router for each checkpoint, reported as mean +- std over the checkpoints
   (``--models-mteb`` adds the MTEB mean).

Routers: the native router (``topk`` without ``top_k``: the model's own, bit-for-bit), ``usmoe``
at the native budget (k experts per token on average), ``expert_choice`` (native capacity) and
``ssr`` with the Sinkhorn plan applied at inference (``inference=sinkhorn``).

Held-out perplexity: the demo's held-out WordNet documents (never trained on) that fill the first
``--eval-blocks`` blocks of ``block_size`` tokens when clean, as in ``eval/dynamic_compute.py``;
under corruption the *same documents* are corrupted, then packed into blocks (corruption adds
tokens, so there are somewhat more blocks), and perplexity counts every next token, the
corrupted ones included. It therefore mixes two effects: how well the model still predicts the
clean words, and how badly it predicts the noise (the same noise for every router, so the routers
compare fairly at one corruption setting).

The corruption of a text depends only on (kind, seed, text), so every router sees the same
corrupted texts. ``--corruption-seeds`` (default 0 1 2) repeats each corrupted cell with other
noise draws: the error bars of the training-free figure, and the seeds of its claims ("router X
degrades less than native", judged by ``_common.verdict`` on the paired differences).

Resumable cell by cell: every (model, router, corruption) cell is cached as
``cells/<model>/<router>/<corruption>.json`` in --out and reused by a rerun unless a setting that
changes it differs (or --overwrite); mteb's own result cache lives in ``<out>/mteb_cache``.

Outputs in --out: results.json, README.md, robustness_training_free.png,
robustness_trained.png (when checkpoints were evaluated).

Example:
    python eval/robustness.py                          # the full run (~18 min on 2 quiet CPU cores)
    python eval/robustness.py --quick --out /tmp/rb    # smoke run (< 30 s)
    python eval/robustness.py --models eval/results/pretrain/models/topk_aux_seed*
"""

from __future__ import annotations

import argparse
import logging
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))  # eval/_common.py, also when loaded by path
from _common import (ROOT, apply_defaults, fmt_duration, key_of, machine_info, mean_std, read_json,  # noqa: E402
                     setup_run, slug, task_build, verdict, write_json)
DEFAULT_OUT = ROOT / "eval" / "results" / "robustness"
DEFAULT_MODELS_GLOB = "eval/results/pretrain/models/topk_aux_seed*"
SCRIPT = "eval/robustness.py"
DEMO = "demo"

log = logging.getLogger("robustness")

DEMO_TASKS = ("WordNetLexnameClassification", "WordNetSameLemmaPairClassification", "WordNetWuPalmerSTS",
              "WordNetExampleRetrieval", "WordNetLexnameClustering")
KINDS = ("junk", "char")
NATIVE = "native"
ROUTER_KEYS = ("native", "usmoe", "expert_choice", "ssr_sinkhorn")
ROUTER_STYLE = {"native": ("#1f77b4", "o", "-"), "usmoe": ("#ff7f0e", "s", "--"),
                "expert_choice": ("#2ca02c", "^", "-."), "ssr_sinkhorn": ("#9467bd", "D", ":")}

# Defaults of the full run and of --quick; a flag given on the command line wins over both.
FULL = dict(routers=list(ROUTER_KEYS), rates=[0.1, 0.2], kinds=list(KINDS), eval_blocks=128,
            tasks=list(DEMO_TASKS), task_sizes=None, corruption_seeds=[0, 1, 2])
QUICK = dict(routers=["native", "usmoe"], rates=[0.2], kinds=list(KINDS), eval_blocks=8, tasks=["WordNetWuPalmerSTS"],
             task_sizes={"WordNetWuPalmerSTS": {"n_pairs": 100}}, corruption_seeds=[0])


@dataclass(frozen=True)
class Router:
    key: str
    label: str
    method: str
    options: dict


def make_router(key: str, native_k: int) -> Router:
    if key == "native":
        return Router(key, f"native top-{native_k}", "topk", {})
    if key == "usmoe":
        return Router(key, f"usmoe (budget {native_k})", "usmoe", {"top_k": native_k})
    if key == "expert_choice":
        return Router(key, "expert_choice", "expert_choice", {})
    if key == "ssr_sinkhorn":
        return Router(key, "ssr (Sinkhorn at inference)", "ssr", {"inference": "sinkhorn"})
    raise ValueError(key)


@dataclass(frozen=True)
class Cell:
    kind: str  # "clean" or a corruption kind
    rate: float
    seed: int

    @property
    def tag(self) -> str:
        return "clean" if self.kind == "clean" else f"{self.kind}{self.rate:g}s{self.seed}"

    def corruption(self):
        from hf_moe_patch.data.corruption import Corruption

        return None if self.kind == "clean" else Corruption(self.kind, self.rate, self.seed)


# --- command line ------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=SCRIPT, formatter_class=argparse.RawDescriptionHelpFormatter,
                                description=__doc__.split("\n\nExample:")[0])
    p.add_argument("--out", default=str(DEFAULT_OUT),
                   help="output folder: results.json, README.md, PNGs, cells/, mteb_cache/ (default: eval/results/robustness)")
    p.add_argument("--overwrite", action="store_true", help="recompute every cell, ignoring the cache")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: native and usmoe, clean + junk/char at 0.2, 8 held-out blocks, WordNetWuPalmerSTS "
                        "with 100 pairs; checkpoints only when --models is given")
    p.add_argument("--seed", type=int, default=0, help="torch seed set before every cell (default: %(default)s)")
    p.add_argument("--routers", nargs="+", choices=ROUTER_KEYS, metavar="ROUTER",
                   help=f"routers ({', '.join(ROUTER_KEYS)}; default: all; quick: native usmoe); native is always included")
    p.add_argument("--kinds", nargs="+", choices=KINDS, help="corruption kinds (default: junk char)")
    p.add_argument("--rates", nargs="+", type=float, metavar="RATE",
                   help="corruption rates in (0, 1]; rate 0 (clean) is always included (default: 0.1 0.2; quick: 0.2)")
    p.add_argument("--corruption-seeds", nargs="+", type=int, metavar="SEED",
                   help="noise draws of each corrupted cell (default: 0 1 2; quick: 0): error bars and the claims' seeds")
    p.add_argument("--eval-blocks", type=int,
                   help="held-out blocks (clean) for perplexity (default: 128 of the demo's block size 128; quick: 8)")
    p.add_argument("--ppl-batch-size", type=int, default=32, help="blocks per forward for perplexity (default: %(default)s)")
    p.add_argument("--tasks", nargs="+", metavar="TASK",
                   help=f"local WordNet MTEB tasks (default: {', '.join(DEMO_TASKS)}; quick: WordNetWuPalmerSTS, 100 pairs)")
    p.add_argument("--mteb-batch-size", type=int, default=32, help="texts per forward in the MTEB encoder (default: %(default)s)")
    p.add_argument("--no-mteb", action="store_true", help="skip MTEB (perplexity only)")
    p.add_argument("--no-demo", action="store_true", help="skip the training-free part on the demo model")
    p.add_argument("--models", nargs="+", metavar="DIR",
                   help=f"trained checkpoints (transformers folders) for the after-training part (default: "
                        f"{DEFAULT_MODELS_GLOB} when they exist; quick: none)")
    p.add_argument("--checkpoint-block-size", type=int,
                   help="block size of the checkpoints' held-out perplexity (default: the checkpoint's training_report.json, "
                        "else the demo's, 128, which experiment 1 also trains with)")
    p.add_argument("--models-mteb", action="store_true", help="also evaluate MTEB on the checkpoints")
    p.add_argument("--wordnet", help="folder of WordNet's data.* files (default: $HF_MOE_PATCH_WORDNET or /usr/share/wordnet)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default: %(default)s: on CPU cores shared with other jobs, 2 threads were up to "
                        "4x slower than 1 here; the numbers do not depend on it beyond float rounding)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"], help="(default: %(default)s)")
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    apply_defaults(args, QUICK if args.quick else FULL)
    if NATIVE not in args.routers:
        args.routers = [NATIVE, *args.routers]
    args.routers = [r for r in ROUTER_KEYS if r in args.routers]
    bad = [r for r in args.rates if not 0.0 < r <= 1.0]
    if bad:
        raise SystemExit(f"--rates {bad} are not valid; numbers in (0, 1] (rate 0, the clean text, is always included)")
    args.rates = sorted(set(args.rates))
    if args.threads < 1:
        raise SystemExit(f"--threads={args.threads} is not valid; an integer >= 1")
    if args.eval_blocks < 1 or args.ppl_batch_size < 1 or args.mteb_batch_size < 1:
        raise SystemExit("--eval-blocks, --ppl-batch-size and --mteb-batch-size take integers >= 1")
    unknown = [t for t in args.tasks if t not in DEMO_TASKS]
    if unknown:
        raise SystemExit(f"--tasks: unknown task(s) {unknown}; the local WordNet tasks are {', '.join(DEMO_TASKS)}")
    if args.models is None:
        args.models = [] if args.quick else sorted(str(p) for p in ROOT.glob(DEFAULT_MODELS_GLOB) if p.is_dir())
        args.models_defaulted = True
    else:
        args.models_defaulted = False
        missing = [m for m in args.models if not (Path(m) / "config.json").is_file()]
        if missing:
            raise SystemExit(f"--models: not a transformers checkpoint (no config.json): {missing}")
    return args


def cells(args: argparse.Namespace) -> list[Cell]:
    out = [Cell("clean", 0.0, 0)]
    out += [Cell(k, r, s) for k in args.kinds for r in args.rates for s in args.corruption_seeds]
    return out


# --- helpers -----------------------------------------------------------------------------------

def fingerprint(model_dir: Path) -> str:
    """Names, sizes and modification times of the checkpoint's files: a changed checkpoint is measured again."""
    parts = [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in sorted(model_dir.iterdir()) if p.is_file()]
    return key_of(parts)


# --- data and measurement ----------------------------------------------------------------------

def heldout_documents(tokenizer, block_size: int, n_blocks: int, wordnet: str | None) -> list[str]:
    """The held-out documents whose clean packing fills the first ``n_blocks`` blocks (the last
    one possibly only in part), in file order, as ``pack`` lays them out."""
    from hf_moe_patch.data.wordnet import load_wordnet
    from hf_moe_patch.training.demo_model import corpus

    docs = corpus(load_wordnet(wordnet), "heldout")
    need, total, out = n_blocks * block_size, 0, []
    for start in range(0, len(docs), 256):
        chunk = docs[start:start + 256]
        for doc, ids in zip(chunk, tokenizer(chunk)["input_ids"]):
            out.append(doc)
            total += len(ids) + 1  # + EOS, as pack() adds
            if total >= need:
                return out
    return out


def measure_perplexity(model, tokenizer, docs: list[str], cell: Cell, block_size: int, batch_size: int) -> dict[str, Any]:
    from hf_moe_patch.training.demo_model import pack, perplexity

    corruption = cell.corruption()
    texts = docs if corruption is None else corruption.apply(docs)
    blocks = pack(texts, tokenizer, block_size)
    return {"perplexity": perplexity(model, blocks, batch_size=batch_size), "blocks": int(blocks.shape[0]),
            "tokens": int(blocks.numel())}


def measure_cell(model, tokenizer, model_name: str, router: Router, cell: Cell, docs: list[str], block_size: int,
                 args: argparse.Namespace, out: Path, with_mteb: bool) -> dict[str, Any]:
    import torch

    import hf_moe_patch as hmp
    from hf_moe_patch.embeddings.evaluation import evaluate_routings
    from hf_moe_patch.report import RoutingCase

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    record: dict[str, Any] = {"model": model_name, "router": router.key, "router_label": router.label,
                              "method": router.method, "options": router.options, "corruption": cell.tag,
                              "kind": cell.kind, "rate": cell.rate, "corruption_seed": cell.seed}
    with hmp.patched(model, router.method, **router.options), hmp.collect_stats(model) as stats:
        record.update(measure_perplexity(model, tokenizer, docs, cell, block_size, args.ppl_batch_size))
    summary = stats.summary()
    record["experts_per_token"] = summary["experts_per_token_mean"]
    record["maxvio"] = summary.get("maxvio")
    record["perplexity_seconds"] = time.perf_counter() - t0
    if with_mteb:
        t1 = time.perf_counter()
        report = evaluate_routings(
            model, tokenizer, [RoutingCase(router.label, router.method, dict(router.options))], list(args.tasks),
            embedding="moee_sum", batch_size=args.mteb_batch_size, corruption=cell.corruption(),
            cache_dir=out / "mteb_cache", out_dir=None, overwrite=args.overwrite, progress=False,
            wordnet_kwargs={"path": args.wordnet, "split": "heldout", "sizes": args.task_sizes})
        run = report.runs[0]
        record["mteb"] = {"mean": report.mean(run), "scores": run.scores, "metrics": run.metrics,
                          "experts_per_token_on_mteb_texts": run.stats.get("experts_per_token_mean"),
                          "from_mteb_cache": run.cached, "seconds": time.perf_counter() - t1}
    record["seconds"] = time.perf_counter() - t0
    return record


def load_checkpoint(path: Path, demo_dir: Path, block_size: int | None = None):
    """A checkpoint in float32 and its tokenizer (its own, else the demo's); its block size (its
    training_report.json's, else the demo's)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    has_tokenizer = any((path / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(path if has_tokenizer else demo_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    report = read_json(path / "training_report.json") or read_json(demo_dir / "training_report.json") or {}
    block_size = block_size or int((report.get("args") or {}).get("block_size") or 128)
    return model, tokenizer, block_size


def run_model(name: str, model, tokenizer, block_size: int, fp: str, routers: list[Router], grid: list[Cell],
              args: argparse.Namespace, out: Path, with_mteb: bool, env: dict[str, Any], progress: dict[str, Any]) -> list[dict]:
    import hf_moe_patch as hmp

    for r in routers:  # every option checked against this model before any work
        hmp.check_routing(model, r.method, **r.options)
    docs = heldout_documents(tokenizer, block_size, args.eval_blocks, args.wordnet)
    settings = {"model": name, "fingerprint": fp, "eval_blocks": args.eval_blocks, "block_size": block_size,
                "task_build": task_build(args.wordnet) if with_mteb else None,
                "ppl_batch_size": args.ppl_batch_size, "docs": len(docs), "seed": args.seed, "mteb": with_mteb,
                "tasks": list(args.tasks) if with_mteb else None, "task_sizes": args.task_sizes if with_mteb else None,
                "mteb_batch_size": args.mteb_batch_size if with_mteb else None, "torch": env["torch"],
                "transformers": env["transformers"], "hf_moe_patch": env["hf_moe_patch"]}
    records = []
    for r in routers:
        for cell in grid:
            path = out / "cells" / slug(name) / r.key / f"{cell.tag}.json"
            ckey = key_of({**settings, "router": [r.method, r.options], "cell": cell.tag})
            saved = None if args.overwrite else read_json(path)
            progress["done"] += 1
            if saved is not None and saved.get("settings_key") == ckey:
                saved["from_cache"] = True
                records.append(saved)
                progress["cached"] += 1
                continue
            computed = progress["computed"]
            left = progress["total"] - progress["done"] + 1
            eta = f", ETA {fmt_duration(statistics.fmean(computed) * left)}" if computed else ""
            log.info("[%d/%d] %s / %s / %s: measuring%s", progress["done"], progress["total"], name, r.label, cell.tag, eta)
            rec = measure_cell(model, tokenizer, name, r, cell, docs, block_size, args, out, with_mteb)
            rec["settings_key"] = ckey
            write_json(path, rec)
            computed.append(rec["seconds"])
            rec["from_cache"] = False
            log.info("[%d/%d] %s / %s / %s: perplexity %.3f%s (%.1fs)", progress["done"], progress["total"], name, r.label,
                     cell.tag, rec["perplexity"], f", MTEB mean {100 * rec['mteb']['mean']:.2f}" if "mteb" in rec else "",
                     rec["seconds"])
            records.append(rec)
    return records


# --- aggregation, figures, report -------------------------------------------------------------------

def aggregate_demo(records: list[dict], routers: list[Router], args) -> dict[str, Any]:
    """Per router, kind and rate (rate 0 = clean, shared by both kinds): perplexity and MTEB mean,
    mean +- std over corruption seeds."""
    out: dict[str, Any] = {}
    for r in routers:
        mine = [x for x in records if x["router"] == r.key]
        clean = [x for x in mine if x["kind"] == "clean"]
        out[r.key] = {}
        for kind in args.kinds:
            series = []
            for rate in [0.0, *args.rates]:
                sel = clean if rate == 0.0 else [x for x in mine if x["kind"] == kind and x["rate"] == rate]
                if not sel:
                    continue
                row = {"rate": rate, "perplexity": mean_std([x["perplexity"] for x in sel]),
                       "experts_per_token": statistics.fmean(x["experts_per_token"] for x in sel)}
                if all("mteb" in x for x in sel):
                    row["mteb_mean"] = mean_std([x["mteb"]["mean"] for x in sel])
                series.append(row)
            out[r.key][kind] = series
    return out


def aggregate_trained(records: list[dict], routers: list[Router], models: list[str], args) -> dict[str, Any]:
    """Per router, kind and rate: perplexity (and its ratio to the same checkpoint's clean
    perplexity) as mean +- std over the checkpoints (each checkpoint first averaged over the
    corruption seeds)."""
    out: dict[str, Any] = {}
    for r in routers:
        out[r.key] = {}
        for kind in args.kinds:
            series = []
            for rate in [0.0, *args.rates]:
                per_model, ratios, mtebs = [], [], []
                for m in models:
                    mine = [x for x in records if x["router"] == r.key and x["model"] == m]
                    clean = [x["perplexity"] for x in mine if x["kind"] == "clean"]
                    sel = [x for x in mine if (x["kind"] == "clean" if rate == 0.0 else (x["kind"] == kind and x["rate"] == rate))]
                    if not sel or not clean:
                        continue
                    ppl = statistics.fmean(x["perplexity"] for x in sel)
                    per_model.append(ppl)
                    ratios.append(ppl / clean[0])
                    if all("mteb" in x for x in sel):
                        mtebs.append(statistics.fmean(x["mteb"]["mean"] for x in sel))
                if per_model:
                    row = {"rate": rate, "perplexity": mean_std(per_model), "perplexity_ratio_to_clean": mean_std(ratios)}
                    if mtebs and len(mtebs) == len(per_model):
                        row["mteb_mean"] = mean_std(mtebs)
                    series.append(row)
            out[r.key][kind] = series
    return out


def degradation(agg: dict[str, Any], metric: str) -> dict[str, dict[str, float]]:
    """Per router and kind: the metric at the highest rate relative to clean (perplexity: ratio;
    MTEB: difference in points)."""
    out: dict[str, dict[str, float]] = {}
    for key, kinds in agg.items():
        out[key] = {}
        for kind, series in kinds.items():
            pts = [s for s in series if metric in s]
            if len(pts) < 2 or pts[0]["rate"] != 0.0:
                continue
            a, b = pts[0][metric]["mean"], pts[-1][metric]["mean"]
            out[key][kind] = b / a if metric == "perplexity" else 100 * (b - a)
    return out


def findings(results: dict[str, Any], demo_routers: list[Router], trained_routers: list[Router]) -> list[str]:
    out: list[str] = []
    labels = {r.key: r.label for r in demo_routers}
    demo = results.get("training_free")
    if demo:
        agg = demo["aggregate"]
        top = max(results["settings"]["rates"])
        for kind in results["settings"]["kinds"]:
            ppl = degradation(agg, "perplexity")
            rows = sorted(((v[kind], k) for k, v in ppl.items() if kind in v))
            if rows:
                out.append(f"Training-free, {kind} at rate {top:g}: perplexity rises x{rows[0][0]:.3f} ({labels[rows[0][1]]}, "
                           f"least) to x{rows[-1][0]:.3f} ({labels[rows[-1][1]]}, most) over clean; "
                           + ", ".join(f"{labels[k]} x{v:.3f}" for v, k in rows) + ".")
            mt = degradation(agg, "mteb_mean")
            rows = sorted(((v[kind], k) for k, v in mt.items() if kind in v), reverse=True)
            if rows:
                out.append(f"Training-free, {kind} at rate {top:g}: WordNet MTEB mean changes by "
                           + ", ".join(f"{labels[k]} {v:+.2f}" for v, k in rows) + " points vs clean.")
            # Which router is best (lowest perplexity / highest MTEB) at the highest rate.
            last = {k: v[kind][-1] for k, v in agg.items() if v.get(kind)}
            if last:
                best = min(last, key=lambda k: last[k]["perplexity"]["mean"])
                out.append(f"Training-free, {kind} at rate {top:g}: lowest perplexity {last[best]['perplexity']['mean']:.2f} "
                           f"({labels[best]}; native {last[NATIVE]['perplexity']['mean']:.2f}).")
    trained = results.get("trained")
    if trained and trained.get("models"):
        labels = {r.key: r.label for r in trained_routers}
        agg = trained["aggregate"]
        top = max(results["settings"]["rates"])
        for kind in results["settings"]["kinds"]:
            rows = []
            for key, kinds in agg.items():
                s = kinds.get(kind) or []
                if s and s[-1]["rate"] == top:
                    rows.append((s[-1]["perplexity_ratio_to_clean"]["mean"], s[-1]["perplexity_ratio_to_clean"]["std"], key))
            rows.sort()
            if rows:
                out.append(f"After training ({len(trained['models'])} checkpoint(s)), {kind} at rate {top:g}: perplexity "
                           "ratio to clean " + ", ".join(f"{labels[k]} x{m:.3f} +- {s:.3f}" for m, s, k in rows) + ".")
    elif trained is not None:
        out.append("After training: no checkpoints were evaluated (" + trained["note"] + ").")
    return out


def robustness_claims(records: list[dict], routers: list[Router], args, unit: str) -> list[dict[str, Any]]:
    """"Router X degrades less than native under corruption", per kind at the highest rate, as
    paired differences over the seed units (``unit``: ``"corruption_seed"`` on one model, or
    ``"model"`` over checkpoints, each averaged over its corruption seeds), judged by
    ``_common.verdict``. Perplexity: native's ratio to clean minus X's (positive: X
    degrades less). MTEB: X's change from clean minus native's, in points x100."""
    top = max(args.rates)
    out: list[dict[str, Any]] = []

    def per_unit(router: str, kind: str, metric) -> dict[Any, float]:
        mine = [x for x in records if x["router"] == router]
        clean = {x["model"]: metric(x) for x in mine if x["kind"] == "clean"}
        values: dict[Any, list[float]] = {}
        for x in mine:
            if x["kind"] == kind and x["rate"] == top and metric(x) is not None and clean.get(x["model"]) is not None:
                values.setdefault(x[unit], []).append((x["model"], metric(x)))
        return {u: statistics.fmean(v - clean[m] if metric is _mteb else v / clean[m] for m, v in vs)
                for u, vs in values.items()}

    for kind in args.kinds:
        for name, metric in (("perplexity", _ppl), ("MTEB", _mteb)):
            base = per_unit(NATIVE, kind, metric)
            for r in routers:
                if r.key == NATIVE:
                    continue
                mine = per_unit(r.key, kind, metric)
                units = sorted(set(base) & set(mine), key=str)
                if not units:
                    continue
                diffs = [(base[u] - mine[u]) if metric is _ppl else 100 * (mine[u] - base[u]) for u in units]
                paper = {"usmoe": "USMoE", "ssr_sinkhorn": "SSR"}.get(r.key, "baseline")
                out.append({"paper": paper,
                            "claim": f"{r.label} degrades less than native under {kind} corruption at rate {top:g} ({name})",
                            "router": r.key, "kind": kind, "metric": name, "unit": unit, "diffs": diffs,
                            **{f"diff_{k}": v for k, v in mean_std(diffs).items() if k != "values"},
                            "verdict": verdict(diffs)})
    return out


def _ppl(x: dict) -> float | None:
    return x.get("perplexity")


def _mteb(x: dict) -> float | None:
    return (x.get("mteb") or {}).get("mean")


def line_figure(agg: dict[str, Any], routers: list[Router], kinds: list[str], metrics: list[tuple[str, str]], path: Path,
                title: str, err_note: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(metrics), len(kinds), figsize=(5.6 * len(kinds), 3.9 * len(metrics)), squeeze=False)
    for i, (metric, ylabel) in enumerate(metrics):
        for j, kind in enumerate(kinds):
            ax = axes[i][j]
            for r in routers:
                series = [s for s in agg.get(r.key, {}).get(kind, []) if metric in s]
                if not series:
                    continue
                scale = 100.0 if metric == "mteb_mean" else 1.0
                color, marker, ls = ROUTER_STYLE[r.key]
                ax.errorbar([100 * s["rate"] for s in series], [scale * s[metric]["mean"] for s in series],
                            yerr=[scale * s[metric]["std"] for s in series], color=color, marker=marker, ls=ls,
                            capsize=3, label=r.label)
            values = [s_[metric]["mean"] for r in routers for s_ in agg.get(r.key, {}).get(kind, []) if metric in s_]
            if metric.startswith("perplexity") and values and min(values) > 0 and max(values) / min(values) > 20:
                ax.set_yscale("log")  # char corruption multiplies perplexity by ~10-100
            ax.set_xlabel(f"{kind} corruption rate (%: {'junk tokens per word' if kind == 'junk' else 'characters edited'})")
            ax.set_ylabel(ylabel + (", log scale" if ax.get_yscale() == "log" else ""))
            ax.set_title(f"{ylabel.split(' (')[0]} under {kind} corruption", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"{title}\n{err_note}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _cell(x: dict[str, Any] | None, scale: float = 1.0, digits: int = 2) -> str:
    if not x:
        return "-"
    return f"{scale * x['mean']:.{digits}f}" + (f" ± {scale * x['std']:.{digits}f}" if x["n"] > 1 else "")


def markdown(results: dict[str, Any], demo_routers: list[Router], trained_routers: list[Router]) -> str:
    routers = demo_routers or trained_routers
    s, env = results["settings"], results["environment"]
    rates = [0.0, *s["rates"]]
    lines = ["# Experiment 3: robustness of each router to corrupted text", "",
             f"Generated by `{results['command']}` on {results['finished_utc']} in {fmt_duration(results['wall_seconds'])} "
             f"({results['cells_computed']} cell(s) computed, {results['cells_from_cache']} from the cache; "
             f"{fmt_duration(results['cell_seconds_computed'])} of measuring).", "",
             f"- machine: {env['cpu']} ({env['cpu_count']} cores, torch threads {env['torch_threads']}); torch {env['torch']}, "
             f"transformers {env['transformers']}, mteb {env.get('mteb')}, hf_moe_patch {env['hf_moe_patch']}, "
             f"git {env.get('git_commit')}",
             f"- seed {s['seed']}; corruption kinds {', '.join(s['kinds'])} at rates {', '.join(f'{r:g}' for r in s['rates'])} "
             f"(rate 0: clean), corruption seeds {s['corruption_seeds']}",
             f"- perplexity: the held-out WordNet documents that fill {s['eval_blocks']} clean blocks, corrupted, then packed; "
             "every next token counts (the noise tokens too)",
             f"- MTEB: {', '.join(s['tasks'])} (local WordNet tasks, held-out side), MoEE `moee_sum`, every task text corrupted"
             + (f"; sizes {s['task_sizes']}" if s["task_sizes"] else ""),
             f"- routers: " + "; ".join(f"{r.label} = `{r.method}` {r.options or ''}".rstrip() for r in routers), "",
             "## Findings", ""]
    lines += [f"- {f}" for f in results["findings"]] or ["- (none)"]
    for part, title, unit in (("training_free", "training-free, demo model", "corruption seeds (one model)"),
                              ("trained", "trained checkpoints", "checkpoints")):
        claims = (results.get("claims") or {}).get(part) or []
        if not claims:
            continue
        lines += ["", f"## Claims ({title}; seeds: {unit})", "",
                  "Positive difference: the router degrades less than native (perplexity: native's ratio to clean minus "
                  "the router's; MTEB: the router's change from clean minus native's, x100). Verdict: *holds* when "
                  "every seed agrees with the claim and the mean is more than 2 standard errors from 0, *does not hold* "
                  "when the same is true against it, else *inconclusive*.", "",
                  "| claim | paired difference | n | verdict |", "|---|---|---|---|"]
        lines += [f"| {c['claim']} | {c['diff_mean']:+.3f} ± {c['diff_std']:.3f} | {c['diff_n']} | **{c['verdict']}** |"
                  for c in claims]
    demo = results.get("training_free")
    if demo:
        lines += ["", f"## Training-free: shipped demo model ({demo['model_description']})", "",
                  "![training-free](robustness_training_free.png)", ""]
        for metric, name, scale in (("perplexity", "Held-out perplexity (lower is better)", 1.0),
                                    ("mteb_mean", "WordNet MTEB mean x 100 (higher is better)", 100.0)):
            if not any(metric in row for v in demo["aggregate"].values() for ser in v.values() for row in ser):
                continue
            for kind in s["kinds"]:
                lines += [f"### {name}, {kind} corruption", "",
                          "| router | " + " | ".join(f"rate {r:g}" for r in rates)
                          + (" | ratio highest rate / clean |" if metric == "perplexity" else " | change highest rate - clean |"),
                          "|---|" + "---|" * (len(rates) + 1)]
                for r in routers:
                    ser = {row["rate"]: row for row in demo["aggregate"][r.key].get(kind, [])}
                    cells_ = [_cell(ser.get(rate, {}).get(metric), scale) for rate in rates]
                    a, b = ser.get(0.0, {}).get(metric), ser.get(rates[-1], {}).get(metric)
                    ratio = (f"x{b['mean'] / a['mean']:.3f}" if metric == "perplexity" else f"{100 * (b['mean'] - a['mean']):+.2f} pts") if a and b else "-"
                    lines.append(f"| {r.label} | " + " | ".join(cells_) + f" | {ratio} |")
                lines.append("")
        lines += ["Experts per token measured on the perplexity text (clean / highest rate of each kind):", ""]
        for r in routers:
            agg = demo["aggregate"][r.key]
            parts = [f"{kind} {agg[kind][-1]['experts_per_token']:.2f}" for kind in s["kinds"] if agg.get(kind)]
            clean = next((agg[k][0]["experts_per_token"] for k in s["kinds"] if agg.get(k)), float("nan"))
            lines.append(f"- {r.label}: clean {clean:.2f}; " + ", ".join(parts))
        lines.append("")
    trained = results.get("trained")
    lines += ["## After training (experiment 1's checkpoints)", ""]
    if not trained or not trained.get("models"):
        lines += [f"No checkpoints evaluated: {trained['note'] if trained else 'the part was not run'}. "
                  f"Run `python {SCRIPT} --models {DEFAULT_MODELS_GLOB}` once experiment 1 has written them.", ""]
    else:
        lines += [f"Checkpoints ({len(trained['models'])}): " + ", ".join(f"`{m}`" for m in trained["models"]), "",
                  "![after training](robustness_trained.png)", "",
                  "Mean ± std over the checkpoints (each averaged over the corruption seeds first).", ""]
        routers = trained_routers
        for kind in s["kinds"]:
            lines += [f"### Held-out perplexity, {kind} corruption (ratio to the checkpoint's clean perplexity in brackets)", "",
                      "| router | " + " | ".join(f"rate {r:g}" for r in rates) + " |", "|---|" + "---|" * len(rates)]
            for r in routers:
                ser = {row["rate"]: row for row in trained["aggregate"][r.key].get(kind, [])}
                cells_ = []
                for rate in rates:
                    row = ser.get(rate)
                    cells_.append("-" if row is None else f"{_cell(row['perplexity'])} (x{_cell(row['perplexity_ratio_to_clean'], digits=3)})")
                lines.append(f"| {r.label} | " + " | ".join(cells_) + " |")
            lines.append("")
    lines += ["## Notes", "",
              "- Perplexity under corruption counts the noise tokens too, which no model predicts well: compare routers "
              "at one corruption setting, and each router with its own clean value (the ratio columns).",
              "- The demo model and experiment 1's checkpoints were trained with the native top-k router; the other "
              "routers are applied without training (training-free swaps), also on the checkpoints.",
              "- Corruption is seeded by (kind, seed, text): every router sees the same corrupted texts.", "",
              f"Reproduce: `{results['command']}` (cells are cached in `cells/`; a rerun only computes what is missing).", ""]
    return "\n".join(lines)


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

    quiet_bars(datasets=True)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = machine_info()
    demo_dir = Path(hmp.demo_model_path())
    grid = cells(args)
    models = [Path(m) for m in args.models]
    total = (0 if args.no_demo else 1) * len(grid) * len(args.routers) + len(models) * len(grid) * len(args.routers)
    progress = {"total": total, "done": 0, "cached": 0, "computed": []}
    log.info("%d cell(s): %d router(s) x %d corruption setting(s) x (%s%d checkpoint(s)) -> %s", total, len(args.routers),
             len(grid), "" if args.no_demo else "demo + ", len(models), out)
    results: dict[str, Any] = {"experiment": 3, "command": "python " + SCRIPT + (" " + shlex.join(argv) if argv else ""),
                               "environment": env}
    routers_used: list[Router] = []  # the demo's
    trained_routers: list[Router] = []  # the first checkpoint's (its native k names the budgets)
    if not args.no_demo:
        model = AutoModelForCausalLM.from_pretrained(demo_dir, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(demo_dir)
        report = read_json(demo_dir / "training_report.json") or {}
        block_size = int(report["args"]["block_size"])
        k = int(model.config.num_experts_per_tok)
        routers_used = [make_router(key, k) for key in args.routers]
        cfg = model.config
        records = run_model(DEMO, model, tokenizer, block_size, fingerprint(demo_dir), routers_used, grid, args, out,
                            not args.no_mteb, env, progress)
        results["training_free"] = {
            "model": DEMO, "model_description": f"{cfg.model_type}, {cfg.num_hidden_layers} layers, {cfg.num_experts} "
                                                f"experts, native top-{k}, {sum(p.numel() for p in model.parameters()):,} parameters",
            "block_size": block_size, "records": records, "aggregate": aggregate_demo(records, routers_used, args)}
        del model
    trained: dict[str, Any] = {"models": [str(m) for m in models]}
    if not models:
        if args.quick and args.models_defaulted:
            trained["note"] = "--quick evaluates checkpoints only when --models is given"
        elif args.models_defaulted:
            trained["note"] = f"none found at {DEFAULT_MODELS_GLOB} (experiment 1 has not written them yet)"
        else:
            trained["note"] = "none given"
    else:
        all_records = []
        names = []
        for m in models:
            model, tokenizer, block_size = load_checkpoint(m, demo_dir, args.checkpoint_block_size)
            k = int(model.config.num_experts_per_tok)
            routers_m = [make_router(key, k) for key in args.routers]
            trained_routers = trained_routers or routers_m
            name = str(m.resolve().relative_to(ROOT)) if m.resolve().is_relative_to(ROOT) else str(m.resolve())
            names.append(name)
            all_records += run_model(name, model, tokenizer, block_size, fingerprint(m), routers_m, grid, args, out,
                                     args.models_mteb and not args.no_mteb, env, progress)
            del model
        trained.update(models=names, records=all_records, aggregate=aggregate_trained(all_records, trained_routers, names, args))
    results["trained"] = trained
    results["settings"] = {"seed": args.seed, "routers": args.routers, "kinds": args.kinds, "rates": args.rates,
                           "corruption_seeds": args.corruption_seeds, "eval_blocks": args.eval_blocks,
                           "ppl_batch_size": args.ppl_batch_size, "tasks": list(args.tasks), "task_sizes": args.task_sizes,
                           "mteb": not args.no_mteb, "mteb_batch_size": args.mteb_batch_size, "quick": args.quick}
    results["cells_total"] = total
    results["cells_from_cache"] = progress["cached"]
    results["cells_computed"] = len(progress["computed"])
    results["cell_seconds_computed"] = sum(progress["computed"])
    results["findings"] = findings(results, routers_used, trained_routers)
    results["claims"] = {
        "training_free": robustness_claims(results["training_free"]["records"], routers_used, args, "corruption_seed")
        if "training_free" in results else [],
        "trained": robustness_claims(trained["records"], trained_routers, args, "model") if trained.get("records") else [],
    }
    results["finished_utc"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    seeds_note = ("error bars: std over corruption seeds " + str(args.corruption_seeds) if len(args.corruption_seeds) > 1
                  else "one corruption seed: no error bars")
    if "training_free" in results:
        metrics = [("perplexity", "held-out perplexity (lower is better)")]
        if not args.no_mteb:
            metrics.append(("mteb_mean", "WordNet MTEB mean (x100, higher is better)"))
        line_figure(results["training_free"]["aggregate"], routers_used, args.kinds, metrics,
                    out / "robustness_training_free.png",
                    "Training-free routers on the shipped demo model under text corruption", seeds_note)
    if trained.get("aggregate"):
        line_figure(trained["aggregate"], trained_routers, args.kinds,
                    [("perplexity", "held-out perplexity (lower is better)"),
                     ("perplexity_ratio_to_clean", "perplexity / clean perplexity (x)")],
                    out / "robustness_trained.png",
                    f"Routers on {len(trained['models'])} trained checkpoint(s) under text corruption",
                    f"error bars: std over the {len(trained['models'])} checkpoint(s)")
    results["wall_seconds"] = time.perf_counter() - started
    write_json(out / "results.json", results)
    (out / "README.md").write_text(markdown(results, routers_used, trained_routers))
    log.info("done in %s (%d cell(s) computed, %d from the cache): %s", fmt_duration(results["wall_seconds"]),
             results["cells_computed"], results["cells_from_cache"], out)
    for f in results["findings"]:
        log.info("finding: %s", f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
