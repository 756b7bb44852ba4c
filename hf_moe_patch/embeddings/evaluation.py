"""Training-free MTEB evaluation of one model under several routings, side by side.

:func:`evaluate_routings` patches the model with each :class:`~hf_moe_patch.report.RoutingCase`
in turn, wraps it in a :class:`~hf_moe_patch.embeddings.moee.MoEEncoder` and runs mteb's own evaluators
through ``mteb.evaluate`` with a ``ResultCache``. Each run is cached under a model name that
carries the routing label and a revision that hashes everything that can change an embedding
(routing method and all its resolved options, embedding mode, prompt, instruction, sum weight,
corruption, maximum length, batch size, dtype, the model's name and revision, the package
version), so results of
different routings or options never overwrite or reuse each other, and an identical run is
read back from the cache instead of recomputed.

While encoding, routing statistics are collected; the mean number of selected (token, expert)
pairs per token is the expert compute, reported next to the scores so that fractional budgets
show their cost/quality trade-off. Statistics are cached beside mteb's results, written atomically
(:mod:`hf_moe_patch.io`) so that an interrupted run never leaves an entry that breaks the next.

Example:
    >>> report = evaluate_routings(model, tokenizer, ["topk", "usmoe", "usmoe:top_k=0.75x"],
    ...                            ["WordNetWuPalmerSTS"], out_dir="mteb_out")  # doctest: +SKIP
    >>> print(report.to_markdown())  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..data.corruption import Corruption
from ..io import atomic_path, atomic_write_text, read_json_or_none
from ..patching import check_routing, patched, routing_config
from ..report import RoutingCase, calibrate_cases, escape_cell, needs_calibration, format_duration, legend_columns, progress_logger, save_figure, slug
from ..validation import parse_routings, resolve_budget
from ..stats import collect_stats
from ..version import __version__

logger = logging.getLogger(__name__)

BASELINE = "topk"


def expand_cases(specs: Sequence[str | RoutingCase], native_k: int, top_k: Sequence[str] | None = None) -> list[RoutingCase]:
    """Parse method specs; with ``top_k`` budgets, each method that takes ``top_k`` and does not
    set it is run once per budget (except the baseline ``"topk"``, which stays native).
    ``"...x"`` budgets are multiples of the native ``k``. Method and option names are checked
    (:func:`hf_moe_patch.validation.parse_routings`), with did-you-mean suggestions.

    Example:
        >>> [c.label for c in expand_cases(["topk", "usmoe"], 8, ["1x", "0.5x"])]
        ['topk', 'usmoe:top_k=1x', 'usmoe:top_k=0.5x']
        >>> expand_cases(["usmoe:top_k=0.5x"], 8)[0].options
        {'top_k': 4.0}
    """
    from ..methods import METHODS

    budgets = list(top_k or [])
    for budget in budgets:
        resolve_budget(budget, native_k)  # its form, before anything runs
    cases: list[RoutingCase] = []
    for case in parse_routings(specs):
        # The baseline "topk" is never swept: it stays the native router that the deltas compare to.
        takes_budget = "top_k" in METHODS[case.method].OPTIONS and case.method != BASELINE
        if budgets and takes_budget and "top_k" not in case.options:
            for budget in budgets:
                options = {**case.options, "top_k": resolve_budget(budget, native_k)}
                label = f"{case.label}{',' if ':' in case.label else ':'}top_k={budget}"
                cases.append(RoutingCase(label, case.method, options))
        else:
            options = dict(case.options)
            if "top_k" in options:
                options["top_k"] = resolve_budget(options["top_k"], native_k)
            cases.append(RoutingCase(case.label, case.method, options))
    labels = [c.label for c in cases]
    if len(set(labels)) != len(labels):
        raise ValueError(f"routings must be distinct; got {labels}")
    return cases


def _mteb_task_names() -> list[str]:
    """Every task name mteb knows (for suggestions), without building the tasks."""
    import importlib

    try:
        return list(importlib.import_module("mteb.get_tasks")._TASKS_REGISTRY)
    except (ImportError, AttributeError):  # another mteb layout: the public listing
        import mteb

        return [t.metadata.name for t in mteb.get_tasks()]


def check_tasks(tasks: Sequence[Any], *, flag: str = "tasks") -> list[Any]:
    """Check task names before any model or data loads; returns ``tasks``.

    A name must be one of the local WordNet tasks (:data:`~hf_moe_patch.data.wordnet_tasks.WORDNET_TASKS`)
    or a task in mteb's registry; an unknown one raises ValueError with a did-you-mean
    suggestion. An MTEB task whose data is not in the local Hugging Face cache while the Hub
    cannot be reached raises :class:`~hf_moe_patch.hub_access.HubUnreachableError` at once,
    naming the local tasks. Task objects pass through.

    Example:
        >>> check_tasks(["WordNetWuPalmerSTS"])
        ['WordNetWuPalmerSTS']
        >>> check_tasks(["WordNetWuPalmerSTs"])
        Traceback (most recent call last):
        ValueError: unknown task 'WordNetWuPalmerSTs'. Did you mean 'WordNetWuPalmerSTS'? ...
    """
    from ..data.wordnet_tasks import WORDNET_TASKS
    from ..hub_access import HubUnreachableError, hub_dataset_cached, offline_reason
    from ..validation import suggest

    local = ", ".join(WORDNET_TASKS)
    if not tasks:
        raise ValueError(f"no task given in {flag}; the local tasks (no download) are {local}")
    for task in tasks:
        if isinstance(task, str) and not task.strip():
            raise ValueError(f"an empty task name in {flag}; the local tasks (no download) are {local}")
    others = [t for t in tasks if isinstance(t, str) and t not in WORDNET_TASKS]
    if not others:
        return list(tasks)
    import warnings

    import mteb

    for name in others:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                task = mteb.get_task(name)
        except KeyError:
            hint = suggest(name, list(WORDNET_TASKS) + _mteb_task_names())
            raise ValueError(f"unknown task {name!r}.{hint} Tasks are the local WordNet tasks ({local}) "
                             f"or names of mteb's registry (mteb.get_tasks())") from None
        dataset = (getattr(task.metadata, "dataset", None) or {}).get("path")
        reason = offline_reason() if dataset else None
        if reason is not None and not hub_dataset_cached(dataset):
            raise HubUnreachableError(
                f"task {name!r} downloads its data ({dataset}) from the Hugging Face Hub, which is offline "
                f"({reason}), and it is not in the local cache; use the local WordNet tasks ({local}), "
                f"or run once online to cache it")
    return list(tasks)


def load_tasks(tasks: Sequence[Any], **wordnet_kwargs: Any) -> list:
    """mteb task objects from names: the local WordNet tasks by name, other names through
    ``mteb.get_tasks`` (their data downloads from the Hub when first evaluated); task objects
    pass through."""
    import mteb

    from ..data.wordnet_tasks import WORDNET_TASKS, wordnet_tasks

    out = []
    for task in tasks:
        if not isinstance(task, str):
            out.append(task)
        elif task in WORDNET_TASKS:
            out.extend(wordnet_tasks([task], **wordnet_kwargs))
        else:
            out.extend(mteb.get_tasks(tasks=[task]))
    return out


@dataclass
class RoutingRun:
    """The result of one routing: main score per task, routing statistics, timing.

    ``encode_seconds`` is the wall-clock time spent inside the encoder over all tasks (mteb's
    scoring excluded); ``task_seconds`` the same per task. ``metrics`` names each task's main
    score (``cosine_spearman``, ``accuracy``, ...).
    """

    label: str
    method: str
    options: dict[str, Any]
    model_name: str
    revision: str
    scores: dict[str, float]
    task_types: dict[str, str]
    stats: dict[str, Any]
    encode_seconds: float | None
    cached: bool = False
    task_seconds: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, str] = field(default_factory=dict)


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


@dataclass
class ComparisonReport:
    """Scores of several routings on the same tasks, with the baseline and the run settings."""

    runs: list[RoutingRun]
    settings: dict[str, Any]
    baseline: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        return list(self.runs[0].scores) if self.runs else []

    def type_means(self, run: RoutingRun) -> dict[str, float]:
        by_type: dict[str, list[float]] = {}
        for task, score in run.scores.items():
            by_type.setdefault(run.task_types[task], []).append(score)
        return {t: sum(v) / len(v) for t, v in sorted(by_type.items())}

    @staticmethod
    def mean(run: RoutingRun) -> float:
        return sum(run.scores.values()) / max(len(run.scores), 1)

    def _base(self) -> RoutingRun | None:
        return next((r for r in self.runs if r.label == self.baseline), None)

    def time_ratios(self, run: RoutingRun) -> list[float]:
        """Per task, the run's encode wall-clock time over the baseline's (empty without both)."""
        base = self._base()
        if base is None:
            return []
        return [run.task_seconds[t] / base.task_seconds[t] for t in self.tasks
                if run.task_seconds.get(t) and base.task_seconds.get(t)]

    def to_dict(self) -> dict[str, Any]:
        base = self._base()
        runs = []
        for run in self.runs:
            entry = asdict(run)
            entry["type_means"] = self.type_means(run)
            entry["mean"] = self.mean(run)
            if base is not None:
                entry["delta_vs_baseline"] = {t: run.scores[t] - base.scores[t] for t in run.scores}
                entry["mean_delta_vs_baseline"] = self.mean(run) - self.mean(base)
                if run.encode_seconds and base.encode_seconds:
                    entry["encode_time_vs_baseline"] = run.encode_seconds / base.encode_seconds
                ratios = self.time_ratios(run)
                if ratios:
                    entry["encode_time_vs_baseline_by_task"] = dict(zip(
                        [t for t in self.tasks if run.task_seconds.get(t) and base.task_seconds.get(t)], ratios))
            runs.append(entry)
        return {"hf_moe_patch": __version__, "settings": self.settings, "baseline": self.baseline, "runs": runs, **self.extra}

    def _time_cell(self, run: RoutingRun) -> str:
        base = self._base()
        if run is base:
            return "1.00x"
        ratios = self.time_ratios(run)
        if len(ratios) > 1:
            return f"{_median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]"
        if ratios:
            return f"{ratios[0]:.2f}x"
        if run.encode_seconds and base is not None and base.encode_seconds:
            return f"{run.encode_seconds / base.encode_seconds:.2f}x"
        return "-"

    def to_markdown(self) -> str:
        """Tasks as rows (main score x 100, with its metric; the change vs the baseline in
        brackets), means per task type and overall where they summarise more than one task, then
        the routing's compute, balance and encode time, and a legend that says what each row is."""
        base = self._base()
        tasks = self.tasks

        def cell(run: RoutingRun, value: float, ref: float | None) -> str:
            text = f"{100 * value:.2f}"
            if ref is not None and run is not base:
                text += f" ({100 * (value - ref):+.2f})"
            return text

        first = self.runs[0] if self.runs else None
        head = "| task | type | metric | " + " | ".join(escape_cell(r.label) for r in self.runs) + " |"
        lines = [head, "|---|---|---|" + "---:|" * len(self.runs)]
        for task in tasks:
            kind = first.task_types[task]
            metric = first.metrics.get(task, "main score")
            cells = [cell(r, r.scores[task], base.scores[task] if base else None) for r in self.runs]
            lines.append(f"| {escape_cell(task)} | {escape_cell(kind)} | {escape_cell(metric)} | " + " | ".join(cells) + " |")
        counts: dict[str, int] = {}
        for task in tasks:
            counts[first.task_types[task]] = counts.get(first.task_types[task], 0) + 1
        if len(counts) > 1:  # one type only: its mean is the overall mean
            for kind, count in counts.items():
                if count < 2:
                    continue  # the mean of one task repeats its row
                ref = self.type_means(base)[kind] if base else None
                cells = [cell(r, self.type_means(r)[kind], ref) for r in self.runs]
                lines.append(f"| **mean {escape_cell(kind)}** ({count} tasks) | | | " + " | ".join(cells) + " |")
        if len(tasks) > 1:
            ref = self.mean(base) if base else None
            lines.append("| **mean (all tasks)** | | | " + " | ".join(f"**{cell(r, self.mean(r), ref)}**" for r in self.runs) + " |")
        stat_rows = [("experts/token (measured compute)", "experts_per_token_mean", "{:.2f}"),
                     ("tokens without expert (share)", "tokens_without_expert_frac", "{:.3f}"),
                     ("MaxVio top-1", "maxvio_top1", "{:.2f}"), ("MaxVio all choices", "maxvio", "{:.2f}")]
        for title, key, fmt in stat_rows:
            cells = [fmt.format(r.stats[key]) if r.stats.get(key) is not None else "-" for r in self.runs]
            lines.append(f"| {title} | | | " + " | ".join(cells) + " |")
        if base is not None and any(r.encode_seconds for r in self.runs):
            lines.append(f"| encode time vs {escape_cell(base.label)} (wall-clock) | | | "
                         + " | ".join(self._time_cell(r) for r in self.runs) + " |")
        legend = ["", "Scores: each task's mteb main score (the metric column) x 100; higher is better."]
        if base is not None:
            legend.append(f"In brackets: the change vs {base.label}, in points of the same x 100 scale.")
        legend.append("Experts/token, tokens without expert and MaxVio (max expert load / mean load - 1; top-1: "
                      "first choices only) are measured over every token of every text encoded for the tasks "
                      "above (all splits, queries and documents), under each routing.")
        if base is not None and any(r.encode_seconds for r in self.runs):
            legend.append(f"Encode time: wall-clock seconds inside the encoder (mteb's scoring excluded) relative to "
                          f"{base.label}; several tasks: the median ratio over tasks, [min-max] across tasks. "
                          f"Cached runs show the time measured when they ran.")
        return "\n".join(lines + legend)

    def figure(self):
        """The comparison as a matplotlib figure: per-task scores of each routing (left); mean
        score against measured expert compute (right). Every routing has its own colour (and
        marker), named once in a shared legend below the panels; points that coincide stay
        visible (hollow markers of decreasing size)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D

        tasks, n = self.tasks, len(self.runs)
        labels = [_wrap_label(re.sub(r"^WordNet", "WN ", t)) for t in tasks]
        left_width = max(6.0, 1.1 * len(tasks) * max(1.0, n / 4))
        fig, axes = plt.subplots(1, 2, figsize=(left_width + 4.5, 5.2), gridspec_kw={"width_ratios": [left_width, 4.0]})
        colors = _colors(n)
        markers = "osD^vP*Xh<>p"
        width = 0.8 / max(n, 1)
        for i, run in enumerate(self.runs):
            xs = [t + (i - (n - 1) / 2) * width for t in range(len(tasks))]
            axes[0].bar(xs, [100 * run.scores[t] for t in tasks], width, color=colors[i])
        axes[0].set_xticks(range(len(tasks)), labels, fontsize=8)
        metric = "main score" if len(tasks) != 1 else (self.runs[0].metrics.get(tasks[0]) or "main score")
        axes[0].set(ylabel=f"{metric} x 100", title="MTEB main score per task")
        if len(tasks) > 4:
            plt.setp(axes[0].get_xticklabels(), rotation=30, ha="right")
        handles = []
        for i, run in enumerate(self.runs):
            compute = run.stats.get("experts_per_token_mean")
            if compute is not None:
                axes[1].scatter(compute, 100 * self.mean(run), s=160 - 100 * i / max(n - 1, 1), marker=markers[i % len(markers)],
                                facecolors="none", edgecolors=colors[i], linewidths=1.6, zorder=3 + i)
            handles.append(Line2D([], [], color=colors[i], marker=markers[i % len(markers)], markerfacecolor="none",
                                  linestyle="none", markersize=8, label=run.label))
        mean_label = "mean main score x 100" if len(tasks) > 1 else f"{metric} x 100"
        axes[1].set(xlabel="experts per token (measured)", ylabel=mean_label, title="Quality against expert compute")
        axes[1].margins(x=0.15, y=0.15)
        ncol = legend_columns(n, int((left_width + 4.5) // 2.2))
        fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
        rows = -(-n // ncol)
        fig.tight_layout(rect=(0, 0.04 + 0.045 * rows, 1, 1))
        return fig

    def plot(self, path: str | Path) -> Path:
        """Write :meth:`figure` as a PNG to ``path``."""
        return save_figure(self.figure(), path, layout=False)

    def write(self, out_dir: str | Path, stem: str = "mteb_comparison") -> dict[str, Path]:
        """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` into ``out_dir``, each atomically
        (:mod:`hf_moe_patch.io`); returns their paths.

        Example:
            >>> report.write("mteb_out")["md"]  # doctest: +SKIP
            PosixPath('mteb_out/mteb_comparison.md')
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md", "png": out / f"{stem}.png"}
        # Each file is replaced whole or not at all: an interrupted write never leaves a truncated one.
        atomic_write_text(paths["json"], json.dumps(self.to_dict(), indent=2, default=str))
        title = self.settings.get("title") or "MTEB comparison of routings"
        atomic_write_text(paths["md"], f"# {title}\n\n{self.to_markdown()}\n")
        with atomic_path(paths["png"]) as tmp:
            self.plot(tmp)
        return paths


def _wrap_label(text: str, width: int = 16) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(re.sub(r"(?<=[a-z])(?=[A-Z])", " ", text), width)) or text


def _colors(n: int) -> list:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


class _EncodeTimer:
    """Wraps an encoder's ``encode``: wall-clock seconds spent encoding, per task.

    mteb hands ``encode`` a DataLoader whose first pass may still build the task's data (the
    first routing would pay for it): the batches are read before the clock starts, so only the
    encoding is timed.
    """

    def __init__(self, encode: Any) -> None:
        self.encode = encode
        self.seconds: dict[str, float] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        meta = kwargs.get("task_metadata")
        name = getattr(meta, "name", "?")
        # Data loading, not encoding: the batches are read first.
        if "inputs" in kwargs:
            kwargs["inputs"] = list(kwargs["inputs"])
        elif args:
            args = (list(args[0]), *args[1:])
        start = time.perf_counter()
        try:
            return self.encode(*args, **kwargs)
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def _task_summary(names: Sequence[str]) -> str:
    if len(names) == 1:
        return f"task {names[0]}"
    shown = ", ".join(names) if len(names) <= 3 else f"{names[0]}, {names[1]}, ..., {names[-1]}"
    return f"{len(names)} tasks ({shown})"


def _read_stats(path: Path) -> dict[str, Any] | None:
    """A run's cached routing statistics and time, or None when missing or unusable (a file
    truncated by a crash, an older layout): the run is then evaluated again.

    Example:
        >>> _read_stats(Path("no/such/stats.json")) is None
        True
    """
    saved = read_json_or_none(path, required=("summary", "seconds"))
    if saved is None:
        return None
    seconds = saved["seconds"]
    if not isinstance(saved["summary"], dict) or not (seconds is None or isinstance(seconds, (int, float))):
        logger.warning("ignoring %s: unexpected content; it will be recomputed", path)
        return None
    return saved


def run_revision(model: nn.Module, settings: dict[str, Any]) -> str:
    """The mteb revision of a run: a hash of the model's name and revision, its resolved routing
    configuration (method and every option), the embedding settings and the package version."""
    config = model.config
    key = {"model": str(getattr(config, "_name_or_path", "") or config.model_type),
           "model_revision": getattr(config, "_commit_hash", None), "routing": routing_config(model),
           "settings": settings, "hf_moe_patch": __version__}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _scores(result: Any, cache: Any, meta: Any) -> dict[str, float]:
    """Main score per task, read back from the files mteb's cache keeps (6 decimals), so that a
    fresh run and a cached one give the very same numbers; in-memory results as a fallback."""
    from mteb import TaskResult

    scores = {}
    for r in result.task_results:
        path = Path(cache.get_task_result_path(r.task_name, meta))
        try:
            stored = TaskResult.from_disk(path) if path.is_file() else r
        except Exception:  # noqa: BLE001 - an unreadable file: the in-memory result
            stored = r
        scores[r.task_name] = float(stored.get_score())
    return scores


def evaluate_routings(
    model: nn.Module,
    tokenizer: Any,
    cases: Sequence[str | RoutingCase],
    tasks: Sequence[Any],
    *,
    embedding: str = "moee_sum",
    prompt: str = "prompteol",
    instruction: str | None = None,
    sum_weight: float = 1.0,
    batch_size: int = 32,
    max_length: int = 512,
    top_k: Sequence[str] | None = None,
    corruption: Corruption | None = None,
    cache_dir: str | Path = "mteb_cache",
    out_dir: str | Path | None = "mteb_out",
    overwrite: bool = False,
    progress: bool | None = None,
    title: str | None = None,
    wordnet_kwargs: dict[str, Any] | None = None,
    calibration: Any = None,
    reference: bool = False,
) -> ComparisonReport:
    """Evaluate ``model`` on ``tasks`` under each routing of ``cases`` and compare.

    Args:
        model, tokenizer: an unpatched supported causal MoE model and its tokenizer.
        cases: routings as ``"METHOD[:key=value,...]"`` strings or :class:`RoutingCase`; a
            ``"topk"`` case is the baseline of the deltas. ``top_k`` values may be written as
            multiples of the native k (``"0.75x"``).
        tasks: mteb task names (local WordNet tasks or MTEB tasks) or task objects.
        embedding, prompt, instruction, sum_weight, batch_size, max_length: passed to
            :class:`~hf_moe_patch.embeddings.moee.MoEEncoder`.
        top_k: budgets to sweep for every method that takes ``top_k`` and does not set it.
        corruption: corrupt every task text before encoding (see :mod:`hf_moe_patch.data.corruption`).
        cache_dir: mteb's ``ResultCache`` folder (plus our routing statistics).
        out_dir: where to write the JSON, markdown and PNG comparison (None: do not write).
        overwrite: recompute runs that are in the cache: scores, routing statistics and time are
            all measured again (``cached=False``) and replace the cache entries. Without it, an
            unreadable cache entry (e.g. truncated by a crash) counts as missing: a warning is
            logged and the run is recomputed.
        reference: the official MoEE pipeline (``MoEEncoder(reference=True)``, :mod:`.reference`);
            with ``moee_sum``, classification and clustering average the predictions of separate
            HS and RW runs (:func:`~hf_moe_patch.embeddings.reference.reference_tasks`).
        calibration: text for the causal routings without thresholds (``causal=True``): a list of
            strings (tokenized with ``tokenizer``) or tokenized batches, as ``patch`` takes it;
            each such routing is calibrated once, before any evaluation.
        progress: progress bars (mteb's, over the tasks of a routing): None (default) shows them
            only when stderr is a terminal. Either way one line per routing, ``[i/n] label on
            tasks ... ETA``, goes to the ``hf_moe_patch.progress`` logger (INFO).

    Routings, options, task names and the output folders are all checked before the first
    evaluation, so that a typo or an unwritable folder fails in seconds, not after the run.

    Example:
        >>> report = evaluate_routings(model, tok, ["topk", "usmoe"], ["WordNetLexnameClustering"])  # doctest: +SKIP
    """
    import sys
    import warnings

    import mteb

    from .moee import MoEEncoder, text_hidden_size
    from .reference import reference_tasks
    from ..data.wordnet_tasks import remove_stale_results
    from ..validation import check_writable_dir

    native_k = int(getattr(model.config, "num_experts_per_tok"))
    routing_cases = expand_cases(cases, native_k, top_k)
    for case in routing_cases:  # a bad option fails here, before hours of evaluation
        check_routing(model, case.method, **case.options,
                      **({"calibration": calibration, "tokenizer": tokenizer} if needs_calibration(case) else {}))
    check_tasks(tasks)
    check_writable_dir(cache_dir, flag="cache_dir")
    if out_dir is not None:
        check_writable_dir(out_dir, flag="out_dir")
    bars = sys.stderr.isatty() if progress is None else bool(progress)
    task_objects = load_tasks(tasks, **(wordnet_kwargs or {}))
    routing_cases = calibrate_cases(model, routing_cases, calibration, tokenizer)
    # batch_size matters to batch-scoped routings, dtype to every embedding.
    settings = {"embedding": embedding, "prompt": prompt, "instruction": instruction, "sum_weight": sum_weight, "reference": reference,
                "max_length": max_length, "batch_size": batch_size, "dtype": str(next(model.parameters()).dtype),
                "corruption": asdict(corruption) if corruption else None}
    task_types = {t.metadata.name: t.metadata.type for t in task_objects}
    metrics = {t.metadata.name: str(t.metadata.main_score) for t in task_objects}
    task_names = [t.metadata.name for t in task_objects]
    # The reference MoEE(sum) of classification and clustering is two runs' predictions. Wrapped
    # once: the copies then load their data once for every routing.
    evaluated = (reference_tasks(task_objects, hidden_size=text_hidden_size(model), sum_weight=sum_weight)
                 if reference and embedding == "moee_sum" else task_objects)
    cache = mteb.ResultCache(cache_path=Path(cache_dir))
    runs = []
    started, computed = time.perf_counter(), []
    for index, case in enumerate(routing_cases, 1):
        with patched(model, case.method, **case.options):
            revision = run_revision(model, settings)
            if (routing_config(model) or {}).get("scope") == "batch":
                logger.warning("%s routes with scope='batch': an embedding depends on its batch-mates", case.label)
            # One level of progress bars at most: mteb's over the tasks; none inside the encoder.
            encoder = MoEEncoder(model, tokenizer, embedding=embedding, prompt=prompt, instruction=instruction,
                                 sum_weight=sum_weight, batch_size=batch_size, max_length=max_length,
                                 progress=False, revision=revision, text_transform=corruption, reference=reference)
            timer = _EncodeTimer(encoder.encode)
            encoder.encode = timer  # type: ignore[method-assign]
            name = encoder.mteb_model_meta.name  # carries the routing tag; the revision the rest
            # Statistics and timing are kept per run and task set, beside mteb's results.
            task_key = hashlib.sha256(json.dumps(sorted(f"{t.metadata.name}@{t.metadata.revision}" for t in task_objects))
                                      .encode()).hexdigest()[:12]
            stats_path = Path(cache_dir) / "hf_moe_patch_stats" / slug(name) / f"{revision}-{task_key}.json"
            # mteb's cache finds a result by model and task name only: drop ones computed on
            # another build of a task (other seed, sizes or data) so that they are not reused.
            removed = remove_stale_results(cache, encoder, task_objects)
            if removed:
                logger.info("%s: recomputing %d cached results of other task builds", case.label, len(removed))
            meta = encoder.mteb_model_meta
            # overwrite: nothing is read back, so scores, statistics and time are all fresh.
            saved = None if overwrite else _read_stats(stats_path)
            all_cached = saved is not None and all(
                read_json_or_none(cache.get_task_result_path(t.metadata.name, meta)) is not None for t in task_objects)
            if all_cached:
                eta = "from the cache"
            elif computed:
                # The first routing also builds the tasks' data: later ones estimate better.
                recent = computed[1:] or computed
                eta = f"ETA {format_duration(sum(recent) / len(recent) * (len(routing_cases) - index + 1))}"
            else:
                eta = "ETA after the first routing"
            progress_logger.info("[%d/%d] %s on %s (elapsed %s, %s)", index, len(routing_cases), case.label,
                                 _task_summary(task_names), format_duration(time.perf_counter() - started), eta)
            # Anything missing: run every task again, so that the statistics and the time cover the
            # whole task set (a partial reuse would mix runs).
            start = time.perf_counter()
            with collect_stats(model) as stats, warnings.catch_warnings():
                # mteb's classifiers on a weak embedding predict some labels never: sklearn warns
                # once per evaluation that their precision is 0. The scores say it already.
                _ignore_undefined_metric_warnings()
                result = mteb.evaluate(encoder, evaluated, cache=cache,
                                       overwrite_strategy="only-missing" if all_cached else "always",
                                       show_progress_bar=bars)
            seconds = time.perf_counter() - start
            if all_cached:  # every task came from the cache: so do its statistics and time
                summary, seconds, cached = saved["summary"], saved["seconds"], True
                task_seconds = dict(saved.get("task_seconds") or {})
            else:
                summary, cached, task_seconds = stats.summary(), False, dict(timer.seconds)
                computed.append(seconds)
                # Atomic: a run killed while writing must not leave a cache entry that breaks later runs.
                atomic_write_text(stats_path, json.dumps({"summary": summary, "seconds": seconds, "task_seconds": task_seconds}))
            scores = _scores(result, cache, meta)
        encode_seconds = sum(task_seconds.values()) if task_seconds else seconds
        # From our task objects: TaskResult.task_type looks the name up in mteb's registry,
        # which does not know local tasks.
        types = {task: task_types[task] for task in scores}
        runs.append(RoutingRun(case.label, case.method, case.options, name, revision, scores, types, summary,
                               encode_seconds, cached, task_seconds, {task: metrics[task] for task in scores}))
        logger.info("%s: mean main score %.4f", case.label, sum(scores.values()) / max(len(scores), 1))
    from_cache = sum(r.cached for r in runs)
    progress_logger.info("done: %d routings in %s%s", len(runs), format_duration(time.perf_counter() - started),
                         f" ({from_cache} from the cache)" if from_cache else "")
    baseline = next((c.label for c in routing_cases if c.method == BASELINE and not c.options), None)
    settings = {**settings, "tasks": [t.metadata.name for t in task_objects], "title": title,
                "model": str(getattr(model.config, "_name_or_path", "")), "torch": torch.__version__}
    report = ComparisonReport(runs, settings, baseline)
    if out_dir is not None:
        paths = report.write(out_dir)
        logger.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return report


def _ignore_undefined_metric_warnings() -> None:
    """Inside a ``warnings.catch_warnings()`` block: drop sklearn's UndefinedMetricWarning."""
    import warnings

    try:
        from sklearn.exceptions import UndefinedMetricWarning
    except ImportError:  # pragma: no cover - sklearn comes with mteb
        return
    warnings.simplefilter("ignore", UndefinedMetricWarning)
