"""The Softmax-output and GELU-output quantizer choices (aquant.probs, aquant.gelu_out; docs/act-quantizers.md).

Each choice's codes against its definition on edge inputs, the ONNX spelling against the
simulation's, every choice through a quantized ViT exported bit-exact, and the CLI end to end.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import small_vit
from ptq.config import ConfigError, validate
from ptq.intexec import kernels
from ptq.intexec.build import build_onnx
from ptq.intexec.graph import OnnxGraph
from ptq.intexec.simcheck import capture
from ptq.intexec.verify import verify_program
from ptq.naming import nonlinear_labels, row_name
from ptq.quant import actcodes, requant
from ptq.quant.nonlinear import Backend
from ptq.quant.symbolic import Sym
from ptq.quant.vit import QuantSettings, QuantViT

P_EDGES = [0, 1, 2, 215, 216, 2**14, 23170, 23171, 2**15 - 1, 2**15]


def _logsqrt2_reference(p: int) -> int:
    """Python floats and ints only: the code c = 30 - round(2 log2 p), and its value M[c % 2] * 2**(7 - c // 2)."""
    if p < 1:
        return 0
    c = 30 - round(2 * math.log2(p))  # 2 log2 p is never within 1e-6 of a half for p <= 2**15
    if c > 14:
        return 0
    return (256 if c % 2 == 0 else 181) * 2 ** (7 - c // 2)


def test_logsqrt2_codes_match_the_definition_on_every_probability() -> None:
    p = torch.arange(0, 2**15 + 1)
    v, s = actcodes.logsqrt2_probs(p)
    assert v.dtype == torch.int64 and float(s) == 2.0**-15
    assert v.tolist() == [_logsqrt2_reference(int(x)) for x in p]
    edge = dict(zip(P_EDGES, actcodes.logsqrt2_probs(torch.tensor(P_EDGES))[0].tolist(), strict=True))
    assert edge[0] == edge[1] == edge[215] == 0 and edge[216] == 256  # 2**7.75 ~ 215.3: the smallest code 14
    assert edge[2**15] == 2**15 and edge[23170] == 181 << 7 and edge[2**14] == 256 << 6  # 1, 2**-1/2, 2**-1
    # every nonzero value is 2**(-c/2) to within 1.1e-4, and the nearest such power to p in the log domain
    live = v > 0
    lg = torch.log2(v[live].double() / 2**15) * 2
    assert bool(((2 ** ((lg - lg.round()) / 2) - 1).abs() < 1.1e-4).all())
    assert bool(((lg.round() - 2 * torch.log2(p[live].double() / 2**15)).abs() <= 0.5).all())
    with pytest.raises(ValueError, match="probability integers"):
        actcodes.logsqrt2_probs(torch.tensor([2**15 + 1]))


def test_logsqrt2_onnx_kernel_matches_on_every_probability() -> None:
    p = np.arange(0, 2**15 + 1, dtype=np.int64).reshape(1, -1)
    got = kernels.evaluate(lambda em, x: kernels.logsqrt2_probs(em, x, "l"), p)
    np.testing.assert_array_equal(got, actcodes.logsqrt2_probs(torch.from_numpy(p))[0].numpy())


def test_prob_ints_rounds_float_probabilities() -> None:
    p = torch.tensor([0.0, 1.0, 0.5, 2.0**-16, 3 * 2.0**-16, 1.5, -0.1])
    assert actcodes.prob_ints(p).tolist() == [0, 2**15, 2**14, 0, 2, 2**15, 0]  # half to even, clamped


@pytest.mark.parametrize("signed", [False, True])
def test_twin_codes_match_the_definition_on_edges(signed: bool) -> None:
    bits, k, s = 4, 3, torch.tensor(0.25)
    lo1, hi1, top = actcodes.twin_ranges(bits, signed)
    assert (lo1, hi1, top) == ((-4, 3, 8) if signed else (0, 7, 8))
    # x / s: 0, the fine top, the tie just past it (rounds half to even onto hi1 + 1: coarse), the coarse
    # codes' ends and ties, past the coarse top, below the fine range
    xs = torch.tensor([0.0, hi1, hi1 + 0.5, hi1 + 0.49, 8.0, 11.99, 12.0, 20.0, 64.0, 100.0, -1.0, -4.0, -9.0])
    want = []
    for t in xs.tolist():
        f = max(lo1, min(hi1 + 1, round(t)))  # Python's round is half to even, as the spec's
        c = max(1, min(top, round(t / 2**k)))
        want.append(c * 2**k if f > hi1 else f)
    got = actcodes.twin_float(xs * s, s, k, bits, signed)
    assert got.tolist() == want
    # integer inputs at a finer scale: the dyadic requantizer's codes are the float ones (no ties here)
    q = torch.arange(-40, 700)
    s_in = torch.tensor(0.25 / 7)
    ints = actcodes.twin_int(q, s_in, s, k, bits, signed)
    floats = actcodes.twin_float(q.double() * float(s_in), s.double(), k, bits, signed)
    assert ints.tolist() == floats.long().tolist()
    assert int(ints.max()) == top << k and int(ints.min()) == lo1
    assert actcodes.twin_bits(bits, k, signed) >= (top << k).bit_length() + int(signed)


def test_twin_onnx_ops_match_the_simulation() -> None:
    q = np.arange(-3000, 3000, 7, dtype=np.int64).reshape(1, -1)
    s_in, s, k = torch.tensor(0.0123), torch.tensor(0.17), 4
    for signed in (False, True):
        lo1, hi1, top = actcodes.twin_ranges(4, signed)

        def spell(em: kernels.Emitter, v: str, lo1: int = lo1, hi1: int = hi1, top: int = top) -> str:
            g = OnnxGraph()
            g.em = em
            x = Sym(g, v, q.shape, "int64", int(q.min()), int(q.max()))
            rf, rc = requant.multiplier(s_in, s), requant.multiplier(s_in, actcodes.coarse_scale(s, k))
            return g.twin(x, rf, rc, k, lo1, hi1, top, "t").name

        got = kernels.evaluate(spell, q)
        want = actcodes.twin_int(torch.from_numpy(q), s_in, s, k, 4, signed)
        np.testing.assert_array_equal(got, want.numpy())


def test_twin_search_picks_the_least_error() -> None:
    x = torch.cat([torch.rand(5000) * 0.05, torch.rand(50) * 0.9])  # most mass near 0, a long tail
    hist = torch.histc(x, bins=2048, min=0, max=float(x.max())).double()
    s, k = actcodes.twin_search(hist, x.max(), 4, False, grid=50)
    err = float(((actcodes.twin_float(x, s, k, 4, False) * s - x) ** 2).mean())
    uniform = float(((torch.clamp(torch.round(x / (x.max() / 15)), 0, 15) * (x.max() / 15) - x) ** 2).mean())
    assert k in actcodes.TWIN_SHIFTS and err < uniform / 2


def _calibrated(st: QuantSettings, images: torch.Tensor) -> QuantViT:
    q = QuantViT(small_vit(layers=2), st)
    with torch.no_grad():
        for mode in ("observe", "histogram"):
            q.set_mode(mode)
            q(images)
    q.freeze()
    return q


@pytest.mark.parametrize("probs,gelu_out", [("logsqrt2", "uniform"), ("twin", "twin"), ("log2", "twin")])
def test_every_choice_exports_bit_exact(probs: str, gelu_out: str) -> None:
    images = torch.randn(24, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    st = QuantSettings(wbits=4, abits=4, act_method="mse", kernel_in_bits=8, gelu_out=gelu_out,
                       backend=Backend("ivit", probs=probs))
    q = _calibrated(st, images)
    res = verify_program(q, *build_onnx(q), images, batch_size=12)
    assert (res["exact"], res["mismatches"]) == (True, 0)
    # fp: the same codes of the float softmax / GELU; the probabilities sum to about 1 either way
    fp = _calibrated(QuantSettings(wbits=4, abits=4, act_method="mse", gelu_out=gelu_out,
                                   backend=Backend("fp", probs=probs)), images)
    cap = capture(fp, images)
    got = cap["blocks.0.attn.probs_q" if probs == "twin" else "blocks.0.attn.probs_q.int"].long()
    if probs == "logsqrt2":
        allowed = set(actcodes.logsqrt2_probs(torch.arange(2**15 + 1))[0].tolist())
    elif probs == "log2":
        allowed = {0} | {2**j for j in range(15)}
    else:
        allowed = set(range(8)) | {c << int(fp.blocks[0].attn.probs_q.shift) for c in range(1, 9)}
    assert set(got.unique().tolist()) <= allowed


@pytest.mark.parametrize("kernel_bits", [4, 8])
def test_softmax_input_twin_codes_reach_shiftmax_and_export(kernel_bits: int) -> None:
    """``aquant.scores=twin``: Shiftmax reads the twin integer form (fine codes, coarse codes shifted by k),
    and the program stays bit-exact."""
    images = torch.randn(24, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    st = QuantSettings(wbits=4, abits=4, act_method="mse", kernel_in_bits=kernel_bits, scores="twin",
                       backend=Backend("ivit"))
    q = _calibrated(st, images)
    sq = q.blocks[0].attn.scores_q
    assert sq.codes == "twin" and int(sq.shift) in actcodes.TWIN_SHIFTS
    lo1, hi1, top = actcodes.twin_ranges(kernel_bits, True)
    k = int(sq.shift)
    allowed = set(range(lo1, hi1 + 1)) | {c << k for c in range(1, top + 1)}
    got = set(capture(q, images)["blocks.0.attn.scores_q"].long().unique().tolist())
    assert got <= allowed and any(abs(v) > hi1 for v in got)  # some scores take the coarse range
    res = verify_program(q, *build_onnx(q), images, batch_size=12)
    assert (res["exact"], res["mismatches"]) == (True, 0)


def test_rows_names_and_bad_combinations(compose_cfg, run_cli) -> None:
    row = {"wquant": "absmax", "wbits": 4, "aquant": "mse", "abits": 4, "nonlinear": "ivit", "probs": "logsqrt2",
           "gelu_out": "twin", "softmax": {"n": 15, "out_bits": 8}}
    assert row_name(row) == "W4A4-absmax-mse-logsqrt2-gtwin-ivit"
    assert row_name({**row, "probs": "twin"}).endswith("-ptwin-gtwin-ivit")
    assert nonlinear_labels(row)["SoftMax"] == "I[logsqrt2,n15]"
    assert nonlinear_labels(row)["GELU"] == "I[twin,n23]"
    assert nonlinear_labels({**row, "gelu_out": None, "gelu": {"n": 20, "sig_bits": 6}})["GELU"] == "I[b6,n20]"
    # every kernel width off its default is in the name, so two such rows never share one
    uniform = {**row, "probs": None, "gelu_out": None}
    widths = {**uniform, "softmax": {"n": 12, "out_bits": 4}, "gelu": {"n": 20, "sig_bits": 6}, "idadd_bits": 12}
    assert row_name(uniform) == "W4A4-absmax-mse-ivit"
    assert row_name(widths) == "W4A4-absmax-mse-sm4-smn12-gb6-gn20-id12-ivit"
    assert row_name({**widths, "probs": "logsqrt2"}) == "W4A4-absmax-mse-logsqrt2-smn12-gb6-gn20-id12-ivit"
    assert row_name({**widths, "nonlinear": "fp"}) == "W4A4-absmax-mse-fp"
    with pytest.raises(ConfigError, match="aquant.probs"):
        validate(compose_cfg("aquant.probs=sqrt"))
    with pytest.raises(ConfigError, match="conflicts with nonlinear.softmax.log2"):
        validate(compose_cfg("nonlinear=ivit", "nonlinear.softmax.log2=true", "aquant.probs=twin"))
    with pytest.raises(ConfigError, match="export_qdq=true has no QDQ ops for aquant.gelu_out=twin"):
        validate(compose_cfg("export_qdq=true", "aquant.gelu_out=twin"))
    with pytest.raises(ConfigError, match="no QDQ ops for aquant.scores=twin; .*aquant.scores=uniform"):
        validate(compose_cfg("export_qdq=true", "aquant.scores=twin"))
    with pytest.raises(ConfigError, match="aquant.scores"):
        validate(compose_cfg("aquant.scores=log2"))
    proc = run_cli("nonlinear=ivit", "nonlinear.softmax.log2=true", "aquant.probs=logsqrt2", timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "aquant.probs=logsqrt2" in lines[0]


@pytest.mark.parametrize("args,name", [
    (("wquant=adaround", "granularity=block", "aquant.probs=twin", "aquant.gelu_out=twin"),
     "W4A4-adaround-block-lsq-mse-k8-ptwin-gtwin-ivit"),
    (("aquant.probs=logsqrt2",), "W4A4-absmax-mse-k8-logsqrt2-ivit"),
    (("aquant.scores=twin", "aquant.gelu_out=twin"), "W4A4-absmax-mse-k8-gtwin-stwin-ivit"),
    (("aquant.image_bits=8", "aquant.gelu_out=twin"), "W4A4-absmax-mse-k8-img8-gtwin-ivit"),
])
def test_cli_runs_export_bit_exact(run_cli, tmp_path: Path, args: tuple[str, ...], name: str) -> None:
    proc = run_cli("debug=quick", "data.eval_images=64", "wbits=4", "abits=4", "aquant=mse", "aquant.kernel_in_bits=8",
                   "nonlinear=ivit", "export=true", "nonlinear.audit=true", *args, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["name"] == name
    assert m["intexec"]["mismatches"] == 0 and m["intexec"]["n"] == 64


def test_swin_masked_windows_export_bit_exact_with_the_new_codes() -> None:
    """Swin's masked Softmax (QAttention with ``keep``): masked entries stay exactly 0 through every code."""
    from timm.models.swin_transformer import SwinTransformer

    from ptq.quant.models import quantize_model

    torch.manual_seed(0)
    arch = {"img_size": 16, "patch_size": 2, "embed_dim": 16, "depths": (2,), "num_heads": (2,), "window_size": 4,
            "mlp_ratio": 2.0, "num_classes": 10, "drop_path_rate": 0.0}
    model = SwinTransformer(**arch).eval()
    images = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    for probs in ("logsqrt2", "twin"):
        st = QuantSettings(wbits=4, abits=4, act_method="mse", kernel_in_bits=8 if probs == "twin" else 4,
                           gelu_out="twin", scores="uniform" if probs == "twin" else "twin",
                           backend=Backend("ivit", probs=probs))
        q = quantize_model(model, st)
        with torch.no_grad():
            for mode in ("observe", "histogram"):
                q.set_mode(mode)
                q(images)
        q.freeze()
        res = verify_program(q, *build_onnx(q), images, batch_size=8)
        assert (res["exact"], res["mismatches"]) == (True, 0)
