"""Augmented scikit-learn digits: the embedded default data set.

The 1797 bundled 8x8 digit images (``sklearn.datasets.load_digits``, no download) are
split into disjoint train/test *source* images, then every source image is drawn several
times onto a larger canvas with a seeded random affine transform and additive noise.
The augmentation makes the task hard enough that a small ViT does not saturate, so the
effect of quantization is visible in top-1 accuracy.

Everything is a pure function of the arguments (a seeded ``torch.Generator``, one batched
``affine_grid``/``grid_sample`` call per split) and is cached in-process.
"""

from __future__ import annotations

import functools
import logging
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import TensorDataset

log = logging.getLogger(__name__)

NUM_CLASSES = 10
#: Fixed normalization constants (approximate pixel mean/std of the augmented images in [0, 1]).
DIGITS_MEAN = 0.13
DIGITS_STD = 0.20
#: Fraction of the canvas side covered by the 8x8 source image at scale 1.
DIGIT_EXTENT = 0.6
#: Fraction of the source images held out for the test split (stratified by class).
TEST_FRACTION = 1 / 3

# Augmentation ranges (uniform unless noted).
MAX_ROTATION_DEG = 25.0
SCALE_RANGE = (0.8, 1.2)
MAX_SHEAR = 0.25
MAX_TRANSLATE = 0.18  # in normalized canvas coordinates ([-1, 1] spans the canvas)
NOISE_STD = 0.12  # additive Gaussian noise on [0, 1] pixels
CONTRAST_RANGE = (0.6, 1.0)


def _source_images() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 source images as float32 [N, 1, 8, 8] in [0, 1] and int64 labels."""
    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    return images, labels


def source_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the train and test source images: disjoint, stratified by class, ~2/3 train."""
    _, labels = _source_images()
    idx = np.arange(labels.numel())
    train_idx, test_idx = train_test_split(
        idx, test_size=TEST_FRACTION, random_state=seed, stratify=labels.numpy()
    )
    return np.sort(train_idx), np.sort(test_idx)


def augment(images: torch.Tensor, copies: int, image_size: int, generator: torch.Generator) -> torch.Tensor:
    """Draw each [N, 1, h, w] image ``copies`` times onto an image_size canvas, copy-major.

    Each copy gets its own random rotation, anisotropic scale, shear, translation, contrast
    and Gaussian pixel noise. Returns normalized float32 [copies * N, 3, S, S].
    """
    n = images.shape[0]
    m = copies * n
    src = images.repeat(copies, 1, 1, 1)

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(m, generator=generator)

    angle = uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG) * (math.pi / 180.0)
    sx = uniform(*SCALE_RANGE)
    sy = sx * uniform(0.9, 1.1)
    shear = uniform(-MAX_SHEAR, MAX_SHEAR)
    tx = uniform(-MAX_TRANSLATE, MAX_TRANSLATE)
    ty = uniform(-MAX_TRANSLATE, MAX_TRANSLATE)
    contrast = uniform(*CONTRAST_RANGE)

    # Forward map (source -> canvas, normalized coords): p = R @ Sh @ diag(s) * extent @ q + t.
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    shr = torch.zeros(m, 2, 2)
    shr[:, 0, 0] = 1.0
    shr[:, 1, 1] = 1.0
    shr[:, 0, 1] = shear
    scl = torch.diag_embed(torch.stack([sx, sy], -1) * DIGIT_EXTENT)
    fwd = rot @ shr @ scl
    # affine_grid wants the inverse map (canvas -> source): q = fwd^-1 @ (p - t).
    inv = torch.linalg.inv(fwd)
    t = torch.stack([tx, ty], -1).unsqueeze(-1)
    theta = torch.cat([inv, -inv @ t], dim=-1)

    grid = F.affine_grid(theta, [m, 1, image_size, image_size], align_corners=False)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = out * contrast.view(m, 1, 1, 1)
    out = out + NOISE_STD * torch.randn(out.shape, generator=generator)
    out = (out.clamp(0.0, 1.0) - DIGITS_MEAN) / DIGITS_STD
    return out.expand(-1, 3, -1, -1).contiguous()


@functools.lru_cache(maxsize=8)
def digits_splits(
    image_size: int = 24, seed: int = 0, train_copies: int = 16, test_copies: int = 4
) -> dict[str, TensorDataset]:
    """Train/test ``TensorDataset``s of augmented digits: images float32 [N, 3, S, S], labels int64.

    Train and test come from disjoint source images (``source_split``); each source image
    appears ``train_copies`` / ``test_copies`` times with different random augmentations.
    Deterministic given the arguments; cached, so repeated calls return the same tensors.
    """
    start = time.perf_counter()
    images, labels = _source_images()
    train_idx, test_idx = source_split(seed)
    out: dict[str, TensorDataset] = {}
    for offset, (name, idx, copies) in enumerate(
        [("train", train_idx, train_copies), ("test", test_idx, test_copies)]
    ):
        gen = torch.Generator().manual_seed(seed * 1000 + offset)
        sel = torch.from_numpy(idx)
        x = augment(images[sel], copies, image_size, gen)
        y = labels[sel].repeat(copies)
        out[name] = TensorDataset(x, y)
    log.info(
        "digits splits: train %d, test %d images of %dx%d (seed %d) in %.2fs",
        len(out["train"]),
        len(out["test"]),
        image_size,
        image_size,
        seed,
        time.perf_counter() - start,
    )
    return out
