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

from ..errors import InvalidOptionError, LayoutError
from ..ops.segments import SequenceGrid

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
    """The facts of one model forward that its routers need but never see.

    The patch makes a new one at every model forward and hands it to that forward's routers
    only (per thread), so concurrent forwards of one model never read each other's layout.

    Gradient checkpointing recomputes layers after the forward has returned; the state stays
    current for its thread until that thread's next forward, so the recomputation routes exactly
    as the first pass did, provided each forward's backward runs before the thread's next forward
    (as in every usual training loop).

    Attributes:
        valid: ``(B, L)`` bool mask of real (non-padding) tokens of this forward, or None.
        batch_size, seq_len: the layout the router's flattened ``T = B * L`` tokens come from;
            None outside a model forward.
        segment_ids: ``(B, L)`` ids of packed sequences (several in one row, padding-free
            training), or None when each row is one sequence.
        training: whether the model was in training mode.
        coins: SSR's Sinkhorn coins, one per forward or one per MoE layer (bool tensor), or None.
        seed: a per-forward seed for noise, drawn once per forward when a method needs one.
        info: per MoE layer, facts the method recorded for the statistics collector.
    """

    valid: torch.Tensor | None = None
    batch_size: int | None = None
    seq_len: int | None = None
    segment_ids: torch.Tensor | None = None
    training: bool = False
    coins: torch.Tensor | None = None
    seed: int | None = None
    info: dict[int, dict[str, Any]] = field(default_factory=dict)


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
            iterations).
    """

    hidden_states: torch.Tensor
    native: NativeRouting
    logits_fn: Callable[[torch.Tensor], torch.Tensor]
    native_forward: Callable[[torch.Tensor], RouterOutput]
    step: StepState
    layer: int
    info: dict[str, Any] = field(default_factory=dict)

    def sequences(self, num_tokens: int) -> SequenceGrid:
        """The sequences this call's ``num_tokens`` tokens belong to, as a :class:`SequenceGrid`.

        Outside a model forward (a router called on its own) the tokens are one sequence, all
        valid. Inside one, the token count must match the forward's ``B x L``: routing with a
        guessed layout would silently pool or split sequences, so a mismatch raises.
        """
        s = self.step
        device = self.hidden_states.device
        if s.batch_size is None or s.seq_len is None:
            return SequenceGrid(torch.ones(1, num_tokens, dtype=torch.bool, device=device))
        if s.batch_size * s.seq_len != num_tokens:
            raise LayoutError(
                f"MoE layer {self.layer} was given {num_tokens} tokens, but the model forward has "
                f"{s.batch_size} x {s.seq_len}: hf_moe_patch cannot tell which tokens form a sequence."
            )
        valid = s.valid
        if valid is None:
            valid = torch.ones(s.batch_size, s.seq_len, dtype=torch.bool, device=device)
        segments = s.segment_ids
        return SequenceGrid(valid.to(device), None if segments is None else segments.to(device))


def data_dependent(method: str) -> Callable[[Callable], Callable]:
    """Mark a routing function whose shapes depend on the data (a variable number of experts per
    token, a sequence's budget, Sinkhorn's stopping test).

    Under ``torch.compile`` it runs eagerly between compiled graphs, once per call, with no
    recompilation as values change; ``fullgraph=True`` cannot capture it and fails with this
    explanation instead of dynamo's generic one.
    """
    reason = (
        f"hf_moe_patch: the {method!r} router gives tokens a data-dependent number of experts, which "
        "torch.compile(fullgraph=True) cannot capture. Compile without fullgraph (the router then runs "
        "eagerly between compiled graphs), or use 'topk' (and 'ssr' in eval mode), which compile fully."
    )

    def wrap(fn: Callable) -> Callable:
        return torch._dynamo.disable(fn, reason=reason)

    return wrap


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


# The expert count of "any model", for checks that run before the model is known.
ANY_NUM_EXPERTS = 2**62


def threshold_list(*, per_expert: bool) -> Option:
    """None, or one threshold per MoE layer: a number (``per_expert=False``) or a list of ``N``
    numbers (``per_expert=True``); numbers may be infinite, never NaN. Before the model is known
    (``ANY_NUM_EXPERTS``), per-expert lists need only be of one length."""

    def number(x: Any) -> bool:
        return _is_real(x) and x == x

    def check(v: Any, native: NativeRouting) -> bool:
        if v is None:
            return True
        if not isinstance(v, (list, tuple)) or not v:
            return False
        if per_expert:
            if not all(isinstance(row, (list, tuple)) and row and all(number(x) for x in row) for row in v):
                return False
            lengths = {len(row) for row in v}
            known = isinstance(native.num_experts, int) and native.num_experts < ANY_NUM_EXPERTS
            return len(lengths) == 1 and (not known or lengths == {native.num_experts})
        return all(number(x) for x in v)

    def describe(n: NativeRouting) -> str:
        if not per_expert:
            return "None or a non-empty list with a number per MoE layer (no NaN)"
        known = isinstance(n.num_experts, int) and n.num_experts < ANY_NUM_EXPERTS
        size = f"N = {n.num_experts}" if known else "N"
        return f"None or a non-empty list with a list of {size} numbers per MoE layer (N experts; no NaN)"

    return Option(check, describe)


def experts_count() -> Option:
    """An integer number of experts in ``[0, N]``."""

    def check(v: Any, native: NativeRouting) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= native.num_experts

    return Option(check, lambda n: f"an integer in [0, {n.num_experts}] (N experts)")


def experts_per_token(none: str) -> Option:
    """None or an integer number of experts per token in ``[1, N]``; ``none`` says what None
    means and may name the native k as ``{k}``."""

    def check(v: Any, native: NativeRouting) -> bool:
        if v is None:
            return True
        return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= native.num_experts

    return Option(
        check,
        lambda n: f"None ({none.format(k=n.top_k)}) or an integer in [1, {n.num_experts}] (N experts)",
    )


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
                valid = f"Valid options: {', '.join(sorted(fields))}." if fields else f"{cls.name!r} takes no options."
                raise InvalidOptionError(f"Unknown option {key!r} for routing method {cls.name!r}.{extra} {valid}")
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

    def routes_natively(self, training: bool) -> bool:
        """Whether every call in this mode is the native router's, exactly (then the patch needs
        no batch layout and the experts no pair dispatch: nothing data-dependent runs, so such
        forwards compile like the native model's)."""
        return False

    def route(self, call: RouterCall) -> RouterOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    # --- calibration (causal routers with fitted thresholds; see Thresholded) -----------------

    def needs_calibration(self) -> bool:
        """Whether :func:`~hf_moe_patch.patch` must calibrate this routing on text first."""
        return False

    def validate_layers(self, num_layers: int) -> None:
        """Check options that depend on the model's number of MoE layers. Default: none."""

    def _raise(self, key: str, value: Any, valid: str) -> None:
        raise InvalidOptionError(f"Invalid value for option {key!r} of routing method {self.name!r}: {value!r}. Valid: {valid}.")


class Thresholded(RoutingMethod):
    """A method with a causal mode that routes each token against calibrated thresholds.

    Subclasses are dataclasses with the fields ``causal``, ``thresholds`` and
    ``calibration_info``, and implement :meth:`calibration_cells` (the scores of a router call's
    valid tokens), :meth:`threshold_from_cells` (a layer's threshold from all its calibration
    cells) and :meth:`calibrated_for` (the options the thresholds depend on).
    :func:`hf_moe_patch.calibration.calibrate` fits the thresholds layer by layer.
    """

    INFO_OPTION: ClassVar[Option] = Option(
        lambda v, _: v is None or isinstance(v, dict), "None or the dict a calibration writes"
    )
    causal: bool
    thresholds: list | None
    calibration_info: dict[str, Any] | None

    def calibration_cells(self, call: RouterCall) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def threshold_from_cells(self, cells: torch.Tensor, native: NativeRouting) -> Any:  # pragma: no cover
        raise NotImplementedError

    def calibrated_for(self, native: NativeRouting) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def needs_calibration(self) -> bool:
        return bool(self.causal) and self.thresholds is None

    def threshold(self, layer: int) -> Any:
        """This MoE layer's threshold (the calibration fills them in layer order)."""
        return self.thresholds[layer]  # type: ignore[index]

    def with_thresholds(self, thresholds: list, info: dict[str, Any]) -> "Thresholded":
        """A copy with calibrated thresholds and the record of their calibration."""
        return dataclasses.replace(self, thresholds=list(thresholds), calibration_info=info)  # type: ignore[type-var]

    def validate(self, native: NativeRouting) -> None:
        super().validate(native)
        self._invalid_without_causal("thresholds", self.thresholds is not None)
        self._invalid_without_causal("calibration_info", self.calibration_info is not None)
        info = self.calibration_info
        if info is not None and "calibrated_for" in info:
            wanted = self.calibrated_for(native)
            if info["calibrated_for"] != wanted:
                raise InvalidOptionError(
                    f"The thresholds of routing method {self.name!r} were calibrated for "
                    f"{info['calibrated_for']}, not for {wanted}: recalibrate (calibration=...) for these options."
                )

    def validate_layers(self, num_layers: int) -> None:
        if self.thresholds is not None and len(self.thresholds) != num_layers:
            self._raise("thresholds", f"<{len(self.thresholds)} layers>", f"one entry per MoE layer: {num_layers}")

    def _invalid_without_causal(self, key: str, given: bool) -> None:
        if given and not self.causal:
            self._raise(key, getattr(self, key), "only with causal=True (leave it unset otherwise)")

    def _invalid_with_causal(self, key: str, given: bool, why: str) -> None:
        if given:
            self._raise(key, getattr(self, key), f"its default with causal=True ({why})")
