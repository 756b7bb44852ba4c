"""hf_moe_patch: swap the router of a pretrained transformers MoE model in one call.

Example:
    >>> import hf_moe_patch as hmp
    >>> model = AutoModelForCausalLM.from_pretrained("allenai/OLMoE-1B-7B-0924")  # doctest: +SKIP
    >>> hmp.patch(model, "usmoe", top_k=6, alpha=0.5)  # doctest: +SKIP
    >>> hmp.unpatch(model)  # doctest: +SKIP
"""

from .errors import InvalidOptionError, UnsupportedModelError
from .families import supported_models
from .hub import from_pretrained, push_to_hub, save_pretrained
from .methods import METHODS
from .patching import patch, patched, routing_config, unpatch
from .stats import RoutingStats, collect_stats

from .version import __version__


# Imported on first use: they pull in mteb, which takes seconds to import.
_LAZY = {
    "MoEEncoder": "moee",
    "to_sentence_transformer": "moee",
    "evaluate_routings": "evaluation",
    "wordnet_tasks": "wordnet_tasks",
    "Corruption": "corruption",
    "demo_model_path": "demo_model",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def supported_methods() -> list[str]:
    """The routing method names that :func:`patch` accepts."""
    return list(METHODS)


__all__ = [
    "Corruption",
    "InvalidOptionError",
    "MoEEncoder",
    "RoutingStats",
    "UnsupportedModelError",
    "__version__",
    "collect_stats",
    "demo_model_path",
    "evaluate_routings",
    "from_pretrained",
    "patch",
    "patched",
    "push_to_hub",
    "routing_config",
    "save_pretrained",
    "supported_methods",
    "supported_models",
    "to_sentence_transformer",
    "unpatch",
    "wordnet_tasks",
]
