"""The routing comparison over mteb tasks: real mteb evaluators, real cache, a tiny pretrained
demo model and the local WordNet tasks on the fixture database."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_moe_patch as hmp
from hf_moe_patch.data.corruption import Corruption
from hf_moe_patch.embeddings.evaluation import evaluate_routings, expand_cases, resolve_budget
from hf_moe_patch.embeddings.moee import MoEEncoder

from conftest import SMALL_TASKS, WORDNET_FIXTURE

TASKS = ["WordNetWuPalmerSTS", "WordNetLexnameClustering"]
WN = {"path": WORDNET_FIXTURE, "sizes": SMALL_TASKS}


@pytest.fixture(scope="module")
def loaded(tiny_demo):
    path, _ = tiny_demo
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def run(loaded, tmp_path, cases, tasks=TASKS, **kwargs):
    model, tokenizer = loaded
    kwargs.setdefault("cache_dir", tmp_path / "cache")
    kwargs.setdefault("out_dir", tmp_path / "out")
    return evaluate_routings(model, tokenizer, cases, tasks, progress=False, wordnet_kwargs=WN, **kwargs)


def test_budgets_and_case_expansion():
    assert resolve_budget("0.75x", 4) == 3.0 and resolve_budget(None, 4) is None
    cases = expand_cases(["topk", "usmoe", "expert_choice:top_k=0.5x", "ssr:inference=sinkhorn"], 4, ["1x", "0.5x"])
    assert [(c.label, c.options.get("top_k")) for c in cases] == [
        ("topk", None), ("usmoe:top_k=1x", 4.0), ("usmoe:top_k=0.5x", 2.0), ("expert_choice:top_k=0.5x", 2.0),
        ("ssr:inference=sinkhorn", None)]
    with pytest.raises(ValueError, match="method='usmo' is not a routing method"):
        expand_cases(["usmo"], 4)
    with pytest.raises(ValueError, match="top_k='lots' is not valid"):
        expand_cases(["usmoe:top_k=lots"], 4)
    with pytest.raises(ValueError, match="routings must be distinct"):
        expand_cases(["topk", "topk"], 4)


def test_comparison_scores_stats_and_files(loaded, tmp_path):
    model, _ = loaded
    report = run(loaded, tmp_path, ["topk", "usmoe:top_k=0.5x", "expert_choice"])
    assert hmp.routing_config(model) is None  # every patch was taken back
    by_label = {r.label: r for r in report.runs}
    assert set(by_label) == {"topk", "usmoe:top_k=0.5x", "expert_choice"} and report.baseline == "topk"
    for r in report.runs:
        assert set(r.scores) == set(TASKS) and all(-1 <= s <= 1 for s in r.scores.values())
        assert r.task_types == {"WordNetWuPalmerSTS": "STS", "WordNetLexnameClustering": "Clustering"}
        assert not r.cached and r.encode_seconds > 0
    # Expert compute is measured: native k=2, half budget ~1, expert choice ~2 on average.
    assert by_label["topk"].stats["experts_per_token_mean"] == pytest.approx(2.0)
    assert by_label["usmoe:top_k=0.5x"].stats["experts_per_token_mean"] == pytest.approx(1.0, abs=0.1)
    assert by_label["expert_choice"].stats["experts_per_token_mean"] == pytest.approx(2.0, abs=0.2)
    # Routing changes the embeddings, hence the scores.
    assert by_label["usmoe:top_k=0.5x"].scores != by_label["topk"].scores
    data = json.loads((tmp_path / "out" / "mteb_comparison.json").read_text())
    usmoe = next(r for r in data["runs"] if r["label"] == "usmoe:top_k=0.5x")
    sts = "WordNetWuPalmerSTS"
    assert usmoe["delta_vs_baseline"][sts] == pytest.approx(usmoe["scores"][sts] - by_label["topk"].scores[sts])
    assert usmoe["type_means"] == {"Clustering": usmoe["scores"]["WordNetLexnameClustering"], "STS": usmoe["scores"][sts]}
    md = (tmp_path / "out" / "mteb_comparison.md").read_text()
    assert "| **mean STS** |" in md and "| experts/token (compute) |" in md and "encode time vs topk" in md
    assert (tmp_path / "out" / "mteb_comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scores_are_mteb_scores_of_the_encoder(loaded, tmp_path):
    """The runner's number for a routing is what mteb gives the encoder under that patch."""
    import mteb

    from hf_moe_patch.data.wordnet_tasks import wordnet_tasks

    model, tokenizer = loaded
    report = run(loaded, tmp_path, ["usmoe:top_k=1.0"], tasks=["WordNetWuPalmerSTS"])
    with hmp.patched(model, "usmoe", top_k=1.0):
        encoder = MoEEncoder(model, tokenizer, progress=False)
        result = mteb.evaluate(encoder, wordnet_tasks(["WordNetWuPalmerSTS"], **WN),
                               cache=mteb.ResultCache(tmp_path / "other"), show_progress_bar=False)
    assert report.runs[0].scores["WordNetWuPalmerSTS"] == pytest.approx(result.task_results[0].get_score(), abs=1e-12)


def test_cache_separates_routings_and_options_and_reuses_identical_runs(loaded, tmp_path):
    first = run(loaded, tmp_path, ["topk", "usmoe:top_k=1.0", "usmoe:top_k=0.5"], tasks=["WordNetWuPalmerSTS"])
    revisions = {r.revision for r in first.runs}
    names = {r.model_name for r in first.runs}
    assert len(revisions) == 3 and len(names) == 3  # no two routings share a cache entry
    result_files = sorted((tmp_path / "cache").rglob("WordNetWuPalmerSTS.json"))
    assert len(result_files) == 3
    # Same runs again: read back from the cache (no encoding), same scores and statistics.
    again = run(loaded, tmp_path, ["topk", "usmoe:top_k=1.0", "usmoe:top_k=0.5"], tasks=["WordNetWuPalmerSTS"])
    assert all(r.cached for r in again.runs)
    # (mteb stores scores rounded to 4 decimals)
    for a, b in zip(again.runs, first.runs):
        assert a.scores == pytest.approx(b.scores, abs=1e-4)
    assert [r.stats for r in again.runs] == [r.stats for r in first.runs]
    # A different embedding setting is a different run, not a reuse.
    other = run(loaded, tmp_path, ["usmoe:top_k=1.0"], tasks=["WordNetWuPalmerSTS"], sum_weight=0.5)
    assert not other.runs[0].cached and other.runs[0].revision not in revisions


def test_changed_task_build_is_recomputed_not_reused(loaded, tmp_path):
    first = run(loaded, tmp_path, ["topk"], tasks=["WordNetWuPalmerSTS"])
    model, tokenizer = loaded
    sizes = {**SMALL_TASKS, "WordNetWuPalmerSTS": {"n_pairs": 20}}
    second = evaluate_routings(model, tokenizer, ["topk"], ["WordNetWuPalmerSTS"], progress=False,
                               cache_dir=tmp_path / "cache", out_dir=None, wordnet_kwargs={"path": WORDNET_FIXTURE, "sizes": sizes})
    assert not second.runs[0].cached
    assert second.runs[0].scores != first.runs[0].scores


def test_corruption_changes_the_texts_and_the_scores(loaded, tmp_path):
    clean = run(loaded, tmp_path, ["topk"], tasks=["WordNetWuPalmerSTS"])
    noisy = run(loaded, tmp_path, ["topk"], tasks=["WordNetWuPalmerSTS"], corruption=Corruption("junk", 0.3))
    assert noisy.runs[0].revision != clean.runs[0].revision and not noisy.runs[0].cached
    assert noisy.runs[0].scores != clean.runs[0].scores
    assert noisy.settings["corruption"] == {"kind": "junk", "rate": 0.3, "seed": 0}


def test_invalid_routing_option_fails_before_any_evaluation(loaded, tmp_path):
    with pytest.raises(hmp.InvalidOptionError, match="alpha"):
        run(loaded, tmp_path, ["topk", "usmoe:alpha=3"], tasks=["WordNetWuPalmerSTS"])
    assert hmp.routing_config(loaded[0]) is None
    assert not (tmp_path / "cache").exists()  # not even the valid first routing was evaluated


def test_a_partly_cached_task_set_is_evaluated_whole(loaded, tmp_path):
    """Statistics and time must describe the whole task set, never a mix of runs."""
    one = run(loaded, tmp_path, ["usmoe:top_k=1.0"], tasks=["WordNetWuPalmerSTS"])
    both = run(loaded, tmp_path, ["usmoe:top_k=1.0"], tasks=["WordNetWuPalmerSTS", "WordNetLexnameClustering"])
    assert not both.runs[0].cached
    assert set(both.runs[0].scores) == {"WordNetWuPalmerSTS", "WordNetLexnameClustering"}
    assert both.runs[0].scores["WordNetWuPalmerSTS"] == pytest.approx(one.runs[0].scores["WordNetWuPalmerSTS"], abs=1e-4)
    again = run(loaded, tmp_path, ["usmoe:top_k=1.0"], tasks=["WordNetWuPalmerSTS", "WordNetLexnameClustering"])
    assert again.runs[0].cached and again.runs[0].stats == both.runs[0].stats


def stats_file(tmp_path):
    (path,) = (tmp_path / "cache" / "hf_moe_patch_stats").rglob("*.json")
    return path


def test_overwrite_measures_statistics_and_time_afresh(loaded, tmp_path):
    """--overwrite recomputes the scores, so the statistics and the time must be new too, not
    read back from the cache beside them."""
    first = run(loaded, tmp_path, ["topk"], tasks=["WordNetWuPalmerSTS"])
    path = stats_file(tmp_path)
    # A cache entry that no measurement could give: reading it back would show.
    path.write_text(json.dumps({"summary": {"experts_per_token_mean": 99.0}, "seconds": 12345.0}))
    assert run(loaded, tmp_path, ["topk"], tasks=["WordNetWuPalmerSTS"]).runs[0].stats == {"experts_per_token_mean": 99.0}
    fresh = run(loaded, tmp_path, ["topk"], tasks=["WordNetWuPalmerSTS"], overwrite=True).runs[0]
    assert not fresh.cached
    assert fresh.stats == first.runs[0].stats and fresh.stats["experts_per_token_mean"] == pytest.approx(2.0)
    assert fresh.encode_seconds != 12345.0 and 0 < fresh.encode_seconds < 600
    assert fresh.scores == pytest.approx(first.runs[0].scores, abs=1e-4)
    # The cache now holds the new measurement, and the next plain run reuses it.
    assert json.loads(path.read_text()) == {"summary": fresh.stats, "seconds": fresh.encode_seconds}
    again = run(loaded, tmp_path, ["topk"], tasks=["WordNetWuPalmerSTS"]).runs[0]
    assert again.cached and again.stats == fresh.stats and again.encode_seconds == fresh.encode_seconds


@pytest.mark.parametrize("content", ['{"summary": {', "", '{"seconds": 1.0}', '["not", "a", "record"]'])
def test_an_unreadable_statistics_entry_is_recomputed_not_fatal(loaded, tmp_path, caplog, content):
    """A stats file cut short by a crash (or otherwise unusable) counts as missing: warned
    about and measured again, instead of failing every later run."""
    first = run(loaded, tmp_path, ["topk"], tasks=["WordNetWuPalmerSTS"])
    path = stats_file(tmp_path)
    path.write_text(content)
    with caplog.at_level("WARNING", logger="hf_moe_patch"):
        again = run(loaded, tmp_path, ["topk"], tasks=["WordNetWuPalmerSTS"]).runs[0]
    assert not again.cached and again.stats == first.runs[0].stats
    assert any(str(path) in r.getMessage() and "recomputed" in r.getMessage() for r in caplog.records)
    assert json.loads(path.read_text())["summary"] == again.stats  # replaced by a whole entry
    assert run(loaded, tmp_path, ["topk"], tasks=["WordNetWuPalmerSTS"]).runs[0].cached
    # Written atomically: no temporary file is left beside the entries or the report.
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_report_files_are_replaced_whole(loaded, tmp_path):
    """A report write that fails half-way leaves the previous file as it was (a plain write
    would have truncated it), and no temporary file behind."""
    report = run(loaded, tmp_path, ["topk"], tasks=["WordNetWuPalmerSTS"], out_dir=None)
    paths = report.write(tmp_path / "out")
    before = paths["md"].read_text()
    report.settings["title"] = "a title utf-8 cannot encode \ud800"  # fails while the .md is written
    with pytest.raises(UnicodeEncodeError):
        report.write(tmp_path / "out")
    assert paths["md"].read_text() == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["mteb_comparison.json", "mteb_comparison.md", "mteb_comparison.png"]
