"""Pair-list dispatch: the experts see only the selected (token, expert) pairs.

Routers with a variable number of experts per token return ``(T, k_max)`` slots padded with the
sentinel index ``N`` and weight 0. transformers' kernels still gather, sort and scatter every
slot, so a few tokens with many experts would make every token pay ``k_max`` slots; and outside
expert parallelism ``batched_mm`` indexes its weights with the sentinel and ``grouped_mm`` leaves
sentinel rows uninitialised. This wrapper sits in front of the native experts forward: when
every slot is real it passes the call through untouched; otherwise it lays the real pairs out
one per row (``(P, 1)``), calls the native kernel on those ``P`` rows only, and sums each
token's rows back. Work follows ``P``, and no sentinel ever reaches a kernel.
"""

from __future__ import annotations

from typing import Any, Callable

import torch


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
            data-dependent to compile).

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
    """Run ``dispatch``'s experts on the real (token, expert) pairs only, or pass a full layout through."""
    experts_forward = dispatch.experts_forward
    real = top_k_index < dispatch.num_experts
    if bool(real.all()):
        return experts_forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
    acc_dtype = torch.float32 if hidden_states.dtype in (torch.float16, torch.bfloat16) else hidden_states.dtype
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


# The pair count is data-dependent: under torch.compile the dispatch runs eagerly between graphs.
_dispatch_pairs = torch._dynamo.disable(
    dispatch_pairs,
    reason="hf_moe_patch's pair dispatch runs a data-dependent number of (token, expert) pairs, which "
    "torch.compile(fullgraph=True) cannot capture. Compile without fullgraph, or route with 'topk'.",
)


def pair_dispatch(experts_forward: Callable[..., torch.Tensor], num_experts: int) -> PairDispatch:
    """Wrap an experts forward in a :class:`PairDispatch`."""
    return PairDispatch(experts_forward, num_experts)
