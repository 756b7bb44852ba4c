"""Errors a user can act on, from the Python API: checked before a model loads, one clear
sentence each, with suggestions and never an empty list (issue: errors a user can act on)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest

import hf_moe_patch as hmp
from hf_moe_patch.hub_access import locate_model
from hf_moe_patch.lm import load_model_and_tokenizer
from hf_moe_patch.methods import NativeRouting, RoutingMethod
from hf_moe_patch.testing import tiny_config, tiny_model
from hf_moe_patch.validation import check_routings, check_writable_dir, native_from_config, parse_routings


def test_a_method_without_options_says_so_instead_of_an_empty_list():
    @dataclasses.dataclass
    class Bare(RoutingMethod):
        name = "bare"

    with pytest.raises(hmp.InvalidOptionError) as err:
        Bare.from_options({"top_k": 2})
    assert str(err.value) == "Unknown option 'top_k' for routing method 'bare'. 'bare' takes no options."
    with pytest.raises(hmp.InvalidOptionError, match="Did you mean .alpha.\\? Valid options: alpha, calibration_info, causal, max_experts, min_experts, "):
        hmp.patch(tiny_model("olmoe"), "usmoe", alpah=0.3)


def test_topk_and_top_p_name_the_option_the_value_and_the_valid_range():
    # topk takes top_k now: a bad name lists it, never an empty list ("Valid options: .").
    with pytest.raises(hmp.InvalidOptionError) as err:
        hmp.patch(tiny_model("olmoe"), "topk", topk=2)
    assert str(err.value) == ("Unknown option 'topk' for routing method 'topk'. Did you mean 'top_k'? "
                              "Valid options: top_k.")
    # tiny OLMoE: N = 8 experts, k = 2.
    with pytest.raises(hmp.InvalidOptionError) as err:
        hmp.patch(tiny_model("olmoe"), "topk", top_k=99)
    assert str(err.value) == ("Invalid value for option 'top_k' of routing method 'topk': 99. "
                              "Valid: None (the native k=2: the native router itself) or an integer in [1, 8] (N experts).")
    with pytest.raises(hmp.InvalidOptionError) as err:
        hmp.patch(tiny_model("olmoe"), "top_p", max_k=9)
    assert str(err.value) == ("Invalid value for option 'max_k' of routing method 'top_p': 9. "
                              "Valid: None (no cap) or an integer in [1, 8] (N experts).")


@pytest.mark.parametrize("specs, message", [
    (["usmo"], "Unknown routing method 'usmo'. Did you mean 'usmoe'? Supported methods: topk, usmoe, expert_choice, ssr, top_p."),
    ([], "no routing given in methods"),
    ([":alpha=1"], "':alpha=1' in methods names no routing method"),
    (["usmoe:alpha"], "Option 'alpha' in 'usmoe:alpha' is not of the form key=value."),
    (["usmoe:alhpa=1"], "Unknown option 'alhpa' for routing method 'usmoe'. Did you mean 'alpha'?"),
    (["usmoe:alpha=3"], "Invalid value for option 'alpha' of routing method 'usmoe': 3. Valid: a number in [0, 1]."),
    (["usmoe:scope=global"], "Valid: one of 'sequence', 'batch'."),
    (["usmoe:top_k=-1"], "Valid: None (the native k) or a number in (0, N] (N experts)."),
    (["usmoe:top_k=lots"], "top_k='lots' is not valid; use a number of experts (e.g. 1.5) or a multiple of the native k"),
    (["usmoe:min_experts=1.5"], "Valid: an integer in [0, N] (N experts)."),
    (["ssr:seed=1.5"], "Valid: None or an integer in [0, 2**63 - 2]."),
    (["topk:top_k=1.5"], "Valid: None (the native k: the native router itself) or an integer in [1, N] (N experts)."),
    (["top_p:p=1.5"], "Invalid value for option 'p' of routing method 'top_p': 1.5. Valid: a number in (0, 1]."),
    (["top_p:max_k=0"], "Valid: None (no cap) or an integer in [1, N] (N experts)."),
    (["top_p:pp=0.5"], "Unknown option 'pp' for routing method 'top_p'. Did you mean 'p'?"),
])
def test_routings_are_checked_without_a_model(specs, message):
    with pytest.raises(ValueError) as err:
        parse_routings(specs)
    assert message in str(err.value)
    assert ": ." not in str(err.value) and "[]" not in str(err.value)


def test_ranges_that_depend_on_the_model_are_checked_from_its_config():
    config = tiny_config("mixtral")  # 8 experts, k=2: what AutoConfig gives without the weights
    native = native_from_config(config)
    assert (native.num_experts, native.top_k) == (8, 2)
    cases = check_routings(parse_routings(["usmoe:top_k=0.75x", "expert_choice:top_k=8"]), native)
    assert [c.options["top_k"] for c in cases] == [1.5, 8]
    with pytest.raises(hmp.InvalidOptionError, match=r"'top_k' of routing method 'usmoe': 9. Valid: None \(the native k=2\) "
                                                     r"or a number in \(0, 8\]"):
        check_routings(parse_routings(["usmoe:top_k=9"]), native)
    with pytest.raises(hmp.InvalidOptionError, match=r"'top_k' of routing method 'usmoe': 10.0"):
        check_routings(parse_routings(["usmoe:top_k=5x"]), native)
    config.model_type = "llama"
    with pytest.raises(hmp.UnsupportedModelError, match="cannot patch model_type 'llama'. Supported model types: olmoe"):
        native_from_config(config)
    assert NativeRouting(num_experts=8, top_k=2) == native


def test_output_folders_are_checked_without_writing_anything(tmp_path):
    assert check_writable_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert list(tmp_path.iterdir()) == []  # nothing created, nothing left
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="out='.*file' is a file"):
        check_writable_dir(tmp_path / "file")
    with pytest.raises(NotADirectoryError, match="cannot be created: '.*file' is a file"):
        check_writable_dir(tmp_path / "file" / "sub", flag="--out")
    with pytest.raises(PermissionError, match="'/proc' is not writable"):
        check_writable_dir("/proc/hf-moe-patch/out")


def test_model_names_demo_missing_paths_and_folders_that_are_not_models(tmp_path):
    path, extra = locate_model("demo")
    assert path == str(hmp.demo_model_path()) and extra == {}
    for missing in ("./nope", str(tmp_path / "nope"), "a/b/c", "~/hf-moe-patch-nope"):
        with pytest.raises(FileNotFoundError, match="no such folder: .* \\(a model is 'demo', a local folder with "
                                                    "config.json, or a Hub id such as owner/name\\)"):
            locate_model(missing)
    with pytest.raises(FileNotFoundError, match="is a folder without config.json, not a saved model"):
        locate_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such folder: './nope'"):
        load_model_and_tokenizer("./nope")
    with pytest.raises(ValueError, match="dtype='bf16' is not valid; valid: auto, float32, bfloat16, float16"):
        load_model_and_tokenizer("demo", dtype="bf16")


def test_demo_names_the_shipped_model_in_from_pretrained():
    model = hmp.from_pretrained("demo")
    assert model.config.model_type == "olmoe" and hmp.routing_config(model) is None
    with pytest.raises(FileNotFoundError, match="no such folder: './no/model'"):
        hmp.from_pretrained("./no/model")


OFFLINE_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import hf_moe_patch as hmp
    start = time.perf_counter()
    try:
        hmp.from_pretrained("allenai/OLMoE-1B-7B-0924")
    except ConnectionError as exc:
        print(type(exc).__name__, round(time.perf_counter() - start, 2), exc, sep="|")
    """
)


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "closed"}])
def test_a_hub_model_offline_fails_within_a_second_saying_what_to_use(tmp_path, env):
    env = {**os.environ, **env, "HF_HOME": str(tmp_path / "home")}  # an empty cache
    if env.get("HF_ENDPOINT") == "closed":  # online mode, but nothing answers: a real connection attempt
        env.pop("HF_HUB_OFFLINE", None)
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{closed_port()}"
    run = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    kind, seconds, message = run.stdout.strip().split("|")
    assert kind == "HubUnreachableError" and float(seconds) < 2.0, run.stdout  # the check itself; imports excluded
    assert "cannot load model 'allenai/OLMoE-1B-7B-0924': it is not a local folder and not in the local Hugging Face " \
           "cache, and the Hub is offline" in message
    assert "use the shipped model 'demo' or a local folder, or download it once online" in message
