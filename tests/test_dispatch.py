"""The pair dispatch's CPU experts loop against transformers' own experts kernels.

The loop must give what the native kernels give (to float rounding: it sums in another order)
for every family's experts module, in float32 and bfloat16, with and without autograd, and must
hand anything it does not recognise (peft's LoRA on the experts, expert parallelism, another
kernel) to the native forward.
"""

from __future__ import annotations

import pytest
import torch

import hf_moe_patch as hmp
import hf_moe_patch.dispatch as dispatch
from hf_moe_patch.dispatch import PairDispatch, experts_loop, loop_supported
from hf_moe_patch.testing import tiny_model

from conftest import batch

REAL_LOOP_SUPPORTED = dispatch.loop_supported


@pytest.fixture(autouse=True)
def loop_at_any_size(monkeypatch):
    """The tiny models here have a few pairs per expert, below the size at which the dispatch
    prefers its loop to the native kernel with autograd: lower the bar so that the loop runs."""
    monkeypatch.setattr(dispatch, "LOOP_MIN_PAIRS_PER_EXPERT_AUTOGRAD", 0)
FAMILIES = ["olmoe", "qwen2_moe", "qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3"]
KERNELS = ["eager", "grouped_mm", "batched_mm"]


def experts_of(family: str, impl: str = "grouped_mm", dtype: torch.dtype = torch.float32):
    model = tiny_model(family, dtype=dtype, experts_implementation=impl)
    return [m for name, m in model.named_modules() if name.endswith("mlp.experts")][0]


def random_slots(num_tokens: int, num_experts: int, k_max: int, dtype: torch.dtype, seed: int = 0):
    """(T, k_max) slots with 0..k_max distinct experts per token, sentinel N and weight 0 after."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.argsort(torch.rand(num_tokens, num_experts, generator=gen), dim=1)[:, :k_max]
    counts = torch.randint(0, k_max + 1, (num_tokens,), generator=gen)
    counts[0], counts[1] = 0, k_max  # a token without experts and one with all slots
    real = torch.arange(k_max) < counts.unsqueeze(1)
    index = order.masked_fill(~real, num_experts)
    weights = (torch.rand(num_tokens, k_max, generator=gen) * real).to(dtype)
    return index, weights, real


def hidden_size(experts) -> int:
    return experts.config.hidden_size


def assert_close_relative(got: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """Largest difference within ``rel`` of the largest expected magnitude."""
    got, expected = got.detach().float(), expected.detach().float()
    scale = expected.abs().max().clamp_min(1e-12)
    assert float((got - expected).abs().max()) <= rel * float(scale)


def native_on_slots(experts, hidden, index, weights, num_experts):
    """The native kernel on the same pairs: empty slots point at expert 0 with weight 0."""
    return experts(hidden, index.clamp_max(num_experts - 1), weights * (index < num_experts))


def tolerance(dtype: torch.dtype) -> dict:
    return dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize("family", FAMILIES)
def test_loop_equals_native_kernels_without_autograd(family, impl, dtype):
    experts = experts_of(family, impl, dtype)
    assert loop_supported(experts, experts.forward)
    N = experts.num_experts
    hidden = torch.randn(41, hidden_size(experts)).to(dtype)
    index, weights, _ = random_slots(41, N, 3, dtype)
    with torch.no_grad():
        expected = native_on_slots(experts, hidden, index, weights, N)
        got = experts_loop(experts, hidden, index, weights, N)
    assert got.dtype == expected.dtype == dtype
    torch.testing.assert_close(got.float(), expected.float(), **tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", FAMILIES)
def test_loop_gradients_equal_native_eager_and_grouped_mm(family, dtype):
    for impl in ("eager", "grouped_mm"):
        experts = experts_of(family, impl, dtype)
        N = experts.num_experts
        hidden = torch.randn(29, hidden_size(experts)).to(dtype)
        index, weights, _ = random_slots(29, N, 4, dtype, seed=1)
        results = []
        for run in (lambda h, w: native_on_slots(experts, h, index, w, N), lambda h, w: experts_loop(experts, h, index, w, N)):
            experts.zero_grad(set_to_none=True)
            h, w = hidden.clone().requires_grad_(), weights.clone().requires_grad_()
            out = run(h, w)
            out.float().square().sum().backward()
            results.append([out, h.grad, w.grad] + [p.grad for p in experts.parameters()])
        for a, b in zip(*results):
            assert_close_relative(b, a, 1e-5 if dtype == torch.float32 else 3e-2)


def test_loop_group_size_does_not_change_results(monkeypatch):
    experts = experts_of("olmoe")
    hidden = torch.randn(64, 32)
    index, weights, _ = random_slots(64, 8, 5, torch.float32, seed=2)
    with torch.no_grad():
        ref = native_on_slots(experts, hidden, index, weights, 8)
        outs = []
        for group_bytes in (1, 1 << 12, 1 << 30):  # one expert per group ... all experts at once
            monkeypatch.setattr(dispatch, "GROUP_BYTES", group_bytes)
            outs.append(experts_loop(experts, hidden, index, weights, 8))
    for out in outs:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_loop_counts_a_repeated_expert_twice_like_native():
    experts = experts_of("mixtral", "eager")
    hidden = torch.randn(3, 32)
    index = torch.tensor([[1, 1, 8], [2, 8, 8], [8, 8, 8]])
    weights = torch.tensor([[0.25, 0.5, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    with torch.no_grad():
        got = experts_loop(experts, hidden, index, weights, 8)
        expected = native_on_slots(experts, hidden, index, weights, 8)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(got[2], torch.zeros(32))


def test_loop_under_cpu_autocast_matches_native():
    experts = experts_of("olmoe", "eager")
    hidden = torch.randn(20, 32)
    index, weights, _ = random_slots(20, 8, 3, torch.float32, seed=3)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = native_on_slots(experts, hidden, index, weights, 8)
        got = experts_loop(experts, hidden, index, weights, 8)
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-3)


def test_pair_dispatch_uses_the_loop_on_cpu_for_enough_pairs_per_expert(monkeypatch):
    experts = experts_of("qwen3_moe")
    calls = []
    real_loop = dispatch._experts_loop
    monkeypatch.setattr(dispatch, "_experts_loop", lambda *a, **k: calls.append(a) or real_loop(*a, **k))
    native = []
    forward = experts.forward
    hidden = torch.randn(40, 32)
    index, weights, real = random_slots(40, 8, 3, torch.float32)
    with torch.no_grad():
        expected = native_on_slots(experts, hidden, index, weights, 8)
        # Each layout below is computed by exactly one path, with the same result.
        torch.testing.assert_close(PairDispatch(forward, 8, experts)(hidden, index, weights), expected)
        assert len(calls) == 1
        # Without the module, or for a forward it does not recognise, the native kernel runs.
        for wrapped in (PairDispatch(lambda *a: native.append(a) or forward(*a), 8),
                        PairDispatch(lambda *a: native.append(a) or forward(*a), 8, experts)):
            torch.testing.assert_close(wrapped(hidden, index, weights), expected)
        assert len(calls) == 1 and len(native) == 2
    # With autograd and too few pairs per expert for the loop to pay off, the loop declines
    # (returns None after grouping the pairs) and the native kernel runs.
    monkeypatch.setattr(dispatch, "LOOP_MIN_PAIRS_PER_EXPERT_AUTOGRAD", int(real.sum()))
    declined = []
    monkeypatch.setattr(dispatch, "_experts_loop", lambda *a, **k: declined.append(real_loop(*a, **k)) or declined[-1])
    h = hidden.clone().requires_grad_()
    torch.testing.assert_close(PairDispatch(forward, 8, experts)(h, index, weights), expected)
    assert declined == [None]


def test_dispatch_prefers_the_loop_by_pairs_per_expert_with_autograd(monkeypatch):
    monkeypatch.undo()
    experts = experts_of("olmoe")  # its weights require grad: autograd is on outside no_grad
    hidden = torch.randn(8, 32)
    index, weights, _ = random_slots(8, 8, 2, torch.float32)  # about 1 pair per expert
    assert dispatch._experts_loop(experts, hidden, index, weights, 8, worth_it=True) is None
    assert dispatch._experts_loop(experts, hidden, index, weights, 8, worth_it=False) is not None
    with torch.no_grad():  # without autograd the loop runs at any size
        assert dispatch._experts_loop(experts, hidden, index, weights, 8, worth_it=True) is not None
    big = torch.randn(2000, 32)
    index, weights, _ = random_slots(2000, 8, 4, torch.float32)  # about 500 pairs per expert
    assert dispatch._experts_loop(experts, big, index, weights, 8, worth_it=True) is not None


def test_loop_supported_recognises_only_the_native_layouts():
    experts = experts_of("olmoe")
    assert loop_supported(experts, experts.forward)
    assert loop_supported(experts_of("gpt_oss"), None)  # transposed, with biases, own gate
    assert not loop_supported(experts, lambda *a: None)  # a wrapper around the forward
    assert not loop_supported(None)
    assert not loop_supported(torch.nn.Linear(2, 2))
    experts._is_expert_parallel = True
    assert not loop_supported(experts, experts.forward)
    experts._is_expert_parallel = False
    experts.has_post_expert_norm = True
    assert not loop_supported(experts, experts.forward)
    experts.has_post_expert_norm = False
    experts.config._experts_implementation = "sonicmoe"  # a kernel whose maths we do not copy
    assert not loop_supported(experts, experts.forward)
    experts.config._experts_implementation = "grouped_mm"

    class Double(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    torch.nn.utils.parametrize.register_parametrization(experts, "gate_up_proj", Double())
    assert not loop_supported(experts, experts.forward)  # peft's LoRA on the experts works this way


@pytest.mark.parametrize("patch_first", [True, False])
def test_lora_on_the_experts_keeps_the_native_forward(patch_first, monkeypatch):
    """peft's LoRA on the fused expert weights (a parametrisation while its wrapper runs): the
    dispatch must not read the bare weights, in either order of patching and wrapping."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=2, target_modules=[], init_lora_weights=False,
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    ids, mask = batch(pad_from={1: 5})
    outs = []
    for loop_allowed in (True, False):
        monkeypatch.setattr(dispatch, "loop_supported", REAL_LOOP_SUPPORTED if loop_allowed else lambda *a: False)
        torch.manual_seed(0)
        model = tiny_model("olmoe")
        if patch_first:
            model = get_peft_model(hmp.patch(model, "usmoe", top_k=1.5), config)
        else:
            model = hmp.patch(get_peft_model(model, config), "usmoe", top_k=1.5)
        with torch.no_grad():
            outs.append(model(input_ids=ids, attention_mask=mask).logits)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,options", [("usmoe", {"top_k": 1.5}), ("expert_choice", {}), ("ssr", {"inference": "sinkhorn"})])
def test_patched_model_with_the_loop_equals_the_native_kernel_path(family, method, options, monkeypatch):
    ids, mask = batch(pad_from={1: 6})
    outs = []
    for loop_allowed in (True, False):
        monkeypatch.setattr(dispatch, "loop_supported", REAL_LOOP_SUPPORTED if loop_allowed else lambda *a: False)
        model = hmp.patch(tiny_model(family), method, **options)
        with torch.no_grad():
            outs.append(model(input_ids=ids, attention_mask=mask).logits)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
