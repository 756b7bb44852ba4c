"""Which tokens form one sequence: batch rows, or several packed sequences in one row.

A router sees ``T = B * L`` flattened tokens. Routing rules with a per-sequence budget (USMoE,
expert choice, SSR's per-sequence plan) work on a ``(S, L_max, N)`` grid of ``S`` sequences. For
an ordinary batch the grid is a view (``S = B``, ``L_max = L``). For padding-free training, where
several sequences are packed into one row and told apart by ``position_ids`` restarts (TRL
packing, ``DataCollatorWithFlattening``), each packed sequence becomes its own grid row, padded
with invalid cells, so no budget is shared between packed neighbours.
"""

from __future__ import annotations

import torch


def packed_segment_ids(valid: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor | None:
    """``(B, L)`` long ids of the packed sequences, numbered in token order, or None if every row
    holds one sequence.

    A sequence starts at each row's first token and wherever two adjacent *valid* tokens do not
    have consecutive positions. A restart next to padding does not count: left padding with
    positions computed from the mask (``generate``) is one sequence per row.

    Example:
        >>> valid = torch.ones(1, 5, dtype=torch.bool)
        >>> packed_segment_ids(valid, torch.tensor([[0, 1, 2, 0, 1]]))
        tensor([[0, 0, 0, 1, 1]])
        >>> packed_segment_ids(valid, torch.tensor([[3, 4, 5, 6, 7]])) is None
        True
    """
    B, L = valid.shape
    position_ids = position_ids.expand(B, L)
    restart = valid[:, 1:] & valid[:, :-1] & (position_ids[:, 1:] != position_ids[:, :-1] + 1)
    if L < 2 or not bool(restart.any()):
        return None
    return segment_ids_from_starts(torch.cat([torch.ones_like(restart[:, :1]), restart], dim=1))


def segment_ids_from_starts(starts: torch.Tensor) -> torch.Tensor:
    """``(B, L)`` ids from a ``(B, L)`` bool mask of sequence starts (every row's first token is a
    start).

    Example:
        >>> segment_ids_from_starts(torch.tensor([[True, False, True], [True, False, False]]))
        tensor([[0, 0, 1],
                [2, 2, 2]])
    """
    return (starts.reshape(-1).long().cumsum(0) - 1).view(starts.shape)


def cu_seqlens_segment_ids(cu_seqlens: torch.Tensor, batch_size: int, seq_len: int) -> torch.Tensor | None:
    """Segment ids from flash attention's cumulative lengths over the flattened tokens (``B = 1``).

    Example:
        >>> cu_seqlens_segment_ids(torch.tensor([0, 2, 5]), 1, 5)
        tensor([[0, 0, 1, 1, 1]])
    """
    total = batch_size * seq_len
    cu = cu_seqlens.long().to("cpu")
    if cu.dim() != 1 or cu.numel() < 2 or int(cu[-1]) > total or int(cu[0]) != 0:
        raise ValueError(
            f"cu_seq_lens {cu.tolist()} do not describe {batch_size} x {seq_len} packed tokens: "
            "hf_moe_patch cannot tell the packed sequences apart."
        )
    if cu.numel() == 2 and batch_size == 1:
        return None
    starts = torch.zeros(total, dtype=torch.bool)
    starts[cu[:-1].clamp_max(total - 1)] = True
    if batch_size > 1:
        starts.view(batch_size, seq_len)[:, 0] = True
    return segment_ids_from_starts(starts.view(batch_size, seq_len)).to(cu_seqlens.device)


class SequenceGrid:
    """Maps ``(T, N)`` token rows to a ``(S, L_max, N)`` grid of sequences and back.

    Args:
        valid: ``(B, L)`` bool, False on padding.
        segment_ids: ``(B, L)`` long packed-sequence ids (see :func:`packed_segment_ids`), or None
            when each row is one sequence (the grid is then a plain view).

    Example:
        >>> grid = SequenceGrid(torch.ones(1, 3, dtype=torch.bool), torch.tensor([[0, 0, 1]]))
        >>> grid.valid.tolist()
        [[True, True], [True, False]]
        >>> grid.to_grid(torch.arange(3.0).view(3, 1)).squeeze(-1).tolist()
        [[0.0, 1.0], [2.0, 0.0]]
    """

    def __init__(self, valid: torch.Tensor, segment_ids: torch.Tensor | None = None) -> None:
        self.num_tokens = valid.numel()
        self.token_valid = valid.reshape(-1)
        if segment_ids is None:
            self.index = None
            self.valid = valid
            return
        seg = segment_ids.reshape(-1)
        num_segments = int(seg[-1]) + 1
        first = torch.zeros(num_segments, dtype=torch.long, device=seg.device)
        # ids are non-decreasing in token order: a segment's first token is its smallest index
        tokens = torch.arange(self.num_tokens, device=seg.device)
        first = first.scatter_reduce(0, seg, tokens, reduce="amin", include_self=False)
        position = tokens - first[seg]
        self.num_segments, self.max_len = num_segments, int(position.max()) + 1
        self.index = seg * self.max_len + position
        self.valid = self._scatter(valid.reshape(-1, 1), fill=False).view(num_segments, self.max_len)

    @classmethod
    def pooled(cls, valid: torch.Tensor) -> "SequenceGrid":
        """One sequence of all the batch's tokens (``scope="batch"``)."""
        return cls(valid.reshape(1, -1))

    def _scatter(self, x: torch.Tensor, fill: float | bool) -> torch.Tensor:
        out = x.new_full((self.num_segments * self.max_len, x.shape[-1]), fill)
        return out.index_copy(0, self.index, x)

    def to_grid(self, x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """``(T, N)`` -> ``(S, L_max, N)``; cells of no token hold ``fill``."""
        if self.index is None:
            return x.view(*self.valid.shape, x.shape[-1])
        return self._scatter(x, fill).view(*self.valid.shape, x.shape[-1])

    def from_grid(self, y: torch.Tensor) -> torch.Tensor:
        """``(S, L_max, N)`` -> ``(T, N)``."""
        if self.index is None:
            return y.reshape(self.num_tokens, y.shape[-1])
        return y.reshape(-1, y.shape[-1]).index_select(0, self.index)
