"""Host memory of AdaRound's block caches: analytic (what ``Cached.pack`` stores) and measured, fitted to 1024 images."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models import vit_b_16
from torchvision.models.vision_transformer import VisionTransformer

from ptq.bench.plans import CACHE_IMAGES, Plan
from ptq.bench.timing import peak_memory
from ptq.models.families import describe
from ptq.quant.models import quantize_model
from ptq.quant.rounding import install_adaround
from ptq.quant.vit import QuantModel, QuantSettings
from ptq.recon.unitcache import FLOAT16_ABOVE_BYTES, capture

log = logging.getLogger(__name__)


def cache_bytes_analytic(tokens: int, dim: int, images: int, device_type: str = "cpu") -> dict[str, Any]:
    """Host bytes of one block unit's caches at ``images`` images, from what ``Cached.pack`` stores.

    Inputs (the INT16 residual stream) are packed as int16; targets (float) as float32, or
    float16 once they pass ``FLOAT16_ABOVE_BYTES``. While packing, ``capture`` still holds
    the per-batch outputs: on the CPU that is float32 inputs (4 B) next to their int16 copies
    and the concatenation (2 + 2 B); for targets float32 outputs, their dequantized copies and
    the concatenation (3 x 4 B), with the packed inputs alive (2 B). On CUDA the per-batch
    outputs stay on the device and only the copies and concatenations are on the host.
    """
    n = images * tokens * dim
    target_elem = 4 if n * 4 <= FLOAT16_ABOVE_BYTES else 2
    inputs, targets = n * 2, n * target_elem
    if device_type == "cuda":
        peak_in = n * (2 + 2)
        peak_tg = inputs + n * (4 + 4) + (n * 2 if target_elem == 2 else 0)
    else:
        peak_in = n * (4 + 2 + 2)
        peak_tg = inputs + n * (4 + 4 + 4) + (n * 2 if target_elem == 2 else 0)
    return {"images": images, "tokens": tokens, "dim": dim, "inputs_bytes": inputs, "targets_bytes": targets,
            "inputs_dtype": "int16", "targets_dtype": "float32" if target_elem == 4 else "float16",
            "steady_bytes": inputs + targets, "capture_peak_bytes": max(peak_in, peak_tg)}


def _module_bytes(*mods: nn.Module) -> int:
    return sum(t.nbytes for m in mods for t in [*m.parameters(), *m.buffers()])


def model_bytes_vit_b_16() -> dict[str, int]:
    """Host bytes of the three models reconstruction keeps (float, AdaRound QuantModel, float twin), on meta."""
    with torch.device("meta"):
        m = vit_b_16(weights=None)
        q = quantize_model(m, QuantSettings(wbits=4, abits=8))
        install_adaround(q)
        twin = quantize_model(m, QuantSettings(wbits=None, abits=None))
    return {"float": _module_bytes(m), "quant_adaround": _module_bytes(q), "twin": _module_bytes(twin)}


def bench_cache_memory(q: QuantModel, twin: QuantModel, calib: Tensor, plan: Plan,
                       device: torch.device) -> dict[str, Any]:
    """Measured host memory of a block unit's caches at two image counts, fitted linearly to CACHE_IMAGES.

    The unit is ``blocks.0.attn`` (every block unit's caches have the same shape; this one
    needs the least computing). The stored size is exactly linear in the image count; the
    RSS peak of capturing also has a fixed part (one batch's activations), which the
    two-point fit separates from the per-image part.
    """
    unit, twin_unit = q.blocks[0].attn, twin.blocks[0].attn
    points = []
    for n in plan.mem_images:
        imgs = calib.repeat(math.ceil(n / calib.shape[0]), 1, 1, 1)[:n].contiguous()
        with peak_memory(device) as pk:
            inputs = capture(q, unit, imgs, device, "input", plan.mem_batch)
            targets = capture(twin, twin_unit, imgs, device, "output", plan.mem_batch)
        stored = inputs.v.nbytes + targets.v.nbytes + (inputs.s.nbytes if inputs.s is not None else 0)
        points.append({"images": n, "stored_bytes": stored, "peak": pk.as_dict(),
                       "inputs_dtype": str(inputs.v.dtype), "targets_dtype": str(targets.v.dtype)})
        del inputs, targets, imgs
    (n1, n2), (p1, p2) = plan.mem_images, points
    d1, d2 = p1["peak"]["host_delta_bytes"], p2["peak"]["host_delta_bytes"]
    slope_stored = (p2["stored_bytes"] - p1["stored_bytes"]) / (n2 - n1)
    slope = (d2 - d1) / (n2 - n1)
    if slope > 0:
        fixed = max(0.0, d2 - slope * n2)
        fit = "two-point"
    else:  # noise swamped the difference: charge the whole peak to the images (an upper bound)
        slope, fixed, fit = d2 / n2, 0.0, "upper bound (peak / images)"
    elems = unit.ln.normalized_shape[0] * ((calib.shape[-1] // q.embed.patch) ** 2 + 1)
    return {
        "unit": "blocks.0.attn", "batch": plan.mem_batch, "points": points, "fit": fit,
        "peak_bytes_per_image": slope, "peak_fixed_bytes": fixed,
        "peak_bytes_per_element": slope / elems,
        "measured_steady_bytes_at_1024": slope_stored * CACHE_IMAGES,
        "measured_capture_peak_bytes_at_1024": fixed + slope * CACHE_IMAGES,
    }


def cache_report(name: str, model: VisionTransformer, measured: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Analytic and measured cache memory at CACHE_IMAGES images, and the reconstruction stage's host total."""
    arch = describe(model).arch()
    ana = cache_bytes_analytic(arch["tokens"], arch["hidden_dim"], CACHE_IMAGES, device.type)
    images_bytes = CACHE_IMAGES * 3 * arch["image_size"] ** 2 * 4
    report: dict[str, Any] = {"analytic": ana, "measured": measured, "calib_images_bytes": images_bytes}
    if name == "vit_b_16":
        models = model_bytes_vit_b_16()
        host_models = sum(models.values()) if device.type == "cpu" else models["float"]
        report["models_bytes"] = models
        report["host_total_estimate_bytes"] = images_bytes + ana["capture_peak_bytes"] + host_models
    return report
