"""Qwen3-MoE: softmax in float32, top-k, renormalised when ``config.norm_topk_prob``."""

from .base import MoEFamily

FAMILY = MoEFamily(
    name="Qwen3-MoE",
    model_types=("qwen3_moe",),
    module="transformers.models.qwen3_moe.modeling_qwen3_moe",
    router_class="Qwen3MoeTopKRouter",
    base_model_class="Qwen3MoeModel",
)
