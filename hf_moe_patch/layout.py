"""The batch layout a router needs but never sees: which tokens are padding, which rows hold
several packed sequences, and the method's per-forward draws.

Routers are called with flattened ``(T, d)`` hidden states. A forward pre-hook on the decoder
stack (:class:`LayoutHook`) reads the layout from the forward's own inputs (attention mask, KV
cache, ``position_ids``, flash attention's ``cu_seq_lens_q``), into a new
:class:`~hf_moe_patch.methods.StepState` per forward, handed to that forward's routers through a
per-thread :class:`LayoutSlot`. Argument positions and names are read from the decoder stack's
signature, and whatever cannot be read raises instead of being guessed.
"""

from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import LayoutError, UnsupportedModelError
from .methods import RoutingMethod, StepState
from .ops import cu_seqlens_segment_ids, packed_segment_ids


class LayoutSlot:
    """Where the routers of one model find the :class:`StepState` of the forward they belong to.

    Each thread has its own current state, so two threads running one model (a web server) never
    read each other's layout. A forward run inside another forward of the same thread (re-entry)
    gets its own state and hands the outer one back when it returns. After a thread's outermost
    forward the state stays current, so gradient checkpointing recomputes with it; a thread that
    never ran a forward (autograd's device threads recomputing checkpointed layers on GPU) falls
    back to the most recent state of any thread.

    Copies (``copy.deepcopy``, pickling) start empty: the states belong to running forwards.
    """

    def __init__(self) -> None:
        self._local = threading.local()
        self.last: StepState | None = None

    def current(self) -> StepState | None:
        step = getattr(self._local, "step", None)
        return step if step is not None else self.last

    def push(self, step: StepState) -> None:
        local = self._local
        if not hasattr(local, "outer"):
            local.outer = []
        local.outer.append(getattr(local, "step", None))
        local.step = self.last = step

    def pop(self) -> None:
        outer = getattr(self._local, "outer", None)
        if outer:
            previous = outer.pop()
            if outer:  # back inside an enclosing forward of this thread: it carries on with its own
                self._local.step = previous

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()


CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value")
"""Names the decoder stack's KV-cache argument has had (transformers 5.24 renamed
``past_key_values`` to ``cache`` and keeps the old name as a deprecated alias)."""


@dataclass(frozen=True)
class ForwardArguments:
    """Where the decoder stack's forward takes the inputs the layout is read from, found from its
    signature rather than assumed, so a renamed or reordered argument is noticed, not misread."""

    positions: tuple[tuple[str, int], ...]
    cache_names: tuple[str, ...]

    @classmethod
    def of(cls, module: nn.Module) -> "ForwardArguments":
        try:
            names = [p for p in inspect.signature(type(module).forward).parameters][1:]  # after self
        except (TypeError, ValueError):
            names = []
        wanted = ("input_ids", "attention_mask", "position_ids", "inputs_embeds", *CACHE_ARGUMENTS)
        positions = tuple((name, names.index(name)) for name in wanted if name in names)
        found = [name for name in CACHE_ARGUMENTS if name in names]
        if "input_ids" not in names or "attention_mask" not in names or not found:
            raise UnsupportedModelError(
                f"{type(module).__name__}.forward{tuple(names)} does not take the arguments hf_moe_patch reads "
                f"the batch layout from (input_ids, attention_mask and a KV cache named one of {CACHE_ARGUMENTS}). "
                "This transformers version changed them; please report it with the version."
            )
        return cls(positions, (found[0], *[n for n in CACHE_ARGUMENTS if n != found[0]]))

    def get(self, args: tuple, kwargs: dict, name: str) -> Any:
        if name in kwargs:
            return kwargs[name]
        position = dict(self.positions).get(name)
        return args[position] if position is not None and len(args) > position else None

    def cache(self, args: tuple, kwargs: dict) -> Any:
        for name in self.cache_names:
            value = self.get(args, kwargs, name)
            if value is not None:
                return value
        return None


def valid_mask(attention_mask: Any, seq_len: int, past_length: int | None = 0) -> torch.Tensor | None:
    """``(B, L)`` bool of the current tokens' validity (False on padding); None when no mask was
    given (every token is valid). A mask whose layout cannot be read raises :class:`LayoutError`.

    - 2-D masks (the usual ``attention_mask``): the last ``L`` columns (with a KV cache the mask
      covers past and current tokens).
    - 4-D masks ``(B, 1, L, K)`` (static caches, custom masks), boolean or additive: a padding
      token may not attend to its own key, so each query's entry at its own key slot
      (``past_length + q``) tells whether it is real. ``past_length=None`` means unknown, which
      is only acceptable when there is no room for past keys (``K == L``).
    - dicts of masks per attention type (GPT-OSS): the full-attention mask.
    """
    if isinstance(attention_mask, dict):
        attention_mask = attention_mask.get("full_attention", next(iter(attention_mask.values()), None))
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise LayoutError(f"attention mask of type {type(attention_mask).__name__} cannot be read for padding.")
    shape = tuple(attention_mask.shape)
    if attention_mask.dim() == 2 and shape[1] >= seq_len:
        return attention_mask[:, -seq_len:].bool()
    if attention_mask.dim() == 4 and shape[1] == 1 and shape[2] == seq_len:
        if past_length is None:
            if shape[3] != seq_len:
                raise LayoutError(
                    f"a 4-D attention mask {shape} with past keys, but the KV cache's length is unknown: "
                    "padding cannot be told apart."
                )
            past_length = 0
        if shape[3] >= past_length + seq_len:
            q = torch.arange(seq_len, device=attention_mask.device)
            own = attention_mask[:, 0, q, past_length + q]
            if own.dtype == torch.bool:
                return own
            return own > torch.finfo(own.dtype).min / 2  # additive masks: 0 allowed, very negative masked
    raise LayoutError(f"attention mask of shape {shape} does not match {seq_len} current tokens (past {past_length}).")


class LayoutHook:
    """Forward pre-hook on the decoder stack: makes this forward's :class:`StepState` (batch
    layout, packed sequences, the method's per-forward draws) and makes it current for the
    forward's thread. Paired with :class:`LayoutRelease`, which runs when the forward ends."""

    def __init__(
        self, slot: LayoutSlot, arguments: ForwardArguments, method: RoutingMethod | None = None, num_layers: int = 0
    ) -> None:
        self.slot, self.arguments, self.method, self.num_layers = slot, arguments, method, num_layers

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        method = self.method
        if method is not None and method.routes_natively(module.training):
            # A natively routed forward reads nothing (its routers and experts check the mode
            # themselves), so it runs and compiles exactly like the native model.
            return
        step = StepState(training=module.training)
        _read_layout_eagerly(step, self.arguments, args, kwargs)
        if method is not None:
            method.prepare_step(step, self.num_layers)
        self.slot.push(step)


class LayoutRelease:
    """Forward hook (also run when the forward raises) that ends a forward's :class:`StepState`."""

    def __init__(self, slot: LayoutSlot, method: RoutingMethod | None = None) -> None:
        self.slot, self.method = slot, method

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self.method is None or not self.method.routes_natively(module.training):
            self.slot.pop()


def read_layout(step: StepState, arguments: ForwardArguments, args: tuple, kwargs: dict) -> None:
    """Fill ``step``'s batch shape, padding mask and packed-sequence ids from a forward's inputs."""
    input_ids = arguments.get(args, kwargs, "input_ids")
    embeds = arguments.get(args, kwargs, "inputs_embeds")
    shape = input_ids.shape if input_ids is not None else embeds.shape[:2] if embeds is not None else None
    if shape is None or len(shape) != 2:
        return
    B, L = int(shape[0]), int(shape[1])
    step.batch_size, step.seq_len = B, L
    mask = arguments.get(args, kwargs, "attention_mask")
    past: int | None = 0
    if _is_4d(mask):
        # Only 4-D masks need the past length (to find each query's own key slot). It must be read
        # here, before the first layer appends this forward's keys to the cache.
        cache = arguments.cache(args, kwargs)
        past = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else None if cache is not None else 0
    step.valid = valid_mask(mask, L, past)
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    position_ids = arguments.get(args, kwargs, "position_ids")
    if isinstance(cu_seqlens, torch.Tensor):
        step.segment_ids = cu_seqlens_segment_ids(cu_seqlens, B, L)
    elif isinstance(position_ids, torch.Tensor) and L > 1:
        if position_ids.dim() != 2 or position_ids.shape[-1] != L or position_ids.shape[0] not in (1, B):
            raise LayoutError(f"position_ids of shape {tuple(position_ids.shape)} do not match the batch {B} x {L}.")
        valid = step.valid if step.valid is not None else torch.ones(B, L, dtype=torch.bool, device=position_ids.device)
        step.segment_ids = packed_segment_ids(valid.to(position_ids.device), position_ids)


# Reading the layout syncs with the device (packed-sequence detection, a static cache's length):
# under torch.compile it runs eagerly, like the routers that need it.
_read_layout_eagerly = torch._dynamo.disable(
    read_layout,
    reason="hf_moe_patch reads the batch layout (padding, packed sequences) with data-dependent checks; "
    "torch.compile(fullgraph=True) cannot capture them. Compile without fullgraph, or route with 'topk'.",
)


def _is_4d(mask: Any) -> bool:
    if isinstance(mask, dict):
        mask = mask.get("full_attention", next(iter(mask.values()), None))
    return isinstance(mask, torch.Tensor) and mask.dim() == 4
