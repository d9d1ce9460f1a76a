"""The embedded default model: a small torchvision ``VisionTransformer`` trained on digits.

The architecture is a stock ``torchvision.models.VisionTransformer`` (so every quantization
path that handles torchvision ViTs handles it), just tiny: it trains on two CPU cores in a
few minutes and its checkpoint is committed (< 1 MB) at ``ptq/models/assets/tiny_digits.pt``.

Regenerate the committed checkpoint with::

    python -m ptq.models.tiny            # same as: --seed 0 --epochs 10

(4 layers, width 64, 140k params, 566 kB float32; 88.4% test top-1 on the digits test split;
about 2 minutes on two idle CPU cores.) The weights are reproducible bit for bit only with the
same torch build and thread count.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import TensorDataset
from torchvision.models import VisionTransformer
from tqdm import tqdm

from ptq.data.digits import digits_splits

log = logging.getLogger(__name__)

#: ``VisionTransformer`` keyword arguments of the embedded default model.
TINY_DIGITS_ARCH: dict[str, int] = {
    "image_size": 24,
    "patch_size": 4,
    "num_layers": 4,
    "num_heads": 4,
    "hidden_dim": 64,
    "mlp_dim": 128,
    "num_classes": 10,
}

DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "assets" / "tiny_digits.pt"
DIGITS_IMAGE_SIZE = 24  # every embedded model's input side (data.image_size)

#: Training defaults used for the committed checkpoint.
EPOCHS = 10
BATCH_SIZE = 128
LR = 2e-3
WEIGHT_DECAY = 0.05
WARMUP_EPOCHS = 2
LABEL_SMOOTHING = 0.1


#: timm ``VisionTransformerDistilled`` keyword arguments of ``tiny_deit_digits`` (a distilled DeiT:
#: class and distillation tokens, two heads averaged; trained on the labels through that average).
TINY_DEIT_ARCH: dict[str, Any] = {
    "img_size": 24, "patch_size": 4, "depth": 4, "num_heads": 4, "embed_dim": 64, "mlp_ratio": 2.0,
    "num_classes": 10,
}


#: timm ``SwinTransformer`` keyword arguments of ``tiny_swin_digits``: two stages (8 x 8 then 4 x 4 tokens,
#: 4 x 4 windows, the second stage's blocks shifted in stage 1 only, as timm sets it when a stage
#: is one window), one patch merging, the pooled head.
TINY_SWIN_ARCH: dict[str, Any] = {
    "img_size": 24, "patch_size": 3, "embed_dim": 48, "depths": (2, 2), "num_heads": (2, 4), "window_size": 4,
    "mlp_ratio": 2.0, "drop_path_rate": 0.05, "num_classes": 10,
}


def build_tiny_vit() -> VisionTransformer:
    """A randomly initialized ViT with the ``TINY_DIGITS_ARCH`` architecture."""
    return VisionTransformer(**TINY_DIGITS_ARCH)


def build_tiny_deit() -> nn.Module:
    """A randomly initialized timm distilled DeiT with the ``TINY_DEIT_ARCH`` architecture."""
    from timm.models.deit import VisionTransformerDistilled

    return VisionTransformerDistilled(**TINY_DEIT_ARCH)


def build_tiny_swin() -> nn.Module:
    """A randomly initialized timm Swin with the ``TINY_SWIN_ARCH`` architecture."""
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer(**TINY_SWIN_ARCH)


@dataclass(frozen=True)
class Embedded:
    """An embedded model: its builder, architecture (for the checkpoint's metadata) and committed weights."""

    build: Callable[[], nn.Module]
    arch: dict[str, Any]
    weights: Path
    epochs: int = EPOCHS  # training epochs of the committed checkpoint


ASSETS = Path(__file__).resolve().parent / "assets"

#: The embedded models by config name (``model=<name>``), all trained on the digits.
EMBEDDED: dict[str, Embedded] = {
    "tiny_digits": Embedded(build_tiny_vit, TINY_DIGITS_ARCH, ASSETS / "tiny_digits.pt"),
    "tiny_deit_digits": Embedded(build_tiny_deit, TINY_DEIT_ARCH, ASSETS / "tiny_deit_digits.pt"),
    "tiny_swin_digits": Embedded(build_tiny_swin, TINY_SWIN_ARCH, ASSETS / "tiny_swin_digits.pt", epochs=20),
}


@torch.no_grad()
def evaluate_top1(model: nn.Module, dataset: TensorDataset, batch_size: int = 256) -> float:
    """Top-1 accuracy in percent of ``model`` (put in eval mode) on an (images, labels) dataset."""
    model.eval()
    images, labels = dataset.tensors[0], dataset.tensors[1]
    correct = 0
    for start in range(0, len(labels), batch_size):
        logits = model(images[start : start + batch_size])
        correct += int((logits.argmax(-1) == labels[start : start + batch_size]).sum())
    return 100.0 * correct / max(len(labels), 1)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup then cosine decay to zero, as a multiplier of the base LR."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def train_tiny_digits(
    out_path: Path | str | None,
    seed: int = 0,
    epochs: int = EPOCHS,
    batch_size: int = BATCH_SIZE,
    lr: float = LR,
    weight_decay: float = WEIGHT_DECAY,
    train_subset: int | None = None,
    evaluate: bool = True,
    data_seed: int = 0,
    name: str = "tiny_digits",
) -> dict[str, Any]:
    """Train the embedded model ``name`` (``EMBEDDED``) deterministically on the digits train split and save it.

    Seeds everything (in a forked RNG, so the caller's global RNG state is untouched) and
    enables deterministic algorithms for the duration. ``train_subset`` keeps only the
    first N training images (for quick tests); ``out_path=None`` skips saving. ``seed`` drives
    init and shuffling only; the data split stays at ``data_seed`` (0, what the pipeline
    evaluates on) so another seed never trains on the test split's source images.
    Returns ``{"test_acc1", "seconds", "state_dict", "meta"}``.
    """
    start = time.perf_counter()
    splits = digits_splits(image_size=DIGITS_IMAGE_SIZE, seed=data_seed)
    images, labels = splits["train"].tensors
    if train_subset is not None:
        images, labels = images[:train_subset], labels[:train_subset]
    n = len(labels)
    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = epochs * steps_per_epoch
    warmup_steps = min(WARMUP_EPOCHS * steps_per_epoch, total_steps // 4)

    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = EMBEDDED[name].build()
            gen = torch.Generator().manual_seed(seed)
            decay = [p for name, p in model.named_parameters() if p.ndim >= 2 and "pos" not in name]
            no_decay = [p for name, p in model.named_parameters() if p.ndim < 2 or "pos" in name]
            opt = torch.optim.AdamW(
                [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                lr=lr,
            )
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda step: _lr_factor(step, total_steps, warmup_steps)
            )
            loss_fn = nn.CrossEntropyLoss(label_smoothing=LABEL_SMOOTHING)
            model.train()
            bar = tqdm(range(epochs), desc=f"train {name}", unit="epoch", leave=False)
            for epoch in bar:
                perm = torch.randperm(n, generator=gen)
                total_loss = 0.0
                for i in range(steps_per_epoch):
                    idx = perm[i * batch_size : (i + 1) * batch_size]
                    loss = loss_fn(model(images[idx]), labels[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    total_loss += loss.item() * len(idx)
                bar.set_postfix(loss=f"{total_loss / n:.3f}")
                log.debug("epoch %d/%d loss %.4f", epoch + 1, epochs, total_loss / n)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)

    model.eval()
    test_acc1 = evaluate_top1(model, splits["test"]) if evaluate else float("nan")
    seconds = time.perf_counter() - start
    log.info("trained %s: %d epochs, %.1fs, test top-1 %.2f%%", name, epochs, seconds, test_acc1)
    meta = {
        "model": name,
        "arch": dict(EMBEDDED[name].arch),
        "seed": seed,
        "data_seed": data_seed,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "train_images": n,
        "test_acc1": test_acc1,
    }
    state_dict = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if out_path is not None:
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": state_dict, "meta": meta}, out_path)
        log.info("saved %s (%.1f kB)", out_path, out_path.stat().st_size / 1024)
    return {"test_acc1": test_acc1, "seconds": seconds, "state_dict": state_dict, "meta": meta}


def load_tiny_digits(weights_path: str | Path | None = None, name: str = "tiny_digits") -> nn.Module:
    """The trained embedded model ``name`` in eval mode, from ``weights_path`` or its committed checkpoint.

    Raises ``FileNotFoundError`` if the file is missing and ``ValueError`` if it is not a
    readable tiny-digits checkpoint; both messages name the file and the regenerate command.
    """
    path = Path(weights_path) if weights_path is not None else EMBEDDED[name].weights
    regenerate = f"python -m ptq.models.tiny --model {name}" + (f" --out {path}" if weights_path is not None else "")
    if not path.is_file():
        raise FileNotFoundError(
            f"{name} checkpoint {path} not found; regenerate it with `{regenerate}`."
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        raw = ckpt["state_dict"] if isinstance(ckpt, dict) and "state_dict" in ckpt else ckpt
        state_dict = {k: v.float() for k, v in raw.items()}  # fp16-stored tensors load as float32
        with torch.random.fork_rng(devices=[]):  # the discarded random init leaves the caller's RNG alone
            model = EMBEDDED[name].build()
        model.load_state_dict(state_dict)
    except Exception as exc:  # corrupt file, wrong format or wrong architecture
        raise ValueError(
            f"{name} checkpoint {path} is not a readable {name} state dict; "
            f"regenerate it with `{regenerate}`."
        ) from exc
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    """CLI: train an embedded model and write its checkpoint."""
    parser = argparse.ArgumentParser(description="Train an embedded digits model's checkpoint.")
    parser.add_argument("--model", choices=sorted(EMBEDDED), default="tiny_digits")
    parser.add_argument("--out", type=Path, default=None, help="checkpoint path (default: the committed asset)")
    parser.add_argument("--epochs", type=int, default=None, help="default: the model's committed recipe")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    out = args.out or EMBEDDED[args.model].weights
    epochs = args.epochs if args.epochs is not None else EMBEDDED[args.model].epochs
    result = train_tiny_digits(out, seed=args.seed, epochs=epochs, name=args.model)
    log.info("test top-1 %.2f%% in %.1fs -> %s", result["test_acc1"], result["seconds"], out)


if __name__ == "__main__":
    main()
