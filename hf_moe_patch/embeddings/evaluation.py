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
from ..report import RoutingCase, parse_case, save_figure, slug
from ..stats import collect_stats
from ..version import __version__

logger = logging.getLogger(__name__)

BASELINE = "topk"


def resolve_budget(value: Any, native_k: int) -> Any:
    """``"0.75x"`` -> ``0.75 * native_k``; numbers and None pass through.

    Example:
        >>> resolve_budget("0.75x", 8), resolve_budget(3, 8), resolve_budget("2", 8)
        (6.0, 3, 2.0)
    """
    if isinstance(value, str):
        text = value.strip()
        try:
            return float(text[:-1]) * native_k if text.endswith("x") else float(text)
        except ValueError:
            raise ValueError(f"top_k={value!r} is not valid; use a number of experts (e.g. 1.5) "
                             f"or a multiple of the native k (e.g. 0.75x)") from None
    return value


def expand_cases(specs: Sequence[str | RoutingCase], native_k: int, top_k: Sequence[str] | None = None) -> list[RoutingCase]:
    """Parse method specs; with ``top_k`` budgets, each method that takes ``top_k`` and does not
    set it is run once per budget. ``"...x"`` budgets are multiples of the native ``k``.

    Example:
        >>> [c.label for c in expand_cases(["topk", "usmoe"], 8, ["1x", "0.5x"])]
        ['topk', 'usmoe:top_k=1x', 'usmoe:top_k=0.5x']
        >>> expand_cases(["usmoe:top_k=0.5x"], 8)[0].options
        {'top_k': 4.0}
    """
    from ..methods import METHODS

    cases: list[RoutingCase] = []
    for spec in specs:
        case = parse_case(spec) if isinstance(spec, str) else spec
        if case.method not in METHODS:
            raise ValueError(f"method={case.method!r} is not a routing method; valid: {', '.join(METHODS)}")
        takes_budget = "top_k" in METHODS[case.method].OPTIONS
        if top_k and takes_budget and "top_k" not in case.options:
            for budget in top_k:
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
    """The result of one routing: main score per task, routing statistics, timing."""

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
            runs.append(entry)
        return {"hf_moe_patch": __version__, "settings": self.settings, "baseline": self.baseline, "runs": runs, **self.extra}

    def to_markdown(self) -> str:
        """Tasks as rows (main score x 100, delta to the baseline in brackets), then means per
        task type, the overall mean, and the routing's compute and balance."""
        base = self._base()

        def cell(run: RoutingRun, value: float, ref: float | None) -> str:
            text = f"{100 * value:.2f}"
            if ref is not None and run is not base:
                text += f" ({100 * (value - ref):+.2f})"
            return text

        head = "| task | type | " + " | ".join(r.label for r in self.runs) + " |"
        lines = [head, "|---|---|" + "---:|" * len(self.runs)]
        for task in self.tasks:
            kind = self.runs[0].task_types[task]
            cells = [cell(r, r.scores[task], base.scores[task] if base else None) for r in self.runs]
            lines.append(f"| {task} | {kind} | " + " | ".join(cells) + " |")
        types = list(self.type_means(self.runs[0])) if self.runs else []
        for kind in types:
            ref = self.type_means(base)[kind] if base else None
            cells = [cell(r, self.type_means(r)[kind], ref) for r in self.runs]
            lines.append(f"| **mean {kind}** | | " + " | ".join(cells) + " |")
        ref = self.mean(base) if base else None
        lines.append("| **mean (all tasks)** | | " + " | ".join(f"**{cell(r, self.mean(r), ref)}**" for r in self.runs) + " |")
        stat_rows = [("experts/token (compute)", "experts_per_token_mean", "{:.2f}"),
                     ("tokens without expert", "tokens_without_expert_frac", "{:.3f}"),
                     ("MaxVio top-1", "maxvio_top1", "{:.2f}"), ("MaxVio all", "maxvio", "{:.2f}")]
        for title, key, fmt in stat_rows:
            cells = [fmt.format(r.stats[key]) if r.stats.get(key) is not None else "-" for r in self.runs]
            lines.append(f"| {title} | | " + " | ".join(cells) + " |")
        if base is not None and base.encode_seconds:
            cells = [f"{r.encode_seconds / base.encode_seconds:.2f}x" if r.encode_seconds else "cached" for r in self.runs]
            lines.append(f"| encode time vs {base.label} | | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """PNG: per-task scores of each routing (left); mean score against expert compute (right)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [2.2, 1]})
        tasks, n = self.tasks, len(self.runs)
        width = 0.8 / max(n, 1)
        for i, run in enumerate(self.runs):
            xs = [t + (i - (n - 1) / 2) * width for t in range(len(tasks))]
            axes[0].bar(xs, [100 * run.scores[t] for t in tasks], width, label=run.label)
        axes[0].set_xticks(range(len(tasks)), [re.sub(r"^WordNet", "WN ", t) for t in tasks], rotation=20, ha="right", fontsize=8)
        axes[0].set(ylabel="main score x 100", title="MTEB main score per task")
        axes[0].legend(fontsize=7, ncol=2)
        for run in self.runs:
            compute = run.stats.get("experts_per_token_mean")
            if compute is not None:
                axes[1].scatter(compute, 100 * self.mean(run), s=40)
                axes[1].annotate(run.label, (compute, 100 * self.mean(run)), fontsize=7, xytext=(4, 2), textcoords="offset points")
        axes[1].set(xlabel="experts per token (measured)", ylabel="mean main score x 100", title="Quality against expert compute")
        return save_figure(fig, path)

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
    progress: bool = True,
    title: str | None = None,
    wordnet_kwargs: dict[str, Any] | None = None,
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

    Example:
        >>> report = evaluate_routings(model, tok, ["topk", "usmoe"], ["WordNetLexnameClustering"])  # doctest: +SKIP
    """
    import mteb

    from .moee import MoEEncoder
    from ..data.wordnet_tasks import remove_stale_results

    native_k = int(getattr(model.config, "num_experts_per_tok"))
    routing_cases = expand_cases(cases, native_k, top_k)
    for case in routing_cases:  # a bad option fails here, before hours of evaluation
        check_routing(model, case.method, **case.options)
    task_objects = load_tasks(tasks, **(wordnet_kwargs or {}))
    # batch_size matters to batch-scoped routings, dtype to every embedding.
    settings = {"embedding": embedding, "prompt": prompt, "instruction": instruction, "sum_weight": sum_weight,
                "max_length": max_length, "batch_size": batch_size, "dtype": str(next(model.parameters()).dtype),
                "corruption": asdict(corruption) if corruption else None}
    task_types = {t.metadata.name: t.metadata.type for t in task_objects}
    cache = mteb.ResultCache(cache_path=Path(cache_dir))
    runs = []
    for case in routing_cases:
        with patched(model, case.method, **case.options):
            revision = run_revision(model, settings)
            if (routing_config(model) or {}).get("scope") == "batch":
                logger.warning("%s routes with scope='batch': an embedding depends on its batch-mates", case.label)
            encoder = MoEEncoder(model, tokenizer, embedding=embedding, prompt=prompt, instruction=instruction,
                                 sum_weight=sum_weight, batch_size=batch_size, max_length=max_length,
                                 progress=progress, revision=revision, text_transform=corruption)
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
            # Anything missing: run every task again, so that the statistics and the time cover the
            # whole task set (a partial reuse would mix runs).
            start = time.perf_counter()
            with collect_stats(model) as stats:
                result = mteb.evaluate(encoder, task_objects, cache=cache,
                                       overwrite_strategy="only-missing" if all_cached else "always",
                                       show_progress_bar=progress)
            seconds = time.perf_counter() - start
            if all_cached:  # every task came from the cache: so do its statistics and time
                summary, seconds, cached = saved["summary"], saved["seconds"], True
            else:
                summary, cached = stats.summary(), False
                # Atomic: a run killed while writing must not leave a cache entry that breaks later runs.
                atomic_write_text(stats_path, json.dumps({"summary": summary, "seconds": seconds}))
        scores = {r.task_name: float(r.get_score()) for r in result.task_results}
        # From our task objects: TaskResult.task_type looks the name up in mteb's registry,
        # which does not know local tasks.
        types = {name: task_types[name] for name in scores}
        runs.append(RoutingRun(case.label, case.method, case.options, name, revision, scores, types, summary, seconds, cached))
        logger.info("%s: mean main score %.4f", case.label, sum(scores.values()) / max(len(scores), 1))
    baseline = next((c.label for c in routing_cases if c.method == BASELINE and not c.options), None)
    settings = {**settings, "tasks": [t.metadata.name for t in task_objects], "title": title,
                "model": str(getattr(model.config, "_name_or_path", "")), "torch": torch.__version__}
    report = ComparisonReport(runs, settings, baseline)
    if out_dir is not None:
        paths = report.write(out_dir)
        logger.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return report
