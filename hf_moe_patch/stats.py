"""Routing statistics, collected with forward hooks on the routers while a ``with`` block runs.

Nothing is installed outside the block, so collection costs nothing when not collecting. The
collector reads what each router returns (``(logits, weights, index)``, sentinel ``N`` for empty
slots), so it measures native and patched routers alike; padding tokens are left out.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .families import family_of
from .layout import ForwardArguments, LayoutHook, LayoutRelease, LayoutSlot
from .patching import RECORD_ATTR, find_base_model, find_record, find_sites, layer_number


def max_violation(load: torch.Tensor) -> float:
    """MaxVio: ``max load / mean load - 1`` (0 is perfect balance; 0 for no load at all).

    Example:
        >>> max_violation(torch.tensor([3.0, 1.0]))
        0.5
    """
    mean = float(load.float().mean())
    return float(load.max()) / mean - 1.0 if mean > 0 else 0.0


def coefficient_of_variation(load: torch.Tensor) -> float:
    """Standard deviation over mean of the per-expert load (population std).

    Example:
        >>> coefficient_of_variation(torch.tensor([3.0, 1.0]))
        0.5
    """
    load = load.float()
    mean = float(load.mean())
    return float(load.std(unbiased=False)) / mean if mean > 0 else 0.0


@dataclass
class LayerStats:
    """Accumulated routing facts of one MoE layer."""

    name: str
    layer: int | None
    num_experts: int
    tokens: int = 0
    calls: int = 0
    load: torch.Tensor = field(default=None)  # type: ignore[assignment]  (N,) all choices
    top1_load: torch.Tensor = field(default=None)  # type: ignore[assignment]  (N,)
    experts_hist: torch.Tensor = field(default=None)  # type: ignore[assignment]  (N+1,)
    entropy_sum: float = 0.0
    sinkhorn_steps: int = 0
    sinkhorn_iterations: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = self.num_experts
        self.load = torch.zeros(n, dtype=torch.long)
        self.top1_load = torch.zeros(n, dtype=torch.long)
        self.experts_hist = torch.zeros(n + 1, dtype=torch.long)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, weights: torch.Tensor, index: torch.Tensor, valid: torch.Tensor | None, info: dict) -> None:
        n = self.num_experts
        logits, weights, index = logits.reshape(-1, n), weights.reshape(index.shape[0], -1), index.reshape(index.shape[0], -1)
        if valid is not None:
            keep = valid.reshape(-1).to(index.device)
            logits, weights, index = logits[keep], weights[keep], index[keep]
        real = index < n
        counts = real.sum(dim=1)
        self.calls += 1
        self.tokens += int(index.shape[0])
        self.load += torch.bincount(index[real].cpu(), minlength=n)[:n]
        best = weights.float().masked_fill(~real, float("-inf")).argmax(dim=1, keepdim=True)
        top1 = index.gather(1, best).squeeze(1)[counts > 0]
        self.top1_load += torch.bincount(top1.cpu(), minlength=n)[:n]
        self.experts_hist += torch.bincount(counts.cpu(), minlength=n + 1)[: n + 1]
        log_p = torch.log_softmax(logits.float(), dim=-1)
        self.entropy_sum += float(-(log_p.exp() * log_p).sum())
        if info.get("sinkhorn"):
            self.sinkhorn_steps += 1
            self.sinkhorn_iterations.append(int(info["iterations"]))

    def to_dict(self) -> dict[str, Any]:
        tokens = max(self.tokens, 1)
        hist = self.experts_hist.tolist()
        return {
            "name": self.name,
            "layer": self.layer,
            "calls": self.calls,
            "tokens": self.tokens,
            "tokens_per_expert": self.load.tolist(),
            "top1_tokens_per_expert": self.top1_load.tolist(),
            "experts_per_token_mean": float(sum(k * c for k, c in enumerate(hist))) / tokens,
            "experts_per_token_hist": hist,
            "tokens_without_expert": hist[0],
            "maxvio_top1": max_violation(self.top1_load),
            "maxvio": max_violation(self.load),
            "cv": coefficient_of_variation(self.load),
            "router_entropy": self.entropy_sum / tokens,
            "sinkhorn_steps": self.sinkhorn_steps,
            "sinkhorn_iterations": list(self.sinkhorn_iterations),
        }


class RoutingStats:
    """Per-layer routing statistics gathered by :func:`collect_stats`.

    Example:
        >>> with hmp.collect_stats(model) as stats:  # doctest: +SKIP
        ...     model(**batch)
        >>> stats.summary()["maxvio"]  # doctest: +SKIP
    """

    def __init__(self, layers: list[LayerStats], method: str | None) -> None:
        self.layers = layers
        self.method = method

    def summary(self) -> dict[str, float | None]:
        """Means over layers of the scalar statistics, plus totals of Sinkhorn steps."""
        dicts = [layer.to_dict() for layer in self.layers]
        keys = ("experts_per_token_mean", "maxvio_top1", "maxvio", "cv", "router_entropy")
        out: dict[str, float] = {k: sum(d[k] for d in dicts) / max(len(dicts), 1) for k in keys}
        tokens = sum(d["tokens"] for d in dicts)
        out["tokens_without_expert_frac"] = sum(d["tokens_without_expert"] for d in dicts) / max(tokens, 1)
        out["sinkhorn_steps"] = sum(d["sinkhorn_steps"] for d in dicts)
        iters = [i for d in dicts for i in d["sinkhorn_iterations"]]
        # None, not NaN, when no Sinkhorn step ran: NaN is not valid JSON.
        out["sinkhorn_iterations_mean"] = sum(iters) / len(iters) if iters else None
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "summary": self.summary(), "layers": [layer.to_dict() for layer in self.layers]}

    def to_json(self, path: str | Path | None = None, **kwargs: Any) -> str:
        """The statistics as JSON; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=kwargs.pop("indent", 2), **kwargs)
        if path is not None:
            Path(path).write_text(text)
        return text


@contextlib.contextmanager
def collect_stats(model: nn.Module) -> Iterator[RoutingStats]:
    """Record routing statistics of every MoE layer of ``model`` inside the block.

    Works on patched and unpatched supported models. Padding tokens (from the attention mask)
    are not counted.

    Example:
        >>> with hmp.collect_stats(model) as stats:  # doctest: +SKIP
        ...     model(**batch)
        >>> stats.to_json("stats.json")  # doctest: +SKIP
    """
    family = family_of(model)
    record = find_record(model)
    sites = find_sites(model, family)
    base = find_base_model(model, family)
    # Our own layout per forward, whatever the patch (or none) reads: padding is never counted.
    slot = LayoutSlot()
    handles = [
        base.register_forward_pre_hook(LayoutHook(slot, ForwardArguments.of(base)), with_kwargs=True),
        base.register_forward_hook(LayoutRelease(slot), with_kwargs=True, always_call=True),
    ]
    layers = []
    for site in sites:
        layer = LayerStats(site.name, layer_number(site.name), int(site.router.num_experts))
        layers.append(layer)

        def hook(module: nn.Module, args: tuple, output: tuple, layer: LayerStats = layer, position: int = site.layer) -> None:
            logits, weights, index = output[0], output[1], output[2]
            step = slot.current()
            valid = step.valid if step is not None else None
            if valid is not None and valid.numel() != index.shape[0]:
                valid = None
            # What the routing method noted for this layer (Sinkhorn iterations...), if patched.
            active = base.__dict__.get(RECORD_ATTR)
            active_step = active.slot.current() if active is not None else None
            info = active_step.info.get(position, {}) if active_step is not None else {}
            layer.update(logits, weights, index, valid, info)

        handles.append(site.router.register_forward_hook(hook))
    stats = RoutingStats(layers, record.method.name if record is not None else None)
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()
