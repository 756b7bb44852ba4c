"""``"expert_choice"``: each expert picks its top tokens (Zhou et al. 2022; ROUTING.md section 4)."""

from __future__ import annotations

from dataclasses import dataclass

from ..ops import expert_choice_select, selection_to_slots
from .base import RouterCall, RouterOutput, RoutingMethod, data_dependent, experts_budget


@dataclass
class ExpertChoice(RoutingMethod):
    """Per sequence, each expert takes its top ``round(top_k * T_valid / N)`` valid tokens by
    ``S = softmax_experts(Z)``; the gate is ``S`` (times DeepSeek-V3's routed scaling factor).

    A token's routing depends on later tokens of its sequence (look-ahead in a causal model), and
    at decode time (one token per sequence) each expert's capacity rounds to ``round(k / N)``,
    usually 0: the decoded token then gets no routed expert. Use it for analysis, not generation.

    Args:
        top_k: average experts per token that sets the capacity; None is the native ``k``.

    Example:
        >>> import hf_moe_patch as hmp
        >>> hmp.patch(model, "expert_choice")  # doctest: +SKIP
    """

    name = "expert_choice"
    OPTIONS = {"top_k": experts_budget()}
    uses_empty_slots = True

    top_k: float | None = None

    def route(self, call: RouterCall) -> RouterOutput:
        return _route(self, call)


@data_dependent("expert_choice")
def _route(method: ExpertChoice, call: RouterCall) -> RouterOutput:
    native = call.native
    logits = call.logits_fn(call.hidden_states)
    T, N = logits.shape
    grid = call.sequences(T)
    scores = logits.float().softmax(dim=-1)
    budget = native.top_k if method.top_k is None else method.top_k
    selected = grid.from_grid(expert_choice_select(grid.to_grid(scores), grid.valid, budget))
    index, weights = selection_to_slots(selected, scores, scores)
    return logits, native.finish(weights, logits), index
