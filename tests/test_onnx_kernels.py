"""The integer kernels spelled in ONNX (ptq.intexec.kernels / graph) against ptq's kernels, on edge inputs.

Each kernel's subgraph runs alone in onnxruntime; its integers must equal ``ptq.quant.ivit`` /
``ptq.quant.requant`` exactly: all-equal rows, the ends of the integer ranges, zero-variance
LayerNorm rows, negative values through every shift and division.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto

from ptq.intexec import kernels
from ptq.intexec.graph import OnnxGraph
from ptq.quant import ivit, requant
from ptq.quant.symbolic import Sym

_run = kernels.evaluate  # one kernel subgraph alone, checked and run in onnxruntime


def _rows(lo: int, hi: int, width: int, seed: int = 0) -> np.ndarray:
    """Edge rows: all equal (lo, hi, 0, -1), the two extremes, alternating signs, then random rows."""
    rng = np.random.default_rng(seed)
    rows = [np.full(width, v) for v in (lo, hi, 0, -1, 1)]
    rows += [np.array([lo, hi] * (width // 2) + [lo] * (width % 2)), np.full(width, lo // 2), np.full(width, hi // 3)]
    rows += [np.concatenate([[hi], np.full(width - 1, lo)]), np.concatenate([[lo], np.full(width - 1, hi)])]
    rows += list(rng.integers(lo, hi + 1, size=(24, width)))
    rows += list(rng.integers(lo, 0, size=(8, width)))  # all negative
    return np.stack(rows).astype(np.int64)


@pytest.mark.parametrize("s", [0.003, 0.05, 0.37, 2.5])
@pytest.mark.parametrize("n,out_bits", [(15, 8), (15, 16), (7, 4)])
def test_shiftmax_matches_the_ptq_kernel(s: float, n: int, out_bits: int) -> None:
    x = _rows(-128, 127, 37)
    got = _run(lambda em, v: kernels.shiftmax(em, v, np.float32(s), n, out_bits, "p"), x)
    want, _ = ivit.shiftmax(torch.from_numpy(x), s, n, out_bits)
    np.testing.assert_array_equal(got, want.numpy())


@pytest.mark.parametrize("s", [0.004, 0.06, 0.9])
@pytest.mark.parametrize("lo,hi", [(-128, 127), (-8, 7), (-32768, 32767)])
def test_shift_gelu_matches_the_ptq_kernel(s: float, lo: int, hi: int) -> None:
    x = _rows(lo, hi, 33, seed=1)
    got = _run(lambda em, v: kernels.shift_gelu(em, v, np.float32(s), 23, 8, "g"), x)
    want, _ = ivit.shift_gelu(torch.from_numpy(x), s, 23, 8)
    np.testing.assert_array_equal(got, want.numpy())


def test_int_exp_matches_on_every_input_down_to_the_clip() -> None:
    for s, n in ((0.05, 15), (0.3, 23), (0.0071, 15)):
        x0 = kernels.x0_of(float(np.float32(s)))
        a = -np.arange(0, -n * x0 + 40, dtype=np.int64)
        got = _run(lambda em, v, x0=x0, n=n: kernels.int_exp(em, v, x0, n), a)
        np.testing.assert_array_equal(got, ivit.int_exp(torch.from_numpy(a), s, n).numpy())


@pytest.mark.parametrize("c", [4, 37, 768])
def test_layernorm_matches_the_ptq_kernel_including_zero_variance_rows(c: int) -> None:
    x = _rows(-32768, 32767, c, seed=2)
    gen = torch.Generator().manual_seed(c)
    gamma = torch.rand(c, generator=gen) * 2 - 0.5
    gamma[0] = 0.0  # a zero-gamma channel
    beta = torch.randn(c, generator=gen)
    b, _ = ivit.layernorm_bias(gamma, beta, c)
    got = _run(lambda em, v: kernels.layernorm(em, v, c, b.numpy(), "y"), x)
    want, _ = ivit.int_layernorm(torch.from_numpy(x), 1.0, gamma, beta)
    np.testing.assert_array_equal(got, want.numpy())


@pytest.mark.parametrize("gammas", ["typical", "near_zero"])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("c", [37, 768])
def test_layernorm_halving_and_bias_fold_into_the_int8_requantization(c: int, per_channel: bool, gammas: str) -> None:
    """I-LayerNorm then its INT8 requantization, folded (``floor(d*f/2) + b`` never formed): the value
    and its uint8 twin against ``ivit.int_layernorm`` + ``requant.apply_dyadic``. Gammas around 1 with a
    negative and a zero one take the fold; gammas near zero (huge biases) may not, and stay exact."""
    x = _rows(-32768, 32767, c, seed=3)
    gen = torch.Generator().manual_seed(c + 1)
    gamma = torch.rand(c, generator=gen) * (2 if gammas == "near_zero" else 1) - 0.5
    gamma[1:] += 1.0 if gammas == "typical" else 0.0
    gamma[0], gamma[2] = 0.0 if per_channel else 0.3, -0.7  # per tensor, a zero gamma's bias would always saturate
    beta = torch.randn(c, generator=gen)
    b, s_ln = ivit.layernorm_bias(gamma, beta, c)
    s_out = torch.tensor(0.02)
    m, e = requant.multiplier(s_ln if per_channel else s_ln.abs().max(), s_out)
    y, _ = ivit.int_layernorm(torch.from_numpy(x), 1.0, gamma, beta)
    want = requant.apply_dyadic(y, m, e, -128, 127, True).numpy()
    g = OnnxGraph()
    deps: list[str] = []

    def build(em: kernels.Emitter, v: str, twin: bool) -> str:
        g.em = em
        ln = g.layernorm(Sym(g, em.op("Cast", [v], to=TensorProto.INT32), x.shape, "int32", -32768, 32767), b, "ln")
        q = g.requantize(ln, m, e, -128, 127, True, "q")
        out = g.u8_twin(q) if twin else q.name
        deps.extend(_inputs_of(em.nodes, out, names=True))
        return em.op("Cast", [out], to=TensorProto.INT64)

    np.testing.assert_array_equal(_run(lambda em, v: build(em, v, False), x), want)
    assert ("ln" not in deps) == (gammas == "typical")  # the value does not read the LayerNorm's output
    if gammas == "typical":
        np.testing.assert_array_equal(_run(lambda em, v: build(em, v, True), x), want + 128)
        assert "ln" not in deps


def test_log2_probs_matches_on_every_shiftmax_value() -> None:
    p = np.arange(0, 2**15 + 1, dtype=np.int64)
    got = _run(lambda em, v: kernels.log2_probs(em, v, "l"), p)
    np.testing.assert_array_equal(got, ivit.log2_probs(torch.from_numpy(p))[0].numpy())


@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("clamp", [True, False])
def test_requantize_matches_the_dyadic_requantizer(wide: bool, clamp: bool) -> None:
    """Per-tensor and per-channel ratios (one negative), ties, and inputs past 2**31 (the two-limb path)."""
    rng = np.random.default_rng(3)
    top = 2**40 if wide else 2**31 - 1
    c = 6
    q = np.concatenate([rng.integers(-top, top, size=(40, c)), np.full((1, c), -top), np.full((1, c), top),
                        np.arange(-12, 12).reshape(-1, c) * 2**20]).astype(np.int64)
    s_in = torch.tensor([2.0**-40, 3e-12, 1e-9, 7.7e-10, -2e-11, 2.0**-33]) if wide else \
        torch.tensor([0.01, 0.5, 2.0**-3, 3e-3, -0.02, 1.0 / 3])
    s_out = torch.tensor(0.04)
    lo, hi = -32768, 32767
    for s in (s_in, s_in[:1]):
        g = OnnxGraph()
        m, e = requant.multiplier(s, s_out)
        want = requant.apply_dyadic(torch.from_numpy(q), m, e, lo, hi, clamp)

        def build(em: kernels.Emitter, v: str, g: OnnxGraph = g, m: torch.Tensor = m, e: torch.Tensor = e) -> str:
            g.em = em
            y = g.requantize(Sym(g, v, (1, c), "int64", -top, top), m, e, lo, hi, clamp, "r")
            return em.op("Cast", [y.name], to=TensorProto.INT64)

        np.testing.assert_array_equal(_run(build, q), want.numpy())


def _inputs_of(nodes: list, out: str, names: bool = False) -> list[str]:
    """Op types (or output names) of the nodes ``out`` depends on."""
    want, ops = {out}, []
    for node in reversed(nodes):
        if any(o in want for o in node.output):
            ops.extend(node.output if names else [node.op_type])
            want.update(node.input)
    return ops


@pytest.mark.parametrize("case", ["acc_int8", "acc_int16", "acc_operand", "wide_int8", "ties"])
def test_requantize_short_spelling_is_exact_and_chosen_where_it_applies(case: str) -> None:
    """The offset spelling (no tie possible, numerator below 2**64) against ``requant.apply_dyadic``.

    Inputs: both ends of the declared range, around each channel's saturation point and its
    rounding thresholds, and random values; a power-of-two ratio (ties possible) must take the
    general spelling and stay exact.
    """
    rng = np.random.default_rng(7)
    c = 8
    wide = case == "wide_int8"
    top = 2**40 if wide else 2**31 - 1
    lo, hi = (-32768, 32767) if case == "acc_int16" else (-128, 127)
    clamp = case != "acc_operand"
    if case == "ties":
        s_in = torch.tensor([2.0**-12, 2.0**-9] * (c // 2))
    else:
        s_in = torch.from_numpy(np.exp2(-rng.uniform(22 if wide else 8, 26 if wide else 20, size=c))).float()
    s_out = torch.tensor(2.0**-4 if case == "ties" else 0.05)  # ties: ratios 2**-8 and 2**-5
    m, e = requant.multiplier(s_in, s_out)
    r = (m.double() / torch.exp2(e.double())).numpy()
    thresholds = np.round(np.outer(np.arange(-130, 131) + 0.5, 1 / r)).astype(np.int64)  # q near x.5 outputs
    q = np.concatenate([np.full((1, c), -top), np.full((1, c), top), np.zeros((1, c), np.int64),
                        thresholds, thresholds + 1, thresholds - 1, rng.integers(-top, top, size=(64, c)),
                        rng.integers(-2**20, 2**20, size=(64, c))]).clip(-top, top).astype(np.int64)
    want = requant.apply_dyadic(torch.from_numpy(q), m, e, lo, hi, clamp)
    g = OnnxGraph()
    ops: list[str] = []
    twin = case in ("acc_int8", "wide_int8")  # clamped to INT8 on the short spelling: a uint8 twin too

    def build(em: kernels.Emitter, v: str, want_twin: bool = False) -> str:
        g.em = em
        y = g.requantize(Sym(g, v, (1, c), "int64" if wide else "int32", -top, top), m, e, lo, hi, clamp, "r")
        assert (g.u8_twin(y) is not None) == twin
        out = g.u8_twin(y) if want_twin else y.name
        ops.extend(_inputs_of(em.nodes, out))
        return em.op("Cast", [out], to=TensorProto.INT64)

    def build32(em: kernels.Emitter, v: str, want_twin: bool = False) -> str:  # the model hands int32 values
        return build(em, v if wide else em.op("Cast", [v], to=TensorProto.INT32), want_twin)

    np.testing.assert_array_equal(_run(build32, q), want.numpy())
    short = "BitwiseAnd" not in ops  # the general spellings test the floor's parity with BitwiseAnd
    assert short == (case != "ties"), ops
    if clamp and case != "ties":
        assert ops.count("Clip") == 2 and ops.count("Cast") <= 3  # the saturation clip, the output clamp
    if twin:  # value + 128 as uint8, from the same floor: a uint64 Clip and the Cast
        ops.clear()
        np.testing.assert_array_equal(_run(lambda em, v: build32(em, v, True), q), want.numpy() + 128)
        assert ops.count("Clip") == 2 and "Sub" not in ops, ops


@pytest.mark.parametrize("const", [False, True])
def test_residual_add_saturates_each_operand_against_the_other(const: bool) -> None:
    """IdAdd: ``clamp(requant(a) + requant(b))`` with an INT16 residual and a wide accumulator whose
    per-channel ratios have many trailing zero bits (ties possible over its full range, none within
    the range that can still matter), on both operands' extremes and opposite signs."""
    rng = np.random.default_rng(11)
    c, rows = 8, 64
    lo, hi = -32768, 32767
    top_b = 3072 * 128 * 127  # an fc2 accumulator's bound
    sd = torch.tensor(2.0**-6)
    s_a = torch.tensor(0.011)
    odd = torch.tensor([1235.0, 77.0, 4097.0, 3.0, 999.0, 12345.0, 1.0, 65537.0])
    s_b = (2.0**18 + odd) * 2.0**-29  # ratios (2**18 + odd) / 2**23: m with 12 trailing zero bits
    qa = np.concatenate([np.full((4, c), lo), np.full((4, c), hi), rng.integers(lo, hi + 1, size=(rows - 8, c))])
    qb = np.concatenate([np.full((2, c), top_b), np.full((2, c), -top_b), np.full((2, c), top_b),
                         np.full((2, c), -top_b), rng.integers(-2**16, 2**16, size=(rows - 8, c))])
    qb[8:12] = np.array([[3], [-3], [5], [-5]]) * 2**23  # exact ties of b, where the sum saturates anyway
    qb[12:16] = rng.integers(-2**22, 2**22, size=(4, c))  # around the clip point, |q| ~ 2**21
    ma, ea = requant.multiplier(s_a, sd)
    mb, eb = requant.multiplier(s_b, sd)
    fold = torch.from_numpy(rng.integers(-5000, 5000, size=c))
    want_a = requant.apply_dyadic(torch.from_numpy(qa), ma, ea, lo, hi, False)
    want_b = fold.expand(rows, c) if const else requant.apply_dyadic(torch.from_numpy(qb), mb, eb, lo, hi, False)
    want = (want_a + want_b).clamp(lo, hi)
    g = OnnxGraph()
    ops: list[str] = []

    def build(em: kernels.Emitter, v: str) -> str:
        g.em = em
        part = [em.op("Cast", [em.op("Gather", [v, em.const(i)], axis=0)], to=TensorProto.INT32) for i in (0, 1)]
        a = Sym(g, part[0], (1, c), "int32", lo, hi)
        b = fold if const else Sym(g, part[1], (1, c), "int32", -top_b, top_b)
        y = g.add(a, (ma, ea), b, None if const else (mb, eb), lo, hi, "res")
        ops.extend(n.op_type for n in em.nodes)
        y3 = em.op("Unsqueeze", [y.name, em.const([0])])
        return em.op("Cast", [em.op("Concat", [y3, y3], axis=0)], to=TensorProto.INT64)  # the input's shape

    np.testing.assert_array_equal(_run(build, np.stack([qa, qb]).astype(np.int64))[0], want.numpy())
    assert "BitwiseAnd" not in ops, ops  # both operands took the short spelling
    alone = OnnxGraph()  # b requantized without its partner's bound: a tie is possible, the general spelling
    alone.em.fresh("b")
    alone.requantize(Sym(alone, "b", (1, c), "int32", -top_b, top_b), mb, eb, lo, hi, False, "b")
    assert "BitwiseAnd" in [n.op_type for n in alone.em.nodes]
