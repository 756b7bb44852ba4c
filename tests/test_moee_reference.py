"""MoEEncoder(reference=True) against a port of the official MoEE code (tests/moee_official_port.py).

The shipped demo model (byte-level BPE tokenizer, real OLMoE architecture) and the fixture
WordNet tasks; every comparison is numeric, and each has a control showing that the default
(per-text) mode differs, so that the comparison could fail.
"""

from __future__ import annotations

import copy
import random

import mteb
import numpy as np
import pytest
import torch
from mteb.types import PromptType
from scipy.stats import spearmanr
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_moe_patch as hmp
from hf_moe_patch.embeddings.moee import PROMPTS, MoEEncoder, moee_sum_similarity
from hf_moe_patch.embeddings.reference import (
    average_predictions,
    ensemble_clustering_bootstrapped,
    gritlm_instruction,
    reference_prompt,
    reference_tasks,
    truncate_labels,
)
from hf_moe_patch.errors import InvalidOptionError

from conftest import SMALL_TASKS, WORDNET_FIXTURE
from moee_official_port import (
    eval_mteb_instruction,
    official_classification_accuracy,
    official_cluster_assignment,
    official_encode,
    official_prompts,
    official_sts_spearman,
)

SENTENCES = [
    "A cat sat on the mat",
    'He said "hi" twice',
    "",
    "snake_case words_here!",
    "  padded with spaces  ",
    "ends with a quote'",
    "Children played in the park with a red ball near the old river and the big tree.",
    "Why?",
]


@pytest.fixture(scope="module")
def demo():
    path = hmp.demo_model_path()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def official_tokenizer(tokenizer):
    return copy.deepcopy(tokenizer)  # the port sets pad id and side on it, as the official code does


@pytest.mark.parametrize("prompt", ["prompteol", "none"])
@pytest.mark.parametrize("instruction", [None, "", "Retrieve semantically similar text.", ": Classify the gloss:\n"])
def test_reference_text_is_the_official_text(demo, prompt, instruction):
    model, tokenizer = demo
    enc = MoEEncoder(model, tokenizer, prompt=prompt, reference=True, progress=False)
    prefix = "" if instruction is None else eval_mteb_instruction(instruction)
    expected = official_prompts(SENTENCES, prefix, prompt)
    assert [enc.format_text(s, instruction) for s in SENTENCES] == expected
    assert [reference_prompt(s, PROMPTS[prompt], prefix) for s in SENTENCES] == expected


def test_reference_text_hand_cases():
    assert reference_prompt("", PROMPTS["none"]) == '""'  # an empty sentence stays empty
    assert reference_prompt("a_b", PROMPTS["none"]) == '"a b."'
    assert reference_prompt('say "x"', PROMPTS["none"]) == "\"say 'x'\""  # ends in a quote: no '.'
    assert gritlm_instruction("Find: ") == "<|user|>\nFind\n<|embed|>\n"
    assert gritlm_instruction("") == "<|embed|>\n"
    # The instruction goes inside the quotes, and the '.' goes after the sentence.
    assert reference_prompt("dog", PROMPTS["prompteol"], "<|embed|>\n") == 'This sentence : "<|embed|>\ndog." means in one word:"'


@pytest.mark.parametrize("embedding,emb_info", [("hs", "HS"), ("rw", "RW"), ("moee_concat", "MoEE"), ("moee_sum", "MoEE")])
def test_reference_embeddings_match_the_official_encode(demo, embedding, emb_info):
    model, tokenizer = demo
    texts = SENTENCES[:7]  # batches of 3, 3 and 1: the last one's z-score is NaN -> 0 in both
    embeddings, default, moe_rw = official_encode(model, official_tokenizer(tokenizer), texts, batch_size=3, emb_info=emb_info)
    enc = MoEEncoder(model, tokenizer, embedding=embedding, reference=True, batch_size=3, progress=False)
    ours = enc.embed(texts, instruction="")
    if embedding == "moee_sum":
        with enc.emitting_parts():
            parts = enc.embed(texts, instruction="")
        np.testing.assert_allclose(parts, np.hstack([default, moe_rw]), atol=2e-5, rtol=1e-5)
        # The sum vector's scores are cos(z(hs)) + w cos(z(rw)) of the official parts.
        expected = moee_sum_similarity(np.hstack([default, moe_rw]), np.hstack([default, moe_rw]), enc.hidden_size)
        np.testing.assert_allclose(ours @ ours.T, expected.numpy(), atol=1e-4)
        assert np.all(ours[-1] == 0)  # the one-text batch standardises to zeros, as the official code's NaN -> 0
    else:
        np.testing.assert_allclose(ours, embeddings, atol=2e-5, rtol=1e-5)
    # Control: the default mode (per text, positions from the mask, sorted batches) differs.
    default_mode = MoEEncoder(model, tokenizer, embedding=embedding, batch_size=3, progress=False).embed(texts)
    assert not np.allclose(default_mode, ours, atol=1e-3)


def test_reference_forward_passes_no_position_ids_like_the_official(demo):
    from hf_moe_patch.families import family_of
    from hf_moe_patch.patching import find_base_model

    model, tokenizer = demo
    texts = ["Why?", SENTENCES[6]]  # the short one is left-padded
    _, default, _ = official_encode(model, official_tokenizer(tokenizer), texts, batch_size=2, emb_info="HS")
    ref = MoEEncoder(model, tokenizer, embedding="hs", reference=True, batch_size=2, progress=False)
    seen = []
    base = find_base_model(model, family_of(model))
    handle = base.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("position_ids")), with_kwargs=True)
    try:
        np.testing.assert_allclose(ref.embed(texts, instruction=""), default, atol=2e-5, rtol=1e-5)
        MoEEncoder(model, tokenizer, embedding="hs", batch_size=2, progress=False).embed(texts)
    finally:
        handle.remove()
    assert seen[0] is None  # the reference numbers every row's columns 0..L-1, padding included
    assert seen[1] is not None and seen[1][-1, -1] < seen[1][0, -1]  # ours numbers each text from 0: the short one ends lower
    # With rotary positions the shift cancels in attention, up to rounding.
    np.testing.assert_allclose(ref.embed(texts[:1], instruction="")[0], default[0], atol=1e-4)


def test_reference_instructions_follow_the_official_defaults(demo):
    model, tokenizer = demo
    enc = MoEEncoder(model, tokenizer, reference=True, progress=False)
    assert enc.instruction == "task" and enc.standardize == "batch" and enc.clean_text
    task = mteb.get_task("STS12")
    query = enc.task_instruction(task.metadata, PromptType.query)
    assert query and enc.format_text("x", query).startswith('This sentence : "<|user|>\n')
    assert enc.task_instruction(task.metadata, PromptType.document) == ""  # the corpus side: <|embed|> alone
    assert enc.format_text("x", "") == 'This sentence : "<|embed|>\nx." means in one word:"'
    off = MoEEncoder(model, tokenizer, reference=True, instruction="", progress=False)  # --no_instruction
    assert off.task_instruction(task.metadata, PromptType.query) is None
    assert off.format_text("x", None) == 'This sentence : "x." means in one word:"'
    assert "reference" in enc.mteb_model_meta.name and enc.mteb_model_meta.experiment_kwargs["reference"] is True


@pytest.mark.parametrize("bad", [dict(standardize="text"), dict(clean_text=False), dict(reference="yes")])
def test_reference_refuses_options_it_cannot_honour(demo, bad):
    model, tokenizer = demo
    options = {"reference": True, **bad}
    with pytest.raises(InvalidOptionError, match=next(iter(bad))):
        MoEEncoder(model, tokenizer, **options)


def test_reference_helpers_hand_cases():
    np.testing.assert_array_equal(average_predictions([0, 2, 4], [0, 3, 4], 1.0), [0.0, 2.5, 4.0])
    np.testing.assert_array_equal(average_predictions([1, 2], [3, 3], 0.5), [5 / 3, 7 / 3])
    np.testing.assert_array_equal(truncate_labels(np.array([1.9, 2.0, 2.5])), [1, 2, 2])
    with pytest.raises(InvalidOptionError, match="numeric labels"):
        average_predictions(["a"], ["b"], 1.0)
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 7, 50), rng.integers(0, 7, 50)
    for w in (0.0, 0.3, 1.0, 2.0):
        np.testing.assert_array_equal(average_predictions(a, b, w), official_cluster_assignment(a, b, w))
        y = rng.integers(0, 7, 50)
        ours = float(np.mean(truncate_labels(average_predictions(a, b, w)) == y))
        assert ours == pytest.approx(official_classification_accuracy(y, a, b, w))


def _fixture_tasks(names):
    from hf_moe_patch.data.wordnet_tasks import wordnet_tasks

    tasks = wordnet_tasks(names, path=str(WORDNET_FIXTURE), split="all", sizes={n: SMALL_TASKS[n] for n in names})
    for t in tasks:
        t.load_data()
    return tasks


def test_reference_sts_score_is_the_official_ensemble_spearman(demo, tmp_path):
    model, tokenizer = demo
    (task,) = _fixture_tasks(["WordNetWuPalmerSTS"])
    enc = MoEEncoder(model, tokenizer, reference=True, instruction="", batch_size=8, sum_weight=0.7, progress=False)
    result = mteb.evaluate(enc, [task], cache=None, overwrite_strategy="always", show_progress_bar=False)
    score = result.task_results[0].scores["test"][0]["cosine_spearman"]
    data = task.dataset["default"]["test"] if "default" in task.dataset else task.dataset["test"]
    tok = official_tokenizer(tokenizer)
    _, d1, r1 = official_encode(model, tok, list(data["sentence1"]), batch_size=8, emb_info="MoEE")
    _, d2, r2 = official_encode(model, tok, list(data["sentence2"]), batch_size=8, emb_info="MoEE")
    gold = list(data["score"])
    assert score == pytest.approx(official_sts_spearman(gold, d1, d2, r1, r2, 0.7), abs=1e-6)
    plain = spearmanr(gold, np.sum(d1 * d2, axis=1))[0]  # a different similarity gives another score
    assert plain != pytest.approx(score, abs=1e-4)


def test_reference_classification_averages_the_hs_and_rw_predictions(demo):
    from sklearn.base import clone

    model, tokenizer = demo
    (task,) = _fixture_tasks(["WordNetLexnameClassification"])
    enc = MoEEncoder(model, tokenizer, reference=True, instruction="", batch_size=8, progress=False)
    with pytest.raises(InvalidOptionError, match="reference_tasks"):
        mteb.evaluate(enc, [task], cache=None, overwrite_strategy="always", show_progress_bar=False)
    (wrapped,) = reference_tasks([task], hidden_size=enc.hidden_size, sum_weight=1.0)
    assert wrapped.metadata.name == task.metadata.name and type(task).__name__ in type(wrapped).__name__
    result = mteb.evaluate(enc, [wrapped], cache=None, overwrite_strategy="always", show_progress_bar=False)
    accuracy = result.task_results[0].scores["test"][0]["accuracy"]
    data = task.dataset["default"] if "default" in task.dataset else task.dataset
    train, test = data["train"], data["test"]
    tok = official_tokenizer(tokenizer)
    _, d_train, r_train = official_encode(model, tok, list(train["text"]), batch_size=8, emb_info="MoEE")
    _, d_test, r_test = official_encode(model, tok, list(test["text"]), batch_size=8, emb_info="MoEE")
    predictions = []
    for x_train, x_test in ((d_train, d_test), (r_train, r_test)):
        clf = clone(task.evaluator_model)
        clf.fit(x_train, train["label"])
        predictions.append(clf.predict(x_test))
    expected = official_classification_accuracy(test["label"], predictions[0], predictions[1], 1.0)
    assert accuracy == pytest.approx(expected, abs=1e-9)


def test_ensemble_clustering_is_mteb_clustering_when_the_rw_weight_is_zero():
    import mteb.abstasks.clustering as clustering

    rng = np.random.default_rng(0)
    hs, rw = rng.normal(size=(60, 5)), rng.normal(size=(60, 7))
    labels = [[int(i % 4)] for i in range(60)]
    options = dict(n_clusters=3, cluster_size=40, kmean_batch_size=16, max_depth=None, seed=0)
    ours, _ = ensemble_clustering_bootstrapped(np.hstack([hs, rw]), labels, hidden_size=5, sum_weight=0.0,
                                               rng_state=random.Random(1), **options)
    theirs, _ = clustering._evaluate_clustering_bootstrapped(hs, labels, rng_state=random.Random(1), **options)
    assert ours["v_measure"]["Level 0"] == pytest.approx(theirs["v_measure"]["Level 0"], abs=1e-12)
    mixed, assignments = ensemble_clustering_bootstrapped(np.hstack([hs, rw]), labels, hidden_size=5, sum_weight=1.0,
                                                          rng_state=random.Random(1), **options)
    assert mixed["v_measure"]["Level 0"] != pytest.approx(theirs["v_measure"]["Level 0"], abs=1e-6)
    assert any(a != int(a) for a in assignments["Level 0"][0])  # averaged ids: half-integers appear


def test_reference_clustering_runs_through_mteb_and_restores_its_function(demo):
    import mteb.abstasks.clustering as clustering

    model, tokenizer = demo
    (task,) = _fixture_tasks(["WordNetLexnameClustering"])
    enc = MoEEncoder(model, tokenizer, reference=True, instruction="", batch_size=8, progress=False)
    original = clustering._evaluate_clustering_bootstrapped
    (wrapped,) = reference_tasks([task], hidden_size=enc.hidden_size, sum_weight=1.0)
    result = mteb.evaluate(enc, [wrapped], cache=None, overwrite_strategy="always", show_progress_bar=False)
    assert clustering._evaluate_clustering_bootstrapped is original
    assert 0.0 <= result.task_results[0].scores["test"][0]["v_measure"] <= 1.0


def test_reference_encoder_and_wrapped_tasks_pickle(demo):
    import pickle

    _, tokenizer = demo
    # A fresh model: transformers leaves unpicklable output-capturing hooks on a model once it has
    # been called with output_router_logits (the port does that to the shared one).
    model = AutoModelForCausalLM.from_pretrained(hmp.demo_model_path(), dtype=torch.float32).eval()
    enc = MoEEncoder(model, tokenizer, reference=True, batch_size=3, progress=False)
    again = pickle.loads(pickle.dumps(enc))
    np.testing.assert_array_equal(again.embed(SENTENCES[:4], instruction=""), enc.embed(SENTENCES[:4], instruction=""))
    with again.emitting_parts():
        assert again._emitting_parts() and not enc._emitting_parts()
    tasks = _fixture_tasks(["WordNetLexnameClassification", "WordNetLexnameClustering", "WordNetWuPalmerSTS"])
    wrapped = reference_tasks(tasks, hidden_size=enc.hidden_size, sum_weight=0.5)
    assert wrapped[2] is tasks[2]  # STS needs no wrapper
    for task in wrapped[:2] + [reference_tasks([mteb.get_task("Banking77Classification")], hidden_size=8, sum_weight=2.0)[0]]:
        back = pickle.loads(pickle.dumps(task))
        assert type(back).__name__ == type(task).__name__ and back.metadata.name == task.metadata.name
        assert (back._moee_hidden_size, back._moee_sum_weight) == (task._moee_hidden_size, task._moee_sum_weight)


def test_reference_with_one_text_per_batch_warns_that_it_gives_zeros(demo, caplog):
    model, tokenizer = demo
    with caplog.at_level("WARNING", logger="hf_moe_patch.embeddings.moee"):
        enc = MoEEncoder(model, tokenizer, reference=True, batch_size=1, progress=False)
    assert "all zeros" in caplog.text
    assert not enc.embed(["a cat", "a dog"], instruction="").any()  # as the official code: NaN -> 0
    with caplog.at_level("WARNING", logger="hf_moe_patch.embeddings.moee"):
        caplog.clear()
        MoEEncoder(model, tokenizer, reference=True, embedding="hs", batch_size=1, progress=False)
    assert "all zeros" not in caplog.text  # HS is never standardised
