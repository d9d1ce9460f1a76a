"""Model loading by config name, with input checks that run before anything heavy."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torchvision.models import ViT_B_16_Weights, vit_b_16
from torchvision.models.vision_transformer import VisionTransformer

from ptq.config import ConfigError

log = logging.getLogger(__name__)


def check_model_inputs(cfg: Any) -> None:
    """Fail fast (ConfigError, one line) on a weights file that is missing or unreadable."""
    path = cfg.model.weights_path
    if path is None:
        if cfg.model.name == "vit_b_16" and cfg.model.pretrained and cfg.model.weights not in ViT_B_16_Weights.__members__:
            allowed = ", ".join(ViT_B_16_Weights.__members__)
            raise ConfigError(f"model.weights={cfg.model.weights!r} is not a torchvision ViT_B_16 weight; allowed: {allowed}")
        return
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"model.weights_path={path!r} does not exist; pass a state-dict file saved with torch.save")
    if not os.access(p, os.R_OK):
        raise ConfigError(f"model.weights_path={path!r} is not readable")


def _load_state_dict(path: str) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign file
        raise ConfigError(f"model.weights_path={path!r} could not be read as a torch state dict ({exc.__class__.__name__})") from exc
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ConfigError(f"model.weights_path={path!r} holds a {type(obj).__name__}, not a state dict")
    return obj


def load_model(cfg: Any) -> VisionTransformer:
    """The float model named by ``cfg.model``, in eval mode on the CPU."""
    name = cfg.model.name
    if name == "tiny_digits":
        from ptq.models.tiny import load_tiny_digits

        model = load_tiny_digits(cfg.model.weights_path)
    elif name == "vit_b_16":
        if cfg.model.weights_path is not None:
            model = vit_b_16(weights=None)
            model.load_state_dict(_load_state_dict(cfg.model.weights_path))
        elif cfg.model.pretrained:
            log.info("loading torchvision vit_b_16 weights %s (downloads on first use)", cfg.model.weights)
            model = vit_b_16(weights=ViT_B_16_Weights[cfg.model.weights])
        else:
            log.warning("model.pretrained=false: vit_b_16 with random weights")
            model = vit_b_16(weights=None)
    else:  # validate() rejects this first
        raise ConfigError(f"model.name={name!r} is not known")
    return model.eval()
