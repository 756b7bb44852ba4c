"""Check that ``hf_moe_patch.dispatch.pair_dispatch`` gives what a reference version gives.

The reference is ``hf_moe_patch/dispatch.py`` at a git revision (``--rev``, default ``HEAD``;
the version before the speed-up is at ``--rev 689a42c``) or any copy of it (``--reference PATH``).
Random variable-k slot layouts (sentinel ``N`` and weight 0 on empty slots, tokens with no
expert, all slots empty, all slots real) go through every experts implementation of a small
OLMoE experts module, in float32 and bfloat16. Forward outputs must be bit-identical; input
and weight gradients must match to float rounding (summation order in backward may differ).

Run:
    python eval/benchmarks/check_dispatch_equivalence.py --cases 200
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _reference  # noqa: E402

from hf_moe_patch import dispatch as new

logger = logging.getLogger("check_dispatch")


def load_reference(path: str | None, rev: str = "HEAD"):
    """The reference module: ``path``, or ``hf_moe_patch/dispatch.py`` as in git ``rev``."""
    return _reference.load_reference("hf_moe_patch/dispatch.py", path, rev)


def experts_module(impl: str, num_experts: int, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    from hf_moe_patch.testing import tiny_config

    torch.manual_seed(0)
    config = tiny_config("olmoe", num_experts=num_experts, num_experts_per_tok=2, num_hidden_layers=1)
    model = AutoModelForCausalLM.from_config(config, experts_implementation=impl, dtype=dtype)
    return model.model.layers[0].mlp.experts


def random_slots(gen: torch.Generator, T: int, N: int, dtype: torch.dtype):
    """(T, k_max) indices/weights: each token takes a random number of distinct experts."""
    k_max = int(torch.randint(1, N + 1, (1,), generator=gen))
    mode = int(torch.randint(0, 4, (1,), generator=gen))
    if mode == 0:
        counts = torch.zeros(T, dtype=torch.long)  # no token has an expert
    elif mode == 1:
        counts = torch.full((T,), k_max)  # every slot real: passthrough
    else:
        counts = torch.randint(0, k_max + 1, (T,), generator=gen)
    order = torch.argsort(torch.rand(T, N, generator=gen), dim=1)[:, :k_max]
    real = torch.arange(k_max).unsqueeze(0) < counts.unsqueeze(1)
    index = order.masked_fill(~real, N)
    weights = (torch.rand(T, k_max, generator=gen) * real).to(dtype)
    return index, weights


def run(dispatch_module, experts, h, index, weights, N):
    experts.zero_grad(set_to_none=True)
    h = h.detach().clone().requires_grad_()
    w = weights.detach().clone().requires_grad_()
    out = dispatch_module.pair_dispatch(experts.forward, N)(h, index, w)
    if out.requires_grad:  # not when no token has an expert: the output is a constant 0
        out.float().square().sum().backward()
    grads = [h.grad, w.grad] + [p.grad for p in experts.parameters()]
    return out.detach(), grads


def _close(a: torch.Tensor | None, b: torch.Tensor | None, tol: dict) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return torch.allclose(a.float(), b.float(), **tol)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=100, help="random layouts per implementation and dtype")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference", help="path of the reference dispatch.py (default: the one at --rev)")
    parser.add_argument("--rev", default="HEAD", help="git revision of the reference when --reference is not given")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    ref = load_reference(args.reference, args.rev)
    gen = torch.Generator().manual_seed(args.seed)
    N, failures, total = 8, 0, 0
    for impl in ("eager", "batched_mm", "grouped_mm"):
        for dtype in (torch.float32, torch.bfloat16):
            experts = experts_module(impl, N, dtype)
            for i in range(args.cases):
                T = int(torch.randint(1, 50, (1,), generator=gen))
                h = torch.randn(T, experts.hidden_dim, generator=gen).to(dtype)
                index, weights = random_slots(gen, T, N, dtype)
                out_ref, g_ref = run(ref, experts, h, index, weights, N)
                out_new, g_new = run(new, experts, h, index, weights, N)
                total += 1
                same_out = torch.equal(out_ref, out_new)
                tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-2)
                same_grad = all(_close(a, b, tol) for a, b in zip(g_ref, g_new))
                if not (same_out and same_grad):
                    failures += 1
                    if failures <= 10:
                        logger.error("%s %s case %d: output equal %s, gradients close %s", impl, dtype, i, same_out, same_grad)
    logger.info("%d cases: %d mismatches", total, failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
