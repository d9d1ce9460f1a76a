"""GPTQ (wquant=gptq): its codes beat nearest rounding on a real layer, stay on the absmax grid, survive
quant_state.pt, and a CLI run is bit-exact on onnxruntime and rebuilt by ``python -m ptq.intexec``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from ptq.config import no_effect
from ptq.quant.qtensor import qrange
from ptq.quant.quantizers import CodeQuantizer, WeightQuantizer, channel_view
from ptq.quant.state import compact_state, load_compact_state
from ptq.recon.gptq import gptq_codes, output_error
from ptq.recon.unitcache import as_real, capture, capture_gram


@pytest.fixture(scope="module")
def fc1() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The embedded default's ``blocks.1.mlp.fc1`` weight, its 4-bit absmax scale, and its real (quantized)
    inputs over 64 digits images: LayerNorm outputs, correlated across channels."""
    from hydra import compose, initialize_config_dir

    from ptq.calib import calibrate
    from ptq.data import build
    from ptq.models.zoo import load_model
    from ptq.quant.models import quantize_model
    from ptq.runspec import settings_of

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["wquant=gptq", "wbits=4", "debug=quick", "cache_dir=null"])
    cpu = torch.device("cpu")
    q = quantize_model(load_model(cfg), settings_of(cfg))
    src, _ = build.splits(cfg)
    images = torch.cat([x for x, _ in build.loader(build.subset(src, 64, 0), 64, 0, cpu)])
    calibrate(q, [(images, None)], cpu)
    lin = q.blocks[1].mlp.fc1
    x = capture(q, lin, images, cpu, "input", 32)
    x = as_real(x.take(torch.arange(len(x)), cpu)).reshape(-1, lin.weight.shape[1]).double()
    h = capture_gram(q, lin, [images[:32], images[32:]])
    assert torch.allclose(h, x.t() @ x / x.shape[0], rtol=1e-10, atol=1e-12)  # the Gram capture is X^T X / N
    return lin.weight.detach().clone(), lin.wq.scale.clone(), x


def _err(x: torch.Tensor, w: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> float:
    return float((x @ (w.double() - codes.double() * scale.double()[:, None]).t()).pow(2).sum())


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_below_nearest_on_a_real_layer(fc1, act_order: bool) -> None:
    w, scale, x = fc1
    h = x.t() @ x / x.shape[0]
    corr = h / torch.outer(h.diagonal().sqrt(), h.diagonal().sqrt())
    assert float((corr - torch.eye(len(h), dtype=h.dtype)).abs().max()) > 0.5  # the inputs are correlated
    near = WeightQuantizer(w, 4)
    assert torch.equal(near.scale, scale)  # the layer's scale is absmax's
    codes = gptq_codes(w / channel_view(scale, w), h, 4, damp=0.01, block_size=16, act_order=act_order)
    lo, hi = qrange(4)
    assert torch.equal(codes, codes.round()) and int(codes.min()) >= lo and int(codes.max()) <= hi
    e_gptq, e_near = _err(x, w, codes, scale), _err(x, w, near(w), scale)
    assert e_gptq < 0.7 * e_near, (e_gptq, e_near)
    assert output_error(w, codes, scale, h) == pytest.approx(e_gptq / x.shape[0], rel=1e-9)
    assert float((codes != near(w)).float().mean()) > 0.05  # GPTQ chose other codes, not just nearest


def test_block_size_only_batches_the_updates(fc1) -> None:
    w, scale, x = fc1
    h = x.t() @ x / x.shape[0]
    w_s = w / channel_view(scale, w)
    ref = gptq_codes(w_s, h, 4, block_size=128)
    for bs in (1, 7, 64):
        assert torch.equal(gptq_codes(w_s, h, 4, block_size=bs), ref)


def test_diagonal_hessian_gives_nearest_rounding() -> None:
    """With uncorrelated inputs no error is fed forward: GPTQ is nearest rounding, clamped alike."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 20, generator=gen)
    wq = WeightQuantizer(w, 3)
    h = torch.diag(torch.rand(20, generator=gen, dtype=torch.float64) + 0.1)
    h[3, 3] = 0.0  # a dead input: code 0
    codes = gptq_codes(w / channel_view(wq.scale, w), h, 3, act_order=True)
    near = wq(w)
    near[:, 3] = 0.0
    assert torch.equal(codes, near)


@pytest.mark.parametrize("bits", [4, 8])
def test_codes_survive_the_compact_state(bits: int) -> None:
    from conftest import small_vit
    from ptq.quant.vit import QuantSettings, QuantViT

    model = small_vit(layers=1)
    q = QuantViT(model, QuantSettings(wbits=bits, abits=8))
    q.set_mode("quant")
    gen = torch.Generator().manual_seed(1)
    lo, hi = qrange(bits)
    for lin in q.linears():
        codes = torch.randint(lo, hi + 1, lin.weight.shape, generator=gen).float()
        lin.wq = CodeQuantizer(lin.weight, bits, codes)
    state = compact_state(q)
    assert set(state["codes"]) == {lin.name for lin in q.linears()}
    assert not any(k.endswith(".wq.codes") for k in state["tensors"])
    rebuilt = load_compact_state(QuantViT(model, QuantSettings(wbits=bits, abits=8)), state)
    for a, b in zip(q.linears(), rebuilt.linears(), strict=True):
        assert isinstance(b.wq, CodeQuantizer) and torch.equal(a.wq.codes, b.wq.codes)
        assert torch.equal(a.wq.scale, b.wq.scale)
    with pytest.raises(ValueError, match="integers in"):
        CodeQuantizer(lin.weight, bits, torch.full(lin.weight.shape, float(hi + 1)))


def test_cli_gptq_run_is_bit_exact_and_rebuilds(run_cli, tmp_path: Path) -> None:
    res = run_cli("wquant=gptq", "wbits=4", "nonlinear=ivit", "export=true", "debug=quick")
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "run"
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "ok" and m["name"] == "W4A8-gptq-ivit"
    assert m["intexec"]["exact"] and m["intexec"]["mismatches"] == 0 and m["intexec"]["n"] == m["n_eval"]
    layers = m["gptq_layers"]
    assert len(layers) == 18 and all(r["err_gptq"] < r["err_nearest"] for r in layers)
    proc = subprocess.run([sys.executable, "-m", "ptq.intexec", str(run)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "mismatches=0/" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize(("override", "needle"), [("gptq.damp=0", "gptq.damp"), ("gptq.block_size=0", "gptq.block_size"),
                                                  ("gptq.calib_images=0", "gptq.calib_images")])
def test_bad_gptq_values_fail_with_one_line(run_cli, override: str, needle: str) -> None:
    res = run_cli("wquant=gptq", override, timeout=60)
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and needle in lines[0] and "allowed" in lines[0], res.stderr


def test_gptq_options_inert_without_gptq(compose_cfg) -> None:
    cfg = compose_cfg("gptq.damp=0.1")
    assert any("gptq.damp=0.1: no effect" in line for line in no_effect(cfg, ["gptq.damp=0.1"]))
    assert no_effect(compose_cfg("wquant=gptq", "gptq.damp=0.1"), ["wquant=gptq", "gptq.damp=0.1"]) == []


def test_sensitivity_says_gptq_was_not_run() -> None:
    from ptq.sensitivity.report import baseline_label
    from ptq.sensitivity.scan import NEAREST_NOTES

    assert baseline_label({"name": "W4A8-gptq-ivit", "rounding": NEAREST_NOTES["gptq"]}).endswith("no GPTQ)")
    assert baseline_label({"name": "W4A8-adaround-block-lsq-ivit", "rounding": NEAREST_NOTES["adaround"]}).endswith(
        "no AdaRound)")


def test_gptq_rows_are_named(compose_cfg) -> None:
    from ptq.naming import row_name
    from ptq.runspec import row_of
    from ptq.table.frame import _labels

    row = row_of(compose_cfg("wquant=gptq", "wbits=4"))
    assert row["gptq"] == {"damp": 0.01, "act_order": False} and row["granularity"] is None
    assert row_name(row) == "W4A8-gptq-fp" and _labels(row)["[W]"] == "GPTQ"
    row = row_of(compose_cfg("wquant=gptq", "wbits=4", "gptq.act_order=true", "gptq.damp=0.1", "nonlinear=ivit"))
    assert row_name(row) == "W4A8-gptq-actorder-damp0.1-ivit" and _labels(row)["[W]"] == "GPTQ+ActOrder"
    assert "gptq" not in row_of(compose_cfg("wquant=absmax"))  # other rows (and names) stay what they were


def test_compensated_start_rounds_to_the_codes(fc1) -> None:
    """adaround.init=gptq: AdaRound starts at GPTQ's compensated weights, whose hard rounding is GPTQ's codes."""
    from ptq.quant.rounding import AdaRoundQuantizer
    from ptq.recon.gptq import gptq_solve

    w, scale, x = fc1
    h = x.t() @ x / x.shape[0]
    w_s = w / channel_view(scale, w)
    codes, start = gptq_solve(w_s, h, 4, block_size=16)
    assert torch.equal(codes, gptq_codes(w_s, h, 4, block_size=16))
    assert torch.equal(start[:, 0], w_s[:, 0])  # nothing is fed into the first column
    assert float((start - w_s).abs().max()) > 0.5  # the others carry the fed-forward error
    lo, hi = qrange(4)
    assert torch.equal(codes, torch.clamp(torch.round(start), lo, hi))
    ada = AdaRoundQuantizer(w, 4, start=start)
    assert torch.equal(ada.scale, scale)  # the same absmax grid
    tie = (start - start.floor()) == 0.5  # round-half-even and h >= 0.5 part ways only on exact ties
    assert torch.equal(ada.hard_codes()[~tie], codes[~tie])
    ada.soft = True
    assert torch.allclose(ada(w), torch.clamp(start, lo, hi), atol=1e-5)  # the soft start is the compensated weights
    with pytest.raises(ValueError, match="start of shape"):
        AdaRoundQuantizer(w, 4, start=start[:, 1:])


def test_cli_adaround_from_gptq_is_bit_exact_and_rebuilds(run_cli, tmp_path: Path) -> None:
    res = run_cli("wquant=adaround", "granularity=block", "adaround.init=gptq", "wbits=4", "nonlinear=ivit",
                  "export=true", "debug=quick", "data.eval_images=128")
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "run"
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "ok" and m["name"] == "W4A8-adaround-block-lsq-gptqinit-ivit"
    assert len(m["gptq_layers"]) == 18 and len(m["units"]) == 10
    assert m["intexec"]["exact"] and m["intexec"]["mismatches"] == 0
    state = torch.load(run / "quant_state.pt", weights_only=False)["state"]
    assert len(state["codes"]) == 18 and not state["rounding"]  # kept as codes: the floors are GPTQ's
    proc = subprocess.run([sys.executable, "-m", "ptq.intexec", str(run)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "mismatches=0/" in proc.stdout, proc.stderr[-2000:]


def test_gptq_start_options(compose_cfg, run_cli) -> None:
    from ptq.naming import row_name
    from ptq.runspec import row_of
    from ptq.table.frame import _labels

    base = ("wquant=adaround", "granularity=block", "adaround.init=gptq", "wbits=4", "nonlinear=ivit")
    row = row_of(compose_cfg(*base, "gptq.act_order=true"))
    assert row_name(row) == "W4A8-adaround-block-lsq-gptqinit-actorder-ivit"
    assert _labels(row)["[W]"] == "AdaRound(Block)+GPTQinit"
    assert "adaround_init" not in row_of(compose_cfg("wquant=adaround"))  # other rows stay what they were
    cfg = compose_cfg(*base, "gptq.damp=0.1", "gptq.calib_images=64")
    lines = no_effect(cfg, [*base, "gptq.damp=0.1", "gptq.calib_images=64"])
    assert len(lines) == 1 and lines[0].startswith("gptq.calib_images=64: no effect") and "adaround.calib_images" in lines[0]
    res = run_cli("wquant=adaround", "adaround.init=nearest", timeout=60)
    err = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert res.returncode == 2 and len(err) == 1 and "adaround.init" in err[0] and "float, gptq" in err[0], res.stderr
