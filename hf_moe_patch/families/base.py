"""The declarative description of a model family: where its routers are and how they route."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
import torch
import torch.nn.functional as F
from torch import nn

from ..methods.base import NativeRouting


@dataclass(frozen=True)
class MoEFamily:
    """One architecture family as loaded by transformers 5.x.

    Attributes:
        name: short name used in messages.
        model_types: ``config.model_type`` values this adapter covers.
        module: the transformers modeling module that defines the classes below.
        router_class: class name of the router module (its forward returns
            ``(router_logits, top_k_weights, top_k_index)``).
        base_model_class: class name of the decoder stack that receives ``input_ids`` and
            ``attention_mask``; the patch reads the batch layout there once per forward.
        score: ``"softmax"`` or ``"sigmoid"``.
        renormalize: ``True`` (always), or the router attribute that decides (``"norm_topk_prob"``).
        float32_logits: the router computes its logits in float32 (DeepSeek-V3).
        float32_weights: the router returns float32 weights whatever the model's dtype.
        extra: family-specific routing parameters, as ``(NativeRouting field, router attribute)``
            pairs read from the router instance on every call. Declarative (no functions), so a
            patched model pickles.
        experts_attr: the experts module's attribute name on the MoE block (the router's parent).
    """

    name: str
    model_types: tuple[str, ...]
    module: str
    router_class: str
    base_model_class: str
    score: str = "softmax"
    renormalize: bool | str = "norm_topk_prob"
    float32_logits: bool = False
    float32_weights: bool = False
    extra: tuple[tuple[str, str], ...] = ()
    experts_attr: str = "experts"

    def _class(self, name: str) -> type[nn.Module]:
        return getattr(importlib.import_module(self.module), name)

    @property
    def router_type(self) -> type[nn.Module]:
        return self._class(self.router_class)

    @property
    def base_model_type(self) -> type[nn.Module]:
        return self._class(self.base_model_class)

    def native_routing(self, router: nn.Module) -> NativeRouting:
        """The router's native rule, read from the router instance (so per-model settings hold)."""
        renormalize = self.renormalize if isinstance(self.renormalize, bool) else bool(getattr(router, self.renormalize))
        return NativeRouting(
            num_experts=int(router.num_experts),
            top_k=int(router.top_k),
            score=self.score,
            renormalize=renormalize,
            float32_weights=self.float32_weights,
            **{key: _native_value(key, getattr(router, attr)) for key, attr in self.extra},
        )

    def logits(self, router: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        """Raw router logits ``(T, N)``, computed exactly as the native router computes them."""
        h = hidden_states.reshape(-1, router.weight.shape[-1])
        bias = getattr(router, "bias", None)
        if self.float32_logits:
            return F.linear(h.float(), router.weight.float(), None if bias is None else bias.float())
        return F.linear(h, router.weight, bias)


def _native_value(key: str, value: object) -> object:
    """A router attribute as the :class:`NativeRouting` field wants it (scaling is a float)."""
    return float(value) if key == "scaling" else value
