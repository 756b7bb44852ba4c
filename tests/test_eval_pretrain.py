"""eval/pretrain.py (issue 11, experiment 1) end to end in --quick mode: 2 routers x 1 seed."""

from __future__ import annotations

import json
import math


from conftest import load_eval_script


def test_compare_verdicts_by_hand():
    script = load_eval_script("pretrain")
    assert script.compare({0: 1.0, 1: 1.1, 2: 0.9}, {0: 2.0, 1: 2.1, 2: 1.9})[0] == "holds"
    assert script.compare({0: 2.0, 1: 2.1, 2: 1.9}, {0: 1.0, 1: 1.1, 2: 0.9})[0] == "does not hold"
    assert script.compare({0: 1.0, 1: 2.0, 2: 3.0}, {0: 1.5, 1: 2.5, 2: 0.5})[0] == "inconclusive"
    assert script.compare({0: 1.0}, {0: 2.0, 1: 3.0})[0].startswith("inconclusive")  # one paired seed
    assert script.compare({0: 1.0, 1: 1.0}, {2: 2.0, 3: 3.0})[3] == 0  # no seed in common: nothing paired


def test_quick_run_writes_finite_results_resumes_and_reports(tmp_path):
    script = load_eval_script("pretrain")
    out = tmp_path / "pt"
    routers = ["topk_aux", "ssr_p0.1"]
    argv = ["--quick", "--out", str(out), "--routers", *routers, "--seeds", "0", "--log-level", "WARNING"]
    assert script.main(argv) == 0
    for router in routers:
        path = out / "runs" / f"{router}_seed0.json"
        run = json.loads(path.read_text())
        assert run["router"] == router and run["seed"] == 0
        for key in ("val_ppl", "junk_ppl", "char_ppl", "train_maxvio", "train_maxvio_top1", "step_time_median"):
            assert math.isfinite(run[key]), (router, key)
        assert 1.0 < run["val_ppl"] < 1e5
        assert run["history"] and all(math.isfinite(h["maxvio"]) for h in run["history"])
        assert not list((out / "runs").glob("*.tmp*"))
    assert json.loads((out / "runs" / "ssr_p0.1_seed0.json").read_text())["val_ppl_other_inference"]["inference"] == "sinkhorn"
    # The top-k + aux model is kept with its tokenizer.
    model_dir = out / "models" / "topk_aux_seed0"
    assert (model_dir / "config.json").is_file() and (model_dir / "tokenizer.json").is_file()

    # A rerun skips finished runs: the run files are not rewritten.
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    assert script.main(argv) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")} == mtimes

    results = json.loads((out / "results.json").read_text())
    assert set(results["routers"]) == set(routers)
    assert results["routers"]["topk_aux"]["seeds"] == [0]
    assert results["machine"]["torch"] and results["command"].startswith("python eval/pretrain.py")
    assert {c["verdict"] for c in results["claims"]} <= {"holds", "does not hold", "inconclusive",
                                                          "inconclusive (fewer than 2 seeds)"}
    readme = (out / "README.md").read_text()
    assert "| topk_aux |" in readme and "## Claims" in readme and "not measured (--timing-only)" in readme
    for name in ("val_ppl.png", "corruption.png", "balance_training.png", "train_loss.png"):
        assert (out / name).stat().st_size > 0, name

    # Step times side by side, on the trained topk_aux weights; the speed claim pairs by round.
    assert script.main([*argv, "--timing-only", "--timing-rounds", "3", "--timing-steps", "1"]) == 0
    timing = json.loads((out / "timing.json").read_text())
    assert timing["key"]["weights"] == "models/topk_aux_seed0" and timing["median_ratio"]["topk_aux"] == 1.0
    assert all(len(v) == 3 and all(t > 0 for t in v) for v in timing["per_step_seconds"].values())
    results = json.loads((out / "results.json").read_text())
    assert results["routers"]["ssr_p0.1"]["step_time_rel"]["n"] == 3
    assert (out / "step_time.png").stat().st_size > 0

    # --report-only aggregates what exists without training.
    (out / "README.md").unlink()
    assert script.main([*argv, "--report-only"]) == 0
    assert (out / "README.md").is_file()


