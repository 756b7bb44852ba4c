"""``"top_p"``: dynamic routing, as many experts as a token's probability mass needs
(Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing in MoE Models"; ROUTING.md
section 8)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidOptionError
from ..ops.top_p import top_p_slots
from .base import (
    NativeRouting,
    RouterCall,
    RouterOutput,
    RoutingMethod,
    data_dependent,
    experts_per_token,
    one_of,
    real_in,
)


@dataclass
class TopP(RoutingMethod):
    """Per token, the smallest set of experts, best first, whose softmax probability reaches ``p``.

    A token takes experts in order of probability while the mass of those already taken is below
    ``p``, so the expert whose mass crosses ``p`` is included and every token gets at least one.
    Ties go to the lower expert index. Confident tokens use few experts, uncertain ones more.
    The rule reads each token alone: no look-ahead (causal by construction, so decoding with a KV
    cache routes as the full forward does), and padding or batch-mates never matter.

    The gates are the selected probabilities, renormalised to sum to 1 when the native router
    renormalises (Mixtral and GPT-OSS always; OLMoE and Qwen when ``norm_topk_prob``), then the
    family's output dtype. Only softmax routers are supported (OLMoE, Qwen2-MoE, Qwen3-MoE,
    Mixtral, GPT-OSS): DeepSeek-V3 scores experts with independent sigmoids, which form no
    distribution over experts, so "mass p" has no meaning there and patching it raises.

    Args:
        p: the probability mass to reach, in (0, 1]; ``p = 1`` takes experts until their float32
            mass reaches 1 (usually all of them).
        max_k: at most this many experts per token; None: no cap.
        renormalize: renormalise each token's selected probabilities to sum to 1; None follows
            the native router's convention.

    Example:
        >>> import hf_moe_patch as hmp
        >>> hmp.patch(model, "top_p", p=0.6)  # doctest: +SKIP
    """

    name = "top_p"
    OPTIONS = {
        "p": real_in(0.0, 1.0, lo_open=True),
        "max_k": experts_per_token("no cap"),
        "renormalize": one_of(None, True, False),
    }
    uses_empty_slots = True

    p: float = 0.6
    max_k: int | None = None
    renormalize: bool | None = None

    def validate(self, native: NativeRouting) -> None:
        super().validate(native)
        if native.score != "softmax":
            raise InvalidOptionError(
                f"Routing method 'top_p' needs a softmax router: it takes experts until their probability "
                f"mass reaches p, but this model scores experts with a {native.score} (DeepSeek-V3), which "
                f"gives no distribution over experts. 'top_p' supports OLMoE, Qwen2-MoE, Qwen3-MoE, Mixtral "
                f"and GPT-OSS."
            )

    def route(self, call: RouterCall) -> RouterOutput:
        return _route(self, call)


@data_dependent("top_p")
def _route(method: TopP, call: RouterCall) -> RouterOutput:
    native = call.native
    logits = call.logits_fn(call.hidden_states)
    probs = logits.float().softmax(dim=-1)
    index, weights = top_p_slots(probs, method.p, method.max_k)
    renormalize = native.renormalize if method.renormalize is None else method.renormalize
    if renormalize:
        # Every token has at least its best expert, whose probability is >= 1/N: the sum is > 0
        # (or NaN for a NaN token, which stays NaN as under the native router).
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return logits, native.finish(weights, logits), index
