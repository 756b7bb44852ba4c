"""``"ssr"``: Selective Sinkhorn Routing (ROUTING.md section 3)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops import SequenceGrid, log_sinkhorn, plan_topk_gates
from .base import (
    Option,
    RouterCall,
    RouterOutput,
    RoutingMethod,
    StepState,
    data_dependent,
    int_in,
    one_of,
    real_in,
)


@dataclass
class SSR(RoutingMethod):
    """Balanced optimal-transport routing on a random share ``p`` of training forwards.

    In training, each model forward draws one coin (``per_layer=True``: one per MoE layer): with
    probability ``p`` the layer routes by the top-``k`` of the entropic transport plan between
    the valid tokens and equally loaded experts, with gates renormalised from the plan; otherwise
    it runs the native router. The model's auxiliary balancing loss is off while patched.
    At inference the native router runs, unless ``inference="sinkhorn"``.

    Args:
        p: probability of a Sinkhorn step, in [0, 1]; 1 is full Sinkhorn routing every step.
        epsilon: entropic regulariser; small (0.05-0.1) for softmax costs, 0.5-1 for logits.
        cost: ``"softmax"`` (SSR-S: the family's scores, softmax, or sigmoid for DeepSeek-V3) or
            ``"logits"`` (SSR-L: raw logits).
        max_iter, tol: iteration cap and row-marginal tolerance.
        detach: treat the plan as a constant (no gradient through the iterations).
        noise: standard deviation of Gaussian noise added to the cost (SSR-S with noise).
        per_layer: one coin per MoE layer instead of one per forward.
        inference: ``"topk"`` (native) or ``"sinkhorn"`` (the balanced plan in eval mode too).
        seed: seed of a dedicated coin/noise generator; None draws from torch's global RNG, so
            ``torch.manual_seed`` (or ``transformers.set_seed``) makes runs repeat. The generator
            starts at each ``patch``: patch once per run, not once per step (re-patching with the
            same seed would draw the same coin every step).
        scope: ``"batch"`` (the plan spans the micro-batch's valid tokens, as specified) or
            ``"sequence"`` (one plan per sequence, so batch-mates do not interact).
        rescale: on Sinkhorn steps, scale the gates (which sum to 1) to the sum the native router
            would give the same experts; only differs for routers that do not renormalise.

    Example:
        >>> import hf_moe_patch as hmp
        >>> hmp.patch(model, "ssr", p=0.01, seed=0)  # doctest: +SKIP
    """

    name = "ssr"
    OPTIONS = {
        "p": real_in(0.0, 1.0),
        # Below 1e-4, cost / epsilon overflows float32 for logit costs.
        "epsilon": real_in(1e-4, float("inf"), hi_open=True),
        "cost": one_of("softmax", "logits"),
        "max_iter": int_in(1, 100_000),
        "tol": real_in(0.0, float("inf"), lo_open=True, hi_open=True),
        "detach": one_of(True, False),
        "noise": real_in(0.0, float("inf"), hi_open=True),
        "per_layer": one_of(True, False),
        "inference": one_of("topk", "sinkhorn"),
        "seed": Option(
            lambda v, _: v is None or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63 - 1),
            "None or an integer in [0, 2**63 - 2]",
        ),
        "scope": one_of("batch", "sequence"),
        "rescale": one_of(True, False),
    }
    uses_empty_slots = True  # padding tokens get no expert on Sinkhorn steps
    disables_aux_loss = True

    p: float = 0.01
    epsilon: float = 0.05
    cost: str = "softmax"
    max_iter: int = 100
    tol: float = 1e-4
    detach: bool = False
    noise: float = 0.0
    per_layer: bool = False
    inference: str = "topk"
    seed: int | None = None
    scope: str = "batch"
    rescale: bool = False

    def __post_init__(self) -> None:
        # With a seed, coins and noise seeds come from separate streams, so that turning noise on
        # (or an evaluation forward in between) never shifts the training coins. Without one,
        # both draw from torch's global RNG, like dropout.
        self._generators: dict[str, torch.Generator] = {}

    def _rand(self, n: int, stream: str) -> torch.Tensor:
        if self.seed is None:
            return torch.rand(n)
        if stream not in self._generators:
            self._generators[stream] = torch.Generator().manual_seed(self.seed + (stream == "noise"))
        return torch.rand(n, generator=self._generators[stream])

    def prepare_step(self, step: StepState, num_layers: int) -> None:
        step.coins = None
        if step.training:
            step.coins = self._rand(num_layers if self.per_layer else 1, "coins") < self.p
        if self.noise > 0:
            step.seed = int(self._rand(1, "noise").item() * 2**31)

    def sinkhorn_now(self, call: RouterCall) -> bool:
        """Whether this call routes by the plan: a won coin in training, the option at inference."""
        step = call.step
        if not step.training:
            return self.inference == "sinkhorn"
        if step.coins is None:
            return False
        return bool(step.coins[call.layer if self.per_layer else 0])

    def routes_natively(self, training: bool) -> bool:
        return self.p == 0.0 if training else self.inference == "topk"

    def route(self, call: RouterCall) -> RouterOutput:
        if not self.sinkhorn_now(call):
            call.info["sinkhorn"] = False
            return call.native_forward(call.hidden_states)
        return _sinkhorn_route(self, call)


@data_dependent("ssr")
def _sinkhorn_route(method: SSR, call: RouterCall) -> RouterOutput:
    native = call.native
    logits = call.logits_fn(call.hidden_states)
    T, N = logits.shape
    grid = call.sequences(T)
    cost = native.scores(logits) if method.cost == "softmax" else logits.float()
    if method.noise > 0:
        gen = torch.Generator(device=cost.device).manual_seed((step_seed(call) * 1_000_003 + call.layer) % 2**63)
        cost = cost + method.noise * torch.randn(cost.shape, generator=gen, device=cost.device)
    if method.scope == "batch":
        grid = SequenceGrid.pooled(grid.token_valid)
    with torch.set_grad_enabled(torch.is_grad_enabled() and not method.detach):
        plan = log_sinkhorn(grid.to_grid(cost), grid.valid, epsilon=method.epsilon, max_iter=method.max_iter, tol=method.tol)
    weights, index = plan_topk_gates(grid.from_grid(plan.log_plan), native.top_k)
    if method.rescale and not native.renormalize:
        weights = weights * native.scores(logits).gather(1, index).sum(dim=-1, keepdim=True)
    row_valid = grid.token_valid.reshape(T, 1)
    index = index.masked_fill(~row_valid, N)
    weights = weights * row_valid
    call.info.update(sinkhorn=True, iterations=plan.iterations, row_error=plan.row_error)
    return logits, native.finish(weights, logits), index


def step_seed(call: RouterCall) -> int:
    """The per-forward noise seed (0 outside a model forward)."""
    return call.step.seed if call.step.seed is not None else 0
