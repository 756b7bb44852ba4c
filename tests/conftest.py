"""Shared fixtures: tiny real transformers models of every supported family, built locally."""

from __future__ import annotations

import pytest
import torch

from hf_moe_patch.testing import TINY_CONFIGS, tiny_model

FAMILIES = list(TINY_CONFIGS)
CORE_FAMILIES = ["olmoe", "qwen2_moe", "qwen3_moe", "mixtral"]

# Every method with options that make it differ from native routing on tiny inputs.
METHOD_CASES = [
    ("usmoe", {}),
    ("usmoe", {"top_k": 1.5, "scope": "batch", "min_experts": 1}),
    ("expert_choice", {}),
    ("ssr", {"inference": "sinkhorn", "epsilon": 0.1}),
]


def batch(seed: int = 0, batch_size: int = 3, seq_len: int = 12, pad_from: dict[int, int] | None = None):
    """Random input ids with right padding: ``pad_from = {row: first padded position}``."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (batch_size, seq_len), generator=gen)
    mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    for row, start in (pad_from or {}).items():
        ids[row, start:] = 0
        mask[row, start:] = 0
    return ids, mask


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def model(family):
    return tiny_model(family)


def capture_routing(model):
    """Forward hooks that record each router's (weights, index) per call; returns (records, handles)."""
    from hf_moe_patch.families import family_of
    from hf_moe_patch.patching import find_sites

    records: list[tuple[torch.Tensor, torch.Tensor]] = []
    handles = [
        site.router.register_forward_hook(lambda m, a, out: records.append((out[1].detach(), out[2].detach())))
        for site in find_sites(model, family_of(model))
    ]
    return records, handles


WORDNET_FIXTURE = __import__("pathlib").Path(__file__).parent / "fixtures" / "wordnet"
TINY_DEMO = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                 num_experts=4, num_experts_per_tok=2, block_size=32, batch_size=8, eval_blocks=8, warmup_steps=5)
# Sizes of the local WordNet tasks that the fixture database can fill.
SMALL_TASKS = {
    "WordNetLexnameClassification": {"train_per_label": 2, "test_per_label": 3},
    "WordNetSameLemmaPairClassification": {"n_pairs": 30},
    "WordNetWuPalmerSTS": {"n_pairs": 40},
    "WordNetExampleRetrieval": {"n_queries": 30, "n_corpus": 80},
    "WordNetLexnameClustering": {"per_label": 4},
}


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """A tiny demo model pretrained by the real pipeline on the WordNet fixture: (folder, args)."""
    from hf_moe_patch.training.demo_model import DemoTrainingArgs, train_demo_model
    from hf_moe_patch.data.wordnet import load_wordnet

    args = DemoTrainingArgs(steps=60, learning_rate=1e-2, **TINY_DEMO)
    out = tmp_path_factory.mktemp("demo") / "model"
    return train_demo_model(out, args, wordnet=load_wordnet(WORDNET_FIXTURE), progress=False), args
