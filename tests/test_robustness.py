"""Correct under real conditions: threads, re-entry, pickling, NaN, transformers' argument names,
torch.compile, expert parallelism and packed (padding-free) sequences."""

from __future__ import annotations

import inspect
import io
import pickle
import threading

import pytest
import torch
from conftest import CORE_FAMILIES, batch

import hf_moe_patch as hmp
from hf_moe_patch.errors import UnsupportedModelError
from hf_moe_patch.patching import find_record
from hf_moe_patch.testing import tiny_model

VARIABLE_K = [("usmoe", {"top_k": 1.5}), ("expert_choice", {}), ("ssr", {"inference": "sinkhorn", "epsilon": 0.1}),
              ("top_p", {"p": 0.6})]


def logits(model, ids, mask=None, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kwargs).logits


# --- threads and re-entry --------------------------------------------------------------------


@pytest.mark.parametrize("method,options", VARIABLE_K[:2])
def test_two_threads_share_one_patched_model(method, options):
    """A web server runs one model from several threads: each forward must route with its own
    batch layout. Before the layout was per call, 5-38 of ~100 forwards came out wrong."""
    model = hmp.patch(tiny_model("olmoe"), method, **options)
    inputs = [batch(seed=1, batch_size=2, seq_len=9, pad_from={1: 4}), batch(seed=2, batch_size=3, seq_len=5, pad_from={0: 2})]
    expected = [logits(model, *x) for x in inputs]
    wrong = [0, 0]
    barrier = threading.Barrier(2)

    def work(i):
        barrier.wait()
        for _ in range(60):
            if not torch.equal(logits(model, *inputs[i]), expected[i]):
                wrong[i] += 1

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == [0, 0]


def test_a_forward_inside_a_forward_keeps_the_outer_layout():
    """Re-entry: a hook that runs the model on another batch in the middle of a forward."""
    model = hmp.patch(tiny_model("olmoe"), "usmoe", top_k=1.5)
    outer_ids, outer_mask = batch(seed=3, batch_size=2, seq_len=8, pad_from={1: 3})
    inner_ids, _ = batch(seed=4, batch_size=3, seq_len=5)
    expected = logits(model, outer_ids, outer_mask)
    calls = []

    def run_inner(module, args, output):
        if not calls:
            calls.append(1)
            logits(model, inner_ids)

    handle = model.model.layers[0].register_forward_hook(run_inner)
    try:
        got = logits(model, outer_ids, outer_mask)
    finally:
        handle.remove()
    assert calls and torch.equal(got, expected)


# --- pickling --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["olmoe", "mixtral", "deepseek_v3"])
@pytest.mark.parametrize("method,options", [("usmoe", {"top_k": 1.5}), ("ssr", {"p": 0.5, "seed": 3})])
def test_patched_models_pickle_and_round_trip(family, method, options):
    model = hmp.patch(tiny_model(family), method, **options)
    ids, mask = batch(pad_from={2: 7})
    expected = logits(model, ids, mask)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert hmp.routing_config(loaded) == hmp.routing_config(model)
    assert torch.equal(logits(loaded, ids, mask), expected)
    copy = pickle.loads(pickle.dumps(model))
    assert torch.equal(logits(copy, ids, mask), expected)
    # the copy is patched on its own: unpatching it leaves the original patched
    native = logits(hmp.unpatch(copy), ids, mask)
    assert torch.equal(native, logits(tiny_model(family), ids, mask))
    assert hmp.routing_config(model) is not None and torch.equal(logits(model, ids, mask), expected)


# --- NaN -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,options", [*VARIABLE_K, ("usmoe", {"top_k": 1.0, "min_experts": 1})])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_router_weights_propagate_like_native(method, options, bad):
    """NaN/inf router weights: native outputs NaN; a variable-k router must not quietly give
    every token no expert and return finite, meaningless outputs."""
    ids, mask = batch(pad_from={1: 6})
    native = tiny_model("olmoe")
    with torch.no_grad():
        native.model.layers[1].mlp.gate.weight[3] = bad
    patched = hmp.patch(tiny_model("olmoe"), method, **options)
    with torch.no_grad():
        patched.model.layers[1].mlp.gate.weight[3] = bad
    want, got = logits(native, ids, mask), logits(patched, ids, mask)
    assert torch.isnan(want).any()
    valid = mask.bool()
    assert torch.isnan(got[valid]).any(dim=-1).all(), "every valid token's output must carry the NaN"


# --- transformers' argument names --------------------------------------------------------------


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_the_kv_cache_is_found_under_either_name(name):
    """transformers 5.24 renamed the decoder stack's past_key_values to cache (the old name stays
    a deprecated alias): a 4-D mask's padding is read at the right key slot under either."""
    from transformers import DynamicCache

    model = hmp.patch(tiny_model("olmoe"), "usmoe", top_k=2)
    ids, _ = batch(seed=4, batch_size=2, seq_len=6)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **{name: cache})
    # one decode step; row 1's new token is padding in a 4-D boolean mask over 7 keys
    allowed = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    allowed[1, 0, 0, 6] = False
    with torch.no_grad(), hmp.collect_stats(model) as stats:
        model(input_ids=ids[:, :1], attention_mask=allowed, use_cache=True, **{name: cache})
    assert stats.layers[0].tokens == 1


def test_a_decoder_stack_with_unknown_arguments_is_refused_before_anything_changes():
    """If transformers renames the inputs the layout is read from, patch fails loudly."""
    model = tiny_model("olmoe")
    base = model.model
    original = type(base)

    class Renamed(original):
        def forward(self, input_ids=None, attention_mask=None, **kw):  # the cache only in **kw
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kw)

    base.__class__ = Renamed
    ids, mask = batch()
    before = logits(model, ids, mask)
    with pytest.raises(UnsupportedModelError, match="KV cache named one of"):
        hmp.patch(model, "usmoe")
    assert find_record(model) is None and torch.equal(logits(model, ids, mask), before)
    hmp.patch(model, "topk")  # reads no layout: still fine


def test_usmoe_routes_identically_under_dynamic_and_static_caches():
    model = hmp.patch(tiny_model("olmoe"), "usmoe", top_k=1.5)
    ids, _ = batch(seed=4, batch_size=2, seq_len=6)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # left padding
    runs = {}
    for cache in ("dynamic", "static"):
        with hmp.collect_stats(model) as stats:
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                 cache_implementation=cache)
        runs[cache] = (out, [(layer.tokens, layer.load.tolist(), layer.experts_hist.tolist()) for layer in stats.layers])
    assert torch.equal(runs["dynamic"][0], runs["static"][0])
    assert runs["dynamic"][1] == runs["static"][1]
    # padding took no experts: 10 prefill tokens, then 4 decode steps of 2 tokens
    assert runs["static"][1][0][0] == 10 + 4 * 2


# --- torch.compile -----------------------------------------------------------------------------


def compile_counts(model, inputs, **compile_kwargs):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, **compile_kwargs)
    frames, outputs = [], []
    for ids, mask in inputs:
        outputs.append(logits(compiled, ids, mask))
        frames.append(counter.frame_count)
    torch._dynamo.reset()
    return frames, outputs


def same_shape_batches(n=4):
    return [batch(seed=s, batch_size=2, seq_len=7, pad_from={1: 3 + s % 3}) for s in range(n)]


def test_topk_compiles_exactly_like_native_with_fullgraph():
    inputs = same_shape_batches()
    native_frames, native_out = compile_counts(tiny_model("olmoe"), inputs, fullgraph=True)
    frames, out = compile_counts(hmp.patch(tiny_model("olmoe"), "topk"), inputs, fullgraph=True)
    assert frames == native_frames and frames[-1] == frames[0]  # one graph, no recompiles
    assert all(torch.equal(a, b) for a, b in zip(out, native_out))


def test_ssr_in_eval_compiles_with_fullgraph_like_native():
    inputs = same_shape_batches()
    native_frames, native_out = compile_counts(tiny_model("olmoe"), inputs, fullgraph=True)
    frames, out = compile_counts(hmp.patch(tiny_model("olmoe"), "ssr", p=0.5), inputs, fullgraph=True)
    assert frames[-1] == frames[0] == native_frames[0]
    assert all(torch.equal(a, b) for a, b in zip(out, native_out))


def test_variable_k_methods_compile_without_per_step_recompiles():
    model = hmp.patch(tiny_model("olmoe"), "usmoe", top_k=1.5)
    inputs = same_shape_batches(6)
    expected = [logits(model, *x) for x in inputs]
    frames, out = compile_counts(model, inputs)
    assert frames[-1] == frames[1], f"recompiled as routing changed: {frames}"
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(out, expected))


def test_fullgraph_with_a_variable_k_method_fails_with_a_clear_message():
    model = hmp.patch(tiny_model("olmoe"), "usmoe")
    with pytest.raises(Exception, match="hf_moe_patch.*fullgraph"):
        compile_counts(model, same_shape_batches(1), fullgraph=True)


# --- expert parallelism --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    if not dist.is_initialized():
        store = tmp_path_factory.mktemp("dist") / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))


@pytest.mark.parametrize("order", ["patch-then-distribute", "distribute-then-patch"])
@pytest.mark.parametrize("method", ["usmoe", "expert_choice"])
def test_variable_k_routing_under_transformers_expert_parallelism(process_group, order, method):
    """transformers' EP replaces the experts forward with an all-to-all that indexes by expert id;
    the empty-slot sentinel used to reach it (IndexError). One process group of one rank runs the
    real all-to-all code path."""
    from transformers.distributed.expert_parallel import apply_expert_parallelism

    ids, mask = batch(pad_from={1: 5})
    reference = hmp.patch(tiny_model("olmoe"), method, top_k=1.5)
    expected = logits(reference, ids, mask)
    model = tiny_model("olmoe")
    plan = {}
    for i in range(model.config.num_hidden_layers):
        prefix = f"model.layers.{i}.mlp.experts"
        plan.update({prefix: "ep_dispatch_experts", f"{prefix}.gate_up_proj": "grouped_gemm", f"{prefix}.down_proj": "grouped_gemm"})
    if order == "patch-then-distribute":
        hmp.patch(model, method, top_k=1.5)
    apply_expert_parallelism(model, process_group, process_group, plan, ep_implementation="all_to_all")
    if order == "distribute-then-patch":
        hmp.patch(model, method, top_k=1.5)
    got = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(got, expected, atol=1e-5)
    got.sum().backward()  # the training path (all-to-all with autograd) runs too


# --- packed sequences ------------------------------------------------------------------------------


def packed_and_padded(seed=5, lengths=(5, 3, 4)):
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, 128, (n,), generator=gen) for n in lengths]
    width = max(lengths)
    padded = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        padded[i, : len(s)], mask[i, : len(s)] = s, 1
    packed = torch.cat(seqs).unsqueeze(0)
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    # sdpa/eager attention keeps packed sequences apart only with a block-diagonal causal mask
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    block = (seg[:, None] == seg[None, :]) & torch.tril(torch.ones(len(seg), len(seg), dtype=torch.bool))
    return padded, mask, packed, position_ids, cu, block.view(1, 1, len(seg), len(seg))


@pytest.mark.parametrize("family", CORE_FAMILIES)
@pytest.mark.parametrize("method,options", VARIABLE_K[:2] + [("ssr", {"inference": "sinkhorn", "epsilon": 0.1, "scope": "sequence"})])
def test_packed_sequences_route_like_separate_sequences(family, method, options):
    """Padding-free training packs sequences into one row (position_ids restart at 0): each keeps
    its own budget. Before, USMoE pooled it across the packed sequences."""
    model = hmp.patch(tiny_model(family), method, **options)
    padded, mask, packed, position_ids, cu, block_mask = packed_and_padded()
    want = logits(model, padded, mask)[mask.bool()]
    native = logits(hmp.unpatch(tiny_model(family)), packed, block_mask, position_ids=position_ids)[0]
    assert torch.allclose(native, logits(tiny_model(family), padded, mask)[mask.bool()], atol=1e-5)  # the setup is sound
    got = logits(model, packed, block_mask, position_ids=position_ids)[0]
    assert torch.allclose(got, want, atol=1e-5)
    # flash attention's cumulative lengths tell the same boundaries
    got_cu = logits(model, packed, block_mask, position_ids=position_ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                    max_length_q=5, max_length_k=5)[0]
    assert torch.allclose(got_cu, want, atol=1e-5)


def test_position_restarts_next_to_padding_are_not_packing():
    """generate() gives left-padded rows positions from the mask; that is one sequence per row."""
    from hf_moe_patch.ops import packed_segment_ids

    valid = torch.tensor([[False, False, True, True, True], [True, True, True, True, True]])
    positions = torch.tensor([[1, 1, 0, 1, 2], [0, 1, 2, 3, 4]])
    assert packed_segment_ids(valid, positions) is None
    positions[1, 3:] = torch.tensor([0, 1])
    assert packed_segment_ids(valid, positions).tolist() == [[0, 0, 0, 0, 0], [1, 1, 1, 2, 2]]


def test_the_layout_hook_reads_arguments_from_the_signature():
    from hf_moe_patch.layout import CACHE_ARGUMENTS, ForwardArguments

    arguments = ForwardArguments.of(tiny_model("olmoe").model)
    names = list(inspect.signature(type(tiny_model("olmoe").model).forward).parameters)[1:]
    assert dict(arguments.positions)["attention_mask"] == names.index("attention_mask")
    assert arguments.cache_names[0] in names and set(arguments.cache_names) == set(CACHE_ARGUMENTS)
