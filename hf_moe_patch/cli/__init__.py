"""The hf-moe-patch command line.

Subcommands:
  demo         the main job on the shipped demo model: MTEB WordNet tasks and routing statistics
  mteb         MTEB evaluation of a model's MoE embeddings under each routing
  methods      the routing methods, their options, defaults and valid ranges
  stats        routing statistics of a model on texts
  train-demo   pretrain the demo model on WordNet from nothing
  sft          fine-tune a patched model with peft and Trainer
  sft-compare  the same fine-tuning run once per routing
  push         upload a saved patched model with its routing and a model card

Wherever a model is named, 'demo' is the shipped demo model. Run hf-moe-patch SUBCOMMAND --help
for each subcommand's options. Everything that can be checked (routings, options, task names,
dtype, paths, output folders, the Hub's reachability) is checked before a model loads.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from . import evaluate, methods, push, sft, stats, train_demo
from .common import EXIT_STATUS, PROG, CLIError, Parser, fail, global_options, report_error, setup_output, split_methods
from .evaluate import DEMO_CASES
from .sft import _sft_config, add_sft_options
from .stats import DEFAULT_CASES
from .train_demo import add_demo_training_options

_fail = fail  # the name train-demo's callers knew

DESCRIPTION = """\
Swap the router of a transformers MoE model, evaluate and fine-tune it under each routing.

Wherever a model is named, 'demo' is the shipped demo model (offline, no download). Run
hf-moe-patch SUBCOMMAND --help for each subcommand's options. Everything that can be checked
(routings, options, task names, dtype, paths, output folders, the Hub's reachability) is checked
before a model loads."""


def build_parser(commands: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; ``commands`` limits the subcommands whose options are built (their modules
    take seconds to import) to those named, the others keep only their name and summary."""
    parser = Parser(prog=PROG, description=DESCRIPTION, epilog=EXIT_STATUS, parents=[global_options(defaults=True)],
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND", parser_class=Parser)
    parents = [global_options(defaults=False)]
    evaluate.add_parsers(sub, parents)  # demo, mteb
    methods.add_parser(sub, parents)
    stats.add_parser(sub, parents)
    train_demo.add_parser(sub, parents)
    sft.add_parsers(sub, parents, options=commands is None or bool({"sft", "sft-compare"} & set(commands)))
    push.add_parser(sub, parents)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (see ``hf-moe-patch --help``)."""
    from .. import hub_access

    words = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(commands=words).parse_args(words)
    setup_output(verbose=args.verbose, quiet=args.quiet)
    # Once the Hub is found unreachable, every library reads its cache instead of retrying.
    hub_access.SWITCH_OFFLINE_WHEN_UNREACHABLE = True
    try:
        return args.func(args)
    except BrokenPipeError:  # the output went to a pager or `head` that stopped reading
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every error becomes one line (or a traceback with --debug)
        if args.debug:
            raise
        return report_error(exc)


__all__ = ["CLIError", "DEFAULT_CASES", "DEMO_CASES", "_sft_config", "add_demo_training_options", "add_sft_options",
           "build_parser", "main", "split_methods"]
