#!/usr/bin/env python
"""Training-free MoEE on the WordNet MTEB tasks: the MoEE and USMoE embedding claims, in miniature.

Experiment 2 of issue 11. For each model -- the shipped demo model (spread over three seeds of
the WordNet task sampling) and the top-k+aux models of ``eval/pretrain.py`` (one per training
seed; spread over the models) -- the WordNet MTEB mean (main scores x100) of:

* **embedding**: HS, RW, MoEE(concat), MoEE(sum), in our per-text mode and in the official
  pipeline's (``reference=True``: ``tianyi-lab/MoE-Embedding``), without a prompt and with
  PromptEOL, under the native router;
* **router**: native token choice vs USMoE (native budget) vs expert choice, MoEE(sum), PromptEOL,
  both modes;
* **alpha**: USMoE with alpha in {0, 0.3, 0.5, 0.7, 1} (MoEE(sum), PromptEOL, our mode);
* **sum weight**: w in cos(HS) + w cos(RW), native router, both modes.

Claims are judged over the seeds by ``_common.verdict``: *holds* when the paired difference has
the claimed sign on every seed and its mean is more than 2 standard errors from 0, *does not
hold* when the same is true against the claim, else *inconclusive*. Each cell's mteb results are cached (``<out>/mteb_cache``), so a
rerun recomputes only what is missing.

Outputs in --out: results.json, README.md, embeddings.png, sweeps.png.

Example:
    python eval/moee_embeddings.py                       # ~25 min on 2 CPU cores
    python eval/moee_embeddings.py --quick --out /tmp/moee   # smoke run (< 1 min)
"""

from __future__ import annotations

import argparse
import logging
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))  # eval/_common.py, also when loaded by path
from _common import (ROOT, fmt_duration, machine_info, mean_std, read_json, setup_run, slug, verdict,  # noqa: E402
                     write_json, write_text)  # noqa: E402

SCRIPT = "eval/moee_embeddings.py"
DEFAULT_OUT = ROOT / "eval" / "results" / "moee_embeddings"
PRETRAIN_MODELS = ROOT / "eval" / "results" / "pretrain" / "models"
TASKS = ("WordNetLexnameClassification", "WordNetSameLemmaPairClassification", "WordNetWuPalmerSTS",
         "WordNetExampleRetrieval", "WordNetLexnameClustering")
EMBEDDINGS = ("hs", "rw", "moee_concat", "moee_sum")
EMBEDDING_NAMES = {"hs": "HS", "rw": "RW", "moee_concat": "MoEE(concat)", "moee_sum": "MoEE(sum)"}
MODES = ("ours", "reference")
PROMPTS = ("none", "prompteol")
ROUTERS = ("topk", "usmoe", "expert_choice")
ALPHAS = (0.0, 0.3, 0.5, 0.7, 1.0)
WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
GROUPS = ("embedding", "router", "alpha", "sum_weight")
QUICK_SIZES = {"WordNetWuPalmerSTS": {"n_pairs": 40}, "WordNetLexnameClustering": {"per_label": 4}}

log = logging.getLogger("moee_embeddings")


@dataclass(frozen=True)
class Setting:
    """One MoEE configuration; the routings of one setting are evaluated together."""

    embedding: str
    reference: bool
    prompt: str
    sum_weight: float = 1.0

    @property
    def mode(self) -> str:
        return "reference" if self.reference else "ours"


@dataclass(frozen=True)
class Cell:
    group: str
    routing: str  # a routing spec: METHOD[:key=value,...]
    setting: Setting


def cells(quick: bool) -> list[Cell]:
    """Every (group, routing, setting) of the experiment; cells shared by two groups appear in both."""
    out: list[Cell] = []
    embeddings = ("hs", "moee_sum") if quick else EMBEDDINGS
    for embedding in embeddings:
        for reference in (False, True):
            for prompt in (("prompteol",) if quick else PROMPTS):
                out.append(Cell("embedding", "topk", Setting(embedding, reference, prompt)))
    for reference in (False, True):
        for router in (("topk", "usmoe") if quick else ROUTERS):
            out.append(Cell("router", router, Setting("moee_sum", reference, "prompteol")))
    for alpha in ((1.0,) if quick else ALPHAS):
        out.append(Cell("alpha", f"usmoe:alpha={alpha:g}", Setting("moee_sum", False, "prompteol")))
    for reference in (False, True):
        for w in ((0.0,) if quick and not reference else () if quick else WEIGHTS):
            out.append(Cell("sum_weight", "topk", Setting("moee_sum", reference, "prompteol", w)))
    return out


# --- command line ------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=SCRIPT, description=__doc__.split("\n\nExample:")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: eval/results/moee_embeddings)")
    p.add_argument("--models", nargs="*", metavar="DIR",
                   help="trained model folders besides the demo model (default: every eval/results/pretrain/models/"
                        "topk_aux_seed*/ that exists)")
    p.add_argument("--task-seeds", nargs="+", type=int, default=[0, 1, 2],
                   help="WordNet task sampling seeds for the demo model (default: 0 1 2); trained models use the first")
    p.add_argument("--no-demo", action="store_true", help="leave out the shipped demo model")
    p.add_argument("--trained-groups", nargs="+", choices=GROUPS, default=list(GROUPS),
                   help="the groups of cells measured on the trained models (default: all: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="texts per forward; in reference mode also the batch of the z-scores (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default: %(default)s; the scores do not depend on it beyond float rounding)")
    p.add_argument("--quick", action="store_true", help="smoke run: few cells, one task seed, two small tasks")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from the cached cells only")
    p.add_argument("--wordnet", help="folder of WordNet's data.* files (default: $HF_MOE_PATCH_WORDNET or /usr/share/wordnet)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"], help="(default: %(default)s)")
    return p


def model_list(args: argparse.Namespace) -> list[tuple[str, Path]]:
    import hf_moe_patch as hmp

    models: list[tuple[str, Path]] = [] if args.no_demo else [("demo", Path(hmp.demo_model_path()))]
    dirs = args.models if args.models is not None else sorted(str(p) for p in PRETRAIN_MODELS.glob("topk_aux_seed*") if p.is_dir())
    for d in dirs:
        path = Path(d)
        if not (path / "config.json").is_file():
            raise SystemExit(f"{SCRIPT}: error: --models {d}: no config.json there")
        models.append((path.name, path))
    return models


# --- measurement -------------------------------------------------------------------------------

def run_setting(model, tokenizer, setting: Setting, routings: list[str], task_seed: int, args: argparse.Namespace,
                cache: Path) -> dict[str, dict[str, float]]:
    """Main scores (x100) per routing and task for one setting, through evaluate_routings (cached)."""
    from hf_moe_patch.embeddings.evaluation import evaluate_routings

    sizes = QUICK_SIZES if args.quick else None
    tasks = list(QUICK_SIZES) if args.quick else list(TASKS)
    report = evaluate_routings(
        model, tokenizer, routings, tasks, embedding=setting.embedding, prompt=setting.prompt,
        sum_weight=setting.sum_weight, reference=setting.reference, batch_size=args.batch_size, cache_dir=cache,
        out_dir=None, progress=False, wordnet_kwargs={"path": args.wordnet, "seed": task_seed, "sizes": sizes},
    )
    return {run.label: {task: 100.0 * score for task, score in run.scores.items()} for run in report.runs}


def measure(args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    all_cells = cells(args.quick)
    for name, path in model_list(args):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        seeds = args.task_seeds[:1] if (args.quick or name != "demo") else args.task_seeds
        model_cells = all_cells if name == "demo" else [c for c in all_cells if c.group in args.trained_groups]
        for seed in seeds:
            by_setting: dict[Setting, list[str]] = {}
            for cell in model_cells:
                by_setting.setdefault(cell.setting, [])
                if cell.routing not in by_setting[cell.setting]:
                    by_setting[cell.setting].append(cell.routing)
            started = time.perf_counter()
            for i, (setting, routings) in enumerate(by_setting.items(), 1):
                log.info("%s task seed %d: setting %d/%d %s (%s)", name, seed, i, len(by_setting), setting, ", ".join(routings))
                # One cache folder per model and task seed: mteb's cache finds results by model and
                # task name only, so two task seeds in one folder would evict each other.
                scores = run_setting(model, tokenizer, setting, routings, seed, args,
                                     out / "mteb_cache" / slug(name) / f"task_seed{seed}")
                for cell in model_cells:
                    if cell.setting == setting:
                        per_task = scores[cell.routing]
                        rows.append({"model": name, "task_seed": seed, "group": cell.group, "routing": cell.routing,
                                     **asdict(setting), "mode": setting.mode, "scores": per_task,
                                     "mean": sum(per_task.values()) / len(per_task)})
            log.info("%s task seed %d done in %s", name, seed, fmt_duration(time.perf_counter() - started))
    return rows


# --- analysis ----------------------------------------------------------------------------------

def unit(row: dict[str, Any]) -> tuple[str, int]:
    """What a seed is: (model, task seed)."""
    return row["model"], row["task_seed"]


def lookup(rows: list[dict[str, Any]], model_kind: str, **where: Any) -> dict[tuple[str, int], float]:
    """Mean score per seed unit of the rows matching ``where`` (first match per unit)."""
    out: dict[tuple[str, int], float] = {}
    for r in rows:
        if (r["model"] == "demo") != (model_kind == "demo"):
            continue
        if all(r.get(k) == v for k, v in where.items()):
            out.setdefault(unit(r), r["mean"])
    return out


def summary(rows: list[dict[str, Any]], model_kind: str, **where: Any) -> dict[str, float | int]:
    return mean_std(list(lookup(rows, model_kind, **where).values()))


def paired(rows, model_kind, a: dict[str, Any], b: dict[str, Any]) -> list[float]:
    x, y = lookup(rows, model_kind, **a), lookup(rows, model_kind, **b)
    return [x[k] - y[k] for k in sorted(set(x) & set(y))]


def base(embedding: str, mode: str = "ours", prompt: str = "prompteol", **kw: Any) -> dict[str, Any]:
    return {"group": kw.pop("group", "embedding"), "routing": kw.pop("routing", "topk"), "embedding": embedding,
            "mode": mode, "prompt": prompt, **kw}


def claims(rows: list[dict[str, Any]], model_kind: str) -> list[dict[str, Any]]:
    """Each claim as a paired difference over seeds, with its verdict."""
    out = []

    def claim(paper: str, text: str, a: dict[str, Any], b: dict[str, Any], better: str = "higher") -> None:
        d = paired(rows, model_kind, a, b)
        out.append({"paper": paper, "claim": text, "diffs": d, **{f"diff_{k}": v for k, v in mean_std(d).items()},
                    "verdict": verdict(d, better=better)})

    for mode in MODES:
        claim("MoEE", f"MoEE(sum) beats HS (PromptEOL, {mode} mode)", base("moee_sum", mode), base("hs", mode))
        claim("MoEE", f"MoEE(sum) beats RW (PromptEOL, {mode} mode)", base("moee_sum", mode), base("rw", mode))
        claim("MoEE", f"MoEE(sum) beats MoEE(concat) (PromptEOL, {mode} mode)", base("moee_sum", mode),
              base("moee_concat", mode))
        claim("MoEE", f"PromptEOL helps HS (vs no prompt, {mode} mode)", base("hs", mode), base("hs", mode, "none"))
    # RW is more robust to the prompt than HS: |HS(prompteol) - HS(none)| - |RW(...) - RW(...)| > 0.
    for mode in MODES:
        hs = paired(rows, model_kind, base("hs", mode), base("hs", mode, "none"))
        rw = paired(rows, model_kind, base("rw", mode), base("rw", mode, "none"))
        d = [abs(h) - abs(r) for h, r in zip(hs, rw)]
        out.append({"paper": "MoEE", "claim": f"RW is more robust to the prompt than HS (smaller absolute change from "
                                              f"no prompt to PromptEOL, {mode} mode)", "diffs": d,
                    **{f"diff_{k}": v for k, v in mean_std(d).items()}, "verdict": verdict(d)})
    # The paper reports alpha in (0.3, 0.7) working best: the default 0.5 against the better end.
    mid = lookup(rows, model_kind, **base("moee_sum", group="alpha", routing="usmoe:alpha=0.5"))
    ends = [lookup(rows, model_kind, **base("moee_sum", group="alpha", routing=f"usmoe:alpha={a:g}")) for a in (0.0, 1.0)]
    units = sorted(set(mid) & set(ends[0]) & set(ends[1]))
    d = [mid[u] - max(ends[0][u], ends[1][u]) for u in units]
    out.append({"paper": "USMoE", "claim": "USMoE's alpha 0.5 beats both ends, alpha 0 and 1 (MoEE(sum), ours mode)",
                "diffs": d, **{f"diff_{k}": v for k, v in mean_std(d).items()}, "verdict": verdict(d)})
    for mode in MODES:
        for other in ("topk", "expert_choice"):
            claim("USMoE", f"USMoE beats {'token choice' if other == 'topk' else 'expert choice'} on MoEE(sum) "
                           f"({mode} mode)", base("moee_sum", mode, group="router", routing="usmoe"),
                  base("moee_sum", mode, group="router", routing=other))
    return out


def table(rows, model_kind, keys: list[tuple[str, dict[str, Any]]]) -> list[str]:
    lines = []
    for label, where in keys:
        s = summary(rows, model_kind, **where)
        if s["n"]:
            lines.append(f"| {label} | {s['mean']:.2f} ± {s['std']:.2f} | {s['n']} |")
    return lines


def fmt_claim(c: dict[str, Any]) -> str:
    if not c["diff_n"]:
        return f"| {c['paper']} | {c['claim']} | - | 0 | not measured |"
    return (f"| {c['paper']} | {c['claim']} | {c['diff_mean']:+.2f} ± {c['diff_std']:.2f} | {c['diff_n']} | "
            f"**{c['verdict']}** |")


def markdown(results: dict[str, Any]) -> str:
    rows = results["rows"]
    env = results["environment"]
    lines = [
        "# Training-free MoEE on the WordNet MTEB tasks (experiment 2 of issue 11)",
        "",
        f"Command: `{results['command']}`; finished {results['finished_utc']}, wall time {fmt_duration(results['wall_seconds'])}.",
        f"Machine: {env['cpu']}, {env['cpu_count']} CPUs, {env['torch_threads']} torch threads; torch {env['torch']}, "
        f"transformers {env['transformers']}, mteb {env.get('mteb')}, hf_moe_patch {env['hf_moe_patch']} "
        f"(commit {str(env.get('git_commit'))[:7]}).",
        "",
        "Scores are the mean over the WordNet tasks of mteb's main scores, x100. **Seeds:** on the demo model, the "
        f"WordNet task sampling seeds {results['settings']['task_seeds']} (same model); on the trained models, one "
        "model per training seed (task seed " f"{results['settings']['task_seeds'][0]}; groups measured there: "
        f"{', '.join(results['settings'].get('trained_groups') or GROUPS)}). Each cell is mean ± sample std "
        "over those seeds, n = number of seeds. Verdicts: *holds* when the paired difference has the claimed sign on "
        "every seed and its mean is more than 2 standard errors from 0, *does not hold* when the same is true "
        "against the claim, else *inconclusive*.",
        "",
        "Modes: **ours** embeds each text on its own (per-text standardisation, positions from the mask, no "
        "instruction); **reference** is the official MoEE pipeline (`MoEEncoder(reference=True)`: cleaned text, "
        "GritLM task instructions inside the quotes, HS and RW z-scored per feature over each batch of "
        f"{results['settings']['batch_size']} texts, and for classification and clustering MoEE(sum) as the average "
        "of the HS and RW runs' predicted labels).",
    ]
    for kind, title in (("demo", "Shipped demo model"), ("trained", "Top-k+aux models of eval/pretrain.py")):
        if not any((r["model"] == "demo") == (kind == "demo") for r in rows):
            lines += ["", f"## {title}", "", "Not measured in this run (no such models: run `python eval/pretrain.py` first)."]
            continue
        lines += ["", f"## {title}", "", "### Embeddings (native router)", "",
                  "| embedding | mode | prompt | WordNet mean | n |", "|---|---|---|---|---|"]
        for e in EMBEDDINGS:
            for mode in MODES:
                for prompt in PROMPTS:
                    s = summary(rows, kind, **base(e, mode, prompt))
                    if s["n"]:
                        lines.append(f"| {EMBEDDING_NAMES[e]} | {mode} | {prompt} | {s['mean']:.2f} ± {s['std']:.2f} | {s['n']} |")
        lines += ["", "### Routers (MoEE(sum), PromptEOL)", "", "| router | mode | WordNet mean | n |", "|---|---|---|---|"]
        for mode in MODES:
            lines += table(rows, kind, [(f"{r} | {mode}", base("moee_sum", mode, group="router", routing=r)) for r in ROUTERS])
        lines += ["", "### USMoE alpha (MoEE(sum), PromptEOL, ours)", "", "| alpha | WordNet mean | n |", "|---|---|---|"]
        lines += table(rows, kind, [(f"{a:g}", base("moee_sum", group="alpha", routing=f"usmoe:alpha={a:g}")) for a in ALPHAS])
        lines += ["", "### Sum weight w (native router, PromptEOL)", "", "| w | mode | WordNet mean | n |", "|---|---|---|---|"]
        for mode in MODES:
            lines += table(rows, kind, [(f"{w:g} | {mode}", base("moee_sum", mode, group="sum_weight", sum_weight=w))
                                        for w in WEIGHTS])
        lines += ["", "### Claims", "", "| paper | claim | paired difference (x100) | n | verdict |", "|---|---|---|---|---|"]
        lines += [fmt_claim(c) for c in results["claims"][kind]]
    lines += ["", "Per task scores of every cell are in `results.json` (`rows`). Figures: `embeddings.png`, `sweeps.png`."]
    return "\n".join(_without_empty_tables(lines)) + "\n"


def _without_empty_tables(lines: list[str]) -> list[str]:
    """A table whose header is not followed by a row says so instead (a group not measured there)."""
    out: list[str] = []
    for i, line in enumerate(lines):
        is_header = line.startswith("| ") and i + 1 < len(lines) and lines[i + 1].startswith("|---")
        if is_header and not (i + 2 < len(lines) and lines[i + 2].startswith("| ")):
            out.append("Not measured on these models (see `--trained-groups`).")
        elif line.startswith("|---") and out and out[-1].startswith("Not measured"):
            continue
        else:
            out.append(line)
    return out


def figures(results: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    kinds = [k for k in ("demo", "trained") if any((r["model"] == "demo") == (k == "demo") for r in rows)]
    paths = []
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.5 * len(kinds), 4.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        width = 0.2
        for j, (mode, prompt) in enumerate([(m, p) for m in MODES for p in PROMPTS]):
            means, errs = [], []
            for e in EMBEDDINGS:
                s = summary(rows, kind, **base(e, mode, prompt))
                means.append(s["mean"])
                errs.append(s["std"] if s["n"] else math.nan)
            xs = [i + (j - 1.5) * width for i in range(len(EMBEDDINGS))]
            ax.bar(xs, means, width, yerr=errs, capsize=3, label=f"{mode}, {prompt}")
        ax.set_xticks(range(len(EMBEDDINGS)), [EMBEDDING_NAMES[e] for e in EMBEDDINGS])
        ax.set_ylabel("WordNet MTEB mean (main score x100)")
        ax.set_title(f"{'demo model' if kind == 'demo' else 'trained top-k+aux models'}: embeddings, native router\n"
                     f"(error bars: std over seeds)")
        ax.grid(axis="y", alpha=0.3)
    # One legend under the panels: inside an axis it covered the lowest bars.
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, title="mode, prompt", fontsize=8, loc="lower center", ncol=len(labels))
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    paths.append(out / "embeddings.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(len(kinds), 2, figsize=(11, 4 * len(kinds)), squeeze=False)
    for row_axes, kind in zip(axes, kinds):
        ax = row_axes[0]
        s = [summary(rows, kind, **base("moee_sum", group="alpha", routing=f"usmoe:alpha={a:g}")) for a in ALPHAS]
        ax.errorbar(ALPHAS, [x["mean"] for x in s], yerr=[x["std"] for x in s], marker="o", capsize=3, label="USMoE (ours mode)")
        nat = summary(rows, kind, **base("moee_sum"))
        if nat["n"]:
            ax.axhline(nat["mean"], color="gray", ls="--", label="native token choice")
        ax.set_xlabel("USMoE alpha (weight of the expert-softmax term)")
        ax.set_ylabel("WordNet MTEB mean (x100)")
        ax.set_title(f"{kind}: USMoE alpha, MoEE(sum), PromptEOL")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        ax = row_axes[1]
        for mode in MODES:
            s = [summary(rows, kind, **base("moee_sum", mode, group="sum_weight", sum_weight=w)) for w in WEIGHTS]
            ax.errorbar(WEIGHTS, [x["mean"] for x in s], yerr=[x["std"] for x in s], marker="o", capsize=3, label=f"{mode} mode")
        ax.set_xscale("symlog", linthresh=0.25)
        ax.set_xlabel("sum weight w in cos(HS) + w cos(RW)")
        ax.set_ylabel("WordNet MTEB mean (x100)")
        ax.set_title(f"{kind}: MoEE(sum) weight, native router, PromptEOL")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "sweeps.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_run(args.log_level)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    previous = read_json(out / "results.json")
    if args.report_only:
        if previous is None:
            raise SystemExit(f"{SCRIPT}: error: --report-only: no {out / 'results.json'} yet")
        rows = previous["rows"]
    else:
        rows = measure(args, out)
    command = "python " + " ".join([SCRIPT, *map(shlex.quote, argv or sys.argv[1:])])
    results = {
        "issue": 11, "experiment": 2, "command": command,
        "finished_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "wall_seconds": time.perf_counter() - started, "environment": machine_info(),
        "settings": {"task_seeds": args.task_seeds, "trained_groups": args.trained_groups, "batch_size": args.batch_size, "quick": args.quick, "threads": args.threads,
                     "tasks": list(QUICK_SIZES) if args.quick else list(TASKS), "task_sizes": QUICK_SIZES if args.quick else "defaults"},
        "rows": rows,
    }
    if args.report_only:  # the measurement's own command, time, machine and settings stay; say who rewrote the report
        results.update({k: previous[k] for k in ("command", "finished_utc", "wall_seconds", "environment", "settings") if k in previous})
        results["report_rewritten_by"] = command
    results["claims"] = {kind: claims(rows, kind) for kind in ("demo", "trained")}
    write_json(out / "results.json", results)
    write_text(out / "README.md", markdown(results))
    paths = figures(results, out)
    print(f"wrote {out / 'results.json'}, {out / 'README.md'}, " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
