"""Shared fixtures: tiny real transformers models of every supported family, built locally."""

from __future__ import annotations

import pytest
import torch

from hf_moe_patch.testing import TINY_CONFIGS, tiny_model

FAMILIES = list(TINY_CONFIGS)
CORE_FAMILIES = ["olmoe", "qwen2_moe", "qwen3_moe", "mixtral"]

# Every method with options that make it differ from native routing on tiny inputs.
METHOD_CASES = [
    ("usmoe", {}),
    ("usmoe", {"top_k": 1.5, "scope": "batch", "min_experts": 1}),
    ("expert_choice", {}),
    ("ssr", {"inference": "sinkhorn", "epsilon": 0.1}),
]


def batch(seed: int = 0, batch_size: int = 3, seq_len: int = 12, pad_from: dict[int, int] | None = None):
    """Random input ids with right padding: ``pad_from = {row: first padded position}``."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (batch_size, seq_len), generator=gen)
    mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    for row, start in (pad_from or {}).items():
        ids[row, start:] = 0
        mask[row, start:] = 0
    return ids, mask


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def model(family):
    return tiny_model(family)


def capture_routing(model):
    """Forward hooks that record each router's (weights, index) per call; returns (records, handles)."""
    from hf_moe_patch.families import family_of
    from hf_moe_patch.patching import find_sites

    records: list[tuple[torch.Tensor, torch.Tensor]] = []
    handles = [
        site.router.register_forward_hook(lambda m, a, out: records.append((out[1].detach(), out[2].detach())))
        for site in find_sites(model, family_of(model))
    ]
    return records, handles


WORDNET_FIXTURE = __import__("pathlib").Path(__file__).parent / "fixtures" / "wordnet"
TINY_DEMO = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                 num_experts=4, num_experts_per_tok=2, block_size=32, batch_size=8, eval_blocks=8, warmup_steps=5)
# Sizes of the local WordNet tasks that the fixture database can fill.
SMALL_TASKS = {
    "WordNetLexnameClassification": {"train_per_label": 2, "test_per_label": 3},
    "WordNetSameLemmaPairClassification": {"n_pairs": 30},
    "WordNetWuPalmerSTS": {"n_pairs": 40},
    "WordNetExampleRetrieval": {"n_queries": 30, "n_corpus": 80},
    "WordNetLexnameClustering": {"per_label": 4},
}


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """A tiny demo model pretrained by the real pipeline on the WordNet fixture: (folder, args)."""
    from hf_moe_patch.training.demo_model import DemoTrainingArgs, train_demo_model
    from hf_moe_patch.data.wordnet import load_wordnet

    args = DemoTrainingArgs(steps=60, learning_rate=1e-2, **TINY_DEMO)
    out = tmp_path_factory.mktemp("demo") / "model"
    return train_demo_model(out, args, wordnet=load_wordnet(WORDNET_FIXTURE), progress=False), args


# Tests that took 2.5 s or more each on 2 CPU cores (pytest --durations on a quiet machine):
# `make test-quick` (pytest -m "not slow") leaves them out; `make test` and CI run everything.
SLOW_TESTS = {
    "test_ssr_takes_the_sinkhorn_branch_at_the_requested_rate_without_aux_loss",
    "test_ssr_takes_the_sinkhorn_branch_at_rate_p",
    "test_train_demo_writes_a_new_folder_never_the_shipped_model",
    "test_mteb_rejects_bad_options_with_a_clear_message",
    "test_demo_runs_the_main_job_on_the_shipped_model",
    "test_accelerate_launch_two_processes_on_cpu",
    "test_remote_code_loads_the_same_routing_without_the_package",
    "test_hub_adapter_from_the_offline_cache_keeps_its_routing_or_says_why_not",
    "test_mteb_end_to_end_on_a_saved_model",
    "test_shipped_demo_model_loads_and_matches_its_report",
    "test_resume_from_checkpoint_continues_the_same_run",
    "test_resume_under_another_routing_is_refused_unless_allowed",
    "test_compare_runs_each_routing_on_equal_terms",
    "test_training_loss_falls_for_every_routing",
    "test_corrupted_validation_differs_and_outputs_reproduce_the_run",
    "test_variable_k_methods_compile_without_per_step_recompiles",
    "test_topk_compiles_exactly_like_native_with_fullgraph",
    "test_ssr_in_eval_compiles_with_fullgraph_like_native",
    "test_push_end_to_end_against_a_local_hub",
    "test_stats_on_a_saved_model_folder",
    "test_a_partly_cached_task_set_is_evaluated_whole",
    "test_example_runs",
    "test_corruption_changes_the_texts_and_the_scores",
    "test_wordnet_alpaca_does_not_depend_on_pythonhashseed",
    "test_sft_command_reports_losses_under_default_logging_and_where_it_wrote",
    "test_push_demo_names_the_shipped_model",
    "test_stats_on_the_demo_model_escapes_its_table",
    "test_offline_a_hub_model_task_or_data_set_fails_at_once_saying_what_to_use",
    "test_mteb_checks_every_argument_before_loading_the_model",
    "test_quick_run_reports_measured_cells_and_reuses_the_cache",
    "test_cells_of_another_task_build_are_measured_again",
    "test_reference_runs_score_what_mteb_gives_the_reference_encoder",
    "test_mteb_reference_flag_runs_the_official_pipeline",
    "test_reference_classification_averages_the_hs_and_rw_predictions",
    "test_reference_sts_score_is_the_official_ensemble_spearman",
    "test_reference_clustering_runs_through_mteb_and_restores_its_function",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if getattr(item, "originalname", item.name) in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)


# --- router calls with fixed logits (tests of the methods, without a model) ---------------------


def native_forward_for(native, logits_fn, record: list):
    """A small native router: softmax -> top-k (-> renormalise); records its inputs."""

    def forward(hidden):
        record.append(hidden)
        z = logits_fn(hidden)
        w, i = torch.topk(torch.softmax(z.float(), dim=-1), native.top_k, dim=-1)
        if native.renormalize:
            w = w / w.sum(dim=-1, keepdim=True)
        return z, w.to(z.dtype), i

    return forward


def make_call(logits, native=None, step=None, layer=0):
    """A ``RouterCall`` that hands the method ``logits`` (``native`` defaults to 4 experts, top-2,
    the hand cases' router); returns it and the list of inputs its native forward saw."""
    from hf_moe_patch.methods import NativeRouting, RouterCall, StepState

    native = native if native is not None else NativeRouting(num_experts=4, top_k=2)
    step = step if step is not None else StepState()
    record: list = []

    def logits_fn(hidden):
        return logits

    call = RouterCall(
        hidden_states=torch.zeros(logits.shape[0], 8),
        native=native,
        logits_fn=logits_fn,
        native_forward=native_forward_for(native, logits_fn, record),
        step=step,
        layer=layer,
    )
    return call, record


EVAL_DIR = __import__("pathlib").Path(__file__).resolve().parents[1] / "eval"


def load_eval_script(name: str):
    """An experiment script of eval/ as a module (registered in sys.modules under ``name``, as
    dataclasses and pickling need)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, EVAL_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
