"""``"expert_choice"``: each expert picks its top tokens (Zhou et al. 2022; ROUTING.md section 4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..ops import expert_choice_select, expert_thresholds, selection_to_slots, threshold_slots
from .base import RouterCall, RouterOutput, Thresholded, data_dependent, experts_budget, one_of, threshold_list


@dataclass
class ExpertChoice(Thresholded):
    """Per sequence, each expert takes its top ``round(top_k * T_valid / N)`` valid tokens by
    ``S = softmax_experts(Z)``; the gate is ``S`` (times DeepSeek-V3's routed scaling factor).

    A token's routing depends on later tokens of its sequence (look-ahead in a causal model), and
    at decode time (one token per sequence) each expert's capacity rounds to ``round(k / N)``,
    usually 0: the decoded token then gets no routed expert. Use it for analysis, or use
    ``causal=True`` for generation.

    Args:
        top_k: average experts per token that sets the capacity; None is the native ``k``.
        causal: each expert takes every token with ``S >= tau_{l,e}``, one threshold per layer
            and expert calibrated on text so that each expert's expected load is its capacity
            ``top_k * T / N`` (ours): a causal, batch-independent expert choice, balanced in
            expectation. Needs ``calibration=`` (given to :func:`~hf_moe_patch.patch`) or
            ``thresholds=``.
        thresholds: with ``causal=True``, ``N`` thresholds per MoE layer.
        calibration_info: what the thresholds were calibrated on and for (filled in by the
            calibration).

    Example:
        >>> import hf_moe_patch as hmp
        >>> hmp.patch(model, "expert_choice")  # doctest: +SKIP
        >>> hmp.patch(model, "expert_choice", causal=True, calibration=texts, tokenizer=tok)  # doctest: +SKIP
    """

    name = "expert_choice"
    OPTIONS = {
        "top_k": experts_budget(),
        "causal": one_of(False, True),
        "thresholds": threshold_list(per_expert=True),
        "calibration_info": Thresholded.INFO_OPTION,
    }
    uses_empty_slots = True

    top_k: float | None = None
    causal: bool = False
    thresholds: list[list[float]] | None = None
    calibration_info: dict[str, Any] | None = None

    def calibrated_for(self, native) -> dict[str, Any]:
        return {"top_k": float(native.top_k if self.top_k is None else self.top_k)}

    def calibration_cells(self, call: RouterCall) -> torch.Tensor:
        scores = call.logits_fn(call.hidden_states).float().softmax(dim=-1)
        return scores[call.sequences(scores.shape[0]).token_valid]

    def threshold_from_cells(self, cells: torch.Tensor, native) -> list[float]:
        budget = native.top_k if self.top_k is None else self.top_k
        return expert_thresholds(cells, budget).tolist()

    def route(self, call: RouterCall) -> RouterOutput:
        return _route(self, call)


@data_dependent("expert_choice")
def _route(method: ExpertChoice, call: RouterCall) -> RouterOutput:
    native = call.native
    logits = call.logits_fn(call.hidden_states)
    scores = logits.float().softmax(dim=-1)
    if method.causal:
        # Per token, against this layer's per-expert thresholds: no layout is read.
        tau = torch.tensor(method.threshold(call.layer), dtype=torch.float32, device=scores.device)
        index, weights = threshold_slots(scores, scores, tau)
        return logits, native.finish(weights, logits), index
    T, N = logits.shape
    grid = call.sequences(T)
    budget = native.top_k if method.top_k is None else method.top_k
    selected = grid.from_grid(expert_choice_select(grid.to_grid(scores), grid.valid, budget))
    index, weights = selection_to_slots(selected, scores, scores)
    return logits, native.finish(weights, logits), index
