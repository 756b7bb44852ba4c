"""The patching machinery: install, remember and remove routing patches.

One mechanism serves every family and method:

* each router module's forward is swapped, per instance, for a :class:`PatchedRouterForward`
  that hands the call to the routing method (the MoE block, its experts kernels and ``output_router_logits`` recording
  stay native); accelerate's hooks, when present, are kept by swapping the ``_old_forward`` they
  call instead of ``forward``;
* for methods that give tokens a variable number of experts, the experts module's forward is
  wrapped by :class:`~hf_moe_patch.dispatch.PairDispatch`;
* a forward pre-hook on the decoder stack makes, once per model forward, a new
  :class:`~hf_moe_patch.methods.StepState` with the batch layout (padding, packed sequences:
  routers only see flattened tokens) and the method's per-forward draws (SSR's coins), and hands
  it to that forward's routers through a per-thread :class:`LayoutSlot`, so concurrent forwards
  of one model never share it;
* ``"topk"`` (and any method while it routes natively) installs nothing in the forward path, so
  such a model runs and compiles exactly as the native one;
* methods that replace auxiliary balancing set ``router_aux_loss_coef`` to 0 while patched.

Everything needed to undo this is kept in a :class:`PatchRecord` on the decoder stack module, as
objects (not closures), so that a deep copy of a patched model is a patched model of its own.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .calibration import DEFAULT_BATCH_SIZE, DEFAULT_MAX_LENGTH, calibrate, calibration_data
from .dispatch import PairDispatch
from .errors import InvalidOptionError, UnsupportedModelError
from .families import MoEFamily, family_of
from .routing_format import ROUTING_KEY, parse_entry, routing_entry, stored_entry
from .layout import ForwardArguments, LayoutHook, LayoutRelease, LayoutSlot
from .methods import RouterCall, RoutingMethod, StepState, build_method

logger = logging.getLogger(__name__)

RECORD_ATTR = "_hf_moe_patch_record"


@dataclass
class RouterSite:
    """A router inside the model, with its experts module and its position among MoE layers."""

    name: str
    router: nn.Module
    experts: nn.Module | None
    layer: int


@dataclass
class PatchRecord:
    """What a patch installed, so that unpatch can take it all back."""

    family: MoEFamily
    method: RoutingMethod
    slot: "LayoutSlot"
    sites: list[RouterSite]
    undo: list[Any] = field(default_factory=list)  # objects with an undo() method, in install order

    def config(self) -> dict[str, Any]:
        return {"method": self.method.name, **self.method.options()}

    def install_dispatch(self, site: RouterSite) -> "ForwardSwap":
        """Put a :class:`PairDispatch` in front of ``site``'s experts forward."""
        n, experts = int(site.router.num_experts), site.experts
        return ForwardSwap.install(experts, lambda previous: PairDispatch(previous, n, experts, self.method))

    def ensure_dispatch(self, site: RouterSite) -> None:
        """Re-install the pair dispatch if something replaced the experts' forward after patching.

        transformers' expert parallelism does (``module.forward = ep_forward``): its all-to-all
        would then receive the sentinel index of an empty slot. Wrapped again, the dispatch hands
        it real (token, expert) pairs only, whichever of patching and distributing came first.
        """
        experts = site.experts
        if experts is None or isinstance(getattr(experts, "_old_forward", None), PairDispatch):
            return
        if isinstance(experts.__dict__.get("forward"), PairDispatch):
            return
        with _DISPATCH_LOCK:
            if not isinstance(experts.__dict__.get("forward"), PairDispatch):
                logger.info("the experts forward of %s was replaced after patching: wrapping it again", site.name)
                self.undo.append(self.install_dispatch(site))


_DISPATCH_LOCK = threading.Lock()


# --- discovery -------------------------------------------------------------------------------


def find_sites(model: nn.Module, family: MoEFamily) -> list[RouterSite]:
    """All routers of ``family`` in ``model`` (through peft wrappers), in module order.

    The experts module is looked up on the nearest ancestor that has one: with a LoRA on the
    router (peft ``target_parameters``), the router's parent is peft's wrapper, not the MoE block.
    A router trained in full through peft's ``modules_to_save`` exists twice; only the trainable
    copy runs, so the kept ``original_module`` is skipped.
    """
    router_type = family.router_type
    modules = dict(model.named_modules())
    sites = []
    for name, module in modules.items():
        if isinstance(module, router_type) and ".original_module" not in f".{name}":
            experts, parent_name = None, name
            while parent_name and experts is None:
                parent_name = parent_name.rpartition(".")[0]
                experts = getattr(modules.get(parent_name), family.experts_attr, None)
            sites.append(RouterSite(name, module, experts, len(sites)))
    return sites


def find_base_model(model: nn.Module, family: MoEFamily) -> nn.Module:
    """The decoder stack module (e.g. ``OlmoeModel``) inside ``model``."""
    base_type = family.base_model_type
    for module in model.modules():
        if isinstance(module, base_type):
            return module
    raise UnsupportedModelError(f"No {family.base_model_class} found inside {type(model).__name__}.")


def find_record(model: nn.Module) -> PatchRecord | None:
    """The active patch of ``model`` (searched through wrappers), or None."""
    for module in model.modules():
        record = module.__dict__.get(RECORD_ATTR)
        if record is not None:
            return record
    return None


def layer_number(name: str) -> int | None:
    """The decoder layer index in a module name such as ``model.layers.3.mlp.gate``."""
    match = re.search(r"\.layers\.(\d+)\.", f".{name}.")
    return int(match.group(1)) if match else None


# --- undo records ----------------------------------------------------------------------------
#
# Everything a patch installs is an object, not a closure: ``copy.deepcopy`` copies objects along
# with the modules they refer to, so a deep copy of a patched model (a reference model, an EMA copy)
# routes with its own weights and unpatches itself, not the original. Closures would be shared.


@dataclass
class ForwardSwap:
    """A module's forward replaced in place; ``undo`` puts the previous one back.

    With accelerate's hooks (``device_map`` dispatch, offloading) ``module.forward`` is the hook
    and ``module._old_forward`` the real forward it calls: the swap happens there, so the hook
    keeps moving tensors between devices.
    """

    module: nn.Module
    slot: str
    had_instance_attr: bool
    previous: Callable
    new: Callable

    @classmethod
    def install(cls, module: nn.Module, make: Callable[[Callable], Callable]) -> "ForwardSwap":
        slot = "_old_forward" if hasattr(module, "_hf_hook") and hasattr(module, "_old_forward") else "forward"
        previous = getattr(module, slot)
        swap = cls(module, slot, slot in module.__dict__, previous, make(previous))
        setattr(module, slot, swap.new)
        return swap

    def undo(self) -> None:
        module = self.module
        if module.__dict__.get("_old_forward") is self.new:
            # Hooks were added (or kept) around the patched forward: restore under them.
            module._old_forward = self.previous
        elif module.__dict__.get("forward") is self.new:
            if self.had_instance_attr or self.slot == "_old_forward":
                module.forward = self.previous
            else:
                del module.forward  # the class's own forward again, exactly
        else:
            logger.warning("forward of %s was replaced by someone else; leaving it", type(module).__name__)


@dataclass
class AttrRestore:
    """An attribute set by the patch; ``undo`` restores its previous value or absence."""

    obj: Any
    name: str
    had: bool
    value: Any = None

    @classmethod
    def set(cls, obj: Any, name: str, value: Any) -> "AttrRestore":
        record = cls(obj, name, hasattr(obj, name), getattr(obj, name, None))
        setattr(obj, name, value)
        return record

    def undo(self) -> None:
        if self.had:
            setattr(self.obj, self.name, self.value)
        elif hasattr(self.obj, self.name):
            delattr(self.obj, self.name)


@dataclass
class HookRemoval:
    """A forward (pre-)hook; removed by id (a RemovableHandle would point at the original's dict)."""

    module: nn.Module
    hook_id: int

    def undo(self) -> None:
        for table in ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                      "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
            getattr(self.module, table, {}).pop(self.hook_id, None)


class PatchedRouterForward:
    """The forward installed on each router: hands the call to the routing method."""

    def __init__(self, record: PatchRecord, site: RouterSite, native_forward: Callable) -> None:
        self.record, self.site, self.native_forward = record, site, native_forward
        self.router, self.layer = site.router, site.layer

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.record.family.logits(self.router, hidden_states)

    def __call__(self, hidden_states: torch.Tensor):
        record = self.record
        if record.method.routes_natively(self.router.training):
            # Nothing per-forward is read, so this compiles exactly like the native router.
            return self.native_forward(hidden_states)
        step = record.slot.current()
        if step is None:  # the router called on its own, outside a model forward
            step = StepState(training=self.router.training)
        elif record.method.uses_empty_slots:
            record.ensure_dispatch(self.site)
        # The rule is read per call: parameters and buffers (DeepSeek-V3's correction bias) may be
        # replaced after patching, e.g. when from_pretrained materialises weights.
        native = record.family.native_routing(self.router)
        call = RouterCall(hidden_states, native, self.logits, self.native_forward, step, self.layer)
        out = record.method.route(call)
        step.info[self.layer] = call.info  # read by the statistics collector
        return out


# --- public verbs ----------------------------------------------------------------------------


def _validated(model: nn.Module, method: str, options: dict[str, Any]):
    family = family_of(model)
    sites = find_sites(model, family)
    if not sites:
        raise UnsupportedModelError(
            f"{type(model).__name__} ({family.name}) has no {family.router_class} modules to patch."
        )
    base = find_base_model(model, family)
    native = family.native_routing(sites[0].router)
    routing = build_method(method, options)
    routing.validate(native)
    routing.validate_layers(len(sites))
    if not always_native(routing):
        ForwardArguments.of(base)  # fails now, loudly, if this transformers changed the inputs we read
    return family, sites, base, routing


def _calibration_input(routing: RoutingMethod, calibration: Any, tokenizer: Any, batch_size: int, max_length: int):
    """The checked calibration data, or None; raises when it is missing or not wanted."""
    if calibration is None:
        if routing.needs_calibration():
            raise InvalidOptionError(
                f"Routing method {routing.name!r} with causal=True needs thresholds: pass calibration= (a list of "
                "strings with tokenizer=, a tokenized batch or an iterable of batches) to fit them, or thresholds= "
                "from an earlier calibration (routing_config(model)['thresholds'])."
            )
        return None
    if not routing.needs_calibration():
        why = "thresholds= were given" if getattr(routing, "thresholds", None) is not None else "it has no causal=True"
        raise InvalidOptionError(
            f"calibration= is only used by a causal router without thresholds (usmoe or expert_choice with "
            f"causal=True); routing method {routing.name!r} does not take it here: {why}."
        )
    return calibration_data(calibration, tokenizer, batch_size=batch_size, max_length=max_length)


def always_native(routing: RoutingMethod) -> bool:
    """Whether ``routing`` routes natively in training and in eval (then nothing is installed)."""
    return routing.routes_natively(True) and routing.routes_natively(False)


def check_routing(
    model: nn.Module,
    method: str,
    *,
    calibration: Any = None,
    tokenizer: Any = None,
    calibration_batch_size: int = DEFAULT_BATCH_SIZE,
    calibration_max_length: int = DEFAULT_MAX_LENGTH,
    **options: Any,
) -> None:
    """Raise what :func:`patch` would raise for this routing, without changing ``model``.

    Example:
        >>> hmp.check_routing(model, "usmoe", alpha=3)  # doctest: +SKIP
        InvalidOptionError: Invalid value for option 'alpha' of usmoe: 3 ...
    """
    _, _, _, routing = _validated(model, method, options)
    _calibration_input(routing, calibration, tokenizer, calibration_batch_size, calibration_max_length)


def patch(
    model: nn.Module,
    method: str | None = None,
    *,
    calibration: Any = None,
    tokenizer: Any = None,
    calibration_batch_size: int = DEFAULT_BATCH_SIZE,
    calibration_max_length: int = DEFAULT_MAX_LENGTH,
    **options: Any,
) -> nn.Module:
    """Replace the routing of every MoE layer of ``model`` in place and return ``model``.

    Args:
        model: a supported transformers MoE model (see :func:`supported_models`), possibly
            wrapped by peft or dispatched by accelerate.
        method: ``"topk"``, ``"usmoe"``, ``"expert_choice"`` or ``"ssr"``. None re-applies the
            routing recorded in ``model.config.moe_routing`` (written by ``patch``, saved by
            ``save_pretrained``).
        calibration: text to calibrate a causal router's thresholds on (``causal=True`` without
            ``thresholds``): a tokenized batch (a dict with ``input_ids`` and
            ``attention_mask``), an iterable of such batches, or a list of strings with
            ``tokenizer``. Strings are tokenized ``calibration_batch_size`` at a time, truncated
            to ``calibration_max_length`` tokens. The fitted thresholds, the calibration's size and
            a fingerprint become options of the routing (``routing_config``, ``config.moe_routing``),
            so a saved or pushed model routes the same without the text.
        **options: the method's options (ROUTING.md); unknown names and values outside their
            valid range raise :class:`~hf_moe_patch.InvalidOptionError`.

    Patching a patched model replaces its routing. Every check runs before anything changes, so
    a failed patch leaves the model exactly as it was.

    Example:
        >>> import hf_moe_patch as hmp
        >>> model = AutoModelForCausalLM.from_pretrained("allenai/OLMoE-1B-7B-0924")  # doctest: +SKIP
        >>> hmp.patch(model, "usmoe", top_k=6, alpha=0.5)  # doctest: +SKIP
    """
    if method is None:
        entry = stored_entry(model)
        if entry is None:
            raise ValueError(f"patch(model) without a method needs a routing recorded in model.config.{ROUTING_KEY}.")
        method, stored = parse_entry(entry)
        options = {**stored, **options}
    family, sites, base, routing = _validated(model, method, options)
    data = _calibration_input(routing, calibration, tokenizer, calibration_batch_size, calibration_max_length)
    previous = find_record(model)
    if previous is not None:
        unpatch(model)
    try:
        if data is not None:
            routing = calibrate(
                model, base, routing, family.native_routing(sites[0].router), len(sites), data,
                install=lambda probe: _install(model, family, sites, base, probe), remove=lambda: unpatch(model),
            )
        _install(model, family, sites, base, routing)
    except Exception:
        unpatch(model)
        if previous is not None:
            _reinstall(model, previous)
        raise
    logger.info("patched %d %s routers with %s", len(sites), family.name, routing.name)
    return model


def _install(model: nn.Module, family: MoEFamily, sites: list[RouterSite], base: nn.Module, routing: RoutingMethod) -> None:
    record = PatchRecord(family, routing, LayoutSlot(), sites)
    undo = record.undo
    undo.append(AttrRestore.set(base, RECORD_ATTR, record))
    if not always_native(routing):
        hook = LayoutHook(record.slot, ForwardArguments.of(base), routing, len(sites))
        undo.append(HookRemoval(base, base.register_forward_pre_hook(hook, with_kwargs=True).id))
        release = base.register_forward_hook(LayoutRelease(record.slot, routing), with_kwargs=True, always_call=True)
        undo.append(HookRemoval(base, release.id))
        for site in sites:
            undo.append(ForwardSwap.install(site.router, lambda previous, site=site: PatchedRouterForward(record, site, previous)))
            if routing.uses_empty_slots and site.experts is not None:
                undo.append(record.install_dispatch(site))
    config = getattr(model, "config", None)
    if config is not None:
        # The active routing is part of the config, so save_pretrained records it (hub.py).
        undo.append(AttrRestore.set(config, ROUTING_KEY, routing_entry(routing.name, routing.options())))
    if routing.disables_aux_loss:
        for module in model.modules():
            if "router_aux_loss_coef" in module.__dict__:
                undo.append(AttrRestore.set(module, "router_aux_loss_coef", 0.0))


def unpatch(model: nn.Module) -> nn.Module:
    """Remove the routing patch: native routers, experts and auxiliary loss, bit-for-bit.

    A model that is not patched is returned unchanged.

    Example:
        >>> hmp.unpatch(model)  # doctest: +SKIP
    """
    record = find_record(model)
    if record is None:
        logger.info("unpatch: %s is not patched", type(model).__name__)
        return model
    for step in reversed(record.undo):
        step.undo()
    record.undo.clear()
    return model


@contextlib.contextmanager
def patched(model: nn.Module, method: str, **options: Any) -> Iterator[nn.Module]:
    """Patch for the duration of a ``with`` block; on exit, also on error, the model returns to
    exactly what it was: native, or its previous patch (the same method object, so a seeded
    SSR coin sequence carries on where it was).

    Example:
        >>> with hmp.patched(model, "ssr", p=0.01):  # doctest: +SKIP
        ...     trainer.train()
    """
    previous = find_record(model)
    patch(model, method, **options)
    try:
        yield model
    finally:
        unpatch(model)
        if previous is not None:
            _reinstall(model, previous)


def _reinstall(model: nn.Module, record: PatchRecord) -> None:
    _install(model, record.family, find_sites(model, record.family), find_base_model(model, record.family), record.method)


def routing_config(model: nn.Module) -> dict[str, Any] | None:
    """The active routing as ``{"method": ..., **options}``, or None when not patched.

    Example:
        >>> hmp.routing_config(hmp.patch(model, "usmoe"))["method"]  # doctest: +SKIP
        'usmoe'
    """
    record = find_record(model)
    return None if record is None else record.config()
