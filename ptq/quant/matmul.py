"""Exact integer products of quantized operands: the accumulators of linear layers and attention matmuls.

Integer accumulators are computed exactly in float arithmetic: float32 while every partial sum stays
below 2**24, chunks summed in float64 beyond it (int64 where even that could round).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ptq.quant.qtensor import FLOAT32_EXACT, FLOAT64_EXACT, QTensor, qrange
from ptq.quant.symbolic import graph_of


def _magnitude(bits: int | None, signed: bool) -> int:
    lo, hi = qrange(bits, signed)
    return max(-lo, hi)


def exact_matmul(a: Tensor, b: Tensor, a_max: int, b_max: int) -> Tensor:
    """``a @ b`` for integer-valued tensors, exact (float32 when that is exact, else float64).

    float32 sums integers exactly while every partial sum stays below 2**24,
    so K is split into chunks of at most 2**24 / (a_max * b_max) terms, each
    chunk multiplied in float32 and the chunks summed in float64.
    ``a``: [..., T, K]; ``b``: [..., K, N] (broadcasting batch dims).
    """
    k = a.shape[-1]
    if a_max * b_max > FLOAT32_EXACT:  # even single products leave float32: use float64 (exact below 2**53)
        if k * a_max * b_max >= FLOAT64_EXACT:
            return (a.long() @ b.long()).double()
        return a.double() @ b.double()
    chunk = FLOAT32_EXACT // max(1, a_max * b_max)
    a32, b32 = a.float(), b.float()
    if k <= chunk:
        return a32 @ b32  # every partial sum is an integer below 2**24: exact in float32
    n = math.ceil(k / chunk)
    pad = n * chunk - k
    a32 = F.pad(a32, (0, pad)).unflatten(-1, (n, chunk)).movedim(-2, -3)  # [..., n, T, chunk]
    b32 = F.pad(b32, (0, 0, 0, pad)).unflatten(-2, (n, chunk))  # [..., n, chunk, N]
    return (a32 @ b32).double().sum(-3)


def int_matmul(a: QTensor, b: QTensor, scale: float = 1.0, name: str = "matmul", kind: str = "matmul") -> QTensor:
    """Product of two per-tensor quantized operands: an integer accumulator when both are integer.

    ``name`` / ``kind`` label the product in an exported integer program (``scores``, ``context``).
    """
    s = a.s * b.s * scale
    g = graph_of(a.v)
    if g is not None:  # exporting: the integer product, its scale as above
        return QTensor(g.matmul(a.v, b.v, name, kind), s, 32)
    if a.integer and b.integer and not torch.is_grad_enabled():
        acc = exact_matmul(a.v, b.v, _magnitude(a.bits, a.signed), _magnitude(b.bits, b.signed))
        return QTensor(acc, s, 32)
    return QTensor(a.v.float() @ b.v.float(), s, 32 if a.integer and b.integer else None)
