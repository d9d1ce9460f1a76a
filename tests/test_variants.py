"""The integer model's fast variant (``model_vnni.onnx``, ptq.intexec.variants): INT8 weights as int8,
the same integers where this CPU's uint8 x int8 kernel is exact, and a guard that flags every output
where it is not."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

from conftest import small_vit
from ptq.intexec import artefact
from ptq.intexec.build import OUTPUT, OUTPUT_INT, build_onnx
from ptq.intexec.simcheck import simulate
from ptq.intexec.variants import GUARD, int8_weights, u8s8_exact
from ptq.intexec.verify import verify_program
from ptq.quant.nonlinear import Backend
from ptq.quant.vit import QuantSettings, QuantViT


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


@pytest.fixture(scope="module")
def built() -> tuple[QuantViT, onnx.ModelProto, dict]:
    q = QuantViT(small_vit(layers=2), QuantSettings(wbits=8, abits=8, backend=Backend("ivit")))
    q.set_mode("observe")
    with torch.no_grad():
        q(torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    q.freeze()
    model, decl = build_onnx(q)
    return q, model, decl


def _images(n: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(3))


def _weight_types(model: onnx.ModelProto) -> list[int]:
    inits = {t.name: t for t in model.graph.initializer}
    return [inits[n.input[1]].data_type for n in model.graph.node
            if n.op_type == "MatMulInteger" and n.input[1] in inits and not n.name.startswith(GUARD)]


def test_every_weight_becomes_int8_without_a_zero_point(built) -> None:
    _, model, _ = built
    assert TensorProto.UINT8 in _weight_types(model)  # the portable file: |w| > 64 stored uint8 (+128)
    fast, rewritten = int8_weights(model)
    assert rewritten == _weight_types(model).count(TensorProto.UINT8) > 0
    assert set(_weight_types(fast)) == {TensorProto.INT8}
    onnx.checker.check_model(fast)
    assert [o.name for o in fast.graph.output] == [o.name for o in model.graph.output]


def test_probe_matches_the_cpu() -> None:
    """uint8 x int8 is exact with VNNI / AMX and saturates on AVX2 alone (x86)."""
    flags = _cpu_flags()
    if "avx2" not in flags:  # not an x86 CPU with AVX2: nothing to compare the probe with
        assert isinstance(u8s8_exact(), bool)
        return
    assert u8s8_exact() == bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def test_same_integers_as_the_simulation_or_flagged(built) -> None:
    """Where the kernel is exact the variant equals the simulation bit for bit; elsewhere its guard fires."""
    q, model, decl = built
    fast, _ = int8_weights(model)
    res = verify_program(q, model, decl, _images(), batch_size=8, variants={"vnni": fast})
    assert res["exact"] and res["mismatches"] == 0 and res["n"] == 16
    assert res["variants"]["vnni"] == ({"runnable": True, "mismatches": 0, "n": 16} if u8s8_exact()
                                       else {"runnable": False, "guarded": True})


def test_guard_flags_every_output_when_the_probe_is_wrong(built) -> None:
    """A saturating kernel, emulated by an expected probe product that this CPU cannot give: NaN logits,
    INT32_MIN integer logits, for every image."""
    _, model, _ = built
    fast, _ = int8_weights(model)
    for t in fast.graph.initializer:
        if t.name == f"{GUARD}.expected":
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) + np.int32(1), t.name))
    logits, acc = artefact.session(fast.SerializeToString()).run([OUTPUT, OUTPUT_INT], {"image": _images(4).numpy()})
    assert np.isnan(logits).all() and (acc == np.iinfo(np.int32).min).all()
    if u8s8_exact():  # and the untouched guard lets the right outputs through
        good, _ = int8_weights(model)
        logits, acc = artefact.session(good.SerializeToString()).run([OUTPUT, OUTPUT_INT], {"image": _images(4).numpy()})
        q = built[0]
        acc_sim, _ = simulate(q, _images(4))
        assert np.array_equal(acc.astype(np.int64), acc_sim.numpy())


def test_the_artefact_holds_both_files_and_picks_for_this_cpu(built, tmp_path: Path) -> None:
    _, model, decl = built
    fast, _ = int8_weights(model)
    artefact.save_model(model, decl, tmp_path, {"vnni": fast})
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    entry = manifest["variants"]["vnni"]
    assert entry["model"] == "model_vnni.onnx" and entry["bytes"] == (tmp_path / "model_vnni.onnx").stat().st_size
    assert "VNNI" in entry["needs"]
    assert artefact.pick(tmp_path).name == ("model_vnni.onnx" if u8s8_exact() else "model.onnx")
    data = bytearray((tmp_path / "model_vnni.onnx").read_bytes())  # a damaged variant is refused by name
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "model_vnni.onnx").write_bytes(bytes(data))
    with pytest.raises(artefact.ArtefactError, match="model_vnni.onnx: damaged"):
        artefact.pick(tmp_path)
