"""The dyadic requantizer of spec/integer-ops.md: integers at one scale to integers at another.

``requantize(q, s_in, s_out, bits)`` writes the float ratio ``s_in / s_out`` as ``m / 2**e``
(:func:`dyadic`) and returns ``round_half_to_even(q * m / 2**e)`` clamped to ``bits``, exactly:
intermediates are int64 (or a float64 path taken only where it is provably exact). Every
join between two integer operations of the quantized ViT, the residual adds and the
integer program's ``requantize`` op go through :func:`apply_dyadic`, so there is one
definition of the rounding. :func:`multiplier` is the memoised ``(m, e)`` of a scale pair,
shared by the simulation and the exporter.

:func:`requantize_float` is the evaluation hot path: the same integers as float32, from one fused
float32 pass that certifies each row exact, the rows it cannot certify recomputed by
:func:`apply_dyadic`.

Valid inputs: exact for ``|q| <= 2**59`` (``clamp=False`` with a ratio >= 1: ``|q| <= 2**32``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor

from ptq.quant.qtensor import qrange

__all__ = ["apply_dyadic", "as_int64", "clamp_int", "dyadic", "multiplier", "requantize", "requantize_float",
           "scale_f64"]

log = logging.getLogger(__name__)

_INT64_MAX = 2**63 - 1
_MASK31 = 2**31 - 1
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


def _pow2_f64(k: Tensor) -> Tensor:
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
    t = (q & _MASK31) * m  # |t| < 2**62
    w = qh * m + (t >> 31)  # |w| < 2**60
    v = t & _MASK31
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
        scale = m.to(torch.float64) * _pow2_f64(-e.clamp(max=1022))  # exact: |m| < 2**31
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
    return _multiplier(_pair_key(s_in, s_out), s_in, s_out)


def _pair_key(s_in: ScaleLike, s_out: ScaleLike) -> tuple:
    return (_memo_key(s_in), _memo_key(s_out))


def _multiplier(key: tuple, s_in: ScaleLike, s_out: ScaleLike) -> tuple[Tensor, Tensor]:
    hit = _DYADIC_MEMO.get(key)
    if hit is None:
        if len(_DYADIC_MEMO) >= _DYADIC_MEMO_MAX:
            _DYADIC_MEMO.clear()
        hit = dyadic(scale_f64(s_in) / scale_f64(s_out))
        _DYADIC_MEMO[key] = hit
    return hit


# ----------------------------------------------------------------------------- float32 hot path
#
# Evaluation requantizes float32 integer accumulators at every quantization point. The int64 /
# float64 paths above cost about six passes over the tensor in 8-byte types; float64 does not
# vectorise well in inductor's CPU kernels either. The kernel below works in float32 only and
# proves its own result: with r = fl32(m / 2**e) (relative error <= 2**-24) and y = fl32(q * r)
# (another 2**-24), |y - q*m/2**e| <= |y| * 2**-22 (1 + 2**-22). Where y is farther than
# TOL(y) = |y| * 2**-21 + 2**-20 from every half-integer, no value in that interval rounds
# differently, so round_half_even(y) is the exact result (the absolute 2**-20 also covers the
# float32 rounding of the margin itself). Exact ties always fall inside the band and are
# recomputed. A fraction of about 2 * TOL of the elements is uncertified (about 1 in 8000 for
# INT8 outputs); their rows are recomputed by apply_dyadic, so the result is exact everywhere.

_F32_LIMIT = 2**22  # certified outputs and clamp bounds stay below this: exact in float32, and so is a sum of two
_F32_MEMO: dict[tuple, Tensor | None] = {}


def _certified_round(q: Tensor, r: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """``clamp(round_half_even(q * r), lo, hi)`` of a [rows, C] float32 tensor, and each row's smallest margin.

    A row whose margin is > 0 holds the exact requantized integers (see the proof above).
    Values beyond ``_F32_LIMIT`` are not certified, except saturated ones: beyond a clamp
    bound by more than 1, every value within the error interval clamps to that bound.
    """
    y = q * r
    t = torch.round(y)
    margin = 0.5 - (y - t).abs() - (y.abs() * 2.0**-21 + 2.0**-20)
    margin = torch.where(y.abs() >= _F32_LIMIT, -1.0, margin)
    margin = torch.where((y > hi + 1) | (y < lo - 1), 1.0, margin)
    return torch.clamp(t, lo, hi), margin.amin(-1)


_kernel: Callable[..., tuple[Tensor, Tensor]] | None = None


def _fused_kernel() -> Callable[..., tuple[Tensor, Tensor]]:
    """:func:`_certified_round` compiled once for all shapes (one fused pass); eager if compilation fails."""
    global _kernel
    if _kernel is None:
        _kernel = torch.compile(_certified_round, dynamic=True, fullgraph=True)
    return _kernel


def _run_kernel(q2: Tensor, r: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    global _kernel
    try:
        return _fused_kernel()(q2, r, lo, hi)
    except Exception as exc:  # no C++ compiler / unsupported backend: the same arithmetic, eagerly
        if _kernel is _certified_round:
            raise
        log.warning("torch.compile failed for the float32 requantizer (%s); it runs eagerly", type(exc).__name__)
        _kernel = _certified_round
        return _kernel(q2, r, lo, hi)


def _ratio_f32(key: tuple, m: Tensor, e: Tensor, channels: int, device: torch.device) -> Tensor | None:
    """float32 ``m / 2**e`` as a [channels] vector, or None where it is not a normal float32.

    Memoised on the scale pair's memo key (see :func:`multiplier`), the width and the device.
    """
    key = (key, channels, str(device))
    if key in _F32_MEMO:
        return _F32_MEMO[key]
    if m.dim() > 1 or (m.dim() == 1 and m.numel() not in (1, channels)) or e.shape != m.shape:
        r = None
    else:
        exact = m.double() * _pow2_f64(-e.clamp(-1022, 1022))
        mag = exact.abs()
        ok = bool(((mag > 2.0**-120) & (mag < 2.0**120)).all())
        r = exact.float().reshape(-1).expand(channels).contiguous().to(device) if ok else None
    if len(_F32_MEMO) >= _DYADIC_MEMO_MAX:
        _F32_MEMO.clear()
    _F32_MEMO[key] = r
    return r


def requantize_float(
    q: Tensor,
    s_in: ScaleLike,
    s_out: ScaleLike,
    bits: int,
    signed: bool = True,
    clamp: bool = True,
) -> Tensor | None:
    """:func:`requantize` with float32 integers out: the same integers, one fused float32 pass.

    For a float32 ``q`` with scales over its last dim, :func:`_certified_round` computes every
    row and certifies it; uncertified rows (ties, values near a tie, values beyond 2**22) are
    recomputed exactly by :func:`apply_dyadic`. Other inputs take :func:`requantize`. Returns
    None only when ``clamp=False`` and a result reaches 2**22, where float32 integers would
    stop being exact under a residual add: the caller then keeps int64.
    """
    lo, hi = qrange(bits, signed)
    key = _pair_key(s_in, s_out)
    m, e = _multiplier(key, s_in, s_out)
    r = None
    if q.dtype == torch.float32 and q.numel() > 0 and q.dim() >= 1 and max(-lo, hi) <= _F32_LIMIT:
        r = _ratio_f32(key, m, e, q.shape[-1], q.device)
    if r is None:
        out = apply_dyadic(q, m, e, lo, hi, clamp)
        return _as_float32(out, clamp)
    inf = float("inf")
    lo_t = torch.tensor(float(lo) if clamp else -inf, device=q.device)
    hi_t = torch.tensor(float(hi) if clamp else inf, device=q.device)
    q2 = q.reshape(-1, q.shape[-1])
    out, margin = _run_kernel(q2, r, lo_t, hi_t)
    bad = ~(margin > 0)
    if bool(bad.any()):
        rows = bad.nonzero().squeeze(1)
        exact = _as_float32(apply_dyadic(q2.index_select(0, rows), m, e, lo, hi, clamp), clamp)
        if exact is None:
            return None
        out.index_copy_(0, rows, exact)
    return out.view(q.shape)


def _as_float32(q: Tensor, clamp: bool) -> Tensor | None:
    """int64 results as float32; None when unclamped values reach 2**22 (see requantize_float)."""
    if not clamp and q.numel() and int(q.abs().max()) >= _F32_LIMIT:
        return None
    return q.to(torch.float32)
