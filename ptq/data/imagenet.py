"""ImageNet as an ImageFolder tree: ``root/val`` to evaluate, ``root/train`` to calibrate."""

from __future__ import annotations

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


def imagenet_splits(cfg: Any) -> tuple[Dataset, Dataset]:
    """(calibration source, eval split) with the eval transforms of torchvision's ViT-B/16 weights."""
    root = check_imagenet_root(cfg.data.root)
    transform = ViT_B_16_Weights.IMAGENET1K_V1.transforms()
    return ImageFolder(str(root / "train"), transform), ImageFolder(str(root / "val"), transform)
