"""eval/gpu_scale.py (routers at real widths on a GPU) in its CPU smoke mode: --device cpu --quick."""

from __future__ import annotations

import json
import math

import pytest

from conftest import load_eval_script


def test_missing_cuda_device_fails_at_once_with_a_clear_message(monkeypatch, tmp_path):
    import torch

    script = load_eval_script("gpu_scale")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        script.main(["--device", "cuda", "--out", str(tmp_path / "gs")])
    assert "no CUDA device" in str(exc.value.code)
    assert not (tmp_path / "gs").exists()


def test_quick_cpu_run_writes_every_router_with_finite_ratios(tmp_path):
    script = load_eval_script("gpu_scale")
    out = tmp_path / "gs"
    assert script.main(["--device", "cpu", "--quick", "--out", str(out)]) == 0
    for name in ("results.json", "README.md", "gpu_scale.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert results["environment"]["torch"] and results["environment"]["transformers"]
    assert results["command"].startswith("python eval/gpu_scale.py")
    assert [m["family"] for m in results["models"]] == ["olmoe", "mixtral"]
    for m in results["models"]:
        expected = [label for label, _, _ in script.routers(m["top_k"])]
        assert list(m["routers"]) == expected
        assert m["rounds"] == 3 and m["num_experts"] in (64, 8)
        native = m["routers"][script.NATIVE]["summary"]
        assert native["prefill"]["rate_ratio"]["median"] == 1.0 and native["train"]["time_ratio"]["median"] == 1.0
        for label, rec in m["routers"].items():
            s = rec["summary"]
            for kind in ("prefill", "train"):
                for key in ("time_ratio", "rate_ratio"):
                    q = s[kind][key]
                    assert all(math.isfinite(q[x]) and q[x] > 0 for x in ("median", "q25", "q75")), (label, kind)
                    assert q["q25"] <= q["median"] <= q["q75"]
                assert math.isfinite(s[kind]["median_tokens_per_second"]) and s[kind]["median_tokens_per_second"] > 0
                assert rec["memory"][kind] is None  # peak memory: CUDA only
            assert len(rec["times_seconds"]["prefill"]) == 3
            assert 0 < rec["experts_per_token"] <= m["num_experts"]
        assert m["routers"]["usmoe k/2"]["experts_per_token"] == pytest.approx(m["top_k"] / 2)
    readme = (out / "README.md").read_text()
    assert "usmoe k/2" in readme and "python eval/gpu_scale.py --device cpu --quick" in readme


def test_a_failing_router_is_reported_and_left_out(monkeypatch, tmp_path):
    """On a lent GPU there is one try: a router that fails (a kernel, out of memory) must not
    lose the others' numbers."""
    import hf_moe_patch as hmp

    script = load_eval_script("gpu_scale")
    original = hmp.patch

    def patch(model, method=None, **options):
        if method == "expert_choice":
            raise RuntimeError("simulated CUDA failure")
        return original(model, method, **options)

    monkeypatch.setattr(hmp, "patch", patch)
    out = tmp_path / "gs"
    assert script.main(["--device", "cpu", "--quick", "--models", "mixtral", "--repeats", "2", "--min-repeats", "1",
                        "--out", str(out)]) == 0
    (m,) = json.loads((out / "results.json").read_text())["models"]
    assert "expert_choice" not in m["routers"] and "simulated CUDA failure" in m["failed_routers"]["expert_choice"]
    assert m["rounds"] == 2 and "usmoe k/2" in m["routers"]
    assert "expert_choice failed" in (out / "README.md").read_text()
