"""The demo model: its corpus, tokenizer and pretraining loop (on the WordNet fixture), and the
shipped checkpoint (loads through from_pretrained, matches its recorded validation perplexity)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_moe_patch.training.demo_model import (
    ASSETS,
    DemoTrainingArgs,
    corpus,
    demo_output_dir,
    demo_model_path,
    pack,
    perplexity,
    synset_document,
    train_demo_model,
)
from hf_moe_patch.data.wordnet import load_wordnet, split_of

from conftest import TINY_DEMO as TINY
from conftest import WORDNET_FIXTURE as FIXTURE


def test_corpus_is_one_document_per_synset_of_the_split():
    wn = load_wordnet(FIXTURE)
    train, heldout = corpus(wn, "train"), corpus(wn, "heldout")
    assert len(train) + len(heldout) == len(wn) and heldout
    held_lemmas = {s.lemmas[0].lower() for s in wn if split_of(s) == "heldout"}
    # No word of the held-out side opens a training document.
    assert not any(doc.split(" (")[0].split(", ")[0].lower() in held_lemmas for doc in train)
    s = next(iter(wn))
    assert synset_document(s).startswith(", ".join(s.lemmas) + " (")
    assert s.definition in synset_document(s)


def test_pretraining_lowers_the_loss_and_writes_a_loadable_checkpoint(tiny_demo):
    out, args = tiny_demo
    report = json.loads((out / "training_report.json").read_text())
    history = report["history"]
    assert history[-1]["loss"] < history[0]["loss"] - 1.0
    assert history[0]["aux_loss"] > 0  # the auxiliary load-balancing loss was part of training
    assert report["args"]["steps"] == args.steps and report["parameters"] > 0
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "olmoe" and tokenizer.padding_side == "left"
    assert model.config.num_experts == 4 and not model.config.output_router_logits
    assert next(model.parameters()).dtype == torch.float32
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    # The recorded perplexity is the saved checkpoint's, on the held-out words, and beats chance.
    blocks = pack(corpus(load_wordnet(FIXTURE), "heldout"), tokenizer, args.block_size)[: args.eval_blocks]
    assert perplexity(model, blocks) == pytest.approx(report["validation_perplexity"], rel=1e-3)
    assert report["validation_perplexity"] < len(tokenizer)
    assert "validation perplexity" in (out / "README.md").read_text()


def test_pretraining_is_reproducible(tmp_path):
    args = DemoTrainingArgs(steps=3, **TINY)
    a = train_demo_model(tmp_path / "a", args, wordnet=load_wordnet(FIXTURE), progress=False)
    b = train_demo_model(tmp_path / "b", args, wordnet=load_wordnet(FIXTURE), progress=False)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()


def test_mixtral_twin_builds():
    from transformers import AutoConfig

    from hf_moe_patch.training.demo_model import build_config, train_tokenizer

    tok = train_tokenizer(["a small text", "another small text"], 300)
    config = build_config(DemoTrainingArgs(arch="mixtral", **TINY), tok)
    assert isinstance(config, type(AutoConfig.for_model("mixtral"))) and config.num_local_experts == 4


def test_unknown_arch_is_refused():
    with pytest.raises(ValueError, match="arch='gpt2' is not a demo architecture"):
        demo_model_path("gpt2")


def test_shipped_demo_model_loads_and_matches_its_report():
    path = demo_model_path()
    report = json.loads((path / "training_report.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert sum(p.numel() for p in model.parameters()) == report["parameters"]
    assert (path / "model.safetensors").stat().st_size < 10_000_000
    # Re-measured on the first held-out blocks: the model is the one the report describes.
    wn = load_wordnet()
    blocks = pack(corpus(wn, "heldout"), tokenizer, report["args"]["block_size"])[: report["args"]["eval_blocks"]]
    assert perplexity(model, blocks) == pytest.approx(report["validation_perplexity"], rel=1e-3)


@pytest.mark.parametrize("overrides, message", [
    ({"steps": 0}, "steps=0 is not valid (--steps); valid: an integer >= 1"),
    ({"steps": -1}, "steps=-1 is not valid (--steps); valid: an integer >= 1"),
    ({"steps": 2.5}, "steps=2.5 is not valid (--steps); valid: an integer >= 1"),
    ({"batch_size": 0}, "batch_size=0 is not valid (--batch-size); valid: an integer >= 1"),
    ({"block_size": 1}, "block_size=1 is not valid (--block-size); valid: an integer in [2, 512]"),
    ({"block_size": 513}, "block_size=513 is not valid (--block-size); valid: an integer in [2, 512]"),
    ({"learning_rate": 0.0}, "learning_rate=0.0 is not valid (--learning-rate); valid: a number > 0"),
    ({"learning_rate": float("nan")}, "learning_rate=nan is not valid (--learning-rate); valid: a number > 0"),
    ({"warmup_steps": -1}, "warmup_steps=-1 is not valid (--warmup-steps); valid: an integer >= 0"),
    ({"weight_decay": -0.1}, "weight_decay=-0.1 is not valid (--weight-decay); valid: a number >= 0"),
    ({"eval_blocks": 0}, "eval_blocks=0 is not valid (--eval-blocks); valid: an integer >= 1"),
    ({"vocab_size": 100}, "vocab_size=100 is not valid (--vocab-size); valid: an integer >= 260"),
    ({"num_experts_per_tok": 5}, "num_experts_per_tok=5 is not valid (--num-experts-per-tok); valid: an integer in [1, num_experts=4]"),
    ({"hidden_size": 30}, "hidden_size=30 is not valid (--hidden-size); valid: a multiple of 2 x num_attention_heads=2"),
    ({"router_aux_loss_coef": -1.0}, "router_aux_loss_coef=-1.0 is not valid (--router-aux-loss-coef); valid: a number >= 0"),
    ({"seed": -3}, "seed=-3 is not valid (--seed); valid: an integer >= 0"),
    ({"arch": "gpt2"}, "arch='gpt2' is not a demo architecture (--arch)"),
])
def test_invalid_training_arguments_name_the_option_value_and_range(tmp_path, overrides, message):
    with pytest.raises(ValueError) as err:
        DemoTrainingArgs(**{**TINY, **overrides})
    assert message in str(err.value)
    # train_demo_model checks again (fields can change after construction), before any work.
    args = DemoTrainingArgs(**TINY)
    for name, value in overrides.items():
        setattr(args, name, value)
    with pytest.raises(ValueError) as err:
        train_demo_model(tmp_path / "out", args, wordnet=load_wordnet(FIXTURE), progress=False)
    assert message in str(err.value)
    assert not (tmp_path / "out").exists()


def test_default_output_is_a_new_folder_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert demo_output_dir(None) == tmp_path / "demo-olmoe-wordnet"
    assert demo_output_dir(None, "mixtral") == tmp_path / "demo-mixtral-wordnet"
    # The shipped assets are refused, also where no model is yet, unless forced.
    for folder in (ASSETS / "demo-olmoe-wordnet", ASSETS / "demo-mixtral-wordnet", ASSETS):
        with pytest.raises(FileExistsError, match="shipped assets .*--force"):
            demo_output_dir(folder)
        assert demo_output_dir(folder, force=True) == folder
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        demo_output_dir(tmp_path / "file", force=True)


def test_a_non_empty_output_folder_needs_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = DemoTrainingArgs(steps=2, **TINY)
    with pytest.raises(FileExistsError, match="exists and is not empty .*--force"):
        train_demo_model(out, args, wordnet=load_wordnet(FIXTURE), progress=False)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    assert train_demo_model(out, args, wordnet=load_wordnet(FIXTURE), progress=False, force=True) == out
    assert (out / "config.json").is_file() and (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "training_report.json").read_text())["args"]["steps"] == 2
    # An existing empty folder is fine.
    (tmp_path / "empty").mkdir()
    assert (train_demo_model(tmp_path / "empty", args, wordnet=load_wordnet(FIXTURE), progress=False) / "config.json").is_file()
