"""What every routing method sees, and the base class that validates its options.

A method is a dataclass of options plus ``route(call)``, which turns one router call into the
``(router_logits, top_k_weights, top_k_index)`` triple that transformers' MoE blocks expect. It
never imports transformers: the model family is described by :class:`NativeRouting` and the
call by :class:`RouterCall`, both filled in by the patching machinery.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from ..errors import InvalidOptionError

RouterOutput = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class NativeRouting:
    """How a family's own router scores, selects and weights experts (ROUTING.md section 1).

    Attributes:
        num_experts: routed experts ``N``.
        top_k: native experts per token ``k``.
        score: ``"softmax"`` (OLMoE, Qwen, Mixtral, GPT-OSS) or ``"sigmoid"`` (DeepSeek-V3).
        renormalize: whether the native top-k weights are renormalised to sum to 1. GPT-OSS's
            softmax over the top-k logits is exactly a renormalised softmax, so it is True there.
        scaling: multiplier applied to the final weights (DeepSeek-V3's ``routed_scaling_factor``).
        choice_bias: per-expert bias added to scores for choice only (DeepSeek-V3's
            ``e_score_correction_bias``), or None.
        float32_weights: keep the returned weights in float32 (Mixtral's and DeepSeek-V3's routers
            do); otherwise they are cast to the logits' dtype (OLMoE, Qwen, GPT-OSS).
    """

    num_experts: int
    top_k: int
    score: str = "softmax"
    renormalize: bool = False
    scaling: float = 1.0
    choice_bias: torch.Tensor | None = None
    float32_weights: bool = False

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """The family's per-expert score in float32: softmax or sigmoid of the logits."""
        z = logits.float()
        return torch.sigmoid(z) if self.score == "sigmoid" else torch.softmax(z, dim=-1)

    def finish(self, weights: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Apply the family's scaling and output dtype to float32 gate weights."""
        if self.scaling != 1.0:
            weights = weights * self.scaling
        return weights if self.float32_weights else weights.to(logits.dtype)


@dataclass
class StepState:
    """Per-forward facts shared by all routers of one model, set once per model forward.

    Gradient checkpointing recomputes layers after the forward has returned; since these facts
    stay until the next forward, the recomputation routes exactly as the first pass did, provided
    each forward's backward runs before the next forward (as in every usual training loop). Two
    forwards followed by one backward would recompute the first with the second's facts.

    Attributes:
        valid: ``(B, L)`` bool mask of real (non-padding) tokens of this forward, or None.
        batch_size, seq_len: the layout the router's flattened ``T = B * L`` tokens come from.
        training: whether the model was in training mode.
        coins: SSR's Sinkhorn coins, one per forward or one per MoE layer (bool tensor), or None.
        forward_index: increases by one per forward.
        seed: a per-forward seed for noise, drawn once per forward when a method needs one.
    """

    valid: torch.Tensor | None = None
    batch_size: int | None = None
    seq_len: int | None = None
    training: bool = False
    coins: torch.Tensor | None = None
    forward_index: int = 0
    seed: int | None = None


@dataclass
class RouterCall:
    """One call of one patched router.

    Attributes:
        hidden_states: ``(T, d)`` flattened hidden states given to the router.
        native: the family's routing rule.
        logits_fn: computes the raw router logits ``(T, N)`` exactly as the native router does.
        native_forward: the unpatched router forward (bit-exact native routing).
        step: the per-forward state.
        layer: position of this MoE layer among the model's MoE layers.
        info: filled by the method with facts for the statistics collector (e.g. Sinkhorn
            iterations); read only while collecting.
    """

    hidden_states: torch.Tensor
    native: NativeRouting
    logits_fn: Callable[[torch.Tensor], torch.Tensor]
    native_forward: Callable[[torch.Tensor], RouterOutput]
    step: StepState
    layer: int
    info: dict[str, Any] = field(default_factory=dict)

    def layout(self, num_tokens: int) -> tuple[torch.Tensor, int, int]:
        """``(valid (B, L), B, L)`` for this call's tokens.

        Falls back to one sequence of all-valid tokens when the router is called outside a model
        forward (or with a token count that does not match the recorded batch layout).
        """
        s = self.step
        if s.batch_size is not None and s.seq_len is not None and s.batch_size * s.seq_len == num_tokens:
            valid = s.valid
            if valid is None:
                valid = torch.ones(s.batch_size, s.seq_len, dtype=torch.bool, device=self.hidden_states.device)
            return valid.to(self.hidden_states.device), s.batch_size, s.seq_len
        return torch.ones(1, num_tokens, dtype=torch.bool, device=self.hidden_states.device), 1, num_tokens


# --- option validation -----------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """Validation rule for one option: a check and the human description of its valid range."""

    check: Callable[[Any, NativeRouting], bool]
    valid: str | Callable[[NativeRouting], str]

    def describe(self, native: NativeRouting) -> str:
        return self.valid(native) if callable(self.valid) else self.valid


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def real_in(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Option:
    """A real number in an interval."""

    def check(v: Any, _: NativeRouting) -> bool:
        if not _is_real(v) or v != v:
            return False
        return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)

    left, right = "(" if lo_open else "[", ")" if hi_open else "]"
    return Option(check, f"a number in {left}{lo:g}, {hi:g}{right}")


def int_in(lo: int, hi: int | None = None) -> Option:
    """An integer in ``[lo, hi]`` (``hi=None``: unbounded)."""

    def check(v: Any, _: NativeRouting) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi)

    return Option(check, f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}")


def one_of(*choices: Any) -> Option:
    """One of a fixed set of values (compared with ``is`` for None/bools, ``==`` otherwise)."""

    def check(v: Any, _: NativeRouting) -> bool:
        return any(v is c if c is None or isinstance(c, bool) else (type(v) is type(c) and v == c) for c in choices)

    return Option(check, "one of " + ", ".join(repr(c) for c in choices))


def experts_budget() -> Option:
    """A (possibly fractional) number of experts per token in ``(0, N]``; None means native k."""

    def check(v: Any, native: NativeRouting) -> bool:
        if v is None:
            return True
        return _is_real(v) and v == v and 0 < v <= native.num_experts

    return Option(check, lambda n: f"None (the native k={n.top_k}) or a number in (0, {n.num_experts}] (N experts)")


def experts_count() -> Option:
    """An integer number of experts in ``[0, N]``."""

    def check(v: Any, native: NativeRouting) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= native.num_experts

    return Option(check, lambda n: f"an integer in [0, {n.num_experts}] (N experts)")


class RoutingMethod:
    """Base class of routing methods: a dataclass of options with declared valid ranges.

    Subclasses are dataclasses that set ``name``, ``OPTIONS`` (option name -> :class:`Option`)
    and implement :meth:`route`. ``uses_empty_slots`` says whether the method can give a token a
    number of experts other than ``k`` (then the patch installs the pair-list dispatch in front
    of the experts).
    """

    name: ClassVar[str]
    OPTIONS: ClassVar[dict[str, Option]] = {}
    uses_empty_slots: ClassVar[bool] = False
    disables_aux_loss: ClassVar[bool] = False

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "RoutingMethod":
        """Build the method, rejecting unknown option names with a suggestion."""
        fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        for key in options:
            if key not in fields:
                hint = difflib.get_close_matches(key, fields, n=1)
                extra = f" Did you mean {hint[0]!r}?" if hint else ""
                raise InvalidOptionError(
                    f"Unknown option {key!r} for routing method {cls.name!r}.{extra} "
                    f"Valid options: {', '.join(sorted(fields))}."
                )
        return cls(**options)

    def validate(self, native: NativeRouting) -> None:
        """Check every option against its valid range for this model; raise InvalidOptionError."""
        for key, rule in self.OPTIONS.items():
            value = getattr(self, key)
            if not rule.check(value, native):
                raise InvalidOptionError(
                    f"Invalid value for option {key!r} of routing method {self.name!r}: {value!r}. "
                    f"Valid: {rule.describe(native)}."
                )

    def options(self) -> dict[str, Any]:
        """The options as a plain dict (JSON-serialisable)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def prepare_step(self, step: StepState, num_layers: int) -> None:
        """Draw what must be fixed once per model forward (SSR's coins). Default: nothing."""

    def route(self, call: RouterCall) -> RouterOutput:  # pragma: no cover - abstract
        raise NotImplementedError
