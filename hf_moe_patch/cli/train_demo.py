"""``hf-moe-patch train-demo``: pretrain the demo model on WordNet from nothing."""

from __future__ import annotations

import argparse
import dataclasses

from .common import EXIT_STATUS, fail

DESCRIPTION = """\
Pretrain the demo model on WordNet from nothing: a byte-level BPE tokenizer, then an OLMoE- (or
Mixtral-) architecture MoE trained with native top-k routing, seeded. About 30 minutes on 2 CPU
cores with the defaults (the shipped model's settings). Writes into a new folder, never over the
shipped model unless --force; every number is checked before any work."""


def add_demo_training_options(p: argparse.ArgumentParser) -> None:
    """One option per numeric field of DemoTrainingArgs (``--steps``, ``--batch-size``, ...),
    default: the field's default (the shipped model's setting)."""
    from ..training.demo_model import DemoTrainingArgs

    for f in dataclasses.fields(DemoTrainingArgs):
        if f.type in ("int", "float", int, float):
            kind = int if f.type in ("int", int) else float
            p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, metavar=kind.__name__.upper(),
                           help=f"{f.name.replace('_', ' ')} (default: {f.default})")


def add_parser(sub, parents) -> None:
    p = sub.add_parser("train-demo", parents=parents, help="pretrain the demo model on WordNet from nothing "
                       "(about 30 min on 2 CPU cores)", description=DESCRIPTION, epilog=EXIT_STATUS,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="olmoe", choices=["olmoe", "mixtral"], help="the architecture (default: %(default)s)")
    add_demo_training_options(p)
    p.add_argument("--wordnet", help="folder of WordNet's data.* files (default: $HF_MOE_PATCH_WORDNET or /usr/share/wordnet)")
    p.add_argument("--out", help="output folder (default: ./demo-ARCH-wordnet in the working directory)")
    p.add_argument("--force", action="store_true",
                   help="write into a folder that is not empty, or into the package's shipped assets "
                        "(replacing the shipped demo model)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data.wordnet import load_wordnet
    from ..training.demo_model import DemoTrainingArgs, demo_output_dir, train_demo_model

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(DemoTrainingArgs)
             if getattr(args, f.name, None) is not None}
    # Arguments and output folder are checked before the corpus, the tokenizer or the model is
    # built: a bad value fails in a second, and never after a run has replaced a folder.
    try:
        train_args = DemoTrainingArgs(**given)
        out = demo_output_dir(args.out, train_args.arch, force=args.force)
    except (ValueError, FileExistsError) as exc:
        fail(str(exc))
    wordnet = load_wordnet(args.wordnet) if args.wordnet else None
    out = train_demo_model(out, train_args, wordnet=wordnet, force=args.force)
    print((out / "README.md").read_text())
    print(f"wrote {out}")
    return 0
