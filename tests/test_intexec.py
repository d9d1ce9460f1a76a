"""Integer-only execution (ptq.intexec): the ONNX model equals the simulation bit for bit on onnxruntime,
holds only integer tensors inside, runs without ptq or torch, and its CLI refuses damaged files."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper, shape_inference

from conftest import ROOT, small_vit
from ptq.intexec import artefact
from ptq.intexec.build import MATMUL_KINDS, build_onnx
from ptq.intexec.rebuild import save_run_state
from ptq.intexec.simcheck import simulate
from ptq.intexec.verify import check_exportable, diff_trace, export_and_verify, main, verify_program
from ptq.intexec.widths import needed_bits
from ptq.quant.nonlinear import Backend
from ptq.quant.quantizers import WeightQuantizer
from ptq.quant.rounding import install_adaround
from ptq.quant.vit import QuantSettings, QuantViT


def _images(n: int, size: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _randomise_adaround(q: QuantViT, seed: int = 0) -> float:
    """Random learned rounding; returns the fraction of weights that differ from nearest rounding."""
    gen = torch.Generator().manual_seed(seed)
    differ = total = 0
    with torch.no_grad():
        for aq in install_adaround(q):
            aq.v.copy_(torch.randn(aq.v.shape, generator=gen) * 3)
        for lin in q.linears():
            near = WeightQuantizer(lin.weight, lin.wq.bits)(lin.weight)
            differ += int((lin.quantized_weight()[0] != near).sum())
            total += near.numel()
    return differ / total


def _calibrate(q: QuantViT, images: torch.Tensor) -> QuantViT:
    q.set_mode("observe")
    with torch.no_grad():
        q(images)
    q.freeze()
    return q


@pytest.fixture(scope="module")
def w8a8() -> QuantViT:
    q = QuantViT(small_vit(layers=2), QuantSettings(wbits=8, abits=8, backend=Backend("ivit")))
    return _calibrate(q, _images(32, seed=0))


def _bytes(q: QuantViT, debug: bool = False) -> bytes:
    return build_onnx(q, debug=debug)[0].SerializeToString()


@pytest.mark.parametrize("wbits", [8, 4])
def test_onnx_model_equals_simulation_bit_for_bit(wbits: int, w8a8: QuantViT) -> None:
    if wbits == 8:
        q = w8a8
    else:  # W4A8 with AdaRound rounding that is not nearest rounding
        q = QuantViT(small_vit(layers=2, seed=3), QuantSettings(wbits=4, abits=8, backend=Backend("ivit")))
        assert _randomise_adaround(q) > 0.2
        _calibrate(q, _images(32, seed=0))
    model, decl = build_onnx(q)
    weights = [c for c in decl["constants"].values() if c["role"] == "weight"]
    assert len(weights) == 2 * 4 + 2 and all(max(-c["min"], c["max"]) <= 2 ** (wbits - 1) for c in weights)
    images = _images(48)
    res = verify_program(q, model, decl, images, batch_size=24)
    assert (res["exact"], res["mismatches"], res["n"], res["runtime"]) == (True, 0, 48, artefact.runtime())
    # every intermediate the simulation names is equal too, not only the head
    rows = diff_trace(q, artefact.session(_bytes(q, debug=True)), images[:8])
    assert len(rows) > 30 and all(r["differ"] == 0 for r in rows)
    # ShiftGELU's INT8 table and its output's requantization are one Gather: the model never forms q * g
    # (the debug export above still does, and traced it equal); every initializer is used
    gelu = [n for n in model.graph.node if n.name.startswith("requant:blocks.0.mlp.gelu_q/")]
    assert [n.op_type for n in gelu] == ["Gather"]
    assert {r["tensor"] for r in rows} >= {"blocks.0.mlp.gelu_q.int", "blocks.0.mlp.gelu_q"}
    assert "blocks.0.mlp.gelu_q.int" not in decl["values"] and "blocks.0.mlp.gelu_q" in decl["values"]
    used = {i for n in model.graph.node for i in n.input}
    assert all(t.name in used for t in model.graph.initializer)
    summary = res["widths"]["summary"]
    assert set(summary["matmuls"]) == set(MATMUL_KINDS) - {"merge"}  # Swin's patch merging: not in a ViT
    assert summary["matmuls"]["qkv"]["layers"] == 2 and summary["all_accumulators_fit_int32"]
    assert summary["matmuls"]["head"]["max_abs"] > 0 and summary["over_declared_width"] == []


def _types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = shape_inference.infer_shapes(model, strict_mode=True).graph
    vals = [*inferred.value_info, *inferred.input, *inferred.output]
    types = {v.name: v.type.tensor_type.elem_type for v in vals}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    return types


def test_no_float_tensor_between_the_input_quantizer_and_the_dequantization(w8a8: QuantViT) -> None:
    model, _ = build_onnx(w8a8)
    onnx.checker.check_model(model, full_check=True)
    assert {o.domain for o in model.opset_import} == {""} and all(n.domain == "" for n in model.graph.node)
    types = _types(model)
    floats = [n for n in model.graph.node if any(types[o] == TensorProto.FLOAT for o in n.output)]
    # the input quantizer (Div, Round, Clip), the dequantization (Cast, Mul) and the logits output
    assert [n.op_type for n in floats] == ["Div", "Round", "Clip", "Cast", "Mul", "Identity"]
    assert floats[0].input[0] == "image" and floats[3].input[0] == "head.fc.acc"
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulInteger") == 1 + 2 * 6 + 1 and "MatMul" not in ops and "Gemm" not in ops
    assert not {"Softmax", "Erf", "Gelu", "LayerNormalization", "Sqrt", "Exp", "Pow"} & set(ops)
    # dynamic batch: one model for any N
    sess = artefact.session(model.SerializeToString())
    for n in (1, 5):
        logits, acc = sess.run(["logits", "logits_int"], {"image": _images(n).numpy()})
        want_acc, want = simulate(w8a8, _images(n))
        assert np.array_equal(acc, want_acc.numpy()) and np.array_equal(logits, want.numpy())


def test_model_runs_with_onnxruntime_and_numpy_alone(w8a8: QuantViT, tmp_path: Path) -> None:
    model, decl = build_onnx(w8a8, {"normalisation": {"mean": [0.5] * 3, "std": [0.25] * 3}})
    path = artefact.save_model(model, decl, tmp_path / "art")
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta["ptq"])["input"]["normalisation"]["std"] == [0.25] * 3
    images = _images(8)
    np.save(tmp_path / "images.npy", images.numpy())
    script = textwrap.dedent(f"""
        import sys, numpy as np, onnxruntime as ort
        sess = ort.InferenceSession({str(path)!r}, providers=["CPUExecutionProvider"])
        logits, acc = sess.run(["logits", "logits_int"], {{"image": np.load({str(tmp_path / 'images.npy')!r})}})
        np.save({str(tmp_path / 'logits.npy')!r}, logits)
        assert acc.dtype == np.int32 and logits.dtype == np.float32
        loaded = [m for m in ("torch", "ptq") if m in sys.modules]
        assert not loaded, loaded
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    _, expected = simulate(w8a8, images)
    assert np.array_equal(np.load(tmp_path / "logits.npy").view(np.int32), expected.numpy().view(np.int32))


def test_export_and_verify_and_the_cli(compose_cfg, tmp_path: Path, capsys: pytest.CaptureFixture,
                                       caplog: pytest.LogCaptureFixture) -> None:
    """A W4A8 AdaRound run dir on the tiny-digits architecture (random weights): exact, wrong, then damaged."""
    from ptq.models.tiny import build_tiny_vit
    from ptq.models.zoo import load_model
    from ptq.runspec import settings_of

    torch.manual_seed(0)
    fp = build_tiny_vit()
    with torch.no_grad():
        fp.heads.head.weight.normal_(0, 0.05)
    torch.save({"state_dict": fp.state_dict()}, tmp_path / "tiny.pt")
    cfg = compose_cfg(f"model.weights_path={tmp_path / 'tiny.pt'}", "nonlinear=ivit", "wquant=adaround", "wbits=4",
                      "debug=quick", "device=cpu")
    check_exportable(cfg)
    q = QuantViT(load_model(cfg), settings_of(cfg))
    _randomise_adaround(q)
    _calibrate(q, _images(8, size=24, seed=0))
    run = tmp_path / "run"
    from ptq.intexec.verify import eval_images

    first = torch.stack([x for x, _ in eval_images(cfg, 8)])
    with torch.no_grad():
        save_run_state(q, cfg, run, q(first))  # the run's own logits: the rebuilt model must reproduce them
    res = export_and_verify(q, cfg, run, _images(8, size=24), batch_size=4)
    assert (res["exact"], res["mismatches"], res["n"]) == (True, 0, 8)
    art = run / "intexec"
    assert (art / "widths.json").is_file() and res["widths"]["all_accumulators_fit_int32"]
    assert res["bytes"] == (art / "model.onnx").stat().st_size and res["runtime"].startswith("onnxruntime ")

    assert main([str(run), "--images", "4"]) == 0  # rebuilds from quant_state.pt (AdaRound), verifies the file
    assert capsys.readouterr().out.strip() == f"mismatches=0/4  ({artefact.runtime()})"
    # a wrong model (one bias off by one, checksum rewritten): mismatches, and the first diverging tensor named
    model = onnx.load(str(art / "model.onnx"))
    nodes = {n.output[0]: n for n in model.graph.node}
    add = nodes[nodes["blocks.0.mlp.fc2.acc"].input[0]]  # the bias add of that layer
    bias = next(i for i in model.graph.initializer if i.name == add.input[1])
    model.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(bias) + 5, "wrong_bias"))
    add.input[1] = "wrong_bias"
    artefact.save_model(model, json.loads((art / "manifest.json").read_text()), art)
    assert main([str(run), "--images", "4"]) == 1
    k, n = capsys.readouterr().out.split()[0].removeprefix("mismatches=").split("/")
    assert int(k) > 0 and int(n) == 4
    assert "first diverging tensors: [{'tensor': 'blocks.0.mlp.fc2.acc'" in caplog.text
    # a damaged file: refused in one line before anything runs
    data = bytearray((art / "model.onnx").read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    (art / "model.onnx").write_bytes(bytes(data))
    proc = subprocess.run([sys.executable, "-m", "ptq.intexec", str(run)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")]
    assert proc.returncode == 2 and proc.stdout == "" and len(errors) == 1, proc.stderr[-2000:]
    assert "model.onnx: damaged" in errors[0] and "--reexport" in errors[0]
    assert main([str(run), "--images", "4", "--reexport"]) == 0  # written again, exact again
    # the module entry point exits with main's status (here: a run dir without quant_state.pt)
    proc = subprocess.run([sys.executable, "-m", "ptq.intexec", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "quant_state.pt not found" in proc.stderr and proc.stdout == ""
    # a state that is not the run's (its logits fingerprint differs) is refused, not verified
    with torch.no_grad():
        save_run_state(q, cfg, run, q(first) + 1)
    assert main([str(run), "--images", "4", "--reexport"]) == 2
    assert "does not reproduce the run's logits" in caplog.text


def test_onnx_model_equals_simulation_at_wide_activations() -> None:
    """A16 activations: int32 MatMul instead of MatMulInteger, wide requantization and ShiftGELU paths."""
    st = QuantSettings(wbits=8, abits=16, backend=Backend("ivit", gelu_sig_bits=16))
    q = _calibrate(QuantViT(small_vit(layers=2), st), _images(32, seed=0))
    model = build_onnx(q, debug=True)[0]
    assert "MatMul" in [n.op_type for n in model.graph.node]
    rows = diff_trace(q, artefact.session(model.SerializeToString()), _images(32))
    assert len(rows) > 30 and [r for r in rows if r["differ"]] == []


def test_refuses_models_that_are_not_integer_only(compose_cfg) -> None:
    from ptq.config import ConfigError

    q = _calibrate(QuantViT(small_vit(layers=1), QuantSettings(backend=Backend("fp"))), _images(4))
    with pytest.raises(ValueError, match="ivit"):
        build_onnx(q)
    with pytest.raises(ConfigError, match="quant_io"):
        check_exportable(compose_cfg("nonlinear=ivit", "aquant.quant_io=false"))


def test_needed_bits() -> None:
    assert needed_bits(-128, 127, True) == 8 and needed_bits(-129, 0, True) == 9 and needed_bits(0, 128, True) == 9
    assert needed_bits(0, 255, False) == 8 and needed_bits(0, 0, True) == 1
    assert needed_bits(-(2**31), 2**31 - 1, True) == 32
