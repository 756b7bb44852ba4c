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
    with pytest.raises(hmp.InvalidOptionError, match="Unknown routing method 'usmo'. Did you mean 'usmoe'"):
        expand_cases(["usmo"], 4)
    with pytest.raises(hmp.InvalidOptionError, match="no routing given"):
        expand_cases([], 4)
    with pytest.raises(ValueError, match="top_k='lots' is not valid"):
        expand_cases(["usmoe:top_k=lots"], 4)
    with pytest.raises(ValueError, match="routings must be distinct"):
        expand_cases(["topk", "topk"], 4)


def test_comparison_scores_stats_and_files(loaded, tmp_path, caplog):
    model, _ = loaded
    with caplog.at_level("INFO", logger="hf_moe_patch.progress"):
        report = run(loaded, tmp_path, ["topk", "usmoe:top_k=0.5x", "expert_choice"])
    progress = [r.getMessage() for r in caplog.records if r.name == "hf_moe_patch.progress"]
    assert len(progress) == 4, progress  # one line per routing, then the total
    assert progress[0] == f"[1/3] topk on 2 tasks ({TASKS[0]}, {TASKS[1]}) (elapsed 0s, ETA after the first routing)"
    assert progress[1].startswith("[2/3] usmoe:top_k=0.5x on 2 tasks") and ", ETA " in progress[1]
    assert progress[3].startswith("done: 3 routings in ")
    assert hmp.routing_config(model) is None  # every patch was taken back
    by_label = {r.label: r for r in report.runs}
    assert set(by_label) == {"topk", "usmoe:top_k=0.5x", "expert_choice"} and report.baseline == "topk"
    for r in report.runs:
        assert set(r.scores) == set(TASKS) and all(-1 <= s <= 1 for s in r.scores.values())
        assert r.task_types == {"WordNetWuPalmerSTS": "STS", "WordNetLexnameClustering": "Clustering"}
        assert not r.cached and r.encode_seconds > 0 and set(r.task_seconds) == set(TASKS)
        assert r.metrics == {"WordNetWuPalmerSTS": "cosine_spearman", "WordNetLexnameClustering": "v_measure"}
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
    assert "| WordNetWuPalmerSTS | STS | cosine_spearman |" in md and "| WordNetLexnameClustering | Clustering | v_measure |" in md
    assert "mean STS" not in md and "mean Clustering" not in md  # a type with one task: its mean would repeat it
    assert "| **mean (all tasks)** |" in md and "| experts/token (measured compute) |" in md
    assert "| encode time vs topk (wall-clock) | | | 1.00x | " in md
    assert "x 100" in md and "In brackets: the change vs topk" in md and "every text encoded for the tasks" in md
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
    # (as mteb's cache keeps it: 6 decimals)
    assert report.runs[0].scores["WordNetWuPalmerSTS"] == pytest.approx(result.task_results[0].get_score(), abs=1e-6)


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
    # Fresh and cached scores are the same numbers (mteb's cache keeps 6 decimals; a fresh run
    # reads its scores back from there), so the tables print them alike.
    assert [a.scores for a in again.runs] == [b.scores for b in first.runs]
    assert again.to_markdown() == first.to_markdown()
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
    stored = json.loads(path.read_text())
    assert stored["summary"] == fresh.stats and stored["task_seconds"] == fresh.task_seconds
    assert fresh.encode_seconds == pytest.approx(sum(fresh.task_seconds.values())) and 0 < fresh.encode_seconds <= stored["seconds"]
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


# --- tables and figures, on reports made by hand ---------------------------------------------

from hf_moe_patch.embeddings.evaluation import ComparisonReport, RoutingRun, check_tasks  # noqa: E402

LONG_LABELS = ["topk", "usmoe", "usmoe:top_k=0.75x", "usmoe:top_k=0.5x", "expert_choice", "ssr:inference=sinkhorn,scope=sequence"]
ALL_TASKS = {"WordNetLexnameClassification": ("Classification", "accuracy"),
             "WordNetSameLemmaPairClassification": ("PairClassification", "max_ap"),
             "WordNetWuPalmerSTS": ("STS", "cosine_spearman"), "WordNetExampleRetrieval": ("Retrieval", "ndcg_at_10"),
             "WordNetLexnameClustering": ("Clustering", "v_measure")}


def made_report(labels, tasks, compute=None, seconds=None):
    runs = []
    for i, label in enumerate(labels):
        scores = {t: 0.3 + 0.01 * i + 0.05 * j for j, t in enumerate(tasks)}
        runs.append(RoutingRun(label, label.split(":")[0], {}, f"m-{i}", "r", scores, {t: tasks[t][0] for t in tasks},
                               {"experts_per_token_mean": (compute or {}).get(label, 4.0), "maxvio_top1": 1.0, "maxvio": 0.5,
                                "tokens_without_expert_frac": 0.0},
                               1.0, False, dict((seconds or {}).get(label, {})), {t: tasks[t][1] for t in tasks}))
    return ComparisonReport(runs, {"title": "made by hand"}, baseline=labels[0])


def test_table_names_metrics_escapes_cells_and_drops_means_of_one_task():
    tasks = {"STS12": ("STS", "cosine_spearman"), "SICK-R": ("STS", "cosine_spearman"),
             "WordNetLexnameClustering": ("Clustering", "v_measure")}
    seconds = {"topk": {"STS12": 1.0, "SICK-R": 2.0, "WordNetLexnameClustering": 1.0},
               "a|b": {"STS12": 1.0, "SICK-R": 4.0, "WordNetLexnameClustering": 1.5}}
    md = made_report(["topk", "a|b"], tasks, seconds=seconds).to_markdown()
    lines = md.splitlines()
    assert lines[0] == "| task | type | metric | topk | a\\|b |"
    assert all(len(line.replace("\\|", "").split("|")) == 7 for line in lines if line.startswith("|"))  # 5 columns each
    assert "| STS12 | STS | cosine_spearman | 30.00 | 31.00 (+1.00) |" in lines
    assert "| **mean STS** (2 tasks) | | | 32.50 | 33.50 (+1.00) |" in lines
    assert not [line for line in lines if "mean Clustering" in line]
    assert "| encode time vs topk (wall-clock) | | | 1.00x | 1.50x [1.00-2.00] |" in lines  # median [min-max] over tasks
    one = made_report(["topk", "usmoe"], {"STS12": ("STS", "cosine_spearman")}).to_markdown()
    assert "mean" not in one.split("\n\n")[0]  # one task: no mean row repeats it


def test_markdown_table_of_routing_statistics_escapes_the_kl_column():
    from hf_moe_patch.report import markdown_table

    row = {"label": "x|y", "experts_per_token_mean": 2.0, "tokens_without_expert_frac": 0.0, "maxvio_top1": 1.0,
           "maxvio": 0.5, "cv": 0.3, "router_entropy": 1.2, "sinkhorn_steps": 0, "kl_to_native": 0.001}
    table = markdown_table([row], "the 3 lines of texts.txt (40 tokens)")
    head, sep, body = table.splitlines()[:3]
    assert head.endswith("| KL(native \\|\\| method) |") and body.startswith("| x\\|y |")
    assert {len(line.replace("\\|", "").split("|")) for line in (head, sep, body)} == {11}
    assert "Statistics over the 3 lines of texts.txt (40 tokens)." in table and "MaxVio: max expert load / mean load - 1" in table


def text_boxes(fig):
    """Window extents of every text a drawn figure shows: titles, axis labels, tick labels
    within the axes' limits, annotations, legend entries."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = [fig._suptitle] if fig._suptitle is not None else []
    for ax in fig.axes:
        (x0, x1), (y0, y1) = sorted(ax.get_xlim()), sorted(ax.get_ylim())
        texts += [t for t in ax.get_xticklabels() if x0 <= t.get_position()[0] <= x1]
        texts += [t for t in ax.get_yticklabels() if y0 <= t.get_position()[1] <= y1]
        texts += [ax.title, ax.xaxis.label, ax.yaxis.label, *ax.texts]
    for legend in fig.legends:
        texts += legend.get_texts()
    return [(t.get_text(), t.get_window_extent(renderer)) for t in texts if t.get_visible() and t.get_text().strip()]


def assert_no_overlap(fig):
    boxes = text_boxes(fig)
    clashes = [(a, b) for i, (a, ba) in enumerate(boxes) for b, bb in boxes[i + 1:]
               if ba.width and bb.width and ba.overlaps(bb) and not (ba.x1 - 0.5 < bb.x0 or bb.x1 - 0.5 < ba.x0)]
    assert not clashes, clashes
    width, height = fig.canvas.get_width_height()
    outside = [t for t, b in boxes if b.x0 < -1 or b.y0 < -1 or b.x1 > width + 1 or b.y1 > height + 1]
    assert not outside, outside


@pytest.mark.parametrize("tasks", [dict(list(ALL_TASKS.items())[:2]), ALL_TASKS])
def test_comparison_figure_has_no_overlapping_labels_and_no_hidden_points(tasks):
    import matplotlib.pyplot as plt

    # Four routings at the same compute (4 experts/token) and close means: their points coincide.
    report = made_report(LONG_LABELS, tasks, compute={"usmoe:top_k=0.75x": 3.0, "usmoe:top_k=0.5x": 2.0})
    fig = report.figure()
    try:
        assert_no_overlap(fig)
        assert not fig.axes[1].texts  # no annotations on the points: the legend names them
        points = fig.axes[1].collections
        assert len(points) == len(LONG_LABELS)
        styles = {(tuple(p.get_sizes()), str(p.get_paths()[0].vertices.round(2).tolist())) for p in points}
        assert len(styles) == len(LONG_LABELS)  # each routing its own marker and size: coinciding points stay visible
        assert all(len(p.get_facecolors()) == 0 or p.get_facecolors()[0][3] == 0 for p in points)  # hollow
        legend = [t.get_text() for t in fig.legends[0].get_texts()]
        assert legend == LONG_LABELS
    finally:
        plt.close(fig)


def test_routing_load_figure_keeps_coinciding_curves_visible():
    """ssr in eval mode routes exactly as topk: the same curve, drawn so that both show, and the
    legend says so; the experts-per-token histogram is grouped bars, never drawn over each other."""
    import matplotlib.pyplot as plt

    from hf_moe_patch.report import compare_routings, load_figure, parse_case
    from hf_moe_patch.testing import tiny_model

    from conftest import batch

    model = tiny_model("olmoe")
    ids, mask = batch(seed=1, batch_size=4, seq_len=16)
    rows = compare_routings(model, [{"input_ids": ids, "attention_mask": mask}],
                            [parse_case(c) for c in ("topk", "ssr", "usmoe:top_k=1.5", "expert_choice")])
    fig = load_figure(rows, "4 random sequences")
    try:
        lines = [line for line in fig.axes[0].get_lines() if line.get_label() and not line.get_label().startswith("_")]
        assert [line.get_label() for line in lines] == ["topk", "ssr (load as topk)", "usmoe:top_k=1.5", "expert_choice"]
        assert list(lines[0].get_ydata()) == list(lines[1].get_ydata())  # the same curve...
        assert (lines[0].get_linestyle(), lines[0].get_marker()) != (lines[1].get_linestyle(), lines[1].get_marker())
        assert lines[1].get_zorder() > lines[0].get_zorder() and lines[1].get_linewidth() < lines[0].get_linewidth()
        bars = [(round(p.get_x(), 6), round(p.get_x() + p.get_width(), 6)) for p in fig.axes[1].patches if p.get_height() > 0]
        assert all(a[1] <= b[0] + 1e-9 or b[1] <= a[0] + 1e-9 for i, a in enumerate(bars) for b in bars[i + 1:])
        assert_no_overlap(fig)
        assert fig._suptitle.get_text() == "Routing statistics over 4 random sequences"
    finally:
        plt.close(fig)


# --- checks before any evaluation ------------------------------------------------------------

def test_task_names_are_checked_with_suggestions():
    assert check_tasks(["WordNetWuPalmerSTS", "WordNetLexnameClustering"]) == ["WordNetWuPalmerSTS", "WordNetLexnameClustering"]
    with pytest.raises(ValueError, match="unknown task 'wordnetwupalmersts'. Did you mean 'WordNetWuPalmerSTS'"):
        check_tasks(["wordnetwupalmersts"])
    with pytest.raises(ValueError, match="unknown task 'STS12x'. Did you mean 'STS12'"):
        check_tasks(["STS12x"])
    with pytest.raises(ValueError, match="no task given"):
        check_tasks([])
    with pytest.raises(ValueError, match="an empty task name"):
        check_tasks([" "])


def test_an_mteb_task_offline_fails_at_once_naming_the_local_tasks(monkeypatch, tmp_path):
    from huggingface_hub import constants

    from hf_moe_patch.hub_access import HubUnreachableError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(HubUnreachableError, match=r"task 'STS12' downloads its data \(mteb/sts12-sts\).*offline "
                                                  r"\(HF_HUB_OFFLINE=1 is set\).*use the local WordNet tasks"):
        check_tasks(["STS12"])
    cached = tmp_path / "datasets--mteb--sts12-sts" / "snapshots" / ("a" * 40)
    cached.mkdir(parents=True)
    assert check_tasks(["STS12"]) == ["STS12"]  # in the cache: usable offline


def test_an_unwritable_output_folder_fails_before_any_evaluation(loaded, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(NotADirectoryError, match="out_dir=.* cannot be created: .* is a file"):
        run(loaded, tmp_path, ["topk"], tasks=["WordNetWuPalmerSTS"], out_dir=blocker / "out")
    assert not (tmp_path / "cache").exists()
    with pytest.raises(ValueError, match="unknown task 'WordNetWuPalmer'"):
        run(loaded, tmp_path, ["topk"], tasks=["WordNetWuPalmer"])
    assert not (tmp_path / "cache").exists()


def test_reference_runs_score_what_mteb_gives_the_reference_encoder(loaded, tmp_path):
    """reference=True: the encoder of the official pipeline, and for classification the tasks that
    average the HS and RW predictions; the scores differ from the per-text design's."""
    import mteb

    from hf_moe_patch.data.wordnet_tasks import wordnet_tasks
    from hf_moe_patch.embeddings.reference import reference_tasks

    model, tokenizer = loaded
    tasks = ["WordNetWuPalmerSTS", "WordNetLexnameClassification"]
    report = run(loaded, tmp_path, ["topk"], tasks=tasks, reference=True, batch_size=8)
    ours = run(loaded, tmp_path, ["topk"], tasks=tasks, batch_size=8)
    assert report.settings["reference"] is True and report.runs[0].model_name != ours.runs[0].model_name
    encoder = MoEEncoder(model, tokenizer, reference=True, batch_size=8, progress=False)
    objects = reference_tasks(wordnet_tasks(tasks, **WN), hidden_size=encoder.hidden_size, sum_weight=1.0)
    result = mteb.evaluate(encoder, objects, cache=None, show_progress_bar=False)
    for task_result in result.task_results:
        assert report.runs[0].scores[task_result.task_name] == pytest.approx(task_result.get_score(), abs=1e-6)
    assert report.runs[0].scores != pytest.approx(ours.runs[0].scores, abs=1e-4)
