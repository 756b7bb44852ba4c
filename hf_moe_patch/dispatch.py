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

from typing import Callable

import torch


def pair_dispatch(experts_forward: Callable[..., torch.Tensor], num_experts: int) -> Callable[..., torch.Tensor]:
    """Wrap an experts forward ``(hidden (T, d), index (T, K), weights (T, K)) -> (T, d)``.

    Example:
        >>> def experts(h, idx, w):  # expert e multiplies by (e + 1)
        ...     return ((idx.float() + 1) * w).sum(-1, keepdim=True) * h
        >>> f = pair_dispatch(experts, num_experts=2)
        >>> f(torch.ones(2, 1), torch.tensor([[0, 1], [1, 2]]), torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
        tensor([[1.5000],
                [2.0000]])
    """

    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, *args, **kwargs):
        real = top_k_index < num_experts
        if bool(real.all()):
            return experts_forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
        token, slot = real.nonzero(as_tuple=True)  # token-major order
        acc_dtype = torch.float32 if hidden_states.dtype in (torch.float16, torch.bfloat16) else hidden_states.dtype
        out = hidden_states.new_zeros(hidden_states.shape, dtype=acc_dtype)
        if token.numel() == 0:
            return out.to(hidden_states.dtype)
        pair_out = experts_forward(
            hidden_states[token], top_k_index[token, slot].unsqueeze(1), top_k_weights[token, slot].unsqueeze(1),
            *args, **kwargs,
        )
        # Accumulate in float32 like the native kernels' reshape+sum does for half precision.
        return out.index_add_(0, token, pair_out.to(acc_dtype)).to(hidden_states.dtype)

    return forward
