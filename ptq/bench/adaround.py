"""AdaRound iterations against one plain forward+backward of the same float unit.

The iteration time is taken inside ``ptq.recon.train.train_unit`` itself (its ``on_iter`` hook
stamps the end of every iteration), so what is timed is exactly what a run executes, compiled or not.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import time
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.vision_transformer import VisionTransformer
from tqdm.auto import tqdm

from ptq.bench.memory import bench_cache_memory
from ptq.bench.plans import Plan, calibrated
from ptq.bench.timing import _median, _sync, time_call
from ptq.config import AdaRoundConfig, LSQConfig
from ptq.quant.models import quantize_model
from ptq.quant.nonlinear import Backend
from ptq.quant.rounding import install_adaround
from ptq.quant.vit import QuantModel, QuantSettings
from ptq.recon import train as recon_train
from ptq.recon.train import recon_loss
from ptq.recon.unitcache import Cached, capture

log = logging.getLogger(__name__)


class _FloatAttn(nn.Module):
    """torchvision EncoderBlock's first half: ln_1 -> self_attention -> + residual."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.ln_1, self.self_attention = block.ln_1, block.self_attention

    def forward(self, x: Tensor) -> Tensor:
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        return x + y


class _FloatMLP(nn.Module):
    """torchvision EncoderBlock's second half: ln_2 -> mlp -> + residual."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.ln_2, self.mlp = block.ln_2, block.mlp

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(self.ln_2(x))


def float_units(block: nn.Module) -> dict[str, nn.Module]:
    """Trainable float copies of one torchvision EncoderBlock's units (same names as the quantized ones)."""
    blk = copy.deepcopy(block)
    mha = blk.self_attention
    qkv = nn.Linear(mha.embed_dim, 3 * mha.embed_dim)
    with torch.no_grad():
        qkv.weight.copy_(mha.in_proj_weight)
        qkv.bias.copy_(mha.in_proj_bias)
    units = {"layer_qkv": qkv, "layer_fc1": blk.mlp[0], "block_attn": _FloatAttn(blk),
             "block_mlp": _FloatMLP(blk), "encoder": blk}
    for u in units.values():
        u.requires_grad_(True)
    return units


def quant_units(q: QuantModel, b: int) -> dict[str, tuple[str, nn.Module]]:
    """The quantized units of block ``b`` by kind: (name as in units_of, module)."""
    blk = q.blocks[b]
    return {"layer_qkv": (f"blocks.{b}.attn.qkv", blk.attn.qkv), "layer_fc1": (f"blocks.{b}.mlp.fc1", blk.mlp.fc1),
            "block_attn": (f"blocks.{b}.attn", blk.attn), "block_mlp": (f"blocks.{b}.mlp", blk.mlp),
            "encoder": (f"blocks.{b}", blk)}


def _adaround_cfg(plan: Plan, backend: str, compile_step: bool = True) -> SimpleNamespace:
    """The run config ``train_unit`` reads: defaults (so the step is compiled, as in a run)
    but for iterations and batch size."""
    ada = AdaRoundConfig(iters=plan.ada_iters + 1, batch_size=plan.ada_batch, early_stop=0.0, compile=compile_step)
    return SimpleNamespace(adaround=ada, lsq=LSQConfig(enabled=True), nonlinear=SimpleNamespace(name=backend))


def time_adaround_iters(name: str, unit: nn.Module, inputs: Cached, targets: Cached, plan: Plan,
                        device: torch.device, seed: int, run_cfg: SimpleNamespace) -> tuple[list[float], float]:
    """Per-iteration seconds of ``train_unit`` on this unit (the first, compiling iteration left out) and
    the whole call's seconds.

    Consecutive end-of-iteration stamps bound exactly one execution of the loop body, so nothing
    of ``train_unit`` is re-implemented here; the ``plan.ada_iters + 1`` iterations give
    ``plan.ada_iters`` gaps.
    """
    stamps: list[float] = []

    def stamp(_it: int) -> None:
        _sync(device)
        stamps.append(time.perf_counter())

    total = time_call(lambda: recon_train.train_unit(name, unit, inputs, targets, run_cfg, device, seed,
                                                     on_iter=stamp), device)
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    if not gaps:
        raise RuntimeError(f"train_unit ran {len(stamps)} iteration(s) of {name}; timing needs at least two")
    return gaps, total


def time_float_steps(unit: nn.Module, x: Tensor, y: Tensor, n: int, device: torch.device) -> list[float]:
    """Seconds of ``n`` plain forward+backward passes (recon loss, weight gradients) of a float unit."""
    params = [p for p in unit.parameters() if p.requires_grad]

    def step() -> None:
        for p in params:
            p.grad = None
        recon_loss(unit(x), y).backward()

    step()  # warm-up
    return [time_call(step, device) for _ in range(n)]


def _bench_unit(kind: str, named: tuple[str, nn.Module], twin_unit: nn.Module, float_unit: nn.Module, q: QuantModel,
                twin: QuantModel, imgs: Tensor, plan: Plan, device: torch.device,
                run_cfg: SimpleNamespace) -> dict[str, Any]:
    """Median AdaRound iteration and float forward+backward seconds of one unit, over ``plan.ada_repeats``."""
    name, unit = named
    inputs = capture(q, unit, imgs, device, "input", plan.calib_batch)
    targets = capture(twin, twin_unit, imgs, device, "output", plan.calib_batch)
    idx = torch.arange(plan.ada_batch)
    x, y = inputs.take_real(idx, device), targets.take_real(idx, device)
    ada_med: list[float] = []
    flt_med: list[float] = []
    totals: list[float] = []
    for r in range(plan.ada_repeats):
        gaps, total = time_adaround_iters(name, unit, inputs, targets, plan, device, seed=r, run_cfg=run_cfg)
        flt = time_float_steps(float_unit, x, y, plan.ada_iters, device)
        ada_med.append(_median(gaps))
        flt_med.append(_median(flt))
        totals.append(total)
    res = {
        "unit": name, "adaround_iter_s": _median(ada_med), "float_fwd_bwd_s": _median(flt_med),
        "ratio": _median([a / f for a, f in zip(ada_med, flt_med, strict=True)]),
        "adaround_iter_s_per_repeat": ada_med, "float_fwd_bwd_s_per_repeat": flt_med,
        "train_unit_call_s": totals,
    }
    log.info("adaround %s (%s): %.2f ms/iter vs float fwd+bwd %.2f ms -> %.2fx", kind, name,
             1e3 * res["adaround_iter_s"], 1e3 * res["float_fwd_bwd_s"], res["ratio"])
    return res


def bench_adaround(model: VisionTransformer, calib: Tensor, plan: Plan, device: torch.device,
                   backend: str, compile_step: bool = True, measure_memory: bool = True) -> dict[str, Any]:
    """AdaRound iteration vs float forward+backward for layer, block and encoder units of the middle block
    (and the unit caches' memory, which does not depend on the backend, when ``measure_memory``)."""
    st = QuantSettings(wbits=4, abits=8, backend=Backend(backend))
    q = calibrated(model, st, calib, plan.calib_batch, device)
    install_adaround(q)
    q.to(device)
    twin = quantize_model(model, QuantSettings(wbits=None, abits=None)).to(device)
    twin.set_mode("off")
    b = len(q.blocks) // 2
    qu, tu = quant_units(q, b), quant_units(twin, b)
    fu = {k: u.to(device) for k, u in float_units(model.encoder.layers[b]).items()}
    imgs = calib[:plan.ada_cache_images]
    if imgs.shape[0] < plan.ada_batch:
        imgs = imgs.repeat(math.ceil(plan.ada_batch / imgs.shape[0]), 1, 1, 1)[:max(plan.ada_batch, imgs.shape[0])]
    out: dict[str, Any] = {
        "settings": f"W4A8 {backend}, LSQ, {'compiled' if compile_step else 'eager'}", "block": b, "batch": plan.ada_batch, "iters": plan.ada_iters,
        "repeats": plan.ada_repeats, "cache_images": imgs.shape[0], "units": {},
    }
    for kind in tqdm(qu, desc="adaround units", leave=False):
        with recon_train.flush_denormals():  # as reconstruct_model runs it
            out["units"][kind] = _bench_unit(kind, qu[kind], tu[kind][1], fu[kind], q, twin, imgs, plan, device,
                                             _adaround_cfg(plan, backend, compile_step))
    if measure_memory:
        t0 = time.perf_counter()
        out["memory"] = bench_cache_memory(q, twin, calib, plan, device)
        log.info("cache memory measured in %.1fs", time.perf_counter() - t0)
    return out
