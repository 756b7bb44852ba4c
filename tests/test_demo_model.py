"""The demo model: its corpus, tokenizer and pretraining loop (on the WordNet fixture), and the
shipped checkpoint (loads through from_pretrained, matches its recorded validation perplexity)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_moe_patch.demo_model import (
    DemoTrainingArgs,
    corpus,
    demo_model_path,
    pack,
    perplexity,
    synset_document,
    train_demo_model,
)
from hf_moe_patch.wordnet import load_wordnet, split_of

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

    from hf_moe_patch.demo_model import build_config, train_tokenizer

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
