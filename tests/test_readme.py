"""The README's offline Quick start runs as written, on the shipped demo model."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_offline_quick_start_runs_as_written(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    quick_start = README.read_text().split("## Quick start", 1)[1]
    code = python_blocks(quick_start)[0]
    assert "demo_model_path" in code and "from_pretrained(\"allenai" not in code
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md: Quick start", "exec"), {})
    assert float(out.getvalue().strip().splitlines()[-1]) == 3.0  # the budget the snippet asks for
