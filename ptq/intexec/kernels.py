"""The integer kernels of spec/integer-ops.md spelled in standard ONNX integer ops.

Written from the spec, not from ``ptq.quant.ivit``: the two implementations meet only in
the integers they produce (``tests/test_onnx_kernels.py`` checks them on edge inputs, the
verifier on every eval image), so a bug in one is not silently shared by the other.

ONNX semantics that shape the spelling (onnxruntime's CPU kernels):

* integer ``Div`` truncates toward zero (floor where both operands are known positive) and is
  slow in int64; a floor shift of a possibly negative ``x`` is a logical ``BitShift`` of
  ``x + 2**62`` (:meth:`Emitter.floor_shift`);
* ``Mod`` with ``fmod=0`` has Python semantics (result takes the divisor's sign);
* ``BitShift`` takes unsigned types only, so ``2**k`` for a data-dependent ``k`` is a
  table ``Gather``.

Everything here computes in int64 (int32 where the values provably fit); the caller casts.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ptq.quant.qtensor import INT32_MAX  # the spec's 2**31 - 1

I64, I32 = TensorProto.INT64, TensorProto.INT32
OPSET = 18
IR_VERSION = 10


class Emitter:
    """Appends ONNX nodes and (de-duplicated) constant initializers; names every value uniquely."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, onnx.TensorProto] = {}
        self._const_names: dict[tuple, str] = {}
        self._used: set[str] = set()
        self.scope = "graph"  # "<role>:<tensor>" of the op being spelled: node names carry it (profiles)

    def fresh(self, hint: str) -> str:
        """A value name not used before, ``hint`` when it is free."""
        name, i = hint, 1
        while name in self._used:
            name, i = f"{hint}_{i}", i + 1
        self._used.add(name)
        return name

    def const(self, value: Any, dtype: Any = np.int64, hint: str = "c") -> str:
        """An initializer holding ``value`` (array-like) as ``dtype``; equal constants share one name."""
        arr = np.array(value, dtype=dtype, order="C")  # (ascontiguousarray would make scalars 1-d)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        name = self._const_names.get(key)
        if name is None:
            name = self.fresh(f"const.{hint}")
            self.inits[name] = numpy_helper.from_array(arr, name)
            self._const_names[key] = name
        return name

    def op(self, op_type: str, inputs: list[str], out: str | None = None, **attrs: Any) -> str:
        """One node with one output; returns the output's name."""
        name = self.fresh(out or f"{op_type.lower()}")
        self.nodes.append(helper.make_node(op_type, inputs, [name], name=f"{self.scope}/{len(self.nodes)}.{op_type}",
                                           **attrs))
        return name

    def shape_op(self, op: str, x: str, attrs: dict[str, Any]) -> str:
        """A shape operation (Reshape, Transpose, Slice, Gather, Pad, Cast) on ``x``, as ``ptq.quant.symbolic`` names it."""
        em = self
        if op == "Reshape":
            return em.op("Reshape", [x, em.const(list(attrs["target"]))])
        if op == "Transpose":
            return em.op("Transpose", [x], perm=list(attrs["perm"]))
        if op == "Slice":
            return em.op("Slice", [x, em.const([attrs["start"]]), em.const([attrs["stop"]]), em.const([attrs["axis"]])])
        if op == "Gather":
            return em.op("Gather", [x, em.const(attrs["index"])], axis=attrs["axis"])
        if op == "Pad":
            return em.op("Pad", [x, em.const(list(attrs["pads"]))])
        if op == "Cast":
            return em.op("Cast", [x], to=attrs["to"])
        if op == "Roll":  # torch.roll by k: the last k entries first
            n, k, axis = attrs["size"], attrs["shift"], attrs["axis"]
            parts = [em.op("Slice", [x, em.const([a]), em.const([b]), em.const([axis])]) for a, b in ((n - k, n), (0, n - k))]
            return em.op("Concat", parts, axis=axis)
        if op == "ReduceSum":
            return em.op("ReduceSum", [x, em.const([attrs["axis"]])], keepdims=0)
        if op == "AddConst":
            c = attrs["const"]
            return em.op("Add", [x, em.const(c.numpy().astype(np.int32), np.int32, hint="bias")])
        raise ValueError(f"no ONNX lowering for {op}")

    # -- integer arithmetic helpers ------------------------------------------------------------
    def floor_shift(self, x: str, k: Any) -> str:
        """``floor(x / 2**k)`` of int64 ``x`` (``|x| < 2**62``) of any sign; ``k`` an int or per-channel array in [0, 62].

        ``BitShift`` is unsigned only, and int64 ``Div`` is a slow hardware division, so the shift
        is arithmetic by an offset: ``x + 2**62`` is non-negative, its logical shift by ``k`` is
        ``floor(x / 2**k) + 2**(62 - k)``.
        """
        k = np.asarray(k, dtype=np.int64)
        u = self.op("Cast", [self.op("Add", [x, self.const(np.int64(1) << 62, hint="off62")])], to=TensorProto.UINT64)
        sh = self.op("Cast", [self.op("BitShift", [u, self.const(k.astype(np.uint64), np.uint64, hint="k")],
                                      direction="RIGHT")], to=I64)
        return self.op("Sub", [sh, self.const(np.int64(1) << (62 - k), hint="off")])

    def round_shift(self, p: str, k: Any) -> str:
        """``round_half_to_even(p / 2**k)`` of int64 ``p`` (``|p| < 2**62``), ``k`` in [1, 62] (per channel allowed).

        With ``fl = floor(p / 2**k)`` and ``rem = p - fl * 2**k``: round up exactly when
        ``rem + (fl & 1) > 2**(k-1)`` (above half, or at half with an odd floor).
        """
        k = np.asarray(k, dtype=np.int64)
        fl = self.floor_shift(p, k)
        rem = self.op("BitwiseAnd", [p, self.const((np.int64(1) << k) - 1, hint="mask")])
        odd = self.op("BitwiseAnd", [fl, self.const(1)])
        up = self.op("Greater", [self.op("Add", [rem, odd]), self.const(np.int64(1) << (k - 1), hint="half")])
        return self.op("Add", [fl, self.op("Cast", [up], to=I64)])

    def round_shift_u64(self, u: str, k: Any) -> str:
        """``round_half_to_even(p / 2**k)`` as int64, from ``u = p mod 2**64`` (uint64), ``|p| < 2**62``, ``k`` in [1, 62].

        ``v = p + 2**63`` is non-negative and ``floor(v / 2**k) = floor(p / 2**k) + 2**(63 - k)`` keeps
        the parity of the floor, so the rounding is ``(v + 2**(k-1) - 1 + parity) >> k`` in logical
        shifts, less the offset: 12 passes where the int64 spelling takes 15, and no division.
        """
        k = np.asarray(k, dtype=np.int64)
        ku = self.const(k.astype(np.uint64), np.uint64, hint="k")
        v = self.op("Add", [u, self.const(np.uint64(1 << 63), np.uint64, hint="off63")])
        odd = self.op("BitwiseAnd", [self.op("BitShift", [v, ku], direction="RIGHT"), self.const(np.uint64(1), np.uint64)])
        h1 = self.const(((np.int64(1) << (k - 1)) - 1).astype(np.uint64), np.uint64, hint="h1")
        r = self.op("BitShift", [self.op("Add", [self.op("Add", [v, h1]), odd]), ku], direction="RIGHT")
        return self.op("Sub", [self.op("Cast", [r], to=I64), self.const(np.int64(1) << (63 - k), hint="off")])

    def reduce(self, op_type: str, x: str, keepdims: int = 1) -> str:
        """Reduction over the last axis (opset 18: axes as an input)."""
        return self.op(op_type, [x, self.const([-1])], keepdims=keepdims)


def evaluate(build: Any, x: np.ndarray) -> np.ndarray:
    """Run ``build(emitter, input_name) -> output_name`` on ``x`` (int64) in onnxruntime; the int64 result.

    Kernel tables are computed this way at export: by the ONNX spelling itself, not by ``ptq.quant.ivit``.
    """
    import onnxruntime as ort

    em = Emitter()
    em.fresh("x")
    em.fresh("result")
    out = build(em, "x")
    dims = [f"d{i}" for i in range(x.ndim)]
    graph = helper.make_graph([*em.nodes, helper.make_node("Cast", [out], ["result"], to=I64)], "kernel",
                              [helper.make_tensor_value_info("x", I64, dims)],
                              [helper.make_tensor_value_info("result", I64, dims)], initializer=list(em.inits.values()))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": np.ascontiguousarray(x, dtype=np.int64)})[0]


def x0_of(t: float) -> int:
    """``floor(-1 / t)`` in float64 (the integer that stands for -1 at step ``t``)."""
    if not (t > 0 and math.isfinite(t)):
        raise ValueError(f"kernel scale must be positive and finite, got {t}")
    return math.floor(-1.0 / t)


def f32(s: Any) -> float:
    """A per-tensor scale's float32 value as a Python (float64) number."""
    return float(np.float32(np.asarray(s, dtype=np.float32).reshape(())))


def int_exp(em: Emitter, a: str, x0: int, n: int, cap: bool = False) -> str:
    """Spec ``int_exp`` of int64 ``a`` (``a <= 0``); ``cap``: any sign of ``a``, result ``min(., 2**31 - 1)``.

    For ``a > 0`` the exact value can pass int64; it only enters ShiftGELU's
    ``min(e1 + e2, 2**31 - 1)``, where the capped value gives the same total.
    """
    lim = em.const(n * x0)
    a = em.op("Max", [a, lim])
    a = em.op("Sub", [em.op("Add", [a, em.floor_shift(a, 1)]), em.floor_shift(a, 4)])
    a = em.op("Max", [a, lim])
    x0c = em.const(x0)
    r = em.op("Mod", [a, x0c], fmod=0)  # x0 < r <= 0
    qq = em.op("Div", [em.op("Sub", [a, r]), x0c])  # exact
    top = 32 if cap else n
    sh = em.op("Sub", [em.const(n), qq])  # >= 0; above n only for a > 0
    if cap:
        sh = em.op("Min", [sh, em.const(top)])  # val * 2**32 / 2 > 2**31 - 1 already
    pw = em.op("Gather", [em.const([1 << i for i in range(top + 1)], hint="pow2s"), sh])
    val = em.op("Sub", [r, em.const(2 * x0)])  # >= 1
    out = em.op("Div", [em.op("Mul", [val, pw]), em.const(2)])  # positive: Div is floor
    return em.op("Min", [out, em.const(INT32_MAX)]) if cap else out


def shiftmax(em: Emitter, q: str, s: Any, n: int, out_bits: int, out: str, keep: np.ndarray | None = None) -> str:
    """Spec ``shiftmax`` over the last axis: int64 ``q`` -> int64 ``p`` in [0, 2**(out_bits - 1)].

    ``keep``: the masked Shiftmax (docs/swin.md): masked entries take the row minimum, then their
    exponential is zeroed."""
    x0 = x0_of(f32(s))
    if keep is not None:
        q = masked_min(em, q, keep)
    a = em.op("Sub", [q, em.reduce("ReduceMax", q)])
    e = kept(em, int_exp(em, a, x0, n), keep, np.int64)
    total = em.op("Min", [em.reduce("ReduceSum", e), em.const(INT32_MAX)])
    f = em.op("Div", [em.const(INT32_MAX), total])
    return em.op("Div", [em.op("Mul", [e, f]), em.const(1 << (32 - out_bits))], out=out)


def masked_min(em: Emitter, q: str, keep: np.ndarray) -> str:
    """``where(keep, q, min(q))`` over the last axis: a masked entry cannot be the row max."""
    return em.op("Where", [em.const(keep, np.bool_, hint="keep_mask"), q, em.reduce("ReduceMin", q)])


def kept(em: Emitter, e: str, keep: np.ndarray | None, dtype: Any) -> str:
    """``e`` where ``keep``, 0 elsewhere (the masked Shiftmax's exponentials); ``e`` itself without a mask."""
    return e if keep is None else em.op("Mul", [e, em.const(keep, dtype, hint="keep")])


def log2_probs(em: Emitter, p: str, out: str) -> str:
    """``2**(round(log2 p) - 1)`` (0 for ``p <= 1``) of int64 Shiftmax integers ``p`` in [0, 2**15].

    ``round(log2 p) >= j`` exactly when ``p**2 >= 2**(2j - 1)``: the rounded logarithm is the
    number of thresholds ``p**2`` reaches, and the output a table lookup of it.
    """
    sq = em.op("Unsqueeze", [em.op("Mul", [p, p]), em.const([-1])])
    thr = em.const([1 << (2 * j - 1) for j in range(1, 17)], hint="log2thr")
    lg = em.op("ReduceSum", [em.op("Cast", [em.op("GreaterOrEqual", [sq, thr])], to=I64), em.const([-1])],
               keepdims=0)
    table = em.const([0] + [1 << (j - 1) for j in range(1, 17)], hint="log2tbl")
    return em.op("Gather", [table, lg], out=out)


def shift_gelu(em: Emitter, q: str, s: Any, n: int, sig_bits: int, out: str) -> str:
    """Spec ``shift_gelu``: int64 ``q`` -> ``q * g`` (int64), sigmoid's maximum over the last axis."""
    x0 = x0_of(1.702 * f32(s))  # t = 1.702 * s in float64
    mx = em.reduce("ReduceMax", q)
    e1 = int_exp(em, em.op("Sub", [q, mx]), x0, n)
    e2 = int_exp(em, em.op("Neg", [mx]), x0, n, cap=True)
    total = em.op("Min", [em.op("Add", [e1, e2]), em.const(INT32_MAX)])
    f = em.op("Div", [em.const(INT32_MAX), total])
    g = em.op("Div", [em.op("Mul", [e1, f]), em.const(1 << (32 - sig_bits))])
    return em.op("Mul", [q, g], out=out)


NEWTON_STEPS = 10


def layernorm(em: Emitter, q: str, channels: int, b: Any, out: str) -> str:
    """Spec ``int_layernorm`` steps 1-5 plus the layer's integer bias term ``b`` (int64 per channel)."""
    return layernorm_output(em, layernorm_scaled(em, q, channels), b, out)


def layernorm_output(em: Emitter, df: str, b: Any, out: str) -> str:
    """``floor(d * f / 2) + b`` from :func:`layernorm_scaled`'s ``d * f``."""
    return em.op("Add", [em.floor_shift(df, 1), em.const(np.asarray(b, dtype=np.int64), hint="ln_bias")], out=out)


def layernorm_scaled(em: Emitter, q: str, channels: int) -> str:
    """Spec ``int_layernorm`` up to ``d * f`` (int64), before its halving ``floor(d * f / 2)``."""
    c = em.const(channels)
    tot = em.reduce("ReduceSum", q)
    r = em.op("Mod", [tot, c], fmod=0)  # in [0, C)
    fl = em.op("Div", [em.op("Sub", [tot, r]), c])
    up = em.op("Greater", [em.op("Add", [em.op("Mul", [r, em.const(2)]), em.op("BitwiseAnd", [fl, em.const(1)])]), c])
    mean = em.op("Add", [fl, em.op("Cast", [up], to=I64)])  # round half to even of tot / C
    d = em.op("Sub", [q, mean])
    var = em.reduce("ReduceSum", em.op("Mul", [d, d]))
    k = em.const(1 << 16)
    for _ in range(NEWTON_STEPS):  # unrolled integer square root; k >= 1 throughout
        k = em.op("Div", [em.op("Add", [k, em.op("Div", [var, k])]), em.const(2)])
    f = em.op("Div", [em.const(INT32_MAX), k])
    return em.op("Mul", [d, f])


def logsqrt2_probs(em: Emitter, p: str, out: str) -> str:
    """logsqrt2 probabilities (docs/act-quantizers.md) of int64 probability integers ``p`` in [0, 2**15].

    ``L = round(2 log2 p)`` is the number of thresholds ``2**(2j - 1)`` (j = 1..30) that ``p**4``
    reaches (``p**4 <= 2**60``); the code is ``30 - L``, and the output a table lookup of ``L``:
    ``M[c mod 2] * 2**(7 - c // 2)`` for codes ``c <= 14`` (``M = 256, 181``), 0 beyond.
    """
    p2 = em.op("Mul", [p, p])
    p4 = em.op("Unsqueeze", [em.op("Mul", [p2, p2]), em.const([-1])])
    thr = em.const([1 << (2 * j - 1) for j in range(1, 31)], hint="logsqrt2thr")
    lg = em.op("ReduceSum", [em.op("Cast", [em.op("GreaterOrEqual", [p4, thr])], to=I64), em.const([-1])],
               keepdims=0)
    table = [0] * 31
    for c in range(15):
        table[30 - c] = (256 if c % 2 == 0 else 181) << (7 - c // 2)
    return em.op("Gather", [em.const(table, hint="logsqrt2tbl"), lg], out=out)


def twin_select(em: Emitter, fine: str, coarse: str, k: int, hi1: int, out: str) -> str:
    """Twin-uniform's integer form from int32 fine and coarse codes: ``coarse * 2**k`` where ``fine > hi1``, else ``fine``."""
    wide = em.op("Mul", [coarse, em.const(1 << k, np.int32)])
    return em.op("Where", [em.op("Greater", [fine, em.const(hi1, np.int32)]), wide, fine], out=out)
