"""Activation quantizers with non-uniform codes: log-sqrt2 probabilities and twin-uniform ranges.

The exact definitions are in ``docs/act-quantizers.md``; this module is the simulation's side
of them (the ONNX spelling, written from the definitions, is ``ptq.intexec.codes``).

* **Probability integers** ``P``: a probability as an integer in ``[0, 2**15]`` at scale
  ``2**-15`` -- a 16-bit Shiftmax (``nonlinear=ivit``) or ``round(p * 2**15)`` of the float
  softmax (``nonlinear=fp``, :func:`prob_ints`). The log quantizers are functions of ``P``.
* **logsqrt2** (:func:`logsqrt2_probs`): code ``c = 30 - round(2 * log2 P)`` (the probability
  ``~ 2**(-c/2)``), 15 codes ``0..14`` plus zero (``c > 14``), 4 bits. Integer form at scale
  ``2**-15``: ``M[c mod 2] << (7 - c // 2)`` with ``M = (256, 181)`` (``181 = round(256 / sqrt 2)``,
  RepQ-ViT's even/odd split), so ``probs @ v`` is ``256 * (shifted v's of even codes) + 181 *
  (shifted v's of odd codes)``: shifts, adds and two multiplications per output.
* **twin** (:func:`twin_int`, :func:`twin_float`): PTQ4ViT's twin-uniform. A fine range
  ``[lo1, hi1]`` at scale ``s`` (``bits - 1`` bits, signed for the GELU output, unsigned for
  probabilities) and a coarse range of codes ``1..2**(bits-1)`` at ``s * 2**k``; an element
  takes the fine code unless it passes ``hi1``. Integer form: one tensor at the fine scale,
  coarse codes shifted left by ``k``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ptq.quant.qtensor import qrange, round_ste
from ptq.quant.requant import apply_dyadic, as_int64, multiplier

PROB_SCALE_BITS = 15  # P in [0, 2**15] at scale 2**-15
PROB_BITS = PROB_SCALE_BITS + 1  # the 16-bit Shiftmax (out_bits) that makes P
LOGSQRT2_M = (256, 181)  # 2**8 and round(2**8 / sqrt 2): even and odd codes' multipliers
LOGSQRT2_CODES = 15  # nonzero codes 0..14 (2**0 .. 2**-7 in sqrt 2 steps); code 15 is zero
LOGSQRT2_TOP = 2 * PROB_SCALE_BITS  # round(2 * log2 P) <= 30
TWIN_SHIFTS = tuple(range(1, 7))  # the coarse/fine scale ratios 2**k searched at calibration


def prob_ints(p: Tensor) -> Tensor:
    """Float probabilities as ``P = round_half_even(p * 2**15)`` (int64, clamped to [0, 2**15])."""
    return torch.round(p.double().clamp(0.0, 1.0) * 2**PROB_SCALE_BITS).to(torch.int64)


def logsqrt2_code(p_int: Tensor) -> Tensor:
    """The code ``c = 30 - round(2 * log2 P)`` of probability integers ``P`` (int64; 31 for ``P = 0``).

    ``round(2 * log2 P) >= j`` exactly when ``P**4 >= 2**(2j - 1)`` (no ties: ``P**4`` is never
    an odd power of two), so the rounded logarithm counts those thresholds; ``P**4 <= 2**60``.
    """
    pi = as_int64(p_int)
    if pi.numel() and (int(pi.min()) < 0 or int(pi.max()) > 2**PROB_SCALE_BITS):
        raise ValueError(f"logsqrt2 expects probability integers in [0, 2**{PROB_SCALE_BITS}]")
    thr = torch.tensor([2 ** (2 * j - 1) for j in range(1, LOGSQRT2_TOP + 1)], dtype=torch.int64, device=pi.device)
    lg = torch.searchsorted(thr, pi**4, right=True)  # thresholds reached
    return torch.where(pi >= 1, LOGSQRT2_TOP - lg, torch.full_like(lg, LOGSQRT2_TOP + 1))


def logsqrt2_probs(p_int: Tensor) -> tuple[Tensor, Tensor]:
    """logsqrt2 probabilities: ``(V, 2**-15)``, ``V = M[c mod 2] << (7 - c // 2)`` for codes ``c <= 14``, else 0.

    ``V`` is int64 in ``[0, 2**15]``; ``V * 2**-15`` is ``2**(-c/2)`` to within ``1.1e-4`` relative.
    """
    c = logsqrt2_code(p_int)
    live = c < LOGSQRT2_CODES
    cc = c.clamp_max(LOGSQRT2_CODES - 1)
    m = torch.where(cc % 2 == 0, LOGSQRT2_M[0], LOGSQRT2_M[1])
    v = torch.where(live, m << ((LOGSQRT2_CODES - 1) // 2 - cc // 2), torch.zeros_like(m))
    return v, torch.tensor(2.0**-PROB_SCALE_BITS, dtype=torch.float32, device=v.device)


# ----------------------------------------------------------------------------- twin-uniform


def twin_ranges(bits: int, signed: bool) -> tuple[int, int, int]:
    """``(lo1, hi1, top)``: the fine range (``bits - 1`` bits) and the largest coarse code (codes ``1..top``)."""
    lo1, hi1 = qrange(bits - 1, signed)
    return lo1, hi1, 2 ** (bits - 1)


def twin_bits(bits: int, k: int, signed: bool) -> int:
    """Width of the integer form (coarse codes shifted by ``k``: up to ``2**(bits - 1 + k)``)."""
    return bits + k + int(signed)


def twin_select(fine: Tensor, coarse: Tensor, k: int, hi1: int) -> Tensor:
    """The integer form: ``coarse << k`` where the fine code passes ``hi1``, else the fine code."""
    return torch.where(fine > hi1, coarse * 2**k, fine)


def twin_int(q: Tensor, s_in: Tensor, s: Tensor, k: int, bits: int, signed: bool) -> Tensor:
    """Twin-uniform codes of integers ``q`` at ``s_in`` (int64 integer form at scale ``s``).

    Fine: ``clamp(requant(q; s_in -> s), lo1, hi1 + 1)``; coarse: ``clamp(requant(q; s_in -> s * 2**k), 1, top)``,
    each the spec's dyadic requantizer.
    """
    lo1, hi1, top = twin_ranges(bits, signed)
    fine = apply_dyadic(q, *multiplier(s_in, s), lo1, hi1 + 1)
    coarse = apply_dyadic(q, *multiplier(s_in, coarse_scale(s, k)), 1, top)
    return twin_select(fine, coarse, k, hi1)


def coarse_scale(s: Tensor, k: int) -> Tensor:
    """The coarse range's scale ``s * 2**k`` (exact in float32)."""
    return s * 2**k


def twin_float(x: Tensor, s: Tensor, k: int, bits: int, signed: bool) -> Tensor:
    """Twin-uniform codes of float ``x`` (integer form at scale ``s``, float), straight-through
    gradients for ``x`` and ``s`` inside the chosen range (LSQ's step gradient)."""
    lo1, hi1, top = twin_ranges(bits, signed)
    fine = torch.clamp(round_ste(x / s), lo1, hi1 + 1)
    coarse = torch.clamp(round_ste(x / coarse_scale(s, k)), 1, top)
    return twin_select(fine, coarse, k, hi1)


def twin_search(hist: Tensor, top: Tensor, bits: int, signed: bool, grid: int = 100) -> tuple[Tensor, int]:
    """(fine scale, k) of least squared error over a histogram of ``|x|`` on ``[0, top]``.

    Candidates: coarse scales ``top * i / (grid * 2**(bits-1))`` (``i = 1..grid``) times fine
    ratios ``2**-k`` (``k`` in :data:`TWIN_SHIFTS`), the bin centres quantized as
    :func:`twin_float` does (as positive values), all candidates at once.
    """
    hist, top = hist.double(), top.double()
    lo1, hi1, cmax = twin_ranges(bits, signed)
    dev = hist.device
    centres = (torch.arange(hist.numel(), dtype=torch.float64, device=dev) + 0.5) * top / hist.numel()
    coarse = top * torch.arange(1, grid + 1, dtype=torch.float64, device=dev) / (grid * cmax)  # [R]
    shifts = torch.tensor(TWIN_SHIFTS, dtype=torch.float64, device=dev)
    fine = coarse[:, None] / 2**shifts[None]  # [R, K]
    f = torch.round(centres / fine[..., None])  # [R, K, B]
    c = torch.clamp(torch.round(centres / coarse[:, None, None]), 1, cmax)
    val = torch.where(f > hi1, c * coarse[:, None, None], f * fine[..., None])
    err = ((centres - val) ** 2 * hist).sum(-1)  # [R, K]
    i = int(err.argmin())
    r, kk = divmod(i, len(TWIN_SHIFTS))
    return fine[r, kk].float().clamp_min(1e-8), TWIN_SHIFTS[kk]
