"""Every experiment script of eval/ answers --help with every one of its flags named."""

from __future__ import annotations

import pytest

from conftest import EVAL_DIR, load_eval_script

SCRIPTS = sorted(p.stem for p in EVAL_DIR.glob("*.py") if not p.stem.startswith("_"))


def test_the_scripts_are_the_ones_the_page_lists():
    page = (EVAL_DIR / "README.md").read_text()
    assert SCRIPTS and all(f"eval/{name}.py" in page for name in SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_names_every_flag(name, capsys):
    script = load_eval_script(name)
    with pytest.raises(SystemExit) as exc:
        script.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: ")
    parser = script.build_parser() if hasattr(script, "build_parser") else None
    flags = [f for action in parser._actions for f in action.option_strings] if parser else []
    assert all(flag in text for flag in flags)
