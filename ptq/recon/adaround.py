"""AdaRound reconstruction with LSQ-learned activation step sizes (spec/adaround.md).

Units run in network order. For each unit, the quantized model (earlier
units already hard-rounded) gives the unit's inputs and the float twin gives
its targets, both over the calibration images, computed once and cached on
the host; each iteration is then one forward and backward of the unit on a
sampled batch (BRECQ's loop).

Memory plan: caches live on the host and batches move to the device.
Integer inputs of at most 16 bits are stored as int16 (exact: the residual
stream is INT16, LN/attention outputs INT8), float tensors as float32, or
float16 once a cache passes 1 GiB. For vit_b_16 at block granularity with
1024 images one cache is 1024 x 197 x 768 values: 310 MB of int16 inputs
plus 620 MB of float32 targets (0.93 GB; ptq.bench measures 2.3 GB peak
while capturing), instead of 1.24 GB with float32 inputs.

Resume: after each unit the run dir holds ``recon_checkpoint.pt`` (model
state, per-unit records, curves) and ``<cache_dir>/recon/<key>.json`` points
to it, keyed by everything that determines the result; re-running the same
command loads it and continues after the last finished unit. Batch sampling
is seeded per unit, so a resumed run ends with the same model as an
uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ptq.atomic import atomic_path
from ptq.cache import spec_key
from ptq.quant.qtensor import QTensor, qrange
from ptq.quant.quantizers import SCALE_EPS, ActQuantizer, WeightQuantizer, channel_view
from ptq.quant.vit import QLinear, QuantSettings, QuantViT
from ptq.recon.plots import plot_reconstruction

log = logging.getLogger(__name__)

ZETA, GAMMA = 1.1, -0.1
FLOAT16_ABOVE_BYTES = 1 << 30
CURVE_EVERY = 10
EVAL_BATCH = 256
RECON_PLOT = "recon.png"  # in the run dir: curves and per-unit losses (ptq.recon.plots)

Value = QTensor | Tensor


class AdaRoundQuantizer(WeightQuantizer):
    """Per-channel absmax grid with learned rounding: W_int = clamp(floor(W/s) + h(V)).

    ``soft=True`` while training (h in [0, 1]); otherwise hard rounding
    ``h(V) >= 0.5``. Untrained, V starts where h(V) is the fractional part,
    so the hard weights are nearest rounding.
    """

    def __init__(self, weight: Tensor, bits: int) -> None:
        super().__init__(weight, bits)
        w_s = weight.detach() / channel_view(self.scale, weight)
        floor = torch.floor(w_s)
        self.register_buffer("w_floor", floor)
        frac = (w_s - floor).clamp(0.0, 1.0)
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1.0), requires_grad=False)
        self.soft = False

    @property
    def integer(self) -> bool:
        return not self.soft

    def h(self) -> Tensor:
        """Rectified sigmoid: the soft rounding offset in [0, 1]."""
        return torch.clamp(torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def rounding(self) -> Tensor:
        """Hard rounding decisions (0 or 1)."""
        return (self.h() >= 0.5).to(self.w_floor.dtype)

    def forward(self, weight: Tensor) -> Tensor:
        lo, hi = qrange(self.bits)
        offset = self.h() if self.soft else self.rounding()
        return torch.clamp(self.w_floor + offset, lo, hi)

    def regularizer(self, beta: float) -> Tensor:
        """sum(1 - |2h - 1|^beta): zero exactly when every h is 0 or 1."""
        return (1.0 - (2.0 * self.h() - 1.0).abs().pow(beta)).sum()


def install_adaround(qmodel: QuantViT) -> list[AdaRoundQuantizer]:
    """Replace every weight quantizer by an AdaRound one on the same grid (hard = nearest until trained)."""
    out = []
    for lin in qmodel.linears():
        if lin.wq is not None and not isinstance(lin.wq, AdaRoundQuantizer):
            lin.wq = AdaRoundQuantizer(lin.weight, lin.wq.bits).to(lin.weight.device)
        if lin.wq is not None:
            out.append(lin.wq)
    return out


def units_of(qmodel: nn.Module, granularity: str) -> list[tuple[str, nn.Module]]:
    """Reconstruction units in network order (spec/adaround.md)."""
    if granularity == "model":
        return [("model", qmodel)]
    if granularity == "layer":
        return [(n, m) for n, m in qmodel.named_modules() if isinstance(m, QLinear)]
    inner: list[tuple[str, nn.Module]] = []
    for i, blk in enumerate(qmodel.blocks):
        if granularity == "block":
            inner += [(f"blocks.{i}.attn", blk.attn), (f"blocks.{i}.mlp", blk.mlp)]
        elif granularity == "encoder":
            inner.append((f"blocks.{i}", blk))
        else:
            raise ValueError(f"granularity {granularity!r} is not one of layer, block, encoder, model")
    return [("embed", qmodel.embed), *inner, ("head", qmodel.head)]


def as_real(x: Value) -> Tensor:
    return x.real() if isinstance(x, QTensor) else x


@dataclass
class Cached:
    """A unit's inputs or targets over the calibration set, on the host."""

    v: Tensor
    s: Tensor | None = None
    bits: int | None = None
    signed: bool = True
    qtensor: bool = False  # the unit takes a QTensor (a float one where s is None), not a plain tensor

    @staticmethod
    def pack(items: list[Value]) -> Cached:
        first = items[0]
        if isinstance(first, QTensor) and first.integer and first.bits <= 16:
            v = torch.cat([it.v.detach().round().to(torch.int16).cpu() for it in items])
            return Cached(v, first.s.detach().cpu(), first.bits, first.signed, qtensor=True)
        reals = [as_real(it).detach().float().cpu() for it in items]
        total = sum(r.numel() for r in reals) * 4
        v = torch.cat(reals)
        if total > FLOAT16_ABOVE_BYTES:
            v = v.half()
        return Cached(v, qtensor=isinstance(first, QTensor))

    def __len__(self) -> int:
        return self.v.shape[0]

    def take(self, idx: Tensor, device: torch.device) -> Value:
        v = self.v[idx].to(device, non_blocking=True).float()
        if self.s is None:
            return QTensor.from_float(v) if self.qtensor else v
        return QTensor(v, self.s.to(device), self.bits, self.signed)

    def take_real(self, idx: Tensor, device: torch.device) -> Tensor:
        return as_real(self.take(idx, device))


class _Stop(Exception):
    """Raised by a capture hook: nothing after the unit needs computing."""


@torch.no_grad()
def capture(model: nn.Module, unit: nn.Module, images: Tensor, device: torch.device, which: str,
            batch_size: int) -> Cached:
    """The unit's input (``which='input'``) or output over ``images``, running the model only up to the unit."""
    got: list[Value] = []

    def hook(mod: nn.Module, args: tuple, output: Any) -> None:
        got.append(args[0] if which == "input" else output)
        raise _Stop

    handle = unit.register_forward_hook(hook)
    try:
        for start in range(0, images.shape[0], batch_size):
            try:
                model(images[start:start + batch_size].to(device))
            except _Stop:
                pass
    finally:
        handle.remove()
    return Cached.pack(got)


def beta_at(step: int, iters: int, warm: int, start: float, end: float) -> float:
    """Linear anneal from ``start`` to ``end`` over the iterations after the warm-up."""
    rel = min(1.0, max(0.0, (step - warm) / max(1, iters - warm)))
    return end + (start - end) * (1.0 - rel)


@torch.no_grad()
def unit_loss(unit: nn.Module, inputs: Cached, targets: Cached, device: torch.device) -> float:
    """Reconstruction loss of the unit as it is now, on the first EVAL_BATCH cached images."""
    idx = torch.arange(min(EVAL_BATCH, len(inputs)))
    out = as_real(unit(inputs.take(idx, device)))
    return recon_loss(out, targets.take_real(idx, device)).item()


def recon_loss(out: Tensor, target: Tensor) -> Tensor:
    """Squared error summed over each sample's features, averaged over the batch (BRECQ)."""
    return (out - target).pow(2).flatten(1).sum(1).mean()


def unit_recon_loss(unit: nn.Module, x: Value, target: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """One batch's reconstruction loss of the unit and its rounding regularizer at ``beta``."""
    rec = recon_loss(as_real(unit(x)), target)
    reg = torch.zeros((), device=target.device)
    for m in unit.modules():
        if isinstance(m, AdaRoundQuantizer):
            reg = reg + m.regularizer(beta)
    return rec, reg


_compiled_loss: Any = None
RECOMPILE_LIMIT = 64  # graphs of unit_recon_loss per process: a layer-granularity run needs ~6, each sweep job as many


def loss_function(cfg: Any) -> Any:
    """``unit_recon_loss``, compiled once per process when ``adaround.compile``.

    Compiled, a block unit's forward+backward of the embedded default ran 1.6-2.2x faster
    on the CPU (one compilation per unit class, reused by every block). With the ivit
    backend the integer kernels stay eager calls inside the compiled step
    (``ptq.quant.nonlinear``): an attention unit's iteration went from 7.7 to 4.7 ms.

    Every unit class, shape and quantizer setting is one more compiled graph of this one
    function; past dynamo's recompile limit (8) it silently runs eagerly, which a multirun
    (jobs share the process) reached in its second job. The limit is raised to RECOMPILE_LIMIT.
    """
    global _compiled_loss
    if not getattr(cfg.adaround, "compile", False):
        return unit_recon_loss
    dynamo_config = torch._dynamo.config
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    if _compiled_loss is None:
        _compiled_loss = torch.compile(unit_recon_loss, dynamic=False)
    return _compiled_loss


def _adam(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """One Adam over the rounding variables and the LSQ steps (per-parameter state, so the same as
    one optimizer each); the fused kernel where this torch has it (2.6x faster steps measured here)."""
    try:
        return torch.optim.Adam(groups, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(groups)


def train_unit(name: str, unit: nn.Module, inputs: Cached, targets: Cached, cfg: Any, device: torch.device,
               seed: int) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """Learn the unit's rounding (and LSQ step sizes); leave it hard-rounded. Returns record and curve."""
    ada, lsq = cfg.adaround, cfg.lsq
    quantizers = [m.wq for m in unit.modules() if isinstance(m, QLinear) and isinstance(m.wq, AdaRoundQuantizer)]
    steps = [a.scale for a in unit.modules() if isinstance(a, ActQuantizer) and a.mode == "quant"] if lsq.enabled else []
    t0 = time.perf_counter()
    loss_before = unit_loss(unit, inputs, targets, device)
    nearest = {k: v.detach().clone() for k, v in unit.state_dict().items()}  # untrained V = nearest rounding
    for q in quantizers:
        q.soft = True
        q.v.requires_grad_(True)
    for p in steps:
        p.requires_grad_(True)
    groups = [{"params": [q.v for q in quantizers], "lr": ada.lr}]
    if steps:
        groups.append({"params": steps, "lr": lsq.lr})
    opt = _adam(groups)
    gen = torch.Generator().manual_seed(seed)
    loss_fn = loss_function(cfg)
    warm = int(ada.warmup * ada.iters)
    curve: dict[str, list[float]] = {"step": [], "loss": [], "reg": [], "beta": []}
    early = False
    it = 0
    bar = tqdm(range(ada.iters), desc=f"adaround {name}", leave=False)
    try:
        for it in bar:
            idx = torch.randint(len(inputs), (ada.batch_size,), generator=gen)
            x, t = inputs.take(idx, device), targets.take_real(idx, device)
            beta = beta_at(it, ada.iters, warm, ada.beta_start, ada.beta_end)
            beta_t = torch.tensor(beta, device=device)
            try:
                rec, reg = loss_fn(unit, x, t, beta_t)
            except Exception as exc:  # a backend torch.compile cannot handle here: run eagerly
                if loss_fn is unit_recon_loss:
                    raise
                log.warning("torch.compile failed for %s (%s); AdaRound continues eagerly", name, type(exc).__name__)
                loss_fn = unit_recon_loss
                rec, reg = loss_fn(unit, x, t, beta_t)
            loss = rec + (ada.reg_weight * reg if it >= warm else 0.0)
            opt.zero_grad(set_to_none=True)
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
            if it >= warm and quantizers and reg.item() < ada.early_stop:
                early = True
                break
    finally:
        bar.close()
        for q in quantizers:
            q.soft = False
            q.v.requires_grad_(False)
        for p in steps:
            p.requires_grad_(False)
    loss_after = unit_loss(unit, inputs, targets, device)
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


def resume_key(cfg: Any) -> str:
    """Hash of everything that determines the reconstructed model."""
    from ptq.pipeline import data_identity, model_identity, row_of

    return spec_key({
        "row": row_of(cfg), "model": model_identity(cfg), "data": data_identity(cfg), "seed": int(cfg.seed),
        "aquant": {k: cfg.aquant[k] for k in ("momentum", "calib_images", "calib_batch_size", "quant_io")},
        "adaround": dict(cfg.adaround), "lsq": dict(cfg.lsq),
    })


def _atomic_save(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _load_resume(index: Path, qmodel: QuantViT) -> dict[str, Any] | None:
    if not index.exists():
        return None
    try:
        ckpt_path = Path(json.loads(index.read_text())["checkpoint"])
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        qmodel.load_state_dict(ckpt["state"])
    except Exception as exc:
        log.warning("cannot resume from %s (%s); reconstructing from the start", index, exc)
        return None
    log.info("resuming AdaRound after unit %d from %s", ckpt["done"], ckpt_path)
    return ckpt


def reconstruct_model(cfg: Any, qmodel: QuantViT, fp_model: nn.Module, calib_source: Any, device: torch.device,
                      run_dir: Path, metrics: dict[str, Any]) -> None:
    """AdaRound every unit of ``qmodel`` in network order; records go into ``metrics``."""
    from ptq.data.build import loader, subset

    install_adaround(qmodel)
    qmodel.to(device)
    twin = QuantViT(fp_model, QuantSettings(wbits=None, abits=None)).to(device)
    twin.set_mode("off")
    ada = cfg.adaround
    calib = subset(calib_source, ada.calib_images, int(cfg.seed) + 1)
    images = torch.cat([x for x, _ in loader(calib, cfg.data.batch_size, cfg.data.num_workers, torch.device("cpu"))])
    units = units_of(qmodel, cfg.granularity.name)
    twin_units = dict(units_of(twin, cfg.granularity.name))

    index = Path(cfg.cache_dir) / "recon" / f"{resume_key(cfg)}.json" if cfg.cache_dir else None
    ckpt_path = run_dir / "recon_checkpoint.pt"
    state = _load_resume(index, qmodel) if index is not None and cfg.adaround.resume else None
    done = state["done"] if state else 0
    records: list[dict[str, Any]] = state["records"] if state else []
    curves: dict[str, dict[str, list[float]]] = state["curves"] if state else {}
    metrics["resumed_units"] = done
    bs = cfg.data.batch_size
    with flush_denormals():
        for i, (name, unit) in enumerate(units):
            if i < done:
                continue
            inputs = capture(qmodel, unit, images, device, "input", bs)
            targets = capture(twin, twin_units[name], images, device, "output", bs)
            record, curve = train_unit(name, unit, inputs, targets, cfg, device, seed=int(cfg.seed) * 100003 + i)
            records.append(record)
            curves[name] = curve
            log.info("unit %d/%d %s: loss %.4g -> %.4g in %d iters (%s, %.1fs)", i + 1, len(units), name,
                     record["loss_before"], record["loss_after"], record["iters"],
                     "early stop" if record["early_stopped"] else "all iters", record["seconds"])
            _atomic_save({"done": i + 1, "state": qmodel.state_dict(), "records": records, "curves": curves},
                         ckpt_path)
            if index is not None:
                index.parent.mkdir(parents=True, exist_ok=True)
                index.write_text(json.dumps({"checkpoint": str(ckpt_path.resolve()), "done": i + 1}))
    metrics["units"] = records
    metrics["curves"] = curves
    try:
        metrics["recon_plot"] = plot_reconstruction(records, curves, run_dir / RECON_PLOT).name
    except Exception as exc:  # a picture is not worth failing a finished reconstruction for
        log.warning("could not draw %s (%s: %s)", RECON_PLOT, type(exc).__name__, exc)
    metrics["adaround_iters"] = int(sum(r["iters"] for r in records))
    if not math.isfinite(sum(r["loss_after"] for r in records)):
        raise FloatingPointError("AdaRound produced a non-finite reconstruction loss")
