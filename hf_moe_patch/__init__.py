"""hf_moe_patch: swap the router of a pretrained transformers MoE model in one call.

Example:
    >>> import hf_moe_patch as hmp
    >>> model = AutoModelForCausalLM.from_pretrained("allenai/OLMoE-1B-7B-0924")  # doctest: +SKIP
    >>> hmp.patch(model, "usmoe", top_k=6, alpha=0.5)  # doctest: +SKIP
    >>> hmp.unpatch(model)  # doctest: +SKIP
"""

from .errors import InvalidOptionError, LayoutError, UnsupportedModelError
from .families import supported_models
from .methods import METHODS
from .patching import check_routing, patch, patched, routing_config, unpatch
from .sharing.hub import from_pretrained, push_to_hub, save_pretrained
from .stats import RoutingStats, collect_stats
from .version import __version__


# Imported on first use: they pull in mteb, which takes seconds to import.
_LAZY = {
    "MoEEncoder": "embeddings.moee",
    "to_sentence_transformer": "embeddings.moee",
    "evaluate_routings": "embeddings.evaluation",
    "wordnet_tasks": "data.wordnet_tasks",
    "Corruption": "data.corruption",
    "demo_model_path": "lm",
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
    "LayoutError",
    "MoEEncoder",
    "RoutingStats",
    "UnsupportedModelError",
    "__version__",
    "check_routing",
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
