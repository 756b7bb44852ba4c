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
