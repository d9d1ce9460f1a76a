"""Lower a calibrated ``QuantViT`` (integer backend) to an integer :class:`~ptq.intexec.interp.Program`.

Every constant is derived exactly as the simulation derives it at run time, so the
program reproduces it bit for bit:

* weights: ``lin.quantized_weight()`` (nearest or AdaRound hard rounding), stored int8;
* biases: ``round(b / s_acc)`` in float64 with ``s_acc = s_x * s_w`` formed in float32
  (``QLinear.forward``), clamped to +-(2**31 - 1), stored int32;
* dyadic multipliers: ``requant.multiplier`` of the float32 scales, the
  same ``(m, e)`` that ``requant.requantize`` applies (per channel for accumulators and LN outputs; the
  1/sqrt(d) of the scores folded into their float32 scale as ``int_matmul`` does);
* class token + position embedding: ``round(const / s_res)`` in float64
  (``ActQuantizer.add`` with a float operand);
* I-LayerNorm's per-channel bias term and output scale, and the Shiftmax/ShiftGELU
  output scales: taken from the ``ivit`` kernels themselves (run on a zero input), so
  there is one definition of each.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ptq.intexec.interp import FORMAT, VERSION, Program
from ptq.quant import ivit, requant
from ptq.quant.nonlinear import Backend
from ptq.quant.quantizers import ActQuantizer
from ptq.quant.vit import INT32_MAX, QMLP, QAttention, QLinear, QuantViT

ACC_BITS = 32
#: the ``matmul`` label of each linear/matmul op (widths summary): q @ k^T is "scores", probs @ v "context"
MATMUL_KINDS = ("patch_embed", "qkv", "scores", "context", "attn_out", "fc1", "fc2", "head")


def _cpu(t: Tensor) -> Tensor:
    return t.detach().cpu()


def _json_scale(s: Tensor) -> float | list[float]:
    """A float32 scale as JSON (Python floats hold float32 values exactly)."""
    s = _cpu(s).to(torch.float32)
    return float(s) if s.numel() == 1 and s.dim() == 0 else s.tolist()


def _json_int(t: Tensor) -> int | list[int]:
    return int(t) if t.dim() == 0 else t.tolist()


def dyadic_of(s_in: Tensor, s_out: Tensor) -> tuple[Tensor, Tensor]:
    """``(m, e)`` of the ratio ``s_in / s_out``: the one ``requant.requantize`` applies."""
    return requant.multiplier(_cpu(s_in), _cpu(s_out))


def _storage(t: Tensor) -> Tensor:
    """Integers in int32 when they fit, else int64."""
    t = t.to(torch.int64)
    if t.numel() == 0 or (int(t.min()) >= -(2**31) and int(t.max()) < 2**31):
        return t.to(torch.int32)
    return t


class _Builder:
    """Accumulates ops, value declarations and constants in execution order."""

    def __init__(self) -> None:
        self.ops: list[dict[str, Any]] = []
        self.values: dict[str, dict[str, Any]] = {}
        self.constants: dict[str, dict[str, Any]] = {}
        self.tensors: dict[str, Tensor] = {}

    def const(self, name: str, t: Tensor, bits: int, signed: bool, role: str) -> str:
        self.tensors[name] = t.contiguous()
        self.constants[name] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                                "bits": bits, "signed": signed, "role": role}
        return name

    def op(self, kind: str, ins: list[str], out: str, *, bits: int | None, signed: bool = True,
           value_kind: str, vscale: Tensor | None = None, **params: Any) -> str:
        """Append one op; ``vscale`` is the real-value scale of its output (None: not defined)."""
        if out in self.values:
            raise ValueError(f"value {out!r} produced twice")
        self.ops.append({"op": kind, "in": ins, "out": out, "bits": bits, "signed": signed, **params})
        self.values[out] = {"bits": bits, "signed": signed, "kind": value_kind,
                            "scale": None if vscale is None else _json_scale(vscale)}
        return out

    def requant(self, x: str, s_in: Tensor, q: ActQuantizer, out: str, clamp: bool = True) -> str:
        m, e = dyadic_of(s_in, q.scale)
        return self.op("requantize", [x], out, bits=q.bits if clamp else ACC_BITS, signed=q.signed,
                       value_kind="activation" if clamp else "operand", vscale=q.scale,
                       m=_json_int(m), e=_json_int(e), clamp=clamp, clamp_bits=q.bits,
                       s_in=_json_scale(s_in), s_out=_json_scale(q.scale))

    def linear(self, lin: QLinear, x: str, s_x: Tensor, kind: str) -> tuple[str, Tensor]:
        """``x @ W^T + b`` into an INT32 accumulator at per-channel scale ``s_x * s_w``."""
        if lin.wq is None:
            raise ValueError(f"{lin.name}: weights are not quantized")
        w, s_w, integer = lin.quantized_weight()
        if not integer:
            raise ValueError(f"{lin.name}: weights are not integers (AdaRound still in soft mode?)")
        w, s_w = _cpu(w), _cpu(s_w)
        s_acc = _cpu(s_x) * s_w  # float32, as QLinear.forward forms x.s * s_w
        lo, hi = -(2 ** (lin.wq.bits - 1)), 2 ** (lin.wq.bits - 1) - 1
        if not bool((w == w.round()).all()) or int(w.min()) < lo or int(w.max()) > hi:
            raise ValueError(f"{lin.name}: weights are not INT{lin.wq.bits}")
        ins = [x, self.const(f"{lin.name}.weight", w.to(torch.int8), lin.wq.bits, True, "weight")]
        if lin.bias is not None:
            qb = torch.round(_cpu(lin.bias).double() / s_acc.double()).clamp(-INT32_MAX, INT32_MAX)
            ins.append(self.const(f"{lin.name}.bias", qb.to(torch.int32), ACC_BITS, True, "bias"))
        out = self.op("linear", ins, f"{lin.name}.acc", bits=ACC_BITS, value_kind="accumulator", vscale=s_acc,
                      matmul=kind)
        return out, s_acc

    def layernorm(self, ln: torch.nn.LayerNorm, x: str, q: ActQuantizer) -> str:
        """I-LayerNorm (folded integer bias) then requantization to ``q``'s width."""
        c = int(ln.normalized_shape[0])
        # the kernel on a zero row returns exactly its bias term b (and its output scale)
        b, s_ln = ivit.int_layernorm(torch.zeros(1, c, dtype=torch.int64), 1.0, _cpu(ln.weight), _cpu(ln.bias))
        bias = self.const(f"{q.name}.int.bias", _storage(b[0]), ACC_BITS, True, "layernorm_bias")
        y = self.op("layernorm", [x, bias], f"{q.name}.int", bits=ACC_BITS, value_kind="layernorm",
                    vscale=s_ln, channels=c)
        return self.requant(y, s_ln, q, q.name)

    def residual(self, x: str, s_x: Tensor, acc: str, s_acc: Tensor, q: ActQuantizer) -> str:
        """IdAdd: both operands requantized unclamped to ``q``'s scale, added, clamped once."""
        a = self.requant(x, s_x, q, f"{q.name}.a", clamp=False)
        b = self.requant(acc, s_acc, q, f"{q.name}.b", clamp=False)
        return self.op("add", [a, b], q.name, bits=q.bits, signed=q.signed, value_kind="activation", vscale=q.scale)


def _check(qmodel: QuantViT) -> None:
    """The program exists only for a fully integer model: say what is missing otherwise."""
    problems = []
    if not qmodel.settings.backend.integer:
        problems.append(f"backend is {qmodel.settings.backend.name!r}, not 'ivit'")
    for q in qmodel.act_quantizers():
        if not q.enabled or q.mode != "quant":
            problems.append(f"{q.name} is {'disabled' if not q.enabled else q.mode}")
        elif q.lsq:
            problems.append(f"{q.name} step size is still being learned")
    for lin in qmodel.linears():
        if lin.wq is None or not lin.wq.integer:
            problems.append(f"{lin.name} has no integer weight quantizer")
    if problems:
        raise ValueError("not an integer-only QuantViT: " + "; ".join(problems[:8]))


def _attention(bld: _Builder, a: QAttention, x: str, s_x: Tensor, prefix: str) -> tuple[str, Tensor]:
    be: Backend = a.backend
    h = bld.layernorm(a.ln, x, a.ln_q)
    acc, s_acc = bld.linear(a.qkv, h, a.ln_q.scale, "qkv")
    e = s_acc.numel() // 3
    d = e // a.heads
    heads = {}
    for i, (tag, q) in enumerate(zip("qkv", (a.q_q, a.k_q, a.v_q), strict=True)):
        part = bld.op("slice", [acc], f"{acc}.{tag}", bits=ACC_BITS, value_kind="accumulator",
                      vscale=s_acc[i * e:(i + 1) * e], start=i * e, stop=(i + 1) * e)
        z = bld.requant(part, s_acc[i * e:(i + 1) * e], q, q.name)
        heads[tag] = bld.op("split_heads", [z], f"{q.name}.heads", bits=q.bits, value_kind="activation",
                            vscale=q.scale, heads=a.heads)
    kt = bld.op("transpose", [heads["k"]], f"{a.k_q.name}.heads.t", bits=a.k_q.bits, value_kind="activation",
                vscale=a.k_q.scale, dim0=-2, dim1=-1)
    s_scores = _cpu(a.q_q.scale) * _cpu(a.k_q.scale) * (1.0 / math.sqrt(d))  # int_matmul's a.s * b.s * scale
    sc = bld.op("matmul", [heads["q"], kt], f"{prefix}.scores.acc", bits=ACC_BITS, value_kind="accumulator",
                vscale=s_scores, matmul="scores")
    sc = bld.requant(sc, s_scores, a.scores_q, a.scores_q.name)
    sm_bits = ivit.LOG2_IN_BITS if be.softmax_log2 else be.softmax_out_bits
    _, s_p = ivit.shiftmax(torch.zeros(1, 1, dtype=torch.int64), _cpu(a.scores_q.scale), be.softmax_n, sm_bits)
    p = bld.op("shiftmax", [sc], f"{a.probs_q.name}.int", bits=sm_bits, signed=False,
               value_kind="activation", vscale=s_p, scale=_json_scale(a.scores_q.scale), n=be.softmax_n,
               out_bits=sm_bits)  # the kernel's parameter is its input scale
    if be.softmax_log2:
        _, s_p = ivit.log2_probs(torch.zeros(1, dtype=torch.int64))
        p = bld.op("log2_probs", [p], f"{a.probs_q.name}.log2", bits=be.probs_bits, signed=False,
                   value_kind="activation", vscale=s_p)
    s_ctx = s_p.to(torch.float32) * _cpu(a.v_q.scale) * 1.0
    ctx = bld.op("matmul", [p, heads["v"]], f"{prefix}.ctx.acc", bits=ACC_BITS, value_kind="accumulator",
                 vscale=s_ctx, matmul="context")
    ctx = bld.op("merge_heads", [ctx], f"{prefix}.ctx.acc.merged", bits=ACC_BITS, value_kind="accumulator",
                 vscale=s_ctx)
    ctx = bld.requant(ctx, s_ctx, a.ctx_q, a.ctx_q.name)
    acc, s_acc = bld.linear(a.proj, ctx, a.ctx_q.scale, "attn_out")
    return bld.residual(x, s_x, acc, s_acc, a.res_q), _cpu(a.res_q.scale)


def _mlp(bld: _Builder, m: QMLP, x: str, s_x: Tensor) -> tuple[str, Tensor]:
    be: Backend = m.backend
    h = bld.layernorm(m.ln, x, m.ln_q)
    acc, s_acc = bld.linear(m.fc1, h, m.ln_q.scale, "fc1")
    f = bld.requant(acc, s_acc, m.fc1_q, m.fc1_q.name)
    _, s_g = ivit.shift_gelu(torch.zeros(1, 1, dtype=torch.int64), _cpu(m.fc1_q.scale), be.gelu_n, be.gelu_sig_bits)
    g = bld.op("shift_gelu", [f], f"{m.gelu_q.name}.int", bits=ACC_BITS, value_kind="gelu", vscale=s_g,
               scale=_json_scale(m.fc1_q.scale), n=be.gelu_n, sig_bits=be.gelu_sig_bits)  # kernel's input scale
    g = bld.requant(g, s_g.to(torch.float32), m.gelu_q, m.gelu_q.name)
    acc, s_acc = bld.linear(m.fc2, g, m.gelu_q.scale, "fc2")
    return bld.residual(x, s_x, acc, s_acc, m.res_q), _cpu(m.res_q.scale)


@torch.no_grad()
def build_program(qmodel: QuantViT, input_spec: dict[str, Any] | None = None,
                  meta: dict[str, Any] | None = None) -> Program:
    """The integer program of a calibrated, fully integer ``QuantViT`` (see module docstring).

    ``input_spec`` describes the float image the program expects (normalisation);
    ``meta`` is copied into the graph (e.g. the run's config row).
    """
    _check(qmodel)
    bld = _Builder()
    emb = qmodel.embed
    inq = emb.in_q
    x = bld.op("quantize", ["image"], inq.name, bits=inq.bits, signed=inq.signed, value_kind="activation",
               vscale=inq.scale, scale=_json_scale(inq.scale))
    x = bld.op("patchify", [x], "embed.patches", bits=inq.bits, signed=inq.signed, value_kind="activation",
               vscale=inq.scale, patch=emb.patch)
    acc, s_acc = bld.linear(emb.proj, x, inq.scale, "patch_embed")
    acc = bld.op("pad_tokens", [acc], f"{acc}.padded", bits=ACC_BITS, value_kind="accumulator", vscale=s_acc,
                 before=1)
    rq = emb.res_q
    qc = torch.round(_cpu(emb.const).float().double() / _cpu(rq.scale).double())  # ActQuantizer.add, float operand
    const = bld.const("embed.const", _storage(qc), ACC_BITS, True, "position_embedding")
    a = bld.requant(acc, s_acc, rq, f"{rq.name}.a", clamp=False)
    x = bld.op("add", [a, const], rq.name, bits=rq.bits, signed=rq.signed, value_kind="activation", vscale=rq.scale)
    s_x = _cpu(rq.scale)
    for i, blk in enumerate(qmodel.blocks):
        x, s_x = _attention(bld, blk.attn, x, s_x, f"blocks.{i}.attn")
        x, s_x = _mlp(bld, blk.mlp, x, s_x)
    head = qmodel.head
    x = bld.op("take_token", [x], "head.cls", bits=qmodel.settings.idadd_bits, value_kind="activation",
               vscale=s_x, index=0)
    h = bld.layernorm(head.ln, x, head.ln_q)
    acc, s_acc = bld.linear(head.fc, h, head.ln_q.scale, "head")
    bld.op("dequantize", [acc], "logits", bits=None, value_kind="float", scale=_json_scale(s_acc))

    tokens = emb.const.shape[1]
    grid = math.isqrt(tokens - 1)
    st = qmodel.settings
    be = st.backend
    graph = {
        "format": FORMAT,
        "version": VERSION,
        "description": "integer-only ViT: every value between 'quantize' and 'dequantize' is an integer; "
                       "real value = integer * scale",
        "model": {"image_size": grid * emb.patch, "patch_size": emb.patch, "tokens": tokens,
                  "hidden_dim": int(emb.const.shape[2]), "layers": len(qmodel.blocks),
                  "heads": qmodel.blocks[0].attn.heads if len(qmodel.blocks) else None,
                  "num_classes": int(head.fc.weight.shape[0])},
        "settings": {"wbits": st.wbits, "abits": st.abits, "idadd_bits": st.idadd_bits,
                     "accumulator_bits": ACC_BITS, "softmax": {"n": be.softmax_n, "out_bits": be.softmax_out_bits,
                                                                "log2": be.softmax_log2},
                     "gelu": {"n": be.gelu_n, "sig_bits": be.gelu_sig_bits}},
        "input": {"name": "image", "dtype": "float32", "shape": [3, grid * emb.patch, grid * emb.patch],
                  **(input_spec or {})},
        "output": {"name": "logits", "accumulator": acc, "dtype": "float32"},
        "semantics": {
            "quantize": "clamp(round_half_even(float32(x) / scale), range(bits, signed))",
            "linear": "x @ weight^T + bias (int64; declared INT32 accumulator)",
            "requantize": "round_half_even(x * m / 2**e), clamped to range(out_bits, signed) when clamp "
                          "(spec integer-ops.md 'requantize'; m, e per channel when lists)",
            "add": "clamp(a + b, range(bits, signed))",
            "layernorm": "ivit.int_layernorm steps 1-5 + integer bias (step 6 folded)",
            "shiftmax": "ivit.shiftmax(x, scale, n, out_bits)",
            "log2_probs": "ivit.log2_probs(x): 2**(round(log2 x) - 1), 0 below 2 (x: 16-bit Shiftmax)",
            "shift_gelu": "ivit.shift_gelu(x, scale, n, sig_bits)",
            "dequantize": "float32(x) * scale",
        },
        "meta": meta or {},
        "constants": bld.constants,
        "values": bld.values,
        "ops": bld.ops,
    }
    return Program(graph, bld.tensors)
