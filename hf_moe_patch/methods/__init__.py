"""Routing methods, registered by name (the peft ``PEFT_TYPE_TO_CONFIG_MAPPING`` pattern).

To add a method: write a :class:`~hf_moe_patch.methods.base.RoutingMethod` dataclass in its own
file and list it in ``METHODS`` below.
"""

from __future__ import annotations

import difflib
from typing import Any

from ..errors import InvalidOptionError
from .base import NativeRouting, RouterCall, RoutingMethod, StepState
from .expert_choice import ExpertChoice
from .ssr import SSR
from .top_p import TopP
from .topk import TopK
from .usmoe import USMoE

METHODS: dict[str, type[RoutingMethod]] = {cls.name: cls for cls in (TopK, USMoE, ExpertChoice, SSR, TopP)}


def build_method(method: str, options: dict[str, Any]) -> RoutingMethod:
    """Instantiate a registered method from its name and options (names checked, not ranges).

    Example:
        >>> build_method("usmoe", {"alpha": 0.3}).alpha
        0.3
    """
    if not isinstance(method, str) or method not in METHODS:
        hint = difflib.get_close_matches(str(method), METHODS, n=1)
        extra = f" Did you mean {hint[0]!r}?" if hint else ""
        raise InvalidOptionError(
            f"Unknown routing method {method!r}.{extra} Supported methods: {', '.join(METHODS)}."
        )
    return METHODS[method].from_options(options)


__all__ = ["METHODS", "NativeRouting", "RouterCall", "RoutingMethod", "StepState", "build_method"]
