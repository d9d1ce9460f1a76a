"""Calibration stage: observe the activation ranges over calibration images, then fix every scale.

``calibrate`` runs the moving-average absmax pass of spec/quantized-vit.md on any
``QuantViT``; ``calibrate_cached`` is the pipeline's stage, which first looks for the
statistics of an identical calibration in the stage cache.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ptq.cache import StageCache
from ptq.data import build as data_build
from ptq.quant.vit import QuantViT
from ptq.runspec import data_identity, model_identity


@torch.no_grad()
def calibrate(qmodel: QuantViT, batches: DataLoader, device: torch.device) -> None:
    """Moving-average absmax over the calibration images, then fix every scale."""
    qmodel.set_mode("observe")
    for x, _ in tqdm(batches, desc="calibrate", leave=False):
        qmodel(x.to(device, non_blocking=True))
    qmodel.freeze()


def calibration_stats(qmodel: QuantViT) -> dict[str, Tensor]:
    """The observed state of every activation quantizer (what calibration produces)."""
    return {k: v.detach().cpu() for k, v in qmodel.state_dict().items()
            if k.endswith(("running_absmax", "n_batches"))}


def calibration_spec(cfg: Any, qmodel: QuantViT) -> dict[str, Any]:
    """Everything that determines the calibration statistics: the stage cache key."""
    st = qmodel.settings
    return {"model": model_identity(cfg), "data": data_identity(cfg), "seed": int(cfg.seed),
            "calib_images": cfg.aquant.calib_images, "calib_batch_size": cfg.aquant.calib_batch_size,
            "wbits": st.wbits, "abits": st.abits, "idadd_bits": st.idadd_bits, "momentum": st.momentum,
            "quant_io": st.quant_io, "n_quantizers": sum(1 for _ in qmodel.act_quantizers())}


def calibrate_cached(cfg: Any, qmodel: QuantViT, calib_source: Any, device: torch.device,
                     cache: StageCache, cached: dict[str, bool]) -> None:
    """Calibrate, or load the statistics of an identical calibration from the stage cache."""
    spec = calibration_spec(cfg, qmodel)
    hit = cache.load("calibration", spec)
    cached["calibrate"] = hit is not None
    if hit is not None:
        qmodel.load_state_dict(hit, strict=False)
        qmodel.freeze()
        return
    calib_set = data_build.subset(calib_source, cfg.aquant.calib_images, int(cfg.seed))
    calibrate(qmodel, data_build.loader(calib_set, cfg.aquant.calib_batch_size, cfg.data.num_workers, device), device)
    cache.save("calibration", spec, calibration_stats(qmodel))
