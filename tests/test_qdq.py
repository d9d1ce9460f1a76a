"""The QDQ export (ptq.intexec.qdq): the run's own steps and integer weights, fused by onnxruntime."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from ptq.data.digits import digits_splits
from ptq.intexec.qdq import build_qdq, describe_fusion, run_qdq
from ptq.intexec.verify import main as verify_main
from ptq.models.tiny import load_tiny_digits
from ptq.quant.models import quantize_model
from ptq.quant.nonlinear import Backend
from ptq.quant.quantizers import qdq_pair
from ptq.quant.rounding import install_adaround
from ptq.quant.vit import QuantSettings


def test_qdq_pair_is_the_quantizer_at_every_width() -> None:
    x = torch.linspace(-3, 3, 1001)
    s = torch.tensor(0.37)
    for lo, hi in ((-8, 7), (-128, 127), (0, 255), (0, 15)):
        ref = torch.round(x / s).clamp(lo, hi) * s
        torch.testing.assert_close(qdq_pair(x, s, lo, hi), ref, rtol=0, atol=1e-6)


def _calibrated(name: str, backend: str, wbits: int) -> tuple:
    model = load_tiny_digits(name=name)
    sp = digits_splits(image_size=24)
    q = quantize_model(model, QuantSettings(wbits=wbits, abits=8, backend=Backend(backend)))
    q.set_mode("observe")
    with torch.no_grad():
        q(sp["train"].tensors[0][:128])
    q.freeze()
    return q, sp["test"].tensors[0][:256]


def test_weights_are_the_models_own_int8_codes_adaround_included() -> None:
    q, _ = _calibrated("tiny_digits", "fp", 4)
    install_adaround(q)
    lin = q.blocks[0].mlp.fc1
    with torch.no_grad():  # a rounding different from nearest: the export must carry it, not re-round
        lin.wq.v.copy_(torch.where(torch.rand_like(lin.wq.v) < 0.5, 10.0, -10.0))
    model = build_qdq(q)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    quantized_consts = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in inits]
    assert not quantized_consts  # every weight is stored as codes with one DequantizeLinear
    codes = lin.quantized_weight()[0].detach().numpy().astype(np.int8).T  # stored [in, out]: DQ feeds the MatMul
    assert any(a.dtype == np.int8 and a.shape == codes.shape and np.array_equal(a, codes) for a in inits.values())
    assert codes.min() >= -8 and codes.max() <= 7


def test_swin_qdq_fuses_into_integer_kernels_and_tracks_the_simulation() -> None:
    q, x = _calibrated("tiny_swin_digits", "fp", 8)
    blob = build_qdq(q).SerializeToString()
    ops = describe_fusion(blob)
    linears = sum(1 for _ in q.linears())
    assert ops.get("MatMulIntegerToFloat", 0) + ops.get("QLinearMatMul", 0) >= linears - 1  # all but the 2-D head
    with torch.no_grad():
        sim = q(x)
    out = run_qdq(blob, x)
    assert (out.argmax(1) == sim.argmax(1)).float().mean() >= 0.95


def test_cli_export_qdq_measures_it_on_the_eval_split(run_cli, tmp_path: Path) -> None:
    res = run_cli("wbits=4", "nonlinear=ivit", "export_qdq=true", "debug=quick")
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    qdq = metrics["qdq"]
    assert qdq["n"] == metrics["n_eval"] == 256
    assert abs(qdq["acc1"] - metrics["acc1"]) < 3.0 and qdq["agreement_sim"] >= 90.0
    assert sum(qdq["fused"].values()) >= 17
    onnx.checker.check_model(onnx.load(qdq["artefact"]))
    # afterwards, from the run dir alone: the same model, the same measurement, recorded again
    before = dict(qdq)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert verify_main(["--format", "qdq", str(tmp_path / "run")]) == 0
    again = json.loads((tmp_path / "run" / "metrics.json").read_text())["qdq"]
    assert {k: again[k] for k in ("acc1", "kl_sim", "agreement_sim", "bytes", "fused")} == {
        k: before[k] for k in ("acc1", "kl_sim", "agreement_sim", "bytes", "fused")}
    assert out.getvalue().startswith(f"qdq acc1={before['acc1']:.2f}")


def test_qdq_cli_takes_a_float_backend_run_and_refuses_bad_use(run_cli, tmp_path: Path) -> None:
    """An fp-backend run has no integer program, but its QDQ model is written and measured afterwards."""
    res = run_cli("debug=quick")
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "run"
    assert "qdq" not in json.loads((run / "metrics.json").read_text())
    with contextlib.redirect_stdout(io.StringIO()):
        assert verify_main(["--format", "qdq", str(run), "--images", "64"]) == 0  # a prefix: measured, not recorded
        assert "qdq" not in json.loads((run / "metrics.json").read_text())
        assert verify_main(["--format", "qdq", str(run)]) == 0
        assert verify_main([str(run)]) == 2  # the integer format still refuses an fp run
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["qdq"]["n"] == metrics["n_eval"] and abs(metrics["qdq"]["acc1"] - metrics["acc1"]) < 3.0
    with pytest.raises(SystemExit) as exc, contextlib.redirect_stderr(io.StringIO()):
        verify_main(["--format", "qdq", "--runs", str(tmp_path)])
    assert exc.value.code == 2
