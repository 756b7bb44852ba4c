"""The project's demo model: a small OLMoE-architecture LM pretrained on WordNet, reproducibly.

``hf-moe-patch train-demo`` (or :func:`train_demo_model`) builds it from nothing: a byte-level
BPE tokenizer trained with ``tokenizers`` on the text, then a causal LM trained with native
top-k routing and OLMoE's auxiliary load-balancing loss. The text is one document per synset,
``"<lemmas> (<part of speech>): <gloss>. <examples>"``, from the ``train`` side of
:func:`hf_moe_patch.data.wordnet.split_of`; the held-out words give the validation perplexity and the
local mteb tasks, so the model is evaluated on glosses and examples it never saw.

The result is an ordinary transformers checkpoint (``config.json``, ``model.safetensors``,
``tokenizer.json``), shipped in ``hf_moe_patch/assets/`` and loaded with ``from_pretrained``.
A new build goes to ``./demo-<arch>-wordnet`` by default; it never replaces a non-empty folder,
nor writes into the shipped assets, unless asked to with ``force=True`` (``--force``).

Example:
    >>> from transformers import AutoModelForCausalLM
    >>> model = AutoModelForCausalLM.from_pretrained(demo_model_path())
    >>> model.config.model_type
    'olmoe'
"""

from __future__ import annotations

import json
import logging
import math
import platform
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..data.wordnet import POS_NAMES, WordNet, load_wordnet, split_of
from ..io import atomic_write_text
from ..lm import ASSETS, DEMO_MODELS, demo_model_path
from ..version import __version__

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
MAX_POSITIONS = 512  # max_position_embeddings of the demo models


def synset_document(synset) -> str:
    """The pretraining text of one synset.

    Example:
        >>> from hf_moe_patch.data.wordnet import Synset
        >>> synset_document(Synset("n1", "n", "noun.act", ("disaster",), "an act that has disastrous consequences", ("a real disaster",), ()))
        'disaster (noun): an act that has disastrous consequences. a real disaster.'
    """
    text = f"{', '.join(synset.lemmas)} ({POS_NAMES[synset.pos]}): {synset.definition}."
    return " ".join([text, *(f"{e}." for e in synset.examples)])


def corpus(wordnet: WordNet, split: str) -> list[str]:
    """Documents of the synsets on ``split`` (``"train"`` or ``"heldout"``), in file order."""
    return [synset_document(s) for s in wordnet if split_of(s) == split]


# Valid values of the numeric training arguments: (kind, lowest, highest, description). Checked
# before any work, so that a typo fails in a second rather than after (or instead of) a long run.
_INT, _FLOAT = "an integer", "a number"
ARG_RULES: dict[str, tuple[str, float, float | None, str]] = {
    "seed": (_INT, 0, None, "an integer >= 0"),
    # The byte-level alphabet (256) and the special tokens are always in the vocabulary.
    "vocab_size": (_INT, 256 + len(SPECIAL_TOKENS), None, f"an integer >= {256 + len(SPECIAL_TOKENS)}"),
    "hidden_size": (_INT, 1, None, "an integer >= 1"),
    "num_hidden_layers": (_INT, 1, None, "an integer >= 1"),
    "num_attention_heads": (_INT, 1, None, "an integer >= 1"),
    "intermediate_size": (_INT, 1, None, "an integer >= 1"),
    "num_experts": (_INT, 1, None, "an integer >= 1"),
    "num_experts_per_tok": (_INT, 1, None, "an integer >= 1"),
    "router_aux_loss_coef": (_FLOAT, 0.0, None, "a number >= 0"),
    # A block predicts its tokens from the ones before: at least 2; at most the model's positions.
    "block_size": (_INT, 2, MAX_POSITIONS, f"an integer in [2, {MAX_POSITIONS}]"),
    "batch_size": (_INT, 1, None, "an integer >= 1"),
    "steps": (_INT, 1, None, "an integer >= 1"),
    "learning_rate": (_FLOAT, 0.0, None, "a number > 0"),
    "warmup_steps": (_INT, 0, None, "an integer >= 0"),
    "weight_decay": (_FLOAT, 0.0, None, "a number >= 0"),
    "eval_blocks": (_INT, 1, None, "an integer >= 1"),
}


def _invalid(name: str, value: Any, valid: str) -> ValueError:
    """The error for one argument: its Python and command-line names, the value, the valid range."""
    return ValueError(f"{name}={value!r} is not valid (--{name.replace('_', '-')}); valid: {valid}")


@dataclass
class DemoTrainingArgs:
    """Everything that determines the demo model; saved next to the weights.

    Every value is checked when the object is made (and again by :func:`train_demo_model`): a
    ``ValueError`` names the argument (and its command-line option), the value and the valid range.

    Example:
        >>> DemoTrainingArgs(steps=0)
        Traceback (most recent call last):
        ...
        ValueError: steps=0 is not valid (--steps); valid: an integer >= 1
    """

    arch: str = "olmoe"
    seed: int = 0
    vocab_size: int = 4096
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 96
    num_experts: int = 16
    num_experts_per_tok: int = 4
    router_aux_loss_coef: float = 0.01
    block_size: int = 128
    batch_size: int = 32
    steps: int = 3000
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    eval_blocks: int = 256
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` for the first argument outside its valid range."""
        if self.arch not in DEMO_MODELS:
            raise ValueError(f"arch={self.arch!r} is not a demo architecture (--arch); valid: {sorted(DEMO_MODELS)}")
        for name, (kind, low, high, valid) in ARG_RULES.items():
            value = getattr(self, name)
            is_int = isinstance(value, int) and not isinstance(value, bool)
            is_number = is_int or (kind == _FLOAT and isinstance(value, float) and math.isfinite(value))
            if not is_number:
                raise _invalid(name, value, valid)
            # learning_rate is the one bound that excludes its end.
            if value < low or (name == "learning_rate" and value <= low) or (high is not None and value > high):
                raise _invalid(name, value, valid)
        if self.num_experts_per_tok > self.num_experts:
            raise _invalid("num_experts_per_tok", self.num_experts_per_tok, f"an integer in [1, num_experts={self.num_experts}]")
        if self.hidden_size % (2 * self.num_attention_heads):
            # Rotary embeddings rotate pairs of dimensions: every head needs an even size.
            raise _invalid("hidden_size", self.hidden_size, f"a multiple of 2 x num_attention_heads={self.num_attention_heads} "
                                                            f"(an even size per head)")


def demo_output_dir(out_dir: str | Path | None, arch: str = "olmoe", force: bool = False) -> Path:
    """Where :func:`train_demo_model` writes: ``out_dir``, or ``./demo-<arch>-wordnet`` in the
    working directory. Refuses (``FileExistsError``), unless ``force``, a folder that is not empty
    and any folder inside the package's shipped assets (a build must not replace the shipped
    demo model by accident); a path that is a file is always refused.

    Example:
        >>> demo_output_dir(None).name
        'demo-olmoe-wordnet'
        >>> demo_output_dir(ASSETS / "demo-olmoe-wordnet")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        FileExistsError: out_dir=... is in the package's shipped assets ...
    """
    if arch not in DEMO_MODELS:
        raise ValueError(f"arch={arch!r} is not a demo architecture (--arch); valid: {sorted(DEMO_MODELS)}")
    out = Path(out_dir) if out_dir is not None else Path.cwd() / DEMO_MODELS[arch]
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out_dir={str(out)!r} is a file, not a folder (--out)")
    if force:
        return out
    resolved, assets = out.resolve(), ASSETS.resolve()
    if resolved == assets or assets in resolved.parents:
        raise FileExistsError(f"out_dir={str(out)!r} is in the package's shipped assets ({assets}) (--out); pass "
                              f"force=True (--force) to replace the shipped demo model, or choose another folder")
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"out_dir={str(out)!r} exists and is not empty (--out); pass force=True (--force) "
                              f"to write into it (files of the same name are replaced), or choose another folder")
    return out


def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``texts``, as a transformers fast tokenizer that
    pads on the left (what the embedding models need)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    core.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                        special_tokens=[(bos, core.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=core, padding_side="left", model_max_length=512, **SPECIAL_TOKENS)


def build_config(args: DemoTrainingArgs, tokenizer):
    """The model config of ``args.arch`` for ``tokenizer``."""
    from transformers import AutoConfig

    common = dict(
        vocab_size=len(tokenizer), hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads, num_key_value_heads=args.num_attention_heads,
        intermediate_size=args.intermediate_size, num_experts_per_tok=args.num_experts_per_tok,
        router_aux_loss_coef=args.router_aux_loss_coef, output_router_logits=False,
        max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    if args.arch == "olmoe":
        return AutoConfig.for_model("olmoe", num_experts=args.num_experts, norm_topk_prob=False, **common)
    if args.arch == "mixtral":
        return AutoConfig.for_model("mixtral", num_local_experts=args.num_experts, **common)
    raise ValueError(f"arch={args.arch!r} is not a demo architecture; valid: {sorted(DEMO_MODELS)}")


def pack(texts: Sequence[str], tokenizer, block_size: int) -> torch.Tensor:
    """Tokenize ``texts`` (each opened by BOS, closed by EOS) and cut the stream into blocks."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for encoded in tokenizer(list(texts))["input_ids"]:
        ids.extend(encoded)
        ids.append(eos)
    n = len(ids) // block_size
    return torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)


def perplexity(model, blocks: torch.Tensor, batch_size: int = 32) -> float:
    """Token-level perplexity of ``model`` on packed ``blocks`` (every next token counts)."""
    from ..lm import perplexity as label_perplexity

    return label_perplexity(model, ({"input_ids": b, "labels": b} for b in blocks.split(batch_size)))


def optimizer_and_schedule(model, learning_rate: float, weight_decay: float, warmup_steps: int, steps: int):
    """The demo model's AdamW (betas 0.9, 0.95) and learning-rate schedule: linear warm-up over
    ``warmup_steps``, then a cosine from the full rate down to 10 % of it at ``steps``.

    Example:
        >>> opt, sched = optimizer_and_schedule(torch.nn.Linear(2, 2), 1e-3, 0.1, warmup_steps=10, steps=100)
        >>> sched.get_last_lr()
        [0.0001]
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(0.9, 0.95), weight_decay=weight_decay)

    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress_ = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)


def training_step(model, optimizer, scheduler, batch: torch.Tensor):
    """One language-modelling step on ``batch`` (its own labels): backward, gradient norm clipped
    to 1, optimizer and schedule step; returns the model's output."""
    output = model(input_ids=batch, labels=batch)
    output.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return output


def train_demo_model(out_dir: str | Path | None = None, args: DemoTrainingArgs | None = None,
                     wordnet: WordNet | None = None, progress: bool = True, force: bool = False) -> Path:
    """Pretrain the demo model from nothing and save it (weights in bf16, a few MB) with its
    tokenizer, its training arguments and a report (validation perplexity, routing statistics).

    Args:
        out_dir: the output folder (default ``./demo-<arch>-wordnet``); see :func:`demo_output_dir`
            for the folders refused without ``force``.
        args: the training arguments (default: those of the shipped model).
        wordnet: the WordNet database (default: :func:`~hf_moe_patch.data.wordnet.load_wordnet`).
        force: write into a non-empty folder, or into the package's shipped assets.

    The arguments and the output folder are checked before any work (``ValueError`` /
    ``FileExistsError`` naming the argument, the value and what is valid).

    Example:
        >>> train_demo_model("demo", DemoTrainingArgs(steps=2000))  # doctest: +SKIP
        PosixPath('demo')
    """
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    from ..stats import collect_stats

    args = args or DemoTrainingArgs()
    args.validate()  # again: the fields may have been changed since the object was made
    out = demo_output_dir(out_dir, args.arch, force)
    wordnet = wordnet or load_wordnet()
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    train_texts, heldout_texts = corpus(wordnet, "train"), corpus(wordnet, "heldout")
    tokenizer = train_tokenizer(train_texts, args.vocab_size)
    train_blocks = pack(train_texts, tokenizer, args.block_size)
    eval_blocks = pack(heldout_texts, tokenizer, args.block_size)[: args.eval_blocks]
    logger.info("corpus: %d train blocks, %d eval blocks of %d tokens", len(train_blocks), len(eval_blocks), args.block_size)
    if not len(train_blocks) or not len(eval_blocks):
        raise _invalid("block_size", args.block_size, f"at most the length of the {'training' if not len(train_blocks) else 'held-out'} "
                                                      f"text of this WordNet, in tokens")

    config = build_config(args, tokenizer)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.output_router_logits = True  # adds the auxiliary loss to the loss
    optimizer, scheduler = optimizer_and_schedule(model, args.learning_rate, args.weight_decay, args.warmup_steps, args.steps)
    order = torch.randperm(len(train_blocks), generator=torch.Generator().manual_seed(args.seed))
    history: list[dict[str, float]] = []
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc=f"pretraining {args.arch} demo model", disable=not progress)
    for step in bar:
        rows = order[(torch.arange(args.batch_size) + step * args.batch_size) % len(order)]
        output = training_step(model, optimizer, scheduler, train_blocks[rows])
        if step % 25 == 0 or step == args.steps - 1:
            aux = float(output.aux_loss.detach()) if getattr(output, "aux_loss", None) is not None else float("nan")
            history.append({"step": step, "loss": float(output.loss.detach()), "aux_loss": aux, "seconds": time.perf_counter() - start})
            bar.set_postfix(loss=f"{float(output.loss.detach()):.3f}")
    seconds = time.perf_counter() - start
    model.config.output_router_logits = False
    model.eval()

    val_ppl = perplexity(model, eval_blocks)
    with collect_stats(model) as stats:
        perplexity(model, eval_blocks[:64])
    # Saved in bf16 (as the real OLMoE is) to keep the shipped files small.
    model.to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    model.to(torch.float32)
    val_ppl_saved = perplexity(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), eval_blocks)
    report = {
        "hf_moe_patch": __version__, "torch": torch.__version__, "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "args": asdict(args), "parameters": sum(p.numel() for p in model.parameters()),
        "train_blocks": len(train_blocks), "train_tokens_seen": args.steps * args.batch_size * args.block_size,
        "train_seconds": round(seconds, 1), "validation_perplexity_fp32": round(val_ppl, 3),
        "validation_perplexity": round(val_ppl_saved, 3), "validation_tokens": int(eval_blocks[:, 1:].numel()),
        "routing_stats": stats.summary(), "history": history,
    }
    atomic_write_text(out / "training_report.json", json.dumps(report, indent=2, default=str))
    atomic_write_text(out / "README.md", _model_card(report))
    logger.info("demo model saved to %s (validation perplexity %.2f)", out, val_ppl_saved)
    return out


def _model_card(report: dict[str, Any]) -> str:
    a = report["args"]
    s = report["routing_stats"]
    return f"""---
library_name: transformers
license: apache-2.0
tags: [hf_moe_patch, moe, {a['arch']}, wordnet, demo]
---
# hf_moe_patch demo model ({a['arch']} architecture, WordNet)

A small Mixture-of-Experts causal LM trained from scratch by `hf-moe-patch train-demo --arch {a['arch']}`
on WordNet 3.0 glosses and example sentences (the `train` side of a split by first lemma), with
native top-{a['num_experts_per_tok']} routing over {a['num_experts']} experts and the auxiliary
load-balancing loss (coefficient {a['router_aux_loss_coef']}). It exists to run the project's
evaluations offline; it is not a useful language model.

| | |
|---|---|
| parameters | {report['parameters']:,} |
| layers / hidden / expert width | {a['num_hidden_layers']} / {a['hidden_size']} / {a['intermediate_size']} |
| vocabulary (byte-level BPE) | {a['vocab_size']} |
| steps x batch x block | {a['steps']} x {a['batch_size']} x {a['block_size']} |
| training time | {report['train_seconds']} s ({report['machine']}) |
| validation perplexity (held-out words, bf16 weights) | {report['validation_perplexity']} |
| MaxVio top-k / top-1 (held-out text) | {s['maxvio']:.3f} / {s['maxvio_top1']:.3f} |

WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved. The training text is
derived from WordNet under its license.
"""
