"""Where a named model comes from (the shipped ``demo``, a local folder or the Hugging Face Hub),
and whether the Hub can be reached, found out in about a second.

Every place that takes a model name (``hmp.from_pretrained``, ``MoEEncoder.from_pretrained``,
``hf_moe_patch.lm.load_model_and_tokenizer``, the command line) resolves it here first:

* ``"demo"`` is the shipped demo model (a folder called ``demo`` is ``./demo``);
* an existing path is a local folder; a name that cannot be a Hub id (``./x``, ``/a/b``,
  ``a/b/c``) and does not exist raises :class:`FileNotFoundError` saying so;
* anything else is a Hub id. When the Hub cannot be reached (``HF_HUB_OFFLINE=1``, or no
  connection to it within a second) a model in the local cache loads from there
  (``local_files_only=True``); one that is not raises :class:`HubUnreachableError` at once, with
  what to use instead, rather than after transformers' retries (35-50 s without a network).

This module imports neither torch nor transformers, so that the checks run before they load.

Example:
    >>> Path(locate_model("demo")[0]).name
    'demo-olmoe-wordnet'
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "assets"
DEMO_MODELS = {"olmoe": "demo-olmoe-wordnet", "mixtral": "demo-mixtral-wordnet"}
DEMO_NAME = "demo"
PROBE_TIMEOUT = 1.0  # seconds to wait for a connection to the Hub
INSTEAD = "use the shipped model 'demo' or a local folder"

# Set by the command line: once the Hub is found unreachable, the whole process works offline
# (transformers, datasets and mteb then read their caches instead of retrying for a minute).
SWITCH_OFFLINE_WHEN_UNREACHABLE = False

_probe_lock = threading.Lock()
_probe_result: dict[str, str | None] = {}


class HubUnreachableError(ConnectionError):
    """Something must come from the Hugging Face Hub, which cannot be reached and whose local
    cache does not have it; the message says what to use instead."""


def demo_model_path(arch: str = "olmoe") -> Path:
    """Folder of the shipped demo model of ``arch``; an error says how to build a missing one."""
    if arch not in DEMO_MODELS:
        raise ValueError(f"arch={arch!r} is not a demo architecture; valid: {', '.join(sorted(DEMO_MODELS))}")
    path = ASSETS / DEMO_MODELS[arch]
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the {arch} demo model is not in {path}; build it with "
                                f"`hf-moe-patch train-demo --arch {arch} --out {path} --force`")
    return path


def _offline_env() -> bool:
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - a dependency
        return False
    is_offline = getattr(constants, "is_offline_mode", None)
    return bool(is_offline() if callable(is_offline) else getattr(constants, "HF_HUB_OFFLINE", False))


def endpoint() -> str:
    """The Hub's address (``HF_ENDPOINT``, default https://huggingface.co)."""
    try:
        from huggingface_hub import constants

        return str(constants.ENDPOINT)
    except ImportError:  # pragma: no cover
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def _probe(url: str, timeout: float) -> str | None:
    """None when a TCP connection to ``url``'s host opens within ``timeout`` seconds, else why not.
    Name resolution runs in a thread so that a resolver that hangs cannot make it slower."""
    parsed = urlparse(url)
    host = parsed.hostname or url
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    outcome: dict[str, str | None] = {}

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome["error"] = None
        except OSError as exc:
            outcome["error"] = exc.strerror or type(exc).__name__

    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(timeout + 0.5)
    if "error" not in outcome:
        return f"no answer from {host} within {timeout:g} s"
    return None if outcome["error"] is None else f"{host} cannot be reached: {outcome['error']}"


def offline_reason(timeout: float = PROBE_TIMEOUT) -> str | None:
    """Why the Hub cannot be used now, or None when it can: ``HF_HUB_OFFLINE`` (or
    ``TRANSFORMERS_OFFLINE``) is set, or a connection to the endpoint did not open within
    ``timeout`` seconds. The probe runs once per process and endpoint.

    Example:
        >>> offline_reason() in (None, "HF_HUB_OFFLINE=1 is set") or "cannot be reached" in offline_reason()  # doctest: +SKIP
        True
    """
    if _offline_env():
        return "HF_HUB_OFFLINE=1 is set"
    url = endpoint()
    with _probe_lock:
        if url not in _probe_result:
            _probe_result[url] = _probe(url, timeout)
            if _probe_result[url] is not None:
                logger.info("the Hub cannot be used: %s", _probe_result[url])
                if SWITCH_OFFLINE_WHEN_UNREACHABLE:
                    work_offline()
        return _probe_result[url]


def work_offline() -> None:
    """Put this process in Hub offline mode (``HF_HUB_OFFLINE=1``): transformers, datasets and
    mteb then read their caches without trying the network."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True
    except ImportError:  # pragma: no cover
        pass
    import sys

    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = True


@contextlib.contextmanager
def offline_if(extra: dict[str, Any]):
    """Inside the block, huggingface_hub (and transformers, datasets through it) works offline when
    ``extra`` (from :func:`locate_model`) says the model comes from the cache: some of
    transformers' look-ups (e.g. for a peft adapter config) ignore ``local_files_only`` and would
    retry the unreachable Hub for half a minute."""
    if not extra.get("local_files_only"):
        yield
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def is_repo_id(name: str) -> bool:
    """Whether ``name`` has the form of a Hub repo id (``name`` or ``owner/name``)."""
    if name.startswith((".", "/", "~")) or "\\" in name:
        return False
    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(name)
    except ImportError:  # pragma: no cover
        return name.count("/") <= 1
    except ValueError:
        return False
    return True


def _in_cache(repo_id: str, filenames: tuple[str, ...], revision: str | None, cache_dir: Any) -> bool:
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        found = try_to_load_from_cache(repo_id, filename, revision=revision, cache_dir=cache_dir)
        if isinstance(found, str):
            return True
    return False


def locate_model(name_or_path: str | os.PathLike, *, revision: str | None = None, cache_dir: Any = None,
                 what: str = "model") -> tuple[str, dict[str, Any]]:
    """``(path or Hub id, extra from_pretrained arguments)`` for a model name.

    ``"demo"`` becomes the shipped demo model's folder. A missing local path raises
    :class:`FileNotFoundError`; a local folder without ``config.json`` (or a peft
    ``adapter_config.json``) raises :class:`FileNotFoundError` too. A Hub id while the Hub
    cannot be reached: from the cache with ``{"local_files_only": True}``, or
    :class:`HubUnreachableError` when not cached.

    Example:
        >>> locate_model("./no/such/folder")
        Traceback (most recent call last):
        FileNotFoundError: no such folder: './no/such/folder' (a model is 'demo', a local folder with config.json, or a Hub id such as owner/name)
    """
    name = os.fspath(name_or_path)
    if name == DEMO_NAME:
        return str(demo_model_path()), {}
    hint = "a model is 'demo', a local folder with config.json, or a Hub id such as owner/name"
    path = Path(name).expanduser()
    if path.exists():
        if path.is_dir() and not any((path / f).is_file() for f in ("config.json", "adapter_config.json")):
            raise FileNotFoundError(f"{name!r} is a folder without config.json, not a saved {what} ({hint})")
        return str(path), {}
    if not is_repo_id(name):
        raise FileNotFoundError(f"no such folder: {name!r} ({hint})")
    reason = offline_reason()
    if reason is None:
        return name, {}
    if _in_cache(name, ("config.json", "adapter_config.json"), revision, cache_dir):
        logger.info("%s: the Hub cannot be used (%s); loading from the local cache", name, reason)
        return name, {"local_files_only": True}
    raise HubUnreachableError(
        f"cannot load {what} {name!r}: it is not a local folder and not in the local Hugging Face cache, and the "
        f"Hub is offline ({reason}); {INSTEAD}, or download it once online")


def hub_dataset_cached(repo_id: str, cache_dir: Any = None) -> bool:
    """Whether the local Hugging Face cache holds any revision of the data set ``repo_id``."""
    from huggingface_hub import constants

    root = Path(cache_dir or constants.HF_HUB_CACHE)
    folder = root / f"datasets--{repo_id.replace('/', '--')}"
    return folder.is_dir() and any((folder / "snapshots").glob("*"))


def require_hub(what: str, instead: str) -> None:
    """Raise :class:`HubUnreachableError` when the Hub cannot be reached: ``what`` needs it,
    ``instead`` says what to use in its place."""
    reason = offline_reason()
    if reason is not None:
        raise HubUnreachableError(f"{what} needs the Hugging Face Hub, which is offline ({reason}); {instead}")
