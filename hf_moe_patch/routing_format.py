"""The stored-routing format: how a routing is written into ``config.moe_routing`` and read back.

Both the patching machinery (which records the active routing in the config) and the Hub
helpers (which save and load it) use this module, so neither imports the other.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from .errors import InvalidOptionError
from .version import __version__

logger = logging.getLogger(__name__)

ROUTING_KEY = "moe_routing"
ROUTING_FILE = "moe_routing.json"
FORMAT = 1


def routing_entry(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """The ``config.moe_routing`` value for a routing.

    Example:
        >>> routing_entry("usmoe", {"top_k": 1.5})["options"]
        {'top_k': 1.5}
    """
    return {"library": "hf_moe_patch", "format": FORMAT, "version": __version__, "method": method, "options": dict(options)}


def parse_entry(entry: Any) -> tuple[str, dict[str, Any]]:
    """``(method, options)`` from a stored routing; never silently falls back to native routing.

    A newer storage format raises; a different package version logs a warning; an unknown method
    or option raises later, in ``patch``, with the valid names.

    Example:
        >>> parse_entry(routing_entry("ssr", {"p": 0.1}))
        ('ssr', {'p': 0.1})
    """
    if not isinstance(entry, dict) or not isinstance(entry.get("method"), str):
        raise InvalidOptionError(f"config.{ROUTING_KEY} is malformed (expected a dict with a 'method'): {entry!r}")
    unknown = sorted(set(entry) - {"library", "format", "version", "method", "options"})
    if unknown:
        # Options at the top level would otherwise be dropped without a word.
        raise InvalidOptionError(
            f"config.{ROUTING_KEY} has unknown keys {unknown}; routing options belong under 'options', "
            f"e.g. {routing_entry(entry['method'], {k: entry[k] for k in unknown})}"
        )
    fmt = entry.get("format", FORMAT)
    if not isinstance(fmt, int) or fmt > FORMAT:
        raise InvalidOptionError(
            f"config.{ROUTING_KEY} was written by hf_moe_patch {entry.get('version', '?')} in storage format {fmt!r}; "
            f"this hf_moe_patch {__version__} reads format {FORMAT}. Upgrade hf_moe_patch to load this routing."
        )
    version = entry.get("version")
    if version != __version__:
        logger.warning(
            "Routing %r was recorded by hf_moe_patch %s and is applied by hf_moe_patch %s; "
            "check the defaults of options it does not list.", entry["method"], version, __version__,
        )
    options = entry.get("options", {})
    if not isinstance(options, dict):
        raise InvalidOptionError(f"config.{ROUTING_KEY}['options'] must be a dict, got {options!r}")
    return entry["method"], dict(options)


def stored_entry(model: nn.Module) -> dict[str, Any] | None:
    """The routing recorded in ``model.config``, or None."""
    return getattr(getattr(model, "config", None), ROUTING_KEY, None)
