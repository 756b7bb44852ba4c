"""Top-p dynamic routing (``"top_p"``) and token choice at a chosen k (``"topk"`` with ``top_k``).

Expected selections and gates are derived by hand from the literal probability tables in the
comments; none is produced by the code under test. Probabilities are given directly (their logs
are the logits, so ``softmax(log q) = q`` up to float rounding, far from every threshold used).
"""

from __future__ import annotations

import math

import pytest
import torch

import hf_moe_patch as hmp
from hf_moe_patch.embeddings.evaluation import expand_cases
from hf_moe_patch.errors import InvalidOptionError
from hf_moe_patch.methods import NativeRouting
from hf_moe_patch.methods.top_p import TopP
from hf_moe_patch.methods.topk import TopK
from hf_moe_patch.ops.top_p import top_p_slots
from hf_moe_patch.testing import tiny_model

from conftest import batch, capture_routing, make_call

N, K = 4, 2
S = N  # the sentinel index of an empty slot
NAN = float("nan")

# Three tokens, four experts; each row sums to 1. Ranks (largest first) and the mass before each:
PROBS = [
    [0.5, 0.3, 0.15, 0.05],  # e0 e1 e2 e3;  before: 0, .5, .8, .95
    [0.1, 0.2, 0.3, 0.4],  # e3 e2 e1 e0;  before: 0, .4, .7, .9
    [0.7, 0.1, 0.1, 0.1],  # e0 e1 e2 e3 (ties by index); before: 0, .7, .8, .9
]


# --- the tensor rule --------------------------------------------------------------------------


def test_top_p_slots_hand_cases():
    probs = torch.tensor(PROBS)
    # p = 0.6: row 0 takes e0 (before 0) and e1 (before .5 < .6), not e2 (before .8);
    # row 1 takes e3, e2 (before .4), not e1 (before .7); row 2 takes e0 only (before e1: .7).
    index, gates = top_p_slots(probs, 0.6)
    assert index.tolist() == [[0, 1], [3, 2], [0, S]]
    torch.testing.assert_close(gates, torch.tensor([[0.5, 0.3], [0.4, 0.3], [0.7, 0.0]]), atol=0, rtol=0)
    # p = 0.5: the mass before e1 in row 0 is exactly .5, which is not < .5: e0 alone.
    # Row 1: e3, then e2 (before .4 < .5). Row 2: e0.
    index, gates = top_p_slots(probs, 0.5)
    assert index.tolist() == [[0, S], [3, 2], [0, S]]
    # p = 0.85: row 0 e0, e1, e2 (before .8 < .85); row 1 e3, e2, e1 (before .7); row 2 e0, e1, e2
    # (ties among e1..e3 go to the lower index; before .8 < .85, then .9).
    index, gates = top_p_slots(probs, 0.85)
    assert index.tolist() == [[0, 1, 2], [3, 2, 1], [0, 1, 2]]
    torch.testing.assert_close(gates, torch.tensor([[0.5, 0.3, 0.15], [0.4, 0.3, 0.2], [0.7, 0.1, 0.1]]))
    # p = 1: every expert (the last one's "before" is .95, .9, .9 < 1).
    index, _ = top_p_slots(probs, 1.0)
    assert index.tolist() == [[0, 1, 2, 3], [3, 2, 1, 0], [0, 1, 2, 3]]


def test_top_p_slots_max_k_caps_and_ties_go_to_the_lower_index():
    probs = torch.tensor(PROBS)
    index, gates = top_p_slots(probs, 1.0, max_k=2)  # p = 1 would take all four
    assert index.tolist() == [[0, 1], [3, 2], [0, 1]]
    torch.testing.assert_close(gates, torch.tensor([[0.5, 0.3], [0.4, 0.3], [0.7, 0.1]]))
    index, _ = top_p_slots(probs, 0.6, max_k=1)
    assert index.tolist() == [[0], [3], [0]]
    # [.3, .3, .4, 0]: e2 first, then the tie e0 = e1 goes to e0 (before .4 < .6), not e1 (.7).
    index, _ = top_p_slots(torch.tensor([[0.3, 0.3, 0.4, 0.0]]), 0.6)
    assert index.tolist() == [[2, 0]]


def test_top_p_slots_nan_rows_take_their_nan_cells_and_gradients_reach_the_gates():
    probs = torch.tensor([[NAN] * 4, PROBS[0]])
    index, gates = top_p_slots(probs, 0.6)
    assert index.tolist() == [[0, 1, 2, 3], [0, 1, S, S]]
    assert bool(gates[0].isnan().all())
    assert gates[1].tolist() == [0.5, pytest.approx(0.3), 0.0, 0.0]
    index, gates = top_p_slots(probs, 0.6, max_k=1)
    assert index.tolist() == [[0], [0]] and math.isnan(gates[0, 0]) and gates[1, 0] == 0.5
    # Gradients reach exactly the selected cells (the selection itself is not differentiable).
    leaf = torch.tensor([PROBS[0]], requires_grad=True)
    _, gates = top_p_slots(leaf, 0.6)
    gates.sum().backward()
    assert leaf.grad.tolist() == [[1.0, 1.0, 0.0, 0.0]]


# --- the top_p method -------------------------------------------------------------------------


def test_top_p_method_gates_follow_the_native_renormalisation():
    logits = torch.tensor(PROBS).log()
    call, record = make_call(logits)
    out_logits, weights, index = TopP(p=0.6).route(call)
    assert record == [] and out_logits is logits  # the raw logits are the router's first output
    assert index.tolist() == [[0, 1], [3, 2], [0, S]]
    torch.testing.assert_close(weights, torch.tensor([[0.5, 0.3], [0.4, 0.3], [0.7, 0.0]]))
    # A renormalising router: [.5, .3] / .8 = [.625, .375]; [.4, .3] / .7 = [4/7, 3/7]; [.7] / .7 = 1.
    renormalised = torch.tensor([[0.625, 0.375], [4 / 7, 3 / 7], [1.0, 0.0]])
    call, _ = make_call(logits, NativeRouting(num_experts=N, top_k=K, renormalize=True))
    _, weights, index = TopP(p=0.6).route(call)
    assert index.tolist() == [[0, 1], [3, 2], [0, S]]
    torch.testing.assert_close(weights, renormalised)
    # The option overrides the native convention, both ways.
    call, _ = make_call(logits, NativeRouting(num_experts=N, top_k=K, renormalize=True))
    torch.testing.assert_close(TopP(p=0.6, renormalize=False).route(call)[1], torch.tensor([[0.5, 0.3], [0.4, 0.3], [0.7, 0.0]]))
    call, _ = make_call(logits)
    torch.testing.assert_close(TopP(p=0.6, renormalize=True).route(call)[1], renormalised)
    # max_k: p = 0.85 would give rows 3 experts each (see the tensor rule's test); capped at 2.
    call, _ = make_call(logits)
    _, weights, index = TopP(p=0.85, max_k=2).route(call)
    assert index.tolist() == [[0, 1], [3, 2], [0, 1]]


def test_top_p_method_dtypes_and_nan_logits():
    logits = torch.tensor(PROBS).log().to(torch.bfloat16)
    call, _ = make_call(logits)
    out_logits, weights, index = TopP(p=0.6).route(call)
    assert out_logits.dtype == torch.bfloat16 and weights.dtype == torch.bfloat16
    assert index.tolist() == [[0, 1], [3, 2], [0, S]]
    call, _ = make_call(logits, NativeRouting(num_experts=N, top_k=K, float32_weights=True))
    assert TopP(p=0.6).route(call)[1].dtype == torch.float32
    # A token with a NaN logit has a NaN softmax row: it takes every (NaN) cell, and its gates stay
    # NaN after renormalisation, as under the native router. The other token is untouched.
    logits = torch.tensor([[0.0, NAN, 1.0, 2.0], PROBS[2]]).log1p()  # log1p(NaN) = NaN
    call, _ = make_call(logits, NativeRouting(num_experts=N, top_k=K, renormalize=True))
    _, weights, index = TopP(p=0.6).route(call)
    assert index[0].tolist() == [0, 1, 2, 3] and bool(weights[0].isnan().all())
    assert bool(weights[1].isfinite().all())


def test_top_p_refuses_sigmoid_routers():
    native = NativeRouting(num_experts=N, top_k=K, score="sigmoid", scaling=2.5, renormalize=True)
    with pytest.raises(InvalidOptionError, match="'top_p' needs a softmax router.*sigmoid.*DeepSeek-V3.*supports "
                                                 "OLMoE, Qwen2-MoE, Qwen3-MoE, Mixtral and GPT-OSS"):
        TopP().validate(native)
    TopP().validate(NativeRouting(num_experts=N, top_k=K))  # softmax: fine
    with pytest.raises(InvalidOptionError, match="needs a softmax router"):
        hmp.patch(tiny_model("deepseek_v3"), "top_p", p=0.6)


# --- topk at a chosen k -----------------------------------------------------------------------


def test_topk_top_k_none_is_the_native_router_and_an_explicit_k_is_not():
    assert TopK().routes_natively(True) and TopK().routes_natively(False)
    assert not TopK(top_k=2).routes_natively(False) and not TopK(top_k=2).routes_natively(True)
    logits = torch.tensor(PROBS).log()
    call, record = make_call(logits)
    TopK().route(call)
    assert len(record) == 1
    call, record = make_call(logits)
    TopK(top_k=2).route(call)
    assert record == []


def test_topk_at_a_chosen_k_hand_cases():
    logits = torch.tensor(PROBS).log()
    # k' = 1: each token's best expert: e0 (.5), e3 (.4), e0 (.7).
    call, _ = make_call(logits)
    out_logits, weights, index = TopK(top_k=1).route(call)
    assert out_logits is logits and index.tolist() == [[0], [3], [0]]
    torch.testing.assert_close(weights, torch.tensor([[0.5], [0.4], [0.7]]))
    # Renormalised, a single expert's gate is 1.
    call, _ = make_call(logits, NativeRouting(num_experts=N, top_k=K, renormalize=True))
    _, weights, _ = TopK(top_k=1).route(call)
    torch.testing.assert_close(weights, torch.ones(3, 1))
    # k' = 3 (above the native k = 2): e0 e1 e2 / e3 e2 e1 / e0 + two of the tied .1s.
    call, _ = make_call(logits)
    _, weights, index = TopK(top_k=3).route(call)
    assert index[:2].tolist() == [[0, 1, 2], [3, 2, 1]] and index[2, 0] == 0
    torch.testing.assert_close(weights, torch.tensor([[0.5, 0.3, 0.15], [0.4, 0.3, 0.2], [0.7, 0.1, 0.1]]))


def test_topk_at_a_chosen_k_deepseek_like_bias_and_scaling():
    # Sigmoid scores of [2, 0, -1, -2]: .8807971 .5 .2689414 .1192029; the bias +2 on e3 puts it first
    # for choice only (key 2.1192029); gates are the scores times the scaling 2.5.
    bias = torch.tensor([0.0, 0.0, 0.0, 2.0])
    native = NativeRouting(num_experts=N, top_k=K, score="sigmoid", choice_bias=bias, scaling=2.5, float32_weights=True)
    logits = torch.tensor([[2.0, 0.0, -1.0, -2.0]])
    call, _ = make_call(logits, native)
    _, weights, index = TopK(top_k=1).route(call)
    assert index.tolist() == [[3]]
    torch.testing.assert_close(weights, torch.tensor([[2.5 * 0.1192029]]))
    call, _ = make_call(logits, native)
    _, weights, index = TopK(top_k=2).route(call)
    assert index.tolist() == [[3, 0]]
    torch.testing.assert_close(weights, torch.tensor([[2.5 * 0.1192029, 2.5 * 0.8807971]]))
    # Renormalised, then scaled: [.1192029, .8807971] / 1.0 * 2.5 (the two happen to sum to 1).
    native = NativeRouting(num_experts=N, top_k=K, score="sigmoid", choice_bias=bias, scaling=2.5, renormalize=True)
    call, _ = make_call(logits, native)
    _, weights, _ = TopK(top_k=1).route(call)
    torch.testing.assert_close(weights, torch.tensor([[2.5]]))


# --- on tiny models ---------------------------------------------------------------------------


def logits_of(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "qwen3_moe", "mixtral", "gpt_oss"])
def test_topk_at_the_native_k_equals_the_native_model_and_k1_does_not(family):
    model = tiny_model(family)  # 8 experts, native k = 2
    ids, mask = batch(seed=3, batch_size=2, seq_len=7, pad_from={1: 5})
    native = logits_of(model, ids, mask)
    hmp.patch(model, "topk", top_k=2)
    records, handles = capture_routing(model)
    if family == "gpt_oss":  # softmax over the top-2 logits natively, a renormalised full softmax here
        torch.testing.assert_close(logits_of(model, ids, mask), native, atol=1e-6, rtol=1e-6)
    else:  # the same float operations as the native router: bit for bit
        assert torch.equal(logits_of(model, ids, mask), native)
    assert {tuple(index.shape) for _, index in records} == {(14, 2)}
    hmp.patch(model, "topk", top_k=1)
    records.clear()
    one = logits_of(model, ids, mask)
    assert {tuple(index.shape) for _, index in records} == {(14, 1)}
    assert not torch.allclose(one, native, atol=1e-3)
    for h in handles:
        h.remove()
    # top_p with a tiny p takes exactly each token's best expert: the same model as top_k=1.
    hmp.patch(model, "top_p", p=1e-6)
    torch.testing.assert_close(logits_of(model, ids, mask), one, atol=1e-5, rtol=1e-5)
    # p = 1 capped at max_k = 2: exactly the native top-2 (through the pair dispatch).
    hmp.patch(model, "top_p", p=1.0, max_k=2)
    torch.testing.assert_close(logits_of(model, ids, mask), native, atol=1e-5, rtol=1e-5)


def test_top_p_routing_depends_neither_on_padding_nor_on_batch_mates():
    model = hmp.patch(tiny_model("olmoe"), "top_p", p=0.6)
    ids, mask = batch(seed=4, batch_size=2, seq_len=9, pad_from={1: 6})
    records, handles = capture_routing(model)
    together = logits_of(model, ids, mask)
    routed_together = [(w.view(2, 9, -1), i.view(2, 9, -1)) for w, i in records]
    records.clear()
    alone = logits_of(model, ids[1:, :6], mask[1:, :6])  # row 1's six real tokens, no padding, no batch-mate
    routed_alone = [(w.view(1, 6, -1), i.view(1, 6, -1)) for w, i in records]
    for h in handles:
        h.remove()
    torch.testing.assert_close(together[1, :6], alone[0], atol=1e-5, rtol=1e-5)
    counts = set()
    for (w_t, i_t), (w_a, i_a) in zip(routed_together, routed_alone):
        for pos in range(6):
            experts_t = {int(e): float(g) for e, g in zip(i_t[1, pos], w_t[1, pos]) if e < 8}
            experts_a = {int(e): float(g) for e, g in zip(i_a[0, pos], w_a[0, pos]) if e < 8}
            assert experts_t.keys() == experts_a.keys()
            assert experts_t == pytest.approx(experts_a, abs=1e-6)
            counts.add(len(experts_t))
    assert len(counts) > 1  # the number of experts per token really varies on this model


def test_top_p_generation_with_kv_cache_equals_generation_without():
    # The tiny models' greedy tokens rarely flip, so the step logits are compared too: a rule that
    # looked at a token's sequence (usmoe routes a decoded token alone, unlike in the full forward)
    # moves them by about 1e-3 here; top_p by float rounding only.
    for family in ("olmoe", "qwen3_moe"):
        model = hmp.patch(tiny_model(family), "top_p", p=0.6)
        ids, mask = batch(seed=5, batch_size=2, seq_len=6)
        kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, min_new_tokens=6,
                      output_logits=True, return_dict_in_generate=True)
        cached = model.generate(**kwargs, use_cache=True)
        uncached = model.generate(**kwargs, use_cache=False)
        assert cached.sequences.shape == (2, 12)
        assert torch.equal(cached.sequences, uncached.sequences)
        torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), atol=1e-5, rtol=0)


def test_the_budget_sweep_leaves_the_topk_baseline_native():
    cases = expand_cases(["topk", "topk:top_k=1", "usmoe", "top_p:p=0.5"], 2, ["1x", "0.5x"])
    assert [(c.label, c.options) for c in cases] == [
        ("topk", {}),
        ("topk:top_k=1", {"top_k": 1}),
        ("usmoe:top_k=1x", {"top_k": 2.0}),
        ("usmoe:top_k=0.5x", {"top_k": 1.0}),
        ("top_p:p=0.5", {"p": 0.5}),
    ]
