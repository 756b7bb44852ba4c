"""Causal routing by calibrated thresholds: each token compares its own scores with fixed values.

USMoE's budget and expert choice's capacity are spent over a whole sequence, so a token's experts
depend on later tokens (and, at decode time, on a sequence of one token). Replacing the
per-sequence cut by a threshold fixed in advance keeps the method's ranking and its average
budget while making routing a per-token rule: causal, batch-independent, and the same at prefill
and at every decode step. The thresholds are calibrated on text so that the budget holds on
average (ROUTING.md section 2, "causal USMoE"; section 4 for expert choice).

Shapes: ``key`` and ``gates`` are ``(T, N)`` rows of tokens; calibration takes the rows of the
valid tokens of all calibration batches.
"""

from __future__ import annotations

import math

import torch


def budget_threshold(
    key: torch.Tensor, budget: float, *, min_experts: int = 0, max_experts: int | None = None
) -> float:
    """The threshold ``tau`` at which tokens take ``budget`` experts on average (causal USMoE).

    Each token takes every expert with ``key >= tau``, at least its top ``min_experts`` and at
    most its top ``max_experts``. Within a token, experts are taken in rank order, so a token with
    ``n`` cells at or above ``tau`` takes ``clamp(n, min_experts, max_experts)``. Summed over the
    ``T`` calibration tokens that is ``T * min_experts`` plus the number of cells at or above
    ``tau`` among each token's ranks ``min_experts + 1 .. max_experts``; so ``tau`` is the
    ``r``-th largest of those cells, ``r = round(budget * T) - T * min_experts``. On the
    calibration rows the mean is then exactly ``round(budget * T) / T`` (barring ties at ``tau``).

    NaN cells are ignored. ``min_experts <= budget <= max_experts`` is required (else no
    threshold gives that mean).

    Example:
        >>> key = torch.tensor([[0.9, 0.5, 0.1], [0.8, 0.3, 0.2]])  # 2 tokens, 3 experts
        >>> budget_threshold(key, 1.5)  # r = 3 cells: 0.9, 0.8, then 0.5
        0.5
        >>> budget_threshold(key, 1.5, min_experts=1)  # each token's top 1 is taken anyway:
        0.5
        >>> budget_threshold(key, 1.0, min_experts=1)  # r = 0: the floor alone spends the budget
        inf
    """
    T, N = key.shape
    max_experts = N if max_experts is None else min(max_experts, N)
    if T == 0:
        raise ValueError("cannot calibrate a threshold on 0 tokens")
    if not (min_experts <= budget <= max_experts):
        raise ValueError(f"budget {budget} is outside [min_experts, max_experts] = [{min_experts}, {max_experts}]")
    r = round(float(budget) * T) - T * min_experts
    if r <= 0:
        return math.inf
    ranked = key.detach().float().nan_to_num(nan=float("-inf"))
    window = ranked.sort(dim=-1, descending=True).values[:, min_experts:max_experts].reshape(-1, 1)
    r = min(r, window.shape[0])
    return float(_closest_cut(window, torch.tensor([r]))[0])


def _closest_cut(values: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Per column of ``values`` ``(T, C)``, the threshold whose "at or above" count is closest to
    ``count[c]`` (``>= 1``).

    That is the ``count``-th largest value ``v``, unless several entries equal ``v`` (identical
    calibration tokens, such as every sequence's first token, have identical scores) and taking
    them all overshoots the count by more than leaving them all out undershoots it: then the
    next larger value. A threshold cannot split a tie, since identical tokens must route alike.
    """
    k = int(count.max())
    top = torch.topk(values, k, dim=0).values  # (k, C), sorted
    v = top.gather(0, (count - 1).view(1, -1)).squeeze(0)
    at_least = (values >= v).sum(dim=0)
    above = (values > v).sum(dim=0)
    higher = values.masked_fill(values <= v, float("inf")).amin(dim=0)  # +inf where nothing is above v
    use_higher = (above > 0) & (at_least - count > count - above)
    return torch.where(use_higher, higher, v)


def expert_thresholds(scores: torch.Tensor, budget: float) -> torch.Tensor:
    """Per-expert thresholds at which each expert takes ``budget * T / N`` of the ``T``
    calibration tokens (causal expert choice): expert ``e``'s ``C``-th largest score,
    ``C = round(budget * T / N)``, so its expected load is the capacity expert choice gives it
    (a tie at the threshold is taken or left whole, whichever is closer to ``C``).

    NaN scores are ignored; a capacity of 0 gives ``+inf`` (the expert takes nothing).

    Example:
        >>> s = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.1, 0.9]])  # 3 tokens, 2 experts
        >>> expert_thresholds(s, 1).tolist()                          # C = round(1.5) = 2
        [0.6000000238418579, 0.4000000059604645]
    """
    T, N = scores.shape
    if T == 0:
        raise ValueError("cannot calibrate thresholds on 0 tokens")
    capacity = min(round(float(budget) * T / N), T)
    if capacity == 0:
        return torch.full((N,), math.inf)
    ranked = scores.detach().float().nan_to_num(nan=float("-inf"))
    return _closest_cut(ranked, torch.full((N,), capacity)).cpu()


def threshold_slots(
    key: torch.Tensor,
    gates: torch.Tensor,
    threshold: float | torch.Tensor,
    *,
    min_experts: int = 0,
    max_experts: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route each token by itself: every expert with ``key >= threshold``, at least its top
    ``min_experts``, at most its top ``max_experts``, in the experts' slot layout.

    ``threshold`` is one number (causal USMoE) or one per expert, shape ``(N,)`` (causal expert
    choice). Returns ``(T, k_max)`` index and weight tensors, empty slots with the sentinel index
    ``N`` and weight 0. Slots are in expert order (with ``min_experts`` or ``max_experts``: best
    first); the experts sum them, so the order changes nothing but float rounding. A NaN cell is
    always taken, so NaN reaches the output as under native routing.

    Example:
        >>> key = torch.tensor([[0.9, 0.5, 0.1], [0.4, 0.3, 0.2]])
        >>> index, weights = threshold_slots(key, key, 0.45)
        >>> index.tolist()   # token 1 has no cell at or above 0.45: no expert
        [[0, 1], [3, 3]]
        >>> threshold_slots(key, key, 0.45, min_experts=1)[0].tolist()  # best first
        [[0, 1], [0, 3]]
    """
    T, N = key.shape
    ranked = key.detach().float()
    if isinstance(threshold, torch.Tensor):
        threshold = threshold.to(device=key.device, dtype=torch.float32)
    # "not below" rather than ">=": a NaN cell compares false either way, so it is taken here,
    # with no separate NaN pass (topk below also ranks NaN first).
    selected = (ranked < threshold).logical_not_()
    counts = selected.sum(dim=-1)
    if min_experts == 0 and max_experts is None:
        # No ranking is needed: each selected cell goes to slot "number of selected cells before
        # it in its row" (a cumulative sum), so slots are in expert order. That costs about half
        # of a per-token topk on CPU, which is most of a router's time.
        k_max = max(int(counts.max()) if T else 0, 1)
        slot = torch.where(selected, selected.cumsum(dim=-1) - 1, k_max)
        experts = torch.arange(N, device=key.device).expand(T, N)
        index = key.new_full((T, k_max + 1), N, dtype=torch.long).scatter_(1, slot, experts)[:, :k_max]
        real = index < N
        return index, gates.gather(1, index.clamp_max(N - 1)) * real
    # A floor and a cap act on the token's own ranking (with one threshold the selection is a
    # prefix of it): take the top clamp(count, min, max) cells of each row.
    counts = counts.clamp(min=min_experts, max=N if max_experts is None else max_experts)
    k_max = max(int(counts.max()) if T else 0, 1)
    index = torch.topk(ranked, k_max, dim=-1).indices
    real = torch.arange(k_max, device=key.device) < counts.unsqueeze(-1)
    weights = gates.gather(1, index) * real
    return torch.where(real, index, N), weights
