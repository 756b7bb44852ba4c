"""DeepSeek-V3: sigmoid scores in float32, a correction bias for choice only, group-limited
top-k, optional renormalisation (``norm_topk_prob``) and ``routed_scaling_factor``.

How the other methods apply to this sigmoid router is documented on each method (USMoE adds the
correction bias to its choice key through the sigmoid term; SSR-S uses the sigmoid scores as
cost); all of them multiply their gates by ``routed_scaling_factor``.
"""

from .base import MoEFamily

FAMILY = MoEFamily(
    name="DeepSeek-V3",
    model_types=("deepseek_v3",),
    module="transformers.models.deepseek_v3.modeling_deepseek_v3",
    router_class="DeepseekV3TopkRouter",
    base_model_class="DeepseekV3Model",
    score="sigmoid",
    float32_logits=True,
    float32_weights=True,
    extra=(("scaling", "routed_scaling_factor"), ("choice_bias", "e_score_correction_bias")),
)
