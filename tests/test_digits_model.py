"""The digits data set and the committed tiny digits ViT checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ptq.data.digits import digits_splits, source_split
from ptq.models.tiny import (
    DEFAULT_WEIGHTS,
    TINY_DIGITS_ARCH,
    evaluate_top1,
    load_tiny_digits,
    train_tiny_digits,
)

N_SOURCES = 1797


def test_splits_deterministic_and_seed_dependent() -> None:
    uncached = digits_splits.__wrapped__  # bypass the lru_cache: really regenerate
    a = uncached(image_size=16, seed=0, train_copies=2, test_copies=1)
    b = uncached(image_size=16, seed=0, train_copies=2, test_copies=1)
    c = uncached(image_size=16, seed=1, train_copies=2, test_copies=1)
    for name in ("train", "test"):
        assert torch.equal(a[name].tensors[0], b[name].tensors[0])
        assert torch.equal(a[name].tensors[1], b[name].tensors[1])
        assert not torch.equal(a[name].tensors[0], c[name].tensors[0])
    assert digits_splits() is digits_splits()


def test_sources_disjoint_stratified() -> None:
    train_idx, test_idx = source_split(0)
    assert len(np.intersect1d(train_idx, test_idx)) == 0
    assert len(train_idx) + len(test_idx) == N_SOURCES
    assert 0.6 < len(train_idx) / N_SOURCES < 0.7
    other_train, _ = source_split(1)
    assert not np.array_equal(train_idx, other_train)


def test_split_shapes_dtypes_balance() -> None:
    splits = digits_splits()
    train_idx, test_idx = source_split(0)
    size = TINY_DIGITS_ARCH["image_size"]
    for name, sources, copies in (("train", train_idx, 16), ("test", test_idx, 4)):
        x, y = splits[name].tensors
        n = len(sources) * copies
        assert x.shape == (n, 3, size, size) and x.dtype == torch.float32
        assert y.shape == (n,) and y.dtype == torch.int64
        assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
        counts = torch.bincount(y, minlength=10)
        assert counts.numel() == 10
        assert counts.min() >= 0.9 * n / 10 and counts.max() <= 1.1 * n / 10
        assert abs(x.mean().item()) < 0.2 and 0.8 < x.std().item() < 1.2
    # the copies of one source image differ (augmented), its label does not
    x, y = splits["test"].tensors
    m = len(test_idx)
    assert y[0] == y[m] and not torch.equal(x[0], x[m])


def test_committed_checkpoint_small_and_accurate() -> None:
    assert DEFAULT_WEIGHTS.is_file()
    assert DEFAULT_WEIGHTS.stat().st_size < 1_000_000
    model = load_tiny_digits()
    assert not model.training
    acc = evaluate_top1(model, digits_splits()["test"])
    assert 85.0 <= acc <= 97.0
    meta = torch.load(DEFAULT_WEIGHTS, map_location="cpu", weights_only=True)["meta"]
    assert meta["arch"] == TINY_DIGITS_ARCH
    assert abs(meta["test_acc1"] - acc) < 0.5


def test_missing_or_bad_weights_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt.*python -m ptq.models.tiny"):
        load_tiny_digits(missing)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt.*python -m ptq.models.tiny"):
        load_tiny_digits(bad)


def test_short_training_deterministic(tmp_path: Path) -> None:
    rng_before = torch.get_rng_state()
    runs = [
        train_tiny_digits(tmp_path / f"run{i}.pt", epochs=1, batch_size=64, train_subset=128, evaluate=False)
        for i in range(2)
    ]
    assert torch.equal(torch.get_rng_state(), rng_before)  # caller's RNG untouched
    sd0, sd1 = runs[0]["state_dict"], runs[1]["state_dict"]
    assert sd0.keys() == sd1.keys()
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    assert set(runs[0]) >= {"test_acc1", "seconds"}
    model = load_tiny_digits(tmp_path / "run0.pt")
    assert all(torch.equal(v, sd0[k]) for k, v in model.state_dict().items())
