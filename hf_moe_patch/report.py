"""Side-by-side routing comparisons: run one model under several routings, tabulate, plot.

Progress lines (one per routing, ``[i/n] label ...``) go to the ``hf_moe_patch.progress`` logger
at INFO, which the command line shows; library users see them once they configure logging.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from .patching import patched
from .stats import collect_stats

logger = logging.getLogger(__name__)
progress_logger = logging.getLogger("hf_moe_patch.progress")

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
# What each column is, for the legend under the table.
COLUMN_NOTES = (
    "experts/token: (token, expert) pairs selected per valid token (the expert compute); "
    "no-expert tokens: share of valid tokens that got no routed expert; "
    "MaxVio: max expert load / mean load - 1 (top-1: first choices only; all: every choice); "
    "CV load: coefficient of variation of the expert load; router entropy: mean entropy of the router's softmax; "
    "Sinkhorn calls: router calls that routed by the Sinkhorn plan, summed over layers; "
    "KL(native || method): mean over valid tokens of the KL divergence of the method's next-token "
    "distribution from the native model's. The other columns are means over MoE layers."
)


def escape_cell(text: Any) -> str:
    """``text`` safe inside a markdown table cell: ``|`` escaped, line breaks as spaces.

    Example:
        >>> print(escape_cell("KL(native || method)"))
        KL(native \\|\\| method)
    """
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def format_duration(seconds: float) -> str:
    """``"45s"``, ``"2m 05s"``, ``"1h 02m"``.

    Example:
        >>> format_duration(45.2), format_duration(125), format_duration(3725)
        ('45s', '2m 05s', '1h 02m')
    """
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


@dataclass
class RoutingCase:
    """One routing to compare: a label, a method name and its options."""

    label: str
    method: str
    options: dict[str, Any]


def needs_calibration(case: RoutingCase) -> bool:
    """Whether ``case`` is a causal routing without thresholds, which needs text to calibrate on.

    Example:
        >>> needs_calibration(parse_case("usmoe:causal=true")), needs_calibration(parse_case("usmoe"))
        (True, False)
    """
    from .methods import build_method

    return build_method(case.method, case.options).needs_calibration()


def calibrate_cases(model: nn.Module, cases: Iterable[RoutingCase], calibration: Any = None, tokenizer: Any = None,
                    **calibration_kwargs: Any) -> list[RoutingCase]:
    """Fit the thresholds of every causal case that has none (``causal=True`` without
    ``thresholds``) on ``calibration`` (see :func:`~hf_moe_patch.patch`); other cases pass
    unchanged. The model is left as it was. Cases can then run without the text.

    Example:
        >>> cases = calibrate_cases(model, [parse_case("usmoe:causal=true,top_k=2")], texts, tokenizer)  # doctest: +SKIP
        >>> len(cases[0].options["thresholds"]) == model.config.num_hidden_layers  # doctest: +SKIP
        True
    """
    from .patching import routing_config

    out = []
    for case in cases:
        if not needs_calibration(case):
            out.append(case)
            continue
        progress_logger.info("calibrating %s", case.label)
        with patched(model, case.method, calibration=calibration, tokenizer=tokenizer, **calibration_kwargs,
                     **case.options):
            config = routing_config(model) or {}
        options = {**case.options, "thresholds": config["thresholds"], "calibration_info": config["calibration_info"]}
        out.append(RoutingCase(case.label, case.method, options))
    return out


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
    import time

    native = [torch.log_softmax(model(**b).logits.float(), dim=-1) for b in batches]
    rows = []
    cases = list(cases)
    started = time.perf_counter()
    for index, case in enumerate(cases, 1):
        progress_logger.info("[%d/%d] routing statistics of %s (elapsed %s)", index, len(cases), case.label,
                             format_duration(time.perf_counter() - started))
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


def markdown_table(rows: Sequence[dict[str, Any]], source: str | None = None) -> str:
    """The summary rows as a markdown table, with a legend of the columns; ``source`` says which
    texts the statistics come from.

    Example:
        >>> print(markdown_table([]).splitlines()[0])  # doctest: +NORMALIZE_WHITESPACE
        | routing | experts/token | no-expert tokens | MaxVio top-1 | MaxVio all | CV load | router entropy | Sinkhorn calls | KL(native \\|\\| method) |
    """
    head = "| routing | " + " | ".join(escape_cell(title) for _, title in COLUMNS) + " |"
    sep = "|---|" + "---:|" * len(COLUMNS)
    lines = [head, sep]
    for row in rows:
        cells = [_fmt(row[k]) for k, _ in COLUMNS]
        lines.append(f"| {escape_cell(row['label'])} | " + " | ".join(cells) + " |")
    lines += ["", (f"Statistics over {source}. " if source else "") + COLUMN_NOTES]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2e}" if 0 < abs(value) < 1e-2 else f"{value:.3f}"
    return str(value)


LINESTYLES = ("-", "--", ":", "-.")
MARKERS = "osD^vP*Xh<>p"


def load_figure(rows: Sequence[dict[str, Any]], source: str | None = None):
    """The figure of :func:`plot_load`: per routing, the tokens-per-expert of every layer (sorted,
    normalised by the mean load, mean over layers; left) and the experts-per-token histogram as
    grouped bars (right). Curves that coincide stay visible (own line style and marker, drawn
    thinner on top) and the legend says which routing they equal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(rows)
    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.0))
    curves, hists = [], []
    for row in rows:
        loads = [torch.tensor(layer["tokens_per_expert"], dtype=torch.float) for layer in row["layers"]]
        load = torch.stack(loads).mean(0)
        curves.append((load / load.mean().clamp_min(1e-9)).sort(descending=True).values.tolist())
        hist = torch.tensor([layer["experts_per_token_hist"] for layer in row["layers"]], dtype=torch.float).sum(0)
        hists.append((hist / hist.sum().clamp_min(1)).tolist())
    width = 0.8 / max(n, 1)
    handles, labels = [], []
    for i, row in enumerate(rows):
        same = next((rows[j]["label"] for j in range(i) if curves[j] == curves[i]), None)
        label = row["label"] + (f" (load as {same})" if same else "")
        color = cmap(i % cmap.N)
        (line,) = axes[0].plot(range(len(curves[i])), curves[i], color=color, linestyle=LINESTYLES[i % len(LINESTYLES)],
                               marker=MARKERS[i % len(MARKERS)], markersize=5, markerfacecolor="none",
                               linewidth=max(3.0 - 0.4 * i, 1.0), zorder=2 + i, label=label)
        xs = [k + (i - (n - 1) / 2) * width for k in range(len(hists[i]))]
        axes[1].bar(xs, hists[i], width, color=color)
        handles.append(line)
        labels.append(label)
    axes[0].axhline(1.0, color="grey", lw=0.8, ls="--", zorder=1)
    axes[0].set(title="Expert load (sorted, / mean), mean over layers", xlabel="expert rank", ylabel="load / mean load")
    size = max((len(h) for h in hists), default=0)
    axes[1].set_xticks(range(size))
    axes[1].set(title="Experts per token", xlabel="experts", ylabel="share of tokens")
    if source:
        fig.suptitle(f"Routing statistics over {source}", fontsize=10)
    ncol = legend_columns(n, 4)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04 + 0.045 * -(-n // ncol), 1, 0.95 if source else 1))
    return fig


def legend_columns(n: int, most: int) -> int:
    """Columns for a legend of ``n`` entries, at most ``most``, rows filled evenly (6 in 3 x 2, not
    4 + 2).

    Example:
        >>> legend_columns(6, 4), legend_columns(4, 4), legend_columns(9, 4)
        (3, 4, 3)
    """
    rows = -(-n // max(most, 1))
    return max(1, -(-n // max(rows, 1)))


def plot_load(rows: Sequence[dict[str, Any]], path: str | Path, source: str | None = None) -> Path:
    """A PNG with, per routing, the tokens-per-expert of every layer (sorted, normalised by the
    mean load) and the experts-per-token histogram (:func:`load_figure`)."""
    return save_figure(load_figure(rows, source), path, layout=False)


def save_figure(fig, path: str | Path, layout: bool = True) -> Path:
    """Lay out ``fig`` (unless ``layout=False``: already laid out), write it as a PNG to ``path``
    (creating folders) and close it."""
    import matplotlib.pyplot as plt

    if layout:
        fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
