"""eval/moee_embeddings.py: the smoke run on the fixture WordNet writes a report whose numbers come
from its own measurements, and a rerun reads every cell back from the cache."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from conftest import EVAL_DIR, load_eval_script

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "wordnet"


def test_quick_run_reports_measured_cells_and_reuses_the_cache(tmp_path):
    script = load_eval_script("moee_embeddings")
    out = tmp_path / "moee"
    args = ["--quick", "--out", str(out), "--wordnet", str(FIXTURE), "--log-level", "WARNING", "--models"]
    assert script.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert {(r["embedding"], r["mode"]) for r in rows if r["group"] == "embedding"} == {
        ("hs", "ours"), ("hs", "reference"), ("moee_sum", "ours"), ("moee_sum", "reference")}
    assert all(math.isfinite(r["mean"]) and set(r["scores"]) == set(script.QUICK_SIZES) for r in rows)
    ours = next(r for r in rows if r["group"] == "embedding" and r["embedding"] == "moee_sum" and r["mode"] == "ours")
    ref = next(r for r in rows if r["group"] == "embedding" and r["embedding"] == "moee_sum" and r["mode"] == "reference")
    assert ours["scores"] != ref["scores"]  # the two pipelines are measured separately
    readme = (out / "README.md").read_text()
    assert f"| MoEE(sum) | ours | prompteol | {ours['mean']:.2f} ± 0.00 | 1 |" in readme
    assert (out / "embeddings.png").stat().st_size > 0 and (out / "sweeps.png").stat().st_size > 0
    cache = sorted(p.stat().st_mtime_ns for p in (out / "mteb_cache").rglob("WordNetWuPalmerSTS.json"))
    assert script.main(args) == 0  # every cell from mteb's cache: no result file is rewritten
    assert sorted(p.stat().st_mtime_ns for p in (out / "mteb_cache").rglob("WordNetWuPalmerSTS.json")) == cache
    assert json.loads((out / "results.json").read_text())["rows"] == rows
    # --report-only rewrites the report from the saved rows and keeps what describes the measurement.
    saved = json.loads((out / "results.json").read_text())
    saved["environment"] = {**saved["environment"], "cpu": "the measuring machine's CPU"}
    (out / "results.json").write_text(json.dumps(saved))
    assert script.main(["--report-only", "--out", str(out), "--log-level", "WARNING"]) == 0
    rewritten = json.loads((out / "results.json").read_text())
    assert rewritten["environment"] == saved["environment"]
    assert "the measuring machine's CPU" in (out / "README.md").read_text()
    assert rewritten["command"] == saved["command"] and rewritten["rows"] == rows
    assert rewritten["report_rewritten_by"].endswith("--report-only --out " + str(out) + " --log-level WARNING")


def test_verdict_needs_every_seed_and_two_standard_errors():
    sys.path.insert(0, str(EVAL_DIR))
    from _common import verdict

    assert verdict([1.0, 1.2, 0.9]) == "holds"
    assert verdict([-1.0, -1.1]) == "does not hold"
    assert verdict([2.96, 0.56]) == "inconclusive"  # same sign, but the mean is within 2 standard errors
    assert verdict([0.1, -0.1, 0.2]) == "inconclusive"
    assert verdict([-1.0, -2.0], better="lower") == "holds"
    assert verdict([1.0]).startswith("inconclusive") and verdict([]).startswith("inconclusive")
