"""Router scores."""

from __future__ import annotations

import torch


def unified_score(logits: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """USMoE's unified token/expert score (ROUTING.md section 2).

    ``U = alpha * softmax_experts(Z) + (1 - alpha) * (2 / N) * sigmoid(Z)``, in float32.

    The sigmoid stands in for a softmax over the token axis, which would let a token see later
    tokens in a causal model; the ``2 / N`` factor makes ``sigmoid(0) * 2 / N = 1 / N``, the mean
    of a softmax over ``N`` experts, so both terms live on the same scale.

    Example:
        >>> z = torch.zeros(1, 4)
        >>> unified_score(z, alpha=0.5)
        tensor([[0.2500, 0.2500, 0.2500, 0.2500]])
    """
    z = logits.float()
    num_experts = z.shape[-1]
    expert_term = torch.softmax(z, dim=-1)
    if alpha == 1.0:
        return expert_term
    if z.requires_grad and torch.is_grad_enabled():
        # softmax and sigmoid keep their outputs for backward: no in-place operation on them.
        token_term = torch.sigmoid(z) * (2.0 / num_experts)
        if alpha == 0.0:
            return token_term
        return alpha * expert_term + (1.0 - alpha) * token_term
    # Without autograd, in place on fresh tensors: the same float operations, fewer allocations.
    token_term = torch.sigmoid(z).mul_(2.0 / num_experts)
    if alpha == 0.0:
        return token_term
    return expert_term.mul_(alpha).add_(token_term.mul_(1.0 - alpha))
