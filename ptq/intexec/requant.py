"""The spec's dyadic requantizer, ``round_half_to_even(q * m / 2**e)``, spelled in ONNX integer ops.

``ptq.intexec.graph`` decides what range of ``q`` matters (saturation clips) and calls :func:`spell`,
which picks the shortest spelling that is exact on that range:

* :func:`offset_requant`: ``floor((q * m + 2**(e-1) + K * 2**e) / 2**e) - K`` in uint64, five 64-bit
  passes, where no tie can occur and the numerator fits 64 bits (:func:`offset`);
* the general rounding shift in uint64 with the floor's parity (ties to even), ``|q| < 2**31``;
* :func:`limb_requant`, the two-limb product, for wider ``q`` (I-LayerNorm's outputs).

Each is checked against ``ptq.quant.requant.apply_dyadic`` in ``tests/test_onnx_kernels.py``.
"""

from __future__ import annotations

import numpy as np
import torch
from onnx import TensorProto
from torch import Tensor

from ptq.intexec.kernels import I32, I64, Emitter
from ptq.quant.qtensor import INT32_MAX


def as_ints(t: Tensor) -> np.ndarray:
    """An integer-valued tensor (any dtype) as an int64 array, checked to hold integers."""
    t = t.detach().cpu()
    if t.is_floating_point():
        if not bool((t == t.round()).all()):
            raise ValueError("expected integers")
        t = t.double()
    return t.to(torch.int64).numpy()


def shape_k(k: np.ndarray) -> np.ndarray:
    """A per-tensor value as a scalar, a per-channel one as it is (broadcast over the last axis)."""
    return k.reshape(()) if k.size == 1 else k


def normalise(m: np.ndarray, e: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(m, e)`` flattened, with ``|m| = 2**31`` written ``(2**30, e - 1)`` (the same ratio, ``|m| < 2**31``)."""
    m64, e64 = m.reshape(-1), e.reshape(-1)
    top = np.abs(m64) == 2**31
    m64, e64 = np.where(top, m64 // 2, m64), np.where(top, e64 - 1, e64)
    if (e64 <= 0).any():
        raise ValueError(f"{name}: requantization ratio >= 2**30 (e={int(e64.min())}) is not supported")
    return m64, e64


def spell(em: Emitter, q: str, q_dtype: str, bound: int, m64: np.ndarray, e64: np.ndarray,
          name: str) -> tuple[str, str]:
    """``round_half_to_even(q * m / 2**e)`` for ``|q| <= bound``: the value and its dtype (int32 or int64).

    ``(m, e)`` as :func:`quiet` leaves them for ``bound``: a channel that rounds to 0 everywhere has
    ``m = 0``, so ``e <= 62`` for ``|q| < 2**31`` and ``e - 29 <= 62`` for the two-limb product.
    """
    k_off = offset(bound, m64, e64)
    if k_off is not None:
        return offset_requant(em, q, m64, e64, k_off)
    if bound < 2**31:  # |q * m| < 2**62: one 64-bit product (two's complement in uint64), a rounding shift
        u = em.op("Cast", [q], to=TensorProto.UINT64)  # q mod 2**64
        mc = em.const(shape_k(m64).astype(np.uint64), np.uint64, hint="mult")
        return em.round_shift_u64(em.op("Mul", [u, mc]), shape_k(e64)), "int64"
    q64 = q if q_dtype == "int64" else em.op("Cast", [q], to=I64)
    return limb_requant(em, q64, bound, m64, e64, name), "int64"


def saturating_bound(m64: np.ndarray, e64: np.ndarray, top: int) -> int:
    """The least ``P`` with ``|round(P * m / 2**e)| > top`` in every channel: from ``|q| >= P`` on, a
    clamped requantization gives the same result as at ``q = +-P``."""
    return max(-(-((top + 1) << int(k)) // abs(int(v))) if v else 0 for v, k in zip(m64, e64, strict=True))


def result_bound(bound: int, m64: np.ndarray, e64: np.ndarray) -> int:
    """A bound on ``|round(q * m / 2**e)|`` for ``|q| <= bound``, every channel."""
    return max(-(-bound * abs(int(v)) // (1 << int(k))) for v, k in zip(m64, e64, strict=True)) + 1


def _fits(bound: int, m64: np.ndarray, e64: np.ndarray, k_off: np.ndarray) -> bool:
    """Whether ``q * m + 2**(e-1) + K * 2**e < 2**64`` for every ``|q| <= bound``, every channel."""
    return all(bound * abs(int(v)) + (1 << (int(k) - 1)) + int(c) * (1 << int(k)) < 1 << 64
               for v, k, c in zip(m64, e64, np.broadcast_to(k_off, m64.shape), strict=True))


def offset(bound: int, m64: np.ndarray, e64: np.ndarray) -> np.ndarray | None:
    """Per-channel ``K`` for :func:`offset_requant` on ``|q| <= bound``, or None where that
    spelling is not exact.

    Exact when, in every channel, (1) no ``q`` is a tie: with ``|m| = m' * 2**z`` (``m'`` odd) a tie
    needs ``q`` an odd multiple of ``2**(e - z - 1)``, impossible for ``bound < 2**(e - z - 1)``;
    (2) ``q * m + 2**(e-1) + K * 2**e`` lies in ``[0, 2**64)`` for every ``|q| <= bound``, with
    ``K = ceil(bound * |m| / 2**e)`` (any larger ``K`` that keeps (2) does as well).
    """
    ks = []
    for v, k in zip((abs(int(v)) for v in m64), (int(k) for k in e64), strict=True):
        z = (v & -v).bit_length() - 1 if v else k
        if v and k > z and bound >= 1 << (k - z - 1):
            return None
        ks.append(max(1, -(-bound * v // (1 << k))))
    k_off = np.array(ks, dtype=np.int64)
    return k_off if _fits(bound, m64, e64, k_off) else None


def shifted_offset(bound: int, m64: np.ndarray, e64: np.ndarray) -> int | None:
    """One ``K`` for every channel with ``K = 128 (mod 256)``, or None (see :func:`offset`).

    Then ``floor(...)`` of :func:`offset_floor` is ``v + K`` (``v`` the requantized value), so
    clipped to ``[K + lo, K + hi]`` and cast to uint8 (modulo 256) it is ``v + 128``: the uint8
    operand ``MatMulInteger`` takes with zero point 128, two passes after the shift.
    """
    k_off = offset(bound, m64, e64)
    if k_off is None:
        return None
    k = int(k_off.max())
    k += (128 - k) % 256
    return k if _fits(bound, m64, e64, np.array(k)) else None


def offset_floor(em: Emitter, q: str, m64: np.ndarray, e64: np.ndarray, k_off: np.ndarray,
                 bias: np.ndarray | None = None) -> str:
    """``floor((q * m + 2**(e-1) + K * 2**e) / 2**e)`` in uint64: ``round(q * m / 2**e) + K`` (see :func:`offset`).

    ``q * m`` is formed modulo 2**64 (q cast to uint64 is its two's complement); the offset makes
    the true numerator non-negative and below 2**64, so the modular sum is the numerator itself
    and its logical right shift is the floor. Half up equals half to even because no tie occurs.
    ``bias`` (per channel): ``q`` is ``p + bias`` and ``p`` is given, ``bias * m`` joins the constant.
    """
    n = m64.size if bias is None else max(m64.size, bias.size)
    m_b, e_b, k_b = (np.broadcast_to(v, (n,)) for v in (m64, e64, k_off))
    b_b = np.broadcast_to(np.zeros(1, np.int64) if bias is None else bias.reshape(-1), (n,))
    offs = [(int(b) * int(m) + (1 << (int(k) - 1)) + int(c) * (1 << int(k))) % (1 << 64)
            for b, m, k, c in zip(b_b, m_b, e_b, k_b, strict=True)]
    return _mul_add_shift(em, em.op("Cast", [q], to=TensorProto.UINT64), m64, e64, shape_k(np.array(offs, dtype=object)))


def _mul_add_shift(em: Emitter, u: str, m64: np.ndarray, e64: np.ndarray, c: np.ndarray) -> str:
    """``(u * m + c) >> e`` in uint64 (``c`` a non-negative int below 2**64 per tensor or channel)."""
    mu = em.const(shape_k(m64).astype(np.uint64), np.uint64, hint="mult")
    cu = em.const(np.asarray(c).astype(np.uint64), np.uint64, hint="round_off")
    ku = em.const(shape_k(e64).astype(np.uint64), np.uint64, hint="k")
    return em.op("BitShift", [em.op("Add", [em.op("Mul", [u, mu]), cu]), ku], direction="RIGHT")


def offset_requant(em: Emitter, q: str, m64: np.ndarray, e64: np.ndarray, k_off: np.ndarray) -> tuple[str, str]:
    """``round(q * m / 2**e)`` as :func:`offset_floor` ``- K``: the value and its dtype (int32 when
    ``2K + 2 < 2**31``)."""
    return unoffset(em, offset_floor(em, q, m64, e64, k_off), k_off)


def halved_offset(df_bound: int, b: np.ndarray, m64: np.ndarray, e64: np.ndarray,
                  top: int) -> tuple[int, int, np.ndarray, np.ndarray] | None:
    """``(X, K, m, e)`` for :func:`halved_floor` on ``y = floor(df / 2) + b`` (I-LayerNorm's output,
    ``|df| <= df_bound``) clamped to ``|.| <= top``, or None where the offset spelling is not exact.

    Channels whose result is 0 over their whole range (a zero gamma: tiny ratio, huge ``b``) are
    :func:`quiet` first, so their ``b`` bounds nothing. Then ``df`` clipped to ``[-X, X]`` with
    ``X = 2 * (P + max|b|) + 2`` (``P``: :func:`saturating_bound`, ``b`` of the other channels) changes
    no clamped result: past ``X``, ``|y| > P`` with ``df``'s sign either way. ``K`` is
    :func:`shifted_offset`'s for the ``|y|`` that remain.
    """
    m64, e64 = quiet(df_bound // 2 + np.abs(b) + 1, m64, e64)
    big_b = int(np.abs(b[np.broadcast_to(m64, b.shape) != 0]).max(initial=0))
    x = min(2 * (saturating_bound(m64, e64, top) + big_b) + 2, df_bound)
    m64, e64 = quiet(x // 2 + big_b + 1, m64, e64)
    k = shifted_offset(x // 2 + big_b + 1, m64, e64)
    return None if k is None else (x, k, m64, e64)


def quiet(bound: int | np.ndarray, m64: np.ndarray, e64: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(m, e)`` with each channel whose result is 0 for every ``|q| <= bound`` (per channel allowed;
    ``bound * |m| < 2**(e-1)``, e.g. a zero LayerNorm gamma) written ``m = 0`` with the other channels'
    least ``e`` (31 if none): the same integers, and no ``2**e`` that only such a channel pushes past
    64 bits. Per-tensor ``(m, e)`` with a per-channel bound become per channel."""
    bound = np.broadcast_to(np.asarray(bound, dtype=object), np.broadcast_shapes(np.shape(bound), m64.shape))
    m_b, e_b = np.broadcast_to(m64, bound.shape), np.broadcast_to(e64, bound.shape)
    zero = np.array([int(q) * abs(int(v)) < 1 << (int(k) - 1) for q, v, k in zip(bound, m_b, e_b, strict=True)],
                    dtype=bool)
    if not zero.any():
        return m64, e64
    e_quiet = int(e_b[~zero].min()) if (~zero).any() else 31
    return np.where(zero, 0, m_b).astype(np.int64), np.where(zero, e_quiet, e_b).astype(np.int64)


def halved_floor(em: Emitter, df: str, b: np.ndarray, x: int, k: int, m64: np.ndarray, e64: np.ndarray) -> str:
    """:func:`offset_floor` of ``y = floor(df / 2) + b`` (``K = k``) from ``df`` itself (see :func:`halved_offset`).

    ``T = (clip(df, -X, X) + 2**62) >> 1`` is ``floor(df / 2) + 2**61``, so ``y * m + 2**(e-1) + K * 2**e``
    is ``T * m + (b * m - 2**61 * m + 2**(e-1) + K * 2**e)`` modulo 2**64: one per-channel constant.
    """
    src = em.op("Clip", [df, em.const(-x), em.const(x)])
    t = em.op("BitShift", [em.op("Cast", [em.op("Add", [src, em.const(np.int64(1) << 62, hint="off62")])],
                                 to=TensorProto.UINT64), em.const(np.uint64(1), np.uint64)], direction="RIGHT")
    m_b, e_b = np.broadcast_to(m64, b.shape), np.broadcast_to(e64, b.shape)
    consts = [(int(bc) * int(mc) - (int(mc) << 61) + (1 << (int(ec) - 1)) + k * (1 << int(ec))) % (1 << 64)
              for bc, mc, ec in zip(b, m_b, e_b, strict=True)]
    return _mul_add_shift(em, t, m64, e64, np.array(consts, dtype=object))


def u8_of_floor(em: Emitter, fl: str, k: int, lo: int, hi: int) -> str:
    """``clamp(v, lo, hi) + 128`` as uint8 from ``fl = v + K`` with ``K = 128 (mod 256)`` (:func:`shifted_offset`)."""
    clip = em.op("Clip", [fl, em.const(np.uint64(k + lo), np.uint64), em.const(np.uint64(k + hi), np.uint64)])
    return em.op("Cast", [clip], to=TensorProto.UINT8)


def unoffset(em: Emitter, fl: str, k_off: np.ndarray) -> tuple[str, str]:
    """:func:`offset_floor`'s result minus ``K``: the value and its dtype (int32 when ``2K + 2 < 2**31``)."""
    if 2 * int(k_off.max()) + 2 < 2**31:
        return em.op("Sub", [em.op("Cast", [fl], to=I32), em.const(shape_k(k_off), np.int32)]), "int32"
    return em.op("Sub", [em.op("Cast", [fl], to=I64), em.const(shape_k(k_off))]), "int64"


def limb_requant(em: Emitter, q: str, bound: int, m64: np.ndarray, e64: np.ndarray, name: str) -> str:
    """Wide ``q`` (|q| <= 2**59), ratio < 1 (``e >= 31``): ``q * m = w * 2**31 + v`` from q's two limbs.

    Bits of ``v`` below its half bit only matter through whether any is set, so they fold
    into one sticky bit: ``round(q * m / 2**e) = round((4w + 2 bit30(v) + sticky) / 2**(e - 29))``.
    """
    if bound > 2**59 or (e64 < 31).any():
        raise ValueError(f"{name}: no exact int64 requantization for |q| <= {bound} with e >= {int(e64.min())}")
    k = e64 - 29
    mc = em.const(shape_k(m64), hint="mult")
    qh = em.floor_shift(q, 31)
    t = em.op("Mul", [em.op("BitwiseAnd", [q, em.const(INT32_MAX)]), mc])
    w = em.op("Add", [em.op("Mul", [qh, mc]), em.floor_shift(t, 31)])
    v = em.op("BitwiseAnd", [t, em.const(INT32_MAX)])
    half_bit = em.op("Div", [v, em.const(2**30)])
    sticky = em.op("Cast", [em.op("Greater", [em.op("BitwiseAnd", [v, em.const(2**30 - 1)]), em.const(0)])],
                   to=I64)
    p2 = em.op("Add", [em.op("Add", [em.op("Mul", [w, em.const(4)]), em.op("Mul", [half_bit, em.const(2)])]),
                       sticky])
    return em.round_shift(p2, shape_k(k))
