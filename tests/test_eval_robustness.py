"""eval/robustness.py (experiment 3) end to end in --quick mode: the training-free part on the shipped
demo model and the after-training part on two stand-in checkpoints, then a resumed rerun."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from conftest import load_eval_script


def test_bad_flags_fail_before_any_work(tmp_path):
    script = load_eval_script("robustness")
    with pytest.raises(SystemExit, match="--rates"):
        script.main(["--quick", "--rates", "1.5", "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="not a transformers checkpoint"):
        script.main(["--quick", "--models", str(tmp_path), "--out", str(tmp_path / "b")])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def make_checkpoints(tmp_path: Path) -> list[Path]:
    """Two stand-ins for experiment 1's checkpoints: the demo model, and the demo model with its
    routers slightly perturbed (so that the std over checkpoints is not zero)."""
    import torch
    from transformers import AutoModelForCausalLM

    import hf_moe_patch as hmp

    demo = Path(hmp.demo_model_path())
    first = tmp_path / "models" / "topk_aux_seed0"
    shutil.copytree(demo, first)
    second = tmp_path / "models" / "topk_aux_seed1"
    model = AutoModelForCausalLM.from_pretrained(demo, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.mlp.gate.weight
            w.add_(0.05 * w.std() * torch.randn(w.shape, generator=gen))
    model.save_pretrained(second)
    for name in ("tokenizer.json", "tokenizer_config.json", "training_report.json"):
        shutil.copy(demo / name, second / name)
    return [first, second]


@pytest.mark.slow
def test_quick_run_writes_sane_results_and_resumes(tmp_path):
    script = load_eval_script("robustness")
    out = tmp_path / "rb"
    models = make_checkpoints(tmp_path)
    argv = ["--quick", "--out", str(out), "--models", *map(str, models)]
    assert script.main(argv) == 0
    for name in ("results.json", "README.md", "robustness_training_free.png", "robustness_trained.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    routers = script.QUICK["routers"]
    n_cells = 1 + len(script.KINDS) * len(script.QUICK["rates"])
    assert results["cells_total"] == (1 + len(models)) * len(routers) * n_cells
    assert results["cells_computed"] == results["cells_total"] and results["cells_from_cache"] == 0

    demo = results["training_free"]
    assert {r["router"] for r in demo["records"]} == set(routers)
    for r in demo["records"]:
        assert math.isfinite(r["perplexity"]) and r["perplexity"] > 1.0
        assert -1.0 <= r["mteb"]["mean"] <= 1.0
        assert 0.0 < r["experts_per_token"] <= 16.0
    clean = {r["router"]: r for r in demo["records"] if r["kind"] == "clean"}
    assert clean["native"]["experts_per_token"] == 4.0
    for key in routers:
        for kind in script.KINDS:
            series = demo["aggregate"][key][kind]
            assert [s["rate"] for s in series] == [0.0, *script.QUICK["rates"]]
            # Corruption at rate 0.2 makes held-out text harder to predict for every router.
            assert series[-1]["perplexity"]["mean"] > series[0]["perplexity"]["mean"]
    # The corrupted perplexity covers the same documents: more tokens than the clean text.
    junk = {r["router"]: r for r in demo["records"] if r["kind"] == "junk"}
    assert junk["native"]["tokens"] > clean["native"]["tokens"]

    trained = results["trained"]
    assert len(trained["models"]) == 2 and "mteb" not in trained["records"][0]
    for key in routers:
        for kind in script.KINDS:
            row = trained["aggregate"][key][kind][-1]
            assert row["perplexity"]["n"] == 2 and row["perplexity"]["std"] > 0.0
            assert row["perplexity_ratio_to_clean"]["mean"] > 1.0
    readme = (out / "README.md").read_text()
    assert "## Findings" in readme and "After training" in readme and "python eval/robustness.py --quick" in readme

    # A rerun reads every cell back from the cache and reports the same numbers.
    assert script.main(argv) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["cells_from_cache"] == again["cells_total"] and again["cells_computed"] == 0
    assert [r["perplexity"] for r in again["training_free"]["records"]] == [r["perplexity"] for r in demo["records"]]


@pytest.mark.slow
def test_quick_run_without_checkpoints_says_so(tmp_path):
    script = load_eval_script("robustness")
    out = tmp_path / "rb"
    assert script.main(["--quick", "--no-mteb", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["trained"]["models"] == [] and "--models" in results["trained"]["note"]
    assert "No checkpoints evaluated" in (out / "README.md").read_text()
    assert not (out / "robustness_trained.png").exists()


def test_cells_of_another_task_build_are_measured_again(tmp_path, monkeypatch):
    """A cached MTEB cell is reused only for the same WordNet task build (issue 11 changed a task)."""
    import hf_moe_patch.data.wordnet_tasks as wordnet_tasks

    script = load_eval_script("robustness")
    argv = ["--quick", "--out", str(tmp_path / "rb"), "--routers", "native", "--kinds", "junk"]
    assert script.main(argv) == 0
    assert script.main(argv) == 0
    assert json.loads((tmp_path / "rb" / "results.json").read_text())["cells_computed"] == 0
    monkeypatch.setattr(wordnet_tasks, "BUILD_VERSION", wordnet_tasks.BUILD_VERSION + 1)
    assert script.main(argv) == 0
    results = json.loads((tmp_path / "rb" / "results.json").read_text())
    assert results["cells_computed"] == results["cells_total"] == 2
