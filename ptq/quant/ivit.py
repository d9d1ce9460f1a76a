"""Integer-only kernels of the I-ViT backend: Shiftmax, ShiftGELU, I-LayerNorm (and int_exp).

The contract is the spec ``/work/shared/spec/integer-ops.md``: every function here
returns the integers that exact integer arithmetic on the spec's formulas gives, bit
for bit. Intermediates are int64 (float32 holds integers only to 2**24). All reductions
run over the last dimension; inputs may have any rank. The dyadic requantizer that joins
these kernels to the quantized layers is ``ptq.quant.requant``.

Conventions (from the spec):

* a quantized tensor is integers ``q`` and a float32 scale ``s`` (real value ``q * s``);
  ``q`` may be an int64/int32 tensor or a float tensor holding integers;
* constants derived from a scale (``x0 = floor(-1 / s)``, ``1.702 * s``) are computed in
  float64 from the float32 value of the scale;
* ``//`` is floor division; outputs are int64 tensors, returned scales float32 tensors.

Valid-input ranges beyond the spec's (documented per function): ``int_exp`` needs
``|x0| * 2**(n + 1) < 2**62`` (raises otherwise).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from ptq.quant.qtensor import INT32_MAX
from ptq.quant.requant import ScaleLike
from ptq.quant.requant import as_int64 as _as_int64

__all__ = ["LOG2_IN_BITS", "LOG2_SCALE_BITS", "int_exp", "int_layernorm", "layernorm_bias", "log2_probs", "shift_gelu",
           "shiftmax"]

_LN_B_LIMIT = 2**58  # |b| saturates here so that y + b (and its requantization) stays exact in int64
_GAMMA_ZERO = 1e-12  # stand-in for gamma == 0 in I-LayerNorm (see int_layernorm)


def _scalar_scale(s: ScaleLike) -> float:
    """A per-tensor scale as its float32 value, returned as a (float64) Python float."""
    t = torch.as_tensor(s).detach()
    if t.numel() != 1:
        raise ValueError(f"expected a per-tensor scale, got shape {tuple(t.shape)}")
    return float(t.reshape(()).to(torch.float32))


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


_EXP_TABLE_MAX = 1 << 16  # entries of a memoised int_exp table (n * |x0| + 1)


@functools.lru_cache(maxsize=64)
def _exp_table(x0: int, n: int, device: torch.device, dtype: torch.dtype = torch.int64) -> Tensor:
    """``int_exp(-i)`` for ``i = 0 .. -n*x0`` (every distinct value), as ``dtype``; memoised.

    AdaRound calls the kernels every iteration and a learned step changes ``x0`` rarely, so one
    table per ``(x0, n)`` serves them all (callers only read it).
    """
    if dtype != torch.int64:
        return _exp_table(x0, n, device).to(dtype)
    return _int_exp_direct(-torch.arange(-n * x0 + 1, dtype=torch.int64, device=device), x0, n)


def _int_exp_neg(idx: Tensor, x0: int, n: int) -> Tensor:
    """``int_exp(-idx)`` for int64 ``idx >= 0`` by table lookup.

    Inputs past ``-n*x0`` all map to ``int_exp(n*x0)``, so the memoised table (:func:`_exp_table`)
    has ``n*|x0| + 1`` entries. Beyond _EXP_TABLE_MAX entries a table over ``0..max(idx)`` is
    built per call, or, when that would be larger than the input, the kernel runs elementwise.
    """
    lim = -n * x0
    if lim + 1 <= _EXP_TABLE_MAX:
        table = _exp_table(x0, n, idx.device)
        # index_select on the flat view: same values as torch.take, ~3x faster on CPU
        return table.index_select(0, idx.clamp_max(lim).reshape(-1)).view(idx.shape)
    top = int(idx.max()) if idx.numel() else 0
    if top > lim:
        idx = idx.clamp_max(lim)
        top = lim
    if top + 1 > max(idx.numel(), 4096):
        return _int_exp_direct(-idx, x0, n)
    table = _int_exp_direct(-torch.arange(top + 1, dtype=torch.int64, device=idx.device), x0, n)
    return table.index_select(0, idx.reshape(-1)).view(idx.shape)


def _int_exp_capped(a: Tensor, x0: int, n: int, cap: int = INT32_MAX) -> Tensor:
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


def _shiftmax32(q: Tensor, x0: int, n: int, out_bits: int, keep: Tensor | None = None) -> Tensor | None:
    """Shiftmax of a float32 ``q`` in 32-bit arithmetic, the same integers as the int64 kernel; None
    where 32 bits do not hold every intermediate.

    ``min(max(q) - q, -n*x0)`` is exact in float32: below 2**24 the difference is an integer that
    float32 holds (IEEE subtraction is exact when the result is representable), above it the clip
    wins anyway. ``e`` comes from a memoised table (``e <= int_exp(0) = -x0 * 2**n``); when a row of
    them sums below 2**31 the sum is ``total`` unclipped, and ``e * (CAP // total) <= CAP`` (as
    ``e <= total``) fits int32 too. Half the bytes of the int64 kernel per pass, and fewer passes.
    """
    lim = -n * x0
    if q.dtype != torch.float32 or lim + 1 > _EXP_TABLE_MAX or -x0 * 2**n * q.shape[-1] >= 2**31:
        return None
    idx = torch.sub(q.amax(-1, keepdim=True), q).clamp_max_(lim).to(torch.int32)
    e = _exp_table(x0, n, q.device, torch.int32).index_select(0, idx.view(-1)).view(idx.shape)
    if keep is not None:
        e = e.mul_(keep)
    f = torch.floor_divide(torch.tensor(INT32_MAX, dtype=torch.int32, device=q.device),
                           e.sum(-1, keepdim=True, dtype=torch.int32))
    return e.mul_(f).bitwise_right_shift_(32 - out_bits)


def shiftmax(q: Tensor, s: ScaleLike, n: int = 15, out_bits: int = 8,
             dtype: torch.dtype = torch.int64, keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Integer softmax over the last dim (spec "shiftmax").

    ``keep`` (bool, broadcasting against ``q``): the masked Shiftmax of docs/swin.md. Entries
    where it is False take the row's minimum before the row max is taken (so the max is over the
    kept entries), and their ``int_exp`` is replaced by 0: their probability is exactly 0 and they
    add nothing to the row's total.

    Returns ``p`` (integers ``0 <= p <= 2**(out_bits-1)``, rows summing to about
    ``2**(out_bits-1)``) as ``dtype`` (int64, or float32 for the simulation, which holds them
    exactly) and its scale ``1 / 2**(out_bits-1)`` (float32 0-d tensor). A float32 ``q`` runs in
    32-bit arithmetic where that holds every intermediate (:func:`_shiftmax32`), else in int64.
    """
    if not 1 <= out_bits <= 31:
        raise ValueError(f"out_bits must be in [1, 31], got {out_bits}")
    if dtype == torch.float32 and out_bits > 25:
        raise ValueError(f"float32 does not hold {out_bits}-bit probabilities exactly; ask for int64")
    x0 = _x0(_scalar_scale(s), n)
    s_out = torch.tensor(1.0 / 2 ** (out_bits - 1), dtype=torch.float32, device=q.device)
    if q.numel() == 0:
        return torch.empty(q.shape, dtype=dtype, device=q.device), s_out
    if keep is not None:
        q = torch.where(keep, q, q.amin(-1, keepdim=True))
    p32 = _shiftmax32(q, x0, n, out_bits, None if keep is None else keep.to(torch.int32))
    if p32 is not None:
        return p32.to(dtype), s_out
    qi = _as_int64(q)
    mx = qi.amax(-1, keepdim=True)
    # a = q - max(q) <= 0, kept as idx = -a >= 0 (in the converted copy when there is one)
    idx = torch.sub(mx, qi, out=qi) if qi is not q else mx - qi
    e = _int_exp_neg(idx, x0, n)
    if keep is not None:
        e = e * keep
    total = e.sum(-1, keepdim=True).clamp_max_(INT32_MAX)  # >= 1: the row max gives -x0 * 2**n
    f = INT32_MAX // total
    p = e.mul_(f).bitwise_right_shift_(32 - out_bits)
    return p.to(dtype), s_out


#: Shiftmax width feeding :func:`log2_probs` (p in [0, 2**15]), and the log2 output's scale 2**-14
LOG2_IN_BITS = 16
LOG2_SCALE_BITS = 14


def log2_probs(p: Tensor) -> tuple[Tensor, Tensor]:
    """Probabilities rounded to powers of two, 4-bit codes (``nonlinear.softmax.log2``).

    ``p``: Shiftmax output at ``out_bits=LOG2_IN_BITS`` (integers in [0, 2**15] at scale 2**-15).
    With ``L = round(log2 p)`` (half-way at ``p**2 >= 2**(2*floor(log2 p) + 1)``, exact in
    int64), the output is ``2**(L - 1)`` at scale ``2**-14`` (real ``2**(L - 15)``, the nearest
    power of two to ``p * 2**-15`` in the log domain) for ``L >= 1``, and 0 for ``p <= 1``:
    15 powers ``2**0 .. 2**-14`` plus zero, 16 codes. ``probs @ v`` then needs only shifts
    and adds. Returns ``(q, scale)``, ``q`` int64 in ``[0, 2**14]``.
    """
    pi = _as_int64(p)
    if pi.numel() and (int(pi.min()) < 0 or int(pi.max()) > 2 ** (LOG2_IN_BITS - 1)):
        raise ValueError(f"log2_probs expects Shiftmax integers in [0, 2**{LOG2_IN_BITS - 1}]")
    _, e = torch.frexp(pi.clamp_min(1).to(torch.float64))  # exact below 2**53: floor(log2 p) = e - 1
    m = e.to(torch.int64) - 1
    up = (pi * pi) >= torch.bitwise_left_shift(torch.ones_like(m), 2 * m + 1)
    lg = m + up.to(torch.int64)
    q = torch.where((pi >= 1) & (lg >= 1), torch.bitwise_left_shift(torch.ones_like(lg), (lg - 1).clamp_min(0)),
                    torch.zeros_like(lg))
    return q, torch.tensor(2.0**-LOG2_SCALE_BITS, dtype=torch.float32, device=pi.device)


def _gelu_product(q: Tensor, mx: Tensor, x0: int, n: int, sig_bits: int) -> Tensor:
    """Spec ShiftGELU steps 3-6 and ``q * g`` for int64 ``q`` and row maxima ``mx`` (broadcasting).

    Entries with ``q > mx`` (only present in the lookup table built from ranges) use
    ``q - mx`` clipped to 0; they are never looked up.
    """
    e1 = _int_exp_neg((mx - q).clamp_min_(0), x0, n)
    e2 = _int_exp_capped(-mx, x0, n)
    total = torch.add(e1, e2).clamp_max_(INT32_MAX)  # >= 1: e2 = int_exp(.) >= 1
    f = torch.floor_divide(torch.tensor(INT32_MAX, device=q.device), total, out=total)
    return f.mul_(e1).bitwise_right_shift_(32 - sig_bits).mul_(q)


_GELU_TABLE_BITS = 8  # inputs within INT8 share one (row max, q) table per setting


@functools.lru_cache(maxsize=64)
def _gelu_table(x0: int, n: int, sig_bits: int, device: torch.device) -> Tensor:
    """``q * g`` for every INT8 pair (row max, q), flattened row max major; memoised (callers only read it)."""
    half = 2 ** (_GELU_TABLE_BITS - 1)
    vals = torch.arange(-half, half, dtype=torch.int64, device=device)
    return _gelu_product(vals, vals.unsqueeze(1), x0, n, sig_bits).reshape(-1)


@functools.lru_cache(maxsize=64)
def _gelu_table_as(x0: int, n: int, sig_bits: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """:func:`_gelu_table` converted to ``dtype``; memoised."""
    return _gelu_table(x0, n, sig_bits, device).to(dtype)


def shift_gelu(q: Tensor, s: ScaleLike, n: int = 23, sig_bits: int = 8,
               dtype: torch.dtype = torch.int64) -> tuple[Tensor, Tensor]:
    """Integer GELU ``x * sigmoid(1.702 x)`` (spec "shift_gelu"); sigmoid reduced over the last dim.

    Returns ``q * g`` (int64) and its scale ``s / 2**(sig_bits-1)`` (float32 0-d tensor),
    with ``0 <= g``, at most ``2**(sig_bits-1)`` unless ``e1`` alone passes ``2**31 - 1`` (then
    ``g = e1 >> (32 - sig_bits)``; the bound the ONNX export declares, ``OnnxGraph.shift_gelu``). ``e2 = int_exp(-max(q))`` has a positive argument
    when a row is all negative; it is computed capped at ``2**31 - 1``, which is exact for
    ``total = min(e1 + e2, 2**31 - 1)``.

    ``q * g`` depends only on ``(max of the row, q)``. For INT8 inputs it is looked up in one
    table over all 256 x 256 pairs, built once per ``(x0, n, sig_bits)`` (:func:`_gelu_table`:
    AdaRound calls this every iteration, and a learned step changes ``x0`` rarely); wider
    inputs are tabulated per call when there are fewer pairs than half the input. Either
    avoids an elementwise int64 division.

    ``dtype``: of the returned ``q * g``: int64, or float32 where the caller knows it holds them
    exactly (``|q * g| <= 2**(bits + sig_bits - 2)`` below 2**24). Float32 INT8 inputs then never
    leave 32 bits: the table index is computed in float32 (integers below 2**16, exact) and the
    table is memoised as float32.
    """
    if not 1 <= sig_bits <= 31:
        raise ValueError(f"sig_bits must be in [1, 31], got {sig_bits}")
    s32 = _scalar_scale(s)
    x0 = _x0(1.702 * s32, n)  # t = 1.702 * s in float64
    s_out = torch.tensor(s32 / 2 ** (sig_bits - 1), dtype=torch.float32, device=q.device)
    if q.numel() == 0:
        return torch.empty(q.shape, dtype=dtype, device=q.device), s_out
    half = 2 ** (_GELU_TABLE_BITS - 1)
    if q.dtype == torch.float32 and dtype == torch.float32:
        mx32 = q.amax(-1, keepdim=True)
        lo32, hi32 = (float(v) for v in torch.aminmax(q))
        if -half <= lo32 and hi32 < half:
            flat32 = torch.add(q, (mx32 + half) * (2 * half) + half).to(torch.int32)
            table32 = _gelu_table_as(x0, n, sig_bits, q.device, dtype)
            return table32.index_select(0, flat32.view(-1)).view(flat32.shape), s_out
    return _shift_gelu64(q, x0, n, sig_bits, half).to(dtype), s_out


def _shift_gelu64(q: Tensor, x0: int, n: int, sig_bits: int, half: int) -> Tensor:
    """:func:`shift_gelu`'s ``q * g`` in int64 (table lookups where they are cheaper)."""
    qi = _as_int64(q)
    mx = qi.amax(-1, keepdim=True)
    q_lo, q_hi = (int(v) for v in torch.aminmax(qi))
    if -half <= q_lo and q_hi < half:
        flat = (mx + half) * (2 * half) + half
        flat = torch.add(qi, flat, out=qi) if qi is not q else qi + flat
        table = _gelu_table(x0, n, sig_bits, qi.device)
        return table.index_select(0, flat.reshape(-1)).view(flat.shape)
    mx_lo = int(mx.min())
    width, height = q_hi - q_lo + 1, q_hi - mx_lo + 1
    if width * height <= qi.numel() // 2:  # the table must be cheaper than the elementwise path
        dev = qi.device
        rows_mx = torch.arange(mx_lo, q_hi + 1, dtype=torch.int64, device=dev).unsqueeze(1)
        cols_q = torch.arange(q_lo, q_hi + 1, dtype=torch.int64, device=dev)
        table = _gelu_product(cols_q, rows_mx, x0, n, sig_bits)  # [height, width]
        offset = (mx - mx_lo) * width - q_lo
        flat = torch.add(qi, offset, out=qi) if qi is not q else qi + offset
        return table.reshape(-1).index_select(0, flat.reshape(-1)).view(flat.shape)
    return _gelu_product(qi, mx, x0, n, sig_bits)


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
    f = INT32_MAX // k
    y = d.mul_(f).bitwise_right_shift_(1)
    # 6-7. per-channel bias term, float64
    b, s_out = layernorm_bias(weight, bias, c, y.device)
    y.add_(b)
    return y, s_out


def layernorm_bias(weight: Tensor | None, bias: Tensor | None, c: int,
                   device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """I-LayerNorm's per-channel integer bias term ``b`` (spec step 6, int64) and its output scale.

    A constant of the layer: the kernel adds it, and an exported program stores it.
    """
    f64 = {"device": device, "dtype": torch.float64}
    gamma = torch.ones(c, **f64) if weight is None else weight.detach().to(**f64)
    beta = torch.zeros(c, **f64) if bias is None else bias.detach().to(**f64)
    gamma = torch.where(gamma == 0, torch.full_like(gamma, _GAMMA_ZERO), gamma)
    unit = math.sqrt(c) / 2**30
    b = torch.floor((beta / gamma) / unit).clamp_(-_LN_B_LIMIT, _LN_B_LIMIT).to(torch.int64)
    return b, (unit * gamma).to(torch.float32)
