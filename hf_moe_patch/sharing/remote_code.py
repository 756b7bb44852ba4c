"""Self-contained ``trust_remote_code`` repos: the routing travels with the model.

:func:`write_remote_code` adds ``modeling_hf_moe_patch.py`` to a saved model folder and points
``config.json``'s ``auto_map`` at it. The file subclasses the model's own transformers class and,
after ``__init__``, applies the routing recorded in ``config.moe_routing`` with a copy of this
package embedded as a zip (under a private, versioned name, so it never shadows an installed
hf_moe_patch). Users who never installed hf_moe_patch then get the same outputs with
``AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)``.
"""

from __future__ import annotations

import base64
import io
import json
import zipfile
from pathlib import Path

from torch import nn

from ..version import __version__

MODULE_NAME = "modeling_hf_moe_patch"
CLASS_NAME = "HfMoePatchForCausalLM"
# Modules and subpackages that the routing itself does not need (and that import optional libraries).
_EXCLUDED = {"cli.py", "report.py", "testing.py", "sharing/remote_code.py"}
_EXCLUDED_DIRS = {"embeddings", "data", "training", "cli", "assets"}

_TEMPLATE = '''"""Remote code written by hf_moe_patch {version}.

Loads {base_name} and applies the routing recorded in config.json's "moe_routing" with an
embedded copy of hf_moe_patch (https://pypi.org/project/hf-moe-patch/), so that loading with
trust_remote_code=True needs no extra package.
"""

import base64
import importlib
import os
import sys

from {base_module} import {base_name}

_PACKAGE = "{package}"
_ZIP = "{blob}"


def _routing_package():
    if _PACKAGE not in sys.modules:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), _PACKAGE + ".zip")
        if not os.path.exists(path):
            tmp = path + ".%d.tmp" % os.getpid()
            with open(tmp, "wb") as f:
                f.write(base64.b64decode(_ZIP))
            os.replace(tmp, path)
        if path not in sys.path:
            sys.path.append(path)
    return importlib.import_module(_PACKAGE)


class {class_name}({base_name}):
    """{base_name} with the routing of config.moe_routing applied at construction."""

    # transformers decides whether the experts implementation (eager, grouped_mm, ...) may be
    # chosen by reading the class's module source; this module is not that source, so take the
    # base class's answer, or the remote model would silently run other kernels.
    _can_set_experts_implementation_cached_value = {base_name}._can_set_experts_implementation()

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        _routing_package().patch(self)
'''


def vendored_package_name() -> str:
    """The private import name of the embedded package, e.g. ``_hf_moe_patch_0_1_0``."""
    return "_hf_moe_patch_" + __version__.replace(".", "_").replace("-", "_")


def package_zip() -> bytes:
    """The routing package's sources, zipped under :func:`vendored_package_name`."""
    root = Path(__file__).resolve().parent.parent  # the package, not this subpackage
    name = vendored_package_name()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root)
            if rel.as_posix() in _EXCLUDED or rel.parts[0] in _EXCLUDED_DIRS:
                continue
            # Fixed timestamps keep the file byte-identical between runs (stable Hub diffs).
            info = zipfile.ZipInfo(f"{name}/{rel.as_posix()}", date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, path.read_bytes())
    return buf.getvalue()


def write_remote_code(model: nn.Module, folder: str | Path) -> Path:
    """Add the remote-code module to a folder written by ``save_pretrained`` and register it in
    ``config.json``'s ``auto_map``. Returns the module's path.

    Example:
        >>> model.save_pretrained("out"); write_remote_code(model, "out")  # doctest: +SKIP
        >>> AutoModelForCausalLM.from_pretrained("out", trust_remote_code=True)  # doctest: +SKIP
    """
    base = getattr(model, "get_base_model", lambda: model)()
    base_cls = type(base)
    if base_cls.__name__ == CLASS_NAME:  # loaded through this remote code: subclass its transformers class
        base_cls = base_cls.__mro__[1]
    folder = Path(folder)
    code = _TEMPLATE.format(
        version=__version__, base_module=base_cls.__module__, base_name=base_cls.__name__,
        package=vendored_package_name(), blob=base64.b64encode(package_zip()).decode("ascii"),
        class_name=CLASS_NAME,
    )
    target = folder / f"{MODULE_NAME}.py"
    target.write_text(code)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config.setdefault("auto_map", {})["AutoModelForCausalLM"] = f"{MODULE_NAME}.{CLASS_NAME}"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return target
