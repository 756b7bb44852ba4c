"""The official MoEE pipeline (``tianyi-lab/MoE-Embedding``), reproduced for :class:`MoEEncoder` ``reference=True``.

Our MoEE design embeds each text on its own (ROUTING.md section 5; :mod:`.moee`). The paper's
numbers come from the official code, which differs in five ways; this module holds what the
reference mode needs to reproduce it (read from ``moee.py``, ``eval_mteb.py`` and the evaluators
of its vendored mteb, commit f80bebd):

1. **Text.** Every sentence is cleaned: the instruction is put *in front of the sentence*
   (inside the template's quotes), a ``.`` is added when the result does not end in
   ``.?!"'`` (an empty result stays empty), ``"`` becomes ``'``; the template is filled, every
   ``_`` of the whole prompt becomes a space and the prompt is stripped (:func:`reference_prompt`).
2. **Instructions** are on by default, GritLM-formatted: ``<|user|>\\n<instruction>\\n<|embed|>\\n``,
   and ``<|embed|>\\n`` alone for an empty one (retrieval documents) (:func:`gritlm_instruction`).
3. **Forward.** Texts are batched in input order, padded on the left, not truncated, and run
   without ``position_ids`` (a left-padded row's real tokens get positions ``pad..L-1``).
4. **Standardisation.** Whenever the embedding is not HS alone, HS and RW are z-scored per
   feature over each encode batch (:func:`~.moee.standardize_per_batch`: unbiased std,
   ``+ 1e-8``; the NaN of a one-text batch becomes 0): RW is ``z(rw)``, MoEE(concat) ``z([hs; rw])`` and MoEE(sum)
   ``cos(z(hs)) + w * cos(z(rw))``.
5. **MoEE(sum) for classification and clustering** is not one embedding: the official code fits
   the classifier (k-means) on ``z(hs)`` and on ``z(rw)`` separately and averages the predicted
   label (cluster) ids, ``(y_hs + w * y_rw) / (1 + w)``. A classification prediction that is not
   a whole number is truncated to an int (sklearn refuses the float labels, the official code
   catches that and calls ``int``); cluster ids are used as they are, floats included, so the
   average makes up to ``k * k`` clusters. :func:`reference_tasks` wraps such mteb tasks so that
   they do this; the encoder hands them ``[z(hs); z(rw)]``.

Not reproduced: the official retrieval evaluator ignores the MoEE(sum) setting and ranks by the
cosine of ``z([hs; rw])`` (retrieval is not among the paper's tasks; here it gets the sum), and its
pair classification also sums Manhattan and Euclidean distances of the raw parts (mteb 2 computes
those from the one vector; the cosine scores are the official ones).

Example:
    >>> reference_prompt('say "hi"_now', 'This sentence : "{text}" means in one word:"', gritlm_instruction("Find similar text:"))
    'This sentence : "<|user|>\\nFind similar text\\n<|embed|>\\nsay \\'hi\\' now." means in one word:"'
    >>> reference_prompt("", '"{text}"')
    '""'
"""

from __future__ import annotations

import random
import threading
import warnings
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
from ..errors import InvalidOptionError

ENSEMBLE_TASK_TYPES: tuple[str, ...] = ("Classification", "Clustering")
"""Task types whose reference MoEE(sum) averages the predictions of separate HS and RW runs."""

def gritlm_instruction(instruction: str) -> str:
    """The official instruction prefix (``--instruction_format gritlm``); ``""`` gives ``<|embed|>\\n``.

    The instruction is stripped of ``:``, spaces and newlines at both ends first, as the
    official ``eval_mteb.py`` does.

    Example:
        >>> gritlm_instruction("Retrieve semantically similar text.")
        '<|user|>\\nRetrieve semantically similar text.\\n<|embed|>\\n'
        >>> gritlm_instruction("")
        '<|embed|>\\n'
    """
    instruction = instruction.strip(": \n")
    return "<|user|>\n" + instruction + "\n<|embed|>\n" if instruction else "<|embed|>\n"


def reference_prompt(text: str, template: str, prefix: str = "") -> str:
    """The official model input for ``text``: ``prefix`` (an already formatted instruction) and
    the sentence, cleaned, put in ``template`` (a prompt template with ``{text}``, e.g.
    ``PROMPTS["prompteol"]`` of :mod:`.moee`).

    Example:
        >>> reference_prompt("A cat sat", '"{text}"')
        '"A cat sat."'
    """
    sentence = prefix + text
    if sentence and sentence[-1] not in ".?!\"'":
        sentence += "."
    sentence = sentence.replace('"', "'")
    return template.replace("{text}", sentence).replace("_", " ").strip()


def average_predictions(y_hs: Sequence[Any], y_rw: Sequence[Any], sum_weight: float) -> np.ndarray:
    """``(y_hs + w * y_rw) / (1 + w)`` of two runs' predicted label (cluster) ids, float64.

    Example:
        >>> average_predictions([0, 2, 4], [0, 3, 4], 1.0)
        array([0. , 2.5, 4. ])
    """
    a, b = np.asarray(y_hs), np.asarray(y_rw)
    for y in (a, b):
        if not np.issubdtype(y.dtype, np.number):
            raise InvalidOptionError(
                "the reference MoEE(sum) averages predicted label ids, so it needs numeric labels; "
                f"got {y.dtype} labels"
            )
    return (a.astype(np.float64) + sum_weight * b.astype(np.float64)) / (1.0 + sum_weight)


def truncate_labels(y: np.ndarray) -> np.ndarray:
    """The official classification labels from averaged predictions: ``int()`` of each (toward 0).

    Example:
        >>> truncate_labels(np.array([0.0, 2.5, -0.5]))
        array([0, 2, 0])
    """
    return np.trunc(np.asarray(y, dtype=np.float64)).astype(np.int64)


# --- mteb tasks ----------------------------------------------------------------------------------

# The bootstrapped clustering of mteb 2 is a module function that its task calls by name; the
# ensemble version is swapped in for one evaluation at a time.
_CLUSTERING_LOCK = threading.Lock()


def _split(embeddings: Any, hidden_size: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(embeddings)
    if x.ndim != 2 or x.shape[1] <= hidden_size:
        raise ValueError(
            f"the reference MoEE(sum) task expected [z(hs); z(rw)] rows wider than hidden_size={hidden_size}, got {x.shape}"
        )
    return x[:, :hidden_size], x[:, hidden_size:]


class _Ensemble:
    """What the wrapped tasks share: the split point, the weight, and pickling as the task they wrap."""
    _moee_base: type
    _moee_hidden_size: int
    _moee_sum_weight: float

    def __reduce__(self) -> tuple[Any, ...]:
        # The wrapper class is made at run time and cannot be imported by name: pickle the wrapped
        # task (with its own pickling) and wrap it again when loading.
        base = type(self)._moee_base
        plain = base.__new__(base)
        plain.__dict__.update({k: v for k, v in self.__dict__.items() if k not in ("_moee_hidden_size", "_moee_sum_weight")})
        return (_rewrap, (plain, self._moee_hidden_size, self._moee_sum_weight))


def _rewrap(task: Any, hidden_size: int, sum_weight: float) -> Any:
    return reference_tasks([task], hidden_size=hidden_size, sum_weight=sum_weight)[0]


class _EnsembleClassification(_Ensemble):
    """Classification whose prediction is the average of a classifier on each part."""

    def _evaluate_subset(self, model: Any, *args: Any, **kwargs: Any) -> Any:
        with model.emitting_parts():
            return super()._evaluate_subset(model, *args, **kwargs)  # type: ignore[misc]

    def _run_experiment(self, train_split: Any, eval_split: Any, train_embeddings: Any, test_embeddings: Any, timer: Any) -> Any:
        predictions = []
        for train, test in zip(_split(train_embeddings, self._moee_hidden_size), _split(test_embeddings, self._moee_hidden_size)):
            evaluator = self.evaluator(  # type: ignore[attr-defined]
                train_split, eval_split, label_column_name=self.label_column_name,  # type: ignore[attr-defined]
                evaluator_model=self.evaluator_model, timer=timer,  # type: ignore[attr-defined]
            )
            predictions.append(evaluator(train, test))
        y_pred = truncate_labels(average_predictions(predictions[0], predictions[1], self._moee_sum_weight))
        y_test = eval_split[self.label_column_name]  # type: ignore[attr-defined]
        return self._calculate_scores(y_test, y_pred), y_pred.tolist()  # type: ignore[attr-defined]


class _EnsembleClustering(_Ensemble):
    """Clustering whose assignment is the average of a k-means run on each part."""

    def _evaluate_subset(self, model: Any, *args: Any, **kwargs: Any) -> Any:
        import mteb.abstasks.clustering as clustering

        original = getattr(clustering, "_evaluate_clustering_bootstrapped", None)
        if original is None:
            raise RuntimeError(
                "this mteb version has no mteb.abstasks.clustering._evaluate_clustering_bootstrapped; "
                "the reference MoEE(sum) clustering cannot be run with it"
            )
        hidden, weight = self._moee_hidden_size, self._moee_sum_weight

        def ensemble(embeddings: Any, labels: Any, **options: Any) -> Any:
            return ensemble_clustering_bootstrapped(embeddings, labels, hidden_size=hidden, sum_weight=weight, **options)

        with _CLUSTERING_LOCK, model.emitting_parts():
            clustering._evaluate_clustering_bootstrapped = ensemble
            try:
                return super()._evaluate_subset(model, *args, **kwargs)  # type: ignore[misc]
            finally:
                clustering._evaluate_clustering_bootstrapped = original


def ensemble_clustering_bootstrapped(
    embeddings: Any, labels: list[list[Any]], *, hidden_size: int, sum_weight: float, n_clusters: int, cluster_size: int,
    kmean_batch_size: int, max_depth: int | None, rng_state: random.Random, seed: int,
) -> tuple[dict[str, dict[str, list[float]]], dict[str, list[list[float]]]]:
    """mteb 2's bootstrapped clustering (same samples, same k-means settings), where each sample
    is clustered on ``z(hs)`` and on ``z(rw)`` and the assignment is their average
    (:func:`average_predictions`), as the official MoEE(sum) clustering does."""
    from sklearn.cluster import MiniBatchKMeans
    from sklearn.metrics.cluster import adjusted_mutual_info_score, v_measure_score

    hs, rw = _split(embeddings, hidden_size)
    metric_funcs = {"v_measure": v_measure_score, "ami": adjusted_mutual_info_score}
    scores: dict[str, dict[str, list[float]]] = {m: defaultdict(list) for m in metric_funcs}
    assignments: dict[str, list[list[float]]] = defaultdict(list)
    depth = max(map(len, labels))
    depth = min(max_depth, depth) if max_depth is not None else depth
    for level in range(depth):
        level_labels = np.array([label[level] if len(label) > level else -1 for label in labels])
        valid = np.array([label != -1 for label in level_labels])
        level_labels = level_labels[valid]
        parts = (hs[valid], rw[valid])
        n = len(level_labels)
        for _ in range(n_clusters):
            index = rng_state.choices(range(n), k=cluster_size)
            runs = []
            for part in parts:
                kmeans = MiniBatchKMeans(n_clusters=np.unique(level_labels).size, batch_size=kmean_batch_size,
                                         init="k-means++", n_init=1, random_state=seed)
                runs.append(kmeans.fit_predict(part[index]))
            assignment = average_predictions(runs[0], runs[1], sum_weight)
            with warnings.catch_warnings():
                # Averaged cluster ids are floats by design (the official code scores them as
                # they are); sklearn warns that they look continuous.
                warnings.filterwarnings("ignore", message="Clustering metrics expects discrete values")
                for metric, func in metric_funcs.items():
                    scores[metric][f"Level {level}"].append(float(func(level_labels[index], assignment)))
            assignments[f"Level {level}"].append(assignment.tolist())
    return scores, assignments


_ENSEMBLE_MIXINS = {"Classification": _EnsembleClassification, "Clustering": _EnsembleClustering}


def reference_tasks(tasks: Sequence[Any], *, hidden_size: int, sum_weight: float) -> list[Any]:
    """``tasks`` with every Classification and Clustering task replaced by a copy that computes
    the official MoEE(sum): the average of the predictions of separate HS and RW runs.

    The copies keep the task's name and metadata, so results land where the task's would. Use
    them with a :class:`~.moee.MoEEncoder` made with ``reference=True, embedding="moee_sum"``
    (it refuses those task types otherwise). Other tasks are returned as they are.

    Example:
        >>> enc = MoEEncoder(model, tok, reference=True)  # doctest: +SKIP
        >>> mteb.evaluate(enc, reference_tasks(tasks, hidden_size=enc.hidden_size, sum_weight=1.0))  # doctest: +SKIP
    """
    out = []
    for task in tasks:
        mixin = _ENSEMBLE_MIXINS.get(task.metadata.type)
        if mixin is None or isinstance(task, mixin):
            out.append(task)
            continue
        cls = type(task)
        wrapper = type(f"Reference{cls.__name__}", (mixin, cls), {"__module__": cls.__module__, "_moee_base": cls})
        wrapped = wrapper.__new__(wrapper)
        wrapped.__dict__.update(task.__dict__)  # a shallow copy: the task's data is shared, not copied
        wrapped._moee_hidden_size = int(hidden_size)
        wrapped._moee_sum_weight = float(sum_weight)
        out.append(wrapped)
    return out


__all__ = [
    "ENSEMBLE_TASK_TYPES",
    "average_predictions",
    "ensemble_clustering_bootstrapped",
    "gritlm_instruction",
    "reference_prompt",
    "reference_tasks",
    "truncate_labels",
]
