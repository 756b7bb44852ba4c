"""WordNet reader and the local mteb tasks built from it, on the small fixture in
``tests/fixtures/wordnet`` (a hypernym-closed subset of WordNet 3.0, see its ``make_fixture.py``)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import subprocess
import sys
import time
import zlib
from pathlib import Path

import mteb
import numpy as np
import pytest
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta, ScoringFunction

from hf_moe_patch.data.wordnet import (
    ENV_VAR,
    POS_NAMES,
    WordNetNotFoundError,
    find_wordnet_dir,
    load_wordnet,
    parse_data_line,
    split_of,
)
from hf_moe_patch.data.wordnet_tasks import (
    BUILD_VERSION,
    DEFAULT_SIZES,
    WORDNET_TASK_CLASSES,
    WORDNET_TASKS,
    build_example_retrieval,
    build_lexname_classification,
    build_lexname_clustering,
    build_same_lemma_pairs,
    build_wup_sts,
    get_wordnet_task,
    sense_document,
    remove_stale_results,
    synset_pool,
    wordnet_tasks,
)

FIXTURE = Path(__file__).parent / "fixtures" / "wordnet"
REAL = Path("/usr/share/wordnet")
from conftest import SMALL_TASKS as SMALL  # noqa: E402  (sizes the fixture database can fill)
# sha256 (first 16 hex digits) of each builder's output on the fixture with seed 0 and SMALL sizes:
# they pin the sampling, the same in every run and under every hash seed. A deliberate change to
# the sampling must bump wordnet_tasks.BUILD_VERSION (part of the dataset revision) and update these.
PINNED = {
    "WordNetLexnameClassification": "2a889f718367d523",
    "WordNetSameLemmaPairClassification": "2bc61d692bf8035f",
    "WordNetWuPalmerSTS": "0aab8036661245bf",
    "WordNetExampleRetrieval": "8a87cefac6bbce61",
    "WordNetLexnameClustering": "b8331db2a416c1d1",
}
BUILDERS = {
    "WordNetLexnameClassification": build_lexname_classification,
    "WordNetSameLemmaPairClassification": build_same_lemma_pairs,
    "WordNetWuPalmerSTS": build_wup_sts,
    "WordNetExampleRetrieval": build_example_retrieval,
    "WordNetLexnameClustering": build_lexname_clustering,
}


@pytest.fixture(scope="module")
def wn():
    return load_wordnet(FIXTURE)


def by_lemma(wn, lemma: str, pos: str) -> list:
    return [s for s in wn if s.pos == pos and lemma in s.lemmas]


def built(wn, name: str, seed: int = 0, split: str = "heldout"):
    return BUILDERS[name](wn, split=split, seed=seed, **SMALL[name])


def ids_of(name: str, data) -> set[str]:
    """Every synset id a built task uses."""
    if name == "WordNetLexnameClassification":
        return set(data["train"]["id"]) | set(data["test"]["id"])
    if name == "WordNetLexnameClustering":
        return set(data["id"])
    if name == "WordNetExampleRetrieval":
        return set(data["corpus"]["id"])
    return set(data["id1"]) | set(data["id2"])


# --- the reader ---------------------------------------------------------------------------------


def test_fixture_is_valid_wordnet_data():
    for name in ("data.noun", "data.verb", "data.adj", "data.adv"):
        raw = (FIXTURE / name).read_bytes()
        lines = raw.split(b"\n")
        assert lines[0].startswith(b"  1 This software and database")  # the license header
        for line in lines:
            if line and not line.startswith(b"  "):
                offset = int(line[:8])  # the first field is the line's own byte offset
                assert raw[offset : offset + len(line)] == line
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in (FIXTURE / "LICENSE").read_text()


def test_parser_fields(wn):
    assert len(wn) == 325
    entity = wn["n00001740"]
    assert (entity.lemmas, entity.lexname, entity.hypernyms) == (("entity",), "noun.Tops", ())
    assert [s.id for s in wn if s.pos == "n" and not s.hypernyms] == ["n00001740"]  # a single noun root

    chair = wn["n00012279"]
    assert chair.lemmas == ("chair",) and chair.lexname == "noun.artifact"
    assert chair.definition == "a seat for one person, with a support for the back"
    assert chair.examples == ("he put his coat over the back of the chair and sat down",)
    assert chair.hypernyms == ("n00017450",) and wn["n00017450"].lemmas == ("seat",)

    fagin = wn["n00034239"]  # an instance hypernym (@i) counts as a hypernym
    assert fagin.hypernyms == ("n00034001",) and wn["n00034001"].lemmas[0] == "fictional character"

    change = wn["v00002255"]  # "change 1 alter 1 modify a": hex lex_ids; only a cause (>) pointer
    assert change.lemmas == ("change", "alter", "modify") and change.lexname == "verb.change"
    assert change.hypernyms == () and change.definition == "cause to change; make different; cause a transformation"
    assert change.examples[0] == "The advent of the automobile may have altered the growth pattern of the city"
    boil = wn["v00005261"]  # verb frames after the pointers are skipped
    assert boil.lemmas == ("boil",) and boil.examples == ("Water boils at 100 degrees Celsius",)
    assert boil.hypernyms == ("v00003321",) and wn["v00003321"].lemmas == ("change state", "turn")

    satellite = wn["a00001953"]  # ss_type "s" is reported as pos "a"
    assert satellite.pos == "a" and satellite.lexname == "adj.all"
    assert satellite.lemmas[:3] == ("conjectural", "divinatory", "hypothetical")
    assert satellite.definition == "based primarily on surmise rather than adequate evidence"
    assert len(satellite.examples) == 4 and satellite.hypernyms == ()


def test_parse_line_with_adjective_marker():
    s = parse_data_line("00024619 00 s 02 used_to(p) 0 wont_to(p) 0 001 & 00024417 a 0000 | in the habit; "
                        '"I am used to hitchhiking"; "you\'ll get used to the idea"  \n')
    assert (s.id, s.pos, s.lemmas) == ("a00024619", "a", ("used to", "wont to"))
    assert s.definition == "in the habit" and s.examples == ("I am used to hitchhiking", "you'll get used to the idea")


def test_wu_palmer_hand_computed(wn):
    # chair (seat for one) <- seat <- furniture <- furnishing <- instrumentality;
    # chair (orchestra)    <- seat <- support <- device   <- instrumentality;
    # instrumentality <- artifact <- whole <- object <- physical entity <- entity: depth 6 nodes.
    assert wn.wup_similarity("n00012279", "n00012440") == pytest.approx(2 * 6 / (4 + 4 + 2 * 6))
    # chair and Fagin meet only at entity (depth 1), 9 steps from each.
    assert wn.wup_similarity("n00012279", "n00034239") == pytest.approx(2 / (9 + 9 + 2))
    # seat (furniture) and its hyponym chair: the seat is the LCS, depth 9.
    assert wn.wup_similarity("n00012279", "n00017450") == pytest.approx(2 * 9 / (1 + 0 + 2 * 9))
    assert wn.wup_similarity("n00012279", "n00012279") == 1.0
    assert wn.wup_similarity("n00012279", "v00002255") is None  # different parts of speech


def test_split_of_is_deterministic_and_by_first_lemma(wn):
    sides = [split_of(s) for s in wn]
    assert sides == [split_of(s) for s in wn]
    assert 0 < sides.count("heldout") < len(sides)
    chair_senses = by_lemma(wn, "chair", "n")
    assert len(chair_senses) >= 2 and {split_of(s) for s in chair_senses} == {"heldout"}
    assert split_of(wn["n00001740"], heldout_fraction=0.0) == "train"
    assert split_of(wn["n00001740"], heldout_fraction=1.0) == "heldout"


def test_split_of_ignores_hash_seed(wn):
    """The same sides in an interpreter with another hash seed (crc32, not hash())."""
    code = (  # load the reader alone: the package __init__ would import torch
        "import sys, types\n"
        "pkg = types.ModuleType('hf_moe_patch'); pkg.__path__ = [sys.argv[1]]; sys.modules['hf_moe_patch'] = pkg\n"
        "from hf_moe_patch.data.wordnet import load_wordnet, split_of\n"
        "print(''.join(split_of(s)[0] for s in load_wordnet(sys.argv[2])))\n"
    )
    package = Path(__file__).parents[1] / "hf_moe_patch"
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code, str(package), str(FIXTURE)],
                         capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "".join(split_of(s)[0] for s in wn)


def test_missing_wordnet(tmp_path, monkeypatch):
    with pytest.raises(WordNetNotFoundError, match="apt-get install wordnet-base"):
        load_wordnet(tmp_path)
    with pytest.raises(WordNetNotFoundError, match="apt-get install wordnet-base"):
        wordnet_tasks(path=tmp_path)
    with pytest.raises(FileNotFoundError):  # it is a FileNotFoundError too
        get_wordnet_task("WordNetWuPalmerSTS", path=tmp_path / "nowhere")
    monkeypatch.setenv(ENV_VAR, str(FIXTURE))
    assert find_wordnet_dir() == FIXTURE


# --- the task builders ----------------------------------------------------------------------------


def test_pool_respects_split(wn):
    held, train, every = (synset_pool(wn, split) for split in ("heldout", "train", "all"))
    assert held and train and {split_of(s) for s in held} == {"heldout"} and {split_of(s) for s in train} == {"train"}
    assert {s.id for s in held} | {s.id for s in train} == {s.id for s in every}
    assert len({s.definition for s in every}) == len(every)
    with pytest.raises(ValueError):
        synset_pool(wn, "test")


@pytest.mark.parametrize("name", WORDNET_TASKS)
def test_builders_deterministic_seeded_and_heldout_only(wn, name):
    first, again, other = built(wn, name), built(wn, name), built(wn, name, seed=1)
    assert json.dumps(first, sort_keys=True) == json.dumps(again, sort_keys=True)
    assert json.dumps(first, sort_keys=True) != json.dumps(other, sort_keys=True)
    assert {split_of(wn[i]) for i in ids_of(name, first)} == {"heldout"}
    everything = built(wn, name, split="all")
    assert {split_of(wn[i]) for i in ids_of(name, everything)} == {"heldout", "train"}


def test_builders_pinned(wn):
    digests = {n: hashlib.sha256(json.dumps(built(wn, n), sort_keys=True).encode()).hexdigest()[:16] for n in BUILDERS}
    assert (BUILD_VERSION, digests) == (2, PINNED)


def test_classification_labels_are_lexnames(wn):
    data = built(wn, "WordNetLexnameClassification")
    labels = data["labels"]
    assert labels == sorted(labels) and len(labels) >= 8
    assert all(l.split(".")[0] in ("noun", "verb") and l != "noun.Tops" for l in labels)
    for split, per_label in (("train", 2), ("test", 3)):
        rows = data[split]
        assert len(rows["text"]) == per_label * len(labels)
        assert np.bincount(rows["label"]).tolist() == [per_label] * len(labels)  # balanced
        for text, label, synset_id in zip(rows["text"], rows["label"], rows["id"]):
            assert wn[synset_id].definition == text and wn[synset_id].lexname == labels[label]
    assert not set(data["train"]["id"]) & set(data["test"]["id"])


def test_clustering_labels_are_lexnames(wn):
    data = built(wn, "WordNetLexnameClustering")
    counts = {l: data["labels"].count(l) for l in set(data["labels"])}
    assert len(counts) >= 8 and set(counts.values()) == {4}
    assert len(set(data["id"])) == len(data["id"])
    for text, label, synset_id in zip(data["sentences"], data["labels"], data["id"]):
        assert wn[synset_id].definition == text and wn[synset_id].lexname == label


def test_pair_labels_match_shared_lemmas(wn):
    data = built(wn, "WordNetSameLemmaPairClassification")
    assert len(data["labels"]) == 30 and sum(data["labels"]) == 15
    shared = lambda a, b: {l.lower() for l in a.lemmas} & {l.lower() for l in b.lemmas}  # noqa: E731
    for s1, s2, label, i1, i2 in zip(data["sentence1"], data["sentence2"], data["labels"], data["id1"], data["id2"]):
        a, b = wn[i1], wn[i2]
        assert (a.definition, b.definition) == (s1, s2) and a.id != b.id
        assert a.pos == b.pos
        assert bool(shared(a, b)) == bool(label)
    for seed in range(20):  # many more negatives: none may share a lemma by chance
        more = build_same_lemma_pairs(wn, split="all", seed=seed, n_pairs=200)
        assert 2 * sum(more["labels"]) == len(more["labels"]) > 60  # as many positives as the fixture has
        for i1, i2, label in zip(more["id1"], more["id2"], more["labels"]):
            assert bool(shared(wn[i1], wn[i2])) == bool(label) and wn[i1].pos == wn[i2].pos


def test_sts_scores_are_scaled_wup_and_spread(wn):
    data = built(wn, "WordNetWuPalmerSTS")
    assert len(data["score"]) == 40
    for s1, s2, score, i1, i2 in zip(data["sentence1"], data["sentence2"], data["score"], data["id1"], data["id2"]):
        assert wn[i1].pos == wn[i2].pos == "n" and i1 != i2
        assert (wn[i1].definition, wn[i2].definition) == (s1, s2)
        assert score == pytest.approx(5 * wn.wup_similarity(i1, i2))
    assert np.bincount(np.minimum(np.array(data["score"]).astype(int), 4)).tolist() == [8] * 5
    assert len({tuple(sorted(p)) for p in zip(data["id1"], data["id2"])}) == 40


def test_retrieval_qrels_point_to_the_query_synset_sense(wn):
    data = built(wn, "WordNetExampleRetrieval")
    corpus = dict(zip(data["corpus"]["id"], data["corpus"]["text"]))
    queries = dict(zip(data["queries"]["id"], data["queries"]["text"]))
    assert len(queries) == 30 and len(corpus) == 80 and set(data["relevant_docs"]) == set(queries)
    for (query_id, relevant), word in zip(data["relevant_docs"].items(), data["queries"]["word"]):
        (doc_id, score), = relevant.items()
        synset = wn[doc_id]
        assert score == 1 and query_id == f"q-{doc_id}" and word in synset.lemmas
        assert corpus[doc_id] == sense_document(synset) == f"{', '.join(synset.lemmas)} ({POS_NAMES[synset.pos]}): {synset.definition}."
        prefix = f"{word} ({POS_NAMES[synset.pos]}): "
        assert queries[query_id].startswith(prefix) and queries[query_id][len(prefix):-1] in synset.examples


@pytest.mark.parametrize("where", ["fixture", "real"])
def test_retrieval_is_neither_trivial_nor_unanswerable(wn, where):
    """Structure that keeps the task informative: every query's sense is in the corpus, every
    query's word has other senses there (hard distractors with the same headword, so the headword
    alone does not answer it), and no query appears in a document nor its example in its answer."""
    if where == "real":
        if not (REAL / "data.noun").is_file():
            pytest.skip("WordNet 3.0 is not installed in /usr/share/wordnet")
        wordnet, data = load_wordnet(REAL), build_example_retrieval(load_wordnet(REAL))
    else:
        wordnet, data = wn, built(wn, "WordNetExampleRetrieval")
    corpus = dict(zip(data["corpus"]["id"], data["corpus"]["text"]))
    assert len(set(data["corpus"]["id"])) == len(corpus) and len(set(data["queries"]["text"])) == len(data["queries"]["text"])
    hard_per_query = []
    for (query_id, relevant), text, word in zip(data["relevant_docs"].items(), data["queries"]["text"], data["queries"]["word"]):
        (gold,) = relevant
        assert gold in corpus  # answerable
        pos = wordnet[gold].pos
        hard = [d for d in corpus if d != gold and wordnet[d].pos == pos and word.lower() in {l.lower() for l in wordnet[d].lemmas}]
        assert all(corpus[d] != corpus[gold] for d in hard)  # told apart by the gloss
        hard_per_query.append(len(hard))
        example = text.split("): ", 1)[1][:-1]
        assert example.lower() not in corpus[gold].lower()  # the answer does not quote the query
        assert not any(text.lower() in doc.lower() for doc in corpus.values())
    # Every query has a same-headword distractor in the corpus.
    assert min(hard_per_query) >= 1 and np.mean(hard_per_query) >= 1.5


def test_builders_reject_bad_sizes(wn):
    with pytest.raises(ValueError):
        build_example_retrieval(wn, n_queries=10, n_corpus=5)
    with pytest.raises(ValueError):
        wordnet_tasks(["WordNetNope"], path=FIXTURE)
    with pytest.raises(ValueError, match="unknown sizes"):
        wordnet_tasks(path=FIXTURE, sizes={"WordNetWuPalmerSTS": {"pairs": 3}})
    with pytest.raises(ValueError, match="split"):
        wordnet_tasks(path=FIXTURE, split="test")
    task = get_wordnet_task("WordNetLexnameClassification", path=FIXTURE,
                            sizes={"WordNetLexnameClassification": {"train_per_label": 400, "test_per_label": 1}})
    with pytest.raises(ValueError, match="smaller sizes"):
        task.load_data()


# --- the mteb tasks -----------------------------------------------------------------------------


def test_task_metadata_and_lazy_datasets():
    assert tuple(WORDNET_TASK_CLASSES) == WORDNET_TASKS and set(DEFAULT_SIZES) == set(WORDNET_TASKS)
    tasks = wordnet_tasks(path=FIXTURE, sizes=SMALL)
    assert [t.metadata.name for t in tasks] == list(WORDNET_TASKS)
    types = [t.metadata.type for t in tasks]
    assert types == ["Classification", "PairClassification", "STS", "Retrieval", "Clustering"]
    for task in tasks:
        meta = task.metadata
        assert not task.data_loaded and isinstance(task, WORDNET_TASK_CLASSES[meta.name])
        assert meta.eval_splits == ["test"] and meta.eval_langs == ["eng-Latn"]
        assert "WordNet 3.0 Copyright 2006 by Princeton University" in meta.description
        assert meta.dataset["path"] == f"local/wordnet-3.0/{meta.name}"
        assert "-heldout-seed0-" in meta.revision
        assert meta.reference == "https://wordnet.princeton.edu/"
    # Same configuration, same class and revision; other seed, split or sizes: another revision.
    again = wordnet_tasks(path=FIXTURE, sizes=SMALL)
    assert [type(t) for t in again] == [type(t) for t in tasks]
    revisions = {t.metadata.revision for t in tasks}
    for kwargs in ({"seed": 1}, {"split": "all"}, {"sizes": {**SMALL, "WordNetWuPalmerSTS": {"n_pairs": 20}}}):
        changed = wordnet_tasks(path=FIXTURE, **{"sizes": SMALL, **kwargs})
        assert sum(t.metadata.revision not in revisions for t in changed) == (1 if "sizes" in kwargs else 5)

    for task in tasks:  # picklable despite the run-time classes (e.g. for worker processes)
        copy = pickle.loads(pickle.dumps(task))
        assert type(copy) is type(task) and copy.metadata == task.metadata and copy.seed == task.seed

    classification, pairs, sts, retrieval, clustering = tasks
    for task in tasks:
        task.load_data()
        assert "Built: " in task.metadata.description
    assert classification.samples_per_label == 2 and classification.n_experiments == 1
    train = classification.dataset["train"]
    assert len(train) == 2 * train.features["label"].num_classes and len(classification.dataset["test"]) == 1.5 * len(train)
    assert train.features["label"].names[train[0]["label"]] == load_wordnet(FIXTURE)[train[0]["id"]].lexname
    assert pairs.dataset["test"].column_names[:3] == ["sentence1", "sentence2", "labels"]
    assert set(sts.dataset["test"].column_names) >= {"sentence1", "sentence2", "score"}
    split_data = retrieval.dataset["default"]["test"]
    assert len(split_data["queries"]) == 30 and len(split_data["corpus"]) == 80
    assert set(split_data["corpus"].column_names) == {"id", "text", "title"}
    assert clustering.max_documents_per_cluster == len(clustering.dataset["test"]) == clustering.build_stats["glosses"]
    assert clustering.max_fraction_of_documents_to_embed is None
    copy = pickle.loads(pickle.dumps(retrieval))
    assert copy.data_loaded and copy.dataset["default"]["test"]["relevant_docs"] == split_data["relevant_docs"]


class CharTrigramEncoder(AbsEncoder):
    """A trivial but real encoder: hashed character trigrams, L2-normalised."""

    dim = 128
    mteb_model_meta = ModelMeta.create_empty(overwrites={
        "name": "hf_moe_patch-tests/char-trigram-hash", "revision": "1", "embed_dim": dim,
        "similarity_fn_name": ScoringFunction.COSINE, "modalities": ["text"], "framework": [],
    })

    def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs):
        rows = []
        for batch in inputs:
            for text in batch["text"]:
                vec = np.zeros(self.dim, dtype=np.float32)
                padded = f"  {text.lower()} "
                for i in range(len(padded) - 2):
                    vec[zlib.crc32(padded[i : i + 3].encode()) % self.dim] += 1.0
                rows.append(vec / max(float(np.linalg.norm(vec)), 1e-9))
        return np.stack(rows)


def test_mteb_evaluate_end_to_end(tmp_path):
    tasks = wordnet_tasks(path=FIXTURE, sizes=SMALL)
    results = mteb.evaluate(CharTrigramEncoder(), tasks, cache=mteb.ResultCache(tmp_path), overwrite_strategy="always")
    by_name = {r.task_name: r for r in results.task_results}
    assert set(by_name) == set(WORDNET_TASKS)
    for task in tasks:
        result = by_name[task.metadata.name]
        (scores,) = result.scores["test"]
        assert math.isfinite(scores["main_score"]), (task.metadata.name, scores)
        assert scores["main_score"] == scores[task.metadata.main_score]
        assert result.dataset_revision == task.metadata.revision
    assert by_name["WordNetWuPalmerSTS"].scores["test"][0]["main_score"] > 0  # gloss overlap tracks wup a little
    saved = list(tmp_path.rglob("WordNetWuPalmerSTS.json"))
    assert saved and json.loads(saved[0].read_text())["dataset_revision"].startswith("v2-wn")

    # mteb would reuse the cached result of another build of a task; remove_stale_results drops it.
    cache, encoder = mteb.ResultCache(tmp_path), CharTrigramEncoder()
    assert remove_stale_results(cache, encoder, wordnet_tasks(path=FIXTURE, sizes=SMALL)) == []
    reseeded = wordnet_tasks(["WordNetWuPalmerSTS"], path=FIXTURE, sizes=SMALL, seed=1)
    assert remove_stale_results(cache, encoder, reseeded) == saved
    (result,) = mteb.evaluate(encoder, reseeded, cache=cache).task_results
    assert result.dataset_revision == reseeded[0].metadata.revision != tasks[2].metadata.revision


@pytest.mark.skipif(not (REAL / "data.noun").is_file(), reason="WordNet 3.0 is not installed in /usr/share/wordnet")
def test_real_wordnet_default_sizes(record_property):
    start = time.perf_counter()
    tasks = wordnet_tasks(path=REAL)
    load_wordnet(REAL)
    parsed = time.perf_counter()
    sizes = {}
    for task in tasks:
        task.load_data()
        sizes[task.metadata.name] = task.build_stats
    elapsed = time.perf_counter() - start
    record_property("wordnet_build_seconds", round(elapsed, 2))
    print(f"\nreal WordNet: parse+fingerprint {parsed - start:.2f}s, all five tasks {elapsed:.2f}s: {sizes}")
    assert sizes["WordNetLexnameClassification"]["classes"] >= 30
    assert 1000 <= sizes["WordNetLexnameClassification"]["train glosses"] + sizes["WordNetLexnameClassification"]["test glosses"] <= 1600
    assert sizes["WordNetSameLemmaPairClassification"] == {"pairs": 800, "positive pairs": 400, "negative pairs": 400}
    assert sizes["WordNetWuPalmerSTS"] == {"pairs": 500}
    assert sizes["WordNetExampleRetrieval"] == {"queries": 400, "corpus senses": 1000}
    assert 900 <= sizes["WordNetLexnameClustering"]["glosses"] <= 1200
    scores = np.array(tasks[2].dataset["test"]["score"])
    assert np.bincount(np.minimum(scores.astype(int), 4)).tolist() == [100] * 5
    assert elapsed < 60
