"""Helpers shared by the experiment scripts of eval/: atomic JSON, machine description, spreads.

Each script runs as ``python eval/<name>.py``, which puts this folder on ``sys.path``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]


def slug(text: str) -> str:
    """A file-name-safe form of ``text``."""
    return re.sub(r"[^A-Za-z0-9_.=-]+", "-", text).strip("-")


def key_of(obj: Any) -> str:
    """A short stable hash of a JSON-able object (cache keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_json(path: Path, obj: Any) -> None:
    """Atomic: an interrupted run never leaves a truncated cache entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    """Atomic text write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_json(path: Path) -> Any | None:
    """The JSON in ``path``, or None when it is missing or unreadable (then it is recomputed)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds}s" if seconds < 60 else f"{seconds // 60}m {seconds % 60:02d}s"


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one value), count and list of the finite values."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return {"mean": math.nan, "std": math.nan, "n": 0, "values": []}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals),
            "values": vals}


def quantiles(values: Sequence[float]) -> dict[str, float]:
    """Median and 25th/75th percentiles (inclusive method; a single value is its own spread)."""
    vals = sorted(values)
    if len(vals) == 1:
        return {"median": vals[0], "q25": vals[0], "q75": vals[0], "n": 1}
    q = statistics.quantiles(vals, n=4, method="inclusive")
    return {"median": statistics.median(vals), "q25": q[0], "q75": q[2], "n": len(vals)}


def machine_info() -> dict[str, Any]:
    """CPU, Python and package versions, and the git commit of the code that ran."""
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        import mteb

        info["mteb"] = mteb.__version__
    except Exception:  # noqa: BLE001
        pass
    import hf_moe_patch

    info["hf_moe_patch"] = hf_moe_patch.__version__
    try:  # read-only git queries
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                            timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "hf_moe_patch"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        info["hf_moe_patch_uncommitted_changes"] = bool(dirty)
    except Exception:  # noqa: BLE001
        pass
    return info


def verdict(diffs: Sequence[float], *, better: str = "higher") -> str:
    """The verdict on a claim from paired differences over seeds (claimed side minus the other).

    ``holds`` when every difference favours the claim *and* their mean is more than two standard
    errors (sample std / sqrt(n)) from 0; ``does not hold`` when the same is true against it;
    else ``inconclusive`` (always with fewer than 2 seeds).

    Example:
        >>> verdict([1.0, 1.2, 0.9]), verdict([0.1, -0.1, 0.2]), verdict([-1.0, -1.1])
        ('holds', 'inconclusive', 'does not hold')
    """
    vals = [d for d in diffs if d is not None and math.isfinite(d)]
    if len(vals) < 2:
        return "inconclusive (fewer than 2 seeds)"
    sign = 1.0 if better == "higher" else -1.0
    mean = statistics.fmean(vals)
    se = statistics.stdev(vals) / math.sqrt(len(vals))
    if all(sign * d > 0 for d in vals) and sign * mean > 2 * se:
        return "holds"
    if all(sign * d < 0 for d in vals) and sign * mean < -2 * se:
        return "does not hold"
    return "inconclusive"


def apply_defaults(args: Any, defaults: dict[str, Any]) -> Any:
    """Fill every flag the user did not give (None) from ``defaults`` (the full run's or --quick's);
    values are deep-copied, so a run never edits the defaults."""
    import copy

    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, copy.deepcopy(value))
    return args


def setup_run(log_level: str) -> None:
    """Logging for an experiment: its own lines at ``log_level``, the libraries' at WARNING; their
    UserWarning/FutureWarning noise off; the Hub off (everything here is local)."""
    import logging
    import warnings

    logging.basicConfig(level=getattr(logging, log_level), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        force=True)
    for noisy in ("hf_moe_patch", "hf_moe_patch.progress", "mteb", "datasets", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def task_build(wordnet: str | None = None) -> dict[str, Any]:
    """What the local WordNet tasks are built from: the sampling code's build version and the
    WordNet files' fingerprint. Part of every cache key that holds MTEB scores, so that a result
    of another task build is measured again instead of reused."""
    from hf_moe_patch.data.wordnet_tasks import BUILD_VERSION, wordnet_fingerprint

    return {"wordnet_tasks_build": BUILD_VERSION, "wordnet": wordnet_fingerprint(wordnet)}
