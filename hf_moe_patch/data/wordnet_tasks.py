"""Local mteb 2 tasks built offline from WordNet 3.0: real English glosses and example sentences.

Five tasks, one per mteb task type, for evaluating training-free sentence embeddings of a small
model without any download:

========================================  ==================  ==============================================
name                                      type                what it measures
========================================  ==================  ==============================================
``WordNetLexnameClassification``          Classification      gloss -> lexicographer file (``noun.artifact``,
                                                              ``verb.motion``, ...), logistic-regression probe
``WordNetSameLemmaPairClassification``    PairClassification  do two glosses define senses of the same word?
``WordNetWuPalmerSTS``                    STS                 noun gloss pairs scored ``5 * Wu-Palmer``
``WordNetExampleRetrieval``               Retrieval           word in an example sentence -> its sense
                                                              (headwords + gloss) among the word's senses
``WordNetLexnameClustering``              Clustering          glosses clustered by lexicographer file
========================================  ==================  ==============================================

By default only synsets on the ``heldout`` side of :func:`hf_moe_patch.data.wordnet.split_of` are used:
the project's demo model is pretrained on the ``train`` side, so the task text is unseen. Sampling
is seeded and independent of hash randomisation (every pool is sorted before a
:class:`random.Random` seeded with a string draws from it), so a given WordNet, split, seed and
sizes always give the same tasks. Construction is cheap (it finds the WordNet folder, raising
:class:`~hf_moe_patch.data.wordnet.WordNetNotFoundError` with install instructions when it is missing,
and fingerprints its files); the data is built in ``load_data``.

Each configuration gets its own task class whose ``metadata.dataset["revision"]`` encodes the
build version, the WordNet files' hash, the split, the seed and the sizes. mteb records it as the
result's ``dataset_revision``. mteb's ``ResultCache`` looks results up by task name and model only
(``overwrite_strategy="only-missing"`` reuses a result of another build), so call
:func:`remove_stale_results` before ``mteb.evaluate``, or use separate cache folders, or
``overwrite_strategy="always"``.

Example:
    >>> WORDNET_TASKS[0]
    'WordNetLexnameClassification'
    >>> import mteb  # doctest: +SKIP
    >>> tasks = wordnet_tasks(seed=0)  # doctest: +SKIP
    >>> mteb.evaluate(model, tasks, cache=mteb.ResultCache("results"))  # doctest: +SKIP

WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import defaultdict
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from mteb.abstasks.abstask import AbsTask
from mteb.abstasks.classification import AbsTaskClassification
from mteb.abstasks.clustering import AbsTaskClustering
from mteb.abstasks.pair_classification import AbsTaskPairClassification
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.sts import AbsTaskSTS
from mteb.abstasks.task_metadata import TaskMetadata

from .wordnet import DATA_FILES, POS_NAMES, Synset, WordNet, find_wordnet_dir, load_wordnet, split_of

BUILD_VERSION = 2
"""Bumped whenever the sampling logic changes, so that the dataset revision changes with it."""

WORDNET_TASKS = (
    "WordNetLexnameClassification",
    "WordNetSameLemmaPairClassification",
    "WordNetWuPalmerSTS",
    "WordNetExampleRetrieval",
    "WordNetLexnameClustering",
)

DEFAULT_SIZES: dict[str, dict[str, int]] = {
    # ~37 noun/verb lexnames on the heldout side have >= 40 synsets: ~600 train + ~900 test glosses.
    "WordNetLexnameClassification": {"train_per_label": 16, "test_per_label": 24},
    # Half positive, half negative; each positive's first gloss is reused in one negative.
    "WordNetSameLemmaPairClassification": {"n_pairs": 800},
    # Five score bins [0,1), [1,2), ..., [4,5] of equal size.
    "WordNetWuPalmerSTS": {"n_pairs": 500},
    # The corpus holds the queries' senses, the other senses of their words, then random synsets.
    "WordNetExampleRetrieval": {"n_queries": 400, "n_corpus": 1000},
    # ~37 lexnames with >= 28 synsets: ~1000 glosses.
    "WordNetLexnameClustering": {"per_label": 28},
}

SPLITS = ("heldout", "train", "all")
CITATION = "WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved."
LICENSE_URL = "https://wordnet.princeton.edu/license-and-commercial-use"
BIBTEX = r"""
@article{miller1995wordnet,
  author = {Miller, George A.},
  doi = {10.1145/219717.219748},
  journal = {Communications of the ACM},
  number = {11},
  pages = {39--41},
  title = {WordNet: A Lexical Database for English},
  volume = {38},
  year = {1995},
}
"""

# Lexicographer files used as classes: every noun and verb file except the handful of top nodes.
_EXCLUDED_LEXNAMES = frozenset({"noun.Tops"})


# --------------------------------------------------------------------------------------------
# Sampling (pure functions over a WordNet; plain Python results)
# --------------------------------------------------------------------------------------------


def _rng(task: str, seed: int) -> random.Random:
    # A string seed goes through SHA-512 in random.Random: stable across runs and hash seeds.
    return random.Random(f"{task}|{seed}")


def synset_pool(wordnet: WordNet, split: str = "heldout", heldout_fraction: float = 0.1) -> list[Synset]:
    """The synsets a task may use, sorted by id: those on ``split`` (``"heldout"``, ``"train"`` or
    ``"all"``) whose gloss is non-empty and unique within that side (a shared gloss would make the
    labels ambiguous)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    pool = [s for s in wordnet if s.definition and (split == "all" or split_of(s, heldout_fraction) == split)]
    counts: dict[str, int] = defaultdict(int)
    for s in pool:
        counts[s.definition] += 1
    return sorted((s for s in pool if counts[s.definition] == 1), key=lambda s: s.id)


def _lexname_groups(pool: list[Synset], min_count: int) -> dict[str, list[Synset]]:
    groups: dict[str, list[Synset]] = defaultdict(list)
    for s in pool:
        if s.pos in ("n", "v") and s.lexname not in _EXCLUDED_LEXNAMES:
            groups[s.lexname].append(s)
    return {label: groups[label] for label in sorted(groups) if len(groups[label]) >= min_count}


def build_lexname_classification(
    wordnet: WordNet, *, split: str = "heldout", seed: int = 0, heldout_fraction: float = 0.1,
    train_per_label: int = 16, test_per_label: int = 24,
) -> dict[str, Any]:
    """Glosses labelled with their lexicographer file; ``train_per_label`` + ``test_per_label``
    synsets of every noun/verb lexname that has that many, so classes are balanced.

    Returns ``{"labels": [...], "train": rows, "test": rows}``, rows being
    ``{"text": [...], "label": [index into labels], "id": [synset id]}``.
    """
    if train_per_label < 1 or test_per_label < 1:
        raise ValueError("train_per_label and test_per_label must be >= 1")
    pool = synset_pool(wordnet, split, heldout_fraction)
    groups = _lexname_groups(pool, train_per_label + test_per_label)
    rng = _rng("WordNetLexnameClassification", seed)
    labels = list(groups)
    out: dict[str, Any] = {"labels": labels}
    rows: dict[str, list[tuple[str, int, str]]] = {"train": [], "test": []}
    for index, label in enumerate(labels):
        chosen = rng.sample(groups[label], train_per_label + test_per_label)
        rows["train"] += [(s.definition, index, s.id) for s in chosen[:train_per_label]]
        rows["test"] += [(s.definition, index, s.id) for s in chosen[train_per_label:]]
    for name, items in rows.items():
        rng.shuffle(items)
        out[name] = {"text": [t for t, _, _ in items], "label": [l for _, l, _ in items], "id": [i for _, _, i in items]}
    return out


def build_lexname_clustering(
    wordnet: WordNet, *, split: str = "heldout", seed: int = 0, heldout_fraction: float = 0.1,
    per_label: int = 28,
) -> dict[str, list[str]]:
    """``per_label`` glosses of every noun/verb lexname with that many synsets, labelled by the
    lexname: ``{"sentences": [...], "labels": [...], "id": [...]}``."""
    if per_label < 1:
        raise ValueError("per_label must be >= 1")
    pool = synset_pool(wordnet, split, heldout_fraction)
    rng = _rng("WordNetLexnameClustering", seed)
    items = []
    for label, members in _lexname_groups(pool, per_label).items():
        items += [(s.definition, label, s.id) for s in rng.sample(members, per_label)]
    rng.shuffle(items)
    return {"sentences": [t for t, _, _ in items], "labels": [l for _, l, _ in items], "id": [i for _, _, i in items]}


def _lemma_keys(s: Synset) -> set[tuple[str, str]]:
    return {(s.pos, lemma.lower()) for lemma in s.lemmas}


def build_same_lemma_pairs(
    wordnet: WordNet, *, split: str = "heldout", seed: int = 0, heldout_fraction: float = 0.1,
    n_pairs: int = 800,
) -> dict[str, list[Any]]:
    """Gloss pairs: ``labels=1`` for two senses of one word (the pair shares a lemma, same part
    of speech), ``labels=0`` for the first of those glosses against a gloss of the same part of
    speech that shares no lemma with it. At most one positive per word and per synset.

    Returns ``{"sentence1", "sentence2", "labels", "id1", "id2"}`` columns, shuffled.
    """
    if n_pairs < 2:
        raise ValueError("n_pairs must be >= 2")
    pool = synset_pool(wordnet, split, heldout_fraction)
    rng = _rng("WordNetSameLemmaPairClassification", seed)
    senses: dict[tuple[str, str], list[Synset]] = defaultdict(list)
    by_pos: dict[str, list[Synset]] = defaultdict(list)
    for s in pool:
        by_pos[s.pos].append(s)
        for key in sorted(_lemma_keys(s)):
            senses[key].append(s)
    words = sorted(key for key, members in senses.items() if len(members) >= 2)
    rng.shuffle(words)

    used: set[str] = set()
    positives: list[tuple[Synset, Synset]] = []
    for word in words:
        if len(positives) == n_pairs // 2:
            break
        free = [s for s in senses[word] if s.id not in used]
        if len(free) < 2:
            continue
        a, b = rng.sample(free, 2)
        used.update((a.id, b.id))
        positives.append((a, b))

    pairs: list[tuple[Synset, Synset, int]] = []
    for a, b in positives:
        pairs.append((a, b, 1))
        a_keys = _lemma_keys(a)
        for _ in range(100):  # rejection sampling: nearly every draw is accepted
            c = rng.choice(by_pos[a.pos])
            if c.id not in used and not (a_keys & _lemma_keys(c)):
                used.add(c.id)
                pairs.append((a, c, 0))
                break
    rng.shuffle(pairs)
    out: dict[str, list[Any]] = {"sentence1": [], "sentence2": [], "labels": [], "id1": [], "id2": []}
    for a, b, label in pairs:
        if rng.random() < 0.5:
            a, b = b, a
        out["sentence1"].append(a.definition)
        out["sentence2"].append(b.definition)
        out["labels"].append(label)
        out["id1"].append(a.id)
        out["id2"].append(b.id)
    return out


def build_wup_sts(
    wordnet: WordNet, *, split: str = "heldout", seed: int = 0, heldout_fraction: float = 0.1,
    n_pairs: int = 500, n_bins: int = 5, max_uses: int = 2,
) -> dict[str, list[Any]]:
    """Noun gloss pairs scored ``5 * wup_similarity``, stratified into ``n_bins`` equal-width
    score bins of (up to) equal size. Random pairs are mostly dissimilar, so partners are drawn
    from near the anchor in the hypernym graph too: a noun of the pool under the anchor's ancestor
    1, 2, 3, 4 or 6 steps up, besides one random noun. A synset appears in at most ``max_uses``
    pairs.

    Returns ``{"sentence1", "sentence2", "score", "id1", "id2"}`` columns, shuffled.
    """
    if n_pairs < 1 or n_bins < 1:
        raise ValueError("n_pairs and n_bins must be >= 1")
    nouns = [s for s in synset_pool(wordnet, split, heldout_fraction) if s.pos == "n"]
    rng = _rng("WordNetWuPalmerSTS", seed)
    ancestors = {s.id: wordnet.ancestors(s.id) for s in nouns}
    below: dict[str, list[str]] = defaultdict(list)  # ancestor -> pool nouns under it (sorted)
    for s in nouns:
        for ancestor in sorted(ancestors[s.id]):
            below[ancestor].append(s.id)
    quota = [n_pairs // n_bins + (1 if b < n_pairs % n_bins else 0) for b in range(n_bins)]
    bins: list[list[tuple[str, str, float]]] = [[] for _ in range(n_bins)]
    uses: dict[str, int] = defaultdict(int)
    seen: set[tuple[str, str]] = set()
    ids = [s.id for s in nouns]

    for _ in range(3):  # passes over the shuffled anchors, until every bin is full
        anchors = ids[:]
        rng.shuffle(anchors)
        for a in anchors:
            if all(len(bins[b]) >= quota[b] for b in range(n_bins)):
                break
            candidates = [rng.choice(ids)]
            for steps in (1, 2, 3, 4, 6):
                ups = sorted(h for h, d in ancestors[a].items() if d == steps)
                if ups:
                    candidates.append(rng.choice(below[rng.choice(ups)]))
            for b_id in candidates:
                if uses[a] >= max_uses:
                    break
                key = (min(a, b_id), max(a, b_id))
                if b_id == a or key in seen or uses[b_id] >= max_uses:
                    continue
                score = 5.0 * wordnet.wup_similarity(a, b_id)
                which = min(int(score * n_bins / 5.0), n_bins - 1)
                if len(bins[which]) >= quota[which]:
                    continue
                bins[which].append((a, b_id, score))
                seen.add(key)
                uses[a] += 1
                uses[b_id] += 1
    pairs = [p for chosen in bins for p in chosen]
    rng.shuffle(pairs)
    out: dict[str, list[Any]] = {"sentence1": [], "sentence2": [], "score": [], "id1": [], "id2": []}
    for a, b, score in pairs:
        if rng.random() < 0.5:
            a, b = b, a
        out["sentence1"].append(wordnet[a].definition)
        out["sentence2"].append(wordnet[b].definition)
        out["score"].append(score)
        out["id1"].append(a)
        out["id2"].append(b)
    return out


def sense_document(s: Synset) -> str:
    """A corpus document of :func:`build_example_retrieval`: the synset's headwords, part of speech
    and gloss, in the form of the demo model's pretraining documents without their examples.

    Example:
        >>> sense_document(Synset("n1", "n", "noun.act", ("disaster",), "an act that has disastrous consequences", ("a real disaster",), ()))
        'disaster (noun): an act that has disastrous consequences.'
    """
    return f"{', '.join(s.lemmas)} ({POS_NAMES[s.pos]}): {s.definition}."


def build_example_retrieval(
    wordnet: WordNet, *, split: str = "heldout", seed: int = 0, heldout_fraction: float = 0.1,
    n_queries: int = 400, n_corpus: int = 1000,
) -> dict[str, Any]:
    """Word sense retrieval: a word in context -> the gloss of its sense.

    Queries are ``"word (pos): example."``: an example sentence of a synset (one per synset,
    chosen at random among its examples) with the word it illustrates, a lemma of the synset that
    has at least one other sense of the same part of speech in the pool (so every query has hard
    distractors). Documents are :func:`sense_document` (``"lemma1, lemma2 (pos): gloss."``): those
    of the query synsets, then one other sense of each query's word, then the other senses of the
    queries' words (hard distractors: they carry the same headword, so only the gloss tells them
    apart), then random synsets, up to ``n_corpus`` documents. Each query's one relevant document is its own synset's (document id = synset id).
    Example sentences never appear in the corpus.

    Returns ``{"corpus": {"id", "text"}, "queries": {"id", "text", "word"}, "relevant_docs": {qid: {docid: 1}}}``.
    """
    if n_queries < 1 or n_corpus < n_queries:
        raise ValueError("need n_queries >= 1 and n_corpus >= n_queries")
    pool = synset_pool(wordnet, split, heldout_fraction)
    rng = _rng("WordNetExampleRetrieval", seed)
    senses: dict[tuple[str, str], list[Synset]] = defaultdict(list)
    for s in pool:
        for key in sorted(_lemma_keys(s)):
            senses[key].append(s)
    candidates = []
    for s in pool:
        # The synset's first lemma (WordNet's order) that names another sense too.
        word = next((l for l in s.lemmas if len(senses[(s.pos, l.lower())]) >= 2), None)
        if s.examples and word is not None:
            candidates.append((s, word))
    rng.shuffle(candidates)
    queries: list[tuple[str, str, str, Synset]] = []
    query_texts: set[str] = set()
    for s, word in candidates:
        if len(queries) == n_queries:
            break
        text = f"{word} ({POS_NAMES[s.pos]}): {rng.choice(s.examples)}."
        if text not in query_texts:
            query_texts.add(text)
            queries.append((f"q-{s.id}", text, word, s))

    corpus = {s.id: s for _, _, _, s in queries}
    # Hard distractors: first one other sense of every query's word (so each query has one even
    # when a very polysemous word's senses outnumber the room left), then all the others.
    others = [sorted(o.id for o in senses[(s.pos, word.lower())] if o.id != s.id) for _, _, word, s in queries]
    first = [rng.choice(ids) for ids in others]
    hard = sorted({i for ids in others for i in ids} - set(first) - corpus.keys())
    rng.shuffle(hard)
    hard = first + hard
    rest = [s.id for s in pool if s.id not in corpus]
    rng.shuffle(rest)
    for synset_id in hard + rest:
        if len(corpus) >= n_corpus:
            break
        corpus.setdefault(synset_id, wordnet[synset_id])
    doc_ids = sorted(corpus)
    rng.shuffle(doc_ids)
    return {
        "corpus": {"id": doc_ids, "text": [sense_document(corpus[d]) for d in doc_ids]},
        "queries": {"id": [q for q, _, _, _ in queries], "text": [t for _, t, _, _ in queries],
                    "word": [w for _, _, w, _ in queries]},
        "relevant_docs": {q: {s.id: 1} for q, _, _, s in queries},
    }


# --------------------------------------------------------------------------------------------
# mteb tasks
# --------------------------------------------------------------------------------------------


class _WordNetTask:
    """Shared behaviour of the WordNet tasks: lazy, deterministic ``load_data``."""

    wordnet_config: ClassVar[dict[str, Any]]
    _builder: ClassVar[Any]
    _summary: ClassVar[str]
    build_stats: dict[str, int] | None = None

    def load_data(self, num_proc: int | None = None, *, timer: Any = None, **kwargs: Any) -> None:
        """Build the task's data from WordNet (parsed once per folder and cached)."""
        if self.data_loaded:
            return
        config = self.wordnet_config
        wordnet = load_wordnet(config["path"])
        built = type(self)._builder(
            wordnet, split=config["split"], seed=config["seed"],
            heldout_fraction=config["heldout_fraction"], **config["sizes"],
        )
        self.dataset, self.build_stats = self._to_dataset(built)
        empty = [k for k, v in self.build_stats.items() if v == 0]
        if empty:
            raise ValueError(
                f"{self.metadata.name}: WordNet at {config['path']} gave no {', '.join(empty)} with "
                f"split={config['split']!r} and sizes {config['sizes']}; use a larger WordNet or smaller sizes."
            )
        base = type(self).metadata
        self.metadata = base.model_copy(update={"description": _describe(type(self)._summary, config, self.build_stats)})
        # mteb seeds these once per task object; reset them so every load evaluates the same way.
        self.rng_state, self.np_rng = random.Random(self.seed), np.random.default_rng(self.seed)
        self.data_loaded = True

    def _to_dataset(self, built: Any) -> tuple[Any, dict[str, int]]:
        raise NotImplementedError

    def __reduce__(self) -> tuple[Any, ...]:
        # The per-configuration class is made at run time; pickle rebuilds it from its config.
        config_json = json.dumps(self.wordnet_config, sort_keys=True)
        return (_restore_task, (type(self).metadata.name, config_json), self.__dict__)


class WordNetLexnameClassification(_WordNetTask, AbsTaskClassification):
    """Gloss -> lexicographer file. A logistic regression is fit once on all training glosses
    (``samples_per_label = train_per_label``, ``n_experiments = 1``)."""

    _builder = staticmethod(build_lexname_classification)
    _summary = (
        "Classify a WordNet gloss (definition) by the lexicographer file of its synset, e.g. "
        "noun.artifact, noun.person, verb.motion: a logistic-regression probe on the embeddings "
        "measures how well they separate coarse semantic categories. Classes are the noun and verb "
        "lexicographer files (noun.Tops excluded) with enough synsets, sampled equally."
    )

    def _to_dataset(self, built: dict[str, Any]) -> tuple[DatasetDict, dict[str, int]]:
        features = Features({"text": Value("string"), "label": ClassLabel(names=built["labels"]), "id": Value("string")})
        dataset = DatasetDict({split: Dataset.from_dict(built[split], features=features) for split in ("train", "test")})
        stats = {"classes": len(built["labels"]), "train glosses": len(built["train"]["text"]),
                 "test glosses": len(built["test"]["text"])}
        return dataset, stats


class WordNetSameLemmaPairClassification(_WordNetTask, AbsTaskPairClassification):
    """Do two glosses define senses of the same word?"""

    _builder = staticmethod(build_same_lemma_pairs)
    _summary = (
        "Decide whether two WordNet glosses define two senses of the same word (positive: the two "
        "synsets share a lemma, e.g. two senses of 'chair') or senses of different words of the "
        "same part of speech (negative: the first gloss of a positive pair against a gloss sharing "
        "no lemma with it). Measures whether embedding similarity reflects polysemy links."
    )

    def _to_dataset(self, built: dict[str, list[Any]]) -> tuple[DatasetDict, dict[str, int]]:
        features = Features({"sentence1": Value("string"), "sentence2": Value("string"), "labels": Value("int64"),
                             "id1": Value("string"), "id2": Value("string")})
        positives = sum(built["labels"])
        stats = {"pairs": len(built["labels"]), "positive pairs": positives,
                 "negative pairs": len(built["labels"]) - positives}
        return DatasetDict({"test": Dataset.from_dict(built, features=features)}), stats


class WordNetWuPalmerSTS(_WordNetTask, AbsTaskSTS):
    """Noun gloss pairs scored by Wu-Palmer similarity of their synsets, scaled to [0, 5]."""

    _builder = staticmethod(build_wup_sts)
    _summary = (
        "Semantic similarity of two WordNet noun glosses, with the gold score 5 x the Wu-Palmer "
        "similarity of their synsets in the hypernym hierarchy (NLTK's definition). Pairs are "
        "stratified into five equal score bins, partners drawn from near the first synset in the "
        "hierarchy as well as at random, so the scores spread over [0, 5]."
    )

    def _to_dataset(self, built: dict[str, list[Any]]) -> tuple[DatasetDict, dict[str, int]]:
        features = Features({"sentence1": Value("string"), "sentence2": Value("string"), "score": Value("float64"),
                             "id1": Value("string"), "id2": Value("string")})
        return DatasetDict({"test": Dataset.from_dict(built, features=features)}), {"pairs": len(built["score"])}


class WordNetExampleRetrieval(_WordNetTask, AbsTaskRetrieval):
    """A word in an example sentence -> its sense: ``"word (pos): example."`` -> ``"lemmas (pos): gloss."``."""

    _builder = staticmethod(build_example_retrieval)
    _summary = (
        "Word sense retrieval: for a query 'word (pos): example sentence.' taken from WordNet, "
        "retrieve the sense the example illustrates, among documents 'lemma1, lemma2 (pos): gloss.' "
        "that hold every other sense of the query's word (hard distractors: same headword, another "
        "gloss) and random synsets. Every query's word has at least two senses; one relevant "
        "document per query; example sentences never appear in the corpus."
    )

    def _to_dataset(self, built: dict[str, Any]) -> tuple[dict[str, Any], dict[str, int]]:
        split_data = {
            "corpus": Dataset.from_dict({**built["corpus"], "title": [""] * len(built["corpus"]["id"])}),
            "queries": Dataset.from_dict({k: built["queries"][k] for k in ("id", "text")}),
            "relevant_docs": built["relevant_docs"],
            "top_ranked": None,
        }
        stats = {"queries": len(built["queries"]["id"]), "corpus senses": len(built["corpus"]["id"])}
        return {"default": {"test": split_data}}, stats


class WordNetLexnameClustering(_WordNetTask, AbsTaskClustering):
    """Glosses clustered by lexicographer file; every gloss is embedded and each of the 10
    k-means runs clusters a bootstrap sample of the dataset's size."""

    _builder = staticmethod(build_lexname_clustering)
    _summary = (
        "Cluster WordNet glosses by the lexicographer file of their synsets (noun and verb files "
        "such as noun.animal or verb.change, noun.Tops excluded, equally many glosses each); "
        "measures whether embeddings group glosses by coarse semantic category (V-measure)."
    )
    max_fraction_of_documents_to_embed = None
    max_document_to_embed = None

    def _to_dataset(self, built: dict[str, list[str]]) -> tuple[DatasetDict, dict[str, int]]:
        self.max_documents_per_cluster = len(built["sentences"])
        stats = {"glosses": len(built["sentences"]), "clusters": len(set(built["labels"]))}
        return DatasetDict({"test": Dataset.from_dict(built)}), stats


WORDNET_TASK_CLASSES: dict[str, type[_WordNetTask]] = {
    "WordNetLexnameClassification": WordNetLexnameClassification,
    "WordNetSameLemmaPairClassification": WordNetSameLemmaPairClassification,
    "WordNetWuPalmerSTS": WordNetWuPalmerSTS,
    "WordNetExampleRetrieval": WordNetExampleRetrieval,
    "WordNetLexnameClustering": WordNetLexnameClustering,
}
"""Task name -> base class; :func:`wordnet_tasks` derives one subclass per configuration."""

_METADATA: dict[str, dict[str, Any]] = {
    "WordNetLexnameClassification": dict(
        type="Classification", category="t2c", main_score="accuracy", annotations_creators="expert-annotated",
        task_subtypes=["Topic classification"], prompt="Classify the semantic category of the dictionary definition",
    ),
    "WordNetSameLemmaPairClassification": dict(
        type="PairClassification", category="t2t", main_score="max_ap", annotations_creators="derived",
        prompt="Retrieve definitions of other senses of the same word",
    ),
    "WordNetWuPalmerSTS": dict(
        type="STS", category="t2t", main_score="cosine_spearman", annotations_creators="derived",
        prompt="Retrieve semantically similar dictionary definitions",
    ),
    "WordNetExampleRetrieval": dict(
        type="Retrieval", category="t2t", main_score="ndcg_at_10", annotations_creators="expert-annotated",
        prompt={"query": "Given a word and an example sentence, retrieve the dictionary entry of the word sense it uses"},
    ),
    "WordNetLexnameClustering": dict(
        type="Clustering", category="t2c", main_score="v_measure", annotations_creators="expert-annotated",
        task_subtypes=["Thematic clustering"], prompt="Identify the semantic category of the dictionary definition",
    ),
}


def _describe(summary: str, config: Mapping[str, Any], stats: Mapping[str, int] | None = None) -> str:
    if config["split"] == "all":
        side = "all synsets"
    else:
        side = (f"only synsets on the '{config['split']}' side of hf_moe_patch.data.wordnet.split_of "
                f"(heldout_fraction={config['heldout_fraction']})")
    sizes = ", ".join(f"{k}={v}" for k, v in config["sizes"].items())
    built = "" if stats is None else " Built: " + ", ".join(f"{v} {k}" for k, v in stats.items()) + "."
    return (f"{summary} Sampled with seed {config['seed']} from {side}; sizes {sizes}.{built} "
            f"Source: WordNet 3.0 (https://wordnet.princeton.edu/). {CITATION}")


@lru_cache(maxsize=16)
def _fingerprint(directory: str, stamp: tuple[tuple[int, int], ...]) -> str:
    digest = hashlib.sha256()
    for name in DATA_FILES.values():
        with open(Path(directory) / name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def wordnet_fingerprint(path: str | os.PathLike | None = None) -> str:
    """SHA-256 of the four ``data.*`` files (cached while their sizes and mtimes are unchanged)."""
    directory = find_wordnet_dir(path).resolve()
    stamp = tuple((st.st_size, st.st_mtime_ns) for st in (os.stat(directory / n) for n in DATA_FILES.values()))
    return _fingerprint(str(directory), stamp)


@lru_cache(maxsize=64)
def _task_class(name: str, config_json: str) -> type[AbsTask]:
    config = json.loads(config_json)
    base = WORDNET_TASK_CLASSES[name]
    # The folder is left out: the same files elsewhere give the same revision.
    identity = {k: v for k, v in config.items() if k != "path"}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    fraction = "" if config["heldout_fraction"] == 0.1 else f"{config['heldout_fraction']:g}"
    revision = f"v{BUILD_VERSION}-wn{config['fingerprint'][:10]}-{config['split']}{fraction}-seed{config['seed']}-{digest}"
    metadata = TaskMetadata(
        name=name,
        description=_describe(base._summary, config),
        reference="https://wordnet.princeton.edu/",
        dataset={"path": f"local/wordnet-3.0/{name}", "revision": revision},
        eval_splits=["test"],
        eval_langs=["eng-Latn"],
        date=("2006-01-01", "2006-12-31"),
        domains=["Non-fiction", "Written"],
        license=LICENSE_URL,
        dialect=[],
        sample_creation="found",
        bibtex_citation=BIBTEX,
        modalities=["text"],
        **_METADATA[name],
    )
    attributes: dict[str, Any] = {"metadata": metadata, "wordnet_config": config, "__module__": __name__,
                                  "__qualname__": base.__qualname__, "__doc__": base.__doc__}
    if name == "WordNetLexnameClassification":
        attributes.update(samples_per_label=config["sizes"]["train_per_label"], n_experiments=1)
    return type(base.__name__, (base,), attributes)


def _restore_task(name: str, config_json: str) -> AbsTask:
    cls = _task_class(name, config_json)
    return cls.__new__(cls)


def wordnet_tasks(
    names: str | Iterable[str] | None = None,
    *,
    path: str | os.PathLike | None = None,
    split: str = "heldout",
    seed: int = 0,
    heldout_fraction: float = 0.1,
    sizes: Mapping[str, Mapping[str, int]] | None = None,
) -> list[AbsTask]:
    """The WordNet mteb tasks ``names`` (default: all of :data:`WORDNET_TASKS`), built lazily.

    Args:
        names: task names from :data:`WORDNET_TASKS` (one name or several).
        path: folder with WordNet's ``data.*`` files; default ``$HF_MOE_PATCH_WORDNET`` or the
            system install (see :func:`hf_moe_patch.data.wordnet.find_wordnet_dir`).
        split: ``"heldout"`` (default; text the demo model never saw), ``"train"`` or ``"all"``.
        seed: sampling seed; also the tasks' mteb seed (classifier, k-means).
        heldout_fraction: passed to :func:`~hf_moe_patch.data.wordnet.split_of`.
        sizes: per-task overrides of :data:`DEFAULT_SIZES`, e.g.
            ``{"WordNetWuPalmerSTS": {"n_pairs": 200}}``.

    Raises:
        WordNetNotFoundError: no WordNet at ``path`` (the message says how to install it).
        ValueError: an unknown task name, size name or split.
    """
    if names is None:
        names = WORDNET_TASKS
    elif isinstance(names, str):
        names = [names]
    names = list(names)
    unknown = [n for n in names if n not in WORDNET_TASK_CLASSES]
    if unknown:
        raise ValueError(f"unknown WordNet task(s) {unknown}; choose from {list(WORDNET_TASKS)}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    sizes = dict(sizes or {})
    for name, overrides in sizes.items():
        if name not in DEFAULT_SIZES:
            raise ValueError(f"sizes given for unknown task {name!r}; choose from {list(WORDNET_TASKS)}")
        bad = sorted(set(overrides) - set(DEFAULT_SIZES[name]))
        if bad:
            raise ValueError(f"unknown sizes {bad} for {name}; valid: {sorted(DEFAULT_SIZES[name])}")
    directory = find_wordnet_dir(path).resolve()
    fingerprint = wordnet_fingerprint(directory)
    tasks = []
    for name in names:
        task_sizes = {**DEFAULT_SIZES[name], **sizes.get(name, {})}
        config = {"path": str(directory), "fingerprint": fingerprint, "split": split, "seed": int(seed),
                  "heldout_fraction": float(heldout_fraction), "sizes": {k: int(v) for k, v in task_sizes.items()}}
        tasks.append(_task_class(name, json.dumps(config, sort_keys=True))(seed=int(seed)))
    return tasks


def remove_stale_results(cache: Any, model: Any, tasks: Iterable[AbsTask]) -> list[Path]:
    """Delete the results of ``tasks`` cached for ``model`` that were computed on another build.

    mteb's ``ResultCache`` keys results by model and task name only, and ``mteb.evaluate``'s
    default ``overwrite_strategy="only-missing"`` then reuses a complete result whatever its
    ``dataset_revision``. Call this before ``mteb.evaluate`` so that a task whose seed, split,
    sizes or WordNet changed is evaluated again. ``model`` is an mteb ``ModelMeta`` or a model with
    ``mteb_model_meta``. Returns the deleted files.
    """
    meta = getattr(model, "mteb_model_meta", model)
    removed = []
    for task in tasks:
        path = Path(cache.get_task_result_path(task.metadata.name, meta))
        if not path.is_file():
            continue
        try:
            revision = json.loads(path.read_text(encoding="utf-8")).get("dataset_revision")
        except (OSError, ValueError, AttributeError):
            revision = None
        if revision != task.metadata.revision:
            path.unlink()
            removed.append(path)
    return removed


def get_wordnet_task(name: str, **kwargs: Any) -> AbsTask:
    """One task by name; keyword arguments as for :func:`wordnet_tasks`."""
    return wordnet_tasks([name], **kwargs)[0]


__all__ = [
    "DEFAULT_SIZES",
    "WORDNET_TASKS",
    "WORDNET_TASK_CLASSES",
    "build_example_retrieval",
    "build_lexname_classification",
    "build_lexname_clustering",
    "build_same_lemma_pairs",
    "build_wup_sts",
    "sense_document",
    "get_wordnet_task",
    "remove_stale_results",
    "synset_pool",
    "wordnet_fingerprint",
    "wordnet_tasks",
]
