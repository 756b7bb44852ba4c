"""Save, reload and share patched models with their routing.

The active routing lives in the model's config under one key, ``moe_routing``::

    "moe_routing": {"library": "hf_moe_patch", "format": 1, "version": "0.1.0",
                    "method": "usmoe", "options": {"top_k": 6, "alpha": 0.5, ...}}

``patch`` writes it and ``unpatch`` removes it, so ``model.save_pretrained`` stores it in
``config.json``; :func:`from_pretrained` (or ``patch(model)`` with no method) re-applies it.
peft adapters do not save the base model's config, so :func:`save_pretrained` also writes
``moe_routing.json`` beside the adapter.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import InvalidOptionError
from ..routing_format import FORMAT, ROUTING_FILE, ROUTING_KEY, parse_entry, routing_entry, stored_entry
from ..version import __version__

logger = logging.getLogger(__name__)

def _is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, **kwargs: Any) -> None:
    """``model.save_pretrained`` that also keeps the routing of a peft-wrapped model.

    A plain transformers model already saves its routing in ``config.json``; for a ``PeftModel``
    (which saves only the adapter) the routing is written to ``moe_routing.json`` beside it.

    Example:
        >>> hmp.save_pretrained(hmp.patch(model, "usmoe"), "out/")  # doctest: +SKIP
    """
    model.save_pretrained(save_directory, **kwargs)
    entry = stored_entry(model)
    if _is_peft(model) and entry is not None:
        Path(save_directory, ROUTING_FILE).write_text(json.dumps(entry, indent=2) + "\n")


_HUB_ARGS = ("revision", "token", "cache_dir", "local_files_only")


def _cached(repo_id: str, filename: str, **hub_kwargs: Any) -> Any:
    """``huggingface_hub.try_to_load_from_cache`` with the applicable loading arguments: a path
    (str) when cached, a sentinel when the cache knows the file is absent, None when unknown."""
    from huggingface_hub import try_to_load_from_cache

    cache_kwargs = {k: hub_kwargs[k] for k in ("revision", "cache_dir") if k in hub_kwargs}
    return try_to_load_from_cache(repo_id, filename, **cache_kwargs)


def _hub_file(repo_id: str, filename: str, **hub_kwargs: Any) -> Path | None:
    """A file of a Hub repo, from the local cache when it is there; None if the repo has no such
    file. Raises when that cannot be known (offline and not cached), so that a routing is never
    dropped without a word."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    cached = _cached(repo_id, filename, **hub_kwargs)
    if isinstance(cached, str):
        return Path(cached)
    if cached is not None:  # the cache knows the file does not exist in the repo
        return None
    try:
        return Path(hf_hub_download(repo_id, filename, **hub_kwargs))
    except LocalEntryNotFoundError as exc:  # a subclass of EntryNotFoundError: test it first
        raise OSError(
            f"Cannot tell whether {repo_id} has {filename}: it is not in the local cache and the Hub cannot be "
            f"reached. Download the repository once online (or pass a local folder)."
        ) from exc
    except EntryNotFoundError:
        return None


def _adapter_routing(path: str, **hub_kwargs: Any) -> dict[str, Any] | None:
    file = Path(path, ROUTING_FILE) if os.path.isdir(path) else _hub_file(path, ROUTING_FILE, **hub_kwargs)
    return json.loads(file.read_text()) if file is not None and file.exists() else None


def _is_adapter(path: str, **hub_kwargs: Any) -> bool:
    if os.path.isdir(path):
        return Path(path, "adapter_config.json").exists()
    if isinstance(_cached(path, "config.json", **hub_kwargs), str):
        return False  # a full model (also offline, where an absent adapter_config.json is unknowable)
    return _hub_file(path, "adapter_config.json", **hub_kwargs) is not None


def from_pretrained(pretrained_model_name_or_path: str | os.PathLike, *model_args: Any, model_class: Any = None, **kwargs: Any) -> nn.Module:
    """Load a (patched) model and re-apply the routing it was saved with.

    All ``from_pretrained`` arguments pass through (``dtype``, ``device_map``, ``revision``,
    ``token``, ...). A peft adapter folder or repo loads through ``AutoPeftModelForCausalLM``. A
    model saved without routing loads native; a stored routing that cannot be applied raises.

    ``"demo"`` is the shipped demo model. A local path that does not exist raises
    FileNotFoundError; a Hub id while the Hub cannot be reached loads from the local cache, or
    raises :class:`~hf_moe_patch.hub_access.HubUnreachableError` at once when it is not cached
    (:func:`hf_moe_patch.hub_access.locate_model`).

    Example:
        >>> import hf_moe_patch as hmp
        >>> model = hmp.from_pretrained("someone/olmoe-usmoe", dtype="auto")  # doctest: +SKIP
        >>> hmp.routing_config(model)["method"]  # doctest: +SKIP
        'usmoe'
    """
    from ..hub_access import locate_model, offline_if

    path, extra = locate_model(pretrained_model_name_or_path, revision=kwargs.get("revision"), cache_dir=kwargs.get("cache_dir"))
    for key, value in extra.items():
        kwargs.setdefault(key, value)
    with offline_if(extra):  # the Hub cannot be reached: the cache only, no retries
        return _from_pretrained(path, *model_args, model_class=model_class, **kwargs)


def _from_pretrained(path: str, *model_args: Any, model_class: Any = None, **kwargs: Any) -> nn.Module:
    from ..patching import patch

    hub_kwargs = {k: kwargs[k] for k in _HUB_ARGS if k in kwargs}
    if model_class is None and _is_adapter(path, **hub_kwargs):
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(path, *model_args, **kwargs)
        entry = _adapter_routing(path, **hub_kwargs) or stored_entry(model)
    else:
        if model_class is None:
            from transformers import AutoModelForCausalLM as model_class
        model = model_class.from_pretrained(path, *model_args, **kwargs)
        entry = stored_entry(model)
    if entry is not None:
        method, options = parse_entry(entry)
        patch(model, method, **options)
    return model


def model_card(
    model: nn.Module,
    repo_id: str,
    *,
    base_model: str | None = None,
    stats: Any = None,
    eval_results: dict[str, float] | None = None,
    remote_code: bool = False,
) -> str:
    """A Hub model card (README.md with YAML metadata) for a patched model or adapter.

    Args:
        stats: a :class:`~hf_moe_patch.RoutingStats` or its ``summary()`` dict, shown as a table.
        eval_results: ``{metric or task: score}``, shown as a table.

    Example:
        >>> print(model_card(model, "me/olmoe-usmoe"))  # doctest: +SKIP
    """
    from huggingface_hub import ModelCard, ModelCardData

    entry = stored_entry(model)
    if entry is None:
        raise ValueError("model_card needs a patched model (no routing in config.moe_routing).")
    method, options = entry["method"], entry["options"]
    config = getattr(model, "config", None)
    base_model = base_model or getattr(config, "_name_or_path", None) or None
    if base_model and os.path.isdir(base_model):
        base_model = None  # a local path says nothing to readers on the Hub
    peft = _is_peft(model)
    tags = ["moe", "hf_moe_patch", method.replace("_", "-")]
    if getattr(config, "model_type", None):
        tags.append(config.model_type)
    if peft:
        tags.append("peft")
    data = ModelCardData(
        base_model=base_model,
        library_name="peft" if peft else "transformers",
        pipeline_tag="text-generation",
        tags=tags,
    )
    lines = [
        f"# {repo_id}",
        "",
        f"{'A peft adapter for' if peft else 'The weights of'} "
        f"{f'`{base_model}`' if base_model else 'a ' + type(getattr(model, 'get_base_model', lambda: model)()).__name__} "
        f"with its Mixture-of-Experts routing replaced by **{method}**, "
        f"patched with [hf_moe_patch](https://pypi.org/project/hf-moe-patch/) {entry.get('version', __version__)}.",
        "",
        "## Routing",
        "",
        "| option | value |",
        "|---|---|",
        f"| method | `{method}` |",
        *[f"| {key} | `{value!r}` |" for key, value in options.items()],
        "",
        "The routing is stored in `moe_routing.json`." if peft else f"The routing is stored in `config.json` under `{ROUTING_KEY}`.",
    ]
    if stats is not None:
        summary = stats.summary() if hasattr(stats, "summary") else dict(stats)
        lines += ["", "## Routing statistics", "", "| statistic | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in summary.items()]
    if eval_results:
        lines += ["", "## Evaluation results", "", "| task | score |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in eval_results.items()]
    lines += [
        "",
        "## How to load",
        "",
        "With hf_moe_patch (`pip install hf-moe-patch`), the routing is re-applied on load:",
        "",
        "```python",
        "import hf_moe_patch as hmp",
        "",
        f'model = hmp.from_pretrained("{repo_id}")',
        "```",
        "",
    ]
    if remote_code:
        lines += [
            "Without hf_moe_patch, the repository's own code applies the same routing:",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True)',
            "```",
        ]
    elif peft:
        lines += [
            "Without hf_moe_patch, `peft.AutoPeftModelForCausalLM.from_pretrained` loads the adapter on the",
            "base model with the base model's **native** routing, not the routing above.",
        ]
    else:
        lines += [
            "Without hf_moe_patch, `AutoModelForCausalLM.from_pretrained` loads these weights with the",
            "model's **native** routing: transformers ignores `moe_routing`.",
        ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"))


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    tokenizer: Any = None,
    *,
    private: bool | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    remote_code: bool = False,
    base_model: str | None = None,
    stats: Any = None,
    eval_results: dict[str, float] | None = None,
    api: Any = None,
) -> Any:
    """Upload a patched model (or peft adapter) with its routing, tokenizer and a model card.

    Args:
        model: a patched model or ``PeftModel``.
        repo_id: ``"user/name"``; created if missing.
        tokenizer: saved alongside when given.
        remote_code: also upload ``modeling_hf_moe_patch.py`` and an ``auto_map`` so that
            ``trust_remote_code=True`` loads the same routing without hf_moe_patch (not for adapters).
        stats, eval_results: shown in the model card.
        api: a ``huggingface_hub.HfApi`` (default: a new one with ``token``).

    Returns:
        The ``CommitInfo`` of the upload.

    Example:
        >>> hmp.push_to_hub(hmp.patch(model, "usmoe"), "me/olmoe-usmoe", tokenizer, remote_code=True)  # doctest: +SKIP
    """
    import tempfile

    from huggingface_hub import HfApi

    if stored_entry(model) is None:
        raise ValueError("push_to_hub needs a patched model: call hf_moe_patch.patch(model, ...) first.")
    if remote_code and _is_peft(model):
        raise ValueError("remote_code=True is for full models; merge the adapter first (merge_and_unload).")
    api = api or HfApi(token=token)
    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(model, folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        if remote_code:
            from .remote_code import write_remote_code

            write_remote_code(model, folder)
        card = model_card(model, repo_id, base_model=base_model, stats=stats, eval_results=eval_results, remote_code=remote_code)
        Path(folder, "README.md").write_text(card)
        api.create_repo(repo_id, private=private, exist_ok=True, token=token)
        method = stored_entry(model)["method"]
        return api.upload_folder(
            repo_id=repo_id, folder_path=folder, token=token, revision=revision, create_pr=create_pr,
            commit_message=commit_message or f"Upload {method}-routed model with hf_moe_patch {__version__}",
        )
