"""``"usmoe"``: Unified Sparse MoE, a unified score and one global top-c budget (ROUTING.md section 2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..ops import SequenceGrid, budget_slots, budget_threshold, threshold_slots, unified_score
from .base import (
    RouterCall,
    RouterOutput,
    Thresholded,
    data_dependent,
    experts_budget,
    experts_count,
    experts_per_token,
    one_of,
    real_in,
    threshold_list,
)


@dataclass
class USMoE(Thresholded):
    """Global top-``c`` over the unified score ``U``, ``c = round(top_k * T_valid)`` per sequence.

    Args:
        top_k: experts per token on average (the budget); fractional values allowed; None is the
            native ``k``.
        alpha: weight of the expert-softmax term in ``U`` (the rest is the scaled sigmoid).
        scope: ``"sequence"`` (each sequence spends its own budget; batch-mates never matter) or
            ``"batch"`` (the budget is pooled over all valid tokens of the batch).
        renormalize: renormalise each token's selected ``U`` to sum to 1; None follows the native
            router's convention (Mixtral and GPT-OSS always; OLMoE/Qwen/DeepSeek when
            ``norm_topk_prob``). ``"row"`` divides the selected ``U`` by the sum of the token's
            whole row of ``U`` (all ``N`` experts), as the official USMoE code does when
            ``norm_topk_prob`` is true: the reference behaviour, for comparisons with the paper.
        min_experts: every valid token gets at least this many experts (its top ones).
        causal: route each token by itself: every expert with ``U >= tau_l``, with one threshold
            per MoE layer calibrated on text so that tokens take ``top_k`` experts on average
            (ours, beyond the paper). Causal, independent of batch-mates and padding, and the same
            at prefill and at each decode step, so generation with a KV cache equals generation
            by recomputation. Needs ``calibration=`` (text, given to :func:`~hf_moe_patch.patch`)
            or ``thresholds=``.
        thresholds: the per-layer thresholds of ``causal=True`` (one number per MoE layer), as a
            calibration computed them (``routing_config(model)["thresholds"]``).
        max_experts: with ``causal=True``, at most this many experts per token (its top ones).
        calibration_info: what the thresholds were calibrated on and for (filled in by the
            calibration; a reload with another budget, alpha or floor is refused).

    For DeepSeek-V3 (sigmoid scores) ``U`` is computed from the same raw logits; the correction
    bias enters the choice through the sigmoid term (``key = U + (1 - alpha) * 2/N * bias``),
    group-limited choice is replaced by the global budget, and the gates are ``U`` (renormalised
    when ``norm_topk_prob``) times ``routed_scaling_factor``.

    Example:
        >>> import hf_moe_patch as hmp
        >>> hmp.patch(model, "usmoe", top_k=1.5, alpha=0.5)  # doctest: +SKIP
        >>> hmp.patch(model, "usmoe", top_k=1.5, causal=True, calibration=texts, tokenizer=tok)  # doctest: +SKIP
    """

    name = "usmoe"
    OPTIONS = {
        "top_k": experts_budget(),
        "alpha": real_in(0.0, 1.0),
        "scope": one_of("sequence", "batch"),
        "renormalize": one_of(None, True, False, "row"),
        "min_experts": experts_count(),
        "causal": one_of(False, True),
        "thresholds": threshold_list(per_expert=False),
        "max_experts": experts_per_token("no cap"),
        "calibration_info": Thresholded.INFO_OPTION,
    }
    uses_empty_slots = True

    top_k: float | None = None
    alpha: float = 0.5
    scope: str = "sequence"
    renormalize: bool | str | None = None
    min_experts: int = 0
    causal: bool = False
    thresholds: list[float] | None = None
    max_experts: int | None = None
    calibration_info: dict[str, Any] | None = None

    def calibrated_for(self, native) -> dict[str, Any]:
        return {
            "top_k": float(native.top_k if self.top_k is None else self.top_k),
            "alpha": float(self.alpha),
            "min_experts": self.min_experts,
            "max_experts": self.max_experts,
        }

    def validate(self, native) -> None:
        super().validate(native)
        if self.causal:
            self._invalid_with_causal("scope", self.scope != "sequence", "a causal router has no sequence budget")
            budget = native.top_k if self.top_k is None else self.top_k
            high = native.num_experts if self.max_experts is None else self.max_experts
            if not self.min_experts <= budget <= high:
                self._raise(
                    "top_k", budget,
                    f"with causal=True, a budget in [min_experts, max_experts] = [{self.min_experts}, {high}]",
                )
        else:
            self._invalid_without_causal("max_experts", self.max_experts is not None)

    def calibration_cells(self, call: RouterCall) -> torch.Tensor:
        key, _, _ = _scores(self, call)
        return key[call.sequences(key.shape[0]).token_valid]

    def threshold_from_cells(self, cells: torch.Tensor, native) -> float:
        budget = native.top_k if self.top_k is None else self.top_k
        return budget_threshold(cells, budget, min_experts=self.min_experts, max_experts=self.max_experts)

    def route(self, call: RouterCall) -> RouterOutput:
        return _route(self, call)


def _scores(method: USMoE, call: RouterCall) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(key, U, logits)``: the ranking key (U, plus DeepSeek-V3's correction bias), U, logits."""
    native = call.native
    logits = call.logits_fn(call.hidden_states)
    score = unified_score(logits, method.alpha)
    key = score
    if native.choice_bias is not None:
        key = score + (1.0 - method.alpha) * (2.0 / logits.shape[-1]) * native.choice_bias.float()
    return key, score, logits


@data_dependent("usmoe")
def _route(method: USMoE, call: RouterCall) -> RouterOutput:
    native = call.native
    key, score, logits = _scores(method, call)
    if method.causal:
        # Per token, against this layer's calibrated threshold: no layout is read.
        index, weights = threshold_slots(
            key, score, method.threshold(call.layer), min_experts=method.min_experts, max_experts=method.max_experts
        )
    else:
        grid = call.sequences(logits.shape[0])
        if method.scope == "batch":
            grid = SequenceGrid.pooled(grid.token_valid)
        budget = native.top_k if method.top_k is None else method.top_k
        index, weights = budget_slots(
            grid.to_grid(key, fill=float("-inf")), grid.to_grid(score), grid.valid, budget, min_experts=method.min_experts
        )
        index, weights = grid.from_grid(index), grid.from_grid(weights)
    renormalize = native.renormalize if method.renormalize is None else method.renormalize
    if renormalize == "row":
        # The official code's normalisation: by the whole row of U (selected or not), so a
        # token's gates sum to well below 1.
        weights = weights / score.sum(dim=-1, keepdim=True)
    elif renormalize:
        # Tokens without experts have an all-zero row: the clamp keeps them at 0, not NaN.
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return logits, native.finish(weights, logits), index
