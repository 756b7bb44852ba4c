"""The patching machinery: install, remember and remove routing patches.

One mechanism serves every family and method:

* each router module's forward is swapped, per instance, for a closure that hands the call to
  the routing method (the MoE block, its experts kernels and ``output_router_logits`` recording
  stay native); accelerate's hooks, when present, are kept by swapping the ``_old_forward`` they
  call instead of ``forward``;
* for methods that give tokens a variable number of experts, the experts module's forward is
  wrapped by :func:`~hf_moe_patch.dispatch.pair_dispatch`;
* a forward pre-hook on the decoder stack records, once per model forward, the batch layout and
  attention mask (routers only see flattened tokens) and lets the method draw per-forward
  randomness (SSR's coins);
* methods that replace auxiliary balancing set ``router_aux_loss_coef`` to 0 while patched.

Everything needed to undo this is kept in a :class:`PatchRecord` on the decoder stack module.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .dispatch import pair_dispatch
from .errors import UnsupportedModelError
from .families import MoEFamily, family_of
from .hub import ROUTING_KEY, parse_entry, routing_entry, stored_entry
from .methods import NativeRouting, RouterCall, RoutingMethod, StepState, build_method

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
    undo: list[Callable[[], None]] = field(default_factory=list)

    def config(self) -> dict[str, Any]:
        return {"method": self.method.name, **self.method.options()}


# --- discovery -------------------------------------------------------------------------------


def find_sites(model: nn.Module, family: MoEFamily) -> list[RouterSite]:
    """All routers of ``family`` in ``model`` (through peft wrappers), in module order."""
    router_type = family.router_type
    modules = dict(model.named_modules())
    sites = []
    for name, module in modules.items():
        if isinstance(module, router_type):
            parent = modules.get(name.rpartition(".")[0])
            experts = getattr(parent, family.experts_attr, None) if parent is not None else None
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


# --- forward swapping ------------------------------------------------------------------------


def swap_forward(module: nn.Module, make: Callable[[Callable], Callable]) -> Callable[[], None]:
    """Replace ``module``'s forward by ``make(current_forward)``; return the undo function.

    With accelerate's hooks (``device_map`` dispatch, offloading) ``module.forward`` is the hook
    and ``module._old_forward`` the real forward it calls: the swap happens there, so the hook
    keeps moving tensors between devices.
    """
    slot = "_old_forward" if hasattr(module, "_hf_hook") and hasattr(module, "_old_forward") else "forward"
    had_instance_attr = slot in module.__dict__
    current = getattr(module, slot)
    new = make(current)
    setattr(module, slot, new)

    def undo() -> None:
        if module.__dict__.get("_old_forward") is new:
            # Hooks were added (or kept) around the patched forward: restore under them.
            module._old_forward = current
        elif module.__dict__.get("forward") is new:
            if had_instance_attr or slot == "_old_forward":
                module.forward = current
            else:
                del module.forward  # the class's own forward again, exactly
        else:
            logger.warning("forward of %s was replaced by someone else; leaving it", type(module).__name__)

    return undo


def _router_forward(record: PatchRecord, site: RouterSite) -> Callable[[Callable], Callable]:
    method, family, router = record.method, record.family, site.router

    def logits_fn(hidden_states: torch.Tensor) -> torch.Tensor:
        return family.logits(router, hidden_states)

    def make(native_forward: Callable) -> Callable:
        def forward(hidden_states: torch.Tensor):
            # The rule is read per call: parameters and buffers (DeepSeek-V3's correction bias) may
            # be replaced after patching, e.g. when from_pretrained materialises weights.
            native = family.native_routing(router)
            call = RouterCall(hidden_states, native, logits_fn, native_forward, record.step, site.layer)
            out = method.route(call)
            router.__dict__[INFO_ATTR] = call.info  # read by the statistics collector
            return out

        return forward

    return make


# --- the per-forward layout hook -----------------------------------------------------------


def _arg(args: tuple, kwargs: dict, name: str, position: int) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else None


def valid_mask(attention_mask: torch.Tensor | None, seq_len: int) -> torch.Tensor | None:
    """``(B, L)`` bool of the current tokens from a 2-D attention mask (the last ``L`` columns:
    with a KV cache the mask covers past and current tokens). Other mask forms give None (all
    tokens valid)."""
    if attention_mask is None or attention_mask.dim() != 2 or attention_mask.shape[1] < seq_len:
        if attention_mask is not None and attention_mask.dim() != 2:
            logger.debug("attention mask of shape %s is not 2-D: all tokens routed as valid", attention_mask.shape)
        return None
    return attention_mask[:, -seq_len:].bool()


def layout_hook(step: StepState, prepare: Callable[[StepState], None] | None) -> Callable:
    """A forward pre-hook for the decoder stack that records the batch layout into ``step``."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = _arg(args, kwargs, "input_ids", 0)
        embeds = kwargs.get("inputs_embeds")
        shape = input_ids.shape if input_ids is not None else embeds.shape[:2] if embeds is not None else None
        if shape is None or len(shape) != 2:
            step.batch_size = step.seq_len = None
            step.valid = None
        else:
            step.batch_size, step.seq_len = int(shape[0]), int(shape[1])
            step.valid = valid_mask(_arg(args, kwargs, "attention_mask", 1), step.seq_len)
        step.training = module.training
        step.forward_index += 1
        if prepare is not None:
            prepare(step)

    return hook


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
            _install(model, previous.family, previous.sites, find_base_model(model, previous.family), previous.method)
        raise
    logger.info("patched %d %s routers with %s", len(sites), family.name, routing.name)
    return model


def _install(model: nn.Module, family: MoEFamily, sites: list[RouterSite], base: nn.Module, routing: RoutingMethod) -> None:
    step = StepState()
    record = PatchRecord(family, routing, step, sites)
    base.__dict__[RECORD_ATTR] = record
    record.undo.append(lambda: base.__dict__.pop(RECORD_ATTR, None))
    num_layers = len(sites)
    handle = base.register_forward_pre_hook(
        layout_hook(step, lambda s: routing.prepare_step(s, num_layers)), with_kwargs=True
    )
    record.undo.append(handle.remove)
    for site in sites:
        record.undo.append(swap_forward(site.router, _router_forward(record, site)))
        record.undo.append(lambda r=site.router: r.__dict__.pop(INFO_ATTR, None))
        if routing.uses_empty_slots and site.experts is not None:
            n = int(site.router.num_experts)
            record.undo.append(swap_forward(site.experts, lambda fwd, n=n: pair_dispatch(fwd, n)))
    config = getattr(model, "config", None)
    if config is not None:
        # The active routing is part of the config, so save_pretrained records it (hub.py).
        setattr(config, ROUTING_KEY, routing_entry(routing.name, routing.options()))
        record.undo.append(lambda: _drop_config_key(config))
    if routing.disables_aux_loss:
        for module in model.modules():
            if "router_aux_loss_coef" in module.__dict__:
                old = module.__dict__["router_aux_loss_coef"]
                module.router_aux_loss_coef = 0.0
                record.undo.append(lambda m=module, v=old: setattr(m, "router_aux_loss_coef", v))


def _drop_config_key(config: Any) -> None:
    if hasattr(config, ROUTING_KEY):
        delattr(config, ROUTING_KEY)


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
    for undo in reversed(record.undo):
        undo()
    record.undo.clear()
    return model


@contextlib.contextmanager
def patched(model: nn.Module, method: str, **options: Any) -> Iterator[nn.Module]:
    """Patch for the duration of a ``with`` block; the previous routing returns on exit, also on
    error.

    Example:
        >>> with hmp.patched(model, "ssr", p=0.01):  # doctest: +SKIP
        ...     trainer.train()
    """
    previous = routing_config(model)
    patch(model, method, **options)
    try:
        yield model
    finally:
        if previous is None:
            unpatch(model)
        else:
            prev = dict(previous)
            patch(model, prev.pop("method"), **prev)


def routing_config(model: nn.Module) -> dict[str, Any] | None:
    """The active routing as ``{"method": ..., **options}``, or None when not patched.

    Example:
        >>> hmp.routing_config(hmp.patch(model, "usmoe"))["method"]  # doctest: +SKIP
        'usmoe'
    """
    record = find_record(model)
    return None if record is None else record.config()
