"""Side-by-side routing comparisons: run one model under several routings, tabulate, plot."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .patching import patched
from .stats import collect_stats

logger = logging.getLogger(__name__)

COLUMNS = (
    ("experts_per_token_mean", "experts/token"),
    ("tokens_without_expert_frac", "no-expert tokens"),
    ("maxvio_top1", "MaxVio top-1"),
    ("maxvio", "MaxVio all"),
    ("cv", "CV load"),
    ("router_entropy", "router entropy"),
    ("sinkhorn_steps", "Sinkhorn calls"),
    ("kl_to_native", "KL(native || method)"),
)


@dataclass
class RoutingCase:
    """One routing to compare: a label, a method name and its options."""

    label: str
    method: str
    options: dict[str, Any]


def slug(text: str) -> str:
    """``text`` made safe for a file or folder name (runs of other characters become ``-``).

    Example:
        >>> slug("usmoe:top_k=1.5,scope=batch")
        'usmoe-top_k=1.5-scope=batch'
    """
    return re.sub(r"[^A-Za-z0-9_.=-]+", "-", text).strip("-")


def parse_case(text: str) -> RoutingCase:
    """Parse ``"usmoe:top_k=4,alpha=0.3"`` into a :class:`RoutingCase` (values as JSON, else str).

    Example:
        >>> parse_case("usmoe:top_k=1.5,scope=batch").options
        {'top_k': 1.5, 'scope': 'batch'}
    """
    import json

    method, _, rest = text.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"Option {item!r} in {text!r} is not of the form key=value.")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value.strip()
    return RoutingCase(text, method.strip(), options)


@torch.no_grad()
def compare_routings(
    model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], cases: Iterable[RoutingCase]
) -> list[dict[str, Any]]:
    """Run ``batches`` through ``model`` under each routing; return one summary row per case.

    Each row holds :meth:`RoutingStats.summary` plus ``kl_to_native``: the mean over valid tokens
    of KL(native next-token distribution || patched one), which measures how far the routing moves
    the model's predictions.

    Example:
        >>> rows = compare_routings(model, [batch], [parse_case("topk"), parse_case("usmoe")])  # doctest: +SKIP
    """
    native = [torch.log_softmax(model(**b).logits.float(), dim=-1) for b in batches]
    rows = []
    for case in tqdm(list(cases), desc="routings", unit="method"):
        with patched(model, case.method, **case.options), collect_stats(model) as stats:
            kl_sum, count = 0.0, 0
            for b, ref in zip(batches, native):
                out = torch.log_softmax(model(**b).logits.float(), dim=-1)
                kl = (ref.exp() * (ref - out)).sum(-1)
                mask = b.get("attention_mask")
                keep = mask.bool() if mask is not None else torch.ones_like(kl, dtype=torch.bool)
                kl_sum += float(kl[keep].sum())
                count += int(keep.sum())
        rows.append({"label": case.label, "method": case.method, "options": case.options,
                     **stats.summary(), "kl_to_native": kl_sum / max(count, 1), "layers": stats.to_dict()["layers"]})
        logger.info("%s: %s", case.label, {k: rows[-1][k] for k, _ in COLUMNS})
    return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The summary rows as a markdown table."""
    head = "| routing | " + " | ".join(title for _, title in COLUMNS) + " |"
    sep = "|---|" + "---:|" * len(COLUMNS)
    lines = [head, sep]
    for row in rows:
        cells = [_fmt(row[k]) for k, _ in COLUMNS]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2e}" if 0 < abs(value) < 1e-2 else f"{value:.3f}"
    return str(value)


def plot_load(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """A PNG with, per routing, the tokens-per-expert of every layer (sorted, normalised by the
    mean load) and the experts-per-token histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for row in rows:
        loads = [torch.tensor(layer["tokens_per_expert"], dtype=torch.float) for layer in row["layers"]]
        load = torch.stack(loads).mean(0)
        load = (load / load.mean().clamp_min(1e-9)).sort(descending=True).values
        axes[0].plot(range(len(load)), load.tolist(), marker=".", label=row["label"])
        hist = torch.tensor([layer["experts_per_token_hist"] for layer in row["layers"]], dtype=torch.float).sum(0)
        axes[1].plot(range(len(hist)), (hist / hist.sum().clamp_min(1)).tolist(), marker="o", label=row["label"])
    axes[0].axhline(1.0, color="grey", lw=0.8, ls="--")
    axes[0].set(title="Expert load (sorted, / mean), mean over layers", xlabel="expert rank", ylabel="load / mean load")
    axes[1].set(title="Experts per token", xlabel="experts", ylabel="share of tokens")
    axes[1].legend(fontsize=8)
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    """Lay out ``fig``, write it as a PNG to ``path`` (creating folders) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
