"""Selections over the (token, expert) grid: USMoE's global budget and expert choice.

Shapes: ``key`` and ``scores`` are ``(B, L, N)`` (B sequences of L positions, N experts) and
``valid`` is ``(B, L)`` bool, False on padding. A selection is a ``(B, L, N)`` bool mask; padding
rows are never selected. Ties are broken by position (earlier token first, then lower expert
index), as a stable sort would order them, so results are deterministic and do not depend on
batch-mates.
"""

from __future__ import annotations

import torch


def sequence_budgets(valid_counts: torch.Tensor, budget: float, num_experts: int) -> torch.Tensor:
    """Cells each sequence may select: ``round(budget * T_valid)``, clamped to ``[1, T_valid * N]``.

    Rounding is to nearest, ties to even (``torch.round``). A sequence with no valid token gets 0.

    Example:
        >>> sequence_budgets(torch.tensor([3, 0, 4]), 1.5, 8)
        tensor([4, 0, 6])
    """
    counts = valid_counts.to(torch.float64)
    c = torch.round(counts * float(budget)).to(torch.long)
    c = torch.minimum(c.clamp_min(1), valid_counts.long() * num_experts)
    return torch.where(valid_counts > 0, c, torch.zeros_like(c))


def budget_select(
    key: torch.Tensor,
    valid: torch.Tensor | None,
    budget: float,
    *,
    min_experts: int = 0,
) -> torch.Tensor:
    """Select the ``c`` largest cells of each sequence's ``(T_valid, N)`` grid (USMoE).

    ``c = round(budget * T_valid)`` per sequence (see :func:`sequence_budgets`). To pool the
    budget over a whole batch, pass ``key`` reshaped to ``(1, B * L, N)``.

    ``min_experts = m`` first gives every valid token its own top-``m`` cells, then spends what is
    left of the budget on the global ranking, so a sequence selects ``max(c, m * T_valid)`` cells.

    Example:
        >>> key = torch.tensor([[[0.9, 0.1], [0.5, 0.4]]])   # 1 sequence, 2 tokens, 2 experts
        >>> budget_select(key, None, budget=1.5).int()       # c = 3: the 3 largest cells
        tensor([[[1, 0],
                 [1, 1]]], dtype=torch.int32)
    """
    B, L, N = key.shape
    all_valid = valid is None or bool(valid.all())
    if valid is None:
        valid = torch.ones(B, L, dtype=torch.bool, device=key.device)
    t_valid = valid.sum(dim=1)
    c = sequence_budgets(t_valid, budget, N)
    nan = key.isnan()
    has_nan = bool(nan.any())
    if has_nan or not all_valid:
        ranked = nan_first(key)  # a copy
        ranked.masked_fill_(~valid.unsqueeze(-1), float("-inf"))
    else:
        ranked = key.detach().float()  # nothing to replace: read only below
    if min_experts > 0:
        m = min(min_experts, N)
        floor = top_count_mask(ranked, torch.full((B, L), m, dtype=torch.long, device=key.device))
        # Each token's top-m cells (ties to the lower expert) get +inf, ahead of every other cell.
        ranked = ranked.masked_fill(floor, float("inf")).masked_fill(~valid.unsqueeze(-1), float("-inf"))
        c = torch.maximum(c, t_valid * m)
    selected = top_count_mask(ranked.reshape(B, L * N), c).view(B, L, N)
    return _with_nan_and_valid(selected, nan if has_nan else None, None if all_valid else valid)


def expert_choice_select(scores: torch.Tensor, valid: torch.Tensor | None, top_k: float) -> torch.Tensor:
    """Expert choice (Zhou et al. 2022): each expert takes its top ``C`` tokens of a sequence.

    ``C = round(top_k * T_valid / N)`` per sequence, over valid tokens only. A token may end up
    with no expert or with several.

    Example:
        >>> s = torch.tensor([[[0.7, 0.3], [0.6, 0.4], [0.1, 0.9]]])  # 3 tokens, 2 experts
        >>> expert_choice_select(s, None, top_k=1).int()             # C = round(1.5) = 2
        tensor([[[1, 0],
                 [1, 1],
                 [0, 1]]], dtype=torch.int32)
    """
    B, L, N = scores.shape
    all_valid = valid is None or bool(valid.all())
    if valid is None:
        valid = torch.ones(B, L, dtype=torch.bool, device=scores.device)
    t_valid = valid.sum(dim=1).to(torch.float64)
    capacity = torch.round(t_valid * float(top_k) / N).to(torch.long)
    ranked = nan_first(scores)  # a copy
    if not all_valid:
        ranked.masked_fill_(~valid.unsqueeze(-1), float("-inf"))
    # Capacity can exceed T_valid (top_k > N) but never the L positions of the token axis.
    capacity = capacity.clamp_max(L).view(B, 1).expand(B, N)
    selected = top_count_mask(ranked.transpose(1, 2), capacity).transpose(1, 2)  # (B, N, L): expert picks tokens
    nan = scores.isnan()
    return _with_nan_and_valid(selected.contiguous(), nan if bool(nan.any()) else None, None if all_valid else valid)


def _with_nan_and_valid(selected: torch.Tensor, nan: torch.Tensor | None, valid: torch.Tensor | None) -> torch.Tensor:
    """``(selected | nan) & valid`` in place on ``selected``; None (no NaN cell, or every token
    valid) skips that step, which could not change the result."""
    if nan is not None:
        selected |= nan
    if valid is not None:
        selected &= valid.unsqueeze(-1)
    return selected


def nan_first(values: torch.Tensor) -> torch.Tensor:
    """Detached float32 ranking values in which NaN ranks above everything, as in ``torch.topk``.

    NaN compares false with every threshold, so a NaN score would otherwise never be selected and
    a token with NaN logits would silently get no expert: its output would look finite but mean
    nothing. The selections rank NaN first and also take every NaN cell beyond the budget, so
    NaN gates reach the output of every token that has one, as under the native router.

    Example:
        >>> nan_first(torch.tensor([0.5, float("nan"), float("inf")])).tolist()
        [0.5, inf, inf]
    """
    return values.detach().float().nan_to_num(nan=float("inf"), posinf=float("inf"), neginf=float("-inf"))


def top_count_mask(values: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Mask of the ``count`` largest entries of each row of ``values`` (last dimension).

    ``values`` is ``(..., n)`` float and ``count`` is ``(...)`` integer in ``[0, n]``. Ties are
    broken by position (lower index first), so the mask is exactly the first ``count`` entries
    of a stable descending sort; values are assumed free of NaN (see :func:`nan_first`).

    A full sort of each row is the slow part on CPU (it dominated USMoE's router). Only each
    row's ``count``-th largest value is needed (:func:`count_thresholds`): every entry above it
    is taken, and entries equal to it are taken in position order until the row has ``count``.

    Example:
        >>> top_count_mask(torch.tensor([[0.1, 0.5, 0.5, 0.9]]), torch.tensor([2])).int()
        tensor([[0, 1, 0, 1]], dtype=torch.int32)
        >>> top_count_mask(torch.tensor([[3.0, 1.0, 2.0], [1.0, 1.0, 1.0]]), torch.tensor([1, 2])).int()
        tensor([[1, 0, 0],
                [1, 1, 0]], dtype=torch.int32)
    """
    count = count.long()
    threshold = count_thresholds(values, count)
    if threshold is None:
        return torch.zeros(values.shape, dtype=torch.bool, device=values.device)
    at_least = values >= threshold
    if bool((at_least.sum(dim=-1) == count).all()):
        return at_least  # the usual case: no row has more entries equal to its threshold than it takes
    return _break_ties(values, count, threshold, at_least)


def _break_ties(values: torch.Tensor, count: torch.Tensor, threshold: torch.Tensor, at_least: torch.Tensor) -> torch.Tensor:
    """The ``count`` entries of each row at or above its ``threshold`` (``at_least``, which may
    exclude entries such as padding): every entry above it, then entries equal to it in position
    order until the row has ``count``."""
    above = at_least & (values > threshold)
    tie = at_least & ~above
    room = count.unsqueeze(-1) - above.sum(dim=-1, keepdim=True)
    take_tie = tie & (tie.cumsum(dim=-1) <= room)
    return (above | take_tie) & (count > 0).unsqueeze(-1)


def count_thresholds(values: torch.Tensor, count: torch.Tensor | int) -> torch.Tensor | None:
    """Each row's ``count``-th largest value, shape ``(..., 1)``; None when every count is 0.

    One unsorted partial ``topk`` finds it: the smallest of the row's top ``count``. Rows with a
    smaller count than the largest one, ``c_max``, get ``c_max - count`` extra ``+inf`` entries
    first, so that one ``c_max`` serves every row (``+inf`` ties with ``+inf`` values, which does
    not change the ``c_max``-th value); a row with count 0 gets ``+inf``. A NaN among a row's top
    ``count`` (``topk`` ranks NaN first) makes its threshold NaN (``amin`` propagates it).

    Example:
        >>> count_thresholds(torch.tensor([[0.1, 0.5, 0.9], [3.0, 2.0, 1.0]]), torch.tensor([2, 3]))
        tensor([[0.5000],
                [1.0000]])
    """
    if isinstance(count, int):
        if count == 0:
            return None
        return torch.topk(values, count, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
    if count.numel() == 0:
        return None
    c_min, c_max = (int(c) for c in torch.aminmax(count))
    if c_max == 0:
        return None
    ranked = values
    if c_min != c_max:
        pad_inf = torch.arange(c_max, device=values.device) < (c_max - count).unsqueeze(-1)
        pad = torch.full(pad_inf.shape, float("-inf"), dtype=values.dtype, device=values.device)
        ranked = torch.cat([values, pad.masked_fill_(pad_inf, float("inf"))], dim=-1)
    return torch.topk(ranked, c_max, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)


def budget_slots(
    key: torch.Tensor,
    gates: torch.Tensor,
    valid: torch.Tensor | None,
    budget: float,
    *,
    min_experts: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """USMoE's selection straight in the experts' slot layout: the result of
    ``selection_to_slots(budget_select(key, valid, budget, min_experts=...), key, gates)``.

    ``key`` and ``gates`` are ``(B, L, N)``; returns ``(B, L, k_max)`` index (sentinel ``N``) and
    weight tensors, slots ordered by ``key``.

    It takes a shorter way. Each sequence's budget ``c`` has one threshold (its ``c``-th largest
    cell, :func:`count_thresholds`), and a token's selected cells are its cells at or above it
    (a tie across the threshold is broken by position, as :func:`budget_select` does): a prefix
    of the token's own ranking. So the mask is one comparison and the slots one ``topk`` of
    ``k_max`` per token over the masked rows. With NaN among a sequence's top cells, or with
    ``min_experts``, the general way runs, with the same result.

    Example:
        >>> key = torch.tensor([[[0.9, 0.1], [0.5, 0.4]]])   # 1 sequence, 2 tokens, 2 experts
        >>> index, weights = budget_slots(key, key, None, budget=1.5)  # c = 3
        >>> index.tolist()
        [[[0, 2], [0, 1]]]
    """
    B, L, N = key.shape
    if min_experts == 0:
        fast = _budget_slots_by_threshold(key, gates, valid, budget)
        if fast is not None:
            return fast
    selected = budget_select(key, valid, budget, min_experts=min_experts)
    index, weights = selection_to_slots(selected.view(B * L, N), key.reshape(B * L, N), gates.reshape(B * L, N))
    return index.view(B, L, -1), weights.view(B, L, -1)


def _budget_slots_by_threshold(
    key: torch.Tensor, gates: torch.Tensor, valid: torch.Tensor | None, budget: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`budget_slots` by per-sequence thresholds; None where that shortcut does not hold."""
    B, L, N = key.shape
    if key.numel() == 0:
        return None
    all_valid = valid is None or bool(valid.all())
    ranked = key.detach().float()  # a view for a float32 key: read only below
    if all_valid:
        # Every sequence has L valid tokens: one budget, as sequence_budgets computes it
        # (float64 product, ties to even; Python's round() is the same rule).
        c: torch.Tensor | int = max(1, min(round(float(L) * float(budget)), L * N)) if L else 0
    else:
        c = sequence_budgets(valid.sum(dim=1), budget, N)
        ranked = ranked.masked_fill(~valid.unsqueeze(-1), float("-inf"))
    threshold = count_thresholds(ranked.reshape(B, L * N), c)
    if threshold is None:
        return None
    if bool(threshold.isnan().any()):
        return None  # a NaN among a sequence's top cells: the general way takes every NaN cell
    selected = ranked >= threshold.view(B, 1, 1)
    if not all_valid:
        selected &= valid.unsqueeze(-1)
    counts = selected.sum(dim=-1)  # (B, L): experts per token
    count = torch.full((B,), c, device=key.device) if isinstance(c, int) else c
    if not bool((counts.sum(dim=-1) == count).all()):
        # A tie across some threshold: break it by position, as budget_select does, with the
        # threshold already found.
        flat = _break_ties(ranked.reshape(B, L * N), count, threshold, selected.reshape(B, L * N))
        selected = flat.view(B, L, N)
        counts = selected.sum(dim=-1)
    k_max = max(int(counts.max()), 1)
    # topk over the masked rows: as selection_to_slots ranks them, and on CPU about twice as fast
    # as over the full rows (most entries are -inf).
    masked = torch.where(selected, ranked, float("-inf"))
    index = torch.topk(masked.view(B * L, N), k_max, dim=-1).indices
    real = torch.arange(k_max, device=key.device) < counts.view(B * L, 1)
    weights = gates.reshape(B * L, N).gather(1, index) * real
    index = torch.where(real, index, N)
    return index.view(B, L, k_max), weights.view(B, L, k_max)


def selection_to_slots(
    selected: torch.Tensor, key: torch.Tensor, gates: torch.Tensor, *, min_slots: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a ``(T, N)`` selection into the ``(T, k_max)`` index/weight layout of the experts.

    Slots are ordered by ``key`` (best first). Empty slots carry the sentinel index ``N`` and
    weight 0, which transformers' experts treat as "no expert" (ROUTING.md section 7).

    Example:
        >>> sel = torch.tensor([[True, False, True], [False, False, False]])
        >>> key = torch.tensor([[0.2, 0.5, 0.7], [0.1, 0.2, 0.3]])
        >>> idx, w = selection_to_slots(sel, key, key)
        >>> idx
        tensor([[2, 0],
                [3, 3]])
    """
    num_experts = selected.shape[-1]
    counts = selected.sum(dim=-1)
    k_max = max(int(counts.max()) if counts.numel() else 0, min_slots)
    ranked = torch.where(selected, key.detach().float(), float("-inf"))
    index = torch.topk(ranked, k_max, dim=-1).indices
    real = selected.gather(1, index)
    weights = gates.gather(1, index) * real
    return torch.where(real, index, num_experts), weights
