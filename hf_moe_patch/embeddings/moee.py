"""MoEE: training-free sentence embeddings from a (patched) MoE causal LM, for mteb and sentence-transformers.

MoEE ("Your Mixture-of-Experts LLM Is Secretly an Embedding Model For Free", Li & Zhou, ICLR 2025;
ROUTING.md section 5) reads two things off one forward pass over a prompted sentence:

* ``hs``: the last layer's hidden state of the last token. We take the decoder stack's
  ``last_hidden_state``, i.e. *after* the final norm; it is exactly
  ``model(..., output_hidden_states=True).hidden_states[-1]`` (what the reference code uses),
  computed without the LM head.
* ``rw``: the router logits of the last token at every MoE layer, concatenated in layer order
  (``L * N`` values; OLMoE: 16 x 64 = 1024), recorded with forward hooks on the routers that exist
  only during the forward. Patched and native routers alike return their logits as element 0.

Embedding modes (``embedding=``):

* ``"hs"`` and ``"rw"``: the parts alone; similarity is cosine.
* ``"moee_concat"``: ``[z(hs) ; z(rw)]`` where ``z`` standardises each part *over its own
  dimensions, per text* (default, ``standardize="text"``). The reference code standardises each
  feature over the texts of a batch instead (``standardize="batch"``), which makes a text's
  embedding depend on its batch-mates, on the batch size and on the length-sorted batching; we
  keep it only as an opt-in for reproducing the reference.
* ``"moee_sum"``: similarity ``cos(hs_1, hs_2) + w * cos(rw_1, rw_2)`` (``w = sum_weight``). The
  embedding is ``[hs / |hs| ; sqrt(w) * rw / |rw|]``: its *dot product* is exactly that score
  (so the model meta says ``"dot"``, clustering and FAISS-style search see the right geometry, and
  the cosine that mteb's STS main score uses is ``score / (1 + w)``, the same ranking).
  :meth:`MoEEncoder.similarity` splits vectors at the hidden size and computes
  ``cos + w * cos`` explicitly, so it also accepts raw ``[hs ; rw]`` rows
  (``np.hstack([parts["hs"], parts["rw"]])`` from :meth:`MoEEncoder.embed_parts`).

Prompts (``prompt=``): ``"none"`` wraps the sentence in double quotes, ``"prompteol"`` is
``This sentence : "<text>" means in one word:"``. An E5-style instruction
(``Instruct: <instruction>\\nQuery: ``) can be put in front (``instruction=``, or ``"task"`` for
mteb's instruction of the task being evaluated). ``clean_text=True`` applies the reference code's
sentence clean-up (a final ``.`` is added when the sentence does not end in punctuation, double
quotes become single quotes, an empty sentence stays empty).

Reference mode (``reference=True``, :mod:`.reference`): the official pipeline exactly, for
comparing with the paper: GritLM instructions inside the quotes, HS and RW z-scored per feature
over each batch, batches in input order, no ``position_ids``, and for classification and
clustering MoEE(sum) as the average of the predictions of separate HS and RW runs.

Independence from batch-mates: texts are tokenised one by one, padded on the *left*, and run with
the attention mask and ``position_ids = cumsum(mask) - 1`` (transformers does not derive
positions from the mask; with RoPE a constant shift would cancel in attention, but only up to
rounding, and not at all for absolute positions), so a text's embedding does not depend on padding
or on the other texts of its batch (up to float rounding of batched kernels, ~1e-6 in float32).
Routing options that pool decisions over the whole batch break this by design and are left as the
user chose them: ``usmoe`` / ``ssr`` with ``scope="batch"`` (SSR's Sinkhorn plan
at inference, ``inference="sinkhorn"``, spans the batch by default). ``expert_choice`` and the
default ``usmoe`` are per sequence.

Example:
    >>> format_prompt("A cat sat.")
    'This sentence : "A cat sat." means in one word:"'
    >>> import hf_moe_patch as hmp
    >>> from hf_moe_patch.embeddings.moee import MoEEncoder
    >>> enc = MoEEncoder.from_pretrained("allenai/OLMoE-1B-7B-0924")  # doctest: +SKIP
    >>> hmp.patch(enc.model, "usmoe", top_k=6)  # doctest: +SKIP
    >>> import mteb  # doctest: +SKIP
    >>> mteb.evaluate(enc, mteb.get_tasks(tasks=["STS12"]))  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
from contextlib import contextmanager
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from mteb.models import ModelMeta
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ScoringFunction
from mteb.similarity_functions import cos_sim, pairwise_cos_sim
from mteb.types import PromptType
from torch import nn
from tqdm.auto import tqdm

from ..errors import InvalidOptionError
from ..families import family_of
from ..methods import METHODS
from ..patching import find_base_model, find_record, find_sites
from .reference import ENSEMBLE_TASK_TYPES, gritlm_instruction, reference_prompt

try:  # sentence-transformers >= 6
    from sentence_transformers.base.modules import InputModule as _STInputModule
except ImportError:  # pragma: no cover - sentence-transformers 5.x
    from sentence_transformers.models import InputModule as _STInputModule

if TYPE_CHECKING:
    from mteb.abstasks.task_metadata import TaskMetadata
    from sentence_transformers import SentenceTransformer
    from torch.utils.data import DataLoader

logger = logging.getLogger(__name__)

EMBEDDINGS: tuple[str, ...] = ("hs", "rw", "moee_concat", "moee_sum")
"""The embedding modes :class:`MoEEncoder` accepts."""

PROMPTS: dict[str, str] = {
    "none": '"{text}"',
    "prompteol": 'This sentence : "{text}" means in one word:"',
}
"""Prompt templates by name; ``{text}`` is replaced by the sentence."""

STANDARDIZE: tuple[str, ...] = ("text", "batch")
"""Standardisation scopes of ``moee_concat``."""

INSTRUCTION_TEMPLATE = "Instruct: {instruction}\nQuery: "
"""E5-style instruction prefix, put in front of the prompted sentence."""

TASK_INSTRUCTION = "task"
"""``instruction=`` value that asks for mteb's instruction of the task being evaluated."""

_EPS = 1e-8


def _check_choice(option: str, value: Any, valid: Iterable[str]) -> str:
    valid = tuple(valid)
    if not isinstance(value, str) or value not in valid:
        raise InvalidOptionError(f"Invalid {option}={value!r}; valid values: {', '.join(repr(v) for v in valid)}.")
    return value


# --- pure helpers ------------------------------------------------------------------------------


def clean_sentence(text: str) -> str:
    """The reference MoEE / PromptEOL clean-up of a sentence before it is put in a template.

    A ``.`` is added when the sentence does not end in ``.?!"'`` (checked before the next step),
    then double quotes become single quotes (they would close the template's quotes). An empty
    sentence stays empty, as in the official code. (The full official text pipeline, with its
    instruction inside the quotes and ``_`` replaced, is ``reference=True``; see
    :func:`.reference.reference_prompt`.)

    Example:
        >>> clean_sentence('He said "hi" twice')
        "He said 'hi' twice."
        >>> clean_sentence('He said "hi"')
        "He said 'hi'"
        >>> clean_sentence("")
        ''
    """
    if text and text[-1] not in ".?!\"'":
        text += "."
    return text.replace('"', "'")


def format_prompt(text: str, prompt: str = "prompteol", instruction: str | None = None, *, clean: bool = False) -> str:
    """The model input for ``text``: the prompt template, with an optional E5-style instruction first.

    Args:
        text: the sentence.
        prompt: a name in :data:`PROMPTS` (``"none"`` or ``"prompteol"``).
        instruction: put in front as ``Instruct: <instruction>\\nQuery: ``; None or ``""`` for none.
        clean: apply :func:`clean_sentence` first.

    Example:
        >>> format_prompt("A cat sat.", "none")
        '"A cat sat."'
        >>> format_prompt("A cat sat.", instruction="Retrieve semantically similar text.")
        'Instruct: Retrieve semantically similar text.\\nQuery: This sentence : "A cat sat." means in one word:"'
    """
    template = PROMPTS[_check_choice("prompt", prompt, PROMPTS)]
    body = template.replace("{text}", clean_sentence(text) if clean else text)
    if instruction:
        return INSTRUCTION_TEMPLATE.format(instruction=instruction) + body
    return body


def standardize_per_text(x: torch.Tensor) -> torch.Tensor:
    """Z-score each row over its own dimensions (population std); independent of other rows.

    Example:
        >>> standardize_per_text(torch.tensor([[1.0, 3.0], [0.0, 10.0]]))
        tensor([[-1.,  1.],
                [-1.,  1.]])
    """
    x = x.float() if x.dtype not in (torch.float32, torch.float64) else x
    mean = x.mean(dim=-1, keepdim=True)
    std = x.std(dim=-1, keepdim=True, unbiased=False)
    return (x - mean) / (std + _EPS)


def standardize_per_batch(x: torch.Tensor) -> torch.Tensor:
    """The reference code's standardisation: each feature z-scored over the rows of a batch.

    Uses the unbiased std plus ``1e-8``; a batch of one row gives zeros (the reference gets NaN
    there and replaces it by 0). A row's result depends on the other rows: this is not a per-text embedding.

    Example:
        >>> standardize_per_batch(torch.tensor([[1.0, 5.0], [3.0, 5.0]]))
        tensor([[-0.7071,  0.0000],
                [ 0.7071,  0.0000]])
    """
    x = x.float() if x.dtype not in (torch.float32, torch.float64) else x
    if x.shape[0] < 2:
        return torch.zeros_like(x)
    out = (x - x.mean(dim=0, keepdim=True)) / (x.std(dim=0, keepdim=True) + _EPS)
    return torch.nan_to_num(out, nan=0.0)


def _as_tensor(x: Any) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if not torch.is_floating_point(t) or torch.finfo(t.dtype).bits < 32:
        t = t.float()
    return t


def moee_sum_similarity(a: Any, b: Any, hidden_size: int, sum_weight: float = 1.0, *, pairwise: bool = False) -> torch.Tensor:
    """MoEE(sum): ``cos(a[:h], b[:h]) + sum_weight * cos(a[h:], b[h:])`` with ``h = hidden_size``.

    ``a`` and ``b`` are numpy arrays or torch tensors of shape ``(n, d)`` or ``(d,)`` (a 1-D vector
    is one row, as in mteb's ``cos_sim``). Returns a float torch tensor: ``(n_a, n_b)``, or with
    ``pairwise=True`` ``(n,)`` (a 0-d tensor when both inputs are 1-D). Cosine is scale-invariant,
    so raw ``[hs ; rw]`` rows and :class:`MoEEncoder`'s ``moee_sum`` embeddings give the same
    scores. A part that is all zeros has cosine 0.

    Example:
        >>> a = torch.tensor([1.0, 0.0, 2.0, 0.0])
        >>> b = torch.tensor([[1.0, 1.0, 0.0, 3.0], [2.0, 0.0, 5.0, 0.0]])
        >>> moee_sum_similarity(a, b, hidden_size=2, sum_weight=0.5)
        tensor([[0.7071, 1.5000]])
        >>> moee_sum_similarity(b, b, hidden_size=2, pairwise=True)
        tensor([2., 2.])
    """
    ta, tb = _as_tensor(a), _as_tensor(b)
    both_1d = ta.dim() == 1 and tb.dim() == 1
    ta, tb = ta.reshape(-1, ta.shape[-1]), tb.reshape(-1, tb.shape[-1])
    dtype = torch.promote_types(ta.dtype, tb.dtype)
    ta, tb = ta.to(dtype), tb.to(dtype=dtype, device=ta.device)
    if ta.shape[-1] != tb.shape[-1] or not 0 < hidden_size < ta.shape[-1]:
        raise ValueError(
            f"moee_sum similarity needs rows of equal width greater than hidden_size={hidden_size}; "
            f"got {tuple(ta.shape)} and {tuple(tb.shape)}"
        )
    ha, ra = F.normalize(ta[:, :hidden_size], dim=-1), F.normalize(ta[:, hidden_size:], dim=-1)
    hb, rb = F.normalize(tb[:, :hidden_size], dim=-1), F.normalize(tb[:, hidden_size:], dim=-1)
    if pairwise:
        if ta.shape[0] != tb.shape[0]:
            raise ValueError(f"pairwise similarity needs the same number of rows; got {ta.shape[0]} and {tb.shape[0]}")
        out = (ha * hb).sum(-1) + sum_weight * (ra * rb).sum(-1)
        return out[0] if both_1d else out
    return ha @ hb.T + sum_weight * (ra @ rb.T)


def routing_tag(model: nn.Module) -> str:
    """A short, filesystem-safe name of ``model``'s routing: ``native``, or the method with the
    options that differ from its defaults.

    Example:
        >>> from hf_moe_patch.testing import tiny_model
        >>> import hf_moe_patch as hmp
        >>> routing_tag(hmp.patch(tiny_model("olmoe"), "usmoe", top_k=1.5))
        'usmoe-top_k=1.5'
        >>> routing_tag(hmp.patch(tiny_model("olmoe"), "usmoe", causal=True, thresholds=[0.2, 0.3]))
        'usmoe-causal=True-thresholds=a0579de3'
    """
    record = find_record(model)
    if record is None:
        return "native"
    config = record.config()
    method = config.pop("method")
    defaults = METHODS[method]().options() if method in METHODS else {}
    # Calibrated thresholds are many numbers: a short hash of them names the calibration.
    thresholds = config.pop("thresholds", None)
    config.pop("calibration_info", None)
    parts = [method] + [f"{k}={v}" for k, v in config.items() if k not in defaults or defaults[k] != v]
    if thresholds is not None:
        digest = hashlib.sha256(json.dumps(thresholds).encode()).hexdigest()[:8]
        parts.append(f"thresholds={digest}")
    return "-".join(parts)


# --- the encoder ---------------------------------------------------------------------------


def text_hidden_size(model: Any) -> int:
    """Width of the language model's hidden state: the ``hs`` part of an MoEE embedding
    (a multimodal config's text part).

    Example:
        >>> text_hidden_size(model)  # doctest: +SKIP
        64
    """
    config = model.config
    return int((config.get_text_config() if hasattr(config, "get_text_config") else config).hidden_size)


class MoEEncoder(AbsEncoder):
    """MoEE sentence embeddings of a supported (optionally patched) MoE causal LM, as an mteb model.

    Args:
        model: a transformers causal LM of a supported family (OLMoE, Qwen2-MoE, Qwen3-MoE,
            Mixtral, GPT-OSS, DeepSeek-V3), patched or not; it is switched to eval mode for the
            forward passes (and back afterwards).
        tokenizer: its tokenizer (any ``PreTrainedTokenizerBase``; padding is done here, on the left).
        embedding: one of :data:`EMBEDDINGS` (see the module docstring).
        prompt: ``"none"`` or ``"prompteol"`` (:data:`PROMPTS`).
        instruction: None (no instruction), a string (used for every text, except mteb documents),
            or ``"task"``: the instruction mteb gives for the task (``AbsEncoder.get_instruction``:
            the task metadata's prompt, else the task type's default, e.g. "Retrieve semantically
            similar text." for STS). As in E5, documents (``prompt_type="document"``) get none.
        sum_weight: ``w`` of ``moee_sum``; finite and >= 0.
        standardize: ``moee_concat`` only: ``"text"`` (per text, default) or ``"batch"`` (the
            reference's per-feature standardisation over each batch; embeddings then depend on
            batch-mates and on ``batch_size``).
        clean_text: apply :func:`clean_sentence` (the reference's clean-up) before the template.
        reference: reproduce the official MoEE pipeline exactly (:mod:`.reference`): cleaned
            text with the GritLM instruction inside the quotes (``instruction`` defaults to
            ``"task"``; ``""`` for none), batches in input order without truncation or
            ``position_ids``, HS and RW z-scored per feature over each batch. ``standardize``
            and ``clean_text`` are then fixed (``"batch"``, True). Embeddings depend on
            batch-mates and ``batch_size`` (the official runs used 128). For classification
            and clustering, ``moee_sum`` needs the tasks of :func:`.reference.reference_tasks`.
        text_transform: applied to every raw text first, e.g. a seeded
            :class:`~hf_moe_patch.data.corruption.Corruption` for robustness runs.
        batch_size: texts per forward pass (texts are sorted by token length first).
        max_length: token limit; longer inputs keep their beginning and the template's ending
            (so the last token is still the prompt's last token) and a warning is logged.
        progress: show a tqdm progress bar over batches.
        model_name: name used in the mteb model meta (default: the model's ``name_or_path``).
        revision: revision in the mteb model meta (default: the loaded commit when known).

    Example:
        >>> enc = MoEEncoder(model, tokenizer, embedding="moee_sum")  # doctest: +SKIP
        >>> vectors = enc.embed(["A cat sat on the mat.", "A dog lay on the rug."])  # doctest: +SKIP
        >>> enc.similarity(vectors[0], vectors[1])  # doctest: +SKIP
        tensor([[1.41]])
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        embedding: str = "moee_sum",
        prompt: str = "prompteol",
        instruction: str | None = None,
        sum_weight: float = 1.0,
        standardize: str | None = None,
        clean_text: bool | None = None,
        reference: bool = False,
        text_transform: Callable[[str], str] | None = None,
        batch_size: int = 32,
        max_length: int = 512,
        progress: bool = True,
        model_name: str | None = None,
        revision: str | None = None,
    ) -> None:
        self.embedding = _check_choice("embedding", embedding, EMBEDDINGS)
        self.prompt = _check_choice("prompt", prompt, PROMPTS)
        if not isinstance(reference, bool):
            raise InvalidOptionError(f"Invalid reference={reference!r}; expected True or False.")
        if reference and standardize not in (None, "batch"):
            raise InvalidOptionError(f"Invalid standardize={standardize!r} with reference=True: the reference "
                                     f"standardises over each batch ('batch'); leave it unset.")
        if reference and clean_text is False:
            raise InvalidOptionError("Invalid clean_text=False with reference=True: the reference always cleans "
                                     "sentences; leave it unset.")
        default_standardize = "batch" if reference else "text"
        self.standardize = _check_choice("standardize", standardize or default_standardize, STANDARDIZE)
        if instruction is not None and not isinstance(instruction, str):
            raise InvalidOptionError(f"Invalid instruction={instruction!r}; expected None, a string or {TASK_INSTRUCTION!r}.")
        try:
            weight = float(sum_weight)
        except (TypeError, ValueError):
            weight = float("nan")
        if not math.isfinite(weight) or weight < 0:
            raise InvalidOptionError(f"Invalid sum_weight={sum_weight!r}; expected a finite number >= 0.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidOptionError(f"Invalid batch_size={batch_size!r}; expected an integer >= 1.")
        if not isinstance(max_length, int) or max_length < 8:
            raise InvalidOptionError(f"Invalid max_length={max_length!r}; expected an integer >= 8.")
        self.model = model
        self.tokenizer = tokenizer
        self.family = family_of(model)
        self.reference = reference
        if reference and batch_size < 2 and embedding != "hs":
            # The reference z-scores over each batch: one text per batch standardises to zeros.
            logger.warning("reference=True with batch_size=%d: every %s embedding will be all zeros (the reference "
                           "z-scores each feature over a batch; use batch_size >= 2, the official runs used 128)",
                           batch_size, embedding)
        # The reference's instructions are on by default (its --no_instruction turns them off).
        self.instruction = (TASK_INSTRUCTION if instruction is None else instruction or None) if reference else instruction or None
        self.sum_weight = weight
        self.clean_text = True if reference else bool(clean_text)
        self.text_transform = text_transform
        self.batch_size = batch_size
        self.max_length = max_length
        self.progress = bool(progress)
        self.model_name = model_name
        self.revision = revision
        self._meta_override: ModelMeta | None = None
        self._tail: int | None = None
        self._parts = threading.local()  # set while a reference ensemble task encodes
        model.eval()

    # --- construction -------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        revision: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        tokenizer_kwargs: dict[str, Any] | None = None,
        **encoder_kwargs: Any,
    ) -> "MoEEncoder":
        """Load model and tokenizer (``AutoModelForCausalLM`` / ``AutoTokenizer``) and wrap them.

        ``name_or_path`` is a Hub id, a local folder, or ``"demo"`` (the shipped demo model). A
        routing saved with the model (``hf_moe_patch.save_pretrained``) is re-applied
        (:func:`hf_moe_patch.from_pretrained`). ``device`` defaults to CUDA when available, else
        CPU; ``dtype`` to bfloat16 on a CUDA device that supports it, else float32.
        ``model_kwargs`` / ``tokenizer_kwargs`` go to the two ``from_pretrained`` calls; the
        other keyword arguments to :class:`MoEEncoder`.

        Example:
            >>> enc = MoEEncoder.from_pretrained("allenai/OLMoE-1B-7B-0924", embedding="hs")  # doctest: +SKIP
        """
        from transformers import AutoTokenizer

        from ..sharing.hub import from_pretrained as hub_from_pretrained

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        if dtype is None:
            from ..lm import auto_dtype

            dtype = auto_dtype(device)
        kwargs = dict(model_kwargs or {})
        if revision is not None:
            kwargs.setdefault("revision", revision)
        from ..hub_access import locate_model

        path, extra = locate_model(name_or_path, revision=revision)  # "demo"; a missing folder; offline
        for key, value in extra.items():
            kwargs.setdefault(key, value)
        model = hub_from_pretrained(path, dtype=dtype, **kwargs)
        if "device_map" not in kwargs:
            model.to(device)
        tok_kwargs = dict(tokenizer_kwargs or {})
        for key, value in extra.items():
            tok_kwargs.setdefault(key, value)
        if revision is not None:
            tok_kwargs.setdefault("revision", revision)
        from ..hub_access import offline_if

        with offline_if(extra):
            tokenizer = AutoTokenizer.from_pretrained(path, **tok_kwargs)
        encoder_kwargs.setdefault("model_name", path)
        if revision is not None:
            encoder_kwargs.setdefault("revision", revision)
        return cls(model, tokenizer, **encoder_kwargs)

    # --- sizes and metadata -------------------------------------------------------------

    @property
    def hidden_size(self) -> int:
        """Width of the ``hs`` part."""
        return text_hidden_size(self.model)

    @property
    def router_sizes(self) -> list[int]:
        """Experts per MoE layer, in layer order (the ``rw`` part is their concatenation)."""
        return [int(site.router.num_experts) for site in find_sites(self.model, self.family)]

    @property
    def embed_dim(self) -> int:
        """Width of :meth:`embed`'s vectors for the chosen embedding mode."""
        rw = sum(self.router_sizes)
        return {"hs": self.hidden_size, "rw": rw}.get(self.embedding, self.hidden_size + rw)

    def _base_name(self) -> str:
        name = self.model_name or getattr(self.model.config, "_name_or_path", "") or self.model.config.model_type
        return Path(str(name).rstrip("/\\")).name or str(self.model.config.model_type)

    def _experiment_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"prompt": self.prompt}
        if self.embedding == "moee_sum":
            kwargs["sum_weight"] = self.sum_weight
        if self.embedding == "moee_concat":
            kwargs["standardize"] = self.standardize
        if self.instruction == TASK_INSTRUCTION:
            kwargs["instruction"] = TASK_INSTRUCTION
        elif self.instruction:
            kwargs["instruction"] = "custom-" + hashlib.sha256(self.instruction.encode()).hexdigest()[:8]
        if self.clean_text:
            kwargs["clean_text"] = True
        if self.reference:
            kwargs["reference"] = True
        if self.text_transform is not None:
            kwargs["text_transform"] = getattr(self.text_transform, "tag", None) or repr(self.text_transform)
        return kwargs

    def build_model_meta(self) -> ModelMeta:
        """The mteb ``ModelMeta`` for the current model, routing and settings.

        Name ``hf_moe_patch/<model>__<embedding>__<routing tag>``; prompt, instruction and the
        mode's own settings go to ``experiment_kwargs`` (mteb keeps their results apart).
        """
        # model_copy(update=...) skips pydantic validation: values are given in their final types.
        base = self._base_name()
        mode = f"{self.embedding}-reference" if self.reference else self.embedding
        name = f"hf_moe_patch/{base}__{mode}__{routing_tag(self.model)}"
        revision = self.revision or getattr(self.model.config, "_commit_hash", None) or getattr(self.model.config, "revision", None)
        source = self.model_name or getattr(self.model.config, "_name_or_path", "") or None
        return ModelMeta.create_empty(
            overwrites={
                "name": name,
                "revision": revision,
                "n_parameters": sum(p.numel() for p in self.model.parameters()),
                "max_tokens": self.max_length,
                "embed_dim": self.embed_dim,
                "framework": ["PyTorch", "Transformers"],
                "similarity_fn_name": ScoringFunction.DOT_PRODUCT if self.embedding == "moee_sum" else ScoringFunction.COSINE,
                "use_instructions": self.instruction is not None,
                "adapted_from": str(source) if source else None,
                "modalities": ["text"],
                "model_type": ["dense"],
                "experiment_kwargs": self._experiment_kwargs(),
                "reference": "https://github.com/tianyi-lab/MoE-Embedding",  # the MoEE reference code
            }
        )

    @property
    def mteb_model_meta(self) -> ModelMeta:  # type: ignore[override]
        """Built from the model's current routing on each access, unless one was assigned."""
        return self._meta_override if self._meta_override is not None else self.build_model_meta()

    @mteb_model_meta.setter
    def mteb_model_meta(self, meta: ModelMeta | None) -> None:
        self._meta_override = meta

    # --- text to tokens -----------------------------------------------------------------

    def format_text(self, text: str, instruction: str | None = None) -> str:
        """The exact string fed to the tokenizer for ``text`` (see :func:`format_prompt`; with
        ``reference=True`` :func:`.reference.reference_prompt`, where ``instruction=""`` is the
        GritLM prefix of an empty instruction and None no prefix at all)."""
        if self.text_transform is not None:
            text = self.text_transform(text)
        if self.reference:
            return reference_prompt(text, PROMPTS[self.prompt], "" if instruction is None else gritlm_instruction(instruction))
        return format_prompt(text, self.prompt, instruction, clean=self.clean_text)

    def _tail_length(self) -> int:
        """Tokens at the end that truncation keeps: the template's ending plus trailing special tokens
        (counted on their own, so approximately the ending's tokens in context)."""
        if self._tail is None:
            tok = self.tokenizer
            ending = PROMPTS[self.prompt].split("{text}", 1)[1]
            ending_ids = tok(ending, add_special_tokens=False)["input_ids"] if ending else []
            probe = self.format_text("a")
            plain = list(tok(probe, add_special_tokens=False)["input_ids"])
            full = list(tok(probe, add_special_tokens=True)["input_ids"])
            trailing = 0
            for start in range(len(full) - len(plain) + 1):
                if full[start : start + len(plain)] == plain:
                    trailing = len(full) - start - len(plain)
                    break
            self._tail = len(ending_ids) + trailing
        return self._tail

    def tokenize(self, texts: Sequence[str], instruction: str | None = None) -> list[list[int]]:
        """Token ids of each formatted text, truncated to ``max_length`` (beginning + template ending)."""
        formatted = [self.format_text(t, instruction) for t in texts]
        ids = self.tokenizer(formatted, add_special_tokens=True)["input_ids"]
        if self.reference:  # the reference tokenises its prompts without truncation
            return [list(seq) for seq in ids]
        tail = min(self._tail_length(), self.max_length - 1)
        out, cut = [], 0
        for seq in ids:
            seq = list(seq)
            if len(seq) > self.max_length:
                cut += 1
                seq = seq[: self.max_length - tail] + (seq[-tail:] if tail else [])
            out.append(seq)
        if cut:
            logger.warning("%d of %d texts were longer than max_length=%d tokens and were truncated", cut, len(ids), self.max_length)
        return out

    def _pad_id(self) -> int:
        tok = self.tokenizer
        for attr in ("pad_token_id", "eos_token_id"):
            value = getattr(tok, attr, None)
            if isinstance(value, int):
                return value
        return 0

    def collate(self, ids: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """Left-padded ``input_ids`` and ``attention_mask`` (CPU) for a batch of token id lists."""
        width = max(len(seq) for seq in ids)
        input_ids = torch.full((len(ids), width), self._pad_id(), dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, seq in enumerate(ids):
            if len(seq) == 0:
                raise ValueError("a text tokenised to no tokens at all")
            input_ids[row, width - len(seq) :] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[row, width - len(seq) :] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    # --- forward ------------------------------------------------------------------------

    def _device(self) -> torch.device:
        device = getattr(self.model, "device", None)
        if isinstance(device, torch.device):
            return device
        return next(self.model.parameters()).device

    def forward_parts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hs, rw)`` (float32, CPU) of the last token of each left-padded row.

        Runs the decoder stack (no LM head) under ``torch.inference_mode`` with the mask and
        ``position_ids = cumsum(mask) - 1`` (with ``reference=True`` none, as the reference:
        the model then numbers every row's columns 0..L-1, padding included); router logits are
        recorded by forward hooks that are removed before returning.
        """
        if attention_mask.shape != input_ids.shape or not bool(attention_mask[:, -1].all()):
            raise ValueError("inputs must be left-padded: the last column must hold a real token of every row")
        model = self.model
        base = find_base_model(model, self.family)
        sites = find_sites(model, self.family)
        if not sites:
            raise ValueError(f"no MoE router found in {type(model).__name__}")
        device = self._device()
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        position_ids = None if self.reference else (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        batch, width = input_ids.shape
        captured: list[list[torch.Tensor]] = [[] for _ in sites]

        def make_hook(slot: int, n: int):
            def hook(module: nn.Module, args: tuple, output: Any) -> None:
                logits = output[0] if isinstance(output, (tuple, list)) else output
                captured[slot].append(logits.reshape(batch, width, n)[:, -1, :].float().cpu())

            return hook

        handles = [site.router.register_forward_hook(make_hook(i, int(site.router.num_experts))) for i, site in enumerate(sites)]
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                out = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
            model.train(was_training)
        if any(len(c) != 1 for c in captured):
            calls = [len(c) for c in captured]
            raise RuntimeError(f"expected one call per router in one forward, got {calls}")
        hs = out.last_hidden_state[:, -1, :].float().cpu()
        rw = torch.cat([c[0] for c in captured], dim=-1)
        return hs, rw

    def combine(self, hs: torch.Tensor, rw: torch.Tensor) -> torch.Tensor:
        """The embedding of the chosen mode from the parts (rows are texts).

        Per-text for every mode, except ``moee_concat`` with ``standardize="batch"``, which
        standardises over the rows given together, and every mode but ``hs`` with
        ``reference=True``, which z-scores HS and RW over the rows first (the rows are one
        encode batch). There ``moee_sum`` is ``[z(hs) / |z(hs)| ; sqrt(w) z(rw) / |z(rw)|]``,
        or, inside :meth:`emitting_parts`, the raw ``[z(hs) ; z(rw)]`` the ensemble tasks split.
        """
        hs, rw = torch.as_tensor(hs).float(), torch.as_tensor(rw).float()
        if self.embedding == "hs":
            return hs
        if self.reference:
            # The reference standardises whenever the embedding is not HS alone; a NaN left by a
            # non-finite part becomes 0 there too.
            hs, rw = standardize_per_batch(hs), standardize_per_batch(rw)
            if self.embedding == "moee_concat" or (self.embedding == "moee_sum" and self._emitting_parts()):
                return torch.cat([hs, rw], dim=-1)
        if self.embedding == "rw":
            return rw
        if self.embedding == "moee_concat":
            z = standardize_per_batch if self.standardize == "batch" else standardize_per_text
            return torch.cat([z(hs), z(rw)], dim=-1)
        return torch.cat([F.normalize(hs, dim=-1), math.sqrt(self.sum_weight) * F.normalize(rw, dim=-1)], dim=-1)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_parts", None)  # per-thread and transient: not part of the encoder's value
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._parts = threading.local()

    @contextmanager
    def emitting_parts(self) -> Iterator[None]:
        """Inside it (this thread), a reference ``moee_sum`` encoder returns ``[z(hs) ; z(rw)]``:
        the form the tasks of :func:`.reference.reference_tasks` split and predict from twice."""
        previous = getattr(self._parts, "on", False)
        self._parts.on = True
        try:
            yield
        finally:
            self._parts.on = previous

    def _emitting_parts(self) -> bool:
        return bool(getattr(self._parts, "on", False))

    def _batches(
        self, texts: Sequence[str], instruction: str | None, batch_size: int | None, progress: bool | None
    ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not a single string")
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"texts must be strings; got {type(t).__name__}")
        if not texts:
            return
        ids = self.tokenize(texts, instruction)
        # Longest first keeps padding low; the reference batches in input order, and its batch
        # statistics depend on which texts share a batch.
        order = list(range(len(ids))) if self.reference else sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        size = batch_size or self.batch_size
        starts = range(0, len(order), size)
        show = self.progress if progress is None else progress
        for start in tqdm(starts, desc="MoEE", unit="batch", disable=not show or len(starts) == 0):
            index = order[start : start + size]
            batch = self.collate([ids[i] for i in index])
            hs, rw = self.forward_parts(batch["input_ids"], batch["attention_mask"])
            yield index, hs, rw

    def _resolve(self, instruction: str | None) -> str | None:
        if instruction is None:
            instruction = self.instruction
        if instruction == TASK_INSTRUCTION:
            logger.debug("instruction='task' outside an mteb evaluation: no instruction used")
            return None
        return instruction or None

    def embed_parts(
        self, texts: Sequence[str], *, instruction: str | None = None, batch_size: int | None = None, progress: bool | None = None
    ) -> dict[str, np.ndarray]:
        """The raw parts: ``{"hs": (n, hidden), "rw": (n, L*N)}`` float32 arrays, in input order.

        ``instruction``: None uses the encoder's (a fixed string; ``"task"`` means none here),
        ``""`` none, any other string that one.

        Example:
            >>> parts = enc.embed_parts(["A cat.", "A dog."])  # doctest: +SKIP
            >>> parts["rw"].shape  # doctest: +SKIP
            (2, 1024)
        """
        n = len(texts)
        hs_out = np.zeros((n, self.hidden_size), dtype=np.float32)
        rw_out = np.zeros((n, sum(self.router_sizes)), dtype=np.float32)
        for index, hs, rw in self._batches(texts, self._resolve(instruction), batch_size, progress):
            hs_out[index] = hs.numpy()
            rw_out[index] = rw.numpy()
        return {"hs": hs_out, "rw": rw_out}

    def embed(
        self, texts: Sequence[str], *, instruction: str | None = None, batch_size: int | None = None, progress: bool | None = None
    ) -> np.ndarray:
        """Embeddings of the chosen mode, ``(n, embed_dim)`` float32, in input order.

        Example:
            >>> enc.embed(["A cat.", "A dog."]).shape  # doctest: +SKIP
            (2, 3072)
        """
        return self._embed(texts, self._resolve(instruction), batch_size, progress)

    def _embed(self, texts: Sequence[str], instruction: str | None, batch_size: int | None, progress: bool | None) -> np.ndarray:
        out = np.zeros((len(texts), self.embed_dim), dtype=np.float32)
        for index, hs, rw in self._batches(texts, instruction, batch_size, progress):
            out[index] = self.combine(hs, rw).numpy()
        return out

    # --- mteb ---------------------------------------------------------------------------

    def task_instruction(self, task_metadata: TaskMetadata, prompt_type: PromptType | None) -> str | None:
        """The instruction for a task and side: None for documents, else the configured one
        (``"task"`` resolved through mteb's ``get_instruction``). With ``reference=True``
        documents get ``""`` (the reference's corpus instruction: the GritLM prefix alone)."""
        if self.instruction is None:
            return None
        if prompt_type == PromptType.document:
            return "" if self.reference else None
        if self.instruction == TASK_INSTRUCTION:
            return self.get_instruction(task_metadata, prompt_type) or None
        return self.instruction

    def encode(
        self,
        inputs: DataLoader,
        *,
        task_metadata: TaskMetadata,
        hf_split: str,
        hf_subset: str,
        prompt_type: PromptType | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """mteb 2's encode: the texts of all batches of ``inputs`` (``batch["text"]``) embedded."""
        texts: list[str] = []
        for batch in inputs:
            texts.extend(batch["text"])
        instruction = self.task_instruction(task_metadata, prompt_type)
        if (self.reference and self.embedding == "moee_sum" and task_metadata.type in ENSEMBLE_TASK_TYPES
                and not self._emitting_parts()):
            raise InvalidOptionError(
                f"the reference MoEE(sum) of a {task_metadata.type} task averages the predictions of separate HS and "
                f"RW runs: evaluate hf_moe_patch.embeddings.reference.reference_tasks(tasks, hidden_size=..., "
                f"sum_weight=...) instead of {task_metadata.name} itself"
            )
        logger.info(
            "MoEE %s: %d texts of %s (%s/%s, %s), instruction=%r",
            self.embedding, len(texts), task_metadata.name, hf_subset, hf_split,
            prompt_type.value if prompt_type else "-", instruction,
        )
        progress = self.progress and (kwargs.get("show_progress_bar") is None or bool(kwargs.get("show_progress_bar")))
        return self._embed(texts, instruction, None, progress)

    def similarity(self, embeddings1: Any, embeddings2: Any) -> torch.Tensor:
        """``(n1, n2)`` scores: MoEE(sum) (:func:`moee_sum_similarity`) for ``moee_sum``, else cosine.

        1-D inputs count as one row, as in mteb's ``cos_sim``.
        """
        if self.embedding == "moee_sum":
            return moee_sum_similarity(embeddings1, embeddings2, self.hidden_size, self.sum_weight)
        return cos_sim(embeddings1, embeddings2)

    def similarity_pairwise(self, embeddings1: Any, embeddings2: Any) -> torch.Tensor:
        """``(n,)`` scores of row ``i`` with row ``i`` (a 0-d tensor for two 1-D inputs)."""
        if self.embedding == "moee_sum":
            return moee_sum_similarity(embeddings1, embeddings2, self.hidden_size, self.sum_weight, pairwise=True)
        a, b = _as_tensor(embeddings1), _as_tensor(embeddings2)
        if a.dim() == 1 and b.dim() == 1:
            return pairwise_cos_sim(a[None], b[None])[0]
        return pairwise_cos_sim(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]))

    def __repr__(self) -> str:
        return (
            f"MoEEncoder({self._base_name()!r}, embedding={self.embedding!r}, prompt={self.prompt!r}, "
            f"routing={routing_tag(self.model)!r})"
        )


# --- sentence-transformers -----------------------------------------------------------------


class MoEESentenceModule(_STInputModule):
    """A sentence-transformers input module that computes :class:`MoEEncoder` embeddings.

    ``preprocess`` formats, tokenises and left-pads (``prompt=``, when given by
    ``SentenceTransformer.encode``, is used as the instruction); ``forward`` runs the encoder's
    forward and puts the embedding in ``features["sentence_embedding"]``. ``save`` writes the
    model (with its routing), the tokenizer and ``moee_config.json``; ``load`` reads them back.
    As for any module class outside sentence-transformers, reloading a saved model needs
    ``SentenceTransformer(path, trust_remote_code=True)`` (the class is imported from the
    installed ``hf_moe_patch``; nothing is downloaded).
    """

    config_file_name = "moee_config.json"
    config_keys = ["embedding", "prompt", "instruction", "sum_weight", "standardize", "clean_text", "reference", "max_length",
                   "batch_size"]
    save_in_root = True

    def __init__(self, encoder: MoEEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.model = encoder.model  # registered, so that SentenceTransformer sees its parameters and device
        self.tokenizer = encoder.tokenizer

    def get_config_dict(self) -> dict[str, Any]:
        return {key: getattr(self.encoder, key) for key in self.config_keys}

    @property
    def max_seq_length(self) -> int:
        return self.encoder.max_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        self.encoder.max_length = int(value)

    def preprocess(self, inputs: Sequence[str], prompt: str | None = None, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Left-padded ``input_ids`` / ``attention_mask`` of the formatted texts."""
        instruction = prompt if prompt else self.encoder._resolve(None)
        return self.encoder.collate(self.encoder.tokenize(list(inputs), instruction))

    def tokenize(self, texts: list[str], **kwargs: Any) -> dict[str, torch.Tensor]:  # sentence-transformers 5.x
        return self.preprocess(texts, **kwargs)

    def forward(self, features: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        hs, rw = self.encoder.forward_parts(features["input_ids"], features["attention_mask"])
        features["sentence_embedding"] = self.encoder.combine(hs, rw).to(features["input_ids"].device)
        return features

    def get_embedding_dimension(self) -> int:
        return self.encoder.embed_dim

    get_sentence_embedding_dimension = get_embedding_dimension  # sentence-transformers 5.x

    def save(self, output_path: str, *args: Any, safe_serialization: bool = True, **kwargs: Any) -> None:
        from ..sharing.hub import save_pretrained

        save_pretrained(self.encoder.model, output_path)
        self.encoder.tokenizer.save_pretrained(output_path)
        Path(output_path, self.config_file_name).write_text(json.dumps(self.get_config_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token: bool | str | None = None, cache_folder: str | None = None,
             revision: str | None = None, local_files_only: bool = False, **kwargs: Any) -> "MoEESentenceModule":
        hub = dict(token=token, cache_folder=cache_folder, revision=revision, local_files_only=local_files_only)
        config = cls.load_config(model_name_or_path, subfolder=subfolder, **hub)
        path = cls.load_dir_path(model_name_or_path, subfolder=subfolder, **hub)
        model_kwargs = dict(kwargs.get("model_kwargs") or {})
        dtype = model_kwargs.pop("dtype", model_kwargs.pop("torch_dtype", None))
        encoder = MoEEncoder.from_pretrained(path, dtype=dtype, model_kwargs=model_kwargs, progress=False, **config)
        return cls(encoder)


def to_sentence_transformer(encoder: MoEEncoder, *, device: str | torch.device | None = None) -> "SentenceTransformer":
    """``encoder`` as a ``sentence_transformers.SentenceTransformer`` (sharing its model).

    ``st.encode(texts)`` returns the same vectors as ``encoder.embed(texts)``. The similarity
    function is ``"cosine"``, except for ``moee_sum``: sentence-transformers only knows named
    similarity functions, and ``moee_sum`` embeddings are built so that their ``"dot"`` product
    is exactly ``cos(hs) + w * cos(rw)`` — so ``st.similarity`` equals ``encoder.similarity``.
    The model stays on its device unless ``device`` is given. (With ``moee_concat`` and
    ``standardize="batch"`` the vectors depend on the batches, which sentence-transformers forms
    its own way.)

    Example:
        >>> st = to_sentence_transformer(enc)  # doctest: +SKIP
        >>> st.similarity(st.encode(["A cat."]), st.encode(["A dog."]))  # doctest: +SKIP
    """
    from sentence_transformers import SentenceTransformer

    module = MoEESentenceModule(encoder)
    target = str(device) if device is not None else str(encoder._device())
    return SentenceTransformer(
        modules=[module],
        device=target,
        similarity_fn_name="dot" if encoder.embedding == "moee_sum" else "cosine",
    )


__all__ = [
    "EMBEDDINGS",
    "INSTRUCTION_TEMPLATE",
    "MoEESentenceModule",
    "MoEEncoder",
    "PROMPTS",
    "STANDARDIZE",
    "clean_sentence",
    "format_prompt",
    "moee_sum_similarity",
    "routing_tag",
    "standardize_per_batch",
    "standardize_per_text",
    "text_hidden_size",
    "to_sentence_transformer",
]
