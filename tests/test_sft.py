"""Fine-tuning patched models: real Trainer, real peft, real accelerate launch, on a tiny
pretrained demo model and the WordNet-Alpaca set built from the fixture database."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hf_moe_patch as hmp
from hf_moe_patch.training.sft import SFTConfig, add_adapters, load_model, run_sft, trainable_parameter_names

from conftest import WORDNET_FIXTURE


@pytest.fixture(scope="module")
def alpaca_file(tmp_path_factory):
    """The WordNet-Alpaca set of the fixture database, written as JSONL (a local dataset file)."""
    from hf_moe_patch.training.data import wordnet_alpaca, write_jsonl
    from hf_moe_patch.data.wordnet import load_wordnet

    path = tmp_path_factory.mktemp("data") / "wordnet_alpaca.jsonl"
    write_jsonl(wordnet_alpaca(load_wordnet(WORDNET_FIXTURE), split="all", seed=0), path)
    return path


def config(alpaca_file, tmp_path, **overrides) -> SFTConfig:
    # The shipped demo model: it knows English, so a few LoRA steps visibly teach it the task.
    base = dict(model="demo", dataset=str(alpaca_file), output_dir=str(tmp_path / "run"), max_steps=24,
                per_device_train_batch_size=8, logging_steps=4, save_steps=1000, learning_rate=1e-2,
                warmup_steps=2, max_length=96, validation_size=24, lora_r=8, lora_alpha=16)
    return SFTConfig(**{**base, **overrides})


@pytest.mark.parametrize("spec, aux", [
    ("topk", "auto"), ("topk", "off"), ("ssr", "auto"), ("ssr:p=1.0", "auto"), ("usmoe", "auto"), ("expert_choice", "auto"),
])
def test_training_loss_falls_for_every_routing(alpaca_file, tmp_path, spec, aux):
    from hf_moe_patch.report import parse_case

    case = parse_case(spec)
    result = run_sft(config(alpaca_file, tmp_path, method=case.method, options=case.options, aux_loss=aux))
    assert result["train_loss_last"] < result["train_loss_first"] - 0.3, result
    assert result["aux_loss"] is (aux == "auto" and case.method == "topk")
    assert math.isfinite(result["validation_perplexity"])
    assert result["routing"]["experts_per_token"] == pytest.approx(4.0, abs=0.25)  # the demo model's k
    saved = json.loads((tmp_path / "run" / "final" / "moe_routing.json").read_text())
    assert saved["method"] == case.method


def test_ssr_takes_the_sinkhorn_branch_at_the_requested_rate_without_aux_loss(alpaca_file, tmp_path):
    result = run_sft(config(alpaca_file, tmp_path, method="ssr", options={"p": 0.5}, max_steps=40, logging_steps=40))
    share = result["routing"]["sinkhorn_step_fraction"]
    assert 0.25 <= share <= 0.75  # 40 coin flips at p = 0.5: outside this band with probability < 0.2 %
    assert result["aux_loss"] is False
    # Patched with SSR, even a model asked for router logits adds no auxiliary loss.
    model, tokenizer = load_model(config(alpaca_file, tmp_path))
    hmp.patch(model, "ssr", p=1.0)
    model.config.output_router_logits = True
    model.train()
    ids = tokenizer(["define the word chair"], return_tensors="pt")["input_ids"]
    torch.manual_seed(0)
    out = model(input_ids=ids, labels=ids)
    ce = torch.nn.functional.cross_entropy(out.logits[0, :-1].float(), ids[0, 1:])
    assert out.aux_loss is not None and float(out.aux_loss) > 0
    assert float(out.loss) == pytest.approx(float(ce), abs=1e-6)


@pytest.mark.parametrize("peft, router, lora_experts", [
    ("lora", "frozen", True), ("lora", "train", True), ("lora", "lora", False), ("none", "frozen", True), ("none", "train", True),
])
def test_gradients_reach_exactly_the_parameters_that_should_train(alpaca_file, tmp_path, peft, router, lora_experts):
    cfg = config(alpaca_file, tmp_path, peft=peft, router=router, lora_experts=lora_experts)
    model, tokenizer = load_model(cfg)
    hmp.patch(model, "usmoe")
    model = add_adapters(model, cfg)
    names = trainable_parameter_names(model)
    is_router = lambda n: ".mlp.gate." in n and "experts" not in n  # noqa: E731
    if peft == "none":
        assert any("q_proj" in n for n in names) and any("experts.gate_up_proj" in n for n in names)
        assert any(is_router(n) for n in names) is (router == "train")
    else:
        assert all("lora_" in n or "modules_to_save" in n for n in names), names
        assert any("q_proj.lora_A" in n for n in names)
        assert any("experts" in n and "lora_" in n for n in names) is lora_experts
        assert any("modules_to_save" in n for n in names) is (router == "train")
        assert any(is_router(n) and "lora_" in n for n in names) is (router == "lora")
    model.train()
    ids = tokenizer(["define the word chair", "a seat for one person"], return_tensors="pt", padding=True)
    out = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], labels=ids["input_ids"])
    out.loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and float(p.grad.abs().sum()) > 0}
    frozen_with_grad = {n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None}
    assert not frozen_with_grad
    # Every trainable tensor gets a gradient (LoRA B starts at zero, so A's gradient is zero at
    # step 0: B's must not be).
    missing = [n for n in names if n not in with_grad and "lora_A" not in n]
    assert not missing, missing


def test_corrupted_validation_differs_and_outputs_reproduce_the_run(alpaca_file, tmp_path):
    cfg = config(alpaca_file, tmp_path, method="usmoe", eval_corruption="junk:0.3", merge=True)
    result = run_sft(cfg)
    assert result["validation_perplexity_corrupted"] != result["validation_perplexity"]
    assert result["validation_perplexity_corrupted"] > result["validation_perplexity"]
    run = tmp_path / "run"
    saved = json.loads((run / "sft_config.json").read_text())
    assert SFTConfig.from_json(run / "sft_config.json") == cfg
    assert {"torch", "transformers", "peft", "accelerate", "datasets", "hf_moe_patch"} <= set(saved["versions"])
    assert saved["data"]["validation"] == 24 and saved["data"]["fingerprint"]
    lines = [json.loads(line) for line in (run / "routing_stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [4, 8, 12, 16, 20, 24]
    assert (run / "routing_balance.png").read_bytes()[:4] == b"\x89PNG"
    # The merged model keeps the routing patch and its configuration.
    merged = hmp.from_pretrained(run / "merged", dtype=torch.float32)
    assert hmp.routing_config(merged)["method"] == "usmoe"
    adapter = hmp.from_pretrained(run / "final", dtype=torch.float32)
    ids = torch.tensor([[1, 40, 50, 60, 70]])
    torch.testing.assert_close(adapter(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


@pytest.fixture
def one_thread():
    """One intra-op thread: several make CPU backward passes run-to-run nondeterministic (the
    backward of advanced indexing, index_put_ with accumulate, adds in parallel in any order), so
    that even two uninterrupted runs differ in the last bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("method, options", [("topk", {}), ("ssr", {"p": 0.5})])
def test_resume_from_checkpoint_continues_the_same_run(alpaca_file, tmp_path, one_thread, method, options):
    """A run resumed from its step-8 checkpoint is the uninterrupted run: the same loss in every
    logged window, the same train_loss_mean (over all 16 steps, not the 8 after the resume), the
    same adapter (SSR's coins come from torch's RNG, which checkpoints keep). Logging every 3
    steps puts the checkpoint and the last step inside logging windows."""
    import shutil

    whole = config(alpaca_file, tmp_path / "whole", method=method, options=options, max_steps=16, save_steps=8, logging_steps=3)
    uninterrupted = run_sft(whole)
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(tmp_path / "whole" / "run" / "checkpoint-8", part / "checkpoint-8")  # the run, interrupted at step 8
    resumed = run_sft(dataclasses.replace(whole, output_dir=str(part), resume_from_checkpoint=str(part / "checkpoint-8")))
    assert resumed["global_step"] == 16

    def losses(folder):
        state = json.loads((folder / "checkpoint-16" / "trainer_state.json").read_text())
        return [(h["step"], h["loss"]) for h in state["log_history"] if "loss" in h]

    whole_losses = losses(tmp_path / "whole" / "run")
    assert losses(part) == whole_losses  # bit for bit (one thread)
    for key in ("train_loss_mean", "train_loss_first", "train_loss_last", "validation_perplexity"):
        assert resumed[key] == uninterrupted[key], key
    # Logged at every logging step, at the checkpoint and at the last step: windows cover all steps.
    assert [step for step, _ in whole_losses] == [3, 6, 8, 9, 12, 15, 16]
    windows = [b - a for a, b in zip([0] + [s for s, _ in whole_losses], [s for s, _ in whole_losses])]
    assert uninterrupted["train_loss_mean"] == pytest.approx(sum(w * l for w, (_, l) in zip(windows, whole_losses)) / 16, rel=1e-12)
    a = load_file(tmp_path / "whole" / "run" / "final" / "adapter_model.safetensors")
    b = load_file(part / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed["resumed_from_step"] == 8 and "resumed_from_step" not in uninterrupted


def test_resume_under_another_routing_is_refused_unless_allowed(alpaca_file, tmp_path):
    """A checkpoint records its routing; resuming it under another method, other options or
    another auxiliary loss fails before any training step, naming both routings."""
    import shutil

    from hf_moe_patch.training.sft import check_resume_routing, routing_record

    first = config(alpaca_file, tmp_path / "first", method="usmoe", options={"top_k": 1.5}, max_steps=4, save_steps=2, logging_steps=2)
    run_sft(first)
    checkpoint = tmp_path / "first" / "run" / "checkpoint-2"
    record = json.loads((checkpoint / "hf_moe_patch_routing.json").read_text())
    assert record["method"] == "usmoe" and record["resolved"]["top_k"] == 1.5 and record["aux_loss_enabled"] is False

    def resume(name, **changes):
        folder = tmp_path / name
        shutil.copytree(checkpoint, folder / "checkpoint-2")
        cfg = dataclasses.replace(first, output_dir=str(folder), resume_from_checkpoint=str(folder / "checkpoint-2"), **changes)
        return folder, cfg

    for name, changes, now in [
        ("method", {"method": "topk", "options": {}, "aux_loss": "off"}, "topk (aux loss off)"),
        ("options", {"options": {"top_k": 2.0}}, "usmoe:top_k=2.0 (aux loss off)"),
        ("aux", {"aux_loss": "on"}, "usmoe:top_k=1.5 (aux loss on)"),
    ]:
        folder, cfg = resume(name, **changes)
        with pytest.raises(ValueError) as err:
            run_sft(cfg)
        message = str(err.value)
        assert "was trained with routing usmoe:top_k=1.5 (aux loss off)" in message, message
        assert f"this run asks for {now}" in message and "allow_routing_change=True (--allow-routing-change)" in message
        assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-2"]  # nothing trained, nothing written
    # The same routing with every default written out is the same routing.
    spelled_out = {k: v for k, v in record["resolved"].items() if k != "method"}
    same = dataclasses.replace(first, options=spelled_out)
    model, _ = load_model(same)
    hmp.patch(model, same.method, **same.options)
    assert check_resume_routing(same, checkpoint, routing_record(same, model, False)) == record
    # Asked for explicitly, the change is made and the run's record keeps the earlier routing.
    folder, cfg = resume("allowed", method="topk", options={}, aux_loss="off", allow_routing_change=True)
    result = run_sft(cfg)
    assert result["method"] == "topk" and result["global_step"] == 4
    assert result["earlier_routings"] == [{"routing": "usmoe:top_k=1.5 (aux loss off)", "until_step": 2}]
    later = json.loads((folder / "checkpoint-4" / "hf_moe_patch_routing.json").read_text())
    assert later["method"] == "topk" and later["earlier"][0]["method"] == "usmoe"


def test_allow_routing_change_on_the_command_line():
    from hf_moe_patch.cli import _sft_config, build_parser

    assert _sft_config(build_parser().parse_args(["sft", "demo", "--allow-routing-change"])).allow_routing_change is True
    assert _sft_config(build_parser().parse_args(["sft", "demo"])).allow_routing_change is False


def test_accelerate_launch_two_processes_on_cpu(alpaca_file, tmp_path):
    """A real 2-process data-parallel run through `accelerate launch`, the CLI as users run it."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # The shipped config: accelerate's torchrun launcher; without a GPU the Trainer (use_cpu) joins
    # a gloo group. (`--cpu` with several processes would need mpirun.)
    config_file = Path(__file__).parents[1] / "examples" / "accelerate" / "cpu_ddp_2proc.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
           "-m", "hf_moe_patch.cli", "sft", "demo", "--dataset", str(alpaca_file), "--method", "ssr:p=0.5",
           "--output-dir", str(out), "--max-steps", "8", "--per-device-train-batch-size", "4", "--logging-steps", "4",
           "--save-steps", "1000", "--max-length", "96", "--validation-size", "24", "--learning-rate", "5e-3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "sft_results.json").read_text())
    assert results["world_size"] == 2 and results["global_step"] == 8
    assert results["train_loss_last"] < results["train_loss_first"]
    assert (out / "final" / "adapter_model.safetensors").is_file()


def test_compare_runs_each_routing_on_equal_terms(alpaca_file, tmp_path):
    from hf_moe_patch.training.compare import compare_sft

    base = config(alpaca_file, tmp_path, max_steps=8)
    report = compare_sft(base, ["topk", "topk:aux_loss=off", "ssr:p=1.0"], tmp_path / "cmp")
    runs = {r["label"]: r for r in report["runs"]}
    assert [runs[k]["aux_loss"] for k in ("topk", "topk:aux_loss=off", "ssr:p=1.0")] == [True, False, False]
    assert runs["ssr:p=1.0"]["routing"]["sinkhorn_step_fraction"] == 1.0
    assert runs["topk"]["routing"]["sinkhorn_step_fraction"] == 0.0
    # Same data, seed and steps: the two top-k runs differ only by the auxiliary loss.
    assert runs["topk"]["validation_examples"] == runs["ssr:p=1.0"]["validation_examples"]
    assert runs["topk"]["train_loss_first"] != runs["topk:aux_loss=off"]["train_loss_first"]
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| ssr:p=1.0 | off |" in md and "step time vs baseline" in md
    assert (tmp_path / "cmp" / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "cmp" / "comparison.json").read_text())["baseline"] == "topk"


@pytest.mark.parametrize("method, options", [("ssr", {"p": 1.0}), ("usmoe", {"top_k": 1.5})])
def test_a_fully_trained_router_still_routes_by_the_patch(alpaca_file, tmp_path, method, options):
    """peft's modules_to_save copies the router; the patch must drive the copy that runs."""
    from hf_moe_patch.families import family_of
    from hf_moe_patch.patching import find_sites

    outputs = {}
    for router in ("frozen", "train"):
        cfg = config(alpaca_file, tmp_path, router=router)
        model, tokenizer = load_model(cfg)
        hmp.patch(model, method, **options)
        model = add_adapters(model, cfg)
        assert len(find_sites(model, family_of(model))) == model.config.num_hidden_layers
        model.train()
        ids = tokenizer(["define the word chair", "a seat for one person"], return_tensors="pt", padding=True)
        torch.manual_seed(0)
        with hmp.collect_stats(model) as stats:
            outputs[router] = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits
        summary = stats.summary()
        if method == "ssr":
            assert summary["sinkhorn_steps"] == model.config.num_hidden_layers
        else:
            assert summary["experts_per_token_mean"] == pytest.approx(1.5, abs=0.2)
    torch.testing.assert_close(outputs["train"], outputs["frozen"])


def test_router_training_takes_only_the_router_on_qwen2_moe():
    """A bare "gate" would also match Qwen2-MoE's shared_expert_gate (peft matches by suffix)."""
    from hf_moe_patch.testing import tiny_model

    model = add_adapters(tiny_model("qwen2_moe"), SFTConfig(router="train"))
    names = trainable_parameter_names(model)
    assert any("mlp.gate.modules_to_save" in n for n in names)
    assert not any("shared_expert_gate" in n for n in names)


@pytest.mark.parametrize("kwargs, message", [
    ({"dtype": "bf16"}, "dtype='bf16' is not valid; valid: auto, float32, bfloat16, float16"),
    ({"validation_size": 2.5}, "validation_size=2.5 is not valid"),
    ({"max_steps": 0}, "max_steps=0 is not valid"),
    ({"method": "sinkhorn"}, "method='sinkhorn' is not valid; valid: "),
    ({"aux_loss": "maybe"}, "aux_loss='maybe' is not valid; valid: auto, on, off"),
    ({"corruption": "junk:7"}, "rate=7.0 is not valid"),
])
def test_invalid_settings_name_the_option_value_and_valid_values(kwargs, message):
    with pytest.raises(ValueError) as err:
        SFTConfig(**kwargs)
    assert message in str(err.value)


def test_comparison_table_survives_runs_without_logged_loss():
    from hf_moe_patch.training.compare import markdown

    row = {"label": "topk", "aux_loss": True, "train_loss_first": None, "train_loss_last": None,
           "validation_perplexity": 10.0, "validation_perplexity_corrupted": 12.0, "routing": {}, "seconds_per_step": 0.1}
    assert "| topk | on | - -> - | 10.000 | 12.000 |" in markdown([row], "topk")


def test_sft_command_reports_losses_under_default_logging_and_where_it_wrote(alpaca_file, tmp_path):
    """The default --logging-steps (10) is more than a short run's steps: the losses are still
    logged (at the last step), the run says where it wrote, and peft's deprecation noise is gone."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "hf_moe_patch.cli", "sft", "demo", "--dataset", str(alpaca_file),
                           "--output-dir", str(out), "--max-steps", "4", "--max-length", "96", "--validation-size", "24"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The Trainer prints its logs first; the run's results are the last JSON document.
    results = json.loads(proc.stdout[proc.stdout.rindex("\n{\n") + 1:proc.stdout.rindex("\n}\n") + 2])
    assert results["train_loss_first"] is not None and results["train_loss_last"] is not None
    assert math.isfinite(results["train_loss_first"]) and results["train_loss_mean"] == pytest.approx(results["train_loss_first"])
    wrote = [line for line in proc.stdout.splitlines() if line.startswith("wrote ")]
    assert wrote == [f"wrote {out / 'final'} (the adapter with its routing), {out / 'sft_config.json'}, "
                     f"{out / 'sft_results.json'}, {out / 'routing_stats.jsonl'}, {out / 'routing_balance.png'}"]
    assert (out / "final" / "adapter_model.safetensors").is_file() and (out / "routing_balance.png").is_file()
    assert "is_gradient_checkpointing" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("args, message", [
    (["--method", "usmo"], "Unknown routing method 'usmo'. Did you mean 'usmoe'?"),
    (["--method", "usmoe:top_k=99"], "Invalid value for option 'top_k' of routing method 'usmoe': 99. Valid: None (the "
                                     "native k=4) or a number in (0, 16] (N experts)."),
    (["--method", "usmoe:top_k=0.75x"], "fine-tuning takes a number of experts (e.g. top_k=3)"),
    (["--dataset", "missing.jsonl"], "no such data file or folder: 'missing.jsonl'"),
    (["--dtype", "bf16"], "invalid choice: 'bf16'"),
    (["--output-dir", "/proc/hf-moe-patch/run"], "--output-dir='/proc/hf-moe-patch/run' cannot be written"),
])
def test_sft_command_checks_its_arguments_before_loading_the_model(tmp_path, args, message):
    proc = subprocess.run([sys.executable, "-m", "hf_moe_patch.cli", "sft", "demo", *args], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


def test_sft_compare_checks_every_routing_first(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hf_moe_patch.cli", "sft-compare", "demo", "--methods", "topk",
                           "ssr:p=2", "--out", str(tmp_path / "cmp")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "Invalid value for option 'p' of routing method 'ssr': 2" in proc.stderr
    assert not (tmp_path / "cmp").exists()
    proc = subprocess.run([sys.executable, "-m", "hf_moe_patch.cli", "sft-compare", "demo", "--methods", "topk:aux_loss=maybe"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 2 and "aux_loss='maybe' in 'topk:aux_loss=maybe' is not valid; valid: auto, on, off" in proc.stderr


def test_a_checkpoint_of_an_older_version_matches_the_same_routing_with_new_defaults():
    # Written before topk took top_k and usmoe took causal/thresholds/max_experts: the same
    # routing once the new options' defaults are filled in; a real change still differs.
    from hf_moe_patch.training.sft import _same_routing

    old_topk = {"method": "topk", "resolved": {"method": "topk"}}
    assert _same_routing(old_topk, {"method": "topk", "resolved": {"method": "topk", "top_k": None}})
    assert not _same_routing(old_topk, {"method": "topk", "resolved": {"method": "topk", "top_k": 1}})
    old = {"method": "usmoe", "resolved": {"method": "usmoe", "top_k": 1.5, "alpha": 0.5, "scope": "sequence",
                                           "renormalize": None, "min_experts": 0}}
    new = {"method": "usmoe", "resolved": {"method": "usmoe", "top_k": 1.5, "causal": False}}
    assert _same_routing(old, new)
    assert not _same_routing(old, {"method": "usmoe", "resolved": {"method": "usmoe", "top_k": 1.5, "causal": True}})
