"""Top-p (nucleus) expert selection, per token (Huang et al. 2024; ROUTING.md section 8).

Shapes: ``probs`` is ``(T, N)``, each row a token's distribution over ``N`` experts. The rule is
purely per token: no row ever reads another, so padding and batch-mates cannot matter.
"""

from __future__ import annotations

import torch


def top_p_slots(
    probs: torch.Tensor, p: float, max_k: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's smallest set of best experts whose probability mass reaches ``p``.

    Experts are ranked by probability, largest first; ties go to the lower expert index (a stable
    sort). A token takes the expert of rank ``j`` when the mass of the ranks before ``j`` is
    ``< p``, so the expert whose mass crosses ``p`` is included and the best expert is always
    taken. ``max_k`` caps the count. The mass is summed in float32.

    A NaN probability (a token with NaN or inf logits has a NaN row) ranks first and is always
    taken (up to ``max_k``), so NaN gates reach that token's output, as under the native router.

    Returns ``(index, gates)``, both ``(T, k_max)`` with ``k_max`` the largest count (at least 1):
    slots best first, empty slots with the sentinel index ``N`` and gate 0 (the layout of
    :func:`~hf_moe_patch.ops.selection.selection_to_slots`). Gates are the selected entries of
    ``probs`` (gradients flow to them; the selection itself is not differentiable).

    Example:
        >>> probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]])
        >>> index, gates = top_p_slots(probs, 0.6)  # masses before each rank: 0, .5, .8 | 0, .4, .7
        >>> index.tolist()
        [[0, 1], [3, 2]]
    """
    T, N = probs.shape
    key = probs.detach().float()
    nan = key.isnan()
    has_nan = bool(nan.any())
    if has_nan:
        key = key.nan_to_num(nan=float("inf"))  # a copy: NaN ranks first, as in torch.topk
    ranked, order = torch.sort(key, dim=-1, descending=True, stable=True)
    # Mass of the ranks before each rank: an exclusive cumulative sum (the first is exactly 0).
    before = torch.cat([torch.zeros_like(ranked[:, :1]), ranked[:, :-1].cumsum(dim=-1)], dim=-1)
    take = before < p
    if has_nan:
        take |= nan.gather(1, order)
    if max_k is not None and max_k < N:
        take[:, max_k:] = False
    # ``before`` never decreases (and NaN cells rank first), so each row's taken ranks are a prefix.
    counts = take.sum(dim=-1)
    k_max = max(int(counts.max()) if T else 0, 1)
    take, order = take[:, :k_max], order[:, :k_max]
    gates = probs.gather(1, order)
    index = torch.where(take, order, N)
    gates = torch.where(take, gates, torch.zeros((), dtype=gates.dtype, device=gates.device))
    return index, gates
