"""Routers compared on equal terms: the same fine-tuning run once per routing, one table.

Each case is ``METHOD[:key=value,...]`` as elsewhere, plus the run-level key ``aux_loss``
(``"on"``, ``"off"``, ``"auto"``), so ``topk:aux_loss=off`` is top-k trained without the
auxiliary loss. Every other setting (model, data, seed, steps, adapters) is shared.

Example:
    >>> from hf_moe_patch.training.sft import SFTConfig
    >>> report = compare_sft(SFTConfig(max_steps=100), DEFAULT_CASES, "sft_compare")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Sequence

from ..report import parse_case, progress_logger, save_figure, slug
from .sft import SFTConfig, run_sft

logger = logging.getLogger(__name__)

DEFAULT_CASES = ["topk", "topk:aux_loss=off", "ssr", "ssr:p=1", "usmoe", "expert_choice"]


def case_config(base: SFTConfig, spec: str, out_dir: str | Path) -> SFTConfig:
    """``base`` with the routing (and ``aux_loss``) of ``spec``, writing to ``out_dir/<spec>``.

    Example:
        >>> c = case_config(SFTConfig(), "topk:aux_loss=off", "runs")
        >>> c.method, c.options, c.aux_loss, c.output_dir
        ('topk', {}, 'off', 'runs/topk-aux_loss=off')
    """
    case = parse_case(spec)
    options = dict(case.options)
    aux = options.pop("aux_loss", base.aux_loss)
    folder = slug(spec)
    return dataclasses.replace(base, method=case.method, options=options, aux_loss=aux,
                               output_dir=str(Path(out_dir) / folder), resume_from_checkpoint=None)


def markdown(rows: Sequence[dict[str, Any]], baseline: str | None) -> str:
    """One row per routing: clean and corrupted validation perplexity, balance, step time."""
    base = next((r for r in rows if r["label"] == baseline), None)
    head = ("| routing | aux loss | train loss first -> last | val ppl clean | val ppl corrupted | "
            "MaxVio top-1 | MaxVio top-k | Sinkhorn step share | step time vs baseline |")
    lines = [head, "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        routing = r["routing"]
        ratio = f"{r['seconds_per_step'] / base['seconds_per_step']:.2f}x" if base else "-"
        lines.append(
            f"| {r['label']} | {'on' if r['aux_loss'] else 'off'} | {_num(r['train_loss_first'])} -> {_num(r['train_loss_last'])} | "
            f"{r['validation_perplexity']:.3f} | {r['validation_perplexity_corrupted']:.3f} | "
            f"{routing.get('maxvio_top1', float('nan')):.2f} | {routing.get('maxvio', float('nan')):.2f} | "
            f"{routing.get('sinkhorn_step_fraction', 0.0):.3f} | {ratio} |"
        )
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def plot(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """PNG: validation perplexity clean/corrupted per routing (left), MaxVio top-1 (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["label"] for r in rows]
    xs = range(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    axes[0].bar([x - 0.2 for x in xs], [r["validation_perplexity"] for r in rows], 0.4, label="clean")
    axes[0].bar([x + 0.2 for x in xs], [r["validation_perplexity_corrupted"] for r in rows], 0.4, label="corrupted")
    axes[0].set(title="Validation perplexity after fine-tuning", ylabel="perplexity")
    axes[0].legend(fontsize=8)
    axes[1].bar(xs, [r["routing"].get("maxvio_top1", 0.0) for r in rows])
    axes[1].set(title="Load imbalance during training (MaxVio top-1)", ylabel="MaxVio")
    for ax in axes:
        ax.set_xticks(list(xs), labels, rotation=20, ha="right", fontsize=8)
    return save_figure(fig, path)


def compare_sft(base: SFTConfig, cases: Sequence[str] = DEFAULT_CASES, out_dir: str | Path = "sft_compare") -> dict[str, Any]:
    """Run ``base`` once per routing case; write ``comparison.{md,json,png}`` into ``out_dir``."""
    out = Path(out_dir)
    rows = []
    for index, spec in enumerate(cases, 1):
        config = case_config(base, spec, out)
        progress_logger.info("[%d/%d] fine-tuning with %s (into %s)", index, len(cases), spec, config.output_dir)
        rows.append({"label": spec, **run_sft(config)})
    baseline = cases[0] if cases else None
    out.mkdir(parents=True, exist_ok=True)
    report = {"base_config": base.to_dict(), "baseline": baseline, "runs": rows}
    (out / "comparison.json").write_text(json.dumps(report, indent=2, default=str))
    table = markdown(rows, baseline)
    (out / "comparison.md").write_text(f"# Fine-tuning {base.model} under each routing\n\n{table}\n")
    plot(rows, out / "comparison.png")
    report["markdown"] = table
    return report
