"""Integer-only execution (ptq.intexec): bit-exact against the simulation, integer dtypes, artefact, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import ROOT, small_vit
from ptq.intexec.build import MATMUL_KINDS, build_program
from ptq.intexec.interp import INT_DTYPES, ArtefactError, Interpreter, save_program, validate_graph
from ptq.intexec.rebuild import save_run_state
from ptq.intexec.verify import (
    check_exportable,
    diff_trace,
    export_and_verify,
    main,
    simulate,
    verify_program,
)
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


@pytest.mark.parametrize("wbits", [8, 4])
def test_program_equals_simulation_bit_for_bit(wbits: int, w8a8: QuantViT) -> None:
    if wbits == 8:
        q = w8a8
    else:  # W4A8 with AdaRound rounding that is not nearest rounding
        q = QuantViT(small_vit(layers=2, seed=3), QuantSettings(wbits=4, abits=8, backend=Backend("ivit")))
        assert _randomise_adaround(q) > 0.2
        _calibrate(q, _images(32, seed=0))
    program = build_program(q)
    weights = [c for c in program.graph["constants"].values() if c["role"] == "weight"]
    assert weights and all(c["bits"] == wbits and c["dtype"] == "int8" for c in weights)
    assert all(int(program.tensors[n].abs().max()) <= 2 ** (wbits - 1)
               for n, c in program.graph["constants"].items() if c["role"] == "weight")
    images = _images(48)
    res = verify_program(q, program, images, batch_size=24)
    assert (res["exact"], res["mismatches"], res["n"]) == (True, 0, 48)
    # every intermediate the simulation names is equal too, not only the head
    rows = diff_trace(q, program, images[:8])
    assert len(rows) > 30 and all(r["differ"] == 0 for r in rows)
    summary = res["widths"]["summary"]
    assert set(summary["matmuls"]) == set(MATMUL_KINDS)
    assert summary["matmuls"]["qkv"]["layers"] == 2 and summary["all_accumulators_fit_int32"]
    assert summary["matmuls"]["head"]["max_abs"] > 0


def test_values_between_quantize_and_dequantize_are_integers(w8a8: QuantViT) -> None:
    program = build_program(w8a8)
    seen: list[tuple[str, str, torch.dtype]] = []
    out = Interpreter(program).run(_images(4), hook=lambda op, v: seen.append((op["op"], op["out"], v.dtype)))
    assert [s[1] for s in seen] == [op["out"] for op in program.ops]
    assert seen[0][0] == "quantize" and seen[-1][0] == "dequantize"
    assert all(dtype in INT_DTYPES for _, _, dtype in seen[:-1]), [s for s in seen if s[2] not in INT_DTYPES]
    assert seen[-1][2] == torch.float32
    acc, logits = simulate(w8a8, _images(4))
    assert torch.equal(out["head.fc.acc"], acc) and torch.equal(out["logits"], logits)


def test_artefact_reloads_in_a_fresh_process_without_model_code(w8a8: QuantViT, tmp_path: Path) -> None:
    art = save_program(build_program(w8a8, {"normalisation": {"mean": [0.5] * 3, "std": [0.25] * 3}}), tmp_path / "art")
    graph = json.loads((art / "program.json").read_text())
    assert graph["input"]["normalisation"]["std"] == [0.25] * 3
    req = [op for op in graph["ops"] if op["op"] == "requantize"]
    assert req and all(isinstance(op["m"], (int, list)) and "e" in op and "clamp_bits" in op for op in req)
    assert {op["op"] for op in graph["ops"]} >= {"shiftmax", "shift_gelu", "layernorm", "matmul", "linear"}
    validate_graph(graph)
    with pytest.raises(ArtefactError, match="not defined before"):
        validate_graph({**graph, "ops": graph["ops"][1:]})
    images = _images(8)
    torch.save(images, tmp_path / "images.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        from ptq.intexec.interp import Interpreter, load_program
        logits = Interpreter(load_program({str(art)!r})).logits(torch.load({str(tmp_path / 'images.pt')!r}))
        torch.save(logits, {str(tmp_path / 'logits.pt')!r})
        loaded = [m for m in ("torchvision", "ptq.quant.vit", "ptq.quant.quantizers", "ptq.intexec.build") if m in sys.modules]
        assert not loaded, loaded
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    _, expected = simulate(w8a8, images)
    assert torch.equal(torch.load(tmp_path / "logits.pt").view(torch.int32), expected.view(torch.int32))


def test_export_and_verify_and_the_cli(compose_cfg, tmp_path: Path, capsys: pytest.CaptureFixture,
                                       caplog: pytest.LogCaptureFixture) -> None:
    """A W4A8 AdaRound run dir on the tiny-digits architecture (random weights): exact, then tampered."""
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
    assert (run / "intexec" / "widths.json").is_file() and res["widths"]["all_accumulators_fit_int32"]

    assert main([str(run), "--images", "4"]) == 0  # rebuilds from quant_state.pt (AdaRound), verifies the artefact
    assert capsys.readouterr().out.strip() == "mismatches=0/4"
    graph_file = run / "intexec" / "program.json"
    graph = json.loads(graph_file.read_text())
    op = next(o for o in graph["ops"] if o["out"] == "head.ln_q")
    op["e"] = [e - 1 for e in op["e"]]  # doubles the final LayerNorm's requantization
    graph_file.write_text(json.dumps(graph))
    assert main([str(run), "--images", "4"]) == 1
    k, n = capsys.readouterr().out.strip().removeprefix("mismatches=").split("/")
    assert int(k) > 0 and int(n) == 4
    tensors = run / "intexec" / "tensors.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0xFF  # one bit pattern of one constant
    tensors.write_bytes(bytes(data))
    assert main([str(run), "--images", "4"]) == 2  # checksum mismatch: refused before running
    # the module entry point exits with main's status (here: a run dir without quant_state.pt)
    proc = subprocess.run([sys.executable, "-m", "ptq.intexec", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "quant_state.pt not found" in proc.stderr and proc.stdout == ""
    # a state that is not the run's (its logits fingerprint differs) is refused, not verified
    with torch.no_grad():
        save_run_state(q, cfg, run, q(first) + 1)
    assert main([str(run), "--images", "4", "--reexport"]) == 2
    assert "does not reproduce the run's logits" in caplog.text


def test_program_equals_simulation_at_wide_activations() -> None:
    st = QuantSettings(wbits=8, abits=16, backend=Backend("ivit", gelu_sig_bits=16))
    q = _calibrate(QuantViT(small_vit(layers=2), st), _images(32, seed=0))
    rows = diff_trace(q, build_program(q), _images(32))
    assert [r for r in rows if r["differ"]] == []


def test_refuses_models_that_are_not_integer_only(compose_cfg) -> None:
    from ptq.config import ConfigError

    q = _calibrate(QuantViT(small_vit(layers=1), QuantSettings(backend=Backend("fp"))), _images(4))
    with pytest.raises(ValueError, match="ivit"):
        build_program(q)
    with pytest.raises(ConfigError, match="quant_io"):
        check_exportable(compose_cfg("nonlinear=ivit", "aquant.quant_io=false"))


def test_needed_bits() -> None:
    assert needed_bits(-128, 127, True) == 8 and needed_bits(-129, 0, True) == 9 and needed_bits(0, 128, True) == 9
    assert needed_bits(0, 255, False) == 8 and needed_bits(0, 0, True) == 1
    assert needed_bits(-(2**31), 2**31 - 1, True) == 32
