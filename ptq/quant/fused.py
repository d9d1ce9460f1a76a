"""Evaluation's fused float32 kernels: the integers of the exact definitions, in fewer passes.

The quantized ViT's evaluation forward (no autograd) spends its time in elementwise passes at
the quantization points, not in the matmuls. Each function here replaces a chain of passes by
one compiled kernel and returns exactly the integers of its definition:

- :func:`requantize_float`: ``requant.requantize`` as float32 integers. The int64 / float64
  definition costs about six passes in 8-byte types per call.
- :func:`requantize_add`: the residual add (IdAdd) of two integer operands: requantize both
  unclamped, add, clamp once.
- :func:`quantize`: ``clamp(round(v * s_in / s))`` of a float tensor, the no-grad formula of
  ``qtensor.fake_quant`` on a dequantized value (same float32 operations, same order).

How the requantizers stay exact in float32 (error-free products): the integer ``q``
(``|q| < 2**24``) is split as ``q_hi + q_lo``, both with at most 12 significant bits, and the
exact ratio ``R = m / 2**e`` as ``r1 + r2 + r_lo`` (``r1``, ``r2``: 12 significant bits each,
``r_lo = fl32(R - r1 - r2)``). The four products of the 12-bit parts are exact float32
values; each is split into its nearest integer and a fraction (both exact), and
``q * r_lo`` (at most 2**-24 |q R|) is added to the fractions. The fractions sum to
``f`` within ``2**-20``, so ``round(q R)`` is the sum of the integers plus ``round(f)``
whenever ``f`` is farther than the tolerance 2**-19 from a half-integer: that row is certified.
Rows holding a value near a tie (about 2**-18 of the values), an exact tie, or a value
beyond 2**22 are recomputed by ``requant.apply_dyadic``. The result is the exact integers
everywhere, as float32; at INT16 (the residual stream) as much as at INT8. No step relies
on the rounding of a product (all are exact), so FMA contraction cannot change a result.
Narrow clamped outputs (INT8, UINT8) take a cheaper kernel instead, certified by one product's
error bound (:func:`certified_round_narrow`): more values fall in its band, but a third of the
arithmetic, and a row that falls back costs the same either way. int64 inputs with
``|q| < 2**35`` (I-LayerNorm's outputs, up to 2**31) are split into three 12-bit parts
(:func:`certified_round_wide`).

Each kernel is compiled once for all shapes (``torch.compile``, dynamic); where compilation
fails (no C++ compiler, an unsupported device) it runs eagerly, the same arithmetic.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable

import torch
from torch import Tensor

from ptq.quant import requant
from ptq.quant.qtensor import FLOAT32_EXACT, qrange
from ptq.quant.requant import ScaleLike

__all__ = ["quantize", "requantize_add", "requantize_float"]

log = logging.getLogger(__name__)

F32_LIMIT = 2**22  # certified outputs and clamp bounds stay below this: exact in float32, and so is a sum of two


class _Kernel:
    """A tensor function compiled on first use (dynamic shapes, one graph); eager if compilation fails.

    ``cpu_only``: compiled for CPU tensors only (a kernel whose exactness rests on the division
    being IEEE-rounded, which is tested on inductor's C++ backend). Inductor built with unsafe
    math (``TORCHINDUCTOR_CPP_ENABLE_UNSAFE_MATH_OPT_FLAG=1``, which allows reassociation) runs
    every kernel eagerly.
    """

    def __init__(self, fn: Callable[..., object], cpu_only: bool = False) -> None:
        self.fn = fn
        self.cpu_only = cpu_only
        self._compiled: Callable[..., object] | None = None
        self._eager = os.environ.get("TORCHINDUCTOR_CPP_ENABLE_UNSAFE_MATH_OPT_FLAG", "0") == "1"

    def __call__(self, *args: Tensor) -> object:
        if self._eager or (self.cpu_only and args[0].device.type != "cpu"):
            return self.fn(*args)
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, dynamic=True, fullgraph=True)
        try:
            return self._compiled(*args)
        except Exception as exc:  # no C++ compiler / unsupported backend: the same arithmetic, eagerly
            log.warning("torch.compile failed for %s (%s); it runs eagerly", self.fn.__name__, type(exc).__name__)
            self._eager = True
            return self.fn(*args)


def _split_round(p: Tensor) -> tuple[Tensor, Tensor]:
    """An exact float32 ``p`` as its nearest integer and the (exact) rest."""
    n = torch.round(p)
    return n, p - n


def _round_margin(q: Tensor, r: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``round_half_even(q * R)``, its certification margin (> 0: exact, see above), and ``~q * R``.

    ``r``: [4, C], the rows ``fl32(R)``, ``r1``, ``r2``, ``r_lo`` of :func:`ratio_f32`.
    """
    y = q * r[0]
    q_hi = torch.round(q * 2.0**-12) * 2.0**12
    q_lo = q - q_hi
    n1, f1 = _split_round(q_hi * r[1])
    n2, f2 = _split_round(q_hi * r[2])
    n3, f3 = _split_round(q_lo * r[1])
    n4, f4 = _split_round(q_lo * r[2])
    f = f1 + f2 + f3 + f4 + q * r[3]
    rf = torch.round(f)
    t = n1 + n2 + n3 + n4 + rf
    margin = 0.5 - (f - rf).abs() - (y.abs() * 2.0**-40 + 2.0**-19)
    ok = (y.abs() < F32_LIMIT) & (q.abs() < FLOAT32_EXACT)
    return t, torch.where(ok, margin, -1.0), y


def _clamp_certified(t: Tensor, margin: Tensor, y: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """``clamp(t, lo, hi)`` and each row's smallest margin, saturated values certified.

    Beyond a clamp bound by more than 1, every value within the error of ``y`` (relative
    2**-22, and ``|lo|, |hi| < F32_LIMIT``) clamps to that bound, however large ``y`` is.
    """
    margin = torch.where((y > hi + 1) | (y < lo - 1), 1.0, margin)
    return torch.clamp(t, lo, hi), margin.amin(-1)


def certified_round(q: Tensor, r: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """``clamp(round_half_even(q * R), lo, hi)`` of a [rows, C] float32 tensor, and each row's smallest margin.

    Values beyond ``F32_LIMIT`` are not certified, except saturated ones (:func:`_clamp_certified`).
    """
    t, margin, y = _round_margin(q, r)
    return _clamp_certified(t, margin, y, lo, hi)


def certified_round_narrow(q: Tensor, r: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`certified_round` for narrow clamped outputs (INT8, UINT8): one product, a wider band.

    ``y = fl32(q * fl32(R))`` is within ``|y| 2**-22 (1 + 2**-22)`` of ``q R``; where ``y`` is farther
    than ``|y| 2**-21 + 2**-20`` from every half-integer, ``round(y)`` is exact. For outputs below
    2**8 that band holds about 1 value in 8000: more rows fall back than with the split products,
    but the kernel does a third of their arithmetic.
    """
    y = q * r[0]
    t = torch.round(y)
    margin = 0.5 - (y - t).abs() - (y.abs() * 2.0**-21 + 2.0**-20)
    return _clamp_certified(t, torch.where(y.abs() >= F32_LIMIT, -1.0, margin), y, lo, hi)


def certified_round_wide(q: Tensor, r: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`certified_round` of an int64 ``q`` with ``|q| < 2**35`` (I-LayerNorm's 31-bit outputs).

    ``q`` is split exactly into three parts of at most 12 significant bits (``q0 + q1 2**12 +
    q2 2**24``); the nine products with ``r1``, ``r2``, ``r_lo`` (at most 8 bits) are exact, and
    their fractions, at most 4.5 in sum, are summed within 2**-19. Needs ``R <= 2**-2`` so that
    every partial integer sum of a certified value stays below 2**24 (see :func:`ratio_f32`).
    """
    q0 = q - (((q + 2048) >> 12) << 12)
    q12 = (q - q0) >> 12
    q1 = q12 - (((q12 + 2048) >> 12) << 12)
    parts = (q0.float(), q1.float() * 2.0**12, ((q12 - q1) >> 12).float() * 2.0**24)
    y = q.float() * r[0]
    n = torch.zeros_like(y)
    f = torch.zeros_like(y)
    for part in parts:
        for j in (1, 2, 3):
            nj, fj = _split_round(part * r[j])
            n = n + nj
            f = f + fj
    rf = torch.round(f)
    margin = 0.5 - (f - rf).abs() - (y.abs() * 2.0**-40 + 2.0**-18)
    margin = torch.where((y.abs() < F32_LIMIT) & (q.abs() < 2**35), margin, -1.0)
    return _clamp_certified(n + rf, margin, y, lo, hi)


def certified_add(qa: Tensor, ra: Tensor, qb: Tensor, rb: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """``clamp(round(qa * Ra) + round(qb * Rb), lo, hi)`` of [rows, C] float32 tensors, and each row's smallest margin.

    Both operands are certified below ``F32_LIMIT``, so their sum is an exact float32 integer.
    """
    ta, ma, _ = _round_margin(qa, ra)
    tb, mb, _ = _round_margin(qb, rb)
    return torch.clamp(ta + tb, lo, hi), torch.minimum(ma, mb).amin(-1)


def _quantize(v: Tensor, s_in: Tensor, s: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    return torch.clamp(torch.round((v * s_in) / s), lo, hi)


NARROW = 2**9  # clamped outputs with hi - lo below this take the one-product kernel
WIDE_RATIO = 2.0**-2  # the largest ratio the int64 kernel takes

_round_kernel = _Kernel(certified_round)
_narrow_kernel = _Kernel(certified_round_narrow)
_wide_kernel = _Kernel(certified_round_wide)
_add_kernel = _Kernel(certified_add)
_quantize_kernel = _Kernel(_quantize, cpu_only=True)

_RATIO_MEMO: dict[tuple, Tensor | None] = {}
_RATIO_MEMO_MAX = 4096


def ratio_f32(q: Tensor, s_in: ScaleLike, s_out: ScaleLike, bits: int) -> tuple[Tensor | None, Tensor, Tensor]:
    """``(r, m, e)``: ``(m, e)`` the pair's dyadic multiplier, ``r`` its float32 split [4, C] (see above).

    ``r`` is None where the kernels do not apply: ``q`` not a non-empty float32 or int64
    tensor, outputs wider than ``F32_LIMIT``, or a ratio outside [2**-90, 2**10] (the split's
    parts stay normal floats; ``q_hi * r1`` stays below 2**24 for certified values), for
    int64 outside [2**-90, ``WIDE_RATIO``]. Memoised on the pair's ``requant.pair_key``, the
    width, the device and the dtype.
    """
    key = requant.pair_key(s_in, s_out)
    m, e = requant.multiplier_of(key, s_in, s_out)
    lo, hi = qrange(bits)
    if q.dtype not in (torch.float32, torch.int64) or q.numel() == 0 or q.dim() == 0 or max(-lo, hi) > F32_LIMIT:
        return None, m, e
    channels = q.shape[-1]
    top = WIDE_RATIO if q.dtype == torch.int64 else 2.0**10
    rkey = (key, channels, str(q.device), top)
    if rkey not in _RATIO_MEMO:
        r = None
        if m.dim() == 0 or (m.dim() == 1 and m.numel() in (1, channels) and e.shape == m.shape):
            exact = (m.double() * requant.pow2_f64(-e.clamp(-1022, 1022))).reshape(-1).expand(channels)
            mag = exact.abs()
            if bool(((mag > 2.0**-90) & (mag <= top)).all()):
                r1 = _top12(exact)
                r2 = _top12(exact - r1)
                parts = torch.stack([exact, r1, r2, exact - r1 - r2])
                r = parts.float().contiguous().to(q.device)
        if len(_RATIO_MEMO) >= _RATIO_MEMO_MAX:
            _RATIO_MEMO.clear()
        _RATIO_MEMO[rkey] = r
    return _RATIO_MEMO[rkey], m, e


def _top12(x: Tensor) -> Tensor:
    """float64 ``x`` rounded to 12 significant bits (exact arithmetic: frexp and power-of-two scaling)."""
    mant, ex = torch.frexp(x)
    return torch.ldexp(torch.round(torch.ldexp(mant, torch.tensor(12))), ex - 12)


@functools.lru_cache(maxsize=64)
def _bounds(lo: float, hi: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """Clamp bounds as 0-d float32 tensors, made once per range and device (kernels only read them)."""
    return torch.tensor(float(lo), device=device), torch.tensor(float(hi), device=device)


def _uncertified(margin: Tensor) -> Tensor | None:
    """Indices of the rows whose margin is not > 0 (None when every row is certified)."""
    bad = ~(margin > 0)
    return bad.nonzero().squeeze(1) if bool(bad.any()) else None


def requantize_float(q: Tensor, s_in: ScaleLike, s_out: ScaleLike, bits: int, signed: bool = True,
                     clamp: bool = True) -> Tensor | None:
    """``requant.requantize`` with float32 integers out: the same integers, one fused float32 pass.

    Inputs the kernel does not take (see :func:`ratio_f32`) go through ``apply_dyadic``.
    Returns None only when ``clamp=False`` and a result reaches 2**22, where float32
    integers would stop being exact under a residual add: the caller then keeps int64.
    """
    lo, hi = qrange(bits, signed)
    r, m, e = ratio_f32(q, s_in, s_out, bits)
    if r is None:
        return _as_float32(requant.apply_dyadic(q, m, e, lo, hi, clamp), clamp)
    inf = float("inf")
    lo_t, hi_t = _bounds(lo, hi, q.device) if clamp else _bounds(-inf, inf, q.device)
    q2 = q.reshape(-1, q.shape[-1])
    if q.dtype == torch.int64:
        kernel = _wide_kernel
    else:
        kernel = _narrow_kernel if clamp and hi - lo < NARROW else _round_kernel
    out, margin = kernel(q2, r, lo_t, hi_t)
    rows = _uncertified(margin)
    if rows is not None:
        exact = _as_float32(requant.apply_dyadic(q2.index_select(0, rows), m, e, lo, hi, clamp), clamp)
        if exact is None:
            return None
        out.index_copy_(0, rows, exact)
    return out.view(q.shape)


def requantize_add(qa: Tensor, sa: ScaleLike, qb: Tensor, sb: ScaleLike, s_out: ScaleLike, bits: int,
                   signed: bool = True) -> Tensor | None:
    """IdAdd as float32 integers: ``clamp(requantize(qa) + requantize(qb))``, both operands unclamped.

    None where the fused kernel does not apply (operand shapes differ, or see
    :func:`ratio_f32`); the caller then takes the int64 definition.
    """
    if qa.shape != qb.shape or qa.dtype != torch.float32 or qb.dtype != torch.float32:
        return None
    ra, ma, ea = ratio_f32(qa, sa, s_out, bits)
    rb, mb, eb = ratio_f32(qb, sb, s_out, bits)
    if ra is None or rb is None:
        return None
    lo, hi = qrange(bits, signed)
    c = qa.shape[-1]
    qa2, qb2 = qa.reshape(-1, c), qb.reshape(-1, c)
    out, margin = _add_kernel(qa2, ra, qb2, rb, *_bounds(lo, hi, qa.device))
    rows = _uncertified(margin)
    if rows is not None:
        exact_a = requant.apply_dyadic(qa2.index_select(0, rows), ma, ea, lo, hi, clamp=False)
        exact_b = requant.apply_dyadic(qb2.index_select(0, rows), mb, eb, lo, hi, clamp=False)
        out.index_copy_(0, rows, requant.clamp_int(exact_a + exact_b, bits, signed).to(torch.float32))
    return out.view(qa.shape)


def quantize(v: Tensor, s_in: Tensor, s: Tensor, lo: int, hi: int) -> Tensor:
    """``clamp(round_half_even(v * s_in / s), lo, hi)`` of a float tensor ``v`` at scale ``s_in``, one pass.

    The same float32 operations in the same order as the eager formula, so the same integers
    (tested bit for bit). ``s_in``: 0-d or per channel over the last dim; ``s``: 0-d.
    """
    v = v.float()
    if v.dim() == 0 or v.numel() == 0 or s.numel() != 1 or s_in.dtype != torch.float32 or s.dtype != torch.float32:
        return torch.clamp(torch.round((v * s_in) / s), lo, hi)
    v2 = v.reshape(-1, v.shape[-1])
    out = _quantize_kernel(v2, s_in, s.reshape(()), *_bounds(lo, hi, v.device))
    return out.view(v.shape)


def _as_float32(q: Tensor, clamp: bool) -> Tensor | None:
    """int64 results as float32; None when unclamped values reach 2**22 (see requantize_float)."""
    if not clamp and q.numel() and int(q.abs().max()) >= F32_LIMIT:
        return None
    return q.to(torch.float32)
