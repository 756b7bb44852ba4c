"""Atomic writes and tolerant reads of JSON records, on real files."""

from __future__ import annotations

import json
import os

import pytest

from hf_moe_patch.io import atomic_path, atomic_write_text, read_json_or_none


def test_atomic_write_replaces_whole_or_leaves_the_old_file(tmp_path):
    path = tmp_path / "sub" / "stats.json"
    assert atomic_write_text(path, json.dumps({"a": 1})) == path
    assert json.loads(path.read_text()) == {"a": 1}
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # the mode of a plain write
    with pytest.raises(UnicodeEncodeError):  # fails half-way through writing
        atomic_write_text(path, '{"a": 2, "b": "\ud800"}')
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in path.parent.iterdir()] == ["stats.json"]  # no temporary file left


def test_atomic_path_keeps_the_suffix_and_cleans_up_on_error(tmp_path):
    target = tmp_path / "plot.png"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".png" and tmp != target
        tmp.write_bytes(b"one")
    assert target.read_bytes() == b"one"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"tw")
            raise RuntimeError("killed")
    assert target.read_bytes() == b"one" and [p.name for p in tmp_path.iterdir()] == ["plot.png"]


@pytest.mark.parametrize("content, required", [('{"summary": {', ()), ("", ()), ('{"seconds": 1}', ("summary",)),
                                               ("[1, 2]", ("summary",)), (b"\xff\xfe", ())])
def test_unreadable_json_counts_as_missing_with_a_warning(tmp_path, caplog, content, required):
    path = tmp_path / "entry.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with caplog.at_level("WARNING", logger="hf_moe_patch.io"):
        assert read_json_or_none(path, required) is None
    assert str(path) in caplog.text
    assert read_json_or_none(tmp_path / "absent.json") is None


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
