"""The patching machinery: install, remember and remove routing patches.

One mechanism serves every family and method:

* each router module's forward is swapped, per instance, for a :class:`PatchedRouterForward`
  that hands the call to the routing method (the MoE block, its experts kernels and ``output_router_logits`` recording
  stay native); accelerate's hooks, when present, are kept by swapping the ``_old_forward`` they
  call instead of ``forward``;
* for methods that give tokens a variable number of experts, the experts module's forward is
  wrapped by :class:`~hf_moe_patch.dispatch.PairDispatch`;
* a forward pre-hook on the decoder stack records, once per model forward, the batch layout and
  attention mask (routers only see flattened tokens) and lets the method draw per-forward
  randomness (SSR's coins);
* methods that replace auxiliary balancing set ``router_aux_loss_coef`` to 0 while patched.

Everything needed to undo this is kept in a :class:`PatchRecord` on the decoder stack module, as
objects (not closures), so that a deep copy of a patched model is a patched model of its own.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .dispatch import PairDispatch
from .errors import UnsupportedModelError
from .families import MoEFamily, family_of
from .hub import ROUTING_KEY, parse_entry, routing_entry, stored_entry
from .methods import RouterCall, RoutingMethod, StepState, build_method

logger = logging.getLogger(__name__)

RECORD_ATTR = "_hf_moe_patch_record"
INFO_ATTR = "_hf_moe_patch_info"


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
    step: StepState
    sites: list[RouterSite]
    undo: list[Any] = field(default_factory=list)  # objects with an undo() method, in install order

    def config(self) -> dict[str, Any]:
        return {"method": self.method.name, **self.method.options()}


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
class PreHookRemoval:
    """A forward pre-hook; removed by id (a RemovableHandle would point at the original's dict)."""

    module: nn.Module
    hook_id: int

    def undo(self) -> None:
        self.module._forward_pre_hooks.pop(self.hook_id, None)
        self.module._forward_pre_hooks_with_kwargs.pop(self.hook_id, None)


class PatchedRouterForward:
    """The forward installed on each router: hands the call to the routing method."""

    def __init__(self, record: PatchRecord, site: RouterSite, native_forward: Callable) -> None:
        self.record, self.router, self.layer, self.native_forward = record, site.router, site.layer, native_forward

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.record.family.logits(self.router, hidden_states)

    def __call__(self, hidden_states: torch.Tensor):
        record = self.record
        # The rule is read per call: parameters and buffers (DeepSeek-V3's correction bias) may be
        # replaced after patching, e.g. when from_pretrained materialises weights.
        native = record.family.native_routing(self.router)
        call = RouterCall(hidden_states, native, self.logits, self.native_forward, record.step, self.layer)
        out = record.method.route(call)
        self.router.__dict__[INFO_ATTR] = call.info  # read by the statistics collector
        return out


# --- the per-forward layout hook -----------------------------------------------------------


def _arg(args: tuple, kwargs: dict, name: str, position: int) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else None


def valid_mask(attention_mask: Any, seq_len: int, past_length: int = 0) -> torch.Tensor | None:
    """``(B, L)`` bool of the current tokens' validity (False on padding), or None if unknown.

    - 2-D masks (the usual ``attention_mask``): the last ``L`` columns (with a KV cache the mask
      covers past and current tokens).
    - 4-D masks ``(B, 1, L, K)`` (static caches, custom masks), boolean or additive: a padding
      token may not attend to its own key, so each query's entry at its own key slot
      (``past_length + q``) tells whether it is real.
    - dicts of masks per attention type (GPT-OSS): the full-attention mask.
    """
    if isinstance(attention_mask, dict):
        attention_mask = attention_mask.get("full_attention", next(iter(attention_mask.values()), None))
    if not isinstance(attention_mask, torch.Tensor):
        return None
    if attention_mask.dim() == 2:
        return attention_mask[:, -seq_len:].bool() if attention_mask.shape[1] >= seq_len else None
    if attention_mask.dim() == 4 and attention_mask.shape[2] == seq_len and attention_mask.shape[3] >= past_length + seq_len:
        q = torch.arange(seq_len, device=attention_mask.device)
        own = attention_mask[:, 0, q, past_length + q]
        if own.dtype == torch.bool:
            return own
        return own > torch.finfo(own.dtype).min / 2  # additive masks: 0 allowed, very negative masked
    logger.debug("attention mask of shape %s not understood: all tokens routed as valid", tuple(attention_mask.shape))
    return None


class LayoutHook:
    """Forward pre-hook on the decoder stack: records the batch layout into ``step`` once per model
    forward, and lets the method draw per-forward randomness (SSR's coins)."""

    def __init__(self, step: StepState, method: RoutingMethod | None = None, num_layers: int = 0) -> None:
        self.step, self.method, self.num_layers = step, method, num_layers

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        step = self.step
        input_ids = _arg(args, kwargs, "input_ids", 0)
        embeds = kwargs.get("inputs_embeds")
        shape = input_ids.shape if input_ids is not None else embeds.shape[:2] if embeds is not None else None
        if shape is None or len(shape) != 2:
            step.batch_size = step.seq_len = None
            step.valid = None
        else:
            step.batch_size, step.seq_len = int(shape[0]), int(shape[1])
            cache = _arg(args, kwargs, "past_key_values", 3)
            past = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0
            step.valid = valid_mask(_arg(args, kwargs, "attention_mask", 1), step.seq_len, past)
        step.training = module.training
        step.forward_index += 1
        if self.method is not None:
            self.method.prepare_step(step, self.num_layers)


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
    return family, sites, base, routing


def check_routing(model: nn.Module, method: str, **options: Any) -> None:
    """Raise what :func:`patch` would raise for this routing, without changing ``model``.

    Example:
        >>> hmp.check_routing(model, "usmoe", alpha=3)  # doctest: +SKIP
        InvalidOptionError: Invalid value for option 'alpha' of usmoe: 3 ...
    """
    _validated(model, method, options)


def patch(model: nn.Module, method: str | None = None, **options: Any) -> nn.Module:
    """Replace the routing of every MoE layer of ``model`` in place and return ``model``.

    Args:
        model: a supported transformers MoE model (see :func:`supported_models`), possibly
            wrapped by peft or dispatched by accelerate.
        method: ``"topk"``, ``"usmoe"``, ``"expert_choice"`` or ``"ssr"``. None re-applies the
            routing recorded in ``model.config.moe_routing`` (written by ``patch``, saved by
            ``save_pretrained``).
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
    previous = find_record(model)
    if previous is not None:
        unpatch(model)
    try:
        _install(model, family, sites, base, routing)
    except Exception:
        unpatch(model)
        if previous is not None:
            _reinstall(model, previous)
        raise
    logger.info("patched %d %s routers with %s", len(sites), family.name, routing.name)
    return model


def _install(model: nn.Module, family: MoEFamily, sites: list[RouterSite], base: nn.Module, routing: RoutingMethod) -> None:
    record = PatchRecord(family, routing, StepState(), sites)
    undo = record.undo
    undo.append(AttrRestore.set(base, RECORD_ATTR, record))
    handle = base.register_forward_pre_hook(LayoutHook(record.step, routing, len(sites)), with_kwargs=True)
    undo.append(PreHookRemoval(base, handle.id))
    for site in sites:
        undo.append(ForwardSwap.install(site.router, lambda previous, site=site: PatchedRouterForward(record, site, previous)))
        undo.append(AttrRestore(site.router, INFO_ATTR, had=False))
        if routing.uses_empty_slots and site.experts is not None:
            n = int(site.router.num_experts)
            undo.append(ForwardSwap.install(site.experts, lambda previous, n=n: PairDispatch(previous, n)))
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
