"""Mixtral: softmax in float32, top-k, always renormalised; weights stay float32."""

from .base import MoEFamily

FAMILY = MoEFamily(
    name="Mixtral",
    model_types=("mixtral",),
    module="transformers.models.mixtral.modeling_mixtral",
    router_class="MixtralTopKRouter",
    base_model_class="MixtralModel",
    renormalize=True,
    float32_weights=True,
)
