"""Supervised fine-tuning of a patched MoE model on Alpaca-format data, with peft and Trainer.

:func:`run_sft` is the whole run: load the model (Hub id, folder, or ``"demo"``), patch its
routing, set the auxiliary loss, add peft LoRA adapters (attention projections, the fused expert
weights through ``target_parameters``, optionally the router), train with transformers' ``Trainer``
(which runs on accelerate, so ``accelerate launch`` scales it out), log routing statistics, then
measure validation perplexity on clean and on corrupted text and save everything needed to repeat
the run.

Routing during training (``method`` / ``options`` / ``aux_loss``):

* ``topk`` with the model's auxiliary load-balancing loss (``aux_loss="auto"`` or ``"on"``) is the
  baseline; ``aux_loss="off"`` trains without it;
* ``ssr`` flips a coin per forward (per micro-batch) and routes by the Sinkhorn plan when it wins
  (``p=0.01`` by default, ``p=1`` for full Sinkhorn); its patch turns the auxiliary loss off, so
  ``"auto"`` means off;
* ``usmoe``, ``expert_choice`` and ``top_p`` train with their own selection and, under
  ``"auto"``, without the auxiliary loss (it models top-k selection; expert choice is balanced by
  construction); ``aux_loss="on"`` keeps it. ``topk`` at another ``top_k`` keeps it under ``"auto"``.

SSR's plan is computed per process and per micro-batch: under data parallelism each process
balances its own micro-batch (ROUTING.md section 3).

Resuming (``resume_from_checkpoint``): every checkpoint records the routing it was trained with
(``hf_moe_patch_routing.json``), and a resume under another routing (method, resolved options or
auxiliary loss) is refused before training unless ``allow_routing_change=True``; the results then
list the earlier routings. The Trainer also logs at every checkpoint and at the last step, so the
logged loss windows cover every optimizer step and fall on the same steps whether the run was
interrupted or not: ``train_loss_mean`` is the mean over all steps of the run, resumed or not.

Example:
    >>> from hf_moe_patch.training.sft import SFTConfig, run_sft
    >>> result = run_sft(SFTConfig(model="demo", method="ssr", dataset="wordnet", max_steps=50,
    ...                            output_dir="sft_out"))  # doctest: +SKIP
    >>> result["validation_perplexity"]  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..data.corruption import parse_corruption
from ..lm import DTYPES
from ..version import __version__

logger = logging.getLogger(__name__)

AUX_LOSS = ("auto", "on", "off")
ROUTER_MODES = ("frozen", "train", "lora")
# Attention projections of every supported family (DeepSeek-V3's low-rank ones included); peft
# adapts those that exist.
ATTENTION_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"]
EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
CONFIG_FILE = "sft_config.json"
RESULTS_FILE = "sft_results.json"
# Written into every Trainer checkpoint folder: the routing the run was trained with up to there.
ROUTING_RECORD = "hf_moe_patch_routing.json"


@dataclass
class SFTConfig:
    """Everything that determines a fine-tuning run; saved as ``sft_config.json`` with versions.

    Args:
        model: Hub id, local folder, or ``"demo"`` (the shipped demo model).
        method, options: the routing during training and evaluation (``hmp.patch`` arguments).
        aux_loss: ``"auto"`` (the model's auxiliary loss for ``topk`` only), ``"on"`` (also
            for ``usmoe``, ``expert_choice`` and ``top_p``; SSR always turns it off) or ``"off"``.
        dataset: ``"wordnet"`` (the built-in WordNet-Alpaca set), a Hub dataset id such as
            ``tatsu-lab/alpaca``, or a local JSON / JSONL / Parquet file in Alpaca format.
        validation_size: share (< 1) or number of examples held out for validation.
        corruption: corrupt training text (``"junk:0.1"``; None: clean training).
        eval_corruption: the corruption of the second validation perplexity.
        peft: ``"lora"`` (adapters) or ``"none"`` (full fine-tuning of everything but a frozen router).
        lora_attention, lora_experts: LoRA on the attention projections / on the fused expert
            weights (``target_parameters``).
        router: ``"frozen"`` (default), ``"train"`` (the router's weight trains in full) or
            ``"lora"`` (a LoRA on the router's weight).
        resume_from_checkpoint: a checkpoint folder of this run (or True: the last one in
            ``output_dir``).
        allow_routing_change: resume from a checkpoint trained under another routing (method,
            options or auxiliary loss); without it such a resume is refused before training.

    Example:
        >>> SFTConfig(method="ssr", options={"p": 1.0}, max_steps=50).aux_loss
        'auto'
    """

    model: str = "demo"
    revision: str | None = None
    method: str = "topk"
    options: dict[str, Any] = field(default_factory=dict)
    aux_loss: str = "auto"
    dataset: str = "wordnet"
    dataset_revision: str | None = None
    max_train_samples: int | None = None
    validation_size: float = 0.05
    max_length: int = 256
    packing: bool = False
    corruption: str | None = None
    eval_corruption: str = "junk:0.1"
    peft: str = "lora"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_attention: bool = True
    lora_experts: bool = True
    router: str = "frozen"
    output_dir: str = "sft_out"
    seed: int = 0
    max_steps: int | None = 200
    num_train_epochs: float = 1.0
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    logging_steps: int = 10
    save_steps: int = 100
    save_total_limit: int | None = 2
    resume_from_checkpoint: str | bool | None = None
    allow_routing_change: bool = False
    merge: bool = False
    dtype: str = "auto"
    gradient_checkpointing: bool = False
    report_to: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        from ..methods import METHODS

        checks = [("method", self.method, list(METHODS)), ("aux_loss", self.aux_loss, AUX_LOSS),
                  ("router", self.router, ROUTER_MODES), ("peft", self.peft, ("lora", "none"))]
        for name, value, valid in checks:
            if value not in valid:
                raise ValueError(f"{name}={value!r} is not valid; valid: {', '.join(map(str, valid))}")
        v = self.validation_size
        if not (0 < v < 1 or (v >= 1 and float(v).is_integer())):
            raise ValueError(f"validation_size={v!r} is not valid; a share in (0, 1) or a whole count >= 1")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not valid; valid: {', '.join(DTYPES)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps={self.max_steps!r} is not valid; an integer >= 1, or None to train num_train_epochs")
        if self.peft == "none" and self.router == "lora":
            raise ValueError("router='lora' needs peft='lora'")
        parse_corruption(self.corruption)
        parse_corruption(self.eval_corruption)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, path: str | Path) -> "SFTConfig":
        """The configuration saved by a run (``sft_config.json``); versions are ignored."""
        data = json.loads(Path(path).read_text())
        data = data.get("config", data)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def aux_loss_enabled(config: SFTConfig, model: nn.Module) -> bool:
    """Whether the model's auxiliary balancing loss is part of the training loss.

    ``"auto"``: only for ``topk``, the selection the loss was designed for. SSR replaces it (its
    patch sets the coefficient to 0, so even ``"on"`` adds nothing and computing it is waste);
    expert choice is balanced by construction; USMoE's budget selection is not what the loss
    models, nor top-p's variable number of experts. ``"on"`` keeps it for ``usmoe``,
    ``expert_choice`` and ``top_p`` too.
    """
    from ..methods import METHODS

    if config.aux_loss == "off" or METHODS[config.method].disables_aux_loss:
        return False
    if config.aux_loss == "auto" and config.method != "topk":
        return False
    return getattr(model.config, "router_aux_loss_coef", 0.0) > 0


def _router_parameter_names(model: nn.Module) -> list[str]:
    from ..families import family_of
    from ..patching import find_sites

    return [f"{site.name}.{p}" for site in find_sites(model, family_of(model)) for p, _ in site.router.named_parameters(recurse=False)]


def add_adapters(model: nn.Module, config: SFTConfig) -> nn.Module:
    """Make the right parameters trainable: LoRA adapters (or everything) and the router's mode.

    The router is frozen by default; ``router="train"`` trains its weight in full (saved through
    peft's ``modules_to_save``, which copies the router), ``router="lora"`` puts a LoRA on it
    (``target_parameters``). A routing patch is taken off while peft wraps the model and put back
    on the wrapped model, so that it drives the router copies that actually run.
    """
    from ..families import family_of
    from ..patching import patch, routing_config, unpatch

    family = family_of(model)
    router_params = _router_parameter_names(model)
    router_modules = sorted({name.rpartition(".")[0] for name in router_params})  # e.g. model.layers.0.mlp.gate
    if config.peft == "none":
        for name, param in model.named_parameters():
            param.requires_grad_(config.router == "train" or name not in router_params)
        return model
    from peft import LoraConfig, get_peft_model

    target_parameters = []
    if config.lora_experts:
        target_parameters += [f"{family.experts_attr}.{p.split('.')[-1]}" for p in EXPERT_PARAMETERS]
    if config.router == "lora":
        target_parameters += [f"{name}.weight" for name in router_modules]
    lora = LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=ATTENTION_TARGETS if config.lora_attention else [],
        target_parameters=target_parameters or None,
        # Full names: peft matches by suffix, and a bare "gate" would also take Qwen2-MoE's
        # shared_expert_gate.
        modules_to_save=router_modules if config.router == "train" else None,
        task_type="CAUSAL_LM",
    )
    routing = routing_config(model)
    if routing is not None:
        unpatch(model)
    with warnings.catch_warnings():
        # peft reads model.is_gradient_checkpointing, which transformers 5 deprecates: noise we
        # would cause on every run, about an attribute we never use.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        wrapped = get_peft_model(model, lora)
    if routing is not None:
        method = routing.pop("method")
        patch(wrapped, method, **routing)
    return wrapped


def trainable_parameter_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def perplexity(model: nn.Module, dataset, collator, batch_size: int = 16) -> float:
    """Perplexity over the label tokens (``labels != -100``) of a tokenised dataset
    (:func:`hf_moe_patch.lm.perplexity`: from the logits, so no auxiliary loss enters it)."""
    from ..lm import perplexity as label_perplexity

    starts = range(0, len(dataset), batch_size)
    return label_perplexity(model, (collator([dataset[i] for i in range(s, min(s + batch_size, len(dataset)))]) for s in starts))


def _versions() -> dict[str, str]:
    import accelerate
    import datasets
    import peft
    import transformers

    return {"hf_moe_patch": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "accelerate": accelerate.__version__, "datasets": datasets.__version__}


def load_model(config: SFTConfig):
    """The model and tokenizer of ``config.model`` (``"demo"``: the shipped demo model)."""
    from ..lm import load_model_and_tokenizer

    return load_model_and_tokenizer(config.model, revision=config.revision, dtype=config.dtype)


def prepare_data(config: SFTConfig, tokenizer):
    """(train, validation, corrupted validation) tokenised datasets, and facts of the data (sizes,
    the ``datasets`` fingerprint of the loaded set) for the run's record."""
    from .data import load_alpaca, pack_examples, split_train_validation, tokenize_alpaca

    raw = load_alpaca(config.dataset, revision=config.dataset_revision)
    size = config.validation_size
    size = int(size) if size >= 1 else float(size)  # a count, or a share
    train_raw, val_raw = split_train_validation(raw, size, seed=config.seed)
    if config.max_train_samples is not None:
        train_raw = train_raw.select(range(min(config.max_train_samples, len(train_raw))))
    train = tokenize_alpaca(train_raw, tokenizer, max_length=config.max_length, corruption=parse_corruption(config.corruption))
    if config.packing:
        train = pack_examples(train, config.max_length)
    val = tokenize_alpaca(val_raw, tokenizer, max_length=config.max_length)
    val_noisy = tokenize_alpaca(val_raw, tokenizer, max_length=config.max_length, corruption=parse_corruption(config.eval_corruption))
    data_info = {"examples": len(raw), "train": len(train_raw), "validation": len(val_raw),
                 "fingerprint": getattr(raw, "_fingerprint", None)}
    return train, val, val_noisy, data_info


# --- resuming: the routing of a checkpoint, and the loss of the whole run --------------------


def routing_record(config: SFTConfig, model: nn.Module, aux: bool) -> dict[str, Any]:
    """What a checkpoint records of the routing it was trained with: the method and options as
    asked, every resolved option (defaults included, from the patched ``model``), and whether the
    auxiliary loss was on.

    Example:
        >>> routing_record(SFTConfig(method="usmoe"), hmp.patch(model, "usmoe"), False)["resolved"]  # doctest: +SKIP
        {'method': 'usmoe', 'top_k': 2, 'alpha': 0.5, ...}
    """
    from ..patching import routing_config

    resolved = json.loads(json.dumps(routing_config(model), default=str))  # as it reads back from JSON
    return {"method": config.method, "options": config.options, "aux_loss": config.aux_loss,
            "aux_loss_enabled": aux, "resolved": resolved, "hf_moe_patch": __version__}


def describe_routing(record: dict[str, Any], resolved: bool = False) -> str:
    """``"ssr:p=0.5 (aux loss off)"``: a routing record in the command line's spelling (with
    every resolved option when ``resolved``).

    Example:
        >>> describe_routing({"method": "ssr", "options": {"p": 0.5}, "aux_loss_enabled": False})
        'ssr:p=0.5 (aux loss off)'
    """
    options = dict(record.get("resolved") or {}) if resolved else dict(record.get("options") or {})
    options.pop("method", None)
    text = record["method"] + (":" + ",".join(f"{k}={json.dumps(v)}" for k, v in options.items()) if options else "")
    aux = record.get("aux_loss_enabled")
    return text + ("" if aux is None else f" (aux loss {'on' if aux else 'off'})")


def _same_routing(a: dict[str, Any], b: dict[str, Any]) -> bool:
    # Resolved options: a default written out and left out are the same routing, also for an
    # option that a later hf_moe_patch added (both sides get its default). A record without the
    # auxiliary-loss flag (read from a checkpoint's config.json) matches either.
    aux_a, aux_b = a.get("aux_loss_enabled"), b.get("aux_loss_enabled")
    same = _with_defaults(a.get("resolved")) == _with_defaults(b.get("resolved"))
    return same and (aux_a is None or aux_b is None or aux_a == aux_b)


def _with_defaults(resolved: dict[str, Any] | None) -> dict[str, Any] | None:
    """``{"method": ..., **options}`` with every option of the method, defaults filled in."""
    from ..errors import InvalidOptionError
    from ..methods import build_method

    if not isinstance(resolved, dict) or not isinstance(resolved.get("method"), str):
        return resolved
    options = {k: v for k, v in resolved.items() if k != "method"}
    try:
        return {"method": resolved["method"], **build_method(resolved["method"], options).options()}
    except (InvalidOptionError, TypeError):
        return resolved  # unknown to this version: compared as written


def checkpoint_routing(checkpoint: str | Path) -> dict[str, Any] | None:
    """The routing a checkpoint was trained with: its ``hf_moe_patch_routing.json``, else (full
    fine-tuning of an older run) the ``moe_routing`` of its ``config.json``; None if neither.

    Example:
        >>> checkpoint_routing("sft_out/checkpoint-100")["method"]  # doctest: +SKIP
        'ssr'
    """
    from ..routing_format import ROUTING_KEY
    from ..io import read_json_or_none

    folder = Path(checkpoint)
    record = read_json_or_none(folder / ROUTING_RECORD, required=("method", "resolved"))
    if record is not None:
        return record
    entry = (read_json_or_none(folder / "config.json") or {}).get(ROUTING_KEY)
    if isinstance(entry, dict) and isinstance(entry.get("method"), str):
        options = dict(entry.get("options") or {})
        return {"method": entry["method"], "options": options, "resolved": {"method": entry["method"], **options}}
    return None


def check_resume_routing(config: SFTConfig, checkpoint: str | Path, current: dict[str, Any]) -> dict[str, Any] | None:
    """Refuse to resume ``checkpoint`` under another routing than the one it was trained with,
    unless ``config.allow_routing_change``: a mixed run would be recorded as ``current`` alone.
    Returns the checkpoint's routing record (None when it has none: then nothing can be
    checked, and a warning says so).

    Example:
        >>> check_resume_routing(SFTConfig(method="usmoe"), "sft_out/checkpoint-8", record)  # doctest: +SKIP
        ValueError: resume_from_checkpoint='sft_out/checkpoint-8' was trained with routing topk (aux loss on) ...
    """
    stored = checkpoint_routing(checkpoint)
    if stored is None:
        logger.warning("%s records no routing (written by an older hf_moe_patch?): cannot check that the resumed "
                       "run keeps its routing, %s", checkpoint, describe_routing(current))
        return None
    if _same_routing(stored, current):
        return stored
    full = describe_routing(stored) == describe_routing(current)  # differ only in defaults: show them all
    before, now = describe_routing(stored, resolved=full), describe_routing(current, resolved=full)
    if not config.allow_routing_change:
        raise ValueError(
            f"resume_from_checkpoint={str(checkpoint)!r} was trained with routing {before}; this run asks for {now}. "
            f"Resuming would record a run of mixed routings as {current['method']}. Resume with the checkpoint's "
            f"routing, or pass allow_routing_change=True (--allow-routing-change) to change it on purpose.")
    logger.warning("resuming %s, trained with routing %s, under routing %s (allow_routing_change)", checkpoint, before, now)
    return stored


def mean_train_loss(log_history: list[dict[str, Any]], resumed_at: int | None = None) -> tuple[float | None, int]:
    """``(mean training loss per optimizer step, steps covered)`` from the Trainer's logs.

    Each logged ``loss`` is the mean over the steps since the previous log, so the run's mean is
    the window-weighted mean. (The Trainer's own ``training_loss`` covers only the steps of the
    last ``train()`` call: after a resume it is not the run's.) A checkpoint written without a
    log at its step (by an older hf_moe_patch) leaves the steps between its last log and
    ``resumed_at`` out; the count of covered steps shows it.

    Example:
        >>> mean_train_loss([{"loss": 4.0, "step": 3}, {"loss": 1.0, "step": 4}])
        (3.25, 4)
    """
    total, covered, last = 0.0, 0, 0
    for entry in log_history:
        if "loss" not in entry or "step" not in entry:
            continue
        step = entry["step"]
        if resumed_at is not None and last < resumed_at < step:
            last = resumed_at  # the first log after a resume covers the steps since the checkpoint
        if step > last:
            total += entry["loss"] * (step - last)
            covered += step - last
            last = step
    return (total / covered if covered else None), covered


class RunRecordCallback(TrainerCallback):
    """Keep what a resume needs to continue the same run, and to know that it does.

    - Logs at every checkpoint and at the last step (``control.should_log``): the logged loss
      windows then cover every optimizer step, and an interrupted-and-resumed run logs exactly
      the windows of an uninterrupted one (else the window open at a checkpoint is lost, and the
      first log after a resume averages fewer steps).
    - Writes ``hf_moe_patch_routing.json`` (the run's routing, see :func:`routing_record`) into
      every checkpoint folder, atomically, on the main process.

    Example:
        >>> trainer.add_callback(RunRecordCallback(routing_record(config, model, aux)))  # doctest: +SKIP
    """

    def __init__(self, routing: dict[str, Any]) -> None:
        self.routing = routing

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        # Runs after DefaultFlowCallback (added later), which decides about saving and stopping.
        if control.should_save or control.should_training_stop:
            control.should_log = True

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        from ..io import atomic_write_text

        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            atomic_write_text(folder / ROUTING_RECORD, json.dumps(self.routing, indent=2, default=str) + "\n")


def run_sft(config: SFTConfig) -> dict[str, Any]:
    """Fine-tune ``config.model`` under ``config.method`` and report; see the module docstring.

    Writes into ``config.output_dir``: Trainer checkpoints, the final adapter (or model) with its
    routing (``hf_moe_patch.save_pretrained``), ``sft_config.json`` (the configuration and the
    versions), ``sft_results.json``, ``routing_stats.jsonl`` and ``routing_balance.png``; with
    ``merge=True`` also ``merged/``, the adapter merged into the model with the routing kept.
    Returns the results dictionary.
    """
    from transformers import Trainer, set_seed
    from transformers.trainer_utils import get_last_checkpoint

    from ..sharing.hub import save_pretrained
    from ..io import atomic_write_text
    from ..patching import patch
    from .callbacks import RoutingStatsCallback, add_routing_stats
    from .data import make_collator

    out = Path(config.output_dir)
    checkpoint = config.resume_from_checkpoint or None  # False and "" mean: do not resume
    if checkpoint is True:
        checkpoint = get_last_checkpoint(str(out)) if out.is_dir() else None
        if checkpoint is None:
            raise ValueError(f"resume_from_checkpoint=True, but output_dir={str(out)!r} has no checkpoint")
    elif checkpoint is not None and not Path(checkpoint).is_dir():
        raise ValueError(f"resume_from_checkpoint={checkpoint!r} is not a folder (--resume-from-checkpoint)")
    set_seed(config.seed)
    model, tokenizer = load_model(config)
    patch(model, config.method, **config.options)
    aux = aux_loss_enabled(config, model)
    model.config.output_router_logits = aux
    routing = routing_record(config, model, aux)
    earlier: list[dict[str, Any]] = []
    if checkpoint is not None:
        # Before the data, the adapters and the first step: a wrong routing fails at once.
        stored = check_resume_routing(config, checkpoint, routing)
        if stored is not None:
            earlier = list(stored.get("earlier", []))
            if not _same_routing(stored, routing):  # allowed: keep the history with the run
                step = _checkpoint_step(checkpoint)
                earlier.append({**{k: v for k, v in stored.items() if k != "earlier"}, "until_step": step})
        if earlier:
            routing = {**routing, "earlier": earlier}
    train, val, val_noisy, data_info = prepare_data(config, tokenizer)
    model = add_adapters(model, config)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    collator = make_collator(tokenizer)
    args = TrainingArguments(
        output_dir=str(out), seed=config.seed, data_seed=config.seed,
        max_steps=config.max_steps if config.max_steps is not None else -1,
        num_train_epochs=config.num_train_epochs, learning_rate=config.learning_rate,
        weight_decay=config.weight_decay, warmup_steps=config.warmup_steps,
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=config.per_device_eval_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps, logging_steps=config.logging_steps,
        save_steps=config.save_steps, save_total_limit=config.save_total_limit, report_to=config.report_to,
        remove_unused_columns=False, use_cpu=not torch.cuda.is_available(), bf16=next(model.parameters()).dtype == torch.bfloat16,
        dataloader_num_workers=0, disable_tqdm=not sys.stderr.isatty(),
    )
    stats_cb = RoutingStatsCallback(jsonl_path=out / "routing_stats.jsonl", plot_path=out / "routing_balance.png")
    # RunRecordCallback goes after the Trainer's DefaultFlowCallback (see its on_step_end).
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator,
                      callbacks=[stats_cb, RunRecordCallback(routing)])
    add_routing_stats(trainer, stats_cb)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - start
    resumed_at = _checkpoint_step(checkpoint)
    steps_run = trainer.state.global_step - (resumed_at or 0)

    unwrapped = trainer.model
    ppl_clean = perplexity(unwrapped, val, collator, config.per_device_eval_batch_size)
    ppl_noisy = perplexity(unwrapped, val_noisy, collator, config.per_device_eval_batch_size)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    # Over every step of the run, from the logs (which a resume carries on); not the Trainer's
    # training_loss, which after a resume covers only the steps of this call.
    loss_mean, covered = mean_train_loss(trainer.state.log_history, resumed_at)
    if trainer.state.global_step and covered != trainer.state.global_step:
        logger.warning("train_loss_mean covers %d of %d steps: the checkpoint resumed from was written without a "
                       "log at its step", covered, trainer.state.global_step)
    routing_logs = [h for h in trainer.state.log_history if any(k.startswith("routing/") for k in h)]
    results = {
        "method": config.method, "options": config.options, "aux_loss": aux, "global_step": trainer.state.global_step,
        "train_loss_first": losses[0] if losses else None, "train_loss_last": losses[-1] if losses else None,
        "train_loss_mean": loss_mean,
        "validation_perplexity": ppl_clean, "validation_perplexity_corrupted": ppl_noisy,
        "eval_corruption": config.eval_corruption, "validation_examples": len(val),
        "seconds_per_step": seconds / max(steps_run, 1), "trainable_parameters": sum(p.numel() for p in unwrapped.parameters() if p.requires_grad),
        "routing": _mean_routing(routing_logs),
        "world_size": trainer.args.world_size,
    }
    if resumed_at is not None:
        results["resumed_from_step"] = resumed_at
    if earlier:
        results["earlier_routings"] = [{"routing": describe_routing(r), "until_step": r.get("until_step")} for r in earlier]
    if trainer.is_world_process_zero():
        save_pretrained(unwrapped, out / "final")
        tokenizer.save_pretrained(out / "final")
        saved = {"config": config.to_dict(), "versions": _versions(), "data": data_info}
        atomic_write_text(out / CONFIG_FILE, json.dumps(saved, indent=2))
        atomic_write_text(out / RESULTS_FILE, json.dumps(results, indent=2, default=str))
        if config.merge and config.peft == "lora":
            merged = unwrapped.merge_and_unload()
            save_pretrained(merged, out / "merged")
            tokenizer.save_pretrained(out / "merged")
    logger.info("%s: validation perplexity %.3f clean, %.3f corrupted", config.method, ppl_clean, ppl_noisy)
    return results


def _checkpoint_step(path: str | Path | None) -> int | None:
    """The global step of a checkpoint: from its ``trainer_state.json``, else from its folder
    name (``checkpoint-<step>``); None without a checkpoint."""
    from ..io import read_json_or_none

    if not path or path is True:
        return None
    state = read_json_or_none(Path(path) / "trainer_state.json")
    if isinstance(state, dict) and isinstance(state.get("global_step"), int):
        return state["global_step"]
    try:
        return int(str(path).rstrip("/").rsplit("-", 1)[-1])
    except ValueError:
        return None


def _mean_routing(logs: list[dict[str, Any]]) -> dict[str, float]:
    """Means over the logging windows of each routing statistic."""
    keys = sorted({k for h in logs for k in h if k.startswith("routing/")})
    out = {}
    for key in keys:
        values = [h[key] for h in logs if isinstance(h.get(key), (int, float))]
        if values:
            out[key.removeprefix("routing/")] = sum(values) / len(values)
    return out
