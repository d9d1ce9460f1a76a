"""The dyadic requantizer of spec/integer-ops.md: integers at one scale to integers at another.

``requantize(q, s_in, s_out, bits)`` writes the float ratio ``s_in / s_out`` as ``m / 2**e``
(:func:`dyadic`) and returns ``round_half_to_even(q * m / 2**e)`` clamped to ``bits``, exactly:
intermediates are int64 (or a float64 path taken only where it is provably exact). Every
join between two integer operations of the quantized ViT, the residual adds and the
integer program's ``requantize`` op go through :func:`apply_dyadic`, so there is one
definition of the rounding. :func:`multiplier` is the memoised ``(m, e)`` of a scale pair,
shared by the simulation and the exporter.

Evaluation's hot path, the same integers from fused float32 kernels, is ``ptq.quant.fused``;
it uses :func:`pair_key` / :func:`multiplier_of` to share this module's memo.

Valid inputs: exact for ``|q| <= 2**59`` (``clamp=False`` with a ratio >= 1: ``|q| <= 2**32``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ptq.quant.qtensor import INT32_MAX, qrange

__all__ = ["apply_dyadic", "as_int64", "clamp_int", "dyadic", "multiplier", "multiplier_of", "pair_key", "pow2_f64",
           "requantize", "scale_f64"]

_INT64_MAX = 2**63 - 1
_MASK30 = 2**30 - 1
# float64 round-to-integer constant: for |v| < 2**51, v + 1.5 * 2**52 is rounded half-to-even
# to an integer and its bit pattern is bits(1.5 * 2**52) + round(v)
_MAGIC = 1.5 * 2.0**52
_MAGIC_BITS = 0x4338000000000000

ScaleLike = float | Tensor


def as_int64(q: Tensor) -> Tensor:
    """``q`` as int64 (no copy when it already is); float tensors must hold integers."""
    return q if q.dtype == torch.int64 else q.to(torch.int64)


def scale_f64(s: ScaleLike) -> Tensor:
    """A (possibly per-channel) scale rounded to float32, then widened to float64."""
    return torch.as_tensor(s).detach().to(torch.float32).to(torch.float64)


def clamp_int(q: Tensor, bits: int, signed: bool = True) -> Tensor:
    """Clamp integers to the range of ``bits`` (signed or unsigned); int64 out.

    Used after a residual add: both operands are requantized unclamped to the common
    scale, added, then clamped once (spec, "requantize").
    """
    lo, hi = qrange(bits, signed)
    return torch.clamp(as_int64(q), lo, hi)


def dyadic(ratio: ScaleLike) -> tuple[Tensor, Tensor]:
    """Dyadic form ``m / 2**e`` of a float ratio (any shape, float32 or float64).

    ``ratio = M * 2**E`` with ``0.5 <= |M| < 1`` (frexp); ``m = sign(M) * floor(|M| * 2**31 + 1/2)``
    (round half up of the magnitude) and ``e = 31 - E``. ``|m|`` may equal ``2**31`` when
    ``|M|`` is just below 1; it is kept exact. Zero gives ``(0, 31)``. Relative error of
    ``m / 2**e`` is at most ``2**-32 / |M| <= 2**-31``. Returns int64 tensors.
    """
    if isinstance(ratio, Tensor):
        r = ratio.detach().to(torch.float64)
    else:  # Python numbers are float64 already; as_tensor would round them to float32
        r = torch.as_tensor(ratio, dtype=torch.float64)
    if not bool(torch.isfinite(r).all()):
        raise ValueError("dyadic: ratio must be finite")
    mant, expo = torch.frexp(r)
    # |M| * 2**31 is exact (power-of-two scaling); adding 0.5 is exact below 2**31 and
    # can only round to a value in [2**31, 2**31 + 1) above it, so floor stays exact.
    mag = torch.floor(mant.abs() * 2.0**31 + 0.5)
    m = torch.copysign(mag, mant).to(torch.int64)
    e = 31 - expo.to(torch.int64)
    return m, e


def pow2_f64(k: Tensor) -> Tensor:
    """Exact float64 ``2**k`` for int64 ``k`` in [-1022, 1023] (built from the exponent bits)."""
    return ((k + 1023) << 52).view(torch.float64)


def _rhe_shift(p: Tensor, k: Tensor | int) -> Tensor:
    """``round_half_to_even(p / 2**k)`` for int64 ``p`` and ``1 <= k <= 63``.

    ``(p + 2**(k-1) - 1 + bit_k(p)) >> k``: adding the parity of the floor quotient turns
    round-half-down into round-half-to-even. Needs ``p + 2**(k-1)`` to fit in int64
    (always true for ``|p| < 2**62``).
    """
    h1 = (1 << (k - 1)) - 1
    out = (p >> k).bitwise_and_(1)
    return out.add_(p).add_(h1).bitwise_right_shift_(k)


def _limb_round(q: Tensor, m: Tensor | int, e: Tensor | int) -> Tensor:
    """``round_half_to_even(q * m / 2**e)`` for ``e >= 31``, ``|q| <= 2**59``, ``|m| < 2**31``.

    ``q * m`` may not fit int64, so it is formed as ``W * 2**31 + v`` (``0 <= v < 2**31``)
    from the limbs of ``q``; bits of ``v`` below the half bit of any ``e >= 31`` only matter
    through whether they are nonzero, so they collapse into one sticky bit:
    ``p2 = 4W + 2*bit30(v) + (v mod 2**30 != 0)`` and the answer is ``round(p2 / 2**(e-29))``.
    """
    qh = q >> 31
    t = (q & INT32_MAX) * m  # |t| < 2**62
    w = qh * m + (t >> 31)  # |w| < 2**60
    v = t & INT32_MAX
    p2 = (w << 2) | ((v >> 30) << 1) | ((v & _MASK30) != 0).to(torch.int64)
    k = e - 29
    k = k.clamp(max=63) if isinstance(k, Tensor) else min(k, 63)
    return _rhe_shift(p2, k)


def _shl_saturate(val: Tensor, k: Tensor | int) -> Tensor:
    """``val * 2**k`` for ``k >= 0``, saturating at +-(2**63 - 1) instead of overflowing."""
    k = k.clamp(0, 63) if isinstance(k, Tensor) else min(max(k, 0), 63)
    lim = _INT64_MAX >> k
    out = val << k
    out = torch.where(val > lim, _INT64_MAX, out)
    return torch.where(val < -lim, -_INT64_MAX, out)


def _as_param(x: Tensor) -> Tensor | int:
    """0-d int64 tensors become Python ints (cheaper scalar ops); others stay tensors."""
    return int(x) if x.dim() == 0 else x


def apply_dyadic(
    q: Tensor,
    m: Tensor,
    e: Tensor,
    lo: int,
    hi: int,
    clamp: bool = True,
    path: str | None = None,
) -> Tensor:
    """``round_half_to_even(q * m / 2**e)``, clamped to ``[lo, hi]`` when ``clamp``.

    ``m``, ``e`` are int64 tensors broadcasting against ``q``. ``path`` forces an
    implementation (``"float"``, ``"int"``, ``"general"``) for tests; by default the
    cheapest exact one is chosen from one ``aminmax`` over ``q``:

    * float: float64 ``q * (m * 2**-e) + 1.5 * 2**52`` in one ``addcmul``, exact when
      ``|q| * |m| < 2**51`` and ``e >= 0``: the product is an integer below 2**51 times a
      power of two, and adding the constant rounds it half-to-even to an integer whose bit
      pattern, minus the constant's, is the int64 result (no separate round / cast pass);
    * int: int64 ``q * m`` then a rounding shift, exact when ``|q| * |m| < 2**62``, ``e >= 1``;
    * general: any ``e``, ``|q| <= 2**59`` (two-limb product for ``e >= 31``, saturating left
      shift for ``e <= 0``).
    """
    if q.numel() == 0:
        return torch.empty(torch.broadcast_shapes(q.shape, m.shape), dtype=torch.int64, device=q.device)
    m = m.to(q.device)
    e = e.to(q.device)
    # |m| == 2**31 -> (2**30, e - 1): same value, and |m| < 2**31 everywhere below.
    top = m.abs() == 2**31
    if bool(top.any()):
        m = torch.where(top, m // 2, m)
        e = torch.where(top, e - 1, e)
    m_abs = int(m.abs().max())
    e_min, e_max = int(e.min()), int(e.max())
    qmin, qmax = torch.aminmax(q)
    q_abs = int(max(-qmin, qmax))

    if path is None:
        if e_min >= 0 and q_abs * m_abs < 2**51:
            path = "float"
        elif e_min >= 1 and q_abs * m_abs < 2**62:
            path = "int"
        else:
            path = "general"

    if path == "float":
        shape = torch.broadcast_shapes(q.shape, m.shape)
        scale = m.to(torch.float64) * pow2_f64(-e.clamp(max=1022))  # exact: |m| < 2**31
        # 1-d operands so that type promotion computes in float64 whatever q's dtype
        magic = torch.full((1,), _MAGIC, dtype=torch.float64, device=q.device)
        y = torch.addcmul(magic, q, scale.reshape(-1) if scale.dim() == 0 else scale)
        if y.shape != shape:
            y = y.reshape(shape)
        if clamp:
            y.clamp_(_MAGIC + lo, _MAGIC + hi)
        return y.view(torch.int64).sub_(_MAGIC_BITS)

    qi = as_int64(q)
    if path == "int":
        out = _rhe_shift(qi * _as_param(m), _as_param(e.clamp(max=63)))
        return out.clamp_(lo, hi) if clamp else out

    # general path. Pre-clamp q where it cannot change the result: with a ratio
    # m / 2**e >= 2**(-e+30), |q| >= 2**(e+2) already gives |out| >= 2**32, beyond any
    # clamp range of <= 32 bits; this keeps every product below in int64.
    if clamp:
        qexp = (e + 2).clamp(2, 59)
    else:
        qexp = torch.where(e <= 30, 32, 59)
    bound = torch.ones_like(qexp) << qexp
    if q_abs > int(bound.min()):
        qi = torch.clamp(qi, -bound, bound)
    out: Tensor | None = None
    if e_max >= 31:  # ratio < 1
        out = _limb_round(qi, m, e.clamp(min=31))
    if e_min <= 30 and e_max >= 1:  # 1 <= ratio < 2**30
        mid = _rhe_shift(qi * m, e.clamp(1, 30))
        out = mid if out is None else torch.where(e <= 30, mid, out)
    if e_min <= 0:  # ratio >= 2**30: exact left shift, saturating
        low = _shl_saturate(qi * m, -e)
        out = low if out is None else torch.where(e <= 0, low, out)
    assert out is not None
    return out.clamp_(lo, hi) if clamp else out


def requantize(
    q: Tensor,
    s_in: ScaleLike,
    s_out: ScaleLike,
    bits: int,
    signed: bool = True,
    clamp: bool = True,
) -> Tensor:
    """Integers ``q`` at ``s_in`` to integers at ``s_out`` with the dyadic multiplier (spec).

    ``out = round_half_to_even(q * m / 2**e)`` with ``(m, e) = dyadic(s_in / s_out)``, the
    ratio taken in float64 from the float32 scales. Scales may be Python floats, 0-d
    tensors or 1-d tensors broadcasting over the last dim of ``q`` (per channel). Output
    is clamped to the ``bits`` range unless ``clamp=False`` (residual adds: requantize each
    operand unclamped, add, then ``clamp_int`` once). Exact for ``|q| <= 2**59``; with
    ``clamp=False`` and a ratio >= 1, ``|q|`` beyond ``2**32`` saturates there, and results
    beyond int64 saturate at ``+-(2**63 - 1)``.
    """
    lo, hi = qrange(bits, signed)
    m, e = multiplier(s_in, s_out)
    return apply_dyadic(q, m, e, lo, hi, clamp)


_DYADIC_MEMO: dict[tuple, tuple[Tensor, Tensor]] = {}
_DYADIC_MEMO_MAX = 4096


def _memo_key(s: ScaleLike) -> tuple:
    if isinstance(s, Tensor):
        t = s.detach().to(torch.float32).cpu()
        return (tuple(t.shape), t.numpy().tobytes())
    return ((), float(torch.tensor(float(s), dtype=torch.float32)))


def multiplier(s_in: ScaleLike, s_out: ScaleLike) -> tuple[Tensor, Tensor]:
    """``dyadic(s_in / s_out)``, memoised on the float32 values of the scales.

    A calibrated model requantizes with the same scale pairs on every forward pass;
    the multiplier is a pure function of those float32 values, so this is exact.
    """
    return multiplier_of(pair_key(s_in, s_out), s_in, s_out)


def pair_key(s_in: ScaleLike, s_out: ScaleLike) -> tuple:
    """The memo key of a scale pair: their float32 values (shape and bytes)."""
    return (_memo_key(s_in), _memo_key(s_out))


def multiplier_of(key: tuple, s_in: ScaleLike, s_out: ScaleLike) -> tuple[Tensor, Tensor]:
    """:func:`multiplier` for a caller that has the pair's :func:`pair_key` already."""
    hit = _DYADIC_MEMO.get(key)
    if hit is None:
        if len(_DYADIC_MEMO) >= _DYADIC_MEMO_MAX:
            _DYADIC_MEMO.clear()
        hit = dyadic(scale_f64(s_in) / scale_f64(s_out))
        _DYADIC_MEMO[key] = hit
    return hit

