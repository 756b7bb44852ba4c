"""Causal (calibrated) USMoE and expert choice: thresholds fitted on text, then per-token routing.

Expected values are written literally (with the arithmetic in comments) or follow from the
definition; the properties (causality, batch independence, cached generation) are checked
against the non-causal routers where those are known to break them, so each test can fail.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_moe_patch as hmp
from hf_moe_patch import InvalidOptionError
from hf_moe_patch.ops import budget_threshold, expert_thresholds, threshold_slots
from hf_moe_patch.testing import tiny_model

from conftest import CORE_FAMILIES, FAMILIES, batch

CAUSAL_CASES = [
    ("usmoe", {"top_k": 1.5}),
    ("usmoe", {"top_k": 2, "alpha": 0.3, "min_experts": 1, "max_experts": 3}),
    ("expert_choice", {}),
]


def calibration_batches(seed: int = 100, n: int = 3):
    """Calibration text as tokenized batches (with right padding in one row)."""
    out = []
    for i in range(n):
        ids, mask = batch(seed=seed + i, batch_size=4, seq_len=20, pad_from={1: 13})
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def causal_model(family, method, options, **kwargs):
    return hmp.patch(tiny_model(family, **kwargs), method, causal=True, calibration=calibration_batches(), **options)


@torch.no_grad()
def logits(model, ids, mask=None):
    return model(input_ids=ids, attention_mask=mask).logits


# --- the threshold rules, by hand ------------------------------------------------------------------


def test_budget_threshold_hand_cases():
    key = torch.tensor([[0.9, 0.5, 0.1], [0.8, 0.3, 0.2]])
    # budget 1: r = 2 -> 0.9, 0.8; threshold 0.8.
    assert budget_threshold(key, 1) == pytest.approx(0.8)
    # budget 2: r = 4 -> 0.9 0.8 0.5 0.3; threshold 0.3.
    assert budget_threshold(key, 2) == pytest.approx(0.3)
    # budget 2 with max_experts=2: ranks 1-2 only (0.9 0.5 | 0.8 0.3), r = 4: all of them, 0.3.
    assert budget_threshold(key, 2, max_experts=2) == pytest.approx(0.3)
    # budget 1.5, min_experts=1: r = 3 - 2 = 1 among ranks 2-3 (0.5 0.1 | 0.3 0.2): 0.5.
    assert budget_threshold(key, 1.5, min_experts=1) == pytest.approx(0.5)
    # NaN cells are ignored (ranked last).
    nan_key = torch.tensor([[float("nan"), 0.5, 0.1], [0.8, 0.3, 0.2]])
    assert budget_threshold(nan_key, 1) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="outside"):
        budget_threshold(key, 0.5, min_experts=1)
    with pytest.raises(ValueError, match="0 tokens"):
        budget_threshold(key[:0], 1)


def test_a_tie_at_the_threshold_is_taken_or_left_whole_whichever_is_closer():
    # Three identical tokens (as every sequence's first token is): their cells tie.
    key = torch.tensor([[0.9, 0.1], [0.5, 0.4], [0.5, 0.4], [0.5, 0.4]])
    # budget 0.5: r = 2. The 2nd largest cell is 0.5, held by 3 tokens: taking them gives 4 cells
    # (2 over), leaving them gives 1 (1 under): the threshold moves up to 0.9.
    assert budget_threshold(key, 0.5) == pytest.approx(0.9)
    # budget 0.75: r = 3: 4 cells (1 over) beats 1 cell (2 under): 0.5 stays.
    assert budget_threshold(key, 0.75) == pytest.approx(0.5)
    # Per expert: capacity round(0.75 * 4 / 2) = 2 in each column. Column 0: 0.9 then the 0.5s
    # (4 at or above: 2 over; 1 above: 1 under): 0.9. Column 1: the three 0.4s (1 over; nothing
    # is above 0.4): kept, 0.4.
    torch.testing.assert_close(expert_thresholds(key, 0.75), torch.tensor([0.9, 0.4]))


def test_expert_thresholds_and_per_expert_slots_by_hand():
    s = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.1, 0.9]])
    # budget 1, T = 3, N = 2: capacity round(1.5) = 2 per expert. Expert 0: 0.7, 0.6 -> 0.6;
    # expert 1: 0.9, 0.4 -> 0.4.
    tau = expert_thresholds(s, 1)
    torch.testing.assert_close(tau, torch.tensor([0.6, 0.4]))
    index, weights = threshold_slots(s, s, tau)
    # token 0: expert 0 (0.7 >= 0.6); token 1: experts 0 (0.6) and 1 (0.4), best first;
    # token 2: expert 1 (0.9).
    assert index.tolist() == [[0, 2], [0, 1], [1, 2]]
    torch.testing.assert_close(weights, torch.tensor([[0.7, 0.0], [0.6, 0.4], [0.9, 0.0]]))
    # capacity round(0.1 * 3 / 2) = 0: every threshold is +inf, no token takes any expert.
    assert expert_thresholds(s, 0.1).tolist() == [math.inf, math.inf]


def test_threshold_slots_floor_cap_and_nan():
    key = torch.tensor([[0.9, 0.5, 0.4, 0.1], [0.2, 0.1, 0.3, 0.0]])
    # threshold 0.35: token 0 has 3 cells (0.9 0.5 0.4), token 1 none.
    assert threshold_slots(key, key, 0.35)[0].tolist() == [[0, 1, 2], [4, 4, 4]]
    # max 2 caps token 0 at its top 2; min 1 gives token 1 its top cell (0.3, expert 2).
    index, weights = threshold_slots(key, key, 0.35, min_experts=1, max_experts=2)
    assert index.tolist() == [[0, 1], [2, 4]]
    torch.testing.assert_close(weights, torch.tensor([[0.9, 0.5], [0.3, 0.0]]))
    # A NaN cell is always taken, so NaN reaches the output.
    key[1, 1] = float("nan")
    index, weights = threshold_slots(key, key, 0.35)
    assert index[1].tolist()[0] == 1 and weights[1, 0].isnan()


# --- calibration ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", CORE_FAMILIES)
@pytest.mark.parametrize("method,options", CAUSAL_CASES)
def test_calibration_meets_the_budget_on_its_text_per_layer(family, method, options):
    model = causal_model(family, method, options)
    config = hmp.routing_config(model)
    info = config["calibration_info"]
    # 3 batches of 4 rows x 20 tokens, one row padded from 13: 3 * (3 * 20 + 13) = 219 tokens.
    assert info["tokens"] == 219 and info["sequences"] == 12 and len(info["fingerprint"]) == 16
    assert len(config["thresholds"]) == 2
    with hmp.collect_stats(model) as stats:
        with torch.no_grad():
            for b in calibration_batches():
                model(**b)
    for layer in stats.to_dict()["layers"]:
        if method == "usmoe":
            # round(budget * 219) / 219 experts per token, exactly, in every layer.
            want = round(options["top_k"] * 219) / 219
            assert layer["experts_per_token_mean"] == pytest.approx(want, abs=1e-9)
        else:
            # Each expert's load is its capacity round(k * T / N) = round(2 * 219 / 8) = 55.
            assert layer["tokens_per_expert"] == [55] * 8


def test_calibration_text_as_strings_with_the_demo_tokenizer():
    path = hmp.demo_model_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = ["a small domesticated carnivore", "the act of running", "  ", "a tree with needles", "blue"]
    hmp.patch(model, "usmoe", top_k=1.5, causal=True, calibration=texts, tokenizer=tokenizer, calibration_batch_size=2)
    info = hmp.routing_config(model)["calibration_info"]
    # The blank text is dropped: 4 sequences; their token count is what the tokenizer makes.
    expected_tokens = sum(len(tokenizer(t)["input_ids"]) for t in texts if t.strip())
    assert info["sequences"] == 4 and info["tokens"] == expected_tokens
    # The same text as one tokenized batch gives the same thresholds and fingerprint.
    enc = tokenizer([t for t in texts if t.strip()], return_tensors="pt", padding=True)
    again = hmp.patch(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), "usmoe", top_k=1.5,
                      causal=True, calibration=dict(enc))
    # (equal up to float rounding: other batch shapes sum in another order)
    assert hmp.routing_config(again)["thresholds"] == pytest.approx(hmp.routing_config(model)["thresholds"], rel=1e-5)
    assert hmp.routing_config(again)["calibration_info"]["fingerprint"] == info["fingerprint"]


def test_calibration_leaves_training_flags_and_gradients_alone():
    model = tiny_model("olmoe").train()
    model.model.layers[0].eval()  # a mixed state must come back as it was
    before = {name: m.training for name, m in model.named_modules()}
    hmp.patch(model, "usmoe", top_k=1.5, causal=True, calibration=calibration_batches())
    assert {name: m.training for name, m in model.named_modules()} == before
    assert all(p.grad is None for p in model.parameters())


# --- the properties ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,options", CAUSAL_CASES)
def test_a_token_depends_only_on_itself_and_earlier_tokens(family, method, options):
    model = causal_model(family, method, options)
    ids, _ = batch(seed=7, batch_size=2, seq_len=16)
    full = logits(model, ids)
    for cut in (1, 5, 11):
        torch.testing.assert_close(logits(model, ids[:, :cut]), full[:, :cut], rtol=0, atol=1e-5)


def test_the_non_causal_routers_do_look_ahead():
    # The control for the test above: the sequence-budget routers change earlier tokens' outputs
    # when later tokens arrive.
    for method in ("usmoe", "expert_choice"):
        model = hmp.patch(tiny_model("olmoe"), method, top_k=1.5)
        ids, _ = batch(seed=7, batch_size=2, seq_len=16)
        full = logits(model, ids)
        assert not torch.allclose(logits(model, ids[:, :5]), full[:, :5], atol=1e-5)


@pytest.mark.parametrize("family", CORE_FAMILIES)
@pytest.mark.parametrize("method,options", CAUSAL_CASES)
def test_batch_mates_and_padding_do_not_matter(family, method, options):
    model = causal_model(family, method, options)
    ids, _ = batch(seed=3, batch_size=3, seq_len=14)
    alone = logits(model, ids[:1, :9])
    # Right padding and a batch-mate.
    padded = ids.clone()
    mask = torch.ones_like(ids)
    padded[0, 9:], mask[0, 9:] = 0, 0
    torch.testing.assert_close(logits(model, padded, mask)[:1, :9], alone, rtol=0, atol=1e-5)
    # Left padding (positions from the mask, as generate computes them).
    left = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids[:1, :9]], dim=1)
    left_mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], dim=1)
    positions = (left_mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        out = model(input_ids=left, attention_mask=left_mask, position_ids=positions).logits
    torch.testing.assert_close(out[:, 5:], alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["olmoe", "mixtral", "qwen3_moe"])
@pytest.mark.parametrize("method,options", CAUSAL_CASES)
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_cached_generation_equals_recomputation(family, method, options, cache):
    model = causal_model(family, method, options)
    ids, mask = batch(seed=5, batch_size=2, seq_len=8)
    ids[1, 3:], ids[1, :3], mask[1, :3] = ids[1, :5].clone(), 0, 0  # row 1: left padding of 3
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = model.generate(input_ids=ids, attention_mask=mask, use_cache=True, cache_implementation=cache, **kwargs)
    recomputed = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs)
    assert torch.equal(cached, recomputed)


# --- saving, reloading, sharing ------------------------------------------------------------------


@pytest.mark.parametrize("method,options", CAUSAL_CASES)
def test_save_reload_and_remote_code_keep_the_thresholds(tmp_path, method, options):
    from hf_moe_patch.sharing.remote_code import write_remote_code

    model = causal_model("olmoe", method, options)
    ids, mask = batch(pad_from={1: 7})
    expected = logits(model, ids, mask)
    model.save_pretrained(tmp_path / "m")
    stored = json.loads((tmp_path / "m" / "config.json").read_text())["moe_routing"]["options"]
    assert stored["thresholds"] == hmp.routing_config(model)["thresholds"] and stored["causal"] is True
    loaded = hmp.from_pretrained(tmp_path / "m")
    assert hmp.routing_config(loaded) == hmp.routing_config(model)
    assert torch.equal(logits(loaded, ids, mask), expected)
    write_remote_code(model, tmp_path / "m")
    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "m", trust_remote_code=True).eval()
    torch.testing.assert_close(logits(remote, ids, mask), expected, rtol=0, atol=0)


def test_thresholds_from_an_earlier_calibration_need_no_text():
    model = causal_model("olmoe", "usmoe", {"top_k": 1.5})
    config = hmp.routing_config(model)
    other = hmp.patch(tiny_model("olmoe"), "usmoe", top_k=1.5, causal=True, thresholds=config["thresholds"])
    ids, _ = batch()
    assert torch.equal(logits(other, ids), logits(model, ids))


# --- errors, and failed patches change nothing ---------------------------------------------------


@pytest.mark.parametrize("method,options,kwargs,message", [
    ("usmoe", {"causal": True}, {}, "needs thresholds: pass calibration="),
    ("usmoe", {}, {"calibration": [{"input_ids": [[5, 6]]}]}, "does not take it here: it has no causal=True"),
    ("usmoe", {"causal": True, "thresholds": [0.1, 0.2]}, {"calibration": [{"input_ids": [[5]]}]}, "thresholds= were given"),
    ("usmoe", {"thresholds": [0.1, 0.2]}, {}, "'thresholds' of routing method 'usmoe'.*only with causal=True"),
    ("usmoe", {"causal": True, "thresholds": [0.1]}, {}, "one entry per MoE layer: 2"),
    ("usmoe", {"causal": True, "thresholds": [0.1, float("nan")]}, {}, "no NaN"),
    ("usmoe", {"causal": True, "scope": "batch"}, {"calibration": [{"input_ids": [[5]]}]}, "'scope'.*causal=True"),
    ("usmoe", {"max_experts": 3}, {}, "'max_experts'.*only with causal=True"),
    ("usmoe", {"causal": True, "top_k": 1, "min_experts": 2}, {"calibration": [{"input_ids": [[5]]}]},
     r"budget in \[min_experts, max_experts\] = \[2, 8\]"),
    ("usmoe", {"causal": True}, {"calibration": "one string"}, "got one string"),
    ("usmoe", {"causal": True}, {"calibration": ["text"]}, "pass tokenizer="),
    ("usmoe", {"causal": True}, {"calibration": [{"input_ids": [[5]], "attention_mask": [[0]]}]}, "no valid"),
    ("usmoe", {"causal": True}, {"calibration": [{"ids": [[5]]}]}, "has no 'input_ids'"),
    ("usmoe", {"causal": True}, {"calibration": 3}, "got int"),
    ("usmoe", {"causal": True}, {"calibration": [{"input_ids": [[5]]}], "calibration_batch_size": 0}, "calibration_batch_size=0"),
    ("expert_choice", {"causal": True, "thresholds": [[0.1] * 7, [0.1] * 8]}, {}, "a list of N = 8 numbers per MoE layer"),
])
def test_invalid_causal_routings_are_refused_before_anything_changes(method, options, kwargs, message):
    model = hmp.patch(tiny_model("olmoe"), "usmoe", top_k=1.5)
    ids, _ = batch()
    before = logits(model, ids)
    with pytest.raises(InvalidOptionError, match=message):
        hmp.check_routing(model, method, **options, **kwargs)
    with pytest.raises(InvalidOptionError, match=message):
        hmp.patch(model, method, **options, **kwargs)
    config = hmp.routing_config(model)
    assert config["method"] == "usmoe" and config["top_k"] == 1.5 and not config["causal"]
    assert torch.equal(logits(model, ids), before)


def test_reloading_thresholds_for_other_options_is_refused(tmp_path):
    model = causal_model("olmoe", "usmoe", {"top_k": 1.5})
    model.save_pretrained(tmp_path)
    with pytest.raises(InvalidOptionError, match="calibrated for .*'top_k': 1.5.*not for .*'top_k': 2.0"):
        hmp.patch(hmp.from_pretrained(tmp_path), top_k=2)  # re-applies the stored routing with top_k=2


def test_a_calibration_that_fails_midway_restores_the_previous_routing():
    model = hmp.patch(tiny_model("olmoe"), "expert_choice")
    ids, _ = batch()
    before = logits(model, ids)
    bad = [{"input_ids": torch.full((2, 6), 5)}, {"input_ids": torch.full((2, 6), 10_000)}]  # out of the vocabulary
    with pytest.raises(IndexError):
        hmp.patch(model, "usmoe", top_k=1.5, causal=True, calibration=bad)
    assert hmp.routing_config(model)["method"] == "expert_choice"
    assert torch.equal(logits(model, ids), before)


def test_calibrated_routings_pass_the_checks_that_run_before_a_model_is_known():
    # The CLI and evaluate_routings check options before loading a model: per-expert thresholds
    # of any one length pass there, ragged ones do not; the model's N is checked at patch time.
    from hf_moe_patch.report import RoutingCase
    from hf_moe_patch.validation import parse_routings

    ok = RoutingCase("ec", "expert_choice", {"causal": True, "thresholds": [[0.1] * 16] * 4})
    assert parse_routings([ok]) == [ok]
    ragged = RoutingCase("ec", "expert_choice", {"causal": True, "thresholds": [[0.1] * 16, [0.1] * 15]})
    with pytest.raises(InvalidOptionError, match="a list of N numbers per MoE layer"):
        parse_routings([ragged])


@pytest.mark.parametrize("budget", [1.5, 3])
def test_held_out_text_gets_the_budget_within_5_percent_per_layer(budget):
    # The shipped demo model, calibrated on 256 WordNet train documents packed into blocks like
    # the held-out text, measured on the demo report's 256 held-out blocks (as in
    # eval/results/dynamic_compute, where every layer is within 1.2 % for usmoe).
    import random

    from hf_moe_patch.data.wordnet import load_wordnet
    from hf_moe_patch.training.demo_model import corpus, pack

    path = hmp.demo_model_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    wordnet = load_wordnet()
    calibration = pack(random.Random(0).sample(corpus(wordnet, "train"), 256), tokenizer, 128)
    held_out = pack(corpus(wordnet, "heldout"), tokenizer, 128)[:256]
    hmp.patch(model, "usmoe", top_k=budget, causal=True, calibration=[{"input_ids": b} for b in calibration.split(8)])
    with hmp.collect_stats(model) as stats, torch.no_grad():
        for block in held_out.split(32):
            model(input_ids=block)
    for layer in stats.to_dict()["layers"]:
        assert layer["experts_per_token_mean"] == pytest.approx(budget, rel=0.05), layer["layer"]
