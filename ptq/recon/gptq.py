"""GPTQ (Frantar et al., 2023) on the per-channel absmax grid: the ``wquant=gptq`` reconstruction stage.

Each linear of the ``QuantModel`` in forward order: its input Gram matrix ``H = X^T X / N`` over the
calibration images is accumulated from the quantized model (earlier linears already hold their GPTQ
codes: sequential GPTQ, ``ptq.recon.unitcache.capture_gram``; the batches are carried part by part
through ``embed``, ``blocks`` and ``head``, :func:`reconstruct_model`), then :func:`gptq_codes` picks the
integer codes column by column, feeding each column's rounding error forward to the columns not yet
quantized through the Cholesky factor of ``H^-1``. The grid is the absmax one of nearest rounding
(``ptq.quant.quantizers.absmax_scale``, clamped to the same signed range); the codes go into a
``CodeQuantizer``, which the integer program, the QDQ export and ``quant_state.pt`` read as they read
any weight quantizer. Exact definitions: docs/gptq.md.

With ``adaround.init=gptq`` the same pass (:func:`sequential`) gives AdaRound its start instead: each
linear gets an ``AdaRoundQuantizer`` starting at GPTQ's compensated weights (:func:`install_rounding`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ptq.data.build import loader, subset
from ptq.quant.qtensor import qrange
from ptq.quant.quantizers import CodeQuantizer, WeightQuantizer, channel_view
from ptq.quant.rounding import AdaRoundQuantizer
from ptq.quant.vit import QLinear, QuantModel
from ptq.recon.unitcache import capture_gram

log = logging.getLogger(__name__)

DAMP_RETRIES = 4  # a Hessian that is not positive definite after damping: retry with 10x the damping


def _inverse_factor(h: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) * I)^-1`` (``U^T U`` is that inverse)."""
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    mean = h.diagonal().mean()
    for attempt in range(DAMP_RETRIES + 1):
        lower, info = torch.linalg.cholesky_ex(h + eye * (damp * 10.0 ** attempt * mean))
        if int(info) == 0:
            if attempt:
                log.warning("GPTQ: Hessian needed damping %.3g (not %.3g) to be positive definite",
                            damp * 10.0 ** attempt, damp)
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
    raise FloatingPointError(f"GPTQ: Hessian is not positive definite even at damping {damp * 10.0 ** DAMP_RETRIES:g}")


@torch.no_grad()
def gptq_codes(w_s: Tensor, h: Tensor, bits: int, damp: float = 0.01, block_size: int = 128,
               act_order: bool = False) -> Tensor:
    """Integer codes of ``w_s = W / s`` (weights in units of their row's step) minimising ``||X (W - s Q)^T||``.

    The codes of :func:`gptq_solve`; see there.
    """
    return gptq_solve(w_s, h, bits, damp, block_size, act_order)[0]


@torch.no_grad()
def gptq_solve(w_s: Tensor, h: Tensor, bits: int, damp: float = 0.01, block_size: int = 128,
               act_order: bool = False) -> tuple[Tensor, Tensor]:
    """GPTQ's ``(codes, compensated)`` for ``w_s = W / s``: the integer codes, and each column as it was
    when it was rounded (``w_s`` plus the error fed forward from the columns before it; ``codes`` is its
    nearest rounding, clamped). ``compensated`` is AdaRound's start with ``adaround.init=gptq``.

    ``h`` is the input Gram matrix ``X^T X / N`` ([in, in]). Columns whose input is always zero
    (``H_jj = 0``) get code 0 and no Hessian. Column ``j`` (in ``diag(H)``-descending order when
    ``act_order``) is rounded to the nearest code in ``qrange(bits)``; its error ``(w_j - q_j) / U_jj``
    times row ``j`` of ``U`` is subtracted from the later columns, inside a block of ``block_size``
    columns at once and from the columns after the block in one matrix product when it ends (the same
    result for any block size, up to float64 rounding). All rows at once; float64 throughout.
    """
    lo, hi = qrange(bits)
    w = w_s.detach().double().clone()
    h = h.detach().double().clone()
    n = w.shape[1]
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(n, device=w.device)
    w, h = w[:, perm], h[perm][:, perm]
    u = _inverse_factor(h, damp)
    q = torch.zeros_like(w)
    seen = torch.zeros_like(w)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        err = torch.zeros_like(w1)
        for j in range(i2 - i1):
            seen[:, i1 + j] = w1[:, j]
            q[:, i1 + j] = torch.clamp(torch.round(w1[:, j]), lo, hi)
            err[:, j] = (w1[:, j] - q[:, i1 + j]) / u1[j, j]
            w1[:, j:] -= err[:, j:j + 1] * u1[j:j + 1, j:]
        w[:, i2:] -= err @ u[i1:i2, i2:]
    out, start = torch.empty_like(q), torch.empty_like(seen)
    out[:, perm], start[:, perm] = q, seen
    return out.to(w_s.dtype), start.to(w_s.dtype)


def output_error(weight: Tensor, codes: Tensor, scale: Tensor, h: Tensor) -> float:
    """``||X (W - s Q)^T||^2 / N`` from the Gram matrix: ``trace(D H D^T)``, ``D = W - s Q``."""
    d = weight.double() - codes.double() * channel_view(scale, weight).double()
    return float(((d @ h.double()) * d).sum())


def _forward_order(unit: nn.Module, x: Any) -> list[QLinear]:
    """The quantized linears of ``unit`` in the order its forward calls them (one run on ``x``)."""
    order: list[QLinear] = []
    hooks = [lin.register_forward_pre_hook(lambda mod, args: order.append(mod) if mod not in order else None)
             for lin in unit.modules() if isinstance(lin, QLinear) and lin.wq is not None]
    try:
        unit(x)
    finally:
        for h in hooks:
            h.remove()
    return order


#: ``install(lin, codes, start)``: put a weight quantizer holding GPTQ's choice for ``lin`` in place
Install = Callable[[QLinear, Tensor, Tensor], None]


def install_codes(lin: QLinear, codes: Tensor, start: Tensor) -> None:
    """``wquant=gptq``: the codes themselves, in a :class:`CodeQuantizer`."""
    lin.wq = CodeQuantizer(lin.weight, lin.wq.bits, codes).to(lin.weight.device)


def install_rounding(lin: QLinear, codes: Tensor, start: Tensor) -> None:
    """``adaround.init=gptq``: an AdaRound quantizer whose V starts at GPTQ's compensated weights.

    Its floor is ``floor(start)`` and ``h(V)`` the fractional part of ``start``, so its hard rounding
    before training is GPTQ's codes (ties aside) and training chooses between the two codes around
    each compensated weight.
    """
    lin.wq = AdaRoundQuantizer(lin.weight, lin.wq.bits, start=start).to(lin.weight.device)


@torch.no_grad()
def sequential(qmodel: QuantModel, xs: list[Any], g: Any, device: torch.device, install: Install,
               on_unit: Callable[[int, int, str], None] | None = None) -> list[dict[str, Any]]:
    """GPTQ every linear of ``qmodel`` in forward order on the input batches ``xs``; the per-linear records.

    The batches are carried through the model's chain (``embed``, each of ``blocks``, ``head``:
    ``QuantModel.forward``) one part at a time: a part's linears get their Gram matrices from the
    part's cached inputs, each after the linears before it hold their new quantizers (``install``), and
    the part's outputs with all of them in place are the next part's inputs. Every part runs once per
    linear it holds (stopped at that linear) plus once in full, instead of the whole model up to each
    linear.

    Each record: the relative output error ``||X (W - sQ)^T||^2 / ||X W^T||^2`` of GPTQ's codes and of
    nearest rounding's, and its seconds.
    """
    parts = [qmodel.embed, *qmodel.blocks, qmodel.head]
    total = sum(1 for lin in qmodel.linears() if lin.wq is not None)
    records: list[dict[str, Any]] = []
    bar = tqdm(total=total, desc="gptq", unit="linear", leave=False)
    for part in parts:
        for lin in _forward_order(part, xs[0]):
            t0 = time.perf_counter()
            h = capture_gram(part, lin, xs)
            records.append(_quantize_linear(lin, h, g, device, time.perf_counter() - t0, install))
            bar.update()
            log.info("gptq %d/%d %s: relative output error %.4g (nearest %.4g)", len(records), total, lin.name,
                     records[-1]["err_gptq"], records[-1]["err_nearest"])
            if on_unit is not None:
                on_unit(len(records), total, lin.name)
        if part is not parts[-1]:
            xs = [part(x) for x in xs]
    bar.close()
    return records


@torch.no_grad()
def reconstruct_model(cfg: Any, qmodel: QuantModel, calib_source: Any, device: torch.device, metrics: dict[str, Any],
                      on_unit: Callable[[int, int, str], None] | None = None) -> None:
    """``wquant=gptq``: replace every weight quantizer of ``qmodel`` by GPTQ codes (:func:`sequential`).

    ``metrics["gptq_layers"]``: the per-linear records.
    """
    g = cfg.gptq
    qmodel.to(device)
    calib = subset(calib_source, g.calib_images, int(cfg.seed) + 1)  # AdaRound's calibration images
    xs: list[Any] = [x.to(device) for x, _ in loader(calib, cfg.data.batch_size, cfg.data.num_workers, device)]
    metrics["gptq_layers"] = sequential(qmodel, xs, g, device, install_codes, on_unit)


def _quantize_linear(lin: QLinear, h: Tensor, g: Any, device: torch.device, capture_s: float,
                     install: Install) -> dict[str, Any]:
    """GPTQ's choice for ``lin`` from its Gram matrix ``h``, installed by ``install``; its record."""
    t0 = time.perf_counter()
    nearest = WeightQuantizer(lin.weight, lin.wq.bits).to(device)
    w_s = lin.weight.detach() / channel_view(nearest.scale, lin.weight)
    codes, start = gptq_solve(w_s, h, lin.wq.bits, float(g.damp), int(g.block_size), bool(g.act_order))
    install(lin, codes, start)
    ref = max(float(((lin.weight.double() @ h) * lin.weight.double()).sum()), 1e-30)
    return {"name": lin.name, "err_gptq": output_error(lin.weight, codes, nearest.scale, h) / ref,
            "err_nearest": output_error(lin.weight, nearest(lin.weight), nearest.scale, h) / ref,
            "seconds": round(capture_s + time.perf_counter() - t0, 3)}
