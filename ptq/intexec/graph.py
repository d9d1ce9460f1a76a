"""The ONNX side of a ``QuantViT``'s integer program: each operation the model hands over, in ONNX ops.

:class:`OnnxGraph` implements ``ptq.quant.symbolic.IntGraph``. The model's own ``forward``
drives it (``ptq.intexec.build``); this module decides only how each operation is spelled:

* activations are int32 tensors between ops (Clip and Min have no int16 kernels, Where none
  for int8/int16); products and kernel intermediates are int64 where they need it;
* linear layers and attention matmuls are ``MatMulInteger``: 8-bit activations shifted by 128
  into uint8 with ``a_zero_point = 128`` (onnxruntime's fast kernels take uint8 x int8),
  INT8/INT4 weights stored int8, an INT32 bias added to the int32 accumulator;
* requantization is the spec's dyadic rounding ``round_half_to_even(q * m / 2**e)``, spelled by
  ``ptq.intexec.requant`` for the range of ``q`` that can still change the result (past it every
  channel saturates); after ShiftGELU's table it folds into the table. An INT8 result also comes
  as its uint8 twin (``+ 128``, :meth:`OnnxGraph.u8_twin`), which ``MatMulInteger`` reads;
* the kernels come from ``ptq.intexec.kernels``; logsqrt2 / twin codes from ``ptq.intexec.codes``.

Every value is named after the tensor the simulation's range audit records (quantizer names,
``<linear>.acc``, ``<quantizer>.int``), and :attr:`OnnxGraph.values` declares its width, so a
debug export exposes them as outputs and a mismatch names the first diverging tensor.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto
from torch import Tensor

from ptq.intexec import kernels
from ptq.intexec import requant as rq
from ptq.intexec.codes import CodesOps
from ptq.intexec.kernels import I32, I64, Emitter
from ptq.quant.qtensor import INT32_MAX
from ptq.quant.symbolic import Sym

ACC_BITS = 32
_ELEM = {"float32": TensorProto.FLOAT, "int32": TensorProto.INT32, "int64": TensorProto.INT64}


def _width(lo: int, hi: int) -> tuple[int, bool]:
    """Declared (bits, signed) of a clamp range."""
    if lo >= 0:
        return max(1, hi.bit_length()), False
    return max(hi.bit_length(), (-lo - 1).bit_length()) + 1, True


class OnnxGraph(CodesOps):
    """Builds the integer ONNX graph as the model's forward calls it (see module docstring)."""

    def __init__(self) -> None:
        self.em = Emitter()
        self.values: dict[str, dict[str, Any]] = {}  # declared width and role of every named integer value
        self.named: dict[str, Sym] = {}
        self.constants: dict[str, dict[str, Any]] = {}  # role and range of the integer constants (widths report)
        self._tables: dict[str, tuple[np.ndarray, str]] = {}  # value -> (table, index) of a table Gather's output
        self._u8: dict[str, str] = {}  # 8-bit activation -> its uint8 twin (value + 128), made where it is cheap
        self._halved: dict[str, tuple[str, np.ndarray, int]] = {}  # I-LayerNorm output -> (d * f, bias, bound)
        self._biased: dict[str, tuple] = {}  # int32 linear accumulator -> (product, bias, shape, bound, kind)

    # -- values ----------------------------------------------------------------------------------
    def input(self, name: str, shape: tuple[int, ...]) -> Sym:
        """The float input (its dim 0 is the batch)."""
        self.em.fresh(name)
        return Sym(self, name, shape, "float32", 0, 0)

    def _out(self, name: str, shape: tuple[int, ...], dtype: str, lo: int, hi: int, *, kind: str,
             bits: int, signed: bool, matmul: str | None = None) -> Sym:
        """A named integer value: declared width recorded, Sym returned."""
        sym = Sym(self, name, shape, dtype, lo, hi)
        self.values[name] = {"bits": bits, "signed": signed, "kind": kind, **({"matmul": matmul} if matmul else {})}
        self.named[name] = sym
        return sym

    def _cast(self, x: Sym | str, to: int) -> str:
        name = x.name if isinstance(x, Sym) else x
        if isinstance(x, Sym) and _ELEM.get(x.dtype) == to:
            return name
        return self.em.op("Cast", [name], to=to)

    def _const_int(self, name: str, arr: np.ndarray, dtype: Any, role: str) -> str:
        c = self.em.const(arr.astype(dtype), dtype, hint=name)
        if arr.size:
            self.constants[name] = {"role": role, "dtype": np.dtype(dtype).name, "min": int(arr.min()),
                                    "max": int(arr.max())}
        return c

    # -- shape operations (Sym methods) ---------------------------------------------------------
    def node(self, op: str, inputs: list[Any], shape: tuple[int, ...], dtype: str, lo: int, hi: int,
             **attrs: Any) -> Sym:
        x: Sym = inputs[0]
        self.em.scope = f"shape:{x.name}"
        out = self.em.shape_op(op, x.name, {"to": _ELEM[attrs["to"]]} if op == "Cast" else attrs)
        if x.name in self._u8 and op in ("Reshape", "Transpose", "Slice", "Gather", "Roll"):  # moves values only
            self._u8[out] = self.em.shape_op(op, self._u8[x.name], attrs)
        return Sym(self, out, shape, dtype, lo, hi)

    # -- integer operations ---------------------------------------------------------------------
    def quantize(self, x: Sym, s: Tensor, lo: int, hi: int, name: str) -> Sym:
        """Float image -> integers: ``clamp(round_half_even(x / s))`` in float32, the one float op before the integers."""
        self.em.scope = f"quantize:{name}"
        em = self.em
        sc = em.const(np.float32(s.detach().cpu().reshape(()).item()), np.float32, hint="in_scale")
        r = em.op("Round", [em.op("Div", [x.name, sc])])
        c = em.op("Clip", [r, em.const(np.float32(lo), np.float32), em.const(np.float32(hi), np.float32)])
        out = em.op("Cast", [c], out=name, to=I32)
        bits, signed = _width(lo, hi)
        return self._out(out, x.shape, "int32", lo, hi, kind="activation", bits=bits, signed=signed)

    def requantize(self, x: Sym, m: Tensor, e: Tensor, lo: int, hi: int, clamp: bool, name: str,
                   saturate: int | None = None) -> Sym:
        """Spec "requantize": ``round_half_to_even(q * m / 2**e)``, clamped to ``[lo, hi]`` when ``clamp``.

        ``saturate``: only results up to that magnitude matter, beyond it only their sign (a clamped
        output's own range; for a residual operand, see :meth:`add`). ``q`` is first clipped where
        every channel's result passes it, so the result cannot change where it matters. Then the
        shortest exact spelling ``ptq.intexec.requant.spell`` finds for that range.
        """
        self.em.scope = f"requant:{name}"
        em = self.em
        m64, e64 = rq.normalise(rq.as_ints(m), rq.as_ints(e), name)
        if clamp and m64.size == 1 and x.name in self._tables:
            return self._requantized_table(x, m, e, lo, hi, name)
        src, src_dt, bound = x.name, x.dtype, x.bound
        to_u8 = clamp and -128 <= lo and hi <= 127
        ln = self._halved.get(x.name) if to_u8 else None
        fold = rq.halved_offset(ln[2], ln[1], m64, e64, max(-lo, hi)) if ln else None  # I-LayerNorm's halving, bias
        saturate = max(-lo, hi) if clamp else saturate
        whole = self._whole_range(x, m64, e64) if to_u8 and fold is None else None
        if whole is not None:  # exact over the whole range: no saturating clip, the bias in the constant
            src, bias, m64, e64, k_whole = whole
        elif fold is None:  # the fold clips I-LayerNorm's d * f itself
            sat = rq.saturating_bound(m64, e64, saturate) if saturate is not None else bound
            if sat < bound:  # |q| >= sat clamps to lo / hi in every channel, as q = +-sat does
                src_np = np.int32 if src_dt == "int32" else np.int64
                src = em.op("Clip", [src, em.const(src_np(-sat), src_np), em.const(src_np(sat), src_np)])
                bound = sat
            m64, e64 = rq.quiet(bound, m64, e64)
        k_u8 = fold[1] if fold else k_whole if whole else rq.shifted_offset(bound, m64, e64) if to_u8 else None
        if k_u8 is not None:  # the floor, then the value and its uint8 twin from it
            k = np.array(k_u8, dtype=np.int64)
            fl = rq.halved_floor(em, ln[0], ln[1], *fold) if fold else \
                rq.offset_floor(em, src, m64, e64, k, bias if whole else None)
            twin = rq.u8_of_floor(em, fl, k_u8, lo, hi)
            y, dt = rq.unoffset(em, fl, k)
        else:
            y, dt = rq.spell(em, src, src_dt, bound, m64, e64, name)
        if clamp:
            if dt == "int32":
                y = em.op("Clip", [y, em.const(lo, np.int32), em.const(hi, np.int32)], out=name)
            else:
                y = em.op("Cast", [em.op("Clip", [y, em.const(lo), em.const(hi)])], out=name, to=I32)
            if k_u8 is not None:
                self._u8[y] = twin
            bits, signed = _width(lo, hi)
            return self._out(y, x.shape, "int32", lo, hi, kind="activation", bits=bits, signed=signed)
        y = em.op("Identity", [y], out=name)
        b = rq.result_bound(bound, m64, e64)
        return self._out(y, x.shape, dt, -b, b, kind="operand", bits=ACC_BITS, signed=True)

    def _whole_range(self, x: Sym, m64: np.ndarray, e64: np.ndarray) -> tuple | None:
        """``(source, bias, m, e, K)`` where the offset spelling is exact over ``x``'s whole range, else None.

        Then the saturating Clip is not needed (the uint8 twin's Clip saturates), and a linear's bias
        folds into the offset constant: ``(p + b) * m + c = p * m + (b * m + c)`` modulo 2**64, the
        int32 ``Add`` is not read. Two int32 passes fewer per requantization.
        """
        m_q, e_q = rq.quiet(x.bound, m64, e64)
        k = rq.shifted_offset(x.bound, m_q, e_q)
        if k is None:
            return None
        if x.name not in self._biased:
            return x.name, None, m_q, e_q, k
        product, bias, shape, bound, kind = self._biased[x.name]
        # the int32 tensor the model now holds is the product: the widths report measures it
        self._out(product, shape, "int32", -bound, bound, kind="accumulator", bits=ACC_BITS, signed=True, matmul=kind)
        return product, bias, m_q, e_q, k

    def _requantized_table(self, x: Sym, m: Tensor, e: Tensor, lo: int, hi: int, name: str) -> Sym:
        """A per-tensor requantization of a table ``Gather``'s output, folded into the table: one ``Gather``.

        The folded table is this requantizer's own ONNX spelling run on the table's entries
        (``kernels.evaluate``), so each entry is what the unfolded graph computes for it. The
        unfolded value stays in the graph only where something else reads it (a debug export);
        :meth:`model` drops it otherwise.
        """
        table, idx = self._tables[x.name]
        sub = OnnxGraph()

        def spell(em: kernels.Emitter, v: str) -> str:
            sub.em = em
            return sub.requantize(Sym(sub, v, (1, table.size), "int64", x.lo, x.hi), m, e, lo, hi, True, "t").name

        folded = kernels.evaluate(spell, table.reshape(1, -1)).reshape(-1)
        self.em.scope = f"requant:{name}"
        y = self.em.op("Gather", [self.em.const(folded, np.int32, hint="requant_table"), idx], out=name)
        if -128 <= lo and hi <= 127:  # a second table holds the uint8 operand of the next MatMulInteger
            self._u8[y] = self.em.op("Gather", [self.em.const(folded + 128, np.uint8, hint="requant_table_u8"), idx])
        bits, signed = _width(lo, hi)
        return self._out(y, x.shape, "int32", lo, hi, kind="activation", bits=bits, signed=signed)

    def add(self, a: Sym, ra: tuple[Tensor, Tensor], b: Sym | Tensor, rb: tuple[Tensor, Tensor] | None, lo: int,
            hi: int, name: str) -> Sym:
        """Residual add: both operands requantized unclamped (``ra``, ``rb``: their ``(m, e)``; a folded
        constant ``b`` has none), added, clamped once.

        Where one operand's result passes ``top + |other|`` (``top = max(-lo, hi)``), the sum
        saturates on that operand's side whatever its exact value, and both cannot pass at once;
        so each operand is requantized with ``saturate = top + the other's bound``. In int32 where
        ``|a| + |b|`` provably fits (the operands' bounds), else in int64.
        """
        top = max(-lo, hi)
        bound_a = rq.result_bound(a.bound, *rq.normalise(rq.as_ints(ra[0]), rq.as_ints(ra[1]), name + ".a"))
        if isinstance(b, Sym):
            if rb is None:
                raise ValueError(f"{name}: an integer operand needs its requantization ratio")
            bound_b = rq.result_bound(b.bound, *rq.normalise(rq.as_ints(rb[0]), rq.as_ints(rb[1]), name + ".b"))
            qb: Sym | None = self.requantize(b, *rb, lo, hi, False, name + ".b", saturate=top + bound_a)
            bi = None
        else:
            qb, bi = None, rq.as_ints(b)
            bound_b = int(np.abs(bi).max())
        qa = self.requantize(a, *ra, lo, hi, False, name + ".a", saturate=top + bound_b)
        self.em.scope = f"residual:{name}"
        em = self.em
        narrow = qa.bound + (qb.bound if qb is not None else bound_b) < 2**31
        elem, dt = (I32, np.int32) if narrow else (I64, np.int64)
        bn = self._cast(qb, elem) if qb is not None else self._const_int(name + ".const", bi, dt, "position_embedding")
        s = em.op("Add", [self._cast(qa, elem), bn])
        if narrow:
            y = em.op("Clip", [s, em.const(lo, dt), em.const(hi, dt)], out=name)
        else:
            y = em.op("Cast", [em.op("Clip", [s, em.const(lo), em.const(hi)])], out=name, to=I32)
        bits, signed = _width(lo, hi)
        return self._out(y, a.shape, "int32", lo, hi, kind="activation", bits=bits, signed=signed)

    def _operand(self, x: Sym | np.ndarray, first: bool) -> tuple[str, str] | None:
        """``x`` as a MatMulInteger operand: (uint8/int8 tensor, zero point or ""); None if wider than 8 bits.

        The first operand is uint8 (signed values shifted by 128, zero point 128). The second
        is int8 only where ``|x| <= 64``: on x86 CPUs without VNNI onnxruntime's uint8 x int8
        kernel sums pairs of products in int16, which saturates beyond that. Wider signed
        operands are shifted into uint8 too (the uint8 x uint8 kernel is exact everywhere).
        """
        em = self.em
        if isinstance(x, np.ndarray):  # weights, [K, N]
            if np.abs(x).max() <= 64:
                return em.const(x, np.int8, hint="weight"), ""
            return em.const(x + 128, np.uint8, hint="weight_u8"), em.const(np.uint8(128), np.uint8, hint="zp")
        if 0 <= x.lo and x.hi <= 255:
            return em.op("Cast", [x.name], to=TensorProto.UINT8), ""
        if not first and -64 <= x.lo and x.hi <= 64:
            return em.op("Cast", [x.name], to=TensorProto.INT8), ""
        if -128 <= x.lo and x.hi <= 127:  # uint8 = x + 128, zero point 128
            twin = self.u8_twin(x)  # made by the requantization (or the table) that produced x
            if twin is not None:
                return twin, em.const(np.uint8(128), np.uint8, hint="zp")
            shifted = em.op("Add", [self._cast(x, I32), em.const(128, np.int32)])
            return em.op("Cast", [shifted], to=TensorProto.UINT8), em.const(np.uint8(128), np.uint8, hint="zp")
        return None

    def u8_name(self, value: str) -> str | None:
        """The uint8 twin's name of a named value, if it has one."""
        return self._u8.get(value)

    def u8_twin(self, x: Sym) -> str | None:
        """The uint8 twin of an 8-bit activation (``x + 128``, zero point 128) where its requantization
        made one: ``MatMulInteger`` reads it, and ``x``'s own int32 nodes stay only where something
        else does (a debug export)."""
        return self.u8_name(x.name)

    def _matmul(self, a: Sym, b: Sym | np.ndarray, k: int, b_abs: int) -> tuple[str, int, str]:
        """Integer ``a @ b`` (``b`` an activation or an integer weight array [K, N]); (name, bound, dtype)."""
        em = self.em
        bound = k * a.bound * b_abs
        pa, pb = self._operand(a, True), self._operand(b, False)
        if pa is not None and pb is not None and bound < 2**31:
            ins = [pa[0], pb[0], pa[1], pb[1]]
            while ins[-1] == "":
                ins.pop()
            return em.op("MatMulInteger", ins), bound, "int32"
        dt, elem = ("int32", I32) if bound < 2**31 else ("int64", I64)
        bn = em.const(b, np.int32 if dt == "int32" else np.int64, hint="weight") if isinstance(b, np.ndarray) \
            else self._cast(b, elem)
        return em.op("MatMul", [self._cast(a, elem), bn]), bound, dt

    def linear(self, x: Sym, w: Tensor, b: Tensor | None, name: str, kind: str) -> Sym:
        """``x @ W^T + b`` into an INT32 accumulator (int64 only if the bound could pass 2**31)."""
        self.em.scope = f"gemm:{name}"
        wi = rq.as_ints(w)
        if wi.min() < -128 or wi.max() > 127:
            raise ValueError(f"{name}: weights are not 8-bit integers")
        wname = name.removesuffix(".acc") + ".weight"
        self.constants[wname] = {"role": "weight", "dtype": "int8", "min": int(wi.min()), "max": int(wi.max())}
        k = wi.shape[1]
        acc, bound, dt = self._matmul(x, np.ascontiguousarray(wi.T), k, int(np.abs(wi).max()))
        if b is not None:
            bi = rq.as_ints(b)
            bound += int(np.abs(bi).max())
            if dt == "int32" and bound >= 2**31:
                acc, dt = self._cast(acc, I64), "int64"
            bc = self._const_int(name.removesuffix(".acc") + ".bias", bi, np.int32 if dt == "int32" else np.int64,
                                 "bias")
            product = acc
            if dt == "int32":  # named: an INT8 requantization next may take the bias into its constant
                product = self.em.nodes[-1].output[0] = self.em.fresh(name.removesuffix(".acc") + ".product")
            acc = self.em.op("Add", [product, bc])
        acc = self.em.op("Identity", [acc], out=name)
        shape = (*x.shape[:-1], wi.shape[0])
        if b is not None and dt == "int32":
            self._biased[acc] = (product, bi, shape, bound - int(np.abs(bi).max()), kind)
        return self._out(acc, shape, dt, -bound, bound, kind="accumulator", bits=ACC_BITS, signed=True, matmul=kind)

    def matmul(self, a: Sym, b: Sym, name: str, kind: str) -> Sym:
        """Attention's ``q @ k^T`` / ``probs @ v`` between two activations."""
        self.em.scope = f"gemm:{name}"
        acc, bound, dt = self._matmul(a, b, a.shape[-1], b.bound)
        acc, shape = self.em.op("Identity", [acc], out=name), (*a.shape[:-1], b.shape[-1])
        return self._out(acc, shape, dt, -bound, bound, kind="accumulator", bits=ACC_BITS, signed=True, matmul=kind)

    # -- kernels --------------------------------------------------------------------------------
    def shiftmax(self, x: Sym, s: Tensor, n: int, out_bits: int, name: str, keep: Tensor | None = None) -> Sym:
        """Shiftmax (the masked one of docs/swin.md where ``keep`` is given) into UINT(out_bits)."""
        self.em.scope, em, s32 = f"shiftmax:{name}", self.em, s.detach().cpu().numpy()
        keep_np = None if keep is None else keep.detach().cpu().numpy().astype(bool)
        top = 2 ** (out_bits - 1)
        if -128 <= x.lo and x.hi <= 127:  # INT8 scores: max(q) - q takes 256 values, int_exp is a table
            x0 = kernels.x0_of(kernels.f32(s32))
            table = kernels.evaluate(lambda e, v: kernels.int_exp(e, v, x0, n), -np.arange(256, dtype=np.int64))
            wide = x.shape[-1] * int(table.max()) >= 2**31  # the row sum in int32 when it provably fits
            xi = self._cast(x, I32) if keep_np is None else kernels.masked_min(em, self._cast(x, I32), keep_np)
            idx = em.op("Sub", [em.reduce("ReduceMax", xi), xi])
            e = em.op("Gather", [em.const(table, np.int64 if wide else np.int32, hint="exp_table"), idx])
            e = kernels.kept(em, e, keep_np, np.int64 if wide else np.int32)
            c = em.const(INT32_MAX, np.int64 if wide else np.int32)
            total = em.op("Min", [em.reduce("ReduceSum", e), c])
            f = em.op("Div", [c, total])  # e <= total: e * f <= 2**31 - 1
            p = em.op("Div", [em.op("Mul", [e, f]), em.const(1 << (32 - out_bits), np.int64 if wide else np.int32)])
            p = em.op("Cast", [p], out=name, to=I32)
        else:
            p = kernels.shiftmax(em, self._cast(x, I64), s32, n, out_bits, name + ".i64", keep_np)
            p = em.op("Cast", [p], out=name, to=I32)
        return self._out(p, x.shape, "int32", 0, top, kind="activation", bits=out_bits, signed=False)

    def log2_probs(self, p: Sym, name: str) -> Sym:
        self.em.scope = f"shiftmax:{name}"
        y = kernels.log2_probs(self.em, self._cast(p, I64), name + ".i64")
        y = self.em.op("Cast", [y], out=name, to=I32)
        return self._out(y, p.shape, "int32", 0, 2**14, kind="activation", bits=15, signed=False)

    def shift_gelu(self, x: Sym, s: Tensor, n: int, sig_bits: int, name: str) -> Sym:
        self.em.scope = f"shiftgelu:{name}"
        em = self.em
        s32 = s.detach().cpu().numpy()
        # g <= 2**(sig_bits - 1) unless e1 alone passes 2**31 - 1 (then f = 1 and g = e1 >> (32 - sig_bits))
        e1_max = -kernels.x0_of(1.702 * kernels.f32(s32)) << n
        b = x.bound * max(2 ** (sig_bits - 1), e1_max >> (32 - sig_bits))
        if -128 <= x.lo and x.hi <= 127 and b < 2**31:  # INT8: q * g depends on (row max, q) alone, a table
            vals = np.arange(-128, 128, dtype=np.int64)
            mx, q = np.meshgrid(vals, vals, indexing="ij")  # rows [min(q, mx), mx]: the kernel's row max is mx
            pairs = np.stack([np.minimum(q, mx).reshape(-1), mx.reshape(-1)], axis=1)
            table = kernels.evaluate(lambda e, v: kernels.shift_gelu(e, v, s32, n, sig_bits, "g"), pairs)[:, 0]
            xi = self._cast(x, I32)
            base = em.op("Mul", [em.op("Add", [em.reduce("ReduceMax", xi), em.const(128, np.int32)]),
                                 em.const(256, np.int32)])
            idx = em.op("Add", [xi, em.op("Add", [base, em.const(128, np.int32)])])
            y = em.op("Gather", [em.const(table, np.int32, hint="gelu_table"), idx], out=name)
            self._tables[y] = (table, idx)  # the requantization after it folds into the table
            return self._out(y, x.shape, "int32", -b, b, kind="gelu", bits=ACC_BITS, signed=True)
        y = kernels.shift_gelu(em, self._cast(x, I64), s32, n, sig_bits, name)
        return self._out(y, x.shape, "int64", -b, b, kind="gelu", bits=ACC_BITS, signed=True)

    def layernorm(self, x: Sym, b: Tensor, name: str) -> Sym:
        self.em.scope = f"layernorm:{name}"
        bi = rq.as_ints(b)
        self.constants[name + ".bias"] = {"role": "layernorm_bias", "dtype": "int64", "min": int(bi.min()),
                                          "max": int(bi.max())}
        em = self.em
        df = kernels.layernorm_scaled(em, self._cast(x, I64), x.shape[-1])
        y = kernels.layernorm_output(em, df, bi, name)
        # |d| <= 2 * |q|, f <= INT32_MAX // 2**6 (k >= 2**6 after the first Newton step from 2**16)
        df_bound = (2 * x.bound + 1) * (INT32_MAX // 2**6)
        self._halved[y] = (df, bi, df_bound)  # an INT8 requantization next folds floor(df / 2) + b into it
        bound = df_bound // 2 + 1 + int(np.abs(bi).max())
        return self._out(y, x.shape, "int64", -bound, bound, kind="layernorm", bits=ACC_BITS, signed=True)

    def dequantize(self, x: Sym, s: Tensor) -> Sym:
        """Float32 accumulator times its float32 scale (per channel): the logits."""
        self.em.scope = "dequantize:logits"
        sc = self.em.const(s.detach().cpu().float().numpy(), np.float32, hint="out_scale")
        return Sym(self, self.em.op("Mul", [x.name, sc]), x.shape, "float32", 0, 0)

    def model(self, image: Sym, outputs: dict[str, Sym], extra: list[str] = (), doc: str = "",
              metadata: dict[str, str] | None = None) -> onnx.ModelProto:
        """The ONNX model: ``image`` in, ``outputs`` (name -> value) out, plus the named values in ``extra``
        (``ptq.intexec.assemble``)."""
        from ptq.intexec.assemble import assemble

        return assemble(self, image, outputs, list(extra), doc, metadata)
