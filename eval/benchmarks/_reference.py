"""Load a module of this repository as it was at a git revision (for equivalence checks)."""

from __future__ import annotations

import importlib.util
import subprocess
import tempfile
from pathlib import Path
from types import ModuleType


def load_reference(relpath: str, path: str | None = None, rev: str = "HEAD") -> ModuleType:
    """The module at ``path``, or ``relpath`` (e.g. ``hf_moe_patch/dispatch.py``) as in ``rev``.

    Example:
        >>> old = load_reference("hf_moe_patch/ops/selection.py", rev="689a42c")  # doctest: +SKIP
    """
    if path is None:
        root = Path(__file__).resolve().parents[2]
        text = subprocess.run(["git", "show", f"{rev}:{relpath}"], cwd=root, check=True, capture_output=True, text=True).stdout
        with tempfile.NamedTemporaryFile("w", suffix="_" + Path(relpath).name, delete=False) as tmp:
            tmp.write(text)
        path = tmp.name
    name = Path(relpath).stem + "_reference"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
