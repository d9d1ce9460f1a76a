"""What a run's config means, in the terms every stage shares.

The pipeline, the stages below it (calibration, AdaRound, the integer program) and the
tools beside it (bench, intexec's CLI) all need the same few facts about a config: its
results-table row, the :class:`~ptq.quant.vit.QuantSettings` it builds, what identifies
its model and data in cache keys, its device and its evaluation subset. They live here,
once, below the pipeline, so that imports only run downward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from ptq.cache import file_digest
from ptq.config import ConfigError, uses_gptq_start
from ptq.quant.nonlinear import Backend
from ptq.quant.vit import QuantSettings

EVAL_SUBSET_SEED = 0  # the eval subset is the same for every run seed, so the float baseline is shared


def resolve_device(name: str) -> torch.device:
    """``auto`` = CUDA when present; asking for CUDA without one is a config error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is available; use device=auto or device=cpu")
    return torch.device(name)


def row_of(cfg: Any) -> dict[str, Any]:
    """The config fields that name this run's results-table row (see ptq.naming).

    Options added later (``ln_reparam`` and its ``ln_reparam_alpha`` below 1, ``kernel_in_bits``, ``softmax.log2``, ``probs``, ``gelu_out``,
    AdaRound's ``qdrop``, ``recon_loss`` and ``adaround_init``) appear only when on, and ``gptq`` (damping,
    act_order) only for wquant=gptq and adaround.init=gptq, so earlier
    runs' rows (and names) stay what they were.
    """
    row = {
        "model": cfg.model.name,
        "data": cfg.data.name,
        "wquant": cfg.wquant.name,
        "wbits": int(cfg.wbits),
        "aquant": cfg.aquant.name,
        "abits": int(cfg.abits),
        "nonlinear": cfg.nonlinear.name,
        "granularity": cfg.granularity.name if cfg.wquant.name == "adaround" else None,
        "lsq": bool(cfg.lsq.enabled) if cfg.wquant.name == "adaround" else False,
        "quant_io": bool(cfg.aquant.quant_io),
        "softmax": {"n": int(cfg.nonlinear.softmax.n), "out_bits": int(cfg.nonlinear.softmax.out_bits)},
        "gelu": {"n": int(cfg.nonlinear.gelu.n), "sig_bits": int(cfg.nonlinear.gelu.sig_bits)},
        "idadd_bits": int(cfg.nonlinear.idadd_bits),
    }
    if cfg.aquant.ln_reparam:
        row["ln_reparam"] = True
        if float(cfg.aquant.ln_reparam_alpha) != 1.0:  # full strength unnamed, as before alpha was a key
            row["ln_reparam_alpha"] = float(cfg.aquant.ln_reparam_alpha)
    if cfg.aquant.kernel_in_bits is not None and cfg.aquant.name != "none" and cfg.aquant.kernel_in_bits != cfg.abits:
        row["kernel_in_bits"] = int(cfg.aquant.kernel_in_bits)
    if (image_bits := image_bits_of(cfg)) is not None:
        row["image_bits"] = image_bits
    if cfg.nonlinear.softmax.log2 or cfg.aquant.probs == "log2":
        row["softmax"]["log2"] = True
    elif cfg.aquant.probs != "uniform":
        row["probs"] = str(cfg.aquant.probs)
    if cfg.aquant.gelu_out != "uniform":
        row["gelu_out"] = str(cfg.aquant.gelu_out)
    if cfg.aquant.scores != "uniform":
        row["scores"] = str(cfg.aquant.scores)
    if cfg.wquant.name == "adaround" and cfg.adaround.qdrop_prob > 0:
        row["qdrop"] = float(cfg.adaround.qdrop_prob)
    if cfg.wquant.name == "adaround" and cfg.adaround.loss != "mse":
        row["recon_loss"] = str(cfg.adaround.loss)
    if uses_gptq_start(cfg):
        row["adaround_init"] = "gptq"
    if cfg.wquant.name == "gptq" or uses_gptq_start(cfg):  # block_size only batches the updates: not in the row
        row["gptq"] = {"damp": float(cfg.gptq.damp), "act_order": bool(cfg.gptq.act_order)}
    return row


def image_bits_of(cfg: Any) -> int | None:
    """The input image quantizer's width where it differs from ``abits`` (and is quantized at all), else None."""
    aq = cfg.aquant
    if aq.image_bits is None or aq.name == "none" or not aq.quant_io or aq.image_bits == cfg.abits:
        return None
    return int(aq.image_bits)


def settings_of(cfg: Any) -> QuantSettings:
    """QuantSettings from the config (None widths where a quantizer is off)."""
    nl = cfg.nonlinear
    return QuantSettings(
        wbits=None if cfg.wquant.name == "none" else int(cfg.wbits),
        abits=None if cfg.aquant.name == "none" else int(cfg.abits),
        idadd_bits=int(nl.idadd_bits),
        momentum=float(cfg.aquant.momentum),
        quant_io=bool(cfg.aquant.quant_io),
        backend=Backend(nl.name, nl.softmax.n, nl.softmax.out_bits, nl.gelu.n, nl.gelu.sig_bits,
                        softmax_log2=bool(nl.softmax.log2), probs=str(cfg.aquant.probs)),
        act_method=cfg.aquant.name if cfg.aquant.name != "none" else "movavg",
        act_percentile=float(cfg.aquant.percentile),
        act_grid=int(cfg.aquant.search_grid),
        kernel_in_bits=None if cfg.aquant.kernel_in_bits is None else int(cfg.aquant.kernel_in_bits),
        image_bits=image_bits_of(cfg),
        gelu_out=str(cfg.aquant.gelu_out),
        scores=str(cfg.aquant.scores),
    )


def model_identity(cfg: Any) -> dict[str, Any]:
    """What identifies the float model's weights, for cache keys."""
    ident: dict[str, Any] = {"name": cfg.model.name}
    if cfg.model.weights_path:
        ident["weights_sha"] = file_digest(cfg.model.weights_path)
    elif cfg.model.name.startswith("tiny_"):
        from ptq.models import tiny

        ident["weights_sha"] = file_digest(tiny.EMBEDDED[cfg.model.name].weights)
    else:
        ident["weights"] = cfg.model.weights if cfg.model.pretrained else f"random-seed{cfg.seed}"
    return ident


def data_identity(cfg: Any) -> dict[str, Any]:
    """What identifies the data set, for cache keys."""
    return {"name": cfg.data.name, "root": cfg.data.root, "image_size": cfg.data.image_size}


def eval_set(cfg: Any, split: Dataset | None = None) -> Dataset:
    """The run's evaluation images: ``data.eval_images`` of the eval split, the same subset for every seed."""
    from ptq.data import build as data_build

    if split is None:
        _, split = data_build.splits(cfg)
    return data_build.subset(split, cfg.data.eval_images, EVAL_SUBSET_SEED)
