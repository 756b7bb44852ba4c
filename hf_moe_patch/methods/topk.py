"""``"topk"``: the family's native token choice, exactly (ROUTING.md section 1)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import RouterCall, RouterOutput, RoutingMethod


@dataclass
class TopK(RoutingMethod):
    """Native token choice: the unpatched router's own forward, so outputs are bit-for-bit native.

    Patching with it installs nothing in the forward path (the routing is only recorded in the
    config), so the model runs, compiles and recompiles exactly as the native one.

    Example:
        >>> import hf_moe_patch as hmp
        >>> hmp.patch(model, "topk")  # doctest: +SKIP
    """

    name = "topk"

    def routes_natively(self, training: bool) -> bool:
        return True

    def route(self, call: RouterCall) -> RouterOutput:
        return call.native_forward(call.hidden_states)
