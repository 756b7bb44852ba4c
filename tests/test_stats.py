"""Routing statistics on real tiny models, checked against quantities computed independently."""

from __future__ import annotations

import json

import pytest
import torch

import hf_moe_patch as hmp
from hf_moe_patch.stats import coefficient_of_variation, max_violation
from hf_moe_patch.testing import tiny_model

from conftest import batch, capture_routing


def test_max_violation_and_cv_hand_cases():
    # loads 6, 2, 2, 2: mean 3 -> MaxVio 6/3 - 1 = 1; std = sqrt((9 + 1 + 1 + 1) / 4) = sqrt(3)
    load = torch.tensor([6, 2, 2, 2])
    assert max_violation(load) == pytest.approx(1.0)
    assert coefficient_of_variation(load) == pytest.approx(3 ** 0.5 / 3)
    assert max_violation(torch.zeros(4)) == 0.0


def test_native_topk_counts_match_the_router_outputs_and_skip_padding():
    model = tiny_model("olmoe")
    ids, mask = batch(batch_size=2, seq_len=8, pad_from={1: 5})
    records, handles = capture_routing(model)
    with torch.no_grad(), hmp.collect_stats(model) as stats:
        model(input_ids=ids, attention_mask=mask)
    for h in handles:
        h.remove()
    valid = mask.bool().view(-1)
    for layer, (weights, index) in zip(stats.layers, records):
        d = layer.to_dict()
        assert d["tokens"] == 13  # 8 + 5 valid tokens, padding excluded
        expected = torch.bincount(index[valid].reshape(-1), minlength=8)
        assert d["tokens_per_expert"] == expected.tolist()
        assert sum(d["tokens_per_expert"]) == 13 * 2
        assert d["experts_per_token_hist"][2] == 13 and d["experts_per_token_mean"] == 2.0
        top1 = index[valid].gather(1, weights[valid].argmax(1, keepdim=True)).squeeze(1)
        assert d["top1_tokens_per_expert"] == torch.bincount(top1, minlength=8).tolist()
        assert d["maxvio"] == pytest.approx(max_violation(expected))
        assert d["sinkhorn_steps"] == 0


def test_usmoe_stats_count_variable_experts_and_tokens_without_expert():
    model = hmp.patch(tiny_model("olmoe"), "usmoe", top_k=0.5)
    ids, mask = batch(batch_size=2, seq_len=10)
    with torch.no_grad(), hmp.collect_stats(model) as stats:
        model(input_ids=ids, attention_mask=mask)
    for layer in stats.layers:
        d = layer.to_dict()
        assert sum(d["tokens_per_expert"]) == 10  # round(0.5 * 10) cells per sequence, 2 sequences
        assert d["experts_per_token_mean"] == pytest.approx(0.5)
        assert d["tokens_without_expert"] >= 10  # at least half the tokens get nothing
    assert stats.method == "usmoe"


def test_collector_leaves_nothing_behind_and_exports_json(tmp_path):
    model = tiny_model("qwen3_moe")
    ids, mask = batch()
    with torch.no_grad(), hmp.collect_stats(model) as stats:
        model(input_ids=ids, attention_mask=mask)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    text = stats.to_json(tmp_path / "s.json")
    data = json.loads((tmp_path / "s.json").read_text())
    assert data == json.loads(text)
    assert set(data["summary"]) >= {"maxvio", "maxvio_top1", "cv", "router_entropy", "experts_per_token_mean",
                                    "tokens_without_expert_frac", "sinkhorn_steps", "sinkhorn_iterations_mean"}
    assert len(data["layers"]) == 2
    # entropy of a softmax over 8 experts lies in (0, log 8]
    assert 0 < data["summary"]["router_entropy"] <= torch.log(torch.tensor(8.0)).item() + 1e-6


def test_ssr_sinkhorn_balances_top1_choices():
    model = hmp.patch(tiny_model("olmoe", num_experts=4, num_experts_per_tok=1), "ssr", inference="sinkhorn", epsilon=0.02)
    ids, mask = batch(batch_size=4, seq_len=32)
    with torch.no_grad(), hmp.collect_stats(model) as ssr_stats:
        model(input_ids=ids, attention_mask=mask)
    hmp.unpatch(model)
    with torch.no_grad(), hmp.collect_stats(model) as native_stats:
        model(input_ids=ids, attention_mask=mask)
    assert ssr_stats.summary()["maxvio_top1"] < native_stats.summary()["maxvio_top1"]
    assert ssr_stats.summary()["maxvio_top1"] < 0.15
    assert ssr_stats.summary()["sinkhorn_steps"] == 2


def test_json_has_no_nan_without_sinkhorn_steps(tmp_path):
    model = tiny_model("olmoe")
    with torch.no_grad(), hmp.collect_stats(model) as stats:
        model(input_ids=batch()[0])
    assert stats.summary()["sinkhorn_iterations_mean"] is None
    json.loads(stats.to_json(), parse_constant=lambda c: pytest.fail(f"invalid JSON constant {c}"))


def test_patching_inside_the_collector_still_skips_padding():
    model = hmp.patch(tiny_model("olmoe"), "expert_choice")
    ids, mask = batch(batch_size=2, seq_len=8, pad_from={1: 4})
    with torch.no_grad(), hmp.collect_stats(model) as stats:
        hmp.patch(model, "usmoe")  # a new patch, with its own layout record
        model(input_ids=ids, attention_mask=mask)
    assert stats.layers[0].tokens == 12
