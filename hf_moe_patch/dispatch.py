"""Pair-list dispatch: the experts see only the selected (token, expert) pairs.

Routers with a variable number of experts per token return ``(T, k_max)`` slots padded with the
sentinel index ``N`` and weight 0. transformers' kernels still gather, sort and scatter every
slot, so a few tokens with many experts would make every token pay ``k_max`` slots; and outside
expert parallelism ``batched_mm`` indexes its weights with the sentinel and ``grouped_mm`` leaves
sentinel rows uninitialised. This wrapper sits in front of the native experts forward and runs
the real pairs only, so work follows the number of pairs ``P`` and no sentinel reaches a kernel:

* on CPU, for an experts module of transformers' standard fused layout (see
  :func:`loop_supported`), it runs the experts itself in a loop over the experts that have pairs
  (:func:`experts_loop`: gather the expert's tokens, its two projections with the module's own
  weights, scale by the gate, ``index_add_`` back), which on CPU is faster than every native
  kernel (``grouped_mm`` spends much of its time in P x d gathers and scatters);
* elsewhere (GPU: ``grouped_mm`` is the right kernel there; a module it does not recognise, such
  as peft's LoRA wrapper around the experts, expert parallelism, or a kernel from the Hub; with
  autograd, a layout with few pairs per expert, see :data:`LOOP_MIN_PAIRS_PER_EXPERT_AUTOGRAD`) it
  passes a call whose slots are all real through untouched, and otherwise lays the real pairs
  out one per row (``(P, 1)``), calls the native kernel on those ``P`` rows only, and sums each
  token's rows back.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

def _default_apply_gate():
    """transformers' default gating (``act_fn(gate) * up`` on the halves of ``gate_up``), or None."""
    try:
        from transformers.integrations.moe import _default_apply_gate as gate
    except ImportError:  # pragma: no cover - another transformers layout
        return None
    return gate


# Experts implementations whose maths the CPU loop reproduces (transformers' own kernels).
LOOP_IMPLEMENTATIONS = frozenset({"eager", "grouped_mm", "batched_mm"})


class PairDispatch:
    """Wraps an experts forward ``(hidden (T, d), index (T, K), weights (T, K)) -> (T, d)``.

    An object rather than a closure, so that ``copy.deepcopy`` of a patched model rebinds it to
    the copy's experts, and the model pickles.

    Args:
        experts_forward: the forward it wraps.
        num_experts: ``N``; slots holding ``N`` are empty.
        module, method: the experts module and the patch's routing method. While the method
            routes natively in the module's mode (SSR in eval mode) every slot is real and the
            call goes straight through, without looking at the indices (no device sync, nothing
            data-dependent to compile). With ``module`` given, on CPU, the experts run in
            :func:`experts_loop` when :func:`loop_supported` recognises the module.

    Example:
        >>> def experts(h, idx, w):  # expert e multiplies by (e + 1)
        ...     return ((idx.float() + 1) * w).sum(-1, keepdim=True) * h
        >>> f = PairDispatch(experts, num_experts=2)
        >>> f(torch.ones(2, 1), torch.tensor([[0, 1], [1, 2]]), torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
        tensor([[1.5000],
                [2.0000]])
    """

    def __init__(
        self, experts_forward: Callable[..., torch.Tensor], num_experts: int, module: Any = None, method: Any = None
    ) -> None:
        self.experts_forward, self.num_experts, self.module, self.method = experts_forward, num_experts, module, method

    def __call__(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, *args, **kwargs):
        if self.method is not None and self.method.routes_natively(self.module.training):
            return self.experts_forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
        return _dispatch_pairs(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs)


def dispatch_pairs(
    dispatch: PairDispatch, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, *args, **kwargs
) -> torch.Tensor:
    """Run ``dispatch``'s experts on the real (token, expert) pairs only: in :func:`experts_loop`
    on CPU for a recognised module, else through the native kernel (a full layout passes through)."""
    experts_forward = dispatch.experts_forward
    if not args and not kwargs and hidden_states.device.type == "cpu" and loop_supported(dispatch.module, experts_forward):
        out = _experts_loop(dispatch.module, hidden_states, top_k_index, top_k_weights, dispatch.num_experts, worth_it=True)
        if out is not None:
            return out
    real = top_k_index < dispatch.num_experts
    if bool(real.all()):
        return experts_forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
    acc_dtype = accumulation_dtype(hidden_states.dtype)
    out = hidden_states.new_zeros(hidden_states.shape, dtype=acc_dtype)
    # Boolean masking lists the real slots token-major (row by row), so each token's pairs
    # are one contiguous run of length counts[t].
    pair_index = top_k_index[real].unsqueeze(1)
    num_pairs = pair_index.shape[0]
    if num_pairs == 0:
        return out.to(hidden_states.dtype)
    counts = real.sum(dim=1)
    # repeat_interleave lays out the same rows as hidden_states[token] but is several times
    # faster on CPU than advanced indexing (this copy is P x d, the size of the experts' input).
    pair_hidden = hidden_states.repeat_interleave(counts, dim=0, output_size=num_pairs)
    token = torch.arange(hidden_states.shape[0], device=hidden_states.device).repeat_interleave(
        counts, output_size=num_pairs
    )
    pair_out = experts_forward(pair_hidden, pair_index, top_k_weights[real].unsqueeze(1), *args, **kwargs)
    # Accumulate in float32 like the native kernels' reshape+sum does for half precision.
    return out.index_add_(0, token, pair_out.to(acc_dtype)).to(hidden_states.dtype)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half precision (as the native kernels' reshape+sum), else ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def loop_supported(module: Any, experts_forward: Callable[..., Any] | None = None) -> bool:
    """Whether :func:`experts_loop` reproduces ``module``'s experts forward.

    True for the fused experts modules of transformers' ``use_experts_implementation`` contract
    (``gate_up_proj`` ``(N, 2I, d)`` or ``up_proj``, ``down_proj`` ``(N, d, I)``, transposed
    layouts, biases, a custom ``_apply_gate``: OLMoE, Qwen-MoE, Mixtral, DeepSeek-V3, GPT-OSS)
    running one of transformers' own kernels (eager, grouped_mm, batched_mm), when
    ``experts_forward`` (if given) is the module's own class forward. False for anything else:
    a wrapper around the forward (peft's LoRA on the experts, expert parallelism, accelerate
    hooks keep the forward), parametrised weights, a post-expert norm, another kernel.

    Example:
        >>> from hf_moe_patch.testing import tiny_model
        >>> experts = tiny_model("olmoe").model.layers[0].mlp.experts
        >>> loop_supported(experts, experts.forward), loop_supported(experts, lambda *a: None)
        (True, False)
    """
    if module is None or not isinstance(module, torch.nn.Module):
        return False
    if experts_forward is not None and not (
        getattr(experts_forward, "__self__", None) is module
        and getattr(experts_forward, "__func__", None) is getattr(type(module), "forward", None)
    ):
        return False
    flags = ("has_gate", "has_bias", "is_transposed", "has_post_expert_norm", "_is_expert_parallel")
    if not all(isinstance(getattr(module, f, None), bool) for f in flags):
        return False
    if module.has_post_expert_norm or module._is_expert_parallel:
        return False
    if getattr(getattr(module, "config", None), "_experts_implementation", None) not in LOOP_IMPLEMENTATIONS:
        return False
    if torch.nn.utils.parametrize.is_parametrized(module):
        return False
    up = "gate_up_proj" if module.has_gate else "up_proj"
    names = [up, "down_proj"] + ([f"{up}_bias", "down_proj_bias"] if module.has_bias else [])
    params = module._parameters
    if not all(isinstance(params.get(n), torch.Tensor) for n in names):
        return False
    w1, w2 = params[up], params["down_proj"]
    if w1.dim() != 3 or w2.dim() != 3 or w1.shape[0] != w2.shape[0]:
        return False
    return not module.has_gate or callable(getattr(module, "_apply_gate", None))


# With autograd, below this mean number of pairs per expert (that has pairs) the loop's fixed cost
# per expert (several autograd nodes each, forward and backward) outweighs what it saves over the
# native kernel, whose extra cost grows with the pairs (measured on a 2-core CPU, OLMoE-shaped
# layers, 1 and 2 threads): the dispatch then uses the native kernel. Without autograd the loop
# stayed within about 6 % of the native kernel at 16-64 tokens of 8 experts each and was faster
# below (decoding) and above (from a few hundred tokens on), so it always runs.
LOOP_MIN_PAIRS_PER_EXPERT_AUTOGRAD = 96


def experts_loop(
    module: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    num_experts: int,
) -> torch.Tensor:
    """The experts of ``module`` on the real slots of ``top_k_index``, in a loop over experts.

    Slots holding ``num_experts`` (or more) are empty. The pairs are grouped by expert with one
    stable sort; each expert with pairs runs its up (gate) and down projections with the
    module's own weights (``module._apply_gate`` or ``act_fn`` in between) on its tokens, and
    its output, scaled by the gates, is added to its tokens (in float32 for half precision).
    Without autograd, consecutive experts share buffers of a few MB and one gather, activation
    and ``index_add_`` per group (:func:`_grouped_experts`); with autograd, the expert inputs
    and outputs are one gathered ``(P, d)`` block each, so backward makes one scatter and one
    gather instead of a full-size zero-filled gradient buffer per expert.

    Results equal the native kernels' to float rounding (the summation order differs).
    :class:`PairDispatch` uses it on CPU, except with autograd for layouts of fewer than
    :data:`LOOP_MIN_PAIRS_PER_EXPERT_AUTOGRAD` pairs per expert on average.

    Example:
        >>> from hf_moe_patch.testing import tiny_model
        >>> experts = tiny_model("olmoe").model.layers[0].mlp.experts
        >>> h, idx, w = torch.randn(3, 32), torch.tensor([[0, 5], [8, 8], [2, 8]]), torch.rand(3, 2)
        >>> torch.allclose(experts_loop(experts, h, idx, w, 8), experts(h, idx.clamp_max(7), w * (idx < 8)), atol=1e-6)
        True
    """
    out = _experts_loop(module, hidden_states, top_k_index, top_k_weights, num_experts, worth_it=False)
    assert out is not None
    return out


def _experts_loop(
    module: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    num_experts: int,
    *,
    worth_it: bool,
) -> torch.Tensor | None:
    """:func:`experts_loop`; with ``worth_it``, None (nothing computed but the grouping) when,
    with autograd, the layout has too few pairs per expert for the loop to beat the native kernel."""
    T = hidden_states.shape[0]
    acc_dtype = accumulation_dtype(hidden_states.dtype)
    out = hidden_states.new_zeros(hidden_states.shape, dtype=acc_dtype)
    K = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)
    if T == 0 or K == 0:
        return out.to(hidden_states.dtype)
    # Sentinels (and anything out of range) sort last; a stable sort keeps each expert's pairs
    # in token order.
    expert_sorted, order = torch.sort(flat.clamp_max(num_experts), stable=True)
    counts = torch.bincount(expert_sorted, minlength=num_experts + 1)[:num_experts].tolist()
    num_pairs = sum(counts)
    if num_pairs == 0:
        return out.to(hidden_states.dtype)
    up_name = "gate_up_proj" if module.has_gate else "up_proj"
    w_up, w_down = getattr(module, up_name), module.down_proj
    b_up = getattr(module, f"{up_name}_bias") if module.has_bias else None
    b_down = module.down_proj_bias if module.has_bias else None
    transposed = module.is_transposed
    experts = [e for e, c in enumerate(counts) if c > 0]
    needs_grad = torch.is_grad_enabled() and (
        hidden_states.requires_grad or top_k_weights.requires_grad or any(
            p is not None and p.requires_grad for p in (w_up, w_down, b_up, b_down)
        )
    )
    if worth_it and needs_grad and num_pairs < LOOP_MIN_PAIRS_PER_EXPERT_AUTOGRAD * len(experts):
        return None
    order = order[:num_pairs]
    token = order.div(K, rounding_mode="floor")
    gate = top_k_weights.reshape(-1).index_select(0, order).unsqueeze(-1)

    def mlp(e: int, x: torch.Tensor, w_up_e, w_down_e, b_up_e, b_down_e) -> torch.Tensor:
        # F.linear(x, W.t()) is x @ W: one BLAS call either way, no copy of the weight.
        x = x.to(w_up_e.dtype)  # as grouped_mm does (autocast may hand over float32 states)
        h = torch.nn.functional.linear(x, w_up_e.t() if transposed else w_up_e, b_up_e)
        h = module._apply_gate(h) if module.has_gate else module.act_fn(h)
        return torch.nn.functional.linear(h, w_down_e.t() if transposed else w_down_e, b_down_e)

    if needs_grad:
        # unbind/split/cat: their backward is one stack/cat, where indexing a weight or a slice
        # per expert would give each expert a zero-filled gradient of the full size.
        ups, downs = w_up.unbind(0), w_down.unbind(0)
        b_ups = b_up.unbind(0) if b_up is not None else [None] * len(ups)
        b_downs = b_down.unbind(0) if b_down is not None else [None] * len(downs)
        parts = hidden_states.index_select(0, token).split(counts)
        y = torch.cat([mlp(e, parts[e], ups[e], downs[e], b_ups[e], b_downs[e]) for e in experts])
        return out.index_add_(0, token, (y * gate).to(acc_dtype)).to(hidden_states.dtype)
    if torch.is_autocast_enabled(hidden_states.device.type):
        # Autocast casts F.linear's inputs; the out= buffers below would fight it.
        for e, (t, g) in enumerate(zip(token.split(counts), gate.split(counts))):
            if counts[e] == 0:
                continue
            y = mlp(e, hidden_states.index_select(0, t), w_up[e], w_down[e],
                    None if b_up is None else b_up[e], None if b_down is None else b_down[e])
            out.index_add_(0, t, (y * g).to(acc_dtype))
        return out.to(hidden_states.dtype)
    _grouped_experts(module, hidden_states, token, gate, counts, out, w_up, w_down, b_up, b_down)
    return out.to(hidden_states.dtype)


# Rows of one group of experts in _grouped_experts: its buffers (gathered states, up projection,
# activation) take about this many bytes, few enough to stay in cache (P x d buffers of all pairs
# at once are slower on CPU: cold in cache, and often page-faulted in afresh at every call); a
# group always holds at least one whole expert.
GROUP_BYTES = 2 << 20


def _grouped_experts(module, hidden_states, token, gate, counts, out, w_up, w_down, b_up, b_down) -> None:
    """``experts_loop`` without autograd: add every expert's gated output to ``out``.

    Consecutive experts are taken in groups of about :data:`GROUP_BYTES` of buffers: per group,
    one gather of its tokens, each expert's up projection (``torch.mm`` into one buffer, on a
    transposed view of the weights: no copy), one activation and gate scaling over the group,
    each expert's down projection into the gather's buffer, and one ``index_add_``. Few, larger
    operations: on several threads they run in parallel where a call per expert would not.
    """
    transposed = module.is_transposed
    w_up_t, w_down_t = (w_up, w_down) if transposed else (w_up.transpose(1, 2), w_down.transpose(1, 2))
    dtype = w_up.dtype
    d, up_width, inner = hidden_states.shape[1], w_up_t.shape[-1], w_down_t.shape[1]
    default_gate = module.has_gate and getattr(type(module), "_apply_gate", None) is _default_apply_gate()
    half = up_width // 2
    # The gate multiplies the (narrower) activation unless a down bias must not be scaled.
    scale_activation = b_down is None
    same_dtype = hidden_states.dtype == dtype
    row_bytes = (d + up_width + inner) * w_up.element_size()
    rows = min(token.shape[0], max(GROUP_BYTES // row_bytes, max(counts)))
    x_buf = torch.empty(rows, d, dtype=dtype)
    up_buf = torch.empty(rows, up_width, dtype=dtype)
    num_experts, first, start = len(counts), 0, 0
    while first < num_experts:
        last, n = first, 0
        while last < num_experts and (n == 0 or n + counts[last] <= rows):
            n += counts[last]
            last += 1
        if n == 0:
            first = last
            continue
        t, g = token[start:start + n], gate[start:start + n]
        if same_dtype:
            x = torch.index_select(hidden_states, 0, t, out=x_buf[:n])
        else:
            x = x_buf[:n].copy_(hidden_states.index_select(0, t))
        h = _expert_matmuls(x, w_up_t, b_up, counts, first, last, out=up_buf[:n])
        if default_gate:
            a = module.act_fn(h[:, :half]).mul_(h[:, half:])
        else:
            a = module._apply_gate(h) if module.has_gate else module.act_fn(h)
        if scale_activation:
            a = a.mul_(g) if a.dtype == g.dtype else (a * g).to(a.dtype)
        # The gathered states are spent: the down projections overwrite them.
        y = _expert_matmuls(a, w_down_t, b_down, counts, first, last, out=x)
        if not scale_activation:
            y = y * g
        out.index_add_(0, t, y.to(out.dtype))
        start += n
        first = last


def _expert_matmuls(a: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor | None, counts: list[int],
                    first: int, last: int, *, out: torch.Tensor) -> torch.Tensor:
    """For experts ``first .. last-1`` in turn, the rows of ``a`` that are theirs (``counts[e]``
    consecutive rows each) times their weight ``weights[e]`` (``(in, out)`` views), plus their
    bias, written into the same rows of ``out``; returns ``out``."""
    s = 0
    for e in range(first, last):
        c = counts[e]
        if c:
            if bias is None:
                torch.mm(a[s:s + c], weights[e], out=out[s:s + c])
            else:
                torch.addmm(bias[e], a[s:s + c], weights[e], out=out[s:s + c])
            s += c
    return out


# The pair count is data-dependent: under torch.compile the dispatch runs eagerly between graphs.
_dispatch_pairs = torch._dynamo.disable(
    dispatch_pairs,
    reason="hf_moe_patch's pair dispatch runs a data-dependent number of (token, expert) pairs, which "
    "torch.compile(fullgraph=True) cannot capture. Compile without fullgraph, or route with 'topk'.",
)


def pair_dispatch(experts_forward: Callable[..., torch.Tensor], num_experts: int, module: Any = None) -> PairDispatch:
    """Wrap an experts forward in a :class:`PairDispatch` (``module``: its experts module, which
    lets the dispatch run the experts itself on CPU)."""
    return PairDispatch(experts_forward, num_experts, module)
