"""Causal-LM helpers shared by the MTEB runner, the demo model and fine-tuning: loading a model by
name (``"demo"`` is the shipped demo model), the default dtype, and perplexity from the logits.

Example:
    >>> model, tokenizer = load_model_and_tokenizer("demo", dtype="float32")
    >>> model.config.model_type, tokenizer.pad_token
    ('olmoe', '<pad>')
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn

from .hub_access import ASSETS, DEMO_MODELS, demo_model_path, locate_model, offline_if  # noqa: F401 - ASSETS, DEMO_MODELS, demo_model_path re-exported

DTYPES = ("auto", "float32", "bfloat16", "float16")


def check_dtype(dtype: str | torch.dtype) -> str | torch.dtype:
    """``dtype`` when it is a torch dtype or one of :data:`DTYPES`; else a ValueError naming them."""
    if isinstance(dtype, torch.dtype) or dtype in DTYPES:
        return dtype
    raise ValueError(f"dtype={dtype!r} is not valid; valid: {', '.join(DTYPES)}")


def auto_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """bfloat16 on a CUDA device that supports it (any CUDA device when ``device`` is None), else
    float32."""
    on_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    return torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else torch.float32


def load_model_and_tokenizer(name_or_path: str, *, revision: str | None = None, dtype: str | torch.dtype = "auto"):
    """``AutoModelForCausalLM`` and ``AutoTokenizer`` of a Hub id or folder, ``"demo"`` being the
    shipped demo model; ``dtype="auto"`` is :func:`auto_dtype`. A tokenizer without a pad token
    pads with its EOS token. No routing is applied (see :func:`hf_moe_patch.from_pretrained`).

    The name is resolved by :func:`hf_moe_patch.hub_access.locate_model` before anything loads: a
    missing local folder raises FileNotFoundError, a Hub model while the Hub cannot be reached
    loads from the cache or raises HubUnreachableError at once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_dtype(dtype)
    path, hub_kwargs = locate_model(name_or_path, revision=revision)
    if dtype == "auto":
        dtype = auto_dtype()
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with offline_if(hub_kwargs):  # the Hub cannot be reached: the cache only, no retries
        model = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=dtype, **hub_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, **hub_kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


@torch.no_grad()
def perplexity(model: nn.Module, batches: Iterable[dict[str, Any]]) -> float:
    """Perplexity over the label tokens of ``batches`` (dicts with ``input_ids``, ``labels``, where
    ``-100`` is ignored, and optionally ``attention_mask``), next-token shifted.

    Computed from the logits, not the model's loss, so that an auxiliary loss never enters it. The
    model runs in eval mode; its training flag is restored afterwards.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    try:
        for batch in batches:
            batch = dict(batch)
            labels = batch.pop("labels").to(device)
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float()
            shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
            total += float(nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                                       shift_labels.reshape(-1), ignore_index=-100, reduction="sum"))
            count += int((shift_labels != -100).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("no label tokens to measure perplexity on (is the validation set empty?)")
    return math.exp(total / count)
