"""Integer-only kernels of the I-ViT backend: dyadic requantizer, Shiftmax, ShiftGELU, I-LayerNorm.

The contract is the spec ``/work/shared/spec/integer-ops.md``: every function here
returns the integers that exact integer arithmetic on the spec's formulas gives, bit
for bit. Intermediates are int64 (float32 holds integers only to
2**24); ``requantize`` has a float64 fast path that is taken only when it is provably
exact. All reductions run over the last dimension; inputs may have any rank.

Conventions (from the spec):

* a quantized tensor is integers ``q`` and a float32 scale ``s`` (real value ``q * s``);
  ``q`` may be an int64/int32 tensor or a float tensor holding integers;
* constants derived from a scale (``x0 = floor(-1 / s)``, ``1.702 * s``, the dyadic
  ratio ``s_in / s_out``) are computed in float64 from the float32 value of the scale;
* ``//`` is floor division; outputs are int64 tensors, returned scales float32 tensors.

Valid-input ranges beyond the spec's (documented per function): ``int_exp`` needs
``|x0| * 2**(n + 1) < 2**62`` (raises otherwise); ``requantize`` is exact for
``|q| <= 2**59`` (``clamp=False`` with a ratio >= 1: ``|q| <= 2**32``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ptq.quant.qtensor import qrange

__all__ = [
    "clamp_int",
    "dyadic",
    "int_exp",
    "int_layernorm",
    "requantize",
    "shift_gelu",
    "shiftmax",
]

_CAP = 2**31 - 1  # the "2**31 - 1" of Shiftmax / ShiftGELU / I-LayerNorm
_INT64_MAX = 2**63 - 1
_MASK31 = 2**31 - 1
_MASK30 = 2**30 - 1
_LN_B_LIMIT = 2**58  # |b| saturates here so that y + b (and its requantization) stays exact in int64
_GAMMA_ZERO = 1e-12  # stand-in for gamma == 0 in I-LayerNorm (see int_layernorm)
# float64 round-to-integer constant: for |v| < 2**51, v + 1.5 * 2**52 is rounded half-to-even
# to an integer and its bit pattern is bits(1.5 * 2**52) + round(v)
_MAGIC = 1.5 * 2.0**52
_MAGIC_BITS = 0x4338000000000000

ScaleLike = float | Tensor


# ----------------------------------------------------------------------------- helpers


def _as_int64(q: Tensor) -> Tensor:
    """``q`` as int64 (no copy when it already is); float tensors must hold integers."""
    return q if q.dtype == torch.int64 else q.to(torch.int64)


def _scalar_scale(s: ScaleLike) -> float:
    """A per-tensor scale as its float32 value, returned as a (float64) Python float."""
    t = torch.as_tensor(s).detach()
    if t.numel() != 1:
        raise ValueError(f"expected a per-tensor scale, got shape {tuple(t.shape)}")
    return float(t.reshape(()).to(torch.float32))


def _scale_f64(s: ScaleLike) -> Tensor:
    """A (possibly per-channel) scale rounded to float32, then widened to float64."""
    return torch.as_tensor(s).detach().to(torch.float32).to(torch.float64)


def clamp_int(q: Tensor, bits: int, signed: bool = True) -> Tensor:
    """Clamp integers to the range of ``bits`` (signed or unsigned); int64 out.

    Used after a residual add: both operands are requantized unclamped to the common
    scale, added, then clamped once (spec, "requantize").
    """
    lo, hi = qrange(bits, signed)
    return torch.clamp(_as_int64(q), lo, hi)


# ----------------------------------------------------------------------------- dyadic / requantize


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


def _apply_dyadic(
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

    qi = _as_int64(q)
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
    m, e = _dyadic_memo(s_in, s_out)
    return _apply_dyadic(q, m, e, lo, hi, clamp)


_DYADIC_MEMO: dict[tuple, tuple[Tensor, Tensor]] = {}
_DYADIC_MEMO_MAX = 4096


def _memo_key(s: ScaleLike) -> tuple:
    if isinstance(s, Tensor):
        t = s.detach().to(torch.float32).cpu()
        return (tuple(t.shape), t.numpy().tobytes())
    return ((), float(torch.tensor(float(s), dtype=torch.float32)))


def _dyadic_memo(s_in: ScaleLike, s_out: ScaleLike) -> tuple[Tensor, Tensor]:
    """``dyadic(s_in / s_out)``, memoised on the float32 values of the scales.

    A calibrated model requantizes with the same scale pairs on every forward pass;
    the multiplier is a pure function of those float32 values, so this is exact.
    """
    key = (_memo_key(s_in), _memo_key(s_out))
    hit = _DYADIC_MEMO.get(key)
    if hit is None:
        if len(_DYADIC_MEMO) >= _DYADIC_MEMO_MAX:
            _DYADIC_MEMO.clear()
        hit = dyadic(_scale_f64(s_in) / _scale_f64(s_out))
        _DYADIC_MEMO[key] = hit
    return hit


# ----------------------------------------------------------------------------- exponential


def _x0(s64: float, n: int) -> int:
    """``floor(-1 / s)`` in float64, checked so that ``int_exp`` stays inside int64."""
    if not (s64 > 0 and math.isfinite(s64)):
        raise ValueError(f"scale must be positive and finite, got {s64}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    x0 = math.floor(-1.0 / s64)
    if -x0 * 2 ** (n + 1) >= 2**62:
        raise ValueError(f"scale {s64} too small for int_exp with n={n} (int64 overflow)")
    return x0


def _int_exp_direct(a: Tensor, x0: int, n: int) -> Tensor:
    """Spec ``int_exp`` steps 1-6 on int64 ``a <= 0``, elementwise.

    ``a`` is first clipped at ``n * x0``: step 1 is monotone and maps ``a <= n*x0`` to
    ``<= n*x0``, so step 3 would clip it there anyway; this also bounds step 1 in int64.
    The result ``((r - 2*x0) << (n - q)) >> 1`` is >= 0 (``r - 2*x0 > -x0 >= 1``), so
    step 6 (``max(out, 0)``) is a no-op.
    """
    a = a.clamp_min(n * x0)
    a = a + (a >> 1) - (a >> 4)  # a//2 and a//16 are arithmetic shifts
    a.clamp_min_(n * x0)
    qq = a // x0  # floor division; 0 <= qq <= n
    r = a - qq * x0  # x0 < r <= 0
    return ((r - 2 * x0) << (n - qq)) >> 1


def _int_exp_neg(idx: Tensor, x0: int, n: int) -> Tensor:
    """``int_exp(-idx)`` for int64 ``idx >= 0`` via a lookup table over ``0..max(idx)``.

    Inputs past ``-n*x0`` all map to ``int_exp(n*x0)`` so the table never exceeds
    ``n*|x0| + 1`` entries; when it would be larger than the input the kernel runs
    elementwise instead.
    """
    lim = -n * x0
    top = int(idx.max()) if idx.numel() else 0
    if top > lim:
        idx = idx.clamp_max(lim)
        top = lim
    if top + 1 > max(idx.numel(), 4096):
        return _int_exp_direct(-idx, x0, n)
    table = _int_exp_direct(-torch.arange(top + 1, dtype=torch.int64, device=idx.device), x0, n)
    # index_select on the flat view: same values as torch.take, ~3x faster on CPU
    return table.index_select(0, idx.reshape(-1)).view(idx.shape)


def _int_exp_capped(a: Tensor, x0: int, n: int, cap: int = _CAP) -> Tensor:
    """``min(int_exp(a), cap)`` for any int64 ``a`` (``a > 0`` allowed), ``0 < cap < 2**31``.

    For ``a > 0`` the exact spec value can exceed int64 (shift ``n - q > n``); ShiftGELU
    only uses it through ``min(e1 + e2, 2**31 - 1)`` with ``e1 >= 0``, so capping is exact.
    """
    a = a.clamp(n * x0, 2**61)
    a = a + (a >> 1) - (a >> 4)
    a.clamp_min_(n * x0)
    qq = a // x0
    val = a - qq * x0 - 2 * x0  # r - 2*x0, >= 1
    sh = n - qq  # >= 0
    # floor(val * 2**sh / 2) > cap  <=>  val * 2**sh >= 2**32  <=>  val >= 2**(32 - sh)
    sat = val >= (torch.ones_like(sh) << (32 - sh).clamp(0, 32))
    out = (val << sh.clamp(max=32)) >> 1  # overflows only where sat
    return torch.where(sat, cap, out.clamp_max(cap))


def int_exp(q: Tensor, s: ScaleLike, n: int) -> Tensor:
    """Spec ``int_exp(a, s, n)``: ``exp(a * s)`` by shifts, for integers ``a <= 0``.

    Returns int64 integers at scale ``s / 2**n`` (the scale is not returned). Raises if
    any input is positive or if ``|floor(-1/s)| * 2**(n+1) >= 2**62``.
    """
    x0 = _x0(_scalar_scale(s), n)
    a = _as_int64(q)
    if a.numel() and int(a.max()) > 0:
        raise ValueError("int_exp: inputs must be <= 0")
    return _int_exp_neg(-a, x0, n)


# ----------------------------------------------------------------------------- Shiftmax / ShiftGELU


def shiftmax(q: Tensor, s: ScaleLike, n: int = 15, out_bits: int = 8) -> tuple[Tensor, Tensor]:
    """Integer softmax over the last dim (spec "shiftmax").

    Returns ``p`` (int64, ``0 <= p <= 2**(out_bits-1)``, rows summing to about
    ``2**(out_bits-1)``) and its scale ``1 / 2**(out_bits-1)`` (float32 0-d tensor).
    """
    if not 1 <= out_bits <= 31:
        raise ValueError(f"out_bits must be in [1, 31], got {out_bits}")
    x0 = _x0(_scalar_scale(s), n)
    s_out = torch.tensor(1.0 / 2 ** (out_bits - 1), dtype=torch.float32, device=q.device)
    qi = _as_int64(q)
    if qi.numel() == 0:
        return torch.empty(qi.shape, dtype=torch.int64, device=qi.device), s_out
    mx = qi.amax(-1, keepdim=True)
    # a = q - max(q) <= 0, kept as idx = -a >= 0 (in the converted copy when there is one)
    idx = torch.sub(mx, qi, out=qi) if qi is not q else mx - qi
    e = _int_exp_neg(idx, x0, n)
    total = e.sum(-1, keepdim=True).clamp_max_(_CAP)  # >= 1: the row max gives -x0 * 2**n
    f = _CAP // total
    p = e.mul_(f).bitwise_right_shift_(32 - out_bits)
    return p, s_out


def _gelu_product(q: Tensor, mx: Tensor, x0: int, n: int, sig_bits: int) -> Tensor:
    """Spec ShiftGELU steps 3-6 and ``q * g`` for int64 ``q`` and row maxima ``mx`` (broadcasting).

    Entries with ``q > mx`` (only present in the lookup table built from ranges) use
    ``q - mx`` clipped to 0; they are never looked up.
    """
    e1 = _int_exp_neg((mx - q).clamp_min_(0), x0, n)
    e2 = _int_exp_capped(-mx, x0, n)
    total = torch.add(e1, e2).clamp_max_(_CAP)  # >= 1: e2 = int_exp(.) >= 1
    f = torch.floor_divide(torch.tensor(_CAP, device=q.device), total, out=total)
    return f.mul_(e1).bitwise_right_shift_(32 - sig_bits).mul_(q)


def shift_gelu(q: Tensor, s: ScaleLike, n: int = 23, sig_bits: int = 8) -> tuple[Tensor, Tensor]:
    """Integer GELU ``x * sigmoid(1.702 x)`` (spec "shift_gelu"); sigmoid reduced over the last dim.

    Returns ``q * g`` (int64) and its scale ``s / 2**(sig_bits-1)`` (float32 0-d tensor),
    with ``0 <= g <= 2**(sig_bits-1)``. ``e2 = int_exp(-max(q))`` has a positive argument
    when a row is all negative; it is computed capped at ``2**31 - 1``, which is exact for
    ``total = min(e1 + e2, 2**31 - 1)``.

    ``q * g`` depends only on ``(max of the row, q)``; when there are fewer such pairs than
    half the input (INT8: at most 256 x 256) it is tabulated and looked up, which avoids
    an elementwise int64 division.
    """
    if not 1 <= sig_bits <= 31:
        raise ValueError(f"sig_bits must be in [1, 31], got {sig_bits}")
    s32 = _scalar_scale(s)
    x0 = _x0(1.702 * s32, n)  # t = 1.702 * s in float64
    s_out = torch.tensor(s32 / 2 ** (sig_bits - 1), dtype=torch.float32, device=q.device)
    qi = _as_int64(q)
    if qi.numel() == 0:
        return torch.empty(qi.shape, dtype=torch.int64, device=qi.device), s_out
    mx = qi.amax(-1, keepdim=True)
    mx_lo, q_hi = (int(v) for v in torch.aminmax(mx))
    q_lo = int(qi.min())
    width, height = q_hi - q_lo + 1, q_hi - mx_lo + 1
    if width * height <= qi.numel() // 2:  # the table must be cheaper than the elementwise path
        dev = qi.device
        rows_mx = torch.arange(mx_lo, q_hi + 1, dtype=torch.int64, device=dev).unsqueeze(1)
        cols_q = torch.arange(q_lo, q_hi + 1, dtype=torch.int64, device=dev)
        table = _gelu_product(cols_q, rows_mx, x0, n, sig_bits)  # [height, width]
        offset = (mx - mx_lo) * width - q_lo
        flat = torch.add(qi, offset, out=qi) if qi is not q else qi + offset
        return table.reshape(-1).index_select(0, flat.reshape(-1)).view(flat.shape), s_out
    return _gelu_product(qi, mx, x0, n, sig_bits), s_out


# ----------------------------------------------------------------------------- I-LayerNorm


def int_layernorm(
    q: Tensor, s: ScaleLike, weight: Tensor | None, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Integer LayerNorm over the last dim (spec "int_layernorm"); ``s`` cancels and is unused.

    Returns ``y`` (int64) and the per-channel float32 scale ``sqrt(C) / 2**30 * gamma``.
    Beyond the spec: a channel with ``gamma == 0`` uses ``gamma = 1e-12`` both in
    ``b = floor((beta / gamma) / (sqrt(C) / 2**30))`` and in its scale (no division by
    zero; real output ``~ beta``), and ``b`` saturates at ``+-2**58`` so that ``y + b`` and
    its requantization stay exact in int64 (reached only for ``|beta / gamma| > ~2**28 * sqrt(C)``,
    e.g. such zero-gamma channels). ``weight`` / ``bias`` may be None (no affine: 1 / 0).
    A negative ``gamma`` gives a negative per-channel scale (``y * s_out`` is still the
    LayerNorm output).
    """
    del s
    qi = _as_int64(q)
    c = qi.shape[-1]
    if c == 0:
        raise ValueError("int_layernorm: empty last dimension")
    # 1. mean = round_half_to_even(sum / C), exactly on integers
    tot = qi.sum(-1, keepdim=True)
    fl = tot // c
    twice_rem = (tot - fl * c) * 2
    mean = fl + ((twice_rem > c) | ((twice_rem == c) & ((fl & 1) == 1))).to(torch.int64)
    # 2. centred values and sum of squares
    d = torch.sub(qi, mean, out=qi) if qi is not q else qi - mean
    var = (d * d).sum(-1, keepdim=True)
    # 3. integer sqrt: 10 Newton steps from 2**16 (k >= 2**6 throughout, never 0)
    k = torch.full_like(var, 2**16)
    for _ in range(10):
        k = (k + var // k) >> 1
    # 4-5. y = (d * f) // 2
    f = _CAP // k
    y = d.mul_(f).bitwise_right_shift_(1)
    # 6-7. per-channel bias term, float64
    f64 = {"device": y.device, "dtype": torch.float64}
    gamma = torch.ones(c, **f64) if weight is None else weight.detach().to(**f64)
    beta = torch.zeros(c, **f64) if bias is None else bias.detach().to(**f64)
    gamma = torch.where(gamma == 0, torch.full_like(gamma, _GAMMA_ZERO), gamma)
    unit = math.sqrt(c) / 2**30
    b = torch.floor((beta / gamma) / unit).clamp_(-_LN_B_LIMIT, _LN_B_LIMIT).to(torch.int64)
    y.add_(b)
    return y, (unit * gamma).to(torch.float32)
