"""The unit cache of AdaRound: a unit's inputs and float targets over the calibration images (and GPTQ's
input Gram matrix, ``capture_gram``).

Captured once per unit by running the model only up to the unit (a forward hook stops it),
then stored on the host; every training iteration takes a batch from it (BRECQ's loop).
Integer inputs of at most 16 bits are stored as int16 (exact: the residual stream is
INT16, LN/attention outputs INT8), float tensors as float32, or float16 once a cache
passes 1 GiB. For vit_b_16 at block granularity with 1024 images one cache is
1024 x 197 x 768 values: 310 MB of int16 inputs plus 620 MB of float32 targets (0.93 GB;
ptq.bench measures 2.3 GB peak while capturing), instead of 1.24 GB with float32 inputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ptq.quant.qtensor import QTensor

FLOAT16_ABOVE_BYTES = 1 << 30
NORM_CACHE_MAX_BYTES = 1 << 30  # precomputed LayerNorm outputs above this are computed per iteration instead
BATCH_CHUNK_BYTES = 8 << 20  # training batches gathered together (all of a unit's caches, float32)

Value = QTensor | Tensor


def as_real(x: Value) -> Tensor:
    return x.real() if isinstance(x, QTensor) else x


@dataclass
class Cached:
    """A unit's inputs or targets over the calibration set, on the host."""

    v: Tensor
    s: Tensor | None = None
    bits: int | None = None
    signed: bool = True
    qtensor: bool = False  # the unit takes a QTensor (a float one where s is None), not a plain tensor

    @staticmethod
    def pack(items: list[Value]) -> Cached:
        first = items[0]
        if isinstance(first, QTensor) and first.integer and first.bits <= 16:
            v = torch.cat([it.v.detach().round().to(torch.int16).cpu() for it in items])
            return Cached(v, first.s.detach().cpu(), first.bits, first.signed, qtensor=True)
        reals = [as_real(it).detach().float().cpu() for it in items]
        total = sum(r.numel() for r in reals) * 4
        v = torch.cat(reals)
        if total > FLOAT16_ABOVE_BYTES:
            v = v.half()
        return Cached(v, qtensor=isinstance(first, QTensor))

    def __len__(self) -> int:
        return self.v.shape[0]

    def take(self, idx: Tensor, device: torch.device) -> Value:
        v = self.v.index_select(0, idx).to(device, non_blocking=True).float()  # faster than v[idx] on the CPU
        if self.s is None:
            return QTensor.from_float(v) if self.qtensor else v
        return QTensor(v, self.s.to(device), self.bits, self.signed)

    def take_real(self, idx: Tensor, device: torch.device) -> Tensor:
        return as_real(self.take(idx, device))


class _Stop(Exception):
    """Raised by a capture hook: nothing after the unit needs computing."""


@torch.no_grad()
def capture(model: nn.Module, unit: nn.Module, images: Tensor, device: torch.device, which: str,
            batch_size: int) -> Cached:
    """The unit's input (``which='input'``) or output over ``images``, running the model only up to the unit."""
    got: list[Value] = []

    def hook(mod: nn.Module, args: tuple, output: Any) -> None:
        got.append(args[0] if which == "input" else output)
        raise _Stop

    handle = unit.register_forward_hook(hook)
    try:
        for start in range(0, images.shape[0], batch_size):
            try:
                model(images[start:start + batch_size].to(device))
            except _Stop:
                pass
    finally:
        handle.remove()
    return Cached.pack(got)


@torch.no_grad()
def capture_gram(model: nn.Module, unit: nn.Module, batches: Iterable[Any]) -> Tensor:
    """``X^T X / N`` (float64) of the unit's real input, its rows every token of every sample of ``batches``.

    GPTQ's Hessian of a linear: ``model`` runs on each batch (already on its device) only up to the
    unit, and the Gram matrix is accumulated batch by batch, so the inputs themselves are never stored.
    """
    gram: list[Tensor] = []
    rows_seen = [0]

    def hook(mod: nn.Module, args: tuple) -> None:
        x = as_real(args[0]).detach()
        x = x.reshape(-1, x.shape[-1]).double()
        if not gram:
            gram.append(torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device))
        gram[0].addmm_(x.t(), x)
        rows_seen[0] += x.shape[0]
        raise _Stop

    handle = unit.register_forward_pre_hook(hook)
    try:
        for batch in batches:
            try:
                model(batch)
            except _Stop:
                pass
    finally:
        handle.remove()
    if not gram:
        raise ValueError("capture_gram: the unit never ran on these batches")
    return gram[0] / rows_seen[0]


def capture_fisher(model: nn.Module, unit: nn.Module, images: Tensor, device: torch.device,
                   batch_size: int) -> Cached:
    """Fisher weights of the unit's output: squared task-loss gradients, normalised to mean 1 (BRECQ).

    ``model`` is the float model (AdaRound's twin); the task loss is the cross-entropy of its logits
    against its own predictions, summed over the images, so each image's gradient is its own (there
    are no labels in calibration). The gradient is taken at the float model, the point BRECQ's
    second-order expansion is made at. Normalising to mean 1 over the cache keeps the weighted loss
    on the scale of the plain one, so ``adaround.reg_weight`` and the learning rates carry over.
    Computed once per unit; one forward and backward of the model per batch.
    """
    grads: list[Tensor] = []

    def hook(mod: nn.Module, args: tuple, output: Any) -> Any:
        leaf = as_real(output).detach().requires_grad_(True)
        grads.append(leaf)
        return QTensor.from_float(leaf) if isinstance(output, QTensor) else leaf

    handle = unit.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            for start in range(0, images.shape[0], batch_size):
                logits = as_real(model(images[start:start + batch_size].to(device)))
                F.cross_entropy(logits, logits.argmax(1).detach(), reduction="sum").backward()
    finally:
        handle.remove()
    sq = torch.cat([g.grad.detach().float().pow(2).cpu() for g in grads])
    mean = sq.mean()
    sq = sq / mean if float(mean) > 0 else torch.ones_like(sq)
    return Cached.pack([sq])


@torch.no_grad()
def precompute_norm(unit: nn.Module, inputs: Cached, device: torch.device, batch_size: int = 256) -> Cached | None:
    """The unit's first LayerNorm (before its quantizer) over every cached input, or None.

    Block and encoder units start with a LayerNorm that nothing trains (its input is the
    cache, its affine is frozen; only its output quantizer's LSQ step is learned), so it
    is computed once here instead of in every iteration. Stored as the real value in
    float32, which is what the output quantizer reads in training (``QTensor.real()``).
    None for units without one (``norm``), or when it would pass NORM_CACHE_MAX_BYTES.
    """
    norm = getattr(unit, "norm", None)
    if norm is None or not inputs.qtensor or len(inputs) == 0:
        return None
    if len(inputs) * inputs.v[0].numel() * 4 > NORM_CACHE_MAX_BYTES:
        return None
    idx = torch.arange(len(inputs))
    parts = [as_real(norm(inputs.take(idx[i:i + batch_size], device))).float().cpu()
             for i in range(0, len(inputs), batch_size)]
    return Cached(torch.cat(parts), qtensor=True)


def rows(x: Value, start: int, stop: int) -> Value:
    """Samples ``start:stop`` of a batch (a view)."""
    if isinstance(x, QTensor):
        return QTensor(x.v[start:stop], x.s, x.bits, x.signed)
    return x[start:stop]


def batches(inputs: Cached, targets: Cached, normed: Cached | None, size: int, iters: int, gen: torch.Generator,
            device: torch.device, fisher: Cached | None = None
            ) -> Iterator[tuple[Value, Tensor, Value | None, Tensor | None]]:
    """``iters`` training batches of ``size`` random samples: (inputs, real targets, normed inputs or None,
    Fisher weights or None).

    The indices of several iterations are drawn in one call (the same sequence as one call per
    iteration: a seeded run samples what it sampled before) and each cache is gathered once for
    them, then every iteration takes its slice. One gather per chunk instead of one per
    iteration and cache: the per-call cost of ``index_select`` was a few percent of a small
    unit's step. A chunk stays under BATCH_CHUNK_BYTES (one iteration per chunk for large units).
    """
    caches = [c for c in (inputs, targets, normed, fisher) if c is not None]
    per_iter = size * sum(c.v[0].numel() for c in caches) * 4
    chunk = max(1, min(iters, BATCH_CHUNK_BYTES // max(1, per_iter)))
    done = 0
    while done < iters:
        m = min(chunk, iters - done)
        idx = torch.randint(len(inputs), (m * size,), generator=gen)
        x, t = inputs.take(idx, device), targets.take_real(idx, device)
        n = normed.take(idx, device) if normed is not None else None
        w = fisher.take_real(idx, device) if fisher is not None else None
        for j in range(m):
            a, b = j * size, (j + 1) * size
            yield rows(x, a, b), t[a:b], None if n is None else rows(n, a, b), None if w is None else w[a:b]
        done += m
