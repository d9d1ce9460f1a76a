"""Evaluation stage: logits over the eval split, top-k accuracy and fidelity to the float model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ptq.cache import StageCache
from ptq.runspec import EVAL_SUBSET_SEED, data_identity, model_identity


@torch.no_grad()
def predict(model: Callable[[Tensor], Tensor], batches: DataLoader, device: torch.device, desc: str) -> tuple[Tensor, Tensor]:
    """Logits and labels of every image, on the CPU."""
    logits, labels = [], []
    for x, y in tqdm(batches, desc=desc, leave=False):
        logits.append(model(x.to(device, non_blocking=True)).float().cpu())
        labels.append(y)
    return torch.cat(logits), torch.cat(labels)


def topk_accuracy(logits: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> list[float]:
    """Top-k accuracies in percent."""
    k = min(max(ks), logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hits = top == labels[:, None]
    return [100.0 * hits[:, : min(kk, k)].any(1).float().mean().item() for kk in ks]


def fidelity(q_logits: Tensor, fp_logits: Tensor) -> dict[str, float]:
    """Top-1 agreement with the float model (percent) and mean KL(float || quantized)."""
    agreement = 100.0 * (q_logits.argmax(1) == fp_logits.argmax(1)).float().mean().item()
    kl = F.kl_div(F.log_softmax(q_logits.double(), 1), F.log_softmax(fp_logits.double(), 1),
                  log_target=True, reduction="batchmean").item()
    return {"agreement": agreement, "kl": max(kl, 0.0)}


def float_baseline(cfg: Any, model: nn.Module, eval_loader: DataLoader, device: torch.device,
                   cache: StageCache, cached: dict[str, bool]) -> tuple[Tensor, Tensor]:
    """Float logits and labels on the eval split, from the stage cache when present."""
    spec = {"model": model_identity(cfg), "data": data_identity(cfg), "eval_images": cfg.data.eval_images,
            "subset_seed": EVAL_SUBSET_SEED}
    hit = cache.load("fp_baseline", spec)
    cached["fp_baseline"] = hit is not None
    if hit is not None:
        return hit["logits"], hit["labels"]
    logits, labels = predict(model, eval_loader, device, "float model")
    cache.save("fp_baseline", spec, {"logits": logits, "labels": labels})
    return logits, labels
