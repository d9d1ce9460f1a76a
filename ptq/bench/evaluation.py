"""Evaluation and calibration throughput: float, W8A8 fp ops and W8A8 ivit, interleaved in one process."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.vision_transformer import VisionTransformer
from tqdm.auto import tqdm

from ptq.bench.plans import Plan, _batches
from ptq.bench.timing import Peak, _median, peak_memory, time_call
from ptq.calib import calibrate
from ptq.quant.models import quantize_model
from ptq.quant.nonlinear import Backend
from ptq.quant.vit import QuantModel, QuantSettings

log = logging.getLogger(__name__)


def bench_eval(model: VisionTransformer, calib: Tensor, images: Tensor, plan: Plan,
               device: torch.device) -> tuple[dict[str, Any], QuantModel]:
    """Throughput of float, W8A8 fp-ops and W8A8 ivit, interleaved; also calibration throughput."""
    fp = model.to(device)
    q_fp = quantize_model(model, QuantSettings(wbits=8, abits=8)).to(device)
    batches = _batches(calib, plan.calib_batch)

    # calibration: observe-mode passes of q_fp, each next to a float pass over the same images
    calib_t: list[float] = []
    float_t: list[float] = []
    peak: Peak | None = None
    with torch.no_grad():
        fp(batches[0][0].to(device))  # warm-up
        for r in tqdm(range(plan.calib_repeats), desc="calibration", leave=False):
            float_t.append(time_call(lambda: [fp(x.to(device)) for x, _ in batches], device))
            if r == 0:
                with peak_memory(device) as peak:
                    calib_t.append(time_call(lambda: calibrate(q_fp, batches, device), device))
            else:
                calib_t.append(time_call(lambda: calibrate(q_fp, batches, device), device))
    assert peak is not None
    n_calib = calib.shape[0]
    calibration = {
        "images": n_calib, "batch": plan.calib_batch, "repeats": plan.calib_repeats,
        "images_per_s": n_calib / _median(calib_t), "float_images_per_s": n_calib / _median(float_t),
        "ratio_to_float": _median([c / f for c, f in zip(calib_t, float_t, strict=True)]),
        "seconds": calib_t, "float_seconds": float_t, "memory": peak.as_dict(),
    }

    q_iv = quantize_model(model, QuantSettings(wbits=8, abits=8, backend=Backend("ivit"))).to(device)
    q_iv.load_state_dict(q_fp.state_dict())
    q_iv.freeze()
    variants: dict[str, nn.Module] = {"float": fp, "fp_ops": q_fp, "ivit": q_iv}
    x = images[:plan.eval_batch].to(device)
    times: dict[str, list[float]] = {k: [] for k in variants}
    peaks: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        for name, m in variants.items():  # warm-up, with the peak memory of one batch
            with peak_memory(device) as pk:
                m(x)
            peaks[name] = pk.as_dict()
        names = list(variants)
        for r in tqdm(range(plan.eval_repeats), desc="eval", leave=False):
            for name in names[r % 3:] + names[:r % 3]:  # rotate the order against position bias
                times[name].append(time_call(lambda m=variants[name]: m(x), device))
    result: dict[str, Any] = {"batch": plan.eval_batch, "repeats": plan.eval_repeats, "settings": "W8A8"}
    for name in variants:
        result[name] = {"images_per_s": plan.eval_batch / _median(times[name]), "seconds": times[name],
                        "memory": peaks[name]}
        if name != "float":
            result[name]["ratio_to_float"] = _median([t / f for t, f in zip(times[name], times["float"], strict=True)])
    return {"eval": result, "calibration": calibration}, q_fp
