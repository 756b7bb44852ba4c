"""GPT-OSS: top-k of the biased logits, then a softmax over those k.

That softmax equals the full softmax renormalised over the chosen k, so for the other methods
GPT-OSS is a softmax router that always renormalises.
"""

from .base import MoEFamily

FAMILY = MoEFamily(
    name="GPT-OSS",
    model_types=("gpt_oss",),
    module="transformers.models.gpt_oss.modeling_gpt_oss",
    router_class="GptOssTopKRouter",
    base_model_class="GptOssModel",
    renormalize=True,
)
