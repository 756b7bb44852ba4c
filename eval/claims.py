#!/usr/bin/env python
"""The per-claim page: every claim of the three papers, what was measured here, and the verdict.

Reads the ``results.json`` of each experiment under ``eval/results/`` (nothing is measured here)
and rewrites the block between ``<!-- claims:begin -->`` and ``<!-- claims:end -->`` of
``eval/README.md``: one table per paper (USMoE, SSR, MoEE), one row per measured comparison,
with the experiment, the mean paired difference ± its spread, the number of seeds, the verdict
computed by that experiment, and where that experiment's seeds, machine and command are. A
paper claim with no experiment behind it says "not measured" and why.

Example:
    python eval/claims.py            # after any experiment has (re)written its results
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))  # eval/_common.py, also when loaded by path
from _common import ROOT, read_json, write_text  # noqa: E402

SCRIPT = "eval/claims.py"
RESULTS = ROOT / "eval" / "results"
BEGIN, END = "<!-- claims:begin -->", "<!-- claims:end -->"
PAPERS = {
    "USMoE": "Unified Sparse Mixture of Experts (Do, Le, Tran; arXiv 2503.22996)",
    "SSR": "Selective Sinkhorn Routing (Nguyen, Ta, Le Duc, Nguyen, Tran; arXiv 2511.08972)",
    "MoEE": "Your Mixture-of-Experts LLM Is Secretly an Embedding Model For Free (Li, Zhou; ICLR 2025)",
}
# Paper claims that no experiment here measures, with the reason.
NOT_MEASURED = [
    ("USMoE", "avoids representation collapse", "no experiment measures representation collapse (e.g. the rank of "
                                                "expert outputs) yet"),
    ("USMoE", "up to 10 % better than token / expert choice on MTEB with OLMoE-1B-7B, Qwen1.5-MoE, DeepSeek-MoE",
     "the real checkpoints cannot be downloaded here; the WordNet rows stand in at small scale"),
    ("SSR", "higher accuracy on image classification", "no vision model in scope"),
    ("MoEE", "the paper's 19 MTEB datasets with OLMoE / Qwen1.5-MoE / DeepSeek-MoE (e.g. OLMoE HS 53.72 -> MoEE(sum) "
             "55.16, PromptEOL)", "the datasets and checkpoints cannot be downloaded here; `hf-moe-patch mteb MODEL "
                                 "--reference --tasks ...` runs it where they can"),
]


def _num(x: Any, digits: int = 2) -> str:
    return "-" if x is None else f"{x:+.{digits}f}"


def pretrain_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for c in res.get("claims", []):
        n = c.get("paired_seeds", 0)
        spread = f" ± {c['standard_error']:.3g} (s.e.)" if c.get("standard_error") is not None else ""
        rows.append({"paper": c.get("paper", "baseline"), "claim": c["claim"], "experiment": "pretrain",
                     "measured": f"{_num(c['difference'], 4)}{spread} ({c['metric']}, A - B)", "n": n,
                     "verdict": c["verdict"]})
    return rows


def embedding_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for kind, label in (("demo", "demo model, task seeds"), ("trained", "trained top-k+aux models")):
        for c in (res.get("claims") or {}).get(kind, []):
            if not c.get("diff_n"):
                continue
            rows.append({"paper": c["paper"], "claim": f"{c['claim']} [{label}]", "experiment": "moee_embeddings",
                         "measured": f"{_num(c['diff_mean'])} ± {c['diff_std']:.2f} (std; WordNet mean x100)",
                         "n": c["diff_n"], "verdict": c["verdict"]})
    return rows


def robustness_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for part, label in (("training_free", "training-free, demo model, noise seeds"), ("trained", "trained checkpoints")):
        for c in (res.get("claims") or {}).get(part, []):
            rows.append({"paper": c.get("paper", "baseline"), "claim": f"{c['claim']} [{label}]", "experiment": "robustness",
                         "measured": f"{_num(c['diff_mean'], 3)} ± {c['diff_std']:.3f} (std; {c['metric']})", "n": c["diff_n"],
                         "verdict": c["verdict"]})
    return rows


def dynamic_compute_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    """USMoE's cost claim: MTEB and perplexity at a smaller budget than native, one run (no seeds)."""
    by_label = {r["label"]: r for r in res.get("routings", [])}
    # Results written before the task build was recorded used build 1 (the old ExampleRetrieval).
    build = (res.get("settings") or {}).get("task_build", {}).get("wordnet_tasks_build", 1)
    native = next((r for r in res.get("routings", []) if r.get("native")), None)
    rows = []
    for label in ("usmoe:top_k=3", "usmoe:top_k=3,causal"):
        r = by_label.get(label)
        if not (r and native and r.get("mteb") and native.get("mteb")):
            continue
        d_mteb = 100 * (r["mteb"]["mean"] - native["mteb"]["mean"])
        rows.append({"paper": "USMoE", "claim": f"fractional / smaller budget keeps quality: {label} (3 experts/token) "
                                                f"vs native top-4 [demo model; WordNet task build {build}]",
                     "experiment": "dynamic_compute",
                     "measured": f"MTEB {d_mteb:+.2f} x100, perplexity {r['perplexity']:.2f} vs {native['perplexity']:.2f}, "
                                 f"{r['experts_per_token']:.2f} vs {native['experts_per_token']:.2f} experts/token",
                     "n": 1, "verdict": "inconclusive (one run)"})
    return rows


SOURCES = {
    "pretrain": ("pretrain", pretrain_rows),
    "moee_embeddings": ("moee_embeddings", embedding_rows),
    "robustness": ("robustness", robustness_rows),
    "dynamic_compute": ("dynamic_compute", dynamic_compute_rows),
}


def collect(results_dir: Path) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    rows: list[dict[str, Any]] = []
    present: dict[str, dict[str, Any]] = {}
    for name, (folder, reader) in SOURCES.items():
        res = read_json(results_dir / folder / "results.json")
        if res is None:
            continue
        present[name] = res
        rows += reader(res)
    return rows, present


def _when(res: dict[str, Any]) -> str:
    return str(res.get("finished_utc") or res.get("generated") or "?")


def block(rows: list[dict[str, Any]], present: dict[str, dict[str, Any]]) -> str:
    lines = [BEGIN, "", "## Claims of the papers: holds / does not hold / inconclusive at this scale", "",
             f"Generated by `python {SCRIPT}` from the experiments' `results.json`; do not edit by hand. Each row is "
             "one comparison an experiment made; its verdict is computed there from paired differences over seeds "
             "(`eval/_common.py: verdict`: *holds* when every seed agrees with the claim and the mean difference is "
             "more than 2 standard errors from 0). Machine, versions, seeds and the exact command of each experiment "
             "are at the top of its report.", "",
             "| experiment | report | produced |", "|---|---|---|"]
    for name, res in present.items():
        folder = SOURCES[name][0]
        lines.append(f"| {name} | [`results/{folder}/README.md`](results/{folder}/README.md) | {_when(res)} |")
    missing = [n for n in SOURCES if n not in present]
    if missing:
        lines += ["", "Not run yet (no results.json): " + ", ".join(f"`{n}`" for n in missing) + "."]
    for paper, title in PAPERS.items():
        mine = [r for r in rows if r["paper"] == paper]
        lines += ["", f"### {paper}: {title}", "", "| claim (as tested here) | experiment | measured | n | verdict |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['claim']} | {r['experiment']} | {r['measured']} | {r['n']} | **{r['verdict']}** |" for r in mine]
        lines += [f"| {claim} | - | not measured: {why} | 0 | - |" for p, claim, why in NOT_MEASURED if p == paper]
    baseline = [r for r in rows if r["paper"] == "baseline"]
    if baseline:
        lines += ["", "### Baselines (no paper's claim; context)", "", "| comparison | experiment | measured | n | verdict |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['claim']} | {r['experiment']} | {r['measured']} | {r['n']} | **{r['verdict']}** |" for r in baseline]
    lines += ["", END]
    return "\n".join(lines)


def update_readme(readme: Path, text: str) -> None:
    current = readme.read_text()
    if BEGIN in current and END in current:
        head, rest = current.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        new = head + text + tail
    else:
        new = current.rstrip("\n") + "\n\n" + text + "\n"
    write_text(readme, new)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=SCRIPT, description=__doc__.split("\n\nExample:")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(RESULTS), help="folder of the experiments' results (default: eval/results)")
    p.add_argument("--readme", default=str(ROOT / "eval" / "README.md"), help="the page to update (default: eval/README.md)")
    args = p.parse_args(argv)
    rows, present = collect(Path(args.results))
    update_readme(Path(args.readme), block(rows, present))
    print(f"{args.readme}: {len(rows)} measured comparisons from {len(present)} experiment(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
