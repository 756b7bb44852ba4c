"""OLMoE: softmax in float32, top-k, renormalised when ``config.norm_topk_prob``."""

from .base import MoEFamily

FAMILY = MoEFamily(
    name="OLMoE",
    model_types=("olmoe",),
    module="transformers.models.olmoe.modeling_olmoe",
    router_class="OlmoeTopKRouter",
    base_model_class="OlmoeModel",
)
