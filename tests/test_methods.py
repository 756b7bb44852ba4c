"""Tests of the routing methods, driven directly through ``RouterCall`` with fixed logits.

Expected selections and weights are hand-derived from the literal tables in the comments (the
unified scores U were computed once with plain ``math`` from ROUTING.md's formula and written
down here); none is produced by the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from hf_moe_patch.errors import InvalidOptionError
from hf_moe_patch.methods import METHODS, NativeRouting, StepState, build_method
from hf_moe_patch.methods.expert_choice import ExpertChoice
from hf_moe_patch.methods.ssr import SSR
from hf_moe_patch.methods.usmoe import USMoE

from conftest import make_call

N, K = 4, 2
S = N  # the sentinel index of an empty slot

# 2 sequences x 3 tokens x 4 experts (flattened to T = 6 rows, token t of sequence b is row 3b+t).
LOGITS = torch.tensor(
    [
        [2.0, 0.0, -1.0, -2.0],
        [0.0, 1.5, 1.0, -1.0],
        [-1.0, 0.5, 0.0, 2.5],
        [0.2, 0.0, -0.1, 0.1],
        [0.0, 0.3, 0.1, -0.2],
        [0.1, -0.1, 0.4, 0.0],
    ]
)
# U = 0.5 * softmax(Z) + 0.5 * (2/4) * sigmoid(Z), alpha = 0.5 (rank of each cell within its row):
#            e0            e1            e2            e3
U = [
    [0.6356756, 0.1812286, 0.0879207, 0.0374104],  # row 0 (seq 0, t0): e0 > e1 > e2 > e3
    [0.1833577, 0.4659347, 0.3413973, 0.0887040],  # row 1 (seq 0, t1): e1 > e2 > e0 > e3
    [0.0793374, 0.2098523, 0.1578967, 0.6317993],  # row 2 (seq 0, t2): e3 > e1 > e2 > e0
    [0.2817842, 0.2431639, 0.2256743, 0.2618361],  # row 3 (seq 1, t0): e0 > e3 > e1 > e2
    [0.2419930, 0.3015346, 0.2605420, 0.2083273],  # row 4 (seq 1, t1): e1 > e2 > e0 > e3
    [0.2539916, 0.2192518, 0.3153627, 0.2360659],  # row 5 (seq 1, t2): e2 > e0 > e3 > e1
]
# Cells of sequence 0 in descending order:
#   .6357 (0,e0) .6318 (2,e3) .4659 (1,e1) .3414 (1,e2) .2099 (2,e1) .1834 (1,e0) | .1812 (0,e1) ...
# Cells of sequence 1 in descending order:
#   .3154 (5,e2) .3015 (4,e1) .2818 (3,e0) .2618 (3,e3) .2605 (4,e2) .2540 (5,e0) | .2432 (3,e1)
#   .2420 (4,e0) .2361 (5,e3) .2257 (3,e2) .2193 (5,e1) .2083 (4,e3)
# Whole batch: sequence 0's top four (.6357 .6318 .4659 .3414) beat all of sequence 1, then
#   sequence 1's cells down to .2420, then .2361 (5,e3) ... and only then .2099 (2,e1).


def two_by_three(valid=None, training=False, coins=None, seed=None) -> StepState:
    return StepState(valid=valid, batch_size=2, seq_len=3, training=training, coins=coins, seed=seed)


def pairs(index: torch.Tensor, weights: torch.Tensor, num_experts: int = N) -> dict:
    """{(row, expert): weight} of the real slots; checks that empty slots carry weight 0."""
    out = {}
    for t in range(index.shape[0]):
        for s in range(index.shape[1]):
            e, w = int(index[t, s]), float(weights[t, s])
            if e == num_experts:
                assert w == 0.0, f"empty slot ({t}, {s}) has weight {w}"
            else:
                assert (t, e) not in out, f"expert {e} twice in row {t}"
                out[(t, e)] = w
    return out


def assert_pairs(index, weights, expected: dict, num_experts: int = N, tol: float = 2e-6):
    got = pairs(index, weights, num_experts)
    assert set(got) == set(expected), f"selected {sorted(got)} != expected {sorted(expected)}"
    for key, w in expected.items():
        assert abs(got[key] - w) < tol, f"{key}: weight {got[key]} != {w}"


def u_pairs(cells) -> dict:
    """Raw-U gates for a list of (row, expert) cells."""
    return {(t, e): U[t][e] for t, e in cells}


def renormalised(expected: dict) -> dict:
    sums: dict = {}
    for (t, _), w in expected.items():
        sums[t] = sums.get(t, 0.0) + w
    return {(t, e): w / sums[t] for (t, e), w in expected.items()}


# --- USMoE --------------------------------------------------------------------------------------

SEQ_K2 = [(0, 0), (1, 1), (1, 2), (1, 0), (2, 3), (2, 1), (3, 0), (3, 3), (4, 1), (4, 2), (5, 2), (5, 0)]


def test_usmoe_sequence_scope_native_budget_exact_layout():
    # Budget k = 2 per token: c = round(2 * 3) = 6 per sequence (the six cells before '|' above).
    call, record = make_call(LOGITS, step=two_by_three())
    logits, weights, index = USMoE().route(call)
    assert record == []  # the native router is not used
    assert logits is LOGITS  # the raw logits are the router output, not U
    # Slots ordered by U (best first), k_max = 3 (row 1), sentinel 4 with weight 0 elsewhere.
    assert index.tolist() == [[0, S, S], [1, 2, 0], [3, 1, S], [0, 3, S], [1, 2, S], [2, 0, S]]
    expected_w = [
        [U[0][0], 0, 0],
        [U[1][1], U[1][2], U[1][0]],
        [U[2][3], U[2][1], 0],
        [U[3][0], U[3][3], 0],
        [U[4][1], U[4][2], 0],
        [U[5][2], U[5][0], 0],
    ]
    torch.testing.assert_close(weights, torch.tensor(expected_w), atol=2e-6, rtol=0)
    assert weights.dtype == LOGITS.dtype


def test_usmoe_row_normalisation_of_the_official_code():
    # renormalize="row": the selected U over the sum of the token's whole row of U (all 4 experts),
    # as the official code does with norm_topk_prob. Budget 2 selects the cells of SEQ_K2.
    call, _ = make_call(LOGITS, step=two_by_three())
    _, weights, index = USMoE(renormalize="row").route(call)
    row_sums = [sum(row) for row in U]  # e.g. row 0: .6357 + .1812 + .0879 + .0374 = .9422
    assert_pairs(index, weights, {(t, e): U[t][e] / row_sums[t] for t, e in SEQ_K2})
    # Token 0 has one expert: .6357 / .9422 = .6747, not 1 as with renormalize=True.
    assert abs(float(weights[0].sum()) - 0.6356756 / 0.9422353) < 2e-6


def test_usmoe_fractional_budget():
    # Budget 1.5: c = round(1.5 * 3) = round(4.5) = 4 per sequence.
    #   seq 0: .6357 (0,e0) .6318 (2,e3) .4659 (1,e1) .3414 (1,e2)
    #   seq 1: .3154 (5,e2) .3015 (4,e1) .2818 (3,e0) .2618 (3,e3)
    call, _ = make_call(LOGITS, step=two_by_three())
    _, weights, index = USMoE(top_k=1.5).route(call)
    assert_pairs(index, weights, u_pairs([(0, 0), (2, 3), (1, 1), (1, 2), (5, 2), (4, 1), (3, 0), (3, 3)]))
    # Budget 1: c = 3 per sequence: each token's own top-1 here.
    call, _ = make_call(LOGITS, step=two_by_three())
    _, weights, index = USMoE(top_k=1).route(call)
    assert index.tolist() == [[0], [1], [3], [0], [1], [2]]
    assert_pairs(index, weights, u_pairs([(0, 0), (1, 1), (2, 3), (3, 0), (4, 1), (5, 2)]))


def test_usmoe_batch_scope_pools_the_budget():
    # c = round(2 * 6) = 12 over the whole batch: sequence 0 keeps only its top four cells, sequence
    # 1 takes eight (rows 3 and 4 get three experts each).
    call, _ = make_call(LOGITS, step=two_by_three())
    _, weights, index = USMoE(scope="batch").route(call)
    cells = [(0, 0), (2, 3), (1, 1), (1, 2)]
    cells += [(5, 2), (4, 1), (3, 0), (3, 3), (4, 2), (5, 0), (3, 1), (4, 0)]
    assert_pairs(index, weights, u_pairs(cells))
    assert index.shape == (6, 3)


def test_usmoe_zero_expert_tokens_get_sentinels_not_nan():
    # Budget 0.5: c = round(1.5) = 2 per sequence: seq 0 -> (0,e0), (2,e3); seq 1 -> (5,e2), (4,e1).
    # Rows 1 and 3 get no expert. k_max = 1.
    for renormalize in (False, True):
        call, _ = make_call(LOGITS, step=two_by_three())
        _, weights, index = USMoE(top_k=0.5, renormalize=renormalize).route(call)
        assert index.tolist() == [[0], [S], [3], [S], [1], [2]]
        assert not bool(torch.isnan(weights).any())
        assert weights[1].tolist() == [0.0] and weights[3].tolist() == [0.0]
        if renormalize:  # a single expert renormalises to 1
            assert weights[[0, 2, 4, 5]].flatten().tolist() == [1.0, 1.0, 1.0, 1.0]
        else:
            assert_pairs(index, weights, u_pairs([(0, 0), (2, 3), (5, 2), (4, 1)]))


def test_usmoe_min_experts_floor():
    # Batch scope, budget 1: c = 6 over the batch: .6357 (0,e0) .6318 (2,e3) .4659 (1,e1) .3414 (1,e2)
    # .3154 (5,e2) .3015 (4,e1) -> row 3 gets nothing.
    call, _ = make_call(LOGITS, step=two_by_three())
    _, weights, index = USMoE(top_k=1, scope="batch").route(call)
    assert_pairs(index, weights, u_pairs([(0, 0), (2, 3), (1, 1), (1, 2), (5, 2), (4, 1)]))
    # min_experts = 1: c = max(6, 6 * 1) = 6, all spent on each token's top-1: row 3 gets e0 and
    # row 1 loses e2.
    call, _ = make_call(LOGITS, step=two_by_three())
    _, weights, index = USMoE(top_k=1, scope="batch", min_experts=1).route(call)
    assert_pairs(index, weights, u_pairs([(0, 0), (1, 1), (2, 3), (3, 0), (4, 1), (5, 2)]))
    # Sequence scope, budget 0.5 (rows 1 and 3 were empty), min_experts = 1: c = max(2, 3) = 3 per
    # sequence -> every token's top-1.
    call, _ = make_call(LOGITS, step=two_by_three())
    _, weights, index = USMoE(top_k=0.5, min_experts=1).route(call)
    assert_pairs(index, weights, u_pairs([(0, 0), (1, 1), (2, 3), (3, 0), (4, 1), (5, 2)]))


def test_usmoe_renormalize_follows_native_or_override():
    raw = u_pairs(SEQ_K2)
    # e.g. row 1: [.4659347, .3413973, .1833577] / .9906897 = [.470313, .344606, .185081]
    norm = renormalised(raw)
    assert abs(norm[(1, 1)] - 0.4659347 / 0.9906897) < 1e-9
    cases = [
        (False, None, raw),
        (True, None, norm),
        (False, True, norm),
        (True, False, raw),
        (True, True, norm),
        (False, False, raw),
    ]
    for native_renorm, option, expected in cases:
        native = NativeRouting(num_experts=N, top_k=K, renormalize=native_renorm)
        call, _ = make_call(LOGITS, native=native, step=two_by_three())
        _, weights, index = USMoE(renormalize=option).route(call)
        assert_pairs(index, weights, expected)
        if expected is norm:
            torch.testing.assert_close(weights.sum(dim=-1), torch.ones(6))


def test_usmoe_padding_takes_no_part():
    # Row 5 (seq 1, t2) is padding: seq 1 has T_valid = 2 and c = round(2 * 2) = 4 among rows 3, 4:
    #   .3015 (4,e1) .2818 (3,e0) .2618 (3,e3) .2605 (4,e2). Sequence 0 is unchanged.
    valid = torch.tensor([[True, True, True], [True, True, False]])
    call, _ = make_call(LOGITS, step=two_by_three(valid=valid))
    _, weights, index = USMoE().route(call)
    cells = [(0, 0), (1, 1), (1, 2), (1, 0), (2, 3), (2, 1), (4, 1), (3, 0), (3, 3), (4, 2)]
    assert_pairs(index, weights, u_pairs(cells))
    assert index[5].tolist() == [S, S, S]
    # Batch scope: T_valid = 5 over the batch, c = 10: .6357 .6318 .4659 .3414 | .3015 (4,e1)
    # .2818 (3,e0) .2618 (3,e3) .2605 (4,e2) .2432 (3,e1) .2420 (4,e0); the padding row's .3154 and
    # .2540 are skipped.
    call, _ = make_call(LOGITS, step=two_by_three(valid=valid))
    _, weights, index = USMoE(scope="batch").route(call)
    cells = [(0, 0), (2, 3), (1, 1), (1, 2), (4, 1), (3, 0), (3, 3), (4, 2), (3, 1), (4, 0)]
    assert_pairs(index, weights, u_pairs(cells))


def test_usmoe_without_layout_is_one_sequence():
    # No batch layout recorded: the 6 rows form one sequence, c = 12 -> same cells as batch scope.
    call, _ = make_call(LOGITS, step=StepState())
    _, weights, index = USMoE().route(call)
    cells = [(0, 0), (2, 3), (1, 1), (1, 2)]
    cells += [(5, 2), (4, 1), (3, 0), (3, 3), (4, 2), (5, 0), (3, 1), (4, 0)]
    assert_pairs(index, weights, u_pairs(cells))


def test_usmoe_alpha_changes_the_score():
    # alpha = 1: U = softmax(Z). Row 0: softmax([2, 0, -1, -2]) = e^z / (e^2 + 1 + e^-1 + e^-2).
    row0 = [2.0, 0.0, -1.0, -2.0]
    tot = sum(math.exp(v) for v in row0)
    call, _ = make_call(LOGITS[:1], step=StepState())
    _, weights, index = USMoE(alpha=1.0).route(call)  # c = 2: e0, e1
    assert_pairs(index, weights, {(0, 0): math.exp(2) / tot, (0, 1): 1 / tot})
    # alpha = 0: U = (2/4) * sigmoid(Z) = [0.5 * sigmoid(2), 0.5 * sigmoid(0)] on e0, e1.
    call, _ = make_call(LOGITS[:1], step=StepState())
    _, weights, index = USMoE(alpha=0.0).route(call)
    assert_pairs(index, weights, {(0, 0): 0.5 / (1 + math.exp(-2)), (0, 1): 0.25})


def test_usmoe_deepseek_like_bias_and_scaling():
    # Sequence 0 only (rows 0-2). Sigmoid-scored family with a correction bias on e3 and scaling 2.5.
    bias = torch.tensor([0.0, 0.0, 0.0, 2.0])
    native = NativeRouting(num_experts=N, top_k=K, score="sigmoid", choice_bias=bias, scaling=2.5, float32_weights=True)
    # key = U + (1 - alpha) * (2/N) * bias = U + 0.25 * bias: +0.5 on e3 ->
    #   row 0 e3: .0374 + .5 = .5374;  row 1 e3: .0887 + .5 = .5887;  row 2 e3: .6318 + .5 = 1.1318.
    # Budget 1: c = 3 -> 1.1318 (2,e3), .6357 (0,e0), .5887 (1,e3): row 1 now takes e3, not e1.
    # Gates are 2.5 * U (not the key).
    call, _ = make_call(LOGITS[:3], native=native, step=StepState())
    _, weights, index = USMoE(top_k=1).route(call)
    assert_pairs(index, weights, {(2, 3): 2.5 * U[2][3], (0, 0): 2.5 * U[0][0], (1, 3): 2.5 * U[1][3]}, tol=1e-5)
    assert weights.dtype == torch.float32
    # Budget 2: c = 6 -> 1.1318 (2,e3) .6357 (0,e0) .5887 (1,e3) .5374 (0,e3) .4659 (1,e1) .3414 (1,e2)
    call, _ = make_call(LOGITS[:3], native=native, step=StepState())
    _, weights, index = USMoE().route(call)
    assert index.tolist() == [[0, 3, S], [3, 1, 2], [3, S, S]]
    cells = [(2, 3), (0, 0), (1, 3), (0, 3), (1, 1), (1, 2)]
    assert_pairs(index, weights, {c: 2.5 * U[c[0]][c[1]] for c in cells}, tol=1e-5)
    # Without the bias (scaling only): budget 1 -> each token's top-1 by U.
    native = NativeRouting(num_experts=N, top_k=K, score="sigmoid", scaling=2.5)
    call, _ = make_call(LOGITS[:3], native=native, step=StepState())
    _, weights, index = USMoE(top_k=1).route(call)
    assert_pairs(index, weights, {(0, 0): 2.5 * U[0][0], (1, 1): 2.5 * U[1][1], (2, 3): 2.5 * U[2][3]}, tol=1e-5)
    # Renormalised and scaled: each row sums to 2.5.
    native = NativeRouting(num_experts=N, top_k=K, score="sigmoid", renormalize=True, scaling=2.5)
    call, _ = make_call(LOGITS[:3], native=native, step=StepState())
    _, weights, _ = USMoE().route(call)
    torch.testing.assert_close(weights.sum(dim=-1), torch.full((3,), 2.5))


def test_usmoe_bf16_logits_weights_dtype():
    z = LOGITS.to(torch.bfloat16)
    call, _ = make_call(z, step=two_by_three())
    logits, weights, index = USMoE(top_k=1).route(call)
    assert logits.dtype == torch.bfloat16 and weights.dtype == torch.bfloat16
    assert index.tolist() == [[0], [1], [3], [0], [1], [2]]
    native = NativeRouting(num_experts=N, top_k=K, float32_weights=True)
    call, _ = make_call(z, native=native, step=two_by_three())
    _, weights, _ = USMoE(top_k=1).route(call)
    assert weights.dtype == torch.float32


# --- ExpertChoice ------------------------------------------------------------------------------

# Softmax scores written directly; the logits are their logs, so softmax(logits) = the scores.
EC_SCORES = [
    [0.1, 0.2, 0.3, 0.4],  # row 0 (seq 0, t0)
    [0.7, 0.1, 0.1, 0.1],  # row 1 (seq 0, t1) -- padding
    [0.4, 0.3, 0.2, 0.1],  # row 2 (seq 0, t2)
    [0.45, 0.2, 0.25, 0.1],  # row 3 (seq 1, t0)
    [0.1, 0.55, 0.3, 0.05],  # row 4 (seq 1, t1)
    [0.4, 0.1, 0.1, 0.4],  # row 5 (seq 1, t2)
]


def test_expert_choice_hand_case_with_padding():
    logits = torch.tensor(EC_SCORES).log()
    valid = torch.tensor([[True, False, True], [True, True, True]])
    call, record = make_call(logits, step=two_by_three(valid=valid))
    out_logits, weights, index = ExpertChoice().route(call)
    assert record == [] and out_logits is logits
    # Seq 0: T_valid = 2, C = round(2 * 2 / 4) = 1 (with the padding counted: round(1.5) = 2).
    #   e0: .4 (row 2)  e1: .3 (row 2)  e2: .3 (row 0)  e3: .4 (row 0); row 1's .7 does not count.
    # Seq 1: C = round(2 * 3 / 4) = round(1.5) = 2.
    #   e0: .45 (3), .4 (5)  e1: .55 (4), .2 (3)  e2: .3 (4), .25 (3)  e3: .4 (5), .1 (3)
    cells = [(0, 3), (0, 2), (2, 0), (2, 1), (3, 0), (5, 0), (4, 1), (3, 1), (4, 2), (3, 2), (5, 3), (3, 3)]
    assert_pairs(index, weights, {(t, e): EC_SCORES[t][e] for t, e in cells}, tol=1e-6)
    assert index[1].tolist() == [S] * 4  # k_max = 4 (row 3); padding row empty
    assert index[3].tolist() == [0, 2, 1, 3]  # ordered by score: .45 .25 .2 .1


def test_expert_choice_top_k_option_and_scaling():
    logits = torch.tensor(EC_SCORES).log()
    valid = torch.tensor([[True, False, True], [True, True, True]])
    native = NativeRouting(num_experts=N, top_k=K, scaling=2.5)
    call, _ = make_call(logits, native=native, step=two_by_three(valid=valid))
    _, weights, index = ExpertChoice(top_k=1).route(call)
    # top_k = 1: seq 0 C = round(2 / 4) = round(0.5) = 0 (ties to even): nothing.
    # seq 1 C = round(3 / 4) = 1: e0 .45 (3), e1 .55 (4), e2 .3 (4), e3 .4 (5).
    cells = [(3, 0), (4, 1), (4, 2), (5, 3)]
    assert_pairs(index, weights, {(t, e): 2.5 * EC_SCORES[t][e] for t, e in cells}, tol=1e-5)


# --- SSR --------------------------------------------------------------------------------------


def _random_logits(seed: int, t: int = 6, n: int = N, requires_grad: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, n, generator=g).requires_grad_(requires_grad)


def test_ssr_sinkhorn_branch_on_won_coin():
    logits = _random_logits(0)
    valid = torch.tensor([[True, True, False], [True, True, True]])
    call, record = make_call(logits, step=two_by_three(valid=valid, training=True, coins=torch.tensor([True])))
    out_logits, weights, index = SSR(p=0.5).route(call)
    assert record == []
    assert out_logits is logits
    assert call.info["sinkhorn"] is True
    assert isinstance(call.info["iterations"], int) and 1 <= call.info["iterations"] <= 100
    assert call.info["row_error"] >= 0
    assert index.shape == (6, K) and weights.shape == (6, K)
    rows = [0, 1, 3, 4, 5]
    torch.testing.assert_close(weights[rows].sum(dim=-1), torch.ones(5))
    assert bool((weights[rows] > 0).all())
    for r in rows:  # k distinct real experts
        assert len(set(index[r].tolist())) == K and max(index[r].tolist()) < N
    assert index[2].tolist() == [S, S] and weights[2].tolist() == [0.0, 0.0]


def test_ssr_hand_case_logits_vs_softmax_cost():
    # N = 2, k = 2, two tokens, logits [[1, 0], [0, 1]], eps = 1.
    native = NativeRouting(num_experts=2, top_k=2)
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    step = StepState(training=True, coins=torch.tensor([True]))
    # SSR-L: C = logits is symmetric, so the plan is [[p, 1-p], [1-p, p]] with
    # p = e^1 / (e^1 + e^0) = sigmoid(1) = 0.7310586; top-2 gates = the rows.
    call, _ = make_call(logits, native=native, step=step)
    _, w_l, i_l = SSR(p=1.0, cost="logits", epsilon=1.0).route(call)
    p = 1 / (1 + math.exp(-1))
    assert i_l.tolist() == [[0, 1], [1, 0]]
    torch.testing.assert_close(w_l, torch.tensor([[p, 1 - p], [p, 1 - p]]))
    # SSR-S: C = softmax rows = [[s, 1-s], [1-s, s]], s = sigmoid(1); symmetric again, so
    # q = sigmoid((s - (1 - s)) / eps) = sigmoid(2s - 1) = sigmoid(0.4621172) = 0.6135155.
    call, _ = make_call(logits, native=native, step=step)
    _, w_s, i_s = SSR(p=1.0, cost="softmax", epsilon=1.0).route(call)
    q = 1 / (1 + math.exp(-(2 * p - 1)))
    assert i_s.tolist() == [[0, 1], [1, 0]]
    torch.testing.assert_close(w_s, torch.tensor([[q, 1 - q], [q, 1 - q]]))


def test_ssr_logits_and_softmax_costs_differ_on_random_logits():
    logits = _random_logits(3)
    step = two_by_three(training=True, coins=torch.tensor([True]))
    out = {}
    for cost in ("logits", "softmax"):
        call, _ = make_call(logits, step=step)
        out[cost] = SSR(p=1.0, cost=cost, epsilon=0.5).route(call)[1]
    assert not torch.allclose(out["logits"], out["softmax"], atol=1e-3)


def test_ssr_sequence_scope_lone_token_gets_uniform_plan():
    # Scope "sequence": sequence 0 has a single valid token (row 0). Its plan row is m/N = 1/4 per
    # expert whatever the cost, so its top-2 gates are [0.25, 0.25] / 0.5 = [0.5, 0.5].
    logits = torch.tensor([[3.0, -1.0, 0.5, 0.0]] * 3 + [[0.0, 1.0, 2.0, 3.0]] * 3)
    valid = torch.tensor([[True, False, False], [True, True, True]])
    step = two_by_three(valid=valid, training=True, coins=torch.tensor([True]))
    call, _ = make_call(logits, step=step)
    _, weights, index = SSR(p=1.0, scope="sequence", epsilon=0.05).route(call)
    torch.testing.assert_close(weights[0], torch.tensor([0.5, 0.5]))
    assert len(set(index[0].tolist())) == 2 and max(index[0].tolist()) < N
    assert index[1].tolist() == [S, S] and index[2].tolist() == [S, S]
    # Scope "batch": row 0 shares the plan with rows 3-5, and its strong e0 preference shows.
    call, _ = make_call(logits, step=step)
    _, weights_b, index_b = SSR(p=1.0, scope="batch", epsilon=0.05).route(call)
    assert index_b[0, 0].item() == 0 and weights_b[0, 0].item() > 0.5


def test_ssr_rescale_to_native_sum():
    # Lone token (sequence scope) with softmax scores [.1, .2, .3, .4]: plan gates [0.5, 0.5] on two
    # experts i, j; rescale multiplies them by s_i + s_j, the sum the native router would give.
    s = [0.1, 0.2, 0.3, 0.4]
    logits = torch.tensor([s] * 6).log()
    valid = torch.tensor([[True, False, False], [False, False, False]])
    step = two_by_three(valid=valid, training=True, coins=torch.tensor([True]))
    call, _ = make_call(logits, step=step)
    _, weights, index = SSR(p=1.0, scope="sequence", rescale=True).route(call)
    i, j = index[0].tolist()
    torch.testing.assert_close(weights[0], torch.full((2,), 0.5 * (s[i] + s[j])))
    assert bool((index[1:] == S).all()) and bool((weights[1:] == 0).all())
    # A renormalising native router: rescale changes nothing, gates still sum to 1.
    native = NativeRouting(num_experts=N, top_k=K, renormalize=True)
    call, _ = make_call(logits, native=native, step=step)
    _, weights, _ = SSR(p=1.0, scope="sequence", rescale=True).route(call)
    torch.testing.assert_close(weights[0], torch.tensor([0.5, 0.5]))


def test_ssr_scaling_applies_on_sinkhorn_steps():
    native = NativeRouting(num_experts=N, top_k=K, score="sigmoid", scaling=2.5, float32_weights=True)
    step = two_by_three(training=True, coins=torch.tensor([True]))
    call, _ = make_call(_random_logits(4), native=native, step=step)
    _, weights, _ = SSR(p=1.0).route(call)
    torch.testing.assert_close(weights.sum(dim=-1), torch.full((6,), 2.5))


def test_ssr_lost_coin_uses_native_forward():
    logits = _random_logits(1)
    step = two_by_three(training=True, coins=torch.tensor([False]))
    call, record = make_call(logits, step=step)
    out = SSR(p=0.5).route(call)
    assert len(record) == 1 and record[0] is call.hidden_states
    assert call.info["sinkhorn"] is False
    expected = call.native_forward(call.hidden_states)
    assert out[0] is logits
    assert torch.equal(out[1], expected[1]) and torch.equal(out[2], expected[2])
    # Training without coins drawn (prepare_step not called): native too.
    call, record = make_call(logits, step=two_by_three(training=True, coins=None))
    SSR(p=1.0).route(call)
    assert len(record) == 1 and call.info["sinkhorn"] is False


def test_ssr_eval_mode_native_unless_inference_sinkhorn():
    logits = _random_logits(2)
    # Eval, even with a (stale) won coin: native.
    call, record = make_call(logits, step=two_by_three(training=False, coins=torch.tensor([True])))
    SSR(p=1.0).route(call)
    assert len(record) == 1 and call.info["sinkhorn"] is False
    # inference="sinkhorn": the plan, with no coin at all.
    call, record = make_call(logits, step=two_by_three(training=False, coins=None))
    _, weights, _ = SSR(p=0.0, inference="sinkhorn").route(call)
    assert record == [] and call.info["sinkhorn"] is True
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(6))


def test_ssr_per_layer_coins():
    logits = _random_logits(2)
    coins = torch.tensor([False, True, False])
    for layer, expect in enumerate([False, True, False]):
        call, record = make_call(logits, step=two_by_three(training=True, coins=coins), layer=layer)
        SSR(p=0.5, per_layer=True).route(call)
        assert call.info["sinkhorn"] is expect and (len(record) == 0) is expect
    # per_layer=False: one coin for every layer.
    for layer in range(3):
        call, record = make_call(logits, step=two_by_three(training=True, coins=torch.tensor([True])), layer=layer)
        SSR(p=0.5).route(call)
        assert call.info["sinkhorn"] is True


@pytest.mark.parametrize("scope", ["batch", "sequence"])
def test_ssr_detach_controls_gradient(scope):
    valid = torch.tensor([[True, True, True], [False, False, False]])  # incl. an all-padding sequence
    mix = torch.randn(6, K, generator=torch.Generator().manual_seed(9))
    for detach in (True, False):
        logits = _random_logits(5, requires_grad=True)
        step = two_by_three(valid=valid, training=True, coins=torch.tensor([True]))
        call, _ = make_call(logits, step=step)
        _, weights, _ = SSR(p=1.0, detach=detach, scope=scope).route(call)
        if detach:
            assert not weights.requires_grad
        else:
            (weights * mix).sum().backward()
            assert logits.grad is not None
            assert bool(torch.isfinite(logits.grad).all())
            assert float(logits.grad[:3].abs().sum()) > 0
            assert bool((logits.grad[3:] == 0).all())  # padding takes no part


def test_ssr_noise_is_deterministic_per_seed_and_layer():
    logits = _random_logits(6)

    def run(noise, seed, layer):
        step = two_by_three(training=True, coins=torch.tensor([True]), seed=seed)
        call, _ = make_call(logits, step=step, layer=layer)
        return SSR(p=1.0, noise=noise, epsilon=0.05).route(call)[1]

    a = run(0.5, 123, 0)
    assert torch.equal(a, run(0.5, 123, 0))
    assert not torch.equal(a, run(0.5, 123, 1))
    assert not torch.equal(a, run(0.5, 124, 0))
    assert not torch.equal(a, run(0.0, 123, 0))
    # noise = 0 needs no seed and is the same whatever the seed.
    assert torch.equal(run(0.0, 1, 0), run(0.0, 2, 0))


def test_ssr_prepare_step_coin_rate():
    m = SSR(p=0.1, seed=0)
    wins = 0
    draws = 20000
    for _ in range(draws):
        step = StepState(training=True)
        m.prepare_step(step, num_layers=5)
        assert step.coins is not None and step.coins.shape == (1,) and step.coins.dtype == torch.bool
        wins += int(step.coins.sum())
    # Binomial(20000, 0.1): mean 2000, sigma = sqrt(20000 * 0.1 * 0.9) = 42.4; 4 sigma = 170.
    assert abs(wins - 2000) < 170


def test_ssr_prepare_step_per_layer():
    m = SSR(p=0.5, seed=1, per_layer=True)
    wins, mixed = 0, 0
    for _ in range(1000):
        step = StepState(training=True)
        m.prepare_step(step, num_layers=4)
        assert step.coins.shape == (4,)
        wins += int(step.coins.sum())
        mixed += int(bool(step.coins.any()) and not bool(step.coins.all()))
    # 4000 draws at p = 0.5: mean 2000, sigma = sqrt(4000 * 0.25) = 31.6; 4 sigma = 126.
    assert abs(wins - 2000) < 127
    # Layers draw independently: P(all four equal) = 1/8, so most steps mix wins and losses.
    assert mixed > 700


def test_ssr_prepare_step_seed_repeats_and_extremes():
    def coins(method, n=200, layers=3):
        out = []
        for _ in range(n):
            step = StepState(training=True)
            method.prepare_step(step, num_layers=layers)
            out.append(step.coins.tolist())
        return out

    assert coins(SSR(p=0.5, seed=7, per_layer=True)) == coins(SSR(p=0.5, seed=7, per_layer=True))
    assert coins(SSR(p=0.5, seed=7, per_layer=True)) != coins(SSR(p=0.5, seed=8, per_layer=True))
    # seed=None: torch's global RNG, so torch.manual_seed makes runs repeat.
    torch.manual_seed(11)
    first = coins(SSR(p=0.5, per_layer=True))
    torch.manual_seed(11)
    assert coins(SSR(p=0.5, per_layer=True)) == first
    # p = 0 never, p = 1 always.
    assert all(c == [False] for c in coins(SSR(p=0.0, seed=0), layers=2))
    assert all(c == [True] for c in coins(SSR(p=1.0, seed=0), layers=2))


def test_ssr_prepare_step_eval_draws_no_coins():
    m = SSR(p=1.0, seed=0)
    step = StepState(training=False, coins=torch.tensor([True]))
    m.prepare_step(step, num_layers=3)
    assert step.coins is None
    # Eval draws do not consume the coin stream: the next training coins equal a fresh instance's.
    for _ in range(5):
        m.prepare_step(StepState(training=False), num_layers=3)
    a, b = StepState(training=True), StepState(training=True)
    m2 = SSR(p=0.5, seed=3)
    m3 = SSR(p=0.5, seed=3)
    for _ in range(5):
        m3.prepare_step(StepState(training=False), num_layers=1)
    m2.prepare_step(a, num_layers=1)
    m3.prepare_step(b, num_layers=1)
    assert torch.equal(a.coins, b.coins)
    # With noise, a per-forward seed is drawn (also in eval) and repeats with the method's seed.
    s1, s2 = StepState(training=False), StepState(training=False)
    SSR(noise=0.1, seed=4).prepare_step(s1, 1)
    SSR(noise=0.1, seed=4).prepare_step(s2, 1)
    assert isinstance(s1.seed, int) and s1.seed == s2.seed


# --- option validation -------------------------------------------------------------------------

NATIVE = NativeRouting(num_experts=N, top_k=K)
NAN, INF = float("nan"), float("inf")
BUDGET = "None (the native k=2) or a number in (0, 4] (N experts)"

BAD_OPTIONS = {
    "topk": {
        "top_k": ([0, 5, -1, 1.5, 2.0, True, "2", NAN],
                  "None (the native k=2: the native router itself) or an integer in [1, 4] (N experts)"),
    },
    "top_p": {
        "p": ([0, 0.0, -0.1, 1.5, True, "0.5", NAN, INF, None], "a number in (0, 1]"),
        "max_k": ([0, 5, -1, 1.5, 2.0, True, "2"], "None (no cap) or an integer in [1, 4] (N experts)"),
        "renormalize": ([1, 0, "yes", "True"], "one of None, True, False"),
    },
    "usmoe": {
        "top_k": ([0, 0.0, -1, 4.5, 5, True, "2", NAN, INF], BUDGET),
        "alpha": ([-0.1, 1.5, True, "0.5", NAN, None], "a number in [0, 1]"),
        "scope": (["global", None, 1, "Sequence"], "one of 'sequence', 'batch'"),
        "renormalize": ([1, 0, "yes", "True", "Row"], "one of None, True, False, 'row'"),
        "min_experts": ([-1, 5, 1.0, True, None], "an integer in [0, 4] (N experts)"),
        "causal": ([1, 0, "yes", None], "one of False, True"),
        "thresholds": (["0.1", 0.1, [], [NAN], [True], [0.1, "x"], [[0.1]]],
                       "None or a non-empty list with a number per MoE layer (no NaN)"),
        "max_experts": ([0, 5, 1.5, True, "2"], "None (no cap) or an integer in [1, 4] (N experts)"),
        "calibration_info": (["x", 1, [1]], "None or the dict a calibration writes"),
    },
    "expert_choice": {
        "top_k": ([0, -0.5, 5, False, "1", NAN], BUDGET),
        "causal": ([1, "yes", None], "one of False, True"),
        "thresholds": ([[0.1, 0.2], [[0.1] * 3], [[0.1] * 4, [NAN] * 4], [[0.1] * 5], [[]]],
                       "None or a non-empty list with a list of N = 4 numbers per MoE layer (N experts; no NaN)"),
        "calibration_info": (["x", [1]], "None or the dict a calibration writes"),
    },
    "ssr": {
        "p": ([-0.1, 1.1, True, "0.1", NAN, None], "a number in [0, 1]"),
        "epsilon": ([0, 0.0, -1.0, 1e-5, INF, True, NAN, None], "a number in [0.0001, inf)"),
        "cost": (["sigmoid", None, 1], "one of 'softmax', 'logits'"),
        "max_iter": ([0, 100001, 1.5, 10.0, True, None], "an integer in [1, 100000]"),
        "tol": ([0, -1e-4, INF, True, None], "a number in (0, inf)"),
        "detach": ([1, 0, "yes", None], "one of True, False"),
        "noise": ([-0.1, INF, True, NAN, None], "a number in [0, inf)"),
        "per_layer": ([1, "no", None], "one of True, False"),
        "inference": (["native", None, True], "one of 'topk', 'sinkhorn'"),
        "seed": ([-1, 1.5, True, "0", 2**63 - 1, 2**64], "None or an integer in [0, 2**63 - 2]"),
        "scope": (["global", None], "one of 'batch', 'sequence'"),
        "rescale": ([0, "true", None], "one of True, False"),
    },
}

BAD_CASES = [
    (method, option, value, valid_text)
    for method, opts in BAD_OPTIONS.items()
    for option, (values, valid_text) in opts.items()
    for value in values
]


@pytest.mark.parametrize("method,option,value,valid_text", BAD_CASES)
def test_invalid_option_value_message(method, option, value, valid_text):
    m = build_method(method, {option: value})
    with pytest.raises(InvalidOptionError) as err:
        m.validate(NATIVE)
    msg = str(err.value)
    assert repr(option) in msg
    assert repr(value) in msg
    assert valid_text in msg
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_option_of_every_method_is_covered(name):
    cls = METHODS[name]
    fields = {f.name for f in __import__("dataclasses").fields(cls)}
    assert set(cls.OPTIONS) == fields, name
    assert set(BAD_OPTIONS.get(name, {})) == fields, name


GOOD_OPTIONS = {
    "topk": [{}, {"top_k": None}, {"top_k": 1}, {"top_k": 2}, {"top_k": 4}],
    "top_p": [{}, {"p": 1}, {"p": 1e-9}, {"p": 0.5}, {"max_k": None}, {"max_k": 1}, {"max_k": 4},
              {"renormalize": True}, {"renormalize": False}],
    "usmoe": [
        {},
        {"top_k": 4},
        {"top_k": 0.5},
        {"top_k": 1},
        {"top_k": None},
        {"alpha": 0},
        {"alpha": 1.0},
        {"scope": "batch"},
        {"renormalize": True},
        {"renormalize": False},
        {"renormalize": "row"},
        {"min_experts": 0},
        {"min_experts": 4},
        {"causal": True},
        {"causal": True, "thresholds": [0.1, INF], "max_experts": 3, "min_experts": 1},
        {"causal": True, "top_k": 4, "max_experts": 4},
        {"causal": True, "thresholds": [0.2], "calibration_info": {"tokens": 9}},
    ],
    "expert_choice": [{}, {"top_k": 4}, {"top_k": 0.25}, {"causal": True},
                      {"causal": True, "thresholds": [[0.1, 0.2, 0.3, INF]]}],
    "ssr": [
        {},
        {"p": 0},
        {"p": 1},
        {"epsilon": 1e-4},
        {"epsilon": 3},
        {"cost": "logits"},
        {"max_iter": 1},
        {"max_iter": 100000},
        {"tol": 1e-9},
        {"detach": True},
        {"noise": 0},
        {"noise": 0.3},
        {"per_layer": True},
        {"inference": "sinkhorn"},
        {"seed": 0},
        {"seed": 2**63 - 2},
        {"seed": None},
        {"scope": "sequence"},
        {"rescale": True},
    ],
}


@pytest.mark.parametrize("method,options", [(m, o) for m, os in GOOD_OPTIONS.items() for o in os])
def test_valid_options_pass(method, options):
    build_method(method, options).validate(NATIVE)


def test_budget_range_follows_the_model():
    # top_k = 6 is fine for an 8-expert model but not for a 4-expert one.
    build_method("usmoe", {"top_k": 6}).validate(NativeRouting(num_experts=8, top_k=2))
    with pytest.raises(InvalidOptionError, match=r"\(0, 4\]"):
        build_method("usmoe", {"top_k": 6}).validate(NATIVE)
    with pytest.raises(InvalidOptionError, match=r"\[0, 8\]"):
        build_method("usmoe", {"min_experts": 9}).validate(NativeRouting(num_experts=8, top_k=2))


def test_unknown_option_suggests_close_match():
    with pytest.raises(InvalidOptionError) as err:
        build_method("usmoe", {"alhpa": 0.3})
    msg = str(err.value)
    assert "'alhpa'" in msg and "Did you mean 'alpha'?" in msg
    assert "min_experts" in msg  # the valid options are listed
    with pytest.raises(InvalidOptionError, match="Did you mean 'epsilon'"):
        build_method("ssr", {"epsilion": 0.1})
    with pytest.raises(InvalidOptionError, match="Did you mean 'top_k'"):
        build_method("expert_choice", {"topk": 1})
    with pytest.raises(InvalidOptionError) as err:
        build_method("ssr", {"zzzz": 1})
    assert "Did you mean" not in str(err.value) and "'zzzz'" in str(err.value)
    with pytest.raises(InvalidOptionError, match="'alpha'"):
        build_method("topk", {"alpha": 0.5})
    with pytest.raises(InvalidOptionError) as err:
        build_method("topk", {"topk": 1})
    assert str(err.value) == "Unknown option 'topk' for routing method 'topk'. Did you mean 'top_k'? Valid options: top_k."
    with pytest.raises(InvalidOptionError, match="Did you mean 'max_k'\\? Valid options: max_k, p, renormalize."):
        build_method("top_p", {"maxk": 3})


def test_unknown_method_lists_methods():
    with pytest.raises(InvalidOptionError) as err:
        build_method("usmo", {})
    msg = str(err.value)
    assert "'usmo'" in msg and "Did you mean 'usmoe'?" in msg
    for name in ("topk", "usmoe", "expert_choice", "ssr", "top_p"):
        assert name in msg
    with pytest.raises(InvalidOptionError) as err:
        build_method("hash_routing", {})
    assert "Did you mean" not in str(err.value) and "expert_choice" in str(err.value)
    with pytest.raises(InvalidOptionError, match="ssr"):
        build_method(None, {})  # type: ignore[arg-type]
