"""What every subcommand shares: the argument parser that fails in one line, the error handler,
logging and progress output, and the checks that run before a model loads."""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, NoReturn, Sequence

PROG = "hf-moe-patch"

EXIT_STATUS = """\
Exit status: 0 on success; 2 when an argument, or what it names, is wrong (unknown method, option,
task or model, a value out of range, a missing file or folder, an output folder that cannot be
written, the Hugging Face Hub unreachable for something that needs it), checked before any model
loads where possible; 1 when the run itself fails. Every error is one line on stderr,
"hf-moe-patch: error: ..."; --debug shows the traceback instead. Progress goes to stderr, results
to stdout."""


class CLIError(Exception):
    """An error the command line reports in one line, with its exit status."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


def fail(message: str, status: int = 2) -> NoReturn:
    """Stop with ``hf-moe-patch: error: MESSAGE`` on stderr and exit status ``status`` (2: bad
    arguments, as argparse)."""
    raise CLIError(message, status)


class Parser(argparse.ArgumentParser):
    """argparse, with its errors in the one-line form of every other error, plus a suggestion for
    a mistyped choice (subcommand, --dtype, ...)."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        match = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if match:
            choices = re.findall(r"'([^']*)'", match.group(2)) or [c.strip() for c in match.group(2).split(",")]
            hits = difflib.get_close_matches(match.group(1), choices, n=1)
            if hits:
                message += f". Did you mean {hits[0]!r}?"
        where = self.prog[len(PROG):].strip()
        sys.stderr.write(f"{PROG}: error: {where + ': ' if where else ''}{message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def global_options(defaults: bool) -> Parser:
    """-v, -q and --debug, accepted before or after the subcommand (``defaults``: the main
    parser's copy sets the defaults; the subcommands' copies leave them alone)."""
    p = Parser(add_help=False)
    keep = {} if defaults else {"default": argparse.SUPPRESS}
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level (library messages)", **keep)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines", **keep)
    p.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line", **keep)
    return p


def split_methods(items: Sequence[str]) -> list[str]:
    """Method specs from command-line words, each word a spec or a comma-separated list of specs;
    a ``key=value`` piece without a method name belongs to the spec before it.

    Example:
        >>> split_methods(["topk,usmoe:top_k=1.5,scope=batch,expert_choice", "ssr"])
        ['topk', 'usmoe:top_k=1.5,scope=batch', 'expert_choice', 'ssr']
    """
    specs: list[str] = []
    for item in items:
        for piece in filter(None, (p.strip() for p in item.split(","))):
            if "=" in piece and ":" not in piece and specs:
                specs[-1] += ("," if ":" in specs[-1] else ":") + piece
            else:
                specs.append(piece)
    return specs


def words(items: Sequence[str] | None, flag: str, example: str) -> list[str] | None:
    """Comma- or space-separated words of a list option; None when not given; an error when
    given but empty (``--tasks ""``)."""
    if items is None:
        return None
    out = [w for item in items for w in (p.strip() for p in item.split(",")) if w]
    if not out:
        fail(f"{flag} was given no value; e.g. {flag} {example}")
    return out


# --- errors ----------------------------------------------------------------------------------

def _input_errors() -> tuple[type[BaseException], ...]:
    from ..hub_access import HubUnreachableError

    return (ValueError, LookupError, FileNotFoundError, FileExistsError, NotADirectoryError,
            IsADirectoryError, PermissionError, HubUnreachableError)


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (a KeyError's without its quotes)."""
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(str(text).split()) or type(exc).__name__


def _from_hub_lookup(exc: BaseException) -> bool:
    """An OSError of transformers or huggingface_hub that says a repo, revision or file does not
    exist (or is gated): a problem with what the user named."""
    try:
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
    except ImportError:  # pragma: no cover
        return False
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError)):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def report_error(exc: BaseException) -> int:
    """Print ``hf-moe-patch: error: ...`` for ``exc`` and return the exit status."""
    if isinstance(exc, CLIError):
        status, message = exc.status, one_line(exc)
    elif isinstance(exc, _input_errors()) or (isinstance(exc, OSError) and _from_hub_lookup(exc)):
        status, message = 2, one_line(exc)
    else:
        status, message = 1, f"{type(exc).__name__}: {one_line(exc)} (rerun with --debug for the traceback)"
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return status


# --- output ----------------------------------------------------------------------------------

class _ProgressHandler(logging.StreamHandler):
    """Progress lines as they are, on stderr."""


def setup_output(verbose: bool = False, quiet: bool = False) -> None:
    """Logging for a command-line run: library messages at WARNING (INFO with -v), progress lines
    (the ``hf_moe_patch.progress`` logger) on stderr unless -q; third-party progress bars only on
    a terminal."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    progress = logging.getLogger("hf_moe_patch.progress")
    for handler in [h for h in progress.handlers if isinstance(h, _ProgressHandler)]:
        progress.removeHandler(handler)
    handler = _ProgressHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    progress.addHandler(handler)
    progress.setLevel(logging.WARNING if quiet else logging.INFO)
    progress.propagate = False
    quiet_bars()


def quiet_bars(datasets: bool = False) -> None:
    """Off a terminal (a log file, CI), turn off the progress bars of huggingface_hub,
    transformers ("Loading weights") and, with ``datasets``, of datasets' ``map``: in a log they
    are thousands of carriage-return updates. The progress lines stay."""
    if sys.stderr.isatty():
        return
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    disable_progress_bars()
    transformers_logging.disable_progress_bar()
    if datasets:
        import datasets as datasets_lib

        datasets_lib.disable_progress_bars()


# --- checks before a model loads -------------------------------------------------------------

def check_out(path: str | os.PathLike | None, flag: str) -> None:
    """Fail now when ``path`` cannot be written (see :func:`hf_moe_patch.validation.check_writable_dir`)."""
    if path is not None:
        from ..validation import check_writable_dir

        check_writable_dir(path, flag=flag)


def text_lines(path: str | os.PathLike, flag: str) -> list[str]:
    """The non-empty lines of the UTF-8 text file ``path`` given with ``flag``; fails when it is
    missing or holds no text."""
    file = Path(path)
    if not file.is_file():
        fail(f"{flag} {path}: no such file")
    lines = [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        fail(f"{flag} {path} holds no text")
    return lines


def locate(name: str, revision: str | None = None) -> tuple[str, dict[str, Any], Any]:
    """``(path, from_pretrained extras, config)`` of a model name (``demo``, a folder, a Hub id),
    its config loaded without the weights; unsupported families fail here."""
    from transformers import AutoConfig

    from ..hub_access import locate_model
    from ..validation import native_from_config

    path, extra = locate_model(name, revision=revision)
    try:
        config = AutoConfig.from_pretrained(path, revision=revision, **extra)
    except OSError as exc:
        if Path(path).is_dir():
            raise
        raise CLIError(f"cannot load the model {name!r}: {one_line(exc)}") from exc
    native_from_config(config)  # an unsupported family fails before the weights load
    return path, extra, config


def check_cases_for_config(specs: Sequence[str], config: Any, top_k: Sequence[str] | None = None):
    """Routing cases of ``specs`` (budget sweep ``top_k``) with every range checked for the model
    of ``config``; ``...x`` budgets resolved."""
    from ..embeddings.evaluation import expand_cases
    from ..validation import check_routings, native_from_config

    native = native_from_config(config)
    return check_routings(expand_cases(specs, native.top_k, top_k), native)


def plain(text: str) -> str:
    """Docstring text for a terminal: RST markup (````x````, ``:class:`~a.B```) removed."""
    text = re.sub(r":\w+:`~?(?:[\w.]*\.)?([\w]+)`", r"\1", text)
    return text.replace("``", "").replace("`", "")
