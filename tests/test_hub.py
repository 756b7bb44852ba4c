"""Saving, reloading and pushing patched models with their routing (issue: Hub round trips)."""

from __future__ import annotations

import base64
import gzip
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

import hf_moe_patch as hmp
from hf_moe_patch.sharing.hub import ROUTING_FILE, routing_entry
from hf_moe_patch.testing import tiny_model

from conftest import FAMILIES, METHOD_CASES, batch

ROUND_TRIP_CASES = [("topk", {})] + METHOD_CASES


@torch.no_grad()
def logits_of(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,options", ROUND_TRIP_CASES)
def test_save_and_reload_keeps_the_routing(tmp_path, family, method, options):
    model = hmp.patch(tiny_model(family), method, **options)
    ids, mask = batch(pad_from={1: 7})
    expected = logits_of(model, ids, mask)
    model.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())["moe_routing"]
    assert stored["method"] == method and stored["library"] == "hf_moe_patch" and stored["version"] == hmp.__version__
    loaded = hmp.from_pretrained(tmp_path)
    assert hmp.routing_config(loaded) == hmp.routing_config(model)
    assert torch.equal(logits_of(loaded, ids, mask), expected)


def test_unpatched_model_saves_and_loads_native(tmp_path):
    model = hmp.unpatch(hmp.patch(tiny_model("olmoe"), "usmoe"))
    model.save_pretrained(tmp_path)
    assert "moe_routing" not in json.loads((tmp_path / "config.json").read_text())
    loaded = hmp.from_pretrained(tmp_path)
    assert hmp.routing_config(loaded) is None


def test_from_pretrained_passes_loading_arguments_through(tmp_path):
    hmp.patch(tiny_model("mixtral"), "usmoe", top_k=1.5).save_pretrained(tmp_path)
    loaded = hmp.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map="cpu")
    assert loaded.dtype == torch.bfloat16 and hmp.routing_config(loaded)["top_k"] == 1.5
    ids, mask = batch()
    assert torch.isfinite(logits_of(loaded, ids, mask)).all()


def test_patch_without_method_reapplies_config_routing():
    model = tiny_model("olmoe")
    model.config.moe_routing = routing_entry("usmoe", {"top_k": 1.5})
    hmp.patch(model)
    assert hmp.routing_config(model)["top_k"] == 1.5
    with pytest.raises(ValueError, match="moe_routing"):
        hmp.patch(tiny_model("olmoe"))


def test_stored_routing_from_other_versions_is_never_silently_native(tmp_path, caplog):
    model = hmp.patch(tiny_model("olmoe"), "usmoe", top_k=1.5)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())

    config["moe_routing"]["version"] = "0.0.1"  # older package, same format: applies, with a warning
    (tmp_path / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="hf_moe_patch"):
        loaded = hmp.from_pretrained(tmp_path)
    assert hmp.routing_config(loaded)["top_k"] == 1.5
    assert "recorded by hf_moe_patch 0.0.1" in caplog.text

    config["moe_routing"]["format"] = 99  # newer storage format: a clear error
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(hmp.InvalidOptionError, match="format 99.*Upgrade hf_moe_patch"):
        hmp.from_pretrained(tmp_path)

    config["moe_routing"].update(format=1, method="usmoe2")  # unknown method: names the known ones
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(hmp.InvalidOptionError, match="Unknown routing method 'usmoe2'.*Did you mean 'usmoe'"):
        hmp.from_pretrained(tmp_path)

    config["moe_routing"].update(method="usmoe", options={"top_k": 1.5, "gamma": 2})  # unknown option
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(hmp.InvalidOptionError, match="Unknown option 'gamma'"):
        hmp.from_pretrained(tmp_path)


def test_peft_adapter_round_trip(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = tiny_model("qwen3_moe")
    base.save_pretrained(tmp_path / "base")
    base = hmp.from_pretrained(tmp_path / "base")
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    hmp.patch(peft_model, "usmoe", top_k=1.5)
    ids, mask = batch()
    expected = logits_of(peft_model, ids, mask)
    hmp.save_pretrained(peft_model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / ROUTING_FILE).read_text())["options"]["top_k"] == 1.5
    loaded = hmp.from_pretrained(tmp_path / "adapter")
    assert type(loaded).__name__.startswith("Peft")
    assert hmp.routing_config(loaded) == hmp.routing_config(peft_model)
    torch.testing.assert_close(logits_of(loaded, ids, mask), expected)


REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    folder, ids, mask, out, mode = sys.argv[1:]
    if mode == "remote":
        sys.modules["hf_moe_patch"] = None  # hide the installed package: any import of it fails
    import torch
    from transformers import AutoModelForCausalLM
    if mode == "remote":
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    else:
        import hf_moe_patch
        model = hf_moe_patch.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.load(ids), attention_mask=torch.load(mask)).logits
    torch.save(logits, out)
    print(type(model).__name__, type(model).__mro__[1].__name__)
    """
)


@pytest.mark.parametrize("family,method,options", [
    ("olmoe", "usmoe", {"top_k": 1.5}),
    ("deepseek_v3", "expert_choice", {}),
    # causal routing needs the calibrated thresholds (and the threshold rules) in the embedded copy
    ("qwen3_moe", "usmoe", {"top_k": 1.5, "causal": True, "thresholds": [0.2, 0.21]}),
])
def test_remote_code_loads_the_same_routing_without_the_package(tmp_path, family, method, options):
    from hf_moe_patch.sharing.remote_code import write_remote_code

    model = hmp.patch(tiny_model(family), method, **options)
    ids, mask = batch(pad_from={2: 6})
    expected = logits_of(model, ids, mask)
    folder = tmp_path / "repo"
    model.save_pretrained(folder)
    write_remote_code(model, folder)
    assert json.loads((folder / "config.json").read_text())["auto_map"] == {
        "AutoModelForCausalLM": "modeling_hf_moe_patch.HfMoePatchForCausalLM"
    }
    torch.save(ids, tmp_path / "ids.pt")
    torch.save(mask, tmp_path / "mask.pt")
    script = tmp_path / "load.py"
    script.write_text(REMOTE_SCRIPT)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    outputs = {}
    for mode in ("remote", "package"):
        run = subprocess.run(
            [sys.executable, str(script), str(folder), str(tmp_path / "ids.pt"), str(tmp_path / "mask.pt"),
             str(tmp_path / f"{mode}.pt"), mode],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        outputs[mode] = torch.load(tmp_path / f"{mode}.pt")
        if mode == "remote":
            assert run.stdout.split() == ["HfMoePatchForCausalLM", type(model).__name__]
    # Bit for bit: this also catches the remote class running other experts kernels than the
    # native class (transformers picks them by reading the class's module source).
    assert torch.equal(outputs["remote"], outputs["package"])
    assert torch.equal(outputs["remote"], expected)
    # and the routing really is applied there: native logits differ by far more than that
    assert (logits_of(hmp.unpatch(model), ids, mask) - expected).abs().max() > 1e-4


class LocalHub:
    """A local stand-in for the Hub's HTTP end, on 127.0.0.1, for an unmodified ``HfApi``.

    It answers repo creation, the model-card YAML validation (parsing the front matter; 400 on
    invalid YAML), the preupload query (every file a regular blob, so no LFS round trip) and the
    NDJSON commit, whose files it decodes and keeps; every request is recorded."""

    def __init__(self):
        import http.server
        import threading

        hub = self
        self.requests: list[tuple[str, dict]] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":  # huggingface_hub gzips large payloads
                    raw = gzip.decompress(raw)
                if self.headers.get("Content-Type") == "application/x-ndjson":  # the commit itself
                    body = [json.loads(line) for line in raw.splitlines() if line.strip()]
                else:
                    body = json.loads(raw or b"{}")
                hub.requests.append((self.path, body))
                if "/commit/" in self.path:
                    header = next(x["value"] for x in body if x["key"] == "header")
                    files = {x["value"]["path"]: base64.b64decode(x["value"]["content"]) for x in body if x["key"] == "file"}
                    assert all(x["key"] in ("header", "file") for x in body), "only regular files were announced"
                    hub.commits.append({"path": self.path, "commit_message": header["summary"], "files": files})
                    repo = self.path.split("/api/models/")[1].split("/commit/")[0]
                    status, reply = 200, {"commitUrl": f"http://127.0.0.1:{hub.port}/{repo}/commit/{'1' * 40}",
                                          "commitOid": "1" * 40}
                elif self.path == "/api/repos/create":
                    status, reply = 200, {"url": f"http://127.0.0.1:{hub.port}/{body.get('organization')}/{body['name']}"}
                elif self.path.endswith("/preupload/main"):
                    # Every file as a regular git blob: the commit then carries all contents itself.
                    files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in body["files"]]
                    status, reply = 200, {"files": files}
                elif self.path == "/api/validate-yaml":
                    try:
                        meta = yaml.safe_load(body["content"].split("---")[1])
                        status, reply = (200, {"warnings": []}) if isinstance(meta, dict) else (400, {"errors": [{"message": "no metadata"}]})
                    except yaml.YAMLError as exc:
                        status, reply = 400, {"errors": [{"message": str(exc)}]}
                else:
                    status, reply = 404, {"error": self.path}
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.commits: list[dict] = []
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        from huggingface_hub import HfApi

        self.api = HfApi(endpoint=f"http://127.0.0.1:{self.port}", token="hf_dummy")

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub():
    stand_in = LocalHub()
    yield stand_in
    stand_in.close()


def _card(files):
    text = files["README.md"].decode()
    _, meta, body = text.split("---", 2)
    return yaml.safe_load(meta), body


def test_push_to_hub_uploads_weights_config_tokenizer_card_and_remote_code(tmp_path, hub):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")), unk_token="<unk>")
    model = hmp.patch(tiny_model("olmoe"), "ssr", p=0.02)
    model.config._name_or_path = "allenai/OLMoE-1B-7B-0924"
    with torch.no_grad(), hmp.collect_stats(model) as stats:
        model(input_ids=batch()[0])
    info = hmp.push_to_hub(model, "me/olmoe-ssr", tok, private=True, remote_code=True, stats=stats,
                           eval_results={"STS12": 0.61}, api=hub.api)
    assert info.oid == "1" * 40
    paths = [path for path, _ in hub.requests]
    assert paths[:2] == ["/api/repos/create", "/api/validate-yaml"]
    assert set(paths[2:-1]) == {"/api/models/me/olmoe-ssr/preupload/main"}
    assert paths[-1] == "/api/models/me/olmoe-ssr/commit/main"
    assert hub.requests[0][1] == {"name": "olmoe-ssr", "organization": "me", "visibility": "private"}
    (commit,) = hub.commits
    assert commit["commit_message"].startswith("Upload ssr-routed model with hf_moe_patch")
    files = commit["files"]
    assert {"config.json", "model.safetensors", "generation_config.json", "README.md", "modeling_hf_moe_patch.py",
            "tokenizer.json", "tokenizer_config.json"} <= set(files)
    config = json.loads(files["config.json"])
    assert config["moe_routing"]["method"] == "ssr" and config["moe_routing"]["options"]["p"] == 0.02
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_hf_moe_patch.HfMoePatchForCausalLM"
    meta, body = _card(files)
    assert meta["base_model"] == "allenai/OLMoE-1B-7B-0924"
    assert meta["library_name"] == "transformers"
    assert {"moe", "hf_moe_patch", "ssr", "olmoe"} <= set(meta["tags"])
    assert "| p | `0.02` |" in body and "| STS12 | 0.61 |" in body and "maxvio_top1" in body
    assert 'hmp.from_pretrained("me/olmoe-ssr")' in body and "trust_remote_code=True" in body
    # the uploaded folder loads back with its routing
    folder = tmp_path / "pulled"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    assert hmp.routing_config(hmp.from_pretrained(folder))["p"] == 0.02
    assert AutoTokenizer.from_pretrained(folder).get_vocab() == tok.get_vocab()


def test_push_adapter_and_refusals(tmp_path, hub):
    from peft import LoraConfig, get_peft_model

    base = tiny_model("mixtral")
    with pytest.raises(ValueError, match="patched model"):
        hmp.push_to_hub(base, "me/x", api=hub.api)
    peft_model = hmp.patch(get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])), "usmoe")
    with pytest.raises(ValueError, match="merge the adapter"):
        hmp.push_to_hub(peft_model, "me/x", remote_code=True, api=hub.api)
    assert hub.requests == [] and hub.commits == []  # refused before any network call
    hmp.push_to_hub(peft_model, "me/adapter", api=hub.api)
    files = hub.commits[0]["files"]
    assert {"adapter_config.json", "adapter_model.safetensors", ROUTING_FILE, "README.md"} <= set(files)
    meta, body = _card(files)
    assert meta["library_name"] == "peft" and "peft" in meta["tags"] and "usmoe" in meta["tags"]
    assert "native** routing" in body


# --- regressions found in review ----------------------------------------------------------------


def test_repushing_a_model_loaded_with_remote_code_writes_working_code(tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_moe_patch.sharing.remote_code import write_remote_code

    model = hmp.patch(tiny_model("olmoe"), "usmoe", top_k=1.5)
    model.save_pretrained(tmp_path / "a")
    write_remote_code(model, tmp_path / "a")
    os.environ.setdefault("HF_HOME", str(tmp_path / "hf_home"))
    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "a", trust_remote_code=True)
    assert type(remote).__name__ == "HfMoePatchForCausalLM"
    remote.save_pretrained(tmp_path / "b")
    code = write_remote_code(remote, tmp_path / "b").read_text()
    assert "from transformers.models.olmoe.modeling_olmoe import OlmoeForCausalLM" in code
    assert "transformers_modules" not in code


OFFLINE_SCRIPT = textwrap.dedent(
    """
    import sys
    import hf_moe_patch as hmp
    try:
        model = hmp.from_pretrained(sys.argv[2], cache_dir=sys.argv[1])
    except OSError as exc:
        print("OSError:", exc)
    else:
        print(type(model).__name__, hmp.routing_config(model)["method"])
    """
)


@pytest.mark.parametrize("with_routing_file", [True, False])
def test_hub_adapter_from_the_offline_cache_keeps_its_routing_or_says_why_not(tmp_path, with_routing_file):
    from peft import LoraConfig, get_peft_model

    tiny_model("olmoe").save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(hmp.from_pretrained(tmp_path / "base"), LoraConfig(r=2, target_modules=["q_proj"]))
    hmp.save_pretrained(hmp.patch(peft_model, "expert_choice"), tmp_path / "adapter")
    # the layout huggingface_hub gives a downloaded repo in its cache
    snapshot = tmp_path / "cache" / "models--me--adapter" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (tmp_path / "cache" / "models--me--adapter" / "refs").mkdir()
    (tmp_path / "cache" / "models--me--adapter" / "refs" / "main").write_text("a" * 40)
    for file in (tmp_path / "adapter").iterdir():
        if file.name != ROUTING_FILE or with_routing_file:
            (snapshot / file.name).write_bytes(file.read_bytes())
    # and a full model, cached as snapshot_download leaves it (no marker for absent files)
    full = tmp_path / "cache" / "models--me--full" / "snapshots" / ("b" * 40)
    hmp.patch(tiny_model("olmoe"), "usmoe", top_k=1.5).save_pretrained(full)
    (tmp_path / "cache" / "models--me--full" / "refs").mkdir()
    (tmp_path / "cache" / "models--me--full" / "refs" / "main").write_text("b" * 40)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "home")}
    outputs = []
    for repo in ("me/adapter", "me/full"):
        run = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT, str(tmp_path / "cache"), repo], capture_output=True,
                             text=True, env=env, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        outputs.append(run.stdout)
    if with_routing_file:
        assert outputs[0].split() == ["PeftModelForCausalLM", "expert_choice"]
    else:  # unknown whether the repo records a routing: an error, not native routing
        assert outputs[0].startswith("OSError: Cannot tell whether me/adapter has moe_routing.json")
    assert outputs[1].split() == ["OlmoeForCausalLM", "usmoe"]


def test_card_texts_for_adapters_and_local_base_paths(tmp_path):
    from huggingface_hub import ModelCard
    from peft import LoraConfig, get_peft_model

    from hf_moe_patch.sharing.hub import model_card

    tiny_model("olmoe").save_pretrained(tmp_path / "local_base")
    model = hmp.patch(hmp.from_pretrained(tmp_path / "local_base"), "usmoe")
    card = ModelCard(model_card(model, "me/m"))
    assert "local_base" not in card.content and card.data.base_model is None
    assert "The weights of a OlmoeForCausalLM" in card.text
    adapter = hmp.patch(get_peft_model(hmp.unpatch(model), LoraConfig(r=2, target_modules=["q_proj"])), "usmoe")
    text = model_card(adapter, "me/a", base_model="allenai/OLMoE-1B-7B-0924")
    assert "The routing is stored in `moe_routing.json`." in text and "A peft adapter for `allenai/OLMoE-1B-7B-0924`" in text


def test_a_cached_hub_model_loads_when_the_hub_cannot_be_reached(tmp_path):
    """No HF_HUB_OFFLINE, but nothing answers at the Hub's address: the cached model loads from
    the cache at once (no minute of retries), with its routing."""
    import socket
    import time

    full = tmp_path / "cache" / "models--me--full" / "snapshots" / ("b" * 40)
    hmp.patch(tiny_model("olmoe"), "usmoe", top_k=1.5).save_pretrained(full)
    (tmp_path / "cache" / "models--me--full" / "refs").mkdir()
    (tmp_path / "cache" / "models--me--full" / "refs" / "main").write_text("b" * 40)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HOME": str(tmp_path / "home"), "HF_ENDPOINT": f"http://127.0.0.1:{port}"}
    env.pop("HF_HUB_OFFLINE", None)
    command = [sys.executable, "-c", OFFLINE_SCRIPT, str(tmp_path / "cache"), "me/full"]
    # The same load with HF_HUB_OFFLINE=1 (no network attempt): what start-up and loading cost on
    # this machine now; the unreachable Hub may add a few seconds, not a minute of retries.
    start = time.perf_counter()
    assert subprocess.run(command, capture_output=True, text=True, env={**env, "HF_HUB_OFFLINE": "1"},
                          timeout=600).returncode == 0
    local = time.perf_counter() - start
    start = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["OlmoeForCausalLM", "usmoe"]
    elapsed = time.perf_counter() - start
    assert elapsed < max(20.0, 2 * local + 10.0), (elapsed, local)


def test_demo_and_missing_paths_in_from_pretrained(tmp_path):
    assert type(hmp.from_pretrained("demo")).__name__ == "OlmoeForCausalLM"
    with pytest.raises(FileNotFoundError, match="no such folder"):
        hmp.from_pretrained(tmp_path / "missing")
