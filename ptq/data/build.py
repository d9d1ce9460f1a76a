"""Calibration and evaluation data by config name."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ptq.config import ConfigError


def check_data_inputs(cfg: Any) -> None:
    """Fail fast (ConfigError) on a dataset that cannot be found."""
    if cfg.data.name == "imagenet":
        from ptq.data.imagenet import check_imagenet_root

        check_imagenet_root(cfg.data.root)


def splits(cfg: Any) -> tuple[Dataset, Dataset]:
    """(calibration source split, evaluation split)."""
    if cfg.data.name == "digits":
        from ptq.data.digits import digits_splits

        s = digits_splits(image_size=cfg.data.image_size)
        return s["train"], s["test"]
    if cfg.data.name == "imagenet":
        from ptq.data.imagenet import imagenet_splits

        return imagenet_splits(cfg)
    raise ConfigError(f"data.name={cfg.data.name!r} is not known")


def subset(ds: Dataset, n: int | None, seed: int) -> Dataset:
    """A seeded random subset of ``n`` items (all of them when n is None or too large)."""
    total = len(ds)  # type: ignore[arg-type]
    if n is None or n >= total:
        return ds
    idx = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]
    return Subset(ds, idx.sort().values.tolist())


def loader(ds: Dataset, batch_size: int, num_workers: int, device: torch.device) -> DataLoader:
    """A deterministic (unshuffled) loader."""
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      pin_memory=device.type == "cuda")
