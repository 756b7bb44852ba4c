"""Routing statistics during ``transformers.Trainer`` training: a callback, a JSONL log and a plot.

:class:`RoutingStatsCallback` measures the routing of the training forwards with
:func:`hf_moe_patch.collect_stats` and, at every training log event, adds ``routing/...`` keys
(MaxVio top-1 and top-k, experts per token, CV, Sinkhorn steps and iterations, ...) to what the
Trainer logs; it also writes one JSON line per log event and, at the end of training, a PNG of
load balance over steps. :func:`add_routing_stats` puts it where the reporting integrations
(TensorBoard, W&B, ...) see its keys.

Example:
    >>> from transformers import Trainer  # doctest: +SKIP
    >>> trainer = Trainer(model=model, args=args, train_dataset=train)  # doctest: +SKIP
    >>> add_routing_stats(trainer, jsonl_path="out/routing_stats.jsonl", plot_path="out/routing_balance.png")  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
    >>> trainer.state.log_history[-2]["routing/maxvio"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..families import family_of
from ..stats import LayerStats, RoutingStats, collect_stats

logger = logging.getLogger(__name__)

__all__ = ["RoutingStatsCallback", "add_routing_stats", "plot_routing_history"]

# Keys of RoutingStats.summary() logged, and the names they are logged under (after the prefix).
_SUMMARY_KEYS = {
    "maxvio_top1": "maxvio_top1",
    "maxvio": "maxvio",
    "experts_per_token_mean": "experts_per_token",
    "cv": "cv",
    "router_entropy": "router_entropy",
    "tokens_without_expert_frac": "tokens_without_expert_frac",
    "sinkhorn_steps": "sinkhorn_steps",
    "sinkhorn_iterations_mean": "sinkhorn_iterations_mean",
}


class RoutingStatsCallback(TrainerCallback):
    """Log routing statistics of the training forwards at every Trainer log event.

    Between two training log events (a *logging window*) the callback records, with
    :func:`hf_moe_patch.collect_stats`, every router call of every training forward: it installs
    the collector's hooks in ``on_step_begin`` and removes them in ``on_step_end``, which bracket
    all gradient-accumulation micro-batches of an optimizer step and nothing else, so evaluation
    forwards (``trainer.evaluate()``, ``eval_strategy``) are never counted. Per-expert loads are
    summed over the window, so the statistics are exactly those ``collect_stats`` gives over the
    same forwards. At each training log event (the Trainer's periodic log with ``"loss"``, and the
    summary log at the end of ``train()`` with ``"train_runtime"`` if steps were run since the
    last log, so that ``train()``'s returned metrics hold them too; evaluation logs are left
    alone) it adds to the logs, with ``prefix="routing/"``:

    - ``routing/maxvio_top1``, ``routing/maxvio``: MaxVio of the top-1 and of all chosen experts,
      ``routing/cv``, ``routing/experts_per_token``, ``routing/router_entropy``,
      ``routing/tokens_without_expert_frac``: means over MoE layers (see ``RoutingStats.summary``);
    - ``routing/sinkhorn_steps``: router calls that took SSR's Sinkhorn branch in the window;
    - ``routing/sinkhorn_step_fraction``: share of the window's optimizer steps on which the
      Sinkhorn branch ran (a step counts if any router of any of its forwards did);
    - ``routing/sinkhorn_iterations_mean``: mean Sinkhorn iterations per Sinkhorn router call
      (left out of the logs when there was none: it would be None);
    - ``routing/tokens``: valid (non-padding) tokens routed per MoE layer in the window.

    The keys reach ``trainer.state.log_history`` in any case, and the reporting integrations
    (TensorBoard, W&B, ...) only when the callback runs before them: add it with
    :func:`add_routing_stats`, which puts it first in the Trainer's callback list (callbacks given
    as ``Trainer(callbacks=[...])`` run after the reporters, too late to add to their logs).

    On the main process (``state.is_world_process_zero``) it also writes one JSON line per log
    event to ``jsonl_path`` (``step``, ``epoch``, ``window_steps``, the statistics with None for
    missing values, and per-layer lists under ``"layers"``), and at the end of training a PNG of
    MaxVio over steps (and the Sinkhorn step fraction, if any) to ``plot_path``. The JSONL file is
    truncated when training starts from scratch; on resume, its lines up to the resumed step are
    kept and the new ones appended.

    Distributed training: each process sees only its own micro-batches. With ``sync_processes``
    (default) and ``torch.distributed`` initialised, the counts (per-expert loads, tokens,
    Sinkhorn calls and iterations, steps) are summed over processes at each log event (one
    ``all_reduce``), so every process logs the statistics of the global batch, and the Sinkhorn
    step fraction is the share of (process, step) pairs. With ``sync_processes=False`` each
    process logs its own, and the JSONL file and plot hold process 0's.

    Gradient checkpointing: the recomputation in the backward pass calls the routers again, so
    with it every router call is counted twice. The recomputation routes exactly as the first pass
    (see ``StepState``), so all ratios (MaxVio, CV, experts per token, entropy, fractions,
    iterations mean) are unchanged, but ``routing/sinkhorn_steps`` and ``routing/tokens`` double.

    Collection costs a few small host syncs per router call during training; the model is found
    again at every step, so patching or unpatching between steps is fine.

    Args:
        jsonl_path: file for one JSON line per log event, or None.
        plot_path: PNG written at the end of training, or None.
        prefix: prefix of the logged keys.
        sync_processes: sum the counts over processes when ``torch.distributed`` is initialised.

    Example:
        >>> cb = RoutingStatsCallback(jsonl_path="out/routing_stats.jsonl", plot_path="out/balance.png")
        >>> cb.prefix
        'routing/'
        >>> trainer = Trainer(model=model, args=args, train_dataset=train)  # doctest: +SKIP
        >>> add_routing_stats(trainer, cb)  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
        >>> cb.history[-1]["routing/maxvio"]  # doctest: +SKIP
    """

    def __init__(
        self,
        jsonl_path: str | Path | None = None,
        plot_path: str | Path | None = None,
        *,
        prefix: str = "routing/",
        sync_processes: bool = True,
    ) -> None:
        self.jsonl_path = Path(jsonl_path) if jsonl_path is not None else None
        self.plot_path = Path(plot_path) if plot_path is not None else None
        self.prefix = prefix
        self.sync_processes = sync_processes
        self.history: list[dict[str, Any]] = []  # one record per log event (what goes to the JSONL)
        self.placed_first = False  # set by add_routing_stats
        self._step_ctx: Any = None  # the open collect_stats context of the current optimizer step
        self._step_stats: RoutingStats | None = None
        self._reset_window()

    # --- window accounting -------------------------------------------------------------------

    def _reset_window(self) -> None:
        self._layers: dict[str, LayerStats] = {}
        self._method: str | None = None
        self._steps = 0
        self._sinkhorn_any_steps = 0

    def _open_step(self, model: torch.nn.Module) -> None:
        self._close_step()
        ctx = collect_stats(model)
        self._step_stats = ctx.__enter__()
        self._step_ctx = ctx

    def _close_step(self) -> None:
        """Remove the hooks of the open step, if any, and add its counts to the window."""
        ctx, stats = self._step_ctx, self._step_stats
        if ctx is None or stats is None:
            return
        self._step_ctx = self._step_stats = None
        ctx.__exit__(None, None, None)
        for layer in stats.layers:
            into = self._layers.get(layer.name)
            if into is None:
                into = self._layers[layer.name] = LayerStats(layer.name, layer.layer, layer.num_experts)
            _merge(into, layer)
        self._method = stats.method
        self._steps += 1
        self._sinkhorn_any_steps += int(any(layer.sinkhorn_steps > 0 for layer in stats.layers))

    def _window_record(self, args: TrainingArguments, state: TrainerState) -> dict[str, Any] | None:
        """The statistics of the window (summed over processes if asked), or None if it is empty."""
        layers = list(self._layers.values())
        steps, any_steps = self._steps, self._sinkhorn_any_steps
        iter_sums = [sum(layer.sinkhorn_iterations) for layer in layers]
        iter_counts = [len(layer.sinkhorn_iterations) for layer in layers]
        if steps == 0 or not layers:
            # Every process runs the same optimizer steps, so all skip the all_reduce together.
            return None
        if self.sync_processes and _world_size() > 1:
            layers, steps, any_steps, iter_sums, iter_counts = _reduce_window(
                layers, steps, any_steps, iter_sums, iter_counts, args.device
            )
        summary = RoutingStats(layers, self._method).summary()
        iterations = sum(iter_counts)
        summary["sinkhorn_iterations_mean"] = sum(iter_sums) / iterations if iterations else None
        p = self.prefix
        stats: dict[str, Any] = {p + name: summary[key] for key, name in _SUMMARY_KEYS.items()}
        stats[p + "sinkhorn_step_fraction"] = any_steps / steps
        stats[p + "tokens"] = _mean_int([layer.tokens for layer in layers])
        dicts = [layer.to_dict() for layer in layers]
        per_layer = {
            "name": [d["name"] for d in dicts],
            "layer": [d["layer"] for d in dicts],
            "maxvio_top1": [d["maxvio_top1"] for d in dicts],
            "maxvio": [d["maxvio"] for d in dicts],
            "experts_per_token": [d["experts_per_token_mean"] for d in dicts],
            "cv": [d["cv"] for d in dicts],
            "sinkhorn_steps": [d["sinkhorn_steps"] for d in dicts],
        }
        return {
            "step": state.global_step,
            "epoch": state.epoch,
            "method": self._method,
            "window_steps": self._steps,  # optimizer steps (not summed over processes)
            **stats,
            "layers": per_layer,
        }

    # --- Trainer events ----------------------------------------------------------------------

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._close_step()
        self._reset_window()
        self.history = []
        model = kwargs.get("model")
        if model is not None:
            family_of(model)  # an unsupported model fails here, before the first step
        if not self.placed_first and [r for r in (args.report_to or []) if r != "none"]:
            logger.warning(
                "RoutingStatsCallback was not added with add_routing_stats(trainer, ...): unless it was put "
                "before them by hand, the reporting integrations %s will not receive the routing statistics "
                "(they still reach trainer.state.log_history).",
                args.report_to,
            )
        if self.jsonl_path is not None and state.is_world_process_zero:
            self.history = _start_jsonl(self.jsonl_path, state.global_step)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        model = kwargs.get("model")
        if model is not None:
            self._open_step(model)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._close_step()

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if logs is None or not _is_training_log(logs):
            return
        self._close_step()  # never open at a log event in the Trainer's loop; kept for safety
        record = self._window_record(args, state)
        self._reset_window()
        if record is None:
            return
        values = {k: v for k, v in record.items() if k.startswith(self.prefix) and v is not None}
        # Trainer.log appended a copy of ``logs`` (plus "step") to log_history just before on_log.
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last is not logs and last.get("step") == state.global_step and all(
            k in logs and logs[k] is v for k, v in last.items() if k != "step"
        ):
            last.update(values)
        else:
            logger.warning("RoutingStatsCallback: the last log_history entry is not this log event; not updated.")
        logs.update(values)
        self.history.append(record)
        if self.jsonl_path is not None and state.is_world_process_zero:
            with self.jsonl_path.open("a") as f:
                f.write(json.dumps(record, default=_json_default) + "\n")

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._close_step()
        if self.plot_path is not None and state.is_world_process_zero:
            if self.history:
                path = plot_routing_history(self.history, self.plot_path, prefix=self.prefix)
                logger.info("routing balance plot written to %s", path)
            else:
                logger.warning("RoutingStatsCallback: no routing statistics were logged; no plot written.")


def add_routing_stats(
    trainer: Trainer, callback: RoutingStatsCallback | None = None, **kwargs: Any
) -> RoutingStatsCallback:
    """Put a :class:`RoutingStatsCallback` first among ``trainer``'s callbacks and return it.

    ``Trainer`` runs callbacks in list order and puts the reporting integrations
    (``report_to``) before the callbacks given to it, so a callback that adds keys to the logs in
    ``on_log`` must come first for TensorBoard, W&B, ... to see them. ``callback`` is moved to the
    front if the trainer already has it; without ``callback``, one is built from ``kwargs``.

    Example:
        >>> cb = add_routing_stats(trainer, jsonl_path="out/routing_stats.jsonl")  # doctest: +SKIP
        >>> type(trainer.callback_handler.callbacks[0]).__name__  # doctest: +SKIP
        'RoutingStatsCallback'
    """
    if callback is None:
        callback = RoutingStatsCallback(**kwargs)
    elif kwargs:
        raise TypeError("add_routing_stats: give either a callback or the arguments to build one, not both")
    callbacks = trainer.callback_handler.callbacks
    callbacks[:] = [cb for cb in callbacks if cb is not callback]
    callbacks.insert(0, callback)
    callback.placed_first = True
    return callback


def plot_routing_history(records: list[dict[str, Any]], path: str | Path, *, prefix: str = "routing/") -> Path:
    """Write a PNG of MaxVio top-1 and top-k over steps (Sinkhorn step fraction on a second axis
    when any Sinkhorn step ran) from the callback's records; returns the path.

    Example:
        >>> plot_routing_history(cb.history, "out/routing_balance.png")  # doctest: +SKIP
    """
    from matplotlib.figure import Figure

    from ..report import save_figure

    steps = [r["step"] for r in records]
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(steps, [_nan(r.get(prefix + "maxvio_top1")) for r in records], marker=".", label="MaxVio top-1")
    ax.plot(steps, [_nan(r.get(prefix + "maxvio")) for r in records], marker=".", label="MaxVio top-k")
    methods = sorted({str(r["method"]) for r in records if r.get("method")})
    title = "Load balance during training" + (f" ({', '.join(methods)})" if methods else "")
    ax.set(xlabel="step (end of logging window)", ylabel="MaxVio (mean over layers)", title=title)
    ax.set_ylim(bottom=0)
    handles, labels = ax.get_legend_handles_labels()
    fractions = [_nan(r.get(prefix + "sinkhorn_step_fraction")) for r in records]
    if any(f > 0 for f in fractions):
        ax2 = ax.twinx()
        ax2.step(steps, fractions, where="pre", color="tab:green", alpha=0.6, label="Sinkhorn step fraction")
        ax2.set(ylabel="Sinkhorn step fraction", ylim=(0, 1.05))
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, fontsize=8, loc="upper right")
    return save_figure(fig, path)


# --- helpers ---------------------------------------------------------------------------------


def _is_training_log(logs: dict[str, Any]) -> bool:
    """The Trainer's periodic training log (``loss``) or its end-of-training summary log."""
    return "loss" in logs or "train_runtime" in logs


def _merge(into: LayerStats, other: LayerStats) -> None:
    into.tokens += other.tokens
    into.calls += other.calls
    into.load += other.load
    into.top1_load += other.top1_load
    into.experts_hist += other.experts_hist
    into.entropy_sum += other.entropy_sum
    into.sinkhorn_steps += other.sinkhorn_steps
    into.sinkhorn_iterations.extend(other.sinkhorn_iterations)


def _mean_int(values: list[int]) -> int | float:
    mean = sum(values) / max(len(values), 1)
    return int(mean) if mean == int(mean) else mean


def _world_size() -> int:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _all_reduce_sum(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Sum ``tensor`` over processes (on ``device``, which the backend must accept)."""
    buf = tensor.to(device)
    torch.distributed.all_reduce(buf)
    return buf.cpu()


def _reduce_window(
    layers: list[LayerStats], steps: int, any_steps: int, iter_sums: list[int], iter_counts: list[int], device: Any
) -> tuple[list[LayerStats], int, int, list[int], list[int]]:
    """Sum every count of the window over processes with one ``all_reduce`` (float64 holds the
    integer counts exactly). The layers must be the same, in the same order, on every process."""
    parts = [torch.tensor([float(steps), float(any_steps), float(len(layers))], dtype=torch.float64)]
    for layer, s, c in zip(layers, iter_sums, iter_counts):
        parts += [layer.load.double(), layer.top1_load.double(), layer.experts_hist.double()]
        scalars = [layer.tokens, layer.calls, layer.sinkhorn_steps, s, c, layer.entropy_sum]
        parts.append(torch.tensor(scalars, dtype=torch.float64))
    total = _all_reduce_sum(torch.cat(parts), device)
    steps, any_steps = int(total[0]), int(total[1])
    out, sums, counts, i = [], [], [], 3
    for layer in layers:
        n = layer.num_experts
        new = LayerStats(layer.name, layer.layer, n)
        new.load = total[i : i + n].round().long()
        new.top1_load = total[i + n : i + 2 * n].round().long()
        new.experts_hist = total[i + 2 * n : i + 3 * n + 1].round().long()
        i += 3 * n + 1
        tokens, calls, sinkhorn, s, c, entropy = total[i : i + 6].tolist()
        i += 6
        new.tokens, new.calls, new.sinkhorn_steps, new.entropy_sum = int(tokens), int(calls), int(sinkhorn), entropy
        out.append(new)
        sums.append(int(s))
        counts.append(int(c))
    return out, steps, any_steps, sums, counts


def _start_jsonl(path: Path, global_step: int) -> list[dict[str, Any]]:
    """Start the JSONL file: empty it, or on resume keep (and return) its records up to the step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kept: list[dict[str, Any]] = []
    if global_step > 0 and path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= global_step:
                kept.append(record)
    path.write_text("".join(json.dumps(r, default=_json_default) + "\n" for r in kept))
    return kept


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _nan(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan
