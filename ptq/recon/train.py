"""AdaRound's training loop for one unit: learned rounding and LSQ step sizes (spec/adaround.md).

Each iteration is one forward and backward of the unit on a batch sampled from its cache
(``ptq.recon.unitcache``): reconstruction MSE against the float targets (``adaround.loss=fisher``:
weighted by the unit's Fisher weights) plus the rounding regularizer with an annealed beta, one
Adam step over the rounding variables and the activation steps. With ``adaround.qdrop_prob`` the
unit's activation quantizers pass a random part of their elements in float (QDrop). The step is
compiled once per unit class (``adaround.compile``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ptq.quant.quantizers import SCALE_EPS, ActQuantizer
from ptq.quant.rounding import AdaRoundQuantizer
from ptq.quant.vit import QLinear
from ptq.recon import partition
from ptq.recon.unitcache import Cached, Value, as_real, batches, precompute_norm

log = logging.getLogger(__name__)

CURVE_EVERY = 10
EVAL_BATCH = 256


def beta_at(step: int, iters: int, warm: int, start: float, end: float) -> float:
    """Linear anneal from ``start`` to ``end`` over the iterations after the warm-up."""
    rel = min(1.0, max(0.0, (step - warm) / max(1, iters - warm)))
    return end + (start - end) * (1.0 - rel)


@torch.no_grad()
def unit_loss(unit: nn.Module, inputs: Cached, targets: Cached, device: torch.device,
              fisher: Cached | None = None) -> float:
    """Reconstruction loss of the unit as it is now, on the first EVAL_BATCH cached images."""
    idx = torch.arange(min(EVAL_BATCH, len(inputs)))
    out = as_real(unit(inputs.take(idx, device)))
    weight = fisher.take_real(idx, device) if fisher is not None else None
    return recon_loss(out, targets.take_real(idx, device), weight).item()


def recon_loss(out: Tensor, target: Tensor, fisher: Tensor | None = None) -> Tensor:
    """Squared error summed over each sample's features, averaged over the batch (BRECQ).

    ``fisher``: per-element weights of the squared error (BRECQ's diagonal Fisher), or None.
    """
    err = (out - target).pow(2)
    if fisher is not None:
        err = err * fisher
    return err.flatten(1).sum(1).mean()


def unit_recon_loss(unit: nn.Module, x: Value, target: Tensor, beta: Tensor,
                    normed: Value | None = None, fisher: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One batch's reconstruction loss of the unit and its rounding regularizer at ``beta``.

    ``normed``: the unit's first LayerNorm of ``x``, precomputed (``unitcache.precompute_norm``);
    ``fisher``: the batch's Fisher weights (``unitcache.capture_fisher``) or None.
    """
    rec = recon_loss(as_real(unit(x) if normed is None else unit(x, normed)), target, fisher)
    reg = torch.zeros((), device=target.device)
    for m in unit.modules():
        if isinstance(m, AdaRoundQuantizer):
            reg = reg + m.regularizer(beta)
    return rec, reg


def unit_step_loss(unit: nn.Module, x: Value, target: Tensor, beta: Tensor, weight: Tensor,
                   normed: Value | None = None, fisher: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The training objective ``rec + weight * reg`` and its two parts.

    The sum is part of the compiled graph, so neither it nor its backward runs as eager ops
    between the graph and ``backward`` (``weight`` is 0 during the warm-up).
    """
    rec, reg = unit_recon_loss(unit, x, target, beta, normed, fisher)
    return rec + weight * reg, rec, reg


_compiled_loss: Any = None
RECOMPILE_LIMIT = 64  # graphs of unit_step_loss per process: a layer-granularity run needs ~6, each sweep job as many


def loss_function(cfg: Any) -> Any:
    """``unit_step_loss``, compiled once per process when ``adaround.compile``.

    Compiled, a block unit's forward+backward of the embedded default ran 1.6-2.2x faster
    on the CPU (one compilation per unit class, reused by every block). With the ivit
    backend the integer kernels are opaque custom ops inside the one compiled graph
    (``ptq.quant.nonlinear``); as graph breaks they had split an attention unit's step into
    five graphs (4.67 -> 3.79 ms per iteration when they became ops).

    The backward saves exp / erf / GELU / softmax results instead of recomputing them
    (``ptq.recon.partition``).

    Every unit class, shape and quantizer setting is one more compiled graph of this one
    function; past dynamo's recompile limit (8) it silently runs eagerly, which a multirun
    (jobs share the process) reached in its second job. The limit is raised to RECOMPILE_LIMIT.
    """
    global _compiled_loss
    if not getattr(cfg.adaround, "compile", False):
        return unit_step_loss
    dynamo_config = torch._dynamo.config
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    if _compiled_loss is None:
        partition.install()
        _compiled_loss = torch.compile(unit_step_loss, dynamic=False)
    return _compiled_loss


class FusedAdam:
    """Adam (betas 0.9/0.999, eps 1e-8, no weight decay) over parameter groups, one fused kernel call per group.

    The same update as ``torch.optim.Adam(groups, fused=True)`` (the same kernel, called the same
    way; tests/test_recon_speed.py checks it bit for bit) without its per-step bookkeeping in
    Python: measured here 0.24 ms of the step went to ``Adam.step`` and 0.03 ms to ``zero_grad``,
    a fifth of a layer unit's whole iteration. Parameters without a gradient are skipped, as Adam does.
    """

    BETAS, EPS = (0.9, 0.999), 1e-8

    def __init__(self, groups: list[dict[str, Any]]) -> None:
        self.groups = []
        for g in groups:
            params = list(g["params"])
            self.groups.append({
                "params": params, "lr": float(g["lr"]),
                "exp_avg": [torch.zeros_like(p) for p in params],
                "exp_avg_sq": [torch.zeros_like(p) for p in params],
                "step": [torch.zeros((), dtype=torch.float32, device=p.device) for p in params],
            })

    def zero_grad(self) -> None:
        for g in self.groups:
            for p in g["params"]:
                p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for g in self.groups:
            params = g["params"]
            grads = [p.grad for p in params]
            if all(gr is not None for gr in grads):  # the usual case: the group's lists as they are
                exp_avg, exp_avg_sq, steps = g["exp_avg"], g["exp_avg_sq"], g["step"]
            else:
                live = [i for i, gr in enumerate(grads) if gr is not None]
                if not live:
                    continue
                params, grads = [params[i] for i in live], [grads[i] for i in live]
                exp_avg, exp_avg_sq = [g["exp_avg"][i] for i in live], [g["exp_avg_sq"][i] for i in live]
                steps = [g["step"][i] for i in live]
            torch._foreach_add_(steps, 1)
            torch._fused_adam_(params, grads, exp_avg, exp_avg_sq, [], steps, amsgrad=False, lr=g["lr"],
                               beta1=self.BETAS[0], beta2=self.BETAS[1], weight_decay=0.0, eps=self.EPS,
                               maximize=False, grad_scale=None, found_inf=None)


def _adam(groups: list[dict[str, Any]]) -> FusedAdam | torch.optim.Optimizer:
    """One Adam over the rounding variables and the LSQ steps (per-parameter state, so the same as one
    optimizer each): :class:`FusedAdam` where this torch has the fused kernel, else ``torch.optim.Adam``."""
    if hasattr(torch, "_fused_adam_"):
        return FusedAdam(groups)
    return torch.optim.Adam(groups)


def train_unit(name: str, unit: nn.Module, inputs: Cached, targets: Cached, cfg: Any, device: torch.device,
               seed: int, on_iter: Callable[[int], None] | None = None,
               fisher: Cached | None = None) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """Learn the unit's rounding (and LSQ step sizes); leave it hard-rounded. Returns record and curve.

    ``on_iter(it)`` is called at the end of every iteration's body, early-stop check included
    (``ptq.bench`` times iterations by it); it sees nothing it could change, so training is the
    same with or without it. ``fisher``: the unit's Fisher weights (``adaround.loss=fisher``), which
    weight the training loss and the before/after check alike.
    """
    ada, lsq = cfg.adaround, cfg.lsq
    quantizers = [m.wq for m in unit.modules() if isinstance(m, QLinear) and isinstance(m.wq, AdaRoundQuantizer)]
    acts = [a for a in unit.modules() if isinstance(a, ActQuantizer) and a.mode == "quant"]
    steps = [a.scale for a in acts] if lsq.enabled else []
    dropped = [a for a in acts if not a.feeds_kernel] if ada.qdrop_prob > 0 else []
    t0 = time.perf_counter()
    loss_before = unit_loss(unit, inputs, targets, device, fisher)
    nearest = {k: v.detach().clone() for k, v in unit.state_dict().items()}  # untrained V = nearest rounding
    for q in quantizers:
        q.soft = True
        q.v.requires_grad_(True)
    for p in steps:
        p.requires_grad_(True)
    for a in dropped:
        a.qdrop = float(ada.qdrop_prob)
    groups = [{"params": [q.v for q in quantizers], "lr": ada.lr}]
    if steps:
        groups.append({"params": steps, "lr": lsq.lr})
    opt = _adam(groups)
    gen = torch.Generator().manual_seed(seed)
    normed = precompute_norm(unit, inputs, device)
    loss_fn = loss_function(cfg)
    warm = int(ada.warmup * ada.iters)
    curve: dict[str, list[float]] = {"step": [], "loss": [], "reg": [], "beta": []}
    early = False
    it = 0
    weights = (torch.zeros((), device=device), torch.tensor(float(ada.reg_weight), device=device))
    stream = batches(inputs, targets, normed, ada.batch_size, ada.iters, gen, device, fisher)
    bar = tqdm(range(ada.iters), desc=f"adaround {name}", leave=False)
    try:
        for it in bar:
            x, t, n, f = next(stream)
            beta = beta_at(it, ada.iters, warm, ada.beta_start, ada.beta_end)
            beta_t = torch.tensor(beta, device=device)
            weight = weights[it >= warm]
            try:
                loss, rec, reg = loss_fn(unit, x, t, beta_t, weight, n, f)
            except Exception as exc:  # a backend torch.compile cannot handle here: run eagerly
                if loss_fn is unit_step_loss:
                    raise
                log.warning("torch.compile failed for %s (%s); AdaRound continues eagerly", name, type(exc).__name__)
                loss_fn = unit_step_loss
                loss, rec, reg = loss_fn(unit, x, t, beta_t, weight, n, f)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if steps:
                with torch.no_grad():
                    torch._foreach_clamp_min_(steps, SCALE_EPS)
            if it % CURVE_EVERY == 0 or it == ada.iters - 1:
                r = reg.item()
                for k, val in zip(curve, (it, rec.item(), r, beta), strict=True):
                    curve[k].append(val)
                bar.set_postfix(loss=f"{curve['loss'][-1]:.4g}", reg=f"{r:.3g}", beta=f"{beta:.1f}", refresh=False)
            stop = bool(it >= warm and quantizers and reg.item() < ada.early_stop)
            if on_iter is not None:
                on_iter(it)
            if stop:
                early = True
                break
    finally:
        bar.close()
        for q in quantizers:
            q.soft = False
            q.v.requires_grad_(False)
        for p in steps:
            p.requires_grad_(False)
        for a in dropped:
            a.qdrop = 0.0
    loss_after = unit_loss(unit, inputs, targets, device, fisher)
    kept_nearest = not loss_after <= loss_before
    if kept_nearest:  # learned rounding (and steps) lost to nearest rounding on the check batch: keep nearest
        unit.load_state_dict(nearest)
        log.warning("unit %s: learned rounding loss %.4g > nearest %.4g; keeping nearest rounding",
                    name, loss_after, loss_before)
        loss_after = loss_before
    record = {
        "unit": name,
        "loss_before": loss_before,
        "loss_after": loss_after,
        "iters": it + 1,
        "early_stopped": early,
        "kept_nearest": kept_nearest,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return record, curve


@contextmanager
def flush_denormals() -> Iterator[None]:
    """Float denormals read as zero on the CPU while reconstructing.

    As rounding variables saturate, their sigmoid gradients and Adam moments sink into the
    denormal range, which x86 computes far slower: a 9,000-iteration attention unit of the
    embedded default took 36.4 s without and 28.3 s with flushing, to the same loss.
    """
    supported = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if supported:
            torch.set_flush_denormal(False)
