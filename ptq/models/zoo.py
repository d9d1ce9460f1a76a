"""Model loading by config name, with input checks that run before anything heavy.

Three sources (``ptq.config.MODELS``): the embedded digits models (``ptq.models.tiny``), torchvision's
``vit_b_16`` and timm's ViT / DeiT checkpoints (``ptq.config.TIMM_MODELS``). Weights come from the
library's own pretrained loading (torchvision's download, timm's hub), from ``model.weights_path``
(a local state dict, its keys and shapes checked against the model before anything runs) or random
(``model.pretrained=false``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import ViT_B_16_Weights, vit_b_16

from ptq.config import TIMM_MODELS, ConfigError

log = logging.getLogger(__name__)


def _load_state_dict(path: str) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign file
        raise ConfigError(f"model.weights_path={path!r} could not be read as a torch state dict ({exc.__class__.__name__})") from exc
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):  # timm / DeiT training checkpoints
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise ConfigError(f"model.weights_path={path!r} holds a {type(obj).__name__}, not a state dict")
    return obj


def _architecture(name: str) -> nn.Module:
    """The randomly initialised float model ``name`` (ImageNet models only)."""
    if name == "vit_b_16":
        return vit_b_16(weights=None)
    import timm

    return timm.create_model(name, pretrained=False)


def check_keys(name: str, model: nn.Module, state: dict, path: str) -> None:
    """ConfigError (one line) when ``state``'s keys or shapes are not ``model``'s."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = [f"{what} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''} ({len(keys)})"
                 for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise ConfigError(f"model.weights_path={path!r} does not match model={name}: {'; '.join(parts)}; "
                          f"pass a state dict saved from {name} (torch.save(model.state_dict(), FILE))")


def check_model_inputs(cfg: Any) -> None:
    """Fail fast (ConfigError, one line) on weights that are missing, unreadable or not the model's."""
    name, path = cfg.model.name, cfg.model.weights_path
    if path is None:
        if name == "vit_b_16" and cfg.model.pretrained and cfg.model.weights not in ViT_B_16_Weights.__members__:
            allowed = ", ".join(ViT_B_16_Weights.__members__)
            raise ConfigError(f"model.weights={cfg.model.weights!r} is not a torchvision ViT_B_16 weight; allowed: {allowed}")
        return
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"model.weights_path={path!r} does not exist; pass a state-dict file saved with torch.save")
    if not os.access(p, os.R_OK):
        raise ConfigError(f"model.weights_path={path!r} is not readable")
    if name == "vit_b_16" or name in TIMM_MODELS:
        with torch.random.fork_rng(devices=[]):
            check_keys(name, _architecture(name), _load_state_dict(path), path)


def _imagenet_model(cfg: Any) -> nn.Module:
    name = cfg.model.name
    if cfg.model.weights_path is not None:
        model = _architecture(name)
        model.load_state_dict(_load_state_dict(cfg.model.weights_path))
        return model
    if not cfg.model.pretrained:
        log.warning("model.pretrained=false: %s with random weights", name)
        return _architecture(name)
    if name == "vit_b_16":
        log.info("loading torchvision vit_b_16 weights %s (downloads on first use)", cfg.model.weights)
        return vit_b_16(weights=ViT_B_16_Weights[cfg.model.weights])
    import timm

    tag = f"{name}.{cfg.model.weights}" if cfg.model.weights else name
    log.info("loading timm %s pretrained weights (timm's hub; downloads on first use)", tag)
    return timm.create_model(tag, pretrained=True)


def load_model(cfg: Any) -> nn.Module:
    """The float model named by ``cfg.model``, in eval mode on the CPU."""
    name = cfg.model.name
    if name.startswith("tiny_"):
        from ptq.models.tiny import EMBEDDED, load_tiny_digits

        if name not in EMBEDDED:  # validate() rejects this first
            raise ConfigError(f"model.name={name!r} is not an embedded model; embedded: {', '.join(EMBEDDED)}")
        model = load_tiny_digits(cfg.model.weights_path, name)
    else:
        model = _imagenet_model(cfg)
    return model.eval()
