"""``"topk"``: the family's native token choice, at the native k or a chosen one (ROUTING.md section 1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import RouterCall, RouterOutput, RoutingMethod, experts_per_token


@dataclass
class TopK(RoutingMethod):
    """Native token choice. With ``top_k=None`` it is the unpatched router's own forward, so
    outputs are bit-for-bit native and patching installs nothing in the forward path (the routing
    is only recorded in the config): the model runs, compiles and recompiles exactly as the
    native one.

    With ``top_k=k'`` every token takes its ``k'`` best experts by the family's own rule: its
    scores (softmax, or DeepSeek-V3's sigmoid plus the correction bias for choice only), the top
    ``k'``, renormalised when the native router renormalises, then the family's scaling and output
    dtype. Every token gets exactly ``k'`` experts, so no pair dispatch is needed and it compiles
    fully. An explicit ``k'`` routes through this rule even when it equals the native k (same
    experts and gates on OLMoE, Qwen and Mixtral; GPT-OSS's gates equal the native ones up to
    float rounding). DeepSeek-V3's group-limited choice (only the best expert groups compete) is
    not applied at ``k'``: its choice is over all experts.

    Args:
        top_k: experts per token, an integer; None is the native router itself.

    Example:
        >>> import hf_moe_patch as hmp
        >>> hmp.patch(model, "topk")  # doctest: +SKIP
        >>> hmp.patch(model, "topk", top_k=1)  # doctest: +SKIP
    """

    name = "topk"
    OPTIONS = {"top_k": experts_per_token("the native k={k}: the native router itself")}

    top_k: int | None = None

    def routes_natively(self, training: bool) -> bool:
        return self.top_k is None

    def route(self, call: RouterCall) -> RouterOutput:
        if self.top_k is None:
            return call.native_forward(call.hidden_states)
        native = call.native
        logits = call.logits_fn(call.hidden_states)
        scores = native.scores(logits)
        key = scores.detach()
        if native.choice_bias is not None:
            key = key + native.choice_bias.float()
        index = torch.topk(key, self.top_k, dim=-1).indices
        weights = scores.gather(1, index)
        if native.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, native.finish(weights, logits), index
