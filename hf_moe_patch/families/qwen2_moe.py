"""Qwen2-MoE (Qwen1.5-MoE): softmax in float32, top-k, renormalised when ``config.norm_topk_prob``."""

from .base import MoEFamily

FAMILY = MoEFamily(
    name="Qwen2-MoE (Qwen1.5-MoE)",
    model_types=("qwen2_moe",),
    module="transformers.models.qwen2_moe.modeling_qwen2_moe",
    router_class="Qwen2MoeTopKRouter",
    base_model_class="Qwen2MoeModel",
)
