"""The command line, end to end, in a subprocess as a user would run it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import SMALL_TASKS, TINY_DEMO, WORDNET_FIXTURE


def run(*args: str, cwd=None, env: dict | None = None) -> subprocess.CompletedProcess:
    """The command line in a fresh process; ``env`` entries are added to the environment (None
    removes one)."""
    import os

    full = dict(os.environ)
    for key, value in (env or {}).items():
        if value is None:
            full.pop(key, None)
        else:
            full[key] = value
    return subprocess.run([sys.executable, "-m", "hf_moe_patch.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600, env=full)


SUBCOMMANDS = ["demo", "mteb", "train-demo", "sft", "sft-compare", "methods", "stats", "push"]


@pytest.mark.parametrize("sub", [[]] + [[s] for s in SUBCOMMANDS])
def test_help(sub):
    out = run(*sub, "--help")
    assert out.returncode == 0 and "usage: hf-moe-patch" in out.stdout
    assert "`" not in out.stdout  # no RST (or markdown) markup in the terminal's help
    assert "Exit status:" in out.stdout and "--debug" in out.stdout
    if sub:
        description = out.stdout.split("\n\n")[1]
        assert not description.startswith(("positional", "options")) and len(description) > 80, description


def test_every_sft_flag_says_what_it_does_and_its_default():
    from hf_moe_patch.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in ("sft", "sft-compare"):
        for action in sub.choices[name]._actions:
            if action.dest in ("help", "verbose", "quiet", "debug"):
                continue
            assert action.help and len(action.help) > 15, (name, action.dest)
            if action.option_strings:
                assert "(default: " in action.help, (name, action.option_strings, action.help)
    help_text = run("sft", "--help").stdout
    assert "--lora-r LORA_R" in help_text and "LoRA rank (default: 8)" in help_text
    assert "(default: 200)" in help_text and "(default: wordnet)" in help_text


def test_methods_lists_options_and_ranges():
    out = run("methods")
    assert out.returncode == 0
    for text in ("usmoe", "alpha = 0.5", "(a number in [0, 1])", "ssr", "epsilon = 0.05", "expert_choice",
                 "(None (the native k) or a number in (0, N] (N experts))"):
        assert text in out.stdout
    # Whole descriptions, not their first line cut mid-sentence.
    text = " ".join(out.stdout.split())
    assert "valid tokens by S = softmax_experts(Z); the gate is S" in text
    assert "Use it for analysis, or use causal=True for generation." in text
    assert "weight of the expert-softmax term in U" in text  # each option says what it is
    assert "`" not in out.stdout


def test_methods_shows_the_ranges_of_a_given_model():
    out = run("methods", "usmoe", "expert_choice", "--model", "demo")
    assert out.returncode == 0, out.stderr
    assert "N=16 routed experts, native k=4" in out.stdout
    assert "(None (the native k=4) or a number in (0, 16] (N experts))" in out.stdout
    assert [line for line in out.stdout.splitlines() if line and not line.startswith(" ")][1:] == ["usmoe", "expert_choice"]
    bad = run("methods", "usmo")
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "hf-moe-patch: error: unknown routing method 'usmo'. Did you mean 'usmoe'? Methods: topk, usmoe, expert_choice, ssr, top_p")


SMALL_SIZES = json.dumps(SMALL_TASKS)


def test_mteb_end_to_end_on_a_saved_model(tiny_demo, tmp_path):
    """`mteb MODEL` loads through from_pretrained, sweeps fractional budgets, corrupts texts;
    progress is one line per routing, with no progress bars and no warnings in a log."""
    path, _ = tiny_demo
    out = run("mteb", str(path), "--methods", "topk,usmoe", "--top-k", "1x", "0.5x", "--tasks", "WordNetWuPalmerSTS",
              "--wordnet", str(WORDNET_FIXTURE), "--wordnet-sizes", SMALL_SIZES, "--corrupt", "junk:0.2",
              "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"))
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "out" / "mteb_comparison.json").read_text())
    assert [r["label"] for r in data["runs"]] == ["topk", "usmoe:top_k=1x", "usmoe:top_k=0.5x"]
    assert data["runs"][2]["stats"]["experts_per_token_mean"] == pytest.approx(1.0, abs=0.1)
    assert data["settings"]["corruption"] == {"kind": "junk", "rate": 0.2, "seed": 0}
    assert "| WordNetWuPalmerSTS | STS | cosine_spearman |" in out.stdout
    assert (tmp_path / "out" / "mteb_comparison.png").is_file()
    lines = out.stderr.splitlines()
    assert lines[0].startswith("[1/3] topk on task WordNetWuPalmerSTS (elapsed ") and "ETA" in lines[0]
    assert lines[1].startswith("[2/3] usmoe:top_k=1x on task WordNetWuPalmerSTS") and "ETA" in lines[1]
    assert lines[2].startswith("[3/3] usmoe:top_k=0.5x") and lines[3].startswith("done: 3 routings in ")
    assert len(lines) == 4 and "\r" not in out.stderr, out.stderr  # no bars, no warnings


def test_mteb_reference_flag_runs_the_official_pipeline(tiny_demo, tmp_path):
    path, _ = tiny_demo
    out = run("mteb", str(path), "--methods", "topk", "--reference", "--tasks", "WordNetLexnameClustering",
              "--wordnet", str(WORDNET_FIXTURE), "--wordnet-sizes", SMALL_SIZES,
              "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"))
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "out" / "mteb_comparison.json").read_text())
    assert data["settings"]["reference"] is True
    assert "moee_sum-reference" in data["runs"][0]["model_name"]


def test_mteb_calibrates_causal_routings_on_wordnet_train_text(tiny_demo, tmp_path):
    """A causal routing without thresholds is calibrated once (on WordNet train-split documents),
    before the evaluation; its thresholds are recorded with the run."""
    path, _ = tiny_demo
    out = run("mteb", str(path), "--methods", "topk,usmoe:causal=true,top_k=1", "--tasks", "WordNetWuPalmerSTS",
              "--wordnet", str(WORDNET_FIXTURE), "--wordnet-sizes", SMALL_SIZES, "--calibration-texts", "20",
              "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"))
    assert out.returncode == 0, out.stderr
    run_ = json.loads((tmp_path / "out" / "mteb_comparison.json").read_text())["runs"][1]
    assert run_["label"] == "usmoe:causal=true,top_k=1"
    options = run_["options"]
    assert len(options["thresholds"]) == 2 and options["calibration_info"]["sequences"] == 20
    assert run_["stats"]["experts_per_token_mean"] == pytest.approx(1.0, rel=0.25)
    assert "calibrating usmoe:causal=true,top_k=1" in out.stderr


def test_stats_needs_calibration_text_for_a_causal_routing(tmp_path):
    out = run("stats", "demo", "--methods", "usmoe:causal=true", "--out", str(tmp_path / "out"))
    assert "a causal routing without thresholds needs text to calibrate on: pass --calibration-file PATH" in one_line_error(out)
    (tmp_path / "cal.txt").write_text("a small dog\nthe act of running fast\na tall tree with needles\n")
    out = run("stats", "demo", "--methods", "topk", "usmoe:causal=true,top_k=2", "--calibration-file",
              str(tmp_path / "cal.txt"), "--texts", str(tmp_path / "cal.txt"), "--out", str(tmp_path / "out"))
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "out" / "routing_stats.json").read_text())
    # Measured on the calibration text itself: 2 experts per token, up to a tie of the texts'
    # identical first tokens (at most one cell per layer here: 2 +- 1/17).
    assert rows[1]["experts_per_token_mean"] == pytest.approx(2.0, abs=1 / 17 + 1e-9)


def test_mteb_rejects_bad_options_with_a_clear_message(tiny_demo, tmp_path):
    path, _ = tiny_demo
    out = run("mteb", str(path), "--methods", "usmoe:alpha=3", "--tasks", "WordNetWuPalmerSTS",
              "--wordnet", str(WORDNET_FIXTURE), "--cache-dir", str(tmp_path))
    assert out.returncode != 0 and "Invalid value for option 'alpha'" in out.stderr
    out = run("mteb", str(path), "--corrupt", "junk:2", "--wordnet", str(WORDNET_FIXTURE), "--cache-dir", str(tmp_path))
    assert out.returncode != 0 and "rate=2.0 is not valid; valid range: a number in [0, 1]" in out.stderr


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(124)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def unloadable_model(tmp_path_factory):
    """A saved tiny OLMoE (8 experts, k=2) whose config and tokenizer are fine but whose weights
    cannot be loaded: any error other than the one asked for means the weights were touched."""
    from hf_moe_patch.testing import tiny_model

    path = tmp_path_factory.mktemp("broken") / "model"
    tiny_model("olmoe").save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    (path / "model.safetensors").write_bytes(b"not a safetensors file")
    return path


def one_line_error(out: subprocess.CompletedProcess) -> str:
    """The single stderr line of a failed run, without its prefix; fails on anything else."""
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hf-moe-patch: error: "), out.stderr[-3000:]
    return lines[0].removeprefix("hf-moe-patch: error: ")


@pytest.mark.parametrize("args, message", [
    (["--methods", "usmo"], "Unknown routing method 'usmo'. Did you mean 'usmoe'? Supported methods: topk, usmoe, expert_choice, ssr, top_p."),
    (["--methods", ","], "no routing given in --methods; give one or more of topk, usmoe, expert_choice, ssr, top_p"),
    (["--methods", ""], "no routing given in --methods"),
    (["--methods", "usmoe:alpah=0.3"], "Unknown option 'alpah' for routing method 'usmoe'. Did you mean 'alpha'?"),
    (["--methods", "topk:topk=2"], "Unknown option 'topk' for routing method 'topk'. Did you mean 'top_k'? Valid options: top_k."),
    (["--methods", "topk:top_k=9"], "Invalid value for option 'top_k' of routing method 'topk': 9. "
                                    "Valid: None (the native k=2: the native router itself) or an integer in [1, 8] (N experts)."),
    (["--methods", "top_p:p=0"], "Invalid value for option 'p' of routing method 'top_p': 0. Valid: a number in (0, 1]."),
    (["--methods", "usmoe:top_k=0x"], "A multiple of the native k must be > 0"),
    # A range that depends on the model: checked from its config, before the weights.
    (["--methods", "usmoe:top_k=9"], "Invalid value for option 'top_k' of routing method 'usmoe': 9. "
                                     "Valid: None (the native k=2) or a number in (0, 8] (N experts)."),
    (["--top-k", "lots"], "top_k='lots' is not valid; use a number of experts (e.g. 1.5) or a multiple"),
    (["--tasks", ""], "--tasks was given no value; e.g. --tasks WordNetWuPalmerSTS"),
    (["--tasks", "WordNetWuPalmerSTs"], "unknown task 'WordNetWuPalmerSTs'. Did you mean 'WordNetWuPalmerSTS'?"),
    (["--tasks", "STS12x"], "unknown task 'STS12x'. Did you mean 'STS12'?"),
    (["--dtype", "bogus"], "mteb: argument --dtype: invalid choice: 'bogus'"),
    (["--dtype", "bfloat"], "Did you mean 'bfloat16'?"),
    (["--wordnet-sizes", "{nope"], "--wordnet-sizes is not valid JSON"),
    (["--wordnet", "/no/wordnet/here"], "WordNet 3.0 database files were not found"),
    (["--calibration-texts", "0"], "--calibration-texts=0 is not valid; an integer >= 1"),
    (["--calibration-file", "/no/such/file.txt"], "--calibration-file /no/such/file.txt: no such file"),
    (["--methods", "usmoe:causal=true,scope=\"batch\""], "Invalid value for option 'scope' of routing method 'usmoe'"),
])
def test_mteb_checks_every_argument_before_loading_the_model(unloadable_model, tmp_path, args, message):
    out = run("mteb", str(unloadable_model), "--wordnet", str(WORDNET_FIXTURE), *args,
              "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"))
    assert message in one_line_error(out)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()  # nothing written


def test_an_unwritable_output_folder_is_found_before_any_work(unloadable_model, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = run("mteb", str(unloadable_model), "--tasks", "WordNetWuPalmerSTS", "--wordnet", str(WORDNET_FIXTURE),
              "--out", str(blocker / "out"), "--cache-dir", str(tmp_path / "cache"))
    assert one_line_error(out) == f"--out={str(blocker / 'out')!r} cannot be created: {str(blocker)!r} is a file"
    out = run("stats", str(unloadable_model), "--out", "/proc/hf-moe-patch-test/out")  # read-only even for root
    assert one_line_error(out).startswith("--out='/proc/hf-moe-patch-test/out' cannot be written: '/proc' is not writable")
    out = run("mteb", str(unloadable_model), "--tasks", "WordNetWuPalmerSTS", "--wordnet", str(WORDNET_FIXTURE),
              "--cache-dir", str(blocker), "--out", str(tmp_path / "out"))
    assert "--cache-dir=" in one_line_error(out) and "is a file" in out.stderr


def test_debug_shows_the_traceback(unloadable_model):
    out = run("--debug", "mteb", str(unloadable_model), "--methods", "usmo")
    assert out.returncode != 0 and "Traceback (most recent call last)" in out.stderr
    assert "InvalidOptionError: Unknown routing method 'usmo'" in out.stderr
    after = run("mteb", str(unloadable_model), "--methods", "usmo", "--debug")  # after the subcommand too
    assert "Traceback (most recent call last)" in after.stderr


def test_a_failure_while_running_is_one_line_with_status_1(unloadable_model, tmp_path):
    """The weights cannot be read: a runtime failure (status 1), still one line, naming its type."""
    out = run("stats", str(unloadable_model), "--methods", "topk", "--out", str(tmp_path / "o"))
    assert out.returncode == 1, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hf-moe-patch: error: ") and "--debug" in lines[0], out.stderr[-2000:]


@pytest.mark.parametrize("args", [["mteb", "{m}"], ["stats", "{m}"], ["sft", "{m}"], ["methods", "--model", "{m}"],
                                  ["push", "{m}", "me/repo"]])
def test_a_missing_local_path_says_so(tmp_path, args):
    missing = str(tmp_path / "no" / "such" / "model")
    out = run(*[a.format(m=missing) for a in args], cwd=tmp_path,
              env={"HF_TOKEN": "hf_dummy", "HF_MOE_PATCH_WORDNET": str(WORDNET_FIXTURE)})
    assert one_line_error(out) == (f"no such folder: {missing!r} (a model is 'demo', a local folder with config.json, "
                                   f"or a Hub id such as owner/name)")


def hub_is_reachable() -> bool:
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=2).close()
    except OSError:
        return False
    return True


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


OFFLINE_SETTINGS = {
    "HF_HUB_OFFLINE=1": ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE=1 is set"),
    "no route to the Hub": ({}, "huggingface.co cannot be reached"),
    "nothing listening at HF_ENDPOINT": ({"HF_ENDPOINT": "closed"}, "127.0.0.1 cannot be reached: Connection refused"),
}


@pytest.fixture(params=list(OFFLINE_SETTINGS))
def offline(request, tmp_path):
    env, reason = OFFLINE_SETTINGS[request.param]
    if request.param == "no route to the Hub" and hub_is_reachable():
        pytest.skip("this machine reaches huggingface.co")
    env = {**env, "HF_HOME": str(tmp_path / "hf_home")}  # an empty cache
    if env.get("HF_ENDPOINT") == "closed":
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{closed_port()}"
    return env, reason


@pytest.fixture(scope="module")
def startup_seconds(tmp_path_factory) -> float:
    """How long the command takes to fail for a local reason (a missing folder) on this machine
    now: its imports and start-up, the part of an offline failure that is not waiting for the
    network. The offline tests allow that twice plus 10 s (transformers' retries took 35-51 s)."""
    import time

    missing = str(tmp_path_factory.mktemp("startup") / "no" / "such" / "model")
    start = time.perf_counter()
    run("stats", missing)
    return time.perf_counter() - start


def quick_enough(elapsed: float, startup: float) -> bool:
    return elapsed < max(15.0, 2 * startup + 10.0)


@pytest.mark.parametrize("args, instead", [
    (["mteb", "allenai/OLMoE-1B-7B-0924"], "use the shipped model 'demo' or a local folder"),
    (["stats", "allenai/OLMoE-1B-7B-0924"], "use the shipped model 'demo' or a local folder"),
    (["sft", "allenai/OLMoE-1B-7B-0924"], "use the shipped model 'demo' or a local folder"),
    (["mteb", "--tasks", "STS12"], "use the local WordNet tasks (WordNetLexnameClassification, "),
    (["sft", "demo", "--dataset", "tatsu-lab/alpaca"], "use --dataset wordnet (built in) or a local .json/.jsonl/.parquet file"),
])
def test_offline_a_hub_model_task_or_data_set_fails_at_once_saying_what_to_use(offline, tmp_path, args, instead,
                                                                             startup_seconds):
    """No network (or HF_HUB_OFFLINE=1): one line within seconds, not a minute of retries."""
    import time

    env, reason = offline
    start = time.perf_counter()
    out = run(*args, "--out" if args[0] != "sft" else "--output-dir", str(tmp_path / "out"), env=env)
    elapsed = time.perf_counter() - start
    message = one_line_error(out)
    assert "offline" in message and reason in message and instead in message, message
    assert quick_enough(elapsed, startup_seconds), (elapsed, startup_seconds)  # ~3 s of imports on a quiet machine


def test_push_without_a_token_says_how_to_log_in(tmp_path, startup_seconds):
    import time

    start = time.perf_counter()
    out = run("push", "demo", "me/demo-usmoe", "--method", "usmoe", env={"HF_HOME": str(tmp_path / "h"), "HF_TOKEN": None})
    assert one_line_error(out) == ("push needs a Hugging Face token with write access: log in with `hf auth login` "
                                   "(or set HF_TOKEN, or pass --token)")
    assert quick_enough(time.perf_counter() - start, startup_seconds)


def test_push_offline_fails_at_once(tmp_path):
    out = run("push", "demo", "me/demo-usmoe", "--method", "usmoe",
              env={"HF_HOME": str(tmp_path / "h"), "HF_TOKEN": "hf_dummy", "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"})
    assert one_line_error(out).startswith("push needs the Hugging Face Hub, which is offline (127.0.0.1 cannot be reached")


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


def test_push_demo_names_the_shipped_model(tmp_path):
    """`push demo` pushes the shipped model, patched with --method (it has no routing of its own)."""
    from test_hub import LocalHub

    hub = LocalHub()
    try:
        env = {"HF_ENDPOINT": f"http://127.0.0.1:{hub.port}", "HF_TOKEN": "hf_dummy", "HF_HOME": str(tmp_path / "h")}
        refused = run("push", "demo", "me/demo", env=env)
        out = run("push", "demo", "me/demo-usmoe", "--method", "usmoe:top_k=3", env=env)
    finally:
        hub.close()
    assert one_line_error(refused) == "'demo' was saved without a routing; pass --method METHOD[:key=value,...] to patch it before pushing"
    assert out.returncode == 0, out.stderr[-2000:]
    (commit,) = hub.commits
    config = json.loads(commit["files"]["config.json"])
    assert config["moe_routing"]["method"] == "usmoe" and config["moe_routing"]["options"]["top_k"] == 3
    assert config["model_type"] == "olmoe" and "tokenizer.json" in commit["files"]


def test_stats_on_the_demo_model_escapes_its_table(tmp_path):
    out = run("stats", "demo", "--methods", "topk", "usmoe:top_k=0.5x", "--out", str(tmp_path / "o"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| KL(native \\|\\| method) |" in out.stdout and "| usmoe:top_k=0.5x |" in out.stdout
    header = next(line for line in out.stdout.splitlines() if line.startswith("| routing |"))
    assert len(header.replace("\\|", "").split("|")) - 2 == 9  # nine columns: the || does not add any
    assert "Statistics over the --text text (" in out.stdout
    rows = json.loads((tmp_path / "o" / "routing_stats.json").read_text())
    assert rows[1]["experts_per_token_mean"] == pytest.approx(2.0, abs=0.2)  # 0.5 x the demo's k=4
    assert out.stderr.splitlines()[0].startswith("[1/2] routing statistics of topk")


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


def test_the_help_names_the_local_tasks_as_the_package_defines_them():
    from hf_moe_patch.cli.evaluate import LOCAL_TASKS
    from hf_moe_patch.data.wordnet_tasks import WORDNET_TASKS

    assert tuple(LOCAL_TASKS) == tuple(WORDNET_TASKS)


def test_argparse_errors_are_one_line_too():
    out = run()
    assert one_line_error(out) == "the following arguments are required: SUBCOMMAND (see hf-moe-patch --help)"
    out = run("mteb", "--batch-size", "many")
    assert one_line_error(out) == "mteb: argument --batch-size: invalid int value: 'many' (see hf-moe-patch mteb --help)"
