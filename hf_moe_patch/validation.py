"""Checks that run before a model is loaded: routing specs, options, output folders.

:func:`hf_moe_patch.check_routing` checks a routing against a loaded model. These checks need no
model, so that a typo fails in a second instead of after a model load:

* :func:`parse_routings` parses ``METHOD[:key=value,...]`` specs and checks method names, option
  names (with did-you-mean suggestions) and every option value that can be judged without
  knowing the model (types, and ranges that do not depend on the number of experts);
* :func:`native_from_config` reads the number of experts and the native ``k`` from a model's
  config (``AutoConfig`` loads it without the weights), and :func:`check_routings` then checks
  every range, exactly as ``patch`` will;
* :func:`check_writable_dir` finds an output folder that cannot be written before hours of work.

Example:
    >>> [c.label for c in parse_routings(["topk", "usmoe:top_k=0.75x"])]
    ['topk', 'usmoe:top_k=0.75x']
    >>> parse_routings(["usmo"])
    Traceback (most recent call last):
    hf_moe_patch.errors.InvalidOptionError: Unknown routing method 'usmo'. Did you mean 'usmoe'? Supported methods: topk, usmoe, expert_choice, ssr, top_p.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

from .errors import InvalidOptionError, UnsupportedModelError
from .methods import METHODS, NativeRouting, build_method
from .methods.base import ANY_NUM_EXPERTS
from .report import RoutingCase, parse_case

# Ranges that depend on the model are checked against a model "as large as can be" before the
# config is known, and described in terms of N and k.
_ANY_MODEL = NativeRouting(num_experts=ANY_NUM_EXPERTS, top_k=1)
_SYMBOLIC = NativeRouting(num_experts="N", top_k="k")  # type: ignore[arg-type]
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


def suggest(name: str, choices: Sequence[str]) -> str:
    """`` Did you mean 'x'?`` for the closest of ``choices`` (case-insensitive), or ``""``.

    Example:
        >>> suggest("wordnetwupalmersts", ["WordNetWuPalmerSTS", "STS12"])
        " Did you mean 'WordNetWuPalmerSTS'?"
    """
    lowered = {c.lower(): c for c in choices}
    hit = difflib.get_close_matches(str(name).lower(), list(lowered), n=1, cutoff=0.6)
    return f" Did you mean {lowered[hit[0]]!r}?" if hit else ""


def resolve_budget(value: Any, native_k: int) -> Any:
    """``"0.75x"`` -> ``0.75 * native_k``; numbers and None pass through.

    Example:
        >>> resolve_budget("0.75x", 8), resolve_budget(3, 8), resolve_budget("2", 8)
        (6.0, 3, 2.0)
    """
    if isinstance(value, str):
        text = value.strip()
        try:
            return float(text[:-1]) * native_k if text.endswith("x") else float(text)
        except ValueError:
            raise InvalidOptionError(f"top_k={value!r} is not valid; use a number of experts (e.g. 1.5) "
                                     f"or a multiple of the native k (e.g. 0.75x)") from None
    return value


def describe_option(method: str, option: str, native: NativeRouting | None = None) -> str:
    """The valid values of ``option``: for ``native``'s model, or in terms of N and k.

    Example:
        >>> describe_option("usmoe", "top_k")
        'None (the native k) or a number in (0, N] (N experts)'
        >>> describe_option("usmoe", "top_k", NativeRouting(num_experts=64, top_k=8))
        'None (the native k=8) or a number in (0, 64] (N experts)'
    """
    rule = METHODS[method].OPTIONS[option]
    if native is not None:
        return rule.describe(native)
    return rule.describe(_SYMBOLIC).replace("k=k", "k")


def check_method_options(method: str, options: dict[str, Any], native: NativeRouting | None = None) -> None:
    """Raise :class:`InvalidOptionError` for an unknown method or option name, or an option value
    outside its range: for ``native``'s model, or (``native=None``) for any model."""
    routing = build_method(method, options)  # names, with suggestions
    if native is not None:
        routing.validate(native)
        return
    for key, rule in type(routing).OPTIONS.items():
        value = getattr(routing, key)
        if not rule.check(value, _ANY_MODEL):
            raise InvalidOptionError(
                f"Invalid value for option {key!r} of routing method {method!r}: {value!r}. "
                f"Valid: {describe_option(method, key)}.")


def parse_routings(specs: Sequence[str | RoutingCase], *, flag: str = "methods") -> list[RoutingCase]:
    """Parse and check routing specs (``"usmoe:top_k=0.75x,alpha=0.3"``) without a model.

    Budgets written as multiples of the native k (``"0.75x"``) stay strings here and are checked
    for their form; :func:`check_routings` resolves them once the model's k is known. An empty
    list raises: nothing would be compared.
    """
    if not specs:
        raise InvalidOptionError(f"no routing given in {flag}; give one or more of {', '.join(METHODS)}, "
                                 f"e.g. topk usmoe:top_k=0.75x")
    cases = []
    for spec in specs:
        case = parse_case(spec) if isinstance(spec, str) else spec
        if not case.method:
            raise InvalidOptionError(f"{case.label!r} in {flag} names no routing method; valid: {', '.join(METHODS)}")
        options = dict(case.options)
        budget = options.get("top_k")
        if isinstance(budget, str) and budget.strip().endswith("x"):
            if not resolve_budget(budget, 1) > 0:  # its form; the multiple itself must be positive
                raise InvalidOptionError(f"Invalid value for option 'top_k' of routing method {case.method!r}: "
                                         f"{budget!r}. A multiple of the native k must be > 0, e.g. 0.75x.")
            options["top_k"] = None  # the number of experts is checked once k is known
        elif isinstance(budget, str):
            options["top_k"] = resolve_budget(budget, 1)
        check_method_options(case.method, options)
        cases.append(case)
    return cases


def native_from_config(config: Any) -> NativeRouting:
    """The number of experts ``N`` and native ``k`` of a model from its (text) config.

    Example:
        >>> from hf_moe_patch.testing import tiny_config  # doctest: +SKIP
        >>> native_from_config(tiny_config("mixtral")).num_experts  # doctest: +SKIP
        8
    """
    from .families import FAMILIES, supported_models

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES and getattr(text, "model_type", None) not in FAMILIES:
        raise UnsupportedModelError(f"hf_moe_patch cannot patch model_type {model_type!r}. "
                                    f"Supported model types: {', '.join(supported_models())}.")
    experts = next((getattr(text, key) for key in _EXPERT_KEYS if getattr(text, key, None)), None)
    top_k = getattr(text, "num_experts_per_tok", None)
    if not experts or not top_k:
        raise UnsupportedModelError(f"the {model_type} config names no number of experts or experts per token")
    return NativeRouting(num_experts=int(experts), top_k=int(top_k))


def check_routings(cases: Sequence[RoutingCase], native: NativeRouting) -> list[RoutingCase]:
    """Check every case against a model's ``native`` routing (all ranges); returns the cases with
    ``"...x"`` budgets resolved to numbers of experts."""
    resolved = []
    for case in cases:
        options = dict(case.options)
        if "top_k" in options:
            options["top_k"] = resolve_budget(options["top_k"], native.top_k)
        check_method_options(case.method, options, native)
        resolved.append(dataclasses.replace(case, options=options))
    return resolved


def check_writable_dir(path: str | os.PathLike, *, flag: str = "out") -> Path:
    """Raise when ``path`` cannot become a folder this process writes into (a file is in the way,
    or the folder, or its nearest existing parent, is not writable); nothing is left behind."""
    target = Path(path).expanduser()
    existing = target
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        what = "is a file" if existing == target else f"cannot be created: {str(existing)!r} is a file"
        raise NotADirectoryError(f"{flag}={str(target)!r} {what}")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        where = "it is not writable" if existing == target else f"{str(existing)!r} is not writable"
        raise PermissionError(f"{flag}={str(target)!r} cannot be written: {where} ({exc.strerror or exc})") from None
    return target
