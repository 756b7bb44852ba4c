"""Architecture adapters, registered by ``config.model_type``.

To add a family: describe it with a :class:`~hf_moe_patch.families.base.MoEFamily` in its own
file and list it in ``_FAMILIES`` below.
"""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from . import deepseek_v3, gpt_oss, mixtral, olmoe, qwen2_moe, qwen3_moe
from .base import MoEFamily

_FAMILIES: tuple[MoEFamily, ...] = (
    olmoe.FAMILY,
    qwen2_moe.FAMILY,
    qwen3_moe.FAMILY,
    mixtral.FAMILY,
    gpt_oss.FAMILY,
    deepseek_v3.FAMILY,
)
FAMILIES: dict[str, MoEFamily] = {mt: fam for fam in _FAMILIES for mt in fam.model_types}


def supported_models() -> list[str]:
    """The ``config.model_type`` values that can be patched.

    Example:
        >>> "olmoe" in supported_models()
        True
    """
    return list(FAMILIES)


def model_type_of(model: nn.Module) -> str | None:
    """``config.model_type`` of a transformers model, also through peft wrappers."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def family_of(model: nn.Module) -> MoEFamily:
    """The adapter for ``model``; raises UnsupportedModelError naming the supported families."""
    model_type = model_type_of(model)
    if model_type not in FAMILIES:
        names = ", ".join(f"{fam.name} ({'/'.join(fam.model_types)})" for fam in _FAMILIES)
        what = f"model_type {model_type!r}" if model_type else f"a {type(model).__name__} without a config.model_type"
        raise UnsupportedModelError(f"hf_moe_patch cannot patch {what}. Supported model families: {names}.")
    return FAMILIES[model_type]


__all__ = ["FAMILIES", "MoEFamily", "family_of", "supported_models"]
