"""``"usmoe"``: Unified Sparse MoE, a unified score and one global top-c budget (ROUTING.md section 2)."""

from __future__ import annotations

from dataclasses import dataclass

from ..ops import SequenceGrid, budget_slots, unified_score
from .base import (
    RouterCall,
    RouterOutput,
    RoutingMethod,
    data_dependent,
    experts_budget,
    experts_count,
    one_of,
    real_in,
)


@dataclass
class USMoE(RoutingMethod):
    """Global top-``c`` over the unified score ``U``, ``c = round(top_k * T_valid)`` per sequence.

    Args:
        top_k: experts per token on average (the budget); fractional values allowed; None is the
            native ``k``.
        alpha: weight of the expert-softmax term in ``U`` (the rest is the scaled sigmoid).
        scope: ``"sequence"`` (each sequence spends its own budget; batch-mates never matter) or
            ``"batch"`` (the budget is pooled over all valid tokens of the batch).
        renormalize: renormalise each token's selected ``U`` to sum to 1; None follows the native
            router's convention (Mixtral and GPT-OSS always; OLMoE/Qwen/DeepSeek when
            ``norm_topk_prob``).
        min_experts: every valid token gets at least this many experts (its top ones).

    For DeepSeek-V3 (sigmoid scores) ``U`` is computed from the same raw logits; the correction
    bias enters the choice through the sigmoid term (``key = U + (1 - alpha) * 2/N * bias``),
    group-limited choice is replaced by the global budget, and the gates are ``U`` (renormalised
    when ``norm_topk_prob``) times ``routed_scaling_factor``.

    Example:
        >>> import hf_moe_patch as hmp
        >>> hmp.patch(model, "usmoe", top_k=1.5, alpha=0.5)  # doctest: +SKIP
    """

    name = "usmoe"
    OPTIONS = {
        "top_k": experts_budget(),
        "alpha": real_in(0.0, 1.0),
        "scope": one_of("sequence", "batch"),
        "renormalize": one_of(None, True, False),
        "min_experts": experts_count(),
    }
    uses_empty_slots = True

    top_k: float | None = None
    alpha: float = 0.5
    scope: str = "sequence"
    renormalize: bool | None = None
    min_experts: int = 0

    def route(self, call: RouterCall) -> RouterOutput:
        return _route(self, call)


@data_dependent("usmoe")
def _route(method: USMoE, call: RouterCall) -> RouterOutput:
    native = call.native
    logits = call.logits_fn(call.hidden_states)
    T, N = logits.shape
    grid = call.sequences(T)
    score = unified_score(logits, method.alpha)
    key = score
    if native.choice_bias is not None:
        key = score + (1.0 - method.alpha) * (2.0 / N) * native.choice_bias.float()
    if method.scope == "batch":
        grid = SequenceGrid.pooled(grid.token_valid)
    budget = native.top_k if method.top_k is None else method.top_k
    index, weights = budget_slots(
        grid.to_grid(key, fill=float("-inf")), grid.to_grid(score), grid.valid, budget, min_experts=method.min_experts
    )
    index, weights = grid.from_grid(index), grid.from_grid(weights)
    renormalize = native.renormalize if method.renormalize is None else method.renormalize
    if renormalize:
        # Tokens without experts have an all-zero row: the clamp keeps them at 0, not NaN.
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return logits, native.finish(weights, logits), index
