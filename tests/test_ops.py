"""Tests of the pure tensor routing functions (hf_moe_patch.ops) against hand-computed values.

Every expected value below is written literally, with the arithmetic in a comment, or computed
with plain ``math`` from the formula in ROUTING.md; none is produced by the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_moe_patch.ops import (
    budget_select,
    expert_choice_select,
    log_sinkhorn,
    plan_topk_gates,
    selection_to_slots,
    sequence_budgets,
    unified_score,
)
from hf_moe_patch.ops.selection import top_count_mask

HYP = settings(max_examples=50, deadline=None)


def _sel(*rows_per_seq: list[list[int]]) -> torch.Tensor:
    """A literal (B, L, N) selection from 0/1 lists."""
    return torch.tensor(list(rows_per_seq), dtype=torch.bool)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# --- unified_score ------------------------------------------------------------------------------


def test_unified_score_hand_values_two_experts():
    # Z = [0, ln 3], N = 2:  softmax = [1/4, 3/4];  sigmoid = [1/2, 3/4];  2/N = 1.
    z = torch.tensor([[0.0, math.log(3.0)]])
    # alpha = 1: softmax only.
    torch.testing.assert_close(unified_score(z, 1.0), torch.tensor([[0.25, 0.75]]))
    # alpha = 0: (2/N) * sigmoid = [0.5, 0.75].
    torch.testing.assert_close(unified_score(z, 0.0), torch.tensor([[0.5, 0.75]]))
    # alpha = 0.5: [0.5*0.25 + 0.5*0.5, 0.5*0.75 + 0.5*0.75] = [0.375, 0.75].
    torch.testing.assert_close(unified_score(z, 0.5), torch.tensor([[0.375, 0.75]]))
    # Default alpha is 0.5.
    torch.testing.assert_close(unified_score(z), torch.tensor([[0.375, 0.75]]))


def test_unified_score_hand_values_four_experts():
    # Z = ln[1, 2, 3, 4], N = 4: softmax = [0.1, 0.2, 0.3, 0.4];
    # sigmoid(ln r) = r / (1 + r) = [1/2, 2/3, 3/4, 4/5];  (2/N) * sigmoid = [1/4, 1/3, 3/8, 2/5].
    z = torch.tensor([[math.log(1), math.log(2), math.log(3), math.log(4)]])
    torch.testing.assert_close(unified_score(z, 1.0), torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    torch.testing.assert_close(unified_score(z, 0.0), torch.tensor([[0.25, 1 / 3, 0.375, 0.4]]))
    # alpha = 0.5: [0.05+0.125, 0.1+1/6, 0.15+0.1875, 0.2+0.2] = [0.175, 0.266667, 0.3375, 0.4]
    torch.testing.assert_close(unified_score(z, 0.5), torch.tensor([[0.175, 0.1 + 1 / 6, 0.3375, 0.4]]))
    # alpha = 0.3: 0.3*softmax + 0.7*(2/N)*sigmoid
    expected = [0.3 * s + 0.7 * g for s, g in zip([0.1, 0.2, 0.3, 0.4], [0.25, 1 / 3, 0.375, 0.4])]
    torch.testing.assert_close(unified_score(z, 0.3), torch.tensor([expected]))


def test_unified_score_zero_logits_is_one_over_n_for_any_alpha():
    # softmax(0) = 1/N and (2/N) * sigmoid(0) = 1/N, so any mix is 1/N.
    for alpha in (0.0, 0.3, 0.5, 1.0):
        torch.testing.assert_close(unified_score(torch.zeros(2, 8), alpha), torch.full((2, 8), 0.125))


def test_unified_score_general_row_plain_math():
    row = [1.3, -0.7, 0.2, 2.1, -1.5]
    n = len(row)
    tot = sum(math.exp(v) for v in row)
    alpha = 0.4
    expected = [alpha * math.exp(v) / tot + (1 - alpha) * (2 / n) * _sigmoid(v) for v in row]
    torch.testing.assert_close(unified_score(torch.tensor([row]), alpha), torch.tensor([expected]))


def test_unified_score_bf16_input_gives_float32():
    z = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, -1.0, 0.5, 2.0]], dtype=torch.bfloat16)
    out = unified_score(z, 0.5)
    assert out.dtype == torch.float32
    # The bf16 values here are exact, so the float32 result matches the float32 input's.
    torch.testing.assert_close(out[0], torch.full((4,), 0.25))
    torch.testing.assert_close(out, unified_score(z.float(), 0.5))


def test_unified_score_is_bit_identical_to_the_out_of_place_formula():
    # The in-place evaluation must be the formula's exact float32 operations (selections compare
    # U values, so one rounding difference could move a cell across the budget threshold).
    z = torch.randn(300, 64, generator=torch.Generator().manual_seed(0)) * 6
    z[0, 0], z[1, 1], z[2, 2] = float("nan"), float("inf"), -float("inf")
    for alpha in (0.0, 0.25, 0.5, 0.9, 1.0):
        soft, sig = torch.softmax(z, dim=-1), torch.sigmoid(z) * (2.0 / 64)
        expected = soft if alpha == 1.0 else sig if alpha == 0.0 else alpha * soft + (1.0 - alpha) * sig
        assert torch.equal(unified_score(z, alpha).nan_to_num(-1.0), expected.nan_to_num(-1.0)), alpha


def test_unified_score_with_autograd_has_the_same_values_and_a_gradient():
    z = torch.randn(6, 8, generator=torch.Generator().manual_seed(1)) * 3
    with torch.no_grad():
        plain = unified_score(z, 0.3)
    zg = z.clone().requires_grad_()
    out = unified_score(zg, 0.3)
    assert torch.equal(out.detach(), plain)
    out[:, 0].sum().backward()  # softmax and sigmoid outputs saved for backward are intact
    assert zg.grad is not None and torch.isfinite(zg.grad).all() and zg.grad.abs().sum() > 0


# --- sequence_budgets --------------------------------------------------------------------------


def test_sequence_budgets_round_half_to_even():
    # budget 0.5: 5*0.5 = 2.5 -> 2 (even), 7*0.5 = 3.5 -> 4 (even), 3*0.5 = 1.5 -> 2, 9*0.5 = 4.5 -> 4
    out = sequence_budgets(torch.tensor([5, 7, 3, 9]), 0.5, 8)
    assert out.tolist() == [2, 4, 2, 4]
    # budget 1.5: 3*1.5 = 4.5 -> 4, 5*1.5 = 7.5 -> 8, 1*1.5 = 1.5 -> 2, 2*1.5 = 3
    assert sequence_budgets(torch.tensor([3, 5, 1, 2]), 1.5, 8).tolist() == [4, 8, 2, 3]
    assert out.dtype == torch.long


def test_sequence_budgets_at_least_one_capped_and_zero_for_empty():
    # 1 * 0.1 = 0.1 -> 0 -> raised to 1; 4 * 0.1 = 0.4 -> 0 -> 1; 0 valid tokens -> 0.
    assert sequence_budgets(torch.tensor([1, 4, 0]), 0.1, 4).tolist() == [1, 1, 0]
    # budget 5 > N = 4: 3*5 = 15 capped at 3*4 = 12; 1*5 = 5 capped at 4; empty stays 0.
    assert sequence_budgets(torch.tensor([3, 1, 0]), 5.0, 4).tolist() == [12, 4, 0]
    # budget exactly N: 3*4 = 12 = cap.
    assert sequence_budgets(torch.tensor([3]), 4, 4).tolist() == [12]


# --- budget_select -----------------------------------------------------------------------------

# One sequence, 3 tokens x 4 experts. Cells in descending order:
#   0.9 (t0,e0)  0.8 (t1,e1)  0.7 (t2,e3)  0.6 (t2,e2)  0.5 (t0,e1)  0.4 (t2,e0)  0.35 (t2,e1)
#   0.3 (t1,e0)  0.2 (t1,e2)  0.1 (t0,e2)  0.05 (t1,e3)  0.0 (t0,e3)
KEY3 = torch.tensor(
    [
        [
            [0.9, 0.5, 0.1, 0.0],
            [0.3, 0.8, 0.2, 0.05],
            [0.4, 0.35, 0.6, 0.7],
        ]
    ]
)


def test_budget_select_integer_budgets():
    # budget 1: c = 3 -> 0.9, 0.8, 0.7
    assert torch.equal(budget_select(KEY3, None, 1), _sel([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]]))
    # budget 2: c = 6 -> 0.9, 0.8, 0.7, 0.6, 0.5, 0.4
    assert torch.equal(budget_select(KEY3, None, 2), _sel([[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 1, 1]]))
    # budget 4 = N: every cell
    assert bool(budget_select(KEY3, None, 4).all())


def test_budget_select_fractional_budget():
    # budget 1.5: c = round(3 * 1.5) = round(4.5) = 4 (ties to even) -> 0.9, 0.8, 0.7, 0.6
    assert torch.equal(budget_select(KEY3, None, 1.5), _sel([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1]]))
    # budget 0.5: c = round(1.5) = 2 -> 0.9, 0.8; token 2 gets no expert at all.
    assert torch.equal(budget_select(KEY3, None, 0.5), _sel([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]))
    # budget 0.1: round(0.3) = 0 -> raised to 1 -> only 0.9
    assert torch.equal(budget_select(KEY3, None, 0.1), _sel([[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]))


def test_budget_select_padding_never_selected_and_not_counted():
    valid = torch.tensor([[True, False, True]])  # token 1 (which holds the 0.8 cell) is padding
    # T_valid = 2, budget 1.5: c = round(3.0) = 3 -> 0.9 (t0,e0), 0.7 (t2,e3), 0.6 (t2,e2).
    # (Counting padding would give c = round(4.5) = 4 and an extra 0.5 at (t0,e1).)
    out = budget_select(KEY3, valid, 1.5)
    assert torch.equal(out, _sel([[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1]]))
    # Even with a budget that would take every cell, padding stays empty.
    out = budget_select(KEY3, valid, 4)
    assert not bool(out[0, 1].any()) and int(out.sum()) == 8


def test_budget_select_all_padding_sequence_selects_nothing():
    key = torch.stack([KEY3[0], KEY3[0]])
    valid = torch.tensor([[True, True, True], [False, False, False]])
    out = budget_select(key, valid, 1)
    assert out[1].sum() == 0
    assert torch.equal(out[0], budget_select(KEY3, None, 1)[0])


# Two sequences of 2 tokens x 2 experts: A is confident, B is not.
KEY_AB = torch.tensor(
    [
        [[0.9, 0.8], [0.7, 0.6]],  # A
        [[0.2, 0.1], [0.3, 0.05]],  # B
    ]
)


def test_budget_select_sequence_vs_batch_scope():
    # Per sequence, budget 1: c = 2 each. A: 0.9, 0.8 (both on token 0). B: 0.3 (t1,e0), 0.2 (t0,e0).
    seq = budget_select(KEY_AB, None, 1)
    assert torch.equal(seq, _sel([[1, 1], [0, 0]], [[1, 0], [1, 0]]))
    # Batch scope pools the budget: c = round(1 * 4) = 4 over all 8 cells -> all four of A's cells
    # (0.9, 0.8, 0.7, 0.6) beat B's best (0.3): A takes 4 cells, B none.
    batch = budget_select(KEY_AB.reshape(1, 4, 2), None, 1).view(2, 2, 2)
    assert torch.equal(batch, _sel([[1, 1], [1, 1]], [[0, 0], [0, 0]]))
    # With B's token 1 as padding: T_valid = 3 over the batch, c = 3 -> 0.9, 0.8, 0.7.
    valid = torch.tensor([[True, True], [True, False]])
    batch = budget_select(KEY_AB.reshape(1, 4, 2), valid.reshape(1, 4), 1).view(2, 2, 2)
    assert torch.equal(batch, _sel([[1, 1], [1, 0]], [[0, 0], [0, 0]]))


# 3 tokens x 4 experts, token 0 dominates everything:
#   t0 [0.9, 0.8, 0.7, 0.6]   t1 [0.1, 0.05, 0.02, 0.01]   t2 [0.2, 0.3, 0.01, 0.0]
KEY_DOM = torch.tensor([[[0.9, 0.8, 0.7, 0.6], [0.1, 0.05, 0.02, 0.01], [0.2, 0.3, 0.01, 0.0]]])


def test_budget_select_min_experts_floor():
    # No floor, budget 1: c = 3 -> 0.9, 0.8, 0.7, all on token 0.
    assert torch.equal(budget_select(KEY_DOM, None, 1), _sel([[1, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]))
    # min_experts = 1, budget 1: c = max(3, 3*1) = 3, all spent on the floors (each token's top-1):
    # (t0,e0), (t1,e0), (t2,e1).
    out = budget_select(KEY_DOM, None, 1, min_experts=1)
    assert torch.equal(out, _sel([[1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0]]))
    # min_experts = 1, budget 1.5: c = max(round(4.5) = 4, 3) = 4: the 3 floors plus the best other
    # cell, 0.8 at (t0,e1).
    out = budget_select(KEY_DOM, None, 1.5, min_experts=1)
    assert torch.equal(out, _sel([[1, 1, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0]]))
    # min_experts = 2, budget 1: c = max(3, 6) = 6: every token's top-2.
    out = budget_select(KEY_DOM, None, 1, min_experts=2)
    assert torch.equal(out, _sel([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]]))
    # min_experts above N is capped at N: every cell.
    assert bool(budget_select(KEY_DOM, None, 1, min_experts=9).all())


def test_budget_select_min_experts_skips_padding():
    valid = torch.tensor([[True, False, True]])
    # T_valid = 2, budget 1: c = max(2, 2) = 2 -> floors (t0,e0) and (t2,e1); padding gets nothing.
    out = budget_select(KEY_DOM, valid, 1, min_experts=1)
    assert torch.equal(out, _sel([[1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]]))


def test_budget_select_ties_broken_by_position():
    # All cells equal, c = 2: the first two cells in (token, expert) order -> (t0,e0), (t0,e1).
    key = torch.zeros(1, 2, 2)
    assert torch.equal(budget_select(key, None, 1), _sel([[1, 1], [0, 0]]))
    # 0.9 first, then ties at 0.5 in position order: c = 3 -> (t2,e0), (t0,e0), (t0,e1).
    key = torch.tensor([[[0.5, 0.5], [0.5, 0.5], [0.9, 0.5]]])
    assert torch.equal(budget_select(key, None, 1), _sel([[1, 1], [0, 0], [1, 0]]))
    # c = 1 in a row of 4 equal cells: the lowest expert index.
    assert torch.equal(budget_select(torch.full((1, 1, 4), 0.5), None, 0.1), _sel([[1, 0, 0, 0]]))


def test_budget_select_min_experts_ties_broken_by_lower_expert():
    # A row of 4 equal cells, c = max(round(0.1), 1) = 1 = floor of 1: expert 0 expected.
    out = budget_select(torch.full((1, 1, 4), 0.5), None, 0.1, min_experts=1)
    assert torch.equal(out, _sel([[1, 0, 0, 0]]))


def test_budget_select_min_experts_ties_prefix():
    key = torch.tensor([[[0.9, 0.1, 0.1, 0.1]]])
    # c = max(round(1 * 1), 1 * 2) = 2: the floor is the token's top-2 = experts 0 and 1.
    assert torch.equal(budget_select(key, None, 1, min_experts=2), _sel([[1, 1, 0, 0]]))


@st.composite
def selection_problems(draw, ties: bool = True):
    b = draw(st.integers(1, 3))
    seq = draw(st.integers(1, 5))
    n = draw(st.integers(1, 6))
    if ties:
        values = st.integers(0, 3).map(float)
    else:
        values = st.floats(-5, 5, allow_nan=False, width=32)
    key = draw(st.lists(st.lists(st.lists(values, min_size=n, max_size=n), min_size=seq, max_size=seq), min_size=b, max_size=b))
    valid = draw(st.lists(st.lists(st.booleans(), min_size=seq, max_size=seq), min_size=b, max_size=b))
    budget = draw(st.one_of(st.sampled_from([0.5, 1, 1.5, 2, 2.5]), st.floats(0.01, 6.0)))
    budget = min(budget, float(n))
    return torch.tensor(key, dtype=torch.float32), torch.tensor(valid, dtype=torch.bool), budget


def _expected_count(t_valid: int, budget: float, n: int, min_experts: int) -> int:
    # Plain Python: round() is round-half-to-even, like torch.round.
    if t_valid == 0:
        return 0
    c = min(max(round(t_valid * budget), 1), t_valid * n)
    return max(c, t_valid * min(min_experts, n))


@HYP
@given(selection_problems(ties=True))
def test_budget_select_prefix_of_stable_ranking(problem):
    """Each token's selection is the first n_t experts of its own ranking (key desc, then index)."""
    key, valid, budget = problem
    out = budget_select(key, valid, budget)
    B, L, N = key.shape
    for b in range(B):
        for t in range(L):
            chosen = [e for e in range(N) if out[b, t, e]]
            if not valid[b, t]:
                assert chosen == []
                continue
            ranking = sorted(range(N), key=lambda e: (-float(key[b, t, e]), e))
            assert sorted(chosen) == sorted(ranking[: len(chosen)])


@HYP
@given(selection_problems(ties=False), st.sampled_from([0, 1, 2]))
def test_budget_select_value_prefix_with_floor(problem, min_experts):
    """With or without a floor, no unselected cell of a token beats a selected one."""
    key, valid, budget = problem
    out = budget_select(key, valid, budget, min_experts=min_experts)
    B, L, N = key.shape
    for b in range(B):
        for t in range(L):
            sel = [float(key[b, t, e]) for e in range(N) if out[b, t, e]]
            rest = [float(key[b, t, e]) for e in range(N) if not out[b, t, e]]
            if sel and rest:
                assert min(sel) >= max(rest)
            if valid[b, t]:
                assert len(sel) >= min(min_experts, N)


@HYP
@given(selection_problems(ties=True), st.sampled_from([0, 0, 1, 2]))
def test_budget_select_total_equals_budget(problem, min_experts):
    key, valid, budget = problem
    out = budget_select(key, valid, budget, min_experts=min_experts)
    N = key.shape[-1]
    assert not bool((out & ~valid.unsqueeze(-1)).any())
    for b in range(key.shape[0]):
        t_valid = int(valid[b].sum())
        assert int(out[b].sum()) == _expected_count(t_valid, budget, N, min_experts)
    # Batch scope: one pooled count.
    pooled = budget_select(key.reshape(1, -1, N), valid.reshape(1, -1), budget, min_experts=min_experts)
    assert int(pooled.sum()) == _expected_count(int(valid.sum()), budget, N, min_experts)


def _beats(a: tuple, b: tuple) -> bool:
    """Cell a = (value, position) ranks before cell b: larger value, or equal value and earlier."""
    return a[0] > b[0] or (a[0] == b[0] and a[1] < b[1])


@HYP
@given(selection_problems(ties=True))
def test_budget_select_is_global_top_c_with_position_ties(problem):
    """Within a sequence, every selected cell ranks before every unselected valid cell, where
    ranking is by value, then (token, expert) position."""
    key, valid, budget = problem
    out = budget_select(key, valid, budget)
    B, L, N = key.shape
    for b in range(B):
        cells = [(float(key[b, t, e]), t * N + e, bool(out[b, t, e])) for t in range(L) if valid[b, t] for e in range(N)]
        chosen = [c[:2] for c in cells if c[2]]
        rest = [c[:2] for c in cells if not c[2]]
        if chosen and rest:
            worst = min(chosen, key=lambda c: (c[0], -c[1]))
            best = max(rest, key=lambda c: (c[0], -c[1]))
            assert _beats(worst, best)


@HYP
@given(selection_problems(ties=True), st.floats(0.05, 1.0))
def test_expert_choice_select_counts_and_column_ranking(problem, k_frac):
    key, valid, _ = problem
    B, L, N = key.shape
    top_k = k_frac * N
    out = expert_choice_select(key, valid, top_k)
    assert not bool((out & ~valid.unsqueeze(-1)).any())
    for b in range(B):
        t_valid = int(valid[b].sum())
        capacity = round(top_k * t_valid / N)  # round half to even, like torch.round
        for e in range(N):
            col = [(float(key[b, t, e]), t, bool(out[b, t, e])) for t in range(L) if valid[b, t]]
            chosen = [c[:2] for c in col if c[2]]
            rest = [c[:2] for c in col if not c[2]]
            assert len(chosen) == capacity
            if chosen and rest:
                worst = min(chosen, key=lambda c: (c[0], -c[1]))
                best = max(rest, key=lambda c: (c[0], -c[1]))
                assert _beats(worst, best)
        alone = expert_choice_select(key[b : b + 1], valid[b : b + 1], top_k)
        assert torch.equal(out[b : b + 1], alone)


@HYP
@given(selection_problems(ties=True), st.sampled_from([0, 1]))
def test_budget_select_batch_invariant(problem, min_experts):
    key, valid, budget = problem
    together = budget_select(key, valid, budget, min_experts=min_experts)
    for b in range(key.shape[0]):
        alone = budget_select(key[b : b + 1], valid[b : b + 1], budget, min_experts=min_experts)
        assert torch.equal(together[b : b + 1], alone)
    # valid=None means all valid.
    assert torch.equal(budget_select(key, None, budget), budget_select(key, torch.ones_like(valid), budget))


# --- expert_choice_select ---------------------------------------------------------------------


def test_expert_choice_select_hand_case():
    # 3 tokens, N = 4, k = 2: C = round(2 * 3 / 4) = round(1.5) = 2 tokens per expert.
    scores = torch.tensor(
        [
            [
                [0.45, 0.2, 0.25, 0.1],
                [0.1, 0.55, 0.3, 0.05],
                [0.4, 0.1, 0.1, 0.4],
            ]
        ]
    )
    # e0: 0.45 (t0), 0.4 (t2) | e1: 0.55 (t1), 0.2 (t0) | e2: 0.3 (t1), 0.25 (t0) | e3: 0.4 (t2), 0.1 (t0)
    out = expert_choice_select(scores, None, 2)
    assert torch.equal(out, _sel([[1, 1, 1, 1], [0, 1, 1, 0], [1, 0, 0, 1]]))
    assert out.sum(dim=1).tolist() == [[2, 2, 2, 2]]


def test_expert_choice_select_capacity_over_valid_tokens_and_padding():
    scores = torch.tensor(
        [
            [[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1], [0.4, 0.3, 0.2, 0.1]],  # token 1 is padding
            [[0.45, 0.2, 0.25, 0.1], [0.1, 0.55, 0.3, 0.05], [0.4, 0.1, 0.1, 0.4]],  # all valid
        ]
    )
    valid = torch.tensor([[True, False, True], [True, True, True]])
    out = expert_choice_select(scores, valid, 2)
    # Sequence 0: T_valid = 2, C = round(2 * 2 / 4) = 1 (counting padding would give round(1.5) = 2).
    #   e0: 0.4 (t2) | e1: 0.3 (t2) | e2: 0.3 (t0) | e3: 0.4 (t0); the padding token's 0.7 is ignored.
    # Sequence 1: C = 2, as in the hand case above.
    expected = _sel(
        [[0, 0, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0]],
        [[1, 1, 1, 1], [0, 1, 1, 0], [1, 0, 0, 1]],
    )
    assert torch.equal(out, expected)


def test_expert_choice_select_ties_take_earlier_token_and_empty_sequence():
    # All equal, 4 tokens, N = 2, k = 1: C = round(4 / 2) = 2 -> tokens 0 and 1 for both experts.
    out = expert_choice_select(torch.zeros(1, 4, 2), None, 1)
    assert torch.equal(out, _sel([[1, 1], [1, 1], [0, 0], [0, 0]]))
    # A sequence of only padding: capacity 0, nothing selected.
    out = expert_choice_select(torch.rand(1, 3, 2), torch.zeros(1, 3, dtype=torch.bool), 1)
    assert not bool(out.any())


# --- top_count_mask -----------------------------------------------------------------------------


def _stable_prefix_mask(values: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """The first ``count`` entries of each row's stable descending sort (the definition)."""
    order = torch.sort(values, dim=-1, descending=True, stable=True).indices
    take = torch.arange(values.shape[-1]) < count.unsqueeze(-1)
    return torch.zeros_like(values, dtype=torch.bool).scatter(-1, order, take)


@pytest.mark.parametrize("seed", range(6))
def test_top_count_mask_rows_with_different_counts(seed):
    # Rows with different counts take the padded single top-k path; ties, +inf and -inf values
    # and zero counts included.
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 4, (5, 7, 9), generator=g).float() / 3
    values[torch.rand(values.shape, generator=g) < 0.1] = float("inf")
    values[torch.rand(values.shape, generator=g) < 0.1] = -float("inf")
    count = torch.randint(0, 10, (5, 7), generator=g)
    count[0, 0], count[1, 1] = 0, 9
    assert torch.equal(top_count_mask(values, count), _stable_prefix_mask(values, count))
    same = torch.full((5, 7), int(count[2, 2]))
    assert torch.equal(top_count_mask(values, same), _stable_prefix_mask(values, same))


def test_top_count_mask_hand_case_with_padding_rows():
    values = torch.tensor([[3.0, 1.0, 2.0, 2.0], [1.0, 1.0, 1.0, 1.0], [5.0, 4.0, 3.0, 2.0]])
    # Row 0 takes 3: 3.0, then the 2.0s in position order. Row 1 takes 2 of four ties: the first
    # two. Row 2 takes none.
    out = top_count_mask(values, torch.tensor([3, 2, 0]))
    assert out.int().tolist() == [[1, 0, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]]


def test_budget_select_with_nan_and_padding_matches_the_plain_definition():
    # NaN cells rank first and are always taken; padding is never taken (the fast path that skips
    # these steps must not change either).
    key = torch.tensor([[[0.9, float("nan")], [0.5, 0.4], [0.8, 0.7]]])
    valid = torch.tensor([[True, True, False]])
    # c = round(1 * 2) = 2: NaN (as +inf) and 0.9; row 2 is padding.
    assert budget_select(key, valid, 1.0).int().tolist() == [[[1, 1], [0, 0], [0, 0]]]
    # Without padding: c = 3: NaN, 0.9, 0.8.
    assert budget_select(key, None, 1.0).int().tolist() == [[[1, 1], [0, 0], [1, 0]]]
    # A NaN cell beyond the budget is still taken (c = 1: the NaN cell ranks first, 0.9 is out).
    assert budget_select(key[:, :1], None, 1.0).int().tolist() == [[[0, 1]]]
    assert budget_select(key[:, 1:2], None, 0.5).int().tolist() == [[[1, 0]]]


# --- selection_to_slots -----------------------------------------------------------------------


def test_selection_to_slots_hand_case():
    selected = torch.tensor(
        [
            [True, False, True, True],
            [False, True, False, False],
            [False, False, False, False],
        ]
    )
    key = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.4, 0.2, 0.1, 0.3], [0.9, 0.8, 0.7, 0.6]])
    gates = key * 10
    index, weights = selection_to_slots(selected, key, gates)
    # k_max = 3 (row 0). Row 0 by key among the selected: e2 (0.5), e3 (0.3), e0 (0.1); e1's 0.9 is
    # not selected. Row 1: e1 then two empty slots. Row 2: all empty. Sentinel = N = 4.
    assert index.tolist() == [[2, 3, 0], [1, 4, 4], [4, 4, 4]]
    torch.testing.assert_close(weights, torch.tensor([[5.0, 3.0, 1.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))


def test_selection_to_slots_empty_and_min_slots():
    index, weights = selection_to_slots(torch.zeros(2, 4, dtype=torch.bool), torch.rand(2, 4), torch.rand(2, 4))
    assert index.tolist() == [[4], [4]]  # k_max = max(0, 1) = 1
    assert weights.tolist() == [[0.0], [0.0]]
    sel = torch.tensor([[False, True, False]])
    index, weights = selection_to_slots(sel, torch.ones(1, 3), torch.full((1, 3), 0.5), min_slots=3)
    assert index.tolist() == [[1, 3, 3]]
    assert weights.tolist() == [[0.5, 0.0, 0.0]]


# --- log_sinkhorn -----------------------------------------------------------------------------


def _random_problem(seed: int, b: int = 3, t: int = 7, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    cost = torch.randn(b, t, n, generator=g)
    valid = torch.rand(b, t, generator=g) > 0.3
    valid[0, 0] = True
    return cost, valid


@pytest.mark.parametrize("seed", range(4))
def test_log_sinkhorn_marginals(seed):
    cost, valid = _random_problem(seed)
    res = log_sinkhorn(cost, valid, epsilon=0.5, max_iter=500, tol=1e-5)
    assert res.log_plan.dtype == torch.float32
    assert bool(torch.isfinite(res.log_plan).all())
    plan = res.log_plan.exp() * valid.unsqueeze(-1)
    m = valid.sum(dim=1)
    for b in range(cost.shape[0]):
        rows = plan[b][valid[b]].sum(dim=-1)
        torch.testing.assert_close(rows, torch.ones_like(rows), atol=1e-5, rtol=0)
        # Every expert receives m / N.
        cols = plan[b].sum(dim=0)
        torch.testing.assert_close(cols, torch.full((4,), float(m[b]) / 4), atol=1e-5, rtol=1e-5)
    # Padding rows are filled with 0 in log space.
    assert bool((res.log_plan[~valid] == 0).all())
    assert res.iterations <= 500 and res.row_error < 1e-5


def test_log_sinkhorn_all_padding_problem_and_one_token():
    g = torch.Generator().manual_seed(0)
    cost = torch.randn(3, 4, 4, generator=g)
    valid = torch.tensor([[True, True, False, True], [False] * 4, [False, False, True, False]])
    res = log_sinkhorn(cost, valid, epsilon=0.5)
    assert bool(torch.isfinite(res.log_plan).all())
    # The all-padding problem: finite zeros.
    assert torch.equal(res.log_plan[1], torch.zeros(4, 4))
    # The one-token problem (m = 1): the token's unit mass is split as m/N = 1/4 per expert,
    # whatever the cost.
    torch.testing.assert_close(res.log_plan[2, 2].exp(), torch.full((4,), 0.25))
    # A lone token with no batch-mates at all.
    lone = log_sinkhorn(torch.tensor([[[3.0, -1.0, 0.5]]]), epsilon=0.05)
    torch.testing.assert_close(lone.log_plan.exp(), torch.full((1, 1, 3), 1 / 3))


def test_log_sinkhorn_batch_equals_one_by_one():
    cost, valid = _random_problem(5, b=4, t=5, n=3)
    valid[2] = False  # one all-padding problem in the batch
    # tol = 0 never stops early, so every problem runs exactly max_iter iterations in both cases.
    together = log_sinkhorn(cost, valid, epsilon=0.3, max_iter=30, tol=0.0)
    assert together.iterations == 30
    for b in range(4):
        alone = log_sinkhorn(cost[b : b + 1], valid[b : b + 1], epsilon=0.3, max_iter=30, tol=0.0)
        torch.testing.assert_close(together.log_plan[b : b + 1], alone.log_plan, atol=1e-5, rtol=1e-5)
    # With the default tolerance, the batch solution is within tolerance of the individual ones.
    together = log_sinkhorn(cost, valid, epsilon=0.3)
    for b in range(4):
        alone = log_sinkhorn(cost[b : b + 1], valid[b : b + 1], epsilon=0.3)
        mask = valid[b].unsqueeze(-1)
        diff = (together.log_plan[b].exp() - alone.log_plan[0].exp()) * mask
        assert float(diff.abs().max()) < 1e-3


def test_log_sinkhorn_gradients_finite_with_padding():
    cost, valid = _random_problem(1, b=3, t=6, n=4)
    valid[1] = False  # all-padding problem
    valid[2] = torch.tensor([False, True, False, False, False, False])  # a one-token problem
    cost = cost.clone().requires_grad_(True)
    res = log_sinkhorn(cost, valid, epsilon=0.1, max_iter=50)
    w = torch.randn(cost.shape, generator=torch.Generator().manual_seed(2))
    (res.log_plan.exp() * w * valid.unsqueeze(-1)).sum().backward()
    assert cost.grad is not None and bool(torch.isfinite(cost.grad).all())
    # Padding takes no part: no gradient reaches it.
    assert bool((cost.grad[~valid] == 0).all())
    assert float(cost.grad[0].abs().sum()) > 0


def test_log_sinkhorn_gradients_finite_through_plan_topk_gates():
    cost, valid = _random_problem(3, b=2, t=5, n=4)
    valid[1] = False
    cost = cost.clone().requires_grad_(True)
    res = log_sinkhorn(cost, valid, epsilon=0.05, max_iter=100)
    gates, index = plan_topk_gates(res.log_plan.view(-1, 4), 2)
    assert bool(torch.isfinite(gates).all())
    w = torch.randn(gates.shape, generator=torch.Generator().manual_seed(4))
    (gates * w * valid.reshape(-1, 1)).sum().backward()
    assert bool(torch.isfinite(cost.grad).all())
    assert float(cost.grad.abs().sum()) > 0


def test_log_sinkhorn_two_by_two_symmetric_closed_form():
    # C = [[1, 0], [0, 1]], eps = 1, m = N = 2: row and column masses are all 1, so the plan is
    # doubly stochastic [[p, 1-p], [1-p, p]], and by symmetry p = e^1 / (e^1 + e^0) = sigmoid(1)
    # = 0.7310586. The first row update already gives exact columns: one iteration.
    res = log_sinkhorn(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), epsilon=1.0)
    p = _sigmoid(1.0)
    torch.testing.assert_close(res.log_plan.exp(), torch.tensor([[[p, 1 - p], [1 - p, p]]]))
    assert res.iterations == 1


def test_log_sinkhorn_two_by_two_cross_ratio_closed_form():
    # C = [[1, 0], [0, 0]], eps = 1: the plan is still [[x, 1-x], [1-x, x]] (doubly stochastic 2x2),
    # and Pi = diag(u) K diag(v) fixes the cross ratio
    #   x^2 / (1-x)^2 = K11 K22 / (K12 K21) = e^1   ->   x = sigmoid(1/2) = 0.6224593.
    res = log_sinkhorn(torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]), epsilon=1.0, max_iter=1000, tol=1e-7)
    x = _sigmoid(0.5)
    torch.testing.assert_close(res.log_plan.exp(), torch.tensor([[[x, 1 - x], [1 - x, x]]]), atol=1e-5, rtol=0)
    # m = 4 tokens, N = 2: column mass 2. Doubling every row keeps the same cross ratios.
    res = log_sinkhorn(torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]]), epsilon=1.0, max_iter=1000, tol=1e-7)
    torch.testing.assert_close(
        res.log_plan.exp(), torch.tensor([[[x, 1 - x], [x, 1 - x], [1 - x, x], [1 - x, x]]]), atol=1e-5, rtol=0
    )


def test_log_sinkhorn_iterations_and_row_error():
    cost = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    # Converged: stops before the cap with row_error < tol.
    res = log_sinkhorn(cost, epsilon=1.0, max_iter=100, tol=1e-4)
    assert 1 <= res.iterations < 100 and res.row_error < 1e-4
    # Capped: exactly max_iter iterations, and the error reported is not below tol.
    res = log_sinkhorn(cost, epsilon=1.0, max_iter=1, tol=1e-7)
    assert res.iterations == 1 and res.row_error >= 1e-7
    # Row error after one iteration, by hand: u normalises rows of K = [[e, 1], [1, 1]]; the column
    # update then gives column sums 1, and row 0's mass becomes
    #   (e/(e+1)) / (e/(e+1) + 1/2) + (1/(e+1)) / (1/(e+1) + 1/2)
    e = math.e
    a, b = e / (e + 1), 1 / (e + 1)
    row0 = a / (a + 0.5) + b / (b + 0.5)
    assert abs(res.row_error - abs(row0 - 1)) < 1e-5


def test_log_sinkhorn_small_epsilon_balances_top1():
    # 4 tokens, 2 experts, every token prefers expert 0 (native top-1 count 4 : 0):
    #   d_i = C_i0 - C_i1 = [1.0, 0.2, 0.1, 0.05]
    cost = torch.tensor([[[1.0, 0.0], [0.3, 0.1], [0.2, 0.1], [0.15, 0.1]]])
    assert cost.argmax(-1).tolist() == [[0, 0, 0, 0]]
    # Each expert receives mass 2. Token i's top-1 is expert 0 iff d_i > theta, where theta is set
    # so that sum_i sigmoid((d_i - theta) / eps) = 2.
    # Small eps: the plan tends to the balanced assignment maximising <Pi, C>: expert 0 takes the
    # two largest d (tokens 0, 1), expert 1 the others -> top-1 counts 2 : 2.
    small = log_sinkhorn(cost, epsilon=0.05, max_iter=1000, tol=1e-6)
    assert small.log_plan.argmax(-1).tolist() == [[0, 0, 1, 1]]
    # Large eps: the sigmoid is nearly linear, so theta ~ mean(d) = 0.3375 and only token 0 stays
    # on expert 0 -> top-1 counts 1 : 3, not balanced.
    large = log_sinkhorn(cost, epsilon=10.0, max_iter=1000, tol=1e-6)
    assert large.log_plan.argmax(-1).tolist() == [[0, 1, 1, 1]]


def test_log_sinkhorn_bf16_cost_float32_plan():
    cost = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.bfloat16)
    res = log_sinkhorn(cost, epsilon=1.0)
    assert res.log_plan.dtype == torch.float32
    p = _sigmoid(1.0)
    torch.testing.assert_close(res.log_plan.exp(), torch.tensor([[[p, 1 - p], [1 - p, p]]]))


# --- plan_topk_gates --------------------------------------------------------------------------


def test_plan_topk_gates_hand_case():
    plan = torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.05, 0.15, 0.5, 0.3]])
    gates, index = plan_topk_gates(plan.log(), 2)
    # Row 0: top-2 are e1 (0.4), e3 (0.3) -> [0.4/0.7, 0.3/0.7] = [4/7, 3/7].
    # Row 1: e2 (0.5), e3 (0.3) -> [0.5/0.8, 0.3/0.8] = [0.625, 0.375].
    assert index.tolist() == [[1, 3], [2, 3]]
    torch.testing.assert_close(gates, torch.tensor([[4 / 7, 3 / 7], [0.625, 0.375]]))
    gates, index = plan_topk_gates(plan.log(), 1)
    assert index.tolist() == [[1], [2]]
    torch.testing.assert_close(gates, torch.ones(2, 1))
    # k = N: the whole row, renormalised ([0.1, 0.4, 0.2, 0.3] already sums to 1), best first.
    gates, index = plan_topk_gates(plan[:1].log(), 4)
    assert index.tolist() == [[1, 3, 2, 0]]
    torch.testing.assert_close(gates, torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    # A row that does not sum to 1 (un-normalised plan): [2, 6, 1, 1] top-2 -> [6/8, 2/8].
    gates, index = plan_topk_gates(torch.tensor([[2.0, 6.0, 1.0, 1.0]]).log(), 2)
    assert index.tolist() == [[1, 0]]
    torch.testing.assert_close(gates, torch.tensor([[0.75, 0.25]]))


# --- budget_slots (USMoE's selection straight in the slot layout) --------------------------------


def _slots_by_definition(key, gates, valid, budget, min_experts=0):
    B, L, N = key.shape
    selected = budget_select(key, valid, budget, min_experts=min_experts)
    index, weights = selection_to_slots(selected.view(B * L, N), key.reshape(B * L, N), gates.reshape(B * L, N))
    return index.view(B, L, -1), weights.view(B, L, -1)


def test_budget_slots_hand_case():
    from hf_moe_patch.ops import budget_slots

    # KEY3, budget 1.5: c = 4 -> 0.9 (t0,e0), 0.8 (t1,e1), 0.7 (t2,e3), 0.6 (t2,e2); k_max = 2.
    index, weights = budget_slots(KEY3, KEY3, None, 1.5)
    assert index.tolist() == [[[0, 4], [1, 4], [3, 2]]]
    assert torch.equal(weights, torch.tensor([[[0.9, 0.0], [0.8, 0.0], [0.7, 0.6]]]))
    # Token 1 as padding: T_valid = 2, c = 3 -> 0.9, 0.7, 0.6; the padding token gets sentinels.
    index, _ = budget_slots(KEY3, KEY3, torch.tensor([[True, False, True]]), 1.5)
    assert index.tolist() == [[[0, 4], [4, 4], [3, 2]]]


@pytest.mark.parametrize("seed", range(8))
def test_budget_slots_equals_the_general_way_on_hard_cases(seed, monkeypatch):
    # Ties across the threshold (quantised keys), NaN and infinite cells, padding, all-padding
    # sequences, fractional budgets and min_experts: the result is the general way's, exactly,
    # whether or not the threshold shortcut applies; and the shortcut does apply to untied keys.
    from hf_moe_patch.ops import budget_slots
    from hf_moe_patch.ops import selection as sel

    g = torch.Generator().manual_seed(seed)
    B, L, N = 3, 7, 6
    for quantised in (True, False):
        key = torch.rand(B, L, N, generator=g)
        if quantised:
            key = (key * 4).floor() / 4
        if seed % 3 == 1:
            key[0, 2, 1] = float("nan")
        if seed % 3 == 2:
            key[1, 0, 0] = float("inf")
        gates = torch.rand(B, L, N, generator=g)
        valid = torch.rand(B, L, generator=g) > 0.25
        valid[2] = seed % 2 == 0  # an all-padding or an all-valid sequence
        for budget in (0.4, 1, 1.5, 2.5, N):
            for min_experts in (0, 1):
                for v in (None, valid):
                    got = budget_slots(key, gates, v, budget, min_experts=min_experts)
                    want = _slots_by_definition(key, gates, v, budget, min_experts)
                    assert torch.equal(got[0], want[0]), (quantised, budget, min_experts, v is None)
                    assert torch.equal(got[1], want[1])
                    if min_experts == 0 and not bool(key.isnan().any()):
                        # ... and the selection is the definition's: the first c cells of each
                        # sequence's stable descending sort (padding last), c = sequence_budgets.
                        valid_or_all = torch.ones(B, L, dtype=torch.bool) if v is None else v
                        ranked = key.masked_fill(~valid_or_all.unsqueeze(-1), float("-inf")).reshape(B, L * N)
                        c = sequence_budgets(valid_or_all.sum(dim=1), budget, N)
                        expected = _stable_prefix_mask(ranked, c).view(B, L, N)
                        chosen = torch.zeros(B, L, N + 1, dtype=torch.bool).scatter_(-1, got[0], True)[..., :N]
                        assert torch.equal(chosen, expected), (quantised, budget, v is None)
    calls = []
    real = sel._budget_slots_by_threshold
    monkeypatch.setattr(sel, "_budget_slots_by_threshold", lambda *a: calls.append(real(*a)) or calls[-1])
    budget_slots(torch.rand(B, L, N, generator=g), torch.rand(B, L, N, generator=g), valid, 1.5)
    assert calls and calls[0] is not None


def test_budget_slots_keeps_gradients_of_the_gates():
    from hf_moe_patch.ops import budget_slots

    key = torch.tensor([[[0.9, 0.1], [0.5, 0.4]]])
    gates = key.clone().requires_grad_()
    _, weights = budget_slots(key, gates, None, 1.5)  # c = 3: (t0,e0), (t1,e0), (t1,e1)
    weights.sum().backward()
    assert gates.grad.tolist() == [[[1.0, 0.0], [1.0, 1.0]]]
