"""Calibrating causal routers: fit each MoE layer's thresholds on text, layer by layer.

A causal router (``"usmoe"`` or ``"expert_choice"`` with ``causal=True``) routes each token
against fixed thresholds, one set per MoE layer. Layer ``l``'s thresholds are fitted on the
scores its router sees when layers ``0 .. l-1`` already route with their own calibrated
thresholds, so the budget holds on the calibration text for the routing that will actually run,
not for the native one. That takes one (truncated) forward per layer and batch: the forward
stops right after layer ``l``'s router has handed over its scores.

The calibration input is read and checked before any forward (:func:`calibration_data`), and
its size and a fingerprint are recorded with the thresholds, so a saved routing says what it was
calibrated on.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import InvalidOptionError
from .methods.base import NativeRouting, RouterCall, RouterOutput, RoutingMethod, Thresholded

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_LENGTH = 512


@dataclass
class CalibrationData:
    """Tokenized calibration batches, with their size and fingerprint.

    Attributes:
        batches: dicts with ``input_ids`` and ``attention_mask``, ``(B, L)`` long tensors.
        tokens: valid (non-padding) tokens over all batches.
        sequences: rows with at least one valid token.
        fingerprint: SHA-256 (first 16 hex digits) of every row's valid token ids, in order.
    """

    batches: list[dict[str, torch.Tensor]]
    tokens: int = 0
    sequences: int = 0
    fingerprint: str = ""

    def __post_init__(self) -> None:
        digest = hashlib.sha256()
        for batch in self.batches:
            ids, mask = batch["input_ids"], batch["attention_mask"].bool()
            for row, keep in zip(ids, mask):
                if bool(keep.any()):
                    digest.update(row[keep].to(torch.int64).cpu().numpy().tobytes())
                    digest.update(b"|")
                    self.sequences += 1
            self.tokens += int(mask.sum())
        self.fingerprint = digest.hexdigest()[:16]

    def info(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "sequences": self.sequences, "fingerprint": self.fingerprint}


def calibration_data(
    calibration: Any,
    tokenizer: Any = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> CalibrationData:
    """Read ``calibration`` into tokenized batches, checking it before any model work.

    ``calibration`` is a tokenized batch (a mapping with ``input_ids`` and, optionally,
    ``attention_mask``), an iterable of such batches (a DataLoader, a list), or a list of strings
    together with ``tokenizer`` (tokenized ``batch_size`` at a time, truncated to
    ``max_length`` tokens).

    Example:
        >>> data = calibration_data({"input_ids": torch.tensor([[5, 6, 7]])})
        >>> data.tokens, data.sequences
        (3, 1)
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise InvalidOptionError(f"calibration_batch_size={batch_size!r} is not valid; valid: an integer >= 1")
    if isinstance(calibration, (str, bytes)):
        raise InvalidOptionError(
            "calibration= got one string; pass a list of strings (with tokenizer=), a tokenized batch "
            "(a dict with 'input_ids' and 'attention_mask') or an iterable of such batches."
        )
    if isinstance(calibration, Mapping):
        batches = [_batch(calibration, 0)]
    elif isinstance(calibration, Iterable):
        items = list(calibration)
        if items and all(isinstance(x, str) for x in items):
            batches = _tokenize(items, tokenizer, batch_size, max_length)
        elif all(isinstance(x, Mapping) for x in items):
            batches = [_batch(x, i) for i, x in enumerate(items)]
        else:
            kinds = sorted({type(x).__name__ for x in items})
            raise InvalidOptionError(
                f"calibration= holds {', '.join(kinds)}; expected all strings (with tokenizer=) or all tokenized "
                "batches (dicts with 'input_ids' and 'attention_mask')."
            )
    else:
        raise InvalidOptionError(
            f"calibration= got {type(calibration).__name__}; expected a list of strings (with tokenizer=), a "
            "tokenized batch (a dict with 'input_ids' and 'attention_mask') or an iterable of such batches."
        )
    data = CalibrationData(batches)
    if data.tokens == 0:
        raise InvalidOptionError("calibration= holds no valid (non-padding) token: there is nothing to calibrate on.")
    return data


def _tokenize(texts: list[str], tokenizer: Any, batch_size: int, max_length: int) -> list[dict[str, torch.Tensor]]:
    if tokenizer is None:
        raise InvalidOptionError("calibration= is a list of strings: pass tokenizer= too (the model's tokenizer).")
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
        raise InvalidOptionError(f"calibration_max_length={max_length!r} is not valid; valid: an integer >= 1")
    if getattr(tokenizer, "pad_token", "") is None:
        raise InvalidOptionError(
            "the tokenizer has no pad token, so strings cannot be batched; set tokenizer.pad_token (e.g. to "
            "tokenizer.eos_token) or pass tokenized batches."
        )
    texts = [t for t in texts if t.strip()]
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length)
        out.append(_batch(enc, len(out)))
    return out


def _batch(batch: Mapping, position: int) -> dict[str, torch.Tensor]:
    if "input_ids" not in batch:
        raise InvalidOptionError(f"calibration batch {position} has no 'input_ids' (keys: {sorted(batch)})")
    ids = torch.as_tensor(batch["input_ids"])
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask)
    if mask.dim() == 1:
        mask = mask.unsqueeze(0)
    if ids.dim() != 2 or mask.shape != ids.shape or ids.dtype.is_floating_point:
        raise InvalidOptionError(
            f"calibration batch {position}: input_ids must be (batch, length) integers and attention_mask the same "
            f"shape; got {tuple(ids.shape)} {ids.dtype} and {tuple(mask.shape)}"
        )
    return {"input_ids": ids.long(), "attention_mask": mask.long()}


class _StopForward(Exception):
    """Raised by the probe once its layer has handed over its scores: the rest is not needed."""


@dataclass
class _Probe(RoutingMethod):
    """Routes layers before ``layer`` with the calibrated thresholds so far, hands over the
    scores of ``layer``'s valid tokens, and stops the forward there."""

    inner: Thresholded = None  # type: ignore[assignment]
    layer: int = 0
    cells: list[torch.Tensor] = field(default_factory=list)

    uses_empty_slots = True

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.inner.name

    def options(self) -> dict[str, Any]:
        return self.inner.options()

    def route(self, call: RouterCall) -> RouterOutput:
        if call.layer < self.layer:
            return self.inner.route(call)
        self.cells.append(self.inner.calibration_cells(call).detach().float().cpu())
        raise _StopForward


def calibrate(
    model: nn.Module,
    base: nn.Module,
    routing: Thresholded,
    native: NativeRouting,
    num_layers: int,
    data: CalibrationData,
    install: Callable[[RoutingMethod], None],
    remove: Callable[[], None],
) -> Thresholded:
    """Fit ``routing``'s thresholds on ``data``, layer by layer; returns the calibrated routing.

    ``install(method)`` patches the model with a routing method and ``remove()`` takes it off
    (the patching machinery's own verbs). The model runs in eval mode without gradients and is
    left as it was (training flags included).
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    device = next((p.device for p in base.parameters()), torch.device("cpu"))
    thresholds: list[Any] = []
    bar = tqdm(total=num_layers * len(data.batches), desc=f"calibrating {routing.name}", unit="batch", disable=None)
    try:
        with torch.no_grad():
            for layer in range(num_layers):
                probe = _Probe(inner=routing.with_thresholds(thresholds, {}), layer=layer)
                install(probe)
                try:
                    for batch in data.batches:
                        _forward(base, batch, device)
                        bar.update(1)
                finally:
                    remove()
                cells = torch.cat(probe.cells)
                thresholds.append(routing.threshold_from_cells(cells, native))
                bar.set_postfix(layer=layer)
    finally:
        bar.close()
        for module, mode in modes:
            module.training = mode
    info = {**data.info(), "calibrated_for": routing.calibrated_for(native)}
    logger.info("calibrated %s on %d tokens (%s): %d layers", routing.name, data.tokens, data.fingerprint, num_layers)
    return routing.with_thresholds(thresholds, info)


def _forward(base: nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> None:
    ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device)
    # Positions from the mask, as generate() computes them: left padding does not shift them.
    positions = (mask.cumsum(dim=-1) - 1).clamp_min(0)
    try:
        base(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
    except _StopForward:
        return
    raise RuntimeError("calibration: the probed MoE layer was never reached in the forward")  # pragma: no cover


__all__ = ["CalibrationData", "calibrate", "calibration_data"]
