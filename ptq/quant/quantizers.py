"""Quantizers: small modules with explicit state (scale buffers), torchao/Brevitas style.

- :class:`WeightQuantizer`: symmetric per-output-channel absmax, nearest rounding.
- :class:`CodeQuantizer`: the same grid with integer codes chosen by a reconstruction (GPTQ).
- :class:`ActQuantizer`: symmetric per-tensor; its step from the moving-average absmax
  (``movavg``), or searched over a histogram of the calibration activations (``mse``:
  the clipping that minimises the tensor's quantization error; ``percentile``: clip at a
  percentile of ``|x|``); optional LSQ (learned step size). It requantizes integer
  accumulators with the dyadic multiplier (``ptq.quant.requant.requantize``) so the
  simulation is what integer hardware computes.

:func:`absmax_scale` is the one place a scale is derived from a range; :func:`search_clip`
the one place a clipping range is chosen from a histogram.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ptq.quant import actcodes, audit, fused, requant
from ptq.quant.qtensor import QTensor, fake_quant, grad_scale, qmax, qrange
from ptq.quant.symbolic import graph_of

SCALE_EPS = 1e-8
ACT_METHODS = ("movavg", "mse", "percentile")
ACT_CODES = ("uniform", "twin")
HIST_BINS = 2048  # bins of |x| over [0, max |x| seen] for the mse / percentile searches


def absmax_scale(absmax: Tensor, bits: int, signed: bool = True) -> Tensor:
    """Scale that maps ``absmax`` onto the largest integer of the range (floored at SCALE_EPS)."""
    return (absmax.float() / qmax(bits, signed)).clamp_min(SCALE_EPS)


def search_clip(hist: Tensor, top: Tensor, bits: int, signed: bool, method: str, percentile: float = 99.99,
                grid: int = 100) -> Tensor:
    """The clipping value (largest represented ``|x|``) chosen from a histogram of ``|x|`` over ``[0, top]``.

    ``mse``: of ``grid`` candidates ``top * k / grid`` (k = 1..grid), the one whose
    quantization (nearest rounding, clamped) of the bin centres has the least count-weighted
    squared error, all candidates at once. ``percentile``: the upper edge of the bin where
    the cumulative count first reaches ``percentile`` % of all values.
    """
    hist = hist.double()
    top = top.double()
    width = top / hist.numel()
    if method == "percentile":
        cum = hist.cumsum(0)
        idx = torch.searchsorted(cum, cum[-1] * (percentile / 100.0))
        return ((idx.clamp_max(hist.numel() - 1) + 1).double() * width).float()
    if method != "mse":
        raise ValueError(f"method {method!r} is not one of mse, percentile")
    centres = (torch.arange(hist.numel(), dtype=torch.float64, device=hist.device) + 0.5) * width
    clips = top * torch.arange(1, grid + 1, dtype=torch.float64, device=hist.device) / grid  # [R]
    steps = (clips / qmax(bits, signed)).clamp_min(SCALE_EPS)[:, None]
    q = torch.clamp(torch.round(centres[None] / steps), 0, qmax(bits, signed))  # [R, B]
    err = ((centres[None] - q * steps) ** 2 * hist[None]).sum(1)
    return clips[int(err.argmin())].float()


def channel_view(scale: Tensor, like: Tensor) -> Tensor:
    """Per-output-channel scale shaped to broadcast over a weight of any rank."""
    return scale.view(-1, *([1] * (like.dim() - 1)))


class WeightQuantizer(nn.Module):
    """Symmetric per-output-channel absmax weight quantizer with nearest rounding.

    ``forward(weight)`` returns the integer weights (as floats); ``scale`` is
    their per-channel step. ``integer`` tells callers the output holds exact
    integers (AdaRound's soft mode does not).
    """

    def __init__(self, weight: Tensor, bits: int) -> None:
        super().__init__()
        self.bits = bits
        absmax = weight.detach().abs().flatten(1).amax(1)
        self.register_buffer("scale", absmax_scale(absmax, bits))

    @property
    def integer(self) -> bool:
        return True

    def forward(self, weight: Tensor) -> Tensor:
        lo, hi = qrange(self.bits)
        return torch.clamp(torch.round(weight / channel_view(self.scale, weight)), lo, hi)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, channels={self.scale.numel()}"


class CodeQuantizer(WeightQuantizer):
    """The absmax grid of :class:`WeightQuantizer` with integer codes chosen elsewhere (GPTQ), held as a buffer.

    The scale is the absmax one of ``weight`` (the same as nearest rounding's); ``codes`` must lie in
    the signed ``bits`` range. ``forward`` ignores the float weight and returns the codes.
    """

    def __init__(self, weight: Tensor, bits: int, codes: Tensor) -> None:
        super().__init__(weight, bits)
        lo, hi = qrange(bits)
        if codes.shape != weight.shape:
            raise ValueError(f"codes of shape {tuple(codes.shape)} for a weight of shape {tuple(weight.shape)}")
        if bool((codes != torch.round(codes)).any()) or int(codes.min()) < lo or int(codes.max()) > hi:
            raise ValueError(f"codes must be integers in [{lo}, {hi}]")
        self.register_buffer("codes", codes.detach().to(torch.int8).to(weight.device))

    def forward(self, weight: Tensor) -> Tensor:
        return self.codes.to(weight.dtype)


def qdq_pair(x: Tensor, scale: Tensor, lo: int, hi: int) -> Tensor:
    """``x`` quantized at ``scale`` to [lo, hi] and back as one exportable QDQ pair (int8 / uint8 codes).

    Below 8 bits the value is clipped to the range first: int8 codes then hold the same integers.
    """
    s = float(scale)
    signed = lo < 0
    if (signed and lo > -128) or (not signed and hi < 255):
        x = x.clamp(lo * s, hi * s)
    return torch.fake_quantize_per_tensor_affine(x, s, 0, -128 if signed else 0, 127 if signed else 255)


class ActQuantizer(nn.Module):
    """Per-tensor symmetric activation quantizer, scale from a moving average of the absmax.

    Modes: ``off`` (pass the float value through), ``observe`` (update the
    moving average and the largest ``|x|`` seen, pass through), ``histogram`` (second
    calibration pass of ``mse``/``percentile``: count ``|x|`` into bins over
    ``[0, max seen]``, pass through) and ``quant``. A disabled quantizer
    (``enabled=False``: A32, or a switched-off input/output quantizer) stays
    ``off`` whatever mode is asked for.
    """

    MODES = ("off", "observe", "histogram", "quant", "qdq")  # qdq: the QDQ export's float function (ptq.intexec.qdq)

    def __init__(self, bits: int, signed: bool = True, momentum: float = 0.95, enabled: bool = True,
                 method: str = "movavg", percentile: float = 99.99, grid: int = 100, codes: str = "uniform") -> None:
        super().__init__()
        if method not in ACT_METHODS:
            raise ValueError(f"method {method!r} is not one of {ACT_METHODS}")
        if codes not in ACT_CODES:
            raise ValueError(f"codes {codes!r} is not one of {ACT_CODES}")
        self.bits, self.signed, self.momentum, self.enabled = bits, signed, momentum, enabled
        self.codes = codes  # uniform, or twin (ptq.quant.actcodes: fine step `scale`, coarse `scale * 2**shift`)
        if codes == "twin":
            self.register_buffer("shift", torch.zeros((), dtype=torch.long))
        self.method, self.percentile, self.grid = method, percentile, grid
        self.scale = nn.Parameter(torch.ones(()), requires_grad=False)
        self.register_buffer("running_absmax", torch.zeros(()))
        self.register_buffer("n_batches", torch.zeros((), dtype=torch.long))
        self.register_buffer("seen_max", torch.zeros(()))
        self.register_buffer("hist", torch.zeros(HIST_BINS if self.searched else 0, dtype=torch.float64))
        self.mode = "off"
        self.name = ""
        self.qdrop = 0.0  # QDrop while reconstructing: per element, the probability of passing the float value
        self.feeds_kernel = False  # its output is an integer kernel's input (ivit): QDrop never drops it

    @property
    def searched(self) -> bool:
        """Whether the step comes from a histogram search (a second calibration pass; always for twin)."""
        return (self.method != "movavg" or self.codes == "twin") and self.enabled

    # -- state -------------------------------------------------------------
    def set_mode(self, mode: str) -> None:
        if mode not in self.MODES:
            raise ValueError(f"mode {mode!r} is not one of {self.MODES}")
        self.mode = mode if self.enabled else "off"

    @property
    def lsq(self) -> bool:
        """True while the step size is being learned (LSQ)."""
        return self.scale.requires_grad

    def observe(self, real: Tensor) -> None:
        """Fold one batch's absmax into the moving average (the first batch initialises it)."""
        m = real.detach().abs().amax().float()
        if int(self.n_batches) == 0:
            self.running_absmax.copy_(m)
        else:
            self.running_absmax.mul_(self.momentum).add_((1.0 - self.momentum) * m)
        self.seen_max.copy_(torch.maximum(self.seen_max, m))
        self.n_batches += 1

    def count(self, real: Tensor) -> None:
        """Add one batch's ``|x|`` to the histogram over ``[0, seen_max]`` (values above go to the last bin)."""
        top = float(self.seen_max)
        if top <= 0:
            return
        a = real.detach().abs().float().flatten().clamp_max(top)
        self.hist += torch.histc(a, bins=HIST_BINS, min=0.0, max=top).to(self.hist.dtype)

    @torch.no_grad()
    def freeze(self) -> None:
        """Set the scale from the observed range; error if nothing was observed."""
        if not self.enabled:
            return
        if int(self.n_batches) == 0:
            raise RuntimeError(f"activation quantizer {self.name or '?'} saw no calibration data")
        if self.codes == "twin":
            if float(self.hist.sum()) <= 0:
                raise RuntimeError(f"twin quantizer {self.name or '?'} saw no nonzero calibration data")
            s, k = actcodes.twin_search(self.hist, self.seen_max, self.bits, self.signed, self.grid)
            self.scale.copy_(s)
            self.shift.fill_(k)
        elif self.searched and float(self.hist.sum()) > 0:
            clip = search_clip(self.hist, self.seen_max, self.bits, self.signed, self.method, self.percentile,
                               self.grid)
            self.scale.copy_(absmax_scale(clip, self.bits, self.signed))
        else:
            self.scale.copy_(absmax_scale(self.running_absmax, self.bits, self.signed))

    # -- forward -----------------------------------------------------------
    def _step(self, x: Tensor) -> Tensor:
        """The scale, with LSQ's gradient scaling when it is learned."""
        if not self.lsq:
            return self.scale
        per_sample = x[0].numel() if x.dim() > 1 else x.numel()
        return grad_scale(self.scale, 1.0 / math.sqrt(per_sample * qmax(self.bits, self.signed)))

    def _emit(self, q: Tensor, s: Tensor) -> QTensor:
        bits = self.out_bits
        audit.record(self.name, q, bits, self.signed)
        return QTensor(q, s, bits, self.signed)

    @property
    def out_bits(self) -> int:
        """Width of the integers this quantizer emits (twin: its integer form at the fine scale)."""
        return actcodes.twin_bits(self.bits, int(self.shift), self.signed) if self.codes == "twin" else self.bits

    def _twin(self, x: QTensor) -> QTensor:
        """Twin-uniform codes (``ptq.quant.actcodes``): integer form at the fine scale ``self.scale``."""
        k = int(self.shift)
        g = graph_of(x.v)
        if g is not None:  # exporting: two requantizations and the select, as graph nodes
            if not x.integer:
                raise ValueError(f"{self.name}: twin codes are exported only of integer inputs")
            rf, rc = requant.multiplier(x.s, self.scale), requant.multiplier(x.s, actcodes.coarse_scale(self.scale, k))
            v = g.twin(x.v, rf, rc, k, *actcodes.twin_ranges(self.bits, self.signed), self.name)
            return QTensor(v, self.scale, self.out_bits, self.signed)
        s = self._step(x.v)
        if x.integer and not torch.is_grad_enabled():
            q = actcodes.twin_int(x.v, x.s, self.scale.detach(), k, self.bits, self.signed).to(torch.float32)
            return self._emit(q, s.detach())
        real = x.real()
        q = actcodes.twin_float(real, s, k, self.bits, self.signed)
        return self._emit(self._drop(real, s, q) if torch.is_grad_enabled() else q, s)

    def forward(self, x: QTensor) -> QTensor:
        if self.mode == "off":
            return x.dequant() if x.integer or x.per_channel else x
        if self.mode == "qdq":
            return QTensor.from_float(qdq_pair(x.plain(), self.scale, *qrange(self.bits, self.signed)))
        if self.mode in ("observe", "histogram"):
            real = x.real()
            if self.mode == "observe":
                self.observe(real)
            elif self.searched:
                self.count(real)
            return QTensor.from_float(real)
        if self.codes == "twin":
            return self._twin(x)
        g = graph_of(x.v)
        if g is not None:  # exporting the integer program: the same step and multiplier, as graph nodes
            lo, hi = qrange(self.bits, self.signed)
            if x.integer:
                m, e = requant.multiplier(x.s, self.scale)
                return QTensor(g.requantize(x.v, m, e, lo, hi, True, self.name), self.scale, self.bits, self.signed)
            return QTensor(g.quantize(x.v, self.scale, lo, hi, self.name), self.scale, self.bits, self.signed)
        s = self._step(x.v)
        if not torch.is_grad_enabled():  # evaluation: fused float32 kernels, the same integers (ptq.quant.fused)
            if x.integer:
                q = fused.requantize_float(x.v, x.s, self.scale.detach(), self.bits, self.signed)
            else:
                q = fused.quantize(x.v, x.s, s.detach(), *qrange(self.bits, self.signed))
        else:
            # training: fake quantization of the real value. For an integer input it equals the
            # dyadic requantizer except where x*s_in/s_out lies within 2**-31 of a rounding tie.
            real = x.real()
            q = self._drop(real, s, fake_quant(real, s, *qrange(self.bits, self.signed)))
        return self._emit(q, s)

    def _drop(self, real: Tensor, s: Tensor, q: Tensor) -> Tensor:
        """QDrop (training only): each element keeps its float value ``real / s`` with probability ``qdrop``.

        A fresh mask every call, i.e. every iteration. A dropped element's real value ``v * s`` is
        the float value itself, so it passes no gradient to the step ``s``.
        """
        if self.qdrop <= 0.0:
            return q
        return torch.where(torch.rand_like(q) < self.qdrop, real / s, q)

    def add(self, a: QTensor, b: QTensor) -> QTensor:
        """Residual add (IdAdd): requantize both operands to this scale unclamped, add, clamp once.

        A non-integer ``b`` (a float constant such as the position embedding)
        is rounded to this scale once, as a compiler would fold it.
        """
        if self.mode != "quant" or not a.integer:
            return self(QTensor.from_float(a.real() + b.real()))
        if torch.is_grad_enabled():  # training: fake quantization of the sum (see forward)
            s = self._step(a.v)
            real = a.real() + b.real()
            return self._emit(self._drop(real, s, fake_quant(real, s, *qrange(self.bits, self.signed))), s)
        sd = self.scale
        g = graph_of(a.v)
        if g is not None:  # exporting: the graph requantizes both operands unclamped (a float one folded) and adds
            lo, hi = qrange(self.bits, self.signed)
            rb = requant.multiplier(b.s, sd) if b.integer else None
            out = g.add(a.v, requant.multiplier(a.s, sd), b.v if b.integer else self.fold(b, sd), rb, lo, hi, self.name)
            return QTensor(out, sd, self.bits, self.signed)
        if b.integer:
            fast = fused.requantize_add(a.v, a.s, b.v, b.s, sd, self.bits, self.signed)
            if fast is not None:
                return self._emit(fast, sd)
        qa = requant.requantize(a.v, a.s, sd, self.bits, self.signed, clamp=False)
        if b.integer:
            qb = requant.requantize(b.v, b.s, sd, self.bits, self.signed, clamp=False)
        else:
            qb = self.fold(b, sd)
        return self._emit(requant.clamp_int(qa + qb, self.bits, self.signed).to(torch.float32), sd)

    @staticmethod
    def fold(b: QTensor, s: Tensor) -> Tensor:
        """A float operand of a residual add (the position embedding) as int64 integers at scale ``s``."""
        return torch.round(b.real().double() / s.double()).to(torch.int64)

    def extra_repr(self) -> str:
        kind = "int" if self.signed else "uint"
        twin = f", twin shift={int(self.shift)}" if self.codes == "twin" else ""
        return (f"{kind}{self.bits}{twin}, {self.method}, momentum={self.momentum}, enabled={self.enabled}, "
                f"mode={self.mode}")
