"""Patching real transformers models: exactness, restoration, layouts, dtypes, training, errors."""

from __future__ import annotations

import pytest
import torch

import hf_moe_patch as hmp
from hf_moe_patch.errors import LayoutError
from hf_moe_patch.families import family_of
from hf_moe_patch.patching import find_sites
from hf_moe_patch.testing import tiny_model

from conftest import CORE_FAMILIES, FAMILIES, METHOD_CASES, batch, capture_routing


@torch.no_grad()
def logits_of(model, ids, mask, **kw):
    return model(input_ids=ids, attention_mask=mask, **kw).logits


def test_topk_patch_is_bit_exact(model):
    ids, mask = batch(pad_from={1: 7})
    ref = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    hmp.patch(model, "topk")
    out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    assert torch.equal(out.logits, ref.logits)
    if ref.router_logits is not None:
        for a, b in zip(ref.router_logits, out.router_logits):
            assert torch.equal(a, b)


@pytest.mark.parametrize("method,options", METHOD_CASES)
def test_unpatch_restores_bit_for_bit(model, method, options):
    ids, mask = batch(pad_from={1: 7})
    ref = logits_of(model, ids, mask)
    hmp.patch(model, method, **options)
    changed = logits_of(model, ids, mask)
    assert torch.isfinite(changed).all()
    assert not torch.equal(changed, ref), "the method should change the outputs of this tiny model"
    hmp.unpatch(model)
    assert torch.equal(logits_of(model, ids, mask), ref)
    assert hmp.routing_config(model) is None
    for site in find_sites(model, family_of(model)):
        assert "forward" not in site.router.__dict__
        assert site.experts is None or "forward" not in site.experts.__dict__
    assert not model.model._forward_pre_hooks


def test_repatch_replaces_previous_routing(model):
    ids, mask = batch()
    hmp.patch(model, "expert_choice")
    ec = logits_of(model, ids, mask)
    hmp.patch(model, "usmoe", top_k=1.0)
    hmp.patch(model, "expert_choice")
    assert torch.equal(logits_of(model, ids, mask), ec)
    assert hmp.routing_config(model) == {
        "method": "expert_choice", "top_k": None, "causal": False, "thresholds": None, "calibration_info": None
    }
    assert len(model.model._forward_pre_hooks) == 1


@pytest.mark.parametrize(
    "method,options",
    [("usmoe", {}), ("usmoe", {"top_k": 1.25}), ("expert_choice", {}), ("ssr", {"inference": "sinkhorn", "scope": "sequence"})],
)
def test_sequence_results_do_not_depend_on_batch_mates_or_padding(family, method, options):
    model = tiny_model(family)
    hmp.patch(model, method, **options)
    ids, mask = batch(seed=3, batch_size=3, seq_len=10, pad_from={0: 6, 2: 8})
    full = logits_of(model, ids, mask)
    records, handles = capture_routing(model)
    alone = logits_of(model, ids[:1, :6], mask[:1, :6])
    for h in handles:
        h.remove()
    torch.testing.assert_close(full[0, :6], alone[0], rtol=1e-4, atol=1e-5)
    # and the router gave every padding position of the batch no expert at all
    records, handles = capture_routing(model)
    logits_of(model, ids, mask)
    for h in handles:
        h.remove()
    for _, index in records:
        n_exp = find_sites(model, family_of(model))[0].router.num_experts
        assert (index.view(3, 10, -1)[~mask.bool()] == n_exp).all()
        assert (index.view(3, 10, -1)[mask.bool()] < n_exp).any(dim=-1).float().mean() > 0.5


def test_batch_scope_does_depend_on_batch_mates():
    model = hmp.patch(tiny_model("olmoe"), "usmoe", top_k=1.0, scope="batch")
    ids, mask = batch(seed=5, batch_size=4, seq_len=10)
    full = logits_of(model, ids, mask)
    alone = logits_of(model, ids[:1], mask[:1])
    assert not torch.allclose(full[0], alone[0], atol=1e-4)


@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_generate_with_kv_cache(family):
    model = tiny_model(family)
    ids, mask = batch(seed=1, batch_size=2, seq_len=6)
    native = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    hmp.patch(model, "topk")
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False), native)
    hmp.patch(model, "usmoe", top_k=2)
    with hmp.collect_stats(model) as stats:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, use_cache=True)
    assert out.shape == (2, 11)
    layer = stats.layers[0]
    # 1 prefill call + 4 decode calls; each decode step has one token per sequence, so c = k and
    # every decoded token gets exactly k = 2 experts (routing equals token choice there).
    assert layer.calls == 5
    hist = layer.experts_hist.tolist()
    assert layer.tokens == 2 * 6 + 2 * 4
    assert hist[2] >= 2 * 4


def test_generate_with_left_padding_matches_unpadded_sequence():
    model = hmp.patch(tiny_model("olmoe"), "usmoe")
    ids, _ = batch(seed=2, batch_size=1, seq_len=5)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 5, dtype=torch.long)], dim=1)
    a = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    b = model.generate(input_ids=padded, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(a[0], b[0, 3:])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method,options", METHOD_CASES)
def test_half_precision(dtype, method, options):
    model = tiny_model("olmoe", dtype=dtype)
    ids, mask = batch(pad_from={1: 7})
    ref = logits_of(model, ids, mask)
    hmp.patch(model, "topk")
    assert torch.equal(logits_of(model, ids, mask), ref)
    hmp.patch(model, method, **options)
    out = logits_of(model, ids, mask)
    assert out.dtype == dtype and torch.isfinite(out).all()
    hmp.unpatch(model)
    assert torch.equal(logits_of(model, ids, mask), ref)


@pytest.mark.parametrize("impl", ["eager", "batched_mm", "grouped_mm"])
def test_native_experts_kernels_with_variable_experts_per_token(impl):
    """Tokens with 0..N experts reach every kernel (batched_mm would index out of range on the
    sentinel without the pair-list dispatch)."""
    model = tiny_model("olmoe", experts_implementation=impl)
    assert model.config._experts_implementation == impl
    eager = tiny_model("olmoe", experts_implementation="eager")
    ids, mask = batch(pad_from={2: 5})
    for m in (model, eager):
        hmp.patch(m, "usmoe", top_k=1.5)
    torch.testing.assert_close(logits_of(model, ids, mask), logits_of(eager, ids, mask), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", CORE_FAMILIES)
@pytest.mark.parametrize("method,options", [("usmoe", {}), ("ssr", {"p": 1.0}), ("expert_choice", {})])
def test_training_gradients_and_gradient_checkpointing(family, method, options):
    ids, mask = batch(pad_from={0: 9})
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(family)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        hmp.patch(model, method, **options, **({"seed": 0} if method == "ssr" else {}))
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        router = find_sites(model, family_of(model))[0].router
        assert router.weight.grad is not None and torch.isfinite(router.weight.grad).all()
        assert router.weight.grad.abs().sum() > 0
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_output_router_logits_are_the_raw_logits():
    model = tiny_model("olmoe")
    ids, mask = batch()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, output_router_logits=True).router_logits
        hmp.patch(model, "usmoe", top_k=1.5)
        out = model(input_ids=ids, attention_mask=mask, output_router_logits=True).router_logits
    assert torch.equal(out[0], ref[0])  # layer 0 sees the same hidden states
    assert not torch.equal(out[1], ref[1])  # later layers see the changed routing upstream


def test_accelerate_hooks_survive_patch_and_unpatch():
    from accelerate import cpu_offload

    plain = tiny_model("olmoe")
    model = tiny_model("olmoe")
    cpu_offload(model, execution_device=torch.device("cpu"))
    gate = model.model.layers[0].mlp.gate
    hook = gate.forward
    ids, mask = batch(pad_from={1: 6})
    ref = logits_of(model, ids, mask)
    assert torch.equal(ref, logits_of(plain, ids, mask))
    for m in (model, plain):
        hmp.patch(m, "usmoe", top_k=1.5)
    torch.testing.assert_close(logits_of(model, ids, mask), logits_of(plain, ids, mask))
    assert gate.forward is hook and gate._hf_hook is not None
    hmp.unpatch(model)
    assert gate.forward is hook
    assert torch.equal(logits_of(model, ids, mask), ref)


def test_patch_then_dispatch_then_unpatch():
    from accelerate import cpu_offload

    model = tiny_model("mixtral")
    ids, mask = batch()
    ref = logits_of(model, ids, mask)
    hmp.patch(model, "usmoe")
    patched = logits_of(model, ids, mask)
    cpu_offload(model, execution_device=torch.device("cpu"))
    torch.testing.assert_close(logits_of(model, ids, mask), patched)
    hmp.unpatch(model)
    assert torch.equal(logits_of(model, ids, mask), ref)
    assert hasattr(model.model.layers[0].mlp.gate, "_hf_hook")


def test_peft_wrapped_model_patches_and_unpatches():
    from peft import LoraConfig, get_peft_model

    model = tiny_model("qwen2_moe")
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    ids, mask = batch()
    ref = logits_of(peft_model, ids, mask)
    hmp.patch(peft_model, "usmoe", top_k=1.5)
    assert hmp.routing_config(peft_model)["method"] == "usmoe"
    assert not torch.equal(logits_of(peft_model, ids, mask), ref)
    hmp.unpatch(peft_model)
    assert torch.equal(logits_of(peft_model, ids, mask), ref)


# --- SSR in training ---------------------------------------------------------------------------


def test_ssr_turns_aux_loss_off_while_patched():
    model = tiny_model("olmoe", router_aux_loss_coef=0.5)
    model.train()
    ids, mask = batch()
    kw = dict(input_ids=ids, attention_mask=mask, labels=ids)
    with torch.no_grad():
        with_aux = model(**kw, output_router_logits=True).loss
        plain = model(**kw).loss
        assert not torch.allclose(with_aux, plain)
        hmp.patch(model, "ssr", p=0.0)
        assert model.router_aux_loss_coef == 0.0
        torch.testing.assert_close(model(**kw, output_router_logits=True).loss, plain)
        hmp.unpatch(model)
        assert model.router_aux_loss_coef == 0.5
        assert torch.equal(model(**kw, output_router_logits=True).loss, with_aux)


@pytest.mark.parametrize("per_layer", [False, True])
def test_ssr_takes_the_sinkhorn_branch_at_rate_p(per_layer):
    model = hmp.patch(tiny_model("olmoe", num_hidden_layers=3), "ssr", p=0.25, seed=123, per_layer=per_layer)
    model.train()
    ids, mask = batch(batch_size=1, seq_len=4)
    forwards = 240
    with torch.no_grad(), hmp.collect_stats(model) as stats:
        for _ in range(forwards):
            model(input_ids=ids, attention_mask=mask)
    steps = [layer.sinkhorn_steps for layer in stats.layers]
    if per_layer:
        assert len(set(steps)) > 1  # layers draw their own coins
    else:
        assert len(set(steps)) == 1  # one coin shared by all layers
    rate = sum(steps) / (forwards * len(steps))
    sigma = (0.25 * 0.75 / (forwards * (len(steps) if per_layer else 1))) ** 0.5
    assert abs(rate - 0.25) < 4 * sigma
    assert all(i >= 1 for layer in stats.layers for i in layer.sinkhorn_iterations)
    # the same seed repeats the same coins
    again = hmp.patch(tiny_model("olmoe", num_hidden_layers=3), "ssr", p=0.25, seed=123, per_layer=per_layer)
    again.train()
    with torch.no_grad(), hmp.collect_stats(again) as stats2:
        for _ in range(forwards):
            again(input_ids=ids, attention_mask=mask)
    assert [layer.sinkhorn_steps for layer in stats2.layers] == steps


def test_ssr_is_native_at_inference_unless_asked():
    model = tiny_model("olmoe")
    ids, mask = batch()
    ref = logits_of(model, ids, mask)
    hmp.patch(model, "ssr", p=1.0)
    assert torch.equal(logits_of(model, ids, mask), ref)
    hmp.patch(model, "ssr", p=0.0, inference="sinkhorn")
    assert not torch.equal(logits_of(model, ids, mask), ref)


@pytest.mark.parametrize("detach", [False, True])
def test_ssr_gradient_through_the_plan_or_not(detach):
    model = hmp.patch(tiny_model("olmoe"), "ssr", p=1.0, detach=detach, seed=0)
    model.train()
    ids, mask = batch()
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    grad = model.model.layers[0].mlp.gate.weight.grad
    if detach:
        assert grad is None or grad.abs().sum() == 0
    else:
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_ssr_never_nan_on_all_padding_rows_and_single_tokens():
    model = hmp.patch(tiny_model("mixtral"), "ssr", p=1.0, scope="sequence", seed=0)
    model.train()
    ids, mask = batch(batch_size=2, seq_len=5, pad_from={1: 0})
    out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    assert torch.isfinite(out.logits).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    one = model(input_ids=ids[:1, :1], attention_mask=mask[:1, :1])
    assert torch.isfinite(one.logits).all()


# --- the context manager, config and errors ------------------------------------------------------


def test_patched_context_restores_on_exit_and_error():
    model = tiny_model("olmoe")
    ids, mask = batch()
    ref = logits_of(model, ids, mask)
    with hmp.patched(model, "usmoe", top_k=1.0):
        assert hmp.routing_config(model)["top_k"] == 1.0
    assert hmp.routing_config(model) is None
    hmp.patch(model, "expert_choice")
    with pytest.raises(RuntimeError, match="boom"):
        with hmp.patched(model, "ssr", p=0.5):
            raise RuntimeError("boom")
    assert hmp.routing_config(model) == {
        "method": "expert_choice", "top_k": None, "causal": False, "thresholds": None, "calibration_info": None
    }
    hmp.unpatch(model)
    assert torch.equal(logits_of(model, ids, mask), ref)


def test_routing_config_lists_every_option_with_defaults():
    model = hmp.patch(tiny_model("olmoe"), "ssr", p=0.02)
    cfg = hmp.routing_config(model)
    assert cfg == {
        "method": "ssr", "p": 0.02, "epsilon": 0.05, "cost": "softmax", "max_iter": 100, "tol": 1e-4,
        "detach": False, "noise": 0.0, "per_layer": False, "inference": "topk", "seed": None,
        "scope": "batch", "rescale": False,
    }
    assert hmp.supported_models() == ["olmoe", "qwen2_moe", "qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3"]


def test_malformed_config_routing_is_rejected_not_dropped():
    model = tiny_model("olmoe")
    model.config.moe_routing = {"method": "usmoe", "top_k": 1.5}  # options outside "options"
    with pytest.raises(hmp.InvalidOptionError, match=r"unknown keys \['top_k'\].*belong under 'options'"):
        hmp.patch(model)
    assert hmp.routing_config(model) is None


def test_unsupported_model_names_the_supported_families():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(hmp.UnsupportedModelError, match=r"'llama'.*OLMoE.*Qwen2-MoE.*Qwen3-MoE.*Mixtral"):
        hmp.patch(model, "usmoe")
    assert all("forward" not in m.__dict__ for m in model.modules())


@pytest.mark.parametrize(
    "method,options,pattern",
    [
        ("usmoe", {"alpha": 1.5}, r"'alpha'.*1\.5.*\[0, 1\]"),
        ("usmoe", {"top_k": 9}, r"'top_k'.*9.*\(0, 8\]"),
        ("usmoe", {"top_k": 0}, r"'top_k'.*0"),
        ("usmoe", {"scope": "global"}, r"'scope'.*'global'.*'sequence', 'batch'"),
        ("usmoe", {"min_experts": -1}, r"'min_experts'.*-1.*\[0, 8\]"),
        ("usmoe", {"alpah": 0.5}, r"Unknown option 'alpah'.*'alpha'"),
        ("expert_choice", {"top_k": -2}, r"'top_k'.*-2"),
        ("ssr", {"p": 2}, r"'p'.*2.*\[0, 1\]"),
        ("ssr", {"epsilon": 0}, r"'epsilon'.*0.*\[0.0001, inf\)"),
        ("ssr", {"cost": "l2"}, r"'cost'.*'l2'"),
        ("ssr", {"max_iter": 0}, r"'max_iter'.*0"),
        ("ssr", {"detach": "yes"}, r"'detach'.*'yes'"),
        ("ssr", {"seed": -1}, r"'seed'.*-1"),
        ("ssr", {"inference": "ot"}, r"'inference'.*'ot'"),
        ("sinkhorn", {}, r"Unknown routing method 'sinkhorn'.*topk, usmoe, expert_choice, ssr"),
    ],
)
def test_invalid_options_raise_and_leave_the_model_untouched(method, options, pattern):
    model = tiny_model("olmoe")
    ids, mask = batch()
    hmp.patch(model, "usmoe", top_k=1.5)
    before = logits_of(model, ids, mask)
    with pytest.raises(hmp.InvalidOptionError, match=pattern):
        hmp.patch(model, method, **options)
    assert hmp.routing_config(model)["top_k"] == 1.5
    assert torch.equal(logits_of(model, ids, mask), before)


def test_upstream_batched_mm_still_rejects_sentinels():
    """Why the pair-list dispatch exists: transformers' batched_mm indexes its weights with the
    sentinel outside expert parallelism. If this starts passing upstream, revisit dispatch.py."""
    experts = tiny_model("olmoe", experts_implementation="batched_mm").model.layers[0].mlp.experts
    index = torch.tensor([[0, 8], [1, 2]])
    with pytest.raises(IndexError):
        experts(torch.randn(2, 32), index, torch.rand(2, 2))


# --- regressions found in review ----------------------------------------------------------------


def test_deepcopy_of_a_patched_model_is_independent():
    import copy

    model = hmp.patch(tiny_model("olmoe"), "usmoe", top_k=1.5)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.model.layers[0].mlp.gate.weight.mul_(-1.0)  # only the copy's router changes
    ids, mask = batch()
    before = logits_of(model, ids, mask)
    # the copy routes with its own (changed) router weights ...
    assert not torch.equal(logits_of(clone, ids, mask), before)
    reference = hmp.patch(copy.deepcopy(hmp.unpatch(copy.deepcopy(clone))), "usmoe", top_k=1.5)
    assert torch.equal(logits_of(clone, ids, mask), logits_of(reference, ids, mask))
    # ... and unpatching it leaves the original patched
    hmp.unpatch(clone)
    assert hmp.routing_config(clone) is None and hmp.routing_config(model)["top_k"] == 1.5
    assert "forward" in model.model.layers[0].mlp.gate.__dict__
    assert "forward" not in clone.model.layers[0].mlp.gate.__dict__
    assert torch.equal(logits_of(model, ids, mask), before)


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss"])
def test_static_cache_generation_reads_padding_from_4d_and_dict_masks(family):
    model = hmp.patch(tiny_model(family), "usmoe", top_k=2)
    ids, _ = batch(seed=4, batch_size=2, seq_len=6)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # left padding
    with hmp.collect_stats(model) as stats:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                             cache_implementation="static")
    assert out.shape == (2, 9)
    # prefill: 6 + 4 real tokens (padding takes no budget); then 2 decode steps of 2 tokens
    assert stats.layers[0].tokens == 10 + 2 * 2


def test_valid_mask_from_4d_masks():
    from hf_moe_patch.layout import valid_mask

    allowed = torch.tril(torch.ones(3, 3, dtype=torch.bool)).expand(2, 1, 3, 3).clone()
    allowed[1, :, :, 0] = False  # sequence 1: position 0 is padding (no query may attend to it)
    assert valid_mask(allowed, 3).tolist() == [[True, True, True], [False, True, True]]
    additive = torch.zeros(2, 1, 3, 3).masked_fill(~allowed, torch.finfo(torch.float32).min)
    assert valid_mask(additive, 3).tolist() == [[True, True, True], [False, True, True]]
    assert valid_mask({"full_attention": additive, "sliding_attention": None}, 3).tolist()[1] == [False, True, True]
    # decode with a cache of 2 past tokens: the query's own key is slot 2
    decode = torch.zeros(2, 1, 1, 5)
    decode[1, 0, 0, 2] = torch.finfo(torch.float32).min
    assert valid_mask(decode, 1, past_length=2).tolist() == [[True], [False]]
    # a layout that cannot be read fails loudly instead of routing every token as valid
    with pytest.raises(LayoutError, match="does not match 3 current tokens"):
        valid_mask(torch.zeros(2, 1, 4, 4), 3)
    with pytest.raises(LayoutError, match="does not match 5 current tokens"):
        valid_mask(torch.ones(2, 3), 5)
    with pytest.raises(LayoutError, match="KV cache's length is unknown"):
        valid_mask(torch.zeros(2, 1, 1, 5), 1, past_length=None)
    assert valid_mask(None, 3) is None  # no mask: every token is valid


@pytest.mark.parametrize("impl", ["eager", "batched_mm"])
def test_lora_on_the_router_keeps_the_pair_dispatch(impl):
    from peft import LoraConfig, get_peft_model

    model = tiny_model("olmoe", experts_implementation=impl)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=[], target_parameters=["mlp.gate.weight"]))
    hmp.patch(peft_model, "usmoe", top_k=1.5)
    sites = find_sites(peft_model, family_of(peft_model))
    assert all(site.experts is not None for site in sites)
    ids, mask = batch(pad_from={1: 5})
    assert torch.isfinite(logits_of(peft_model, ids, mask)).all()


def test_patched_block_continues_the_previous_seeded_coin_sequence_and_restores_config():
    def coins(model, n):
        out = []
        for _ in range(n):
            with torch.no_grad(), hmp.collect_stats(model) as stats:
                model(input_ids=batch(batch_size=1, seq_len=4)[0])
            out.append(stats.layers[0].sinkhorn_steps)
        return out

    straight = hmp.patch(tiny_model("olmoe"), "ssr", p=0.5, seed=7).train()
    expected = coins(straight, 8)
    model = hmp.patch(tiny_model("olmoe"), "ssr", p=0.5, seed=7).train()
    first = coins(model, 4)
    with hmp.patched(model, "usmoe"):
        pass
    assert first + coins(model, 4) == expected

    native = tiny_model("olmoe")
    native.config.moe_routing = {"stale": True}  # whatever was there before
    with hmp.patched(native, "usmoe"):
        assert native.config.moe_routing["method"] == "usmoe"
    assert native.config.moe_routing == {"stale": True}


@pytest.mark.parametrize("patch_first", [True, False])
@pytest.mark.parametrize("impl", ["eager", "batched_mm"])
def test_lora_on_fused_experts_trains_through_the_pair_dispatch(patch_first, impl):
    from peft import LoraConfig, get_peft_model

    model = tiny_model("olmoe", experts_implementation=impl)
    config = LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False,
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    if patch_first:
        peft_model = get_peft_model(hmp.patch(model, "usmoe", top_k=1.5), config)
    else:
        peft_model = hmp.patch(get_peft_model(model, config), "usmoe", top_k=1.5)
    ids, mask = batch(pad_from={1: 5})
    peft_model.train()
    out = peft_model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    expert_lora = [p for n, p in peft_model.named_parameters() if "lora" in n and "experts" in n]
    assert expert_lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in expert_lora)
    assert hmp.routing_config(peft_model.merge_and_unload())["top_k"] == 1.5
