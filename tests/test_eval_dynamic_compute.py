"""eval/dynamic_compute.py (issue 12's evidence) end to end in --quick mode on the shipped demo model."""

from __future__ import annotations

import json
import math

import pytest

from conftest import load_eval_script


def test_pareto_front_and_spearman_by_hand():
    script = load_eval_script("dynamic_compute")
    pts = [("a", 1.0, 30.0), ("b", 2.0, 20.0), ("c", 2.0, 25.0), ("d", 4.0, 20.0), ("e", 4.0, 10.0)]
    assert script.pareto(pts, lower_is_better=True) == ["a", "b", "e"]
    assert script.pareto([(l, x, -y) for l, x, y in pts], lower_is_better=False) == ["a", "b", "e"]
    assert script.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert script.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


@pytest.mark.slow
def test_quick_run_writes_sane_results_and_resumes(tmp_path):
    script = load_eval_script("dynamic_compute")
    out = tmp_path / "dc"
    assert script.main(["--quick", "--out", str(out)]) == 0
    for name in ("results.json", "README.md", "pareto_perplexity.png", "pareto_mteb.png", "pareto_time.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    runs = {r["label"]: r for r in results["routings"]}
    assert set(runs) == set(script.QUICK_LABELS)
    native = runs[script.NATIVE]
    # The native router takes exactly its k experts on every token of every layer.
    assert native["experts_per_token"] == 4.0
    assert all(layer["experts_per_token_mean"] == 4.0 for layer in native["layers"])
    assert runs["topk:top_k=2"]["experts_per_token"] == 2.0
    for r in runs.values():
        assert math.isfinite(r["perplexity"]) and 1.0 < r["perplexity"] < 4096
        assert 0.0 < r["experts_per_token"] <= 16.0
        assert len(r["layers"]) == 4
        assert -1.0 <= r["mteb"]["mean"] <= 1.0
        assert 0.0 <= r["generation"]["cached_vs_uncached"]["token_agreement"] <= 1.0
    # Causal routers, top_p and topk decode the same with and without the KV cache.
    for label in ("usmoe:top_k=2,causal", "expert_choice:top_k=2,causal", "top_p:p=0.5", "topk:top_k=2", script.NATIVE):
        assert runs[label]["generation"]["cached_vs_uncached"]["exact"], label
    causal = runs["usmoe:top_k=2,causal"]
    assert len(causal["thresholds"]) == 4 and causal["calibration_info"]["sequences"] > 0
    assert all("relative_deviation_from_budget" in layer for layer in causal["layers"])
    # The per-routing cache is reused by a rerun; the numbers are the same.
    assert sorted(p.name for p in (out / "routings").iterdir()) == sorted(f"{script.slug(l)}.json" for l in runs)
    assert script.main(["--quick", "--out", str(out), "--no-timing"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["routings_from_cache"] == len(runs)
    assert [r["perplexity"] for r in again["routings"]] == [r["perplexity"] for r in results["routings"]]
    readme = (out / "README.md").read_text()
    assert "## Findings" in readme and "python eval/dynamic_compute.py --quick" in readme
