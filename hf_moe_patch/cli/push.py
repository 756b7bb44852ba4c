"""``hf-moe-patch push``: upload a saved patched model (or peft adapter) with its routing and a
model card. The token, the Hub's reachability, the files and the routing are checked before the
model loads."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import EXIT_STATUS, fail

DESCRIPTION = """\
Upload a saved patched model (or peft adapter) to the Hugging Face Hub with its routing, its
tokenizer and a model card (routing table, statistics and evaluation results when given, how to
load it). PATH is a folder written by save_pretrained, 'demo' (the shipped demo model) or a Hub
id; a model saved without a routing needs --method. Needs a token: hf auth login, HF_TOKEN or
--token."""

LOGIN = "log in with `hf auth login` (or set HF_TOKEN, or pass --token)"


def add_parser(sub, parents) -> None:
    p = sub.add_parser("push", parents=parents, help="upload a saved patched model (or peft adapter) with its routing "
                       "and a model card", description=DESCRIPTION, epilog=EXIT_STATUS,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="a folder written by save_pretrained / hf_moe_patch.save_pretrained, or 'demo'")
    p.add_argument("repo_id", help="owner/name on the Hub (created if missing)")
    p.add_argument("--method", dest="method_spec", metavar="SPEC",
                   help="patch with this routing, METHOD[:key=value,...], before pushing (needed for a model saved "
                        "without one, such as demo; default: the saved routing)")
    p.add_argument("--private", action="store_true", default=None, help="create the repo as private")
    p.add_argument("--remote-code", action="store_true",
                   help="also upload code so that trust_remote_code=True loads the routing without hf_moe_patch")
    p.add_argument("--commit-message", help="default: 'Upload METHOD-routed model with hf_moe_patch VERSION'")
    p.add_argument("--revision", help="the branch to push to (default: main)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to the branch")
    p.add_argument("--token", help="a Hugging Face token with write access (default: the saved login, or HF_TOKEN)")
    p.add_argument("--base-model", help="base_model for the card's metadata (default: config._name_or_path)")
    p.add_argument("--stats-json", help="routing statistics JSON (RoutingStats.to_json) for the card")
    p.add_argument("--eval-json", help="{task: score} JSON for the card")
    p.set_defaults(func=run)


def _read_json(path: str | None, flag: str):
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        fail(f"{flag} {path!r} is not valid JSON ({exc.msg}, line {exc.lineno})")


def _saved_routing(path: str) -> bool | None:
    """Whether a local model folder records a routing (None: cannot tell, e.g. a Hub id)."""
    from ..routing_format import ROUTING_FILE, ROUTING_KEY

    folder = Path(path)
    if not folder.is_dir():
        return None
    if (folder / ROUTING_FILE).is_file():
        return True
    config = folder / "config.json"
    return config.is_file() and ROUTING_KEY in json.loads(config.read_text())


def run(args: argparse.Namespace) -> int:
    from huggingface_hub import get_token

    from ..hub_access import locate_model, require_hub
    from ..sharing.hub import from_pretrained, push_to_hub
    from ..validation import parse_routings

    if "/" not in args.repo_id:
        fail(f"repo_id {args.repo_id!r} is not of the form owner/name")
    cases = parse_routings([args.method_spec], flag="--method") if args.method_spec else []
    stats = _read_json(args.stats_json, "--stats-json")
    results = _read_json(args.eval_json, "--eval-json")
    token = args.token or get_token()
    if not token:
        fail(f"push needs a Hugging Face token with write access: {LOGIN}")
    path, extra = locate_model(args.path)
    if not cases and _saved_routing(path) is False:
        fail(f"{args.path!r} was saved without a routing; pass --method METHOD[:key=value,...] to patch it before pushing")
    require_hub("push", "run it where the Hub can be reached (HF_ENDPOINT names another Hub)")
    from .common import quiet_bars

    quiet_bars()
    model = from_pretrained(path, **extra)
    if cases:
        from ..patching import patch

        patch(model, cases[0].method, **cases[0].options)
    tokenizer = None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, **extra)
    except (OSError, ValueError):
        import logging

        logging.getLogger("hf_moe_patch").info("no tokenizer in %s; pushing the model alone", args.path)
    if isinstance(stats, dict) and "summary" in stats:
        stats = stats["summary"]
    info = push_to_hub(
        model, args.repo_id, tokenizer, private=args.private, commit_message=args.commit_message,
        token=token, revision=args.revision, create_pr=args.create_pr, remote_code=args.remote_code,
        base_model=args.base_model, stats=stats, eval_results=results,
    )
    print(f"pushed {args.path} to {args.repo_id}: {getattr(info, 'commit_url', info)}")
    return 0
