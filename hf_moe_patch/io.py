"""Small file helpers shared by the runners: atomic writes and tolerant reads of JSON records.

A crash (or a kill) in the middle of ``Path.write_text`` leaves a truncated file behind, and a
cache or record that later runs read back would then break every one of them.
:func:`atomic_write_text` (and :func:`atomic_path`, for writers that take a file name) write to
a temporary file in the same folder and rename it over the target (``os.replace``, atomic on
POSIX and Windows), so readers see the old file or the new one, never a part.
:func:`read_json_or_none` reads a cache entry and treats an unreadable one as missing, with a
warning, so that the caller recomputes it.

Example:
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> atomic_write_text(folder / "stats.json", '{"seconds": 1.5}').name
    'stats.json'
    >>> read_json_or_none(folder / "stats.json")
    {'seconds': 1.5}
    >>> _ = (folder / "stats.json").write_text('{"summary": {')  # what a crash leaves behind
    >>> read_json_or_none(folder / "stats.json") is None
    True
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

logger = logging.getLogger(__name__)

__all__ = ["atomic_path", "atomic_write_text", "read_json_or_none"]

# Read once: os.umask can only be read by setting it, which is not thread-safe at write time.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file name beside ``path`` for writers that take a file name (``savefig``,
    ``torch.save``): when the block ends without an error the file replaces ``path`` in one
    ``os.replace``; on an error it is removed and ``path`` is left as it was. The name keeps the
    suffix of ``path`` (``.tmp.png``), for writers that pick the format from it.

    Example:
        >>> target = Path(tempfile.mkdtemp()) / "plot.png"
        >>> with atomic_path(target) as tmp:
        ...     _ = tmp.write_bytes(b"not really a PNG")
        >>> target.read_bytes(), sorted(p.name for p in target.parent.iterdir())
        (b'not really a PNG', ['plot.png'])
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder, hence same file system: the rename is atomic.
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        # mkstemp creates the file with mode 0600; give it the mode a plain write would have.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`), creating the parent
    folder if needed; the data is flushed to disk before the rename. Returns the path.

    Example:
        >>> atomic_write_text(Path(tempfile.mkdtemp()) / "a" / "b.md", "# title\\n").read_text()
        '# title\\n'
    """
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding=encoding) as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    return Path(path)


def read_json_or_none(path: str | os.PathLike, required: tuple[str, ...] = ()) -> Any:
    """The JSON in ``path``, or None when the file is missing, unreadable, not valid JSON, or
    (for a dict) lacks one of the ``required`` keys; every case but a missing file logs a
    warning. For caches: the caller recomputes what this cannot read.

    Example:
        >>> read_json_or_none(Path(tempfile.mkdtemp()) / "absent.json") is None
        True
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        logger.warning("ignoring unreadable %s (%s: %s); it will be recomputed", path, type(exc).__name__, exc)
        return None
    missing = [key for key in required if not isinstance(data, dict) or key not in data]
    if missing:
        logger.warning("ignoring %s: it lacks %s; it will be recomputed", path, ", ".join(map(repr, missing)))
        return None
    return data
