"""Pure tensor routing functions.

Nothing here imports transformers: every function takes router logits or scores as tensors and
returns selections, gates or transport plans, so the algorithms can be read, tested and reused
apart from any model.
"""

from .scores import unified_score
from .segments import SequenceGrid, cu_seqlens_segment_ids, packed_segment_ids
from .selection import (
    budget_select,
    budget_slots,
    count_thresholds,
    expert_choice_select,
    selection_to_slots,
    sequence_budgets,
)
from .sinkhorn import SinkhornResult, log_sinkhorn, plan_topk_gates
from .thresholds import budget_threshold, expert_thresholds, threshold_slots

__all__ = [
    "SequenceGrid",
    "SinkhornResult",
    "budget_select",
    "budget_threshold",
    "budget_slots",
    "count_thresholds",
    "cu_seqlens_segment_ids",
    "expert_choice_select",
    "expert_thresholds",
    "log_sinkhorn",
    "packed_segment_ids",
    "plan_topk_gates",
    "selection_to_slots",
    "sequence_budgets",
    "threshold_slots",
    "unified_score",
]
