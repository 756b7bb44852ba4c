"""Tiny, locally built models of every supported family (tests, demo, benchmarks).

No weights are downloaded: each model is built from a small config with a fixed seed, through
the same transformers classes ``from_pretrained`` would instantiate.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

_COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "olmoe": dict(intermediate_size=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
    "qwen2_moe": dict(
        intermediate_size=32, moe_intermediate_size=16, shared_expert_intermediate_size=32,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1,
    ),
    "qwen3_moe": dict(
        intermediate_size=32, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, head_dim=8, decoder_sparse_step=1,
    ),
    "mixtral": dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2),
    "gpt_oss": dict(
        intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, head_dim=8,
        sliding_window=16, layer_types=["sliding_attention", "full_attention"],
    ),
    "deepseek_v3": dict(
        intermediate_size=32, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
        num_key_value_heads=4, n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=0, norm_topk_prob=True,
        routed_scaling_factor=2.5, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=4,
        qk_nope_head_dim=4, v_head_dim=8, qk_head_dim=8,
    ),
}


def tiny_config(model_type: str, **overrides: Any):
    """A small config of ``model_type`` (see ``TINY_CONFIGS``), with ``overrides`` applied.

    Example:
        >>> tiny_config("olmoe", num_experts=4).num_experts
        4
    """
    kwargs = {**_COMMON, **TINY_CONFIGS[model_type], **overrides}
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any) -> PreTrainedModel:
    """A randomly initialised tiny causal LM of ``model_type`` in eval mode.

    Router weights are drawn with a larger scale than the default init so that routing is not
    uniform (ties would make every method look alike). DeepSeek-V3's correction bias is set to
    small non-zero values so that its role in choice is exercised.

    Example:
        >>> tiny_model("mixtral").config.model_type
        'mixtral'
    """
    torch.manual_seed(seed)
    config = tiny_config(model_type, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight")) and param.dim() == 2 and param.shape[0] == _num_experts(config):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape, generator=gen) * 0.05)
    return model.eval()


def _num_experts(config) -> int:
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise ValueError(f"no expert count in {type(config).__name__}")
