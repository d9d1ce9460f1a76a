"""What the benchmark runs: sizes per model (quick or full), the models and their input images."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision.models import vit_b_16
from torchvision.models.vision_transformer import VisionTransformer

from ptq.atomic import block_markers
from ptq.calib import calibrate
from ptq.models.families import describe
from ptq.quant.models import quantize_model
from ptq.quant.vit import QuantModel, QuantSettings

log = logging.getLogger(__name__)


DEFAULT_OUT = Path("outputs/bench.json")
DEFAULT_ONNX_OUT = Path("outputs/bench_onnx.json")
PERF_BLOCK = "perf"  # the Performance block (docs/benchmarks.md; ptq.atomic.BLOCK_PAGES, write_block)
ONNX_BLOCK = "onnx"  # the onnxruntime comparison block (docs/deployment.md)
MARK_START, MARK_END = block_markers(PERF_BLOCK)
ADAROUND_BACKENDS = ("fp", "ivit")


def ratio_key(kind: str, backend: str) -> str:
    """The ratio/target key of an AdaRound unit kind (layer, block, encoder) on a backend: ivit gets ``_ivit``."""
    return f"adaround_{kind}" + ("" if backend == "fp" else f"_{backend}")


#: Ratio keys: eval, then per AdaRound unit kind the worst unit of the kind, per backend (``_ivit`` suffix).
RATIO_KEYS = ("eval_fp_ops", "eval_ivit",
              *(ratio_key(kind, b) for b in ADAROUND_BACKENDS for kind in ("layer", "block", "encoder")))
#: What the project aims for (issue 14; reported, never asserted): quantized time / float time.
TARGETS = {
    "eval_fp_ops": 1.5,
    "eval_ivit": 2.0,
    **{ratio_key(kind, b): 1.2 for kind in ("layer", "block", "encoder") for b in ADAROUND_BACKENDS},
    "cache_bytes_vit_b_16_1024": 4 * 10**9,
}
CACHE_IMAGES = 1024  # the calibration-set size of the cache-memory estimate
VIT_B_16_ARCH: dict[str, int] = {"image_size": 224, "patch_size": 16, "num_layers": 12, "num_heads": 12,
                                 "hidden_dim": 768, "mlp_dim": 3072, "num_classes": 1000}


# ----------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Plan:
    """How much of everything to run for one model."""

    num_layers: int | None  # reduced depth (same width) or None for the model's own
    eval_batch: int
    eval_repeats: int
    calib_images: int
    calib_batch: int
    calib_repeats: int
    ada_batch: int
    ada_iters: int  # timed iterations per repeat (one more is run and dropped as warm-up)
    ada_repeats: int
    ada_cache_images: int
    mem_images: tuple[int, int]  # two image counts for the linear fit of the cache memory
    mem_batch: int


PLANS: dict[tuple[str, bool], Plan] = {
    ("tiny", True): Plan(None, 64, 5, 128, 64, 2, 32, 6, 2, 64, (128, 512), 32),
    ("tiny", False): Plan(None, 256, 9, 1024, 128, 3, 32, 30, 5, 256, (256, 512), 128),
    ("vit_b_16", True): Plan(2, 2, 2, 2, 2, 1, 2, 2, 1, 2, (32, 96), 4),
    ("vit_b_16", False): Plan(None, 8, 3, 32, 8, 2, 32, 4, 2, 32, (64, 192), 8),
}


# ----------------------------------------------------------------------------- models and data


def build_model(name: str, plan: Plan) -> tuple[VisionTransformer, dict[str, Any]]:
    """The float model to benchmark and a description of it (weights, depth)."""
    if name == "tiny":
        from ptq.models.tiny import build_tiny_vit, load_tiny_digits

        try:
            return load_tiny_digits(), {"weights": "checkpoint"}
        except (FileNotFoundError, ValueError) as exc:
            log.warning("tiny checkpoint unavailable (%s); random weights (timing does not care)", exc)
            torch.manual_seed(0)
            return build_tiny_vit().eval(), {"weights": "random"}
    if name == "vit_b_16":
        torch.manual_seed(0)
        if plan.num_layers is None:
            return vit_b_16(weights=None).eval(), {"weights": "random", "num_layers": 12, "reduced_depth": False}
        arch = {**VIT_B_16_ARCH, "num_layers": plan.num_layers}
        return VisionTransformer(**arch).eval(), {"weights": "random", "num_layers": plan.num_layers,
                                                  "reduced_depth": True, "note": "vit_b_16 width, reduced depth"}
    raise ValueError(f"unknown model {name!r}; expected tiny or vit_b_16")


def images_for(name: str, model: VisionTransformer, count: int, split: str = "test") -> Tensor:
    """``count`` input images: augmented digits for the tiny model, standard normal otherwise."""
    size = describe(model).image_size
    if name == "tiny":
        try:
            from ptq.data.digits import digits_splits

            pool = digits_splits(image_size=size, seed=0)[split].tensors[0]
            reps = math.ceil(count / pool.shape[0])
            return pool.repeat(reps, 1, 1, 1)[:count].clone()
        except Exception as exc:  # the data module is optional for timing
            log.warning("digits data unavailable (%s); random images", exc)
    gen = torch.Generator().manual_seed(1 if split == "test" else 2)
    return torch.randn(count, 3, size, size, generator=gen)


def _batches(images: Tensor, batch: int) -> list[tuple[Tensor, Tensor]]:
    return [(images[i:i + batch], torch.zeros(0)) for i in range(0, images.shape[0], batch)]


def calibrated(model: VisionTransformer, st: QuantSettings, images: Tensor, batch: int,
               device: torch.device) -> QuantModel:
    """A QuantModel of ``model`` calibrated on ``images`` (moving-average absmax), in quant mode."""
    q = quantize_model(model, st).to(device)
    calibrate(q, _batches(images, batch), device)
    return q
