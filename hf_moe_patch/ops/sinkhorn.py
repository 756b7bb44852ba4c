"""Entropic optimal transport between tokens and experts (SSR, ROUTING.md section 3)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SinkhornResult:
    """A transport plan in log space and how it was reached.

    Attributes:
        log_plan: ``(B, T, N)`` float32; rows of padding tokens are filled with 0 (finite), so
            that nothing downstream sees NaN or inf; mask them with ``valid``.
        iterations: Sinkhorn iterations run (the largest over the batch).
        row_error: the largest ``|Pi 1 - 1|`` over valid rows when stopping. Columns are exact
            after each iteration's column update.
    """

    log_plan: torch.Tensor
    iterations: int
    row_error: float


def log_sinkhorn(
    cost: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    epsilon: float = 0.05,
    max_iter: int = 100,
    tol: float = 1e-4,
) -> SinkhornResult:
    """Solve ``max <Pi, C> - eps <Pi, log Pi>`` with unit row mass and equal column mass ``m / N``.

    Log-domain Sinkhorn scaling, ``Pi = diag(u) exp(C / eps) diag(v)``, batched over the leading
    dimension: each of the ``B`` problems has its own ``m`` valid tokens. Gradients flow through
    the unrolled iterations unless the caller passes a detached cost.

    Args:
        cost: ``(B, T, N)`` compatibility (larger is better), any float dtype; computed in float32.
        valid: ``(B, T)`` bool, False on padding rows (which take no mass); None means all valid.
        epsilon: entropic regulariser; match it to the cost's scale.
        max_iter: iteration cap.
        tol: stop once every valid row's mass is within ``tol`` of 1.

    Example:
        >>> res = log_sinkhorn(torch.tensor([[[1.0, 0.0], [1.0, 0.0]]]), epsilon=1.0)
        >>> res.log_plan.exp().sum(dim=1)   # each expert receives m / N = 1 token
        tensor([[1., 1.]])
    """
    B, T, N = cost.shape
    device = cost.device
    if valid is None:
        valid = torch.ones(B, T, dtype=torch.bool, device=device)
    log_k = cost.float() / epsilon
    m = valid.sum(dim=1)
    has_rows = m > 0
    # Column mass m/N; problems without a valid row get 0 in log space and stay inert below.
    log_b = torch.where(has_rows, torch.log(m.clamp_min(1).float() / N), torch.zeros_like(m, dtype=torch.float32))
    log_b = log_b.unsqueeze(1)  # (B, 1) broadcast over experts
    row_valid = valid.unsqueeze(-1)  # (B, T, 1)
    # Padding rows take no mass: their log_u is -inf. The kernel itself stays finite so that no
    # logsumexp ever sees a row or column of only -inf (whose backward is NaN). A problem with no
    # valid row at all runs on every row and is masked out at the end.
    active = row_valid | ~has_rows.view(B, 1, 1)
    minus_inf = torch.tensor(float("-inf"), device=device)
    log_v = torch.zeros(B, 1, N, device=device)
    log_u = torch.zeros(B, T, 1, device=device)
    iterations, row_error = 0, float("inf")

    def max_row_error(lse: torch.Tensor) -> float:
        # Row mass of the current plan is exp(log_u + logsumexp_j(log_k + log_v)).
        with torch.no_grad():
            return float(((log_u + lse.detach()).exp().squeeze(-1) - 1.0).abs().mul(valid).amax()) if T else 0.0

    while True:
        lse = torch.logsumexp(log_k + log_v, dim=2, keepdim=True)
        # The row update needs this logsumexp anyway; it also measures the previous iterate's row
        # error, so the stopping check costs no extra pass over the kernel.
        if iterations > 0:
            row_error = max_row_error(lse)
            if row_error < tol or iterations == max_iter:
                break
        log_u = torch.where(active, -lse, minus_inf)
        log_v = log_b.unsqueeze(1) - torch.logsumexp(log_k + log_u, dim=1, keepdim=True)
        iterations += 1
    log_plan = log_k + log_u + log_v
    log_plan = torch.where(row_valid & has_rows.view(B, 1, 1), log_plan, torch.zeros_like(log_plan))
    return SinkhornResult(log_plan, iterations, row_error)


def plan_topk_gates(log_plan: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` of each row of the plan, renormalised to sum to 1 (the KL projection of the row
    onto ``k``-sparse distributions). Both the choice and the weights come from the plan.

    Example:
        >>> lp = torch.tensor([[0.5, 0.3, 0.2]]).log()
        >>> plan_topk_gates(lp, 2)
        (tensor([[0.6250, 0.3750]]), tensor([[0, 1]]))
    """
    top, index = torch.topk(log_plan, k, dim=-1)
    return torch.softmax(top, dim=-1), index
