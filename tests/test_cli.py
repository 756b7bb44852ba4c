"""The command line, end to end, in a subprocess as a user would run it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import SMALL_TASKS, TINY_DEMO, WORDNET_FIXTURE


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hf_moe_patch.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.mark.parametrize("sub", [[], ["demo"], ["mteb"], ["train-demo"], ["sft"], ["sft-compare"], ["methods"], ["stats"], ["push"]])
def test_help(sub):
    out = run(*sub, "--help")
    assert out.returncode == 0 and "usage: hf-moe-patch" in out.stdout


def test_methods_lists_options_and_ranges():
    out = run("methods")
    assert out.returncode == 0
    for text in ("usmoe:", "alpha = 0.5", "(a number in [0, 1])", "ssr:", "epsilon = 0.05", "expert_choice:"):
        assert text in out.stdout


SMALL_SIZES = json.dumps(SMALL_TASKS)


def test_mteb_end_to_end_on_a_saved_model(tiny_demo, tmp_path):
    """`mteb MODEL` loads through from_pretrained, sweeps fractional budgets, corrupts texts."""
    path, _ = tiny_demo
    out = run("mteb", str(path), "--methods", "topk,usmoe", "--top-k", "1x", "0.5x", "--tasks", "WordNetWuPalmerSTS",
              "--wordnet", str(WORDNET_FIXTURE), "--wordnet-sizes", SMALL_SIZES, "--corrupt", "junk:0.2",
              "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"))
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "out" / "mteb_comparison.json").read_text())
    assert [r["label"] for r in data["runs"]] == ["topk", "usmoe:top_k=1x", "usmoe:top_k=0.5x"]
    assert data["runs"][2]["stats"]["experts_per_token_mean"] == pytest.approx(1.0, abs=0.1)
    assert data["settings"]["corruption"] == {"kind": "junk", "rate": 0.2, "seed": 0}
    assert "| WordNetWuPalmerSTS | STS |" in out.stdout
    assert (tmp_path / "out" / "mteb_comparison.png").is_file()


def test_mteb_rejects_bad_options_with_a_clear_message(tiny_demo, tmp_path):
    path, _ = tiny_demo
    out = run("mteb", str(path), "--methods", "usmoe:alpha=3", "--tasks", "WordNetWuPalmerSTS",
              "--wordnet", str(WORDNET_FIXTURE), "--cache-dir", str(tmp_path))
    assert out.returncode != 0 and "Invalid value for option 'alpha'" in out.stderr
    out = run("mteb", str(path), "--corrupt", "junk:2", "--wordnet", str(WORDNET_FIXTURE), "--cache-dir", str(tmp_path))
    assert out.returncode != 0 and "rate=2.0 is not valid; valid range: a number in [0, 1]" in out.stderr


def test_demo_runs_the_main_job_on_the_shipped_model(tmp_path):
    """`demo` on the shipped model; the fixture WordNet and small tasks keep it quick."""
    out = run("demo", "--methods", "topk", "usmoe:top_k=0.5x", "ssr:inference=sinkhorn,scope=sequence",
              "--tasks", "WordNetWuPalmerSTS", "WordNetLexnameClustering", "--wordnet", str(WORDNET_FIXTURE),
              "--wordnet-sizes", SMALL_SIZES, "--stats-texts", "30", "--cache-dir", str(tmp_path / "cache"),
              "--out", str(tmp_path / "out"))
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "out" / "mteb_comparison.json").read_text())
    assert [r["label"] for r in data["runs"]] == ["topk", "usmoe:top_k=0.5x", "ssr:inference=sinkhorn,scope=sequence"]
    assert data["runs"][1]["stats"]["experts_per_token_mean"] == pytest.approx(2.0, abs=0.1)  # 0.5 x k=4
    assert data["runs"][2]["stats"]["sinkhorn_steps"] > 0
    rows = json.loads((tmp_path / "out" / "routing_stats.json").read_text())
    assert [r["label"] for r in rows] == ["topk", "usmoe:top_k=0.5x", "ssr:inference=sinkhorn,scope=sequence"]
    assert rows[0]["kl_to_native"] == 0.0 and rows[1]["kl_to_native"] > 0
    for name in ("mteb_comparison.png", "routing_load.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| **mean (all tasks)** |" in out.stdout


def test_stats_on_a_saved_model_folder(tmp_path):
    """`stats` loads through from_pretrained, as it would from the Hub."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from hf_moe_patch.testing import tiny_model

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(124)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tiny_model("mixtral").save_pretrained(tmp_path / "m")
    fast.save_pretrained(tmp_path / "m")
    texts = tmp_path / "texts.txt"
    texts.write_text("w1 w2 w3 w4\nw5 w6\nw7 w8 w9 w10 w11 w12\n")
    out = run("stats", str(tmp_path / "m"), "--texts", str(texts), "--methods", "topk", "usmoe:top_k=1.5",
              "--out", str(tmp_path / "o"))
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "o" / "routing_stats.json").read_text())
    assert rows[0]["layers"][0]["tokens"] == 12  # padding excluded
    assert rows[1]["experts_per_token_mean"] == pytest.approx(1.5, abs=0.1)


def test_example_runs():
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "one_call.py"
    out = subprocess.run([sys.executable, str(example), "--tiny"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "bit-for-bit native again: True" in out.stdout


def test_push_end_to_end_against_a_local_hub(tmp_path):
    """`hf-moe-patch push` in a subprocess, HF_ENDPOINT pointed at the local stand-in."""
    import os

    import hf_moe_patch as hmp
    from hf_moe_patch.testing import tiny_model
    from test_hub import LocalHub

    hmp.patch(tiny_model("qwen2_moe"), "usmoe", top_k=1.5).save_pretrained(tmp_path / "m")
    (tmp_path / "eval.json").write_text(json.dumps({"STSBenchmark": 0.5}))
    hub = LocalHub()
    try:
        env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{hub.port}", "HF_TOKEN": "hf_dummy", "HF_HOME": str(tmp_path / "h")}
        out = subprocess.run([sys.executable, "-m", "hf_moe_patch.cli", "push", str(tmp_path / "m"), "me/qwen-usmoe",
                              "--remote-code", "--eval-json", str(tmp_path / "eval.json")],
                             capture_output=True, text=True, timeout=600, env=env)
    finally:
        hub.close()
    assert out.returncode == 0, out.stderr[-2000:]
    (commit,) = hub.commits
    assert {"config.json", "model.safetensors", "README.md", "modeling_hf_moe_patch.py"} <= set(commit["files"])
    assert json.loads(commit["files"]["config.json"])["moe_routing"]["options"]["top_k"] == 1.5
    assert "| STSBenchmark | 0.5 |" in commit["files"]["README.md"].decode()


# The tiny demo configuration of the tests, as train-demo options, on the fixture WordNet.
TINY_TRAIN = [item for key, value in TINY_DEMO.items() for item in (f"--{key.replace('_', '-')}", str(value))]
TINY_TRAIN += ["--wordnet", str(WORDNET_FIXTURE)]


def files(folder):
    """Every file under ``folder`` with its bytes and modification time."""
    return {p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("option, value, message", [
    ("--steps", "0", "steps=0 is not valid (--steps); valid: an integer >= 1"),
    ("--steps", "-1", "steps=-1 is not valid (--steps); valid: an integer >= 1"),
    ("--batch-size", "0", "batch_size=0 is not valid (--batch-size); valid: an integer >= 1"),
    ("--block-size", "1", "block_size=1 is not valid (--block-size); valid: an integer in [2, 512]"),
    ("--learning-rate", "0", "learning_rate=0.0 is not valid (--learning-rate); valid: a number > 0"),
])
def test_train_demo_rejects_bad_numbers_in_one_line_before_any_work(tmp_path, option, value, message):
    out = run("train-demo", *TINY_TRAIN, option, value, "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip() == f"hf-moe-patch: error: {message}"
    assert not list(tmp_path.iterdir())  # nothing was written


def test_train_demo_writes_a_new_folder_never_the_shipped_model(tmp_path):
    """Default output: ./demo-olmoe-wordnet. A non-empty folder, or the shipped assets, only with
    --force; a refused run leaves every file as it was."""
    from hf_moe_patch.training.demo_model import ASSETS

    shipped = files(ASSETS)
    first = run("train-demo", *TINY_TRAIN, "--steps", "3", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    out = tmp_path / "demo-olmoe-wordnet"
    assert (out / "config.json").is_file() and [p.name for p in tmp_path.iterdir()] == ["demo-olmoe-wordnet"]
    before = files(out)
    again = run("train-demo", *TINY_TRAIN, "--steps", "4", cwd=tmp_path)
    assert again.returncode == 2
    assert again.stderr.strip().startswith("hf-moe-patch: error: out_dir=") and "not empty" in again.stderr
    assert "--force" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    assert files(out) == before
    for folder in (ASSETS / "demo-olmoe-wordnet", ASSETS / "demo-mixtral-wordnet"):
        refused = run("train-demo", *TINY_TRAIN, "--out", str(folder), cwd=tmp_path)
        assert refused.returncode == 2 and "shipped assets" in refused.stderr and "--force" in refused.stderr
    forced = run("train-demo", *TINY_TRAIN, "--steps", "4", "--force", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert json.loads((out / "training_report.json").read_text())["args"]["steps"] == 4
    assert files(ASSETS) == shipped and not (ASSETS / "demo-mixtral-wordnet").exists()
