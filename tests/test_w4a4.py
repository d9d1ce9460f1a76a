"""W4A4 tools: searched activation steps, LayerNorm reparameterisation, log2 probabilities (issue 13)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, small_vit
from ptq.calib import calibrate, reparameterise
from ptq.config import ConfigError, validate
from ptq.intexec.build import build_onnx
from ptq.intexec.verify import main as intexec_main
from ptq.intexec.verify import verify_program
from ptq.quant import ivit, reparam
from ptq.quant.nonlinear import Backend
from ptq.quant.quantizers import HIST_BINS, search_clip
from ptq.quant.vit import QuantSettings, QuantViT


def _images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _batches(x: torch.Tensor, bs: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(b, torch.zeros(len(b))) for b in x.split(bs)]


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_mse_search_finds_the_analytic_clip_of_a_uniform_tensor(bits: int) -> None:
    """|x| uniform on [0, A]: error(c) = c^3 / (12 qmax^2 A) + (A - c)^3 / (3 A), least at c = A 2qmax / (2qmax + 1)."""
    qmax = 2 ** (bits - 1) - 1
    top = torch.tensor(3.0)
    hist = torch.full((HIST_BINS,), 1000.0)
    clip = float(search_clip(hist, top, bits, True, "mse", grid=200))
    assert clip == pytest.approx(3.0 * 2 * qmax / (2 * qmax + 1), abs=3.0 / 200 + 3.0 / HIST_BINS)
    # and it is the candidate with the least error of the grid, checked by brute force on the samples
    x = torch.linspace(0, 3.0, 20001, dtype=torch.float64)
    def err(c: float) -> float:
        s = c / qmax
        return float(((x - torch.clamp(torch.round(x / s), 0, qmax) * s) ** 2).mean())
    best = min((3.0 * k / 200 for k in range(1, 201)), key=err)
    assert err(clip) <= err(best) * 1.01


def test_percentile_clip_is_the_percentile_of_the_histogram() -> None:
    hist = torch.zeros(HIST_BINS)
    hist[: HIST_BINS // 2] = 1.0  # |x| uniform on the lower half of [0, 8]
    clip = float(search_clip(hist, torch.tensor(8.0), 4, True, "percentile", percentile=50.0))
    assert clip == pytest.approx(2.0, abs=8.0 / HIST_BINS)


def test_searched_steps_lower_the_tensor_error_against_absmax() -> None:
    """On heavy-tailed activations the mse step quantizes the tensor with less error than max-based steps."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200_000, generator=gen) ** 3  # heavy tails: a few values far beyond the bulk
    errors = {}
    for method in ("movavg", "mse", "percentile"):
        st = QuantSettings(wbits=None, abits=4, act_method=method)
        q = st.act()
        q.set_mode("observe")
        q.observe(x)
        if q.searched:
            q.set_mode("histogram")
            q.count(x)
        q.freeze()
        s = float(q.scale)
        errors[method] = float(((x - torch.clamp(torch.round(x / s), -8, 7) * s) ** 2).mean())
    assert errors["mse"] < errors["percentile"] < errors["movavg"]


def test_ln_reparam_keeps_the_float_model_and_the_quantized_graph_per_tensor() -> None:
    fp = small_vit(layers=2)
    with torch.no_grad():  # make the LN outputs' channel ranges very different, as in real ViTs
        for blk in fp.encoder.layers:
            blk.ln_1.weight.mul_(torch.logspace(-1, 1, 32))
    x = _images(8)
    plain = QuantViT(fp, QuantSettings(wbits=None, abits=None))
    plain.set_mode("off")
    folded = QuantViT(fp, QuantSettings(wbits=None, abits=None))
    reparameterise(folded, _batches(_images(32, seed=0)), torch.device("cpu"), alpha=1.0)
    assert not bool((folded.blocks[0].attn.ln_r == 1).all())
    folded.set_mode("off")
    with torch.no_grad():
        torch.testing.assert_close(folded(x), plain(x), rtol=1e-4, atol=1e-5)

    st = QuantSettings(wbits=4, abits=4, act_method="mse", backend=Backend("ivit", softmax_log2=True))
    q = QuantViT(fp, st)
    reparameterise(q, _batches(_images(32, seed=0)), torch.device("cpu"), alpha=1.0)
    calibrate(q, _batches(_images(32, seed=0)), torch.device("cpu"))
    assert all(aq.scale.numel() == 1 for aq in q.act_quantizers())  # runtime activations stay per-tensor
    res = verify_program(q, *build_onnx(q), _images(16), batch_size=8)
    assert (res["exact"], res["mismatches"]) == (True, 0)
    # the saved factors rebuild the same model
    from ptq.quant.state import compact_state, load_compact_state

    again = load_compact_state(QuantViT(fp, st), compact_state(q))
    with torch.no_grad():
        assert torch.equal(again(x), q(x))


def test_reparam_factors_even_out_channel_ranges() -> None:
    absmax = torch.tensor([0.1, 1.0, 10.0, 1.0])
    r = reparam.factors(absmax, 1.0)
    assert torch.allclose(absmax / r, torch.full((4,), float(absmax.mean())), rtol=1e-5)
    assert torch.allclose(reparam.factors(absmax, 0.5) ** 2, r, rtol=1e-5)


def _log2_reference(p: int) -> int:
    """Nearest power of two in the log domain, Python integers only: 2**(L-1) at scale 2**-14, 0 below L = 1."""
    if p < 1:
        return 0
    lg = next(k for k in range(17) if p * p < 2 ** (2 * k + 1))  # 2**(2L-1) <= p^2 < 2**(2L+1)
    return 2 ** (lg - 1) if lg >= 1 else 0


def test_log2_kernel_equals_a_python_int_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    p = torch.cat([torch.arange(0, 300), torch.randint(0, 2**15 + 1, (3000,), generator=gen),
                   torch.tensor([2**15, 23170, 23171, 2**14])])
    q, s = ivit.log2_probs(p)
    assert q.dtype == torch.int64 and float(s) == 2.0**-14
    assert q.tolist() == [_log2_reference(int(v)) for v in p]
    # the whole chain: 16-bit Shiftmax, then powers of two; real values within a factor sqrt(2) of Shiftmax's
    scores = torch.randint(-60, 60, (4, 9, 9), generator=gen)
    p16, s16 = ivit.shiftmax(scores, 0.05, 15, ivit.LOG2_IN_BITS)
    q, s = ivit.log2_probs(p16)
    kept = q > 0
    ratio = (q[kept].double() * float(s)) / (p16[kept].double() * float(s16))
    assert bool((ratio <= math.sqrt(2) + 1e-9).all() and (ratio >= 1 / math.sqrt(2) - 1e-9).all())
    with pytest.raises(ValueError, match="Shiftmax integers"):
        ivit.log2_probs(torch.tensor([2**15 + 1]))


def test_bad_w4a4_combinations_fail_with_one_line(compose_cfg, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ln_reparam=true .* needs aquant="):
        validate(compose_cfg("aquant=none", "aquant.ln_reparam=true"))
    with pytest.raises(ConfigError, match="log2=true .* needs nonlinear=ivit"):
        validate(compose_cfg("nonlinear=fp", "nonlinear.softmax.log2=true"))
    with pytest.raises(ConfigError, match="aquant.percentile"):
        validate(compose_cfg("aquant=percentile", "aquant.percentile=30"))
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "ptq.main", f"hydra.run.dir={tmp_path / 'run'}", "aquant=none",
                           "aquant.ln_reparam=true"], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "ln_reparam" in lines[0]


def test_w4a4_run_with_every_option_is_bit_exact(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """AdaRound + LSQ from mse steps, folded LN factors, log2 probabilities: exported, verified, rebuilt, audited."""
    run = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "ptq.main", f"hydra.run.dir={run}", f"cache_dir={tmp_path / 'c'}",
                           "debug=quick", "data.eval_images=64", "wbits=4", "abits=4", "nonlinear=ivit",
                           "aquant=mse", "aquant.ln_reparam=true", "nonlinear.softmax.log2=true",
                           "wquant=adaround", "granularity=block", "export=true", "nonlinear.audit=true"],
                          cwd=ROOT, capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((run / "metrics.json").read_text())
    assert m["name"] == "W4A4-adaround-block-lsq-mse-lnrep-log2-ivit"
    assert m["intexec"]["mismatches"] == 0 and m["intexec"]["n"] == 64
    manifest = json.loads((run / "intexec" / "manifest.json").read_text())
    assert manifest["values"]["blocks.0.attn.probs_q.int"]["bits"] == 15  # log2 probabilities, 2**-14 .. 1
    assert "blocks.0.attn.probs_q.int.shiftmax" in manifest["values"]
    # python -m ptq.intexec RUN --reexport, in this process (its kernels compiled once per worker)
    capsys.readouterr()
    assert intexec_main([str(run), "--reexport"]) == 0
    assert capsys.readouterr().out.startswith("mismatches=0/64  (onnxruntime ")


def test_image_bits_sets_only_the_input_image_quantizer(compose_cfg) -> None:
    """``aquant.image_bits=8`` at A4: the image quantizer (ViT and Swin) at 8 bits, every other one at 4;
    named ``-img8`` / ``+Img8``; inert (with a warning) where it changes nothing."""
    from timm.models.swin_transformer import SwinTransformer

    from ptq.config import no_effect
    from ptq.naming import row_name
    from ptq.quant.models import quantize_model
    from ptq.quant.quantizers import ActQuantizer
    from ptq.runspec import row_of, settings_of
    from ptq.table.frame import _labels

    st = QuantSettings(wbits=4, abits=4, image_bits=8)
    swin = SwinTransformer(img_size=16, patch_size=2, embed_dim=16, depths=(2,), num_heads=(2,), window_size=4,
                           mlp_ratio=2.0, num_classes=10)
    for q in (QuantViT(small_vit(layers=1), st), quantize_model(swin.eval(), st)):
        widths = {n: m.bits for n, m in q.named_modules() if isinstance(m, ActQuantizer)}
        assert widths.pop("embed.in_q") == 8
        assert set(widths.values()) <= {4, 16} and 4 in widths.values()  # A4 and the 16-bit residual stream
    base = ("nonlinear=ivit", "wbits=4", "abits=4", "aquant=mse")
    cfg = compose_cfg(*base, "aquant.image_bits=8")
    assert settings_of(cfg).image_bits == 8
    row = row_of(cfg)
    assert row_name(row) == "W4A4-absmax-mse-img8-ivit" and _labels(row)["[A]"] == "MSE+Img8"
    for extra in (("aquant.image_bits=4",), ("aquant.image_bits=8", "aquant.quant_io=false")):
        args = [*base, *extra]
        c = compose_cfg(*args)
        assert "image_bits" not in row_of(c) and settings_of(c).image_bits is None
        assert any(line.startswith("aquant.image_bits=") and "no effect" in line for line in no_effect(c, args))
    with pytest.raises(ConfigError, match="aquant.image_bits"):
        validate(compose_cfg("aquant.image_bits=1"))


def test_the_w4a4_recipe_exports_bit_exact(run_cli, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """experiment=w4a4_best (8-bit image, LN factors at half strength, GELU twin codes, QDrop): exported,
    verified on onnxruntime at 0 mismatches, rebuilt from quant_state.pt and re-verified."""
    run = tmp_path / "run"
    proc = run_cli("experiment=w4a4_best", "debug=quick", "data.eval_images=64", "export=true", timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((run / "metrics.json").read_text())
    assert m["name"] == "W4A4-adaround-block-lsq-qdrop0.5-mse-lnrep0.5-k8-img8-gtwin-ivit"
    assert m["row"]["ln_reparam_alpha"] == 0.5 and m["row"]["image_bits"] == 8
    assert m["intexec"]["mismatches"] == 0 and m["intexec"]["n"] == 64
    capsys.readouterr()
    assert intexec_main([str(run)]) == 0
    assert capsys.readouterr().out.startswith("mismatches=0/64  (onnxruntime ")
