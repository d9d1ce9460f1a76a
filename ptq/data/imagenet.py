"""ImageNet as an ImageFolder tree: ``root/val`` to evaluate, ``root/train`` to calibrate."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.models import ViT_B_16_Weights

from ptq.config import ConfigError


def check_imagenet_root(root: str | None) -> Path:
    """The dataset root, after checking it holds ``train`` and ``val`` class folders (ConfigError otherwise)."""
    if not root:
        raise ConfigError("data=imagenet needs data.root=DIR, a folder with train/ and val/ ImageFolder trees")
    path = Path(root)
    if not path.is_dir():
        raise ConfigError(f"data.root={root!r} is not a directory; pass the ImageNet folder holding train/ and val/")
    for split in ("train", "val"):
        if not (path / split).is_dir():
            raise ConfigError(f"data.root={root!r} has no {split}/ folder; expected {root}/train and {root}/val (one subfolder per class)")
    return path


def eval_transform(name: str) -> Callable[[Any], Any]:
    """Model ``name``'s own ImageNet eval transform: its torchvision weights' transform, or timm's data
    config of its pretrained weights (resize, crop, interpolation, mean / std: ``resolve_data_config``)."""
    if name == "vit_b_16":
        return ViT_B_16_Weights.IMAGENET1K_V1.transforms()
    from timm.data import create_transform, resolve_data_config
    from timm.models import get_pretrained_cfg

    pretrained = get_pretrained_cfg(name)
    return create_transform(**resolve_data_config({}, pretrained_cfg=pretrained.to_dict() if pretrained else None))


def imagenet_splits(cfg: Any) -> tuple[Dataset, Dataset]:
    """(calibration source, eval split), both with the model's own eval transform (:func:`eval_transform`)."""
    root = check_imagenet_root(cfg.data.root)
    transform = eval_transform(cfg.model.name)
    return ImageFolder(str(root / "train"), transform), ImageFolder(str(root / "val"), transform)
