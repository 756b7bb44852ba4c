"""``hf-moe-patch methods``: the routing methods, their options, defaults and valid ranges."""

from __future__ import annotations

import argparse
import dataclasses
import re
import textwrap

from .common import EXIT_STATUS, fail, plain

DESCRIPTION = """\
List the routing methods that patch (and --methods / --method of the other subcommands) accept:
what each does, and every option with its default, its valid values and what it means.

Ranges that depend on the model are written in terms of N (routed experts) and k (experts per
token of the native router); with --model they are given for that model (only its config is
read, not its weights). Specs on the command line are METHOD[:key=value,...] with JSON values,
e.g. usmoe:top_k=1.5,alpha=0.3."""


def add_parser(sub, parents) -> None:
    p = sub.add_parser("methods", parents=parents, help="list routing methods, their options, defaults and valid ranges",
                       description=DESCRIPTION, epilog=EXIT_STATUS, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", metavar="METHOD", help="only these methods (default: all)")
    p.add_argument("--model", help="show the ranges for this model: 'demo', a local folder or a Hub id (default: in terms of N and k)")
    p.add_argument("--revision", help="the model's revision on the Hub (default: main)")
    p.set_defaults(func=run)


def _sections(doc: str) -> tuple[list[str], str]:
    """A docstring's prose paragraphs (RST removed, one line each) and its ``Args:`` block;
    ``Example:`` and what follows are left out."""
    lines = doc.strip().splitlines()
    text = (lines[0] + "\n" + textwrap.dedent("\n".join(lines[1:]))) if lines else ""
    text = re.split(r"\n(?:Example|Examples):\s*\n", text)[0]
    prose, args = [], ""
    for block in re.split(r"\n\s*\n", text):
        if re.match(r"\s*(?:Args|Arguments|Attributes):\s*\n", block):
            args = block.split("\n", 1)[1]
        elif block.strip():
            prose.append(plain(" ".join(block.split())))
    return prose, args


def _option_docs(args_block: str) -> dict[str, str]:
    """``{option: description}`` from the body of a Google-style ``Args:`` section."""
    out: dict[str, str] = {}
    current: list[str] = []
    indent = min((len(l) - len(l.lstrip()) for l in args_block.splitlines() if l.strip()), default=0)
    for line in args_block.splitlines():
        item = re.match(r"\s*([\w, ]+?):\s+(.*)", line)
        if item and len(line) - len(line.lstrip()) == indent:
            current = [n.strip() for n in item.group(1).split(",")]
            for name in current:
                out[name] = ""
            line = item.group(2)
        for name in current:
            out[name] = (out[name] + " " + line.strip()).strip()
    return {k: plain(v) for k, v in out.items()}


def run(args: argparse.Namespace) -> int:
    from ..methods import METHODS
    from ..validation import describe_option, native_from_config, suggest

    for name in args.names:
        if name not in METHODS:
            fail(f"unknown routing method {name!r}.{suggest(name, list(METHODS))} Methods: {', '.join(METHODS)}")
    native = None
    if args.model:
        from .common import locate

        _, _, config = locate(args.model, args.revision)
        native = native_from_config(config)
        print(f"Valid ranges for {args.model}: N={native.num_experts} routed experts, native k={native.top_k}.\n")
    else:
        print("Valid ranges in terms of N (routed experts) and k (the native experts per token); "
              "--model MODEL gives them for a model.\n")
    wrap = textwrap.TextWrapper(width=100, initial_indent="    ", subsequent_indent="    ")
    detail = textwrap.TextWrapper(width=100, initial_indent="        ", subsequent_indent="        ")
    for name, cls in METHODS.items():
        if args.names and name not in args.names:
            continue
        prose, args_block = _sections(cls.__doc__ or "")
        print(name)
        for paragraph in prose:
            print(wrap.fill(paragraph))
        fields = dataclasses.fields(cls)
        if not fields:
            print("    (no options)")
        docs = _option_docs(args_block)
        for f in fields:
            line = f"    {f.name} = {f.default!r}"
            if f.name in cls.OPTIONS:
                line += f"    ({describe_option(name, f.name, native)})"
            print(line)
            if docs.get(f.name):
                print(detail.fill(docs[f.name]))
        print()
    return 0
