"""The value that flows through a quantized ViT, and the rounding primitives.

A :class:`QTensor` is a pair ``(v, s)`` whose real value is ``v * s``. When
``bits`` is set, ``v`` holds integers (stored in a float tensor so autograd
can pass through) at scale ``s``: a scalar, or a vector over the last dim
(per channel). When ``bits`` is None the pair is an ordinary float tensor.
Keeping integers and scales apart is what lets the simulation compute what
integer hardware computes (dyadic requantization, integer kernels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

INT32_MAX = 2**31 - 1  # largest int32; also the low-31-bit mask of the requantizer's split products
FLOAT32_EXACT = 2**24  # float32 holds every integer up to this (24-bit significand)
FLOAT64_EXACT = 2**53  # float64 likewise (53-bit significand)


def qrange(bits: int, signed: bool = True) -> tuple[int, int]:
    """Integer range of a ``bits``-wide tensor: signed [-2^(b-1), 2^(b-1)-1] or unsigned [0, 2^b-1]."""
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be in [1, 32], got {bits}")
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def qmax(bits: int, signed: bool = True) -> int:
    """Largest positive integer of the range: what an absmax scale maps the absmax to."""
    return qrange(bits, signed)[1]


def round_ste(x: Tensor) -> Tensor:
    """Round half to even in the forward pass, identity gradient (straight-through)."""
    return x + (torch.round(x) - x).detach()


class _FakeQuant(torch.autograd.Function):
    """clamp(round(x / s)) as one autograd node: straight-through for x, LSQ's step gradient for s."""

    @staticmethod
    def forward(ctx, x: Tensor, s: Tensor, lo: int, hi: int) -> Tensor:  # type: ignore[override]
        xs = x / s
        q = torch.clamp(torch.round(xs), lo, hi)
        ctx.save_for_backward(xs, s)
        ctx.bounds = (lo, hi)
        return q

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        xs, s = ctx.saved_tensors
        lo, hi = ctx.bounds
        inside = (xs >= lo) & (xs <= hi)
        g_in = torch.where(inside, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
        grad_x = g_in / s if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            # d clamp(round(x/s)) / ds = -x/s^2 inside the range (straight-through round), 0 outside
            grad_s = (-(g_in * xs).sum() / s).reshape(s.shape) if s.numel() == 1 else None
        return grad_x, grad_s, None, None


def fake_quant(x: Tensor, s: Tensor, lo: int, hi: int) -> Tensor:
    """Integers clamp(round_half_even(x / s), lo, hi) of a float tensor, differentiable (STE + LSQ)."""
    if not (x.requires_grad or s.requires_grad):
        return torch.clamp(torch.round(x / s), lo, hi)
    return _FakeQuant.apply(x, s, lo, hi)


def grad_scale(x: Tensor, factor: float) -> Tensor:
    """Same value as ``x``, gradient multiplied by ``factor`` (LSQ's step-size gradient scaling)."""
    scaled = x * factor
    return scaled + (x - scaled).detach()


def ste_attach(exact: Tensor, soft: Tensor) -> Tensor:
    """Forward value of ``exact``, gradient of ``soft``: how integer kernels stay trainable."""
    if not soft.requires_grad:
        return exact.to(soft.dtype)
    return soft + (exact.to(soft.dtype) - soft).detach()


@dataclass
class QTensor:
    """Integers (or floats) ``v`` at scale ``s``; ``bits`` is None for an unquantized float tensor."""

    v: Tensor
    s: Tensor
    bits: int | None = None
    signed: bool = True

    @staticmethod
    def from_float(x: Tensor) -> QTensor:
        """Wrap a float tensor (scale 1, not quantized)."""
        return QTensor(x, torch.ones((), dtype=torch.float32, device=x.device), None)

    @property
    def integer(self) -> bool:
        """True when ``v`` holds integers (a quantized tensor or an integer accumulator)."""
        return self.bits is not None

    @property
    def per_channel(self) -> bool:
        return self.s.dim() > 0 and self.s.numel() > 1

    def real(self) -> Tensor:
        """Dequantized value ``v * s`` in float32."""
        return self.v.float() * self.s

    def plain(self) -> Tensor:
        """The real value, without a multiplication where the scale is the float wrapper's 1 (the QDQ
        export traces this: no Cast / Mul between a DequantizeLinear and the MatMul it feeds)."""
        if self.bits is None and self.s.dim() == 0 and float(self.s) == 1.0 and self.v.dtype == torch.float32:
            return self.v
        return self.real()

    def dequant(self) -> QTensor:
        """The same value as a plain float QTensor."""
        return QTensor.from_float(self.real())
