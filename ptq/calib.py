"""Calibration stage: observe the activation ranges over calibration images, then fix every scale.

``calibrate`` runs the moving-average absmax pass of spec/quantized-vit.md on any
``QuantModel`` (and, for ``aquant=mse|percentile``, a second pass that fills each searched
quantizer's histogram); ``reparameterise`` folds per-channel LayerNorm-output factors into
the model first (``aquant.ln_reparam``, ``ptq.quant.reparam``); ``calibrate_cached`` is the
pipeline's stage, which first looks for the result of an identical calibration in the
stage cache.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ptq.cache import StageCache
from ptq.config import CODED_ROLES
from ptq.data import build as data_build
from ptq.quant import reparam
from ptq.quant.vit import QuantModel
from ptq.runspec import data_identity, image_bits_of, model_identity


@torch.no_grad()
def calibrate(qmodel: QuantModel, batches: DataLoader, device: torch.device) -> None:
    """Moving-average absmax over the calibration images, then fix every scale."""
    qmodel.set_mode("observe")
    for x, _ in tqdm(batches, desc="calibrate", leave=False):
        qmodel(x.to(device, non_blocking=True))
    if any(q.searched for q in qmodel.act_quantizers()):
        qmodel.set_mode("histogram")
        for x, _ in tqdm(batches, desc="calibrate (histograms)", leave=False):
            qmodel(x.to(device, non_blocking=True))
    qmodel.freeze()


@torch.no_grad()
def reparameterise(qmodel: QuantModel, batches: DataLoader, device: torch.device, alpha: float) -> None:
    """Per-channel absmax of every LN output that feeds a linear, folded into the model as factors."""
    absmax: dict[str, Tensor] = {}
    hooks = []
    for name, owner, _, _ in reparam.ln_pairs(qmodel):
        def hook(mod: torch.nn.Module, args: Any, name: str = name) -> None:  # the LN output, entering ln_q
            m = args[0].real().detach().abs().flatten(0, -2).amax(0)
            absmax[name] = m if name not in absmax else torch.maximum(absmax[name], m)
        hooks.append(owner.ln_q.register_forward_pre_hook(hook))
    qmodel.set_mode("off")
    try:
        for x, _ in tqdm(batches, desc="LayerNorm channel ranges", leave=False):
            qmodel(x.to(device, non_blocking=True))
    finally:
        for h in hooks:
            h.remove()
    for name, owner, ln, lin in reparam.ln_pairs(qmodel):
        reparam.fold(owner, ln, lin, reparam.factors(absmax[name], alpha))


def calibration_stats(qmodel: QuantModel) -> dict[str, Tensor]:
    """What calibration produces: every activation quantizer's observations, and folded LN factors."""
    return {k: v.detach().cpu() for k, v in qmodel.state_dict().items()
            if k.endswith(("running_absmax", "n_batches", "seen_max", ".hist", ".ln_r"))}


def calibration_spec(cfg: Any, qmodel: QuantModel) -> dict[str, Any]:
    """Everything that determines the calibration statistics: the stage cache key."""
    st = qmodel.settings
    return {"model": model_identity(cfg), "data": data_identity(cfg), "seed": int(cfg.seed),
            "calib_images": cfg.aquant.calib_images, "calib_batch_size": cfg.aquant.calib_batch_size,
            "wbits": st.wbits, "abits": st.abits, "idadd_bits": st.idadd_bits, "momentum": st.momentum,
            "quant_io": st.quant_io, "n_quantizers": sum(1 for _ in qmodel.act_quantizers()),
            **search_spec(cfg)}


def search_spec(cfg: Any) -> dict[str, Any]:
    """The step-search and reparameterisation settings, only where they differ from plain movavg.

    (Absent for movavg without ln_reparam, so those cache keys are what they always were.)
    """
    aq = cfg.aquant
    spec: dict[str, Any] = {}
    if aq.name == "mse":
        spec["search"] = {"method": "mse", "grid": int(aq.search_grid)}
    elif aq.name == "percentile":
        spec["search"] = {"method": "percentile", "percentile": float(aq.percentile)}
    if aq.ln_reparam:
        spec["ln_reparam"] = {"alpha": float(aq.ln_reparam_alpha)}
    if aq.kernel_in_bits is not None:
        spec["kernel_in_bits"] = int(aq.kernel_in_bits)
    if (image_bits := image_bits_of(cfg)) is not None:  # only where it changes a quantizer: same calibration, same key
        spec["image_bits"] = image_bits
    twins = [k for k in CODED_ROLES if aq.get(k, "uniform") == "twin"]
    if twins:  # twin quantizers fill a histogram even with movavg steps
        spec["twin"] = twins
    return spec


def calibrate_cached(cfg: Any, qmodel: QuantModel, calib_source: Any, device: torch.device,
                     cache: StageCache, cached: dict[str, bool]) -> None:
    """Calibrate, or load the statistics of an identical calibration from the stage cache."""
    spec = calibration_spec(cfg, qmodel)
    hit = cache.load("calibration", spec)
    cached["calibrate"] = hit is not None
    if hit is not None:
        reparam.apply_saved(qmodel, hit)
        qmodel.load_state_dict(hit, strict=False)
        qmodel.freeze()
        return
    calib_set = data_build.subset(calib_source, cfg.aquant.calib_images, int(cfg.seed))
    batches = data_build.loader(calib_set, cfg.aquant.calib_batch_size, cfg.data.num_workers, device)
    if cfg.aquant.ln_reparam:
        reparameterise(qmodel, batches, device, float(cfg.aquant.ln_reparam_alpha))
    calibrate(qmodel, batches, device)
    cache.save("calibration", spec, calibration_stats(qmodel))
