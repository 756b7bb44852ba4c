"""Check that ``hf_moe_patch.ops.selection`` selects exactly what a reference implementation does.

The reference is ``hf_moe_patch/ops/selection.py`` at a git revision (``--rev``, default
``HEAD``) or any copy of it (``--reference PATH``). The stable-sort implementation the
threshold rewrite replaced is at ``--rev 689a42c``; compare with it using
``--skip-min-experts``, since commit 661242a also changed, on purpose, which of several tied
cells the ``min_experts`` floor takes (now the lower expert index, as documented). Inputs
cover heavy ties (quantised scores), padding, empty sequences, fractional budgets, the
``min_experts`` floor, a DeepSeek-style choice-bias key, batch-pooled scope and expert choice.

Run:
    python eval/benchmarks/check_selection_equivalence.py --cases 3000
    python eval/benchmarks/check_selection_equivalence.py --cases 3000 --rev 689a42c --skip-min-experts
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _reference  # noqa: E402

from hf_moe_patch.ops import selection as new

logger = logging.getLogger("check_selection")


def load_reference(path: str | None, rev: str = "HEAD"):
    """The reference module: ``path``, or ``hf_moe_patch/ops/selection.py`` as in git ``rev``."""
    return _reference.load_reference("hf_moe_patch/ops/selection.py", path, rev)


def random_case(gen: torch.Generator, with_min_experts: bool = True):
    """A random (key, valid, budget, min_experts) with ties and padding in many forms."""
    B = int(torch.randint(1, 5, (1,), generator=gen))
    L = int(torch.randint(1, 40, (1,), generator=gen))
    if bool(torch.rand(1, generator=gen) < 0.05):
        L = int(torch.randint(200, 600, (1,), generator=gen))  # some long sequences
    N = [2, 3, 4, 8, 16, 60, 64][int(torch.randint(0, 7, (1,), generator=gen))]
    kind = int(torch.randint(0, 5, (1,), generator=gen))
    if kind == 0:  # continuous scores, no ties
        key = torch.rand(B, L, N, generator=gen)
    elif kind == 1:  # heavy ties: few distinct levels
        key = torch.randint(0, 3, (B, L, N), generator=gen).float() / 4
    elif kind == 2:  # all equal: pure position tie-breaking
        key = torch.full((B, L, N), 0.25)
    elif kind == 3:  # softmax/unified-like scores quantised to float16 (ties across tokens)
        key = torch.softmax(torch.randn(B, L, N, generator=gen) * 2, dim=-1).half().float()
    else:  # DeepSeek-style: score plus a per-expert choice bias, some negative keys
        bias = (torch.randint(-2, 3, (N,), generator=gen).float()) * 0.01
        key = torch.sigmoid(torch.randn(B, L, N, generator=gen)).half().float() * (2 / N) + bias
    if bool(torch.rand(1, generator=gen) < 0.5):
        valid = torch.rand(B, L, generator=gen) > 0.3
        if bool(torch.rand(1, generator=gen) < 0.3):
            valid[0] = False  # an all-padding sequence
    else:
        valid = None
    budget = float(torch.rand(1, generator=gen) * N)
    budget = max(budget, 0.01)
    if bool(torch.rand(1, generator=gen) < 0.3):
        budget = float(int(budget) or 1)
    min_experts = 0
    if bool(torch.rand(1, generator=gen) < 0.3):
        min_experts = int(torch.randint(0, min(N, 4) + 1, (1,), generator=gen))
    if not with_min_experts:
        min_experts = 0
    return key, valid, budget, min_experts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=2000, help="random cases (default 2000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference", help="path of the reference selection.py (default: the one at --rev)")
    parser.add_argument("--rev", default="HEAD", help="git revision of the reference when --reference is not given")
    parser.add_argument(
        "--skip-min-experts", action="store_true",
        help="leave min_experts out (to compare across commit 661242a, which changed how the floor breaks ties)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    ref = load_reference(args.reference, args.rev)
    gen = torch.Generator().manual_seed(args.seed)
    failures = 0
    for i in range(args.cases):
        key, valid, budget, m = random_case(gen, with_min_experts=not args.skip_min_experts)
        B, L, N = key.shape
        pooled_key = key.reshape(1, B * L, N)  # scope="batch": one budget over the whole batch
        pooled_valid = None if valid is None else valid.reshape(1, B * L)
        checks = {
            "budget_select": lambda ops: ops.budget_select(key, valid, budget, min_experts=m),
            "budget_select/batch": lambda ops: ops.budget_select(pooled_key, pooled_valid, budget, min_experts=m),
            "expert_choice_select": lambda ops: ops.expert_choice_select(key, valid, budget),
        }
        for name, select in checks.items():
            if not torch.equal(select(ref), select(new)):
                failures += 1
                if failures <= 10:  # enough to debug; the count below says how many
                    logger.error(
                        "case %d %s differs: shape %s budget %s min_experts %d", i, name, tuple(key.shape), budget, m
                    )
    logger.info("%d cases x 3 selections: %d mismatches", args.cases, failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
