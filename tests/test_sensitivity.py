"""python -m ptq.sensitivity: quantizer groups of the embedded default, the two temporary changes, the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from conftest import CONF, ROOT
from ptq import pipeline
from ptq.calib import calibration_stats
from ptq.data import build as data_build
from ptq.models.zoo import load_model
from ptq.quant.groups import ROLES, WEIGHT_KINDS, act_role, groups, left_float, raisable, raised
from ptq.quant.quantizers import ActQuantizer
from ptq.quant.vit import QuantViT
from ptq.runspec import settings_of
from ptq.sensitivity import scan
from ptq.sensitivity.scan import RESULT_KEYS

W4A4_IVIT = ("nonlinear=ivit", "wbits=4", "abits=4", "aquant=mse", "aquant.kernel_in_bits=8")


def _calibrated(cfg: DictConfig) -> tuple[QuantViT, torch.nn.Module, torch.Tensor]:
    """The config's calibrated QuantViT of the embedded default, its float model, 16 test images."""
    device, cache = pipeline.setup(cfg)
    fp = load_model(cfg)
    calib_source, eval_split = data_build.splits(cfg)
    images = torch.stack([eval_split[i][0] for i in range(16)])
    return pipeline.calibrated(cfg, fp, calib_source, device, cache, {}), fp, images


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache_dir for the module: the CLI runs reuse the fused kernels torch.compile built in-process."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def w4a4(cache: Path) -> tuple[QuantViT, torch.nn.Module, torch.Tensor]:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"cache_dir={cache}", "debug=quick", *W4A4_IVIT])
    return _calibrated(cfg)


@pytest.mark.parametrize("overrides", [W4A4_IVIT, ("nonlinear=fp", "wbits=4", "abits=4")], ids=["ivit", "fp"])
def test_groups_cover_every_quantizer(compose_cfg: Callable[..., DictConfig], overrides: tuple[str, ...]) -> None:
    cfg = compose_cfg("debug=quick", *overrides)
    q = QuantViT(load_model(cfg), settings_of(cfg))
    gs = groups(q)
    assert [g.name for g in gs] == [*ROLES, *(f"weights.{k}" for k in WEIGHT_KINDS), "blocks.0", "blocks.1",
                                    "blocks.2", "blocks.3"]
    acts = {q_.name for q_ in q.act_quantizers() if q_.enabled}
    linears = {m.name for m in q.linears() if m.wq is not None}
    assert len(acts) == 4 * 12 + 3 and len(linears) == 4 * 4 + 2
    by_kind = {k: [g for g in gs if g.kind == k] for k in ("role", "weights", "block")}
    role_acts = [a.name for g in by_kind["role"] for a in g.acts]
    weight_lins = [m.name for g in by_kind["weights"] for m in g.linears]
    assert sorted(role_acts) == sorted(acts) and sorted(weight_lins) == sorted(linears)  # each exactly once
    assert not any(g.linears for g in by_kind["role"]) and not any(g.acts for g in by_kind["weights"])
    for g in by_kind["block"]:  # a block holds everything inside it: 12 activation and 4 weight quantizers
        assert g.members == 16 and all(x.name.startswith(g.name + ".") for x in (*g.acts, *g.linears))
    probs, scores = next(g for g in gs if g.name == "probs"), next(g for g in gs if g.name == "scores")
    ivit = cfg.nonlinear.name == "ivit"
    assert len(probs.shiftmax) == (4 if ivit else 0) and len(scores.fallback) == (4 if ivit else 0)
    assert all(not g.fallback for g in by_kind["block"]) and all(len(g.shiftmax) == ivit for g in by_kind["block"])
    assert {act_role(n) for n in acts} == set(ROLES)
    # quant_io=false: the input and final LayerNorm quantizers are disabled, so their groups are empty
    cfg = compose_cfg("debug=quick", "aquant.quant_io=false", *overrides)
    empty = [g.name for g in groups(QuantViT(load_model(cfg), settings_of(cfg))) if g.members == 0]
    assert empty == ["input", "final_ln"]


def _state(q: QuantViT) -> list[object]:
    """Every setting the contexts touch: bits, step, mode of each activation quantizer; weight quantizers; backends."""
    acts = [(a.bits, a.mode, a.scale.detach().clone()) for a in q.act_quantizers()]
    return [acts, [m.wq for m in q.linears()], [b.attn.backend for b in q.blocks]]


def _same_state(a: list[object], b: list[object]) -> bool:
    return (all(x[:2] == y[:2] and torch.equal(x[2], y[2]) for x, y in zip(a[0], b[0], strict=True))
            and all(x is y for x, y in zip(a[1], b[1], strict=True)) and a[2] == b[2])


def test_both_contexts_restore_the_model_bit_for_bit(w4a4: tuple[QuantViT, torch.nn.Module, torch.Tensor]) -> None:
    q, fp, images = w4a4
    with torch.no_grad():
        before, state = q(images), _state(q)
        for g in groups(q):
            for ctx in (left_float(g), raised(g, 8)):
                with ctx:
                    changed = q(images)
                assert _same_state(state, _state(q)), g.name
            if g.kind == "block":  # a block's quantizers change the logits either way
                assert not torch.equal(changed, before), g.name
        assert torch.equal(q(images), before)
        with ExitStack() as stack:  # every group float at once: the float model, run by QuantViT's float path
            for g in groups(q):
                stack.enter_context(left_float(g))
            assert all(a.mode == "off" for a in q.act_quantizers()) and all(m.wq is None for m in q.linears())
            torch.testing.assert_close(q(images), fp(images), atol=1e-4, rtol=1e-4)
        assert torch.equal(q(images), before)


def test_raising_a_group_widens_it_and_its_steps(w4a4: tuple[QuantViT, torch.nn.Module, torch.Tensor]) -> None:
    q, _, _ = w4a4
    by_name = {g.name: g for g in groups(q)}
    v, qkv = by_name["v"], by_name["weights.qkv"]
    steps = [a.scale.detach().clone() for a in v.acts]
    assert all(a.bits == 4 for a in v.acts) and all(m.wq.bits == 4 for m in qkv.linears)
    with raised(v, 8), raised(qkv, 8):
        assert all(a.bits == 8 and a.mode == "quant" for a in v.acts)
        # calibration's histogram at 8 bits: a much finer step than the 4-bit one
        assert all(float(a.scale) < float(s) / 4 for a, s in zip(v.acts, steps, strict=True))
        assert all(m.wq.bits == 8 for m in qkv.linears)
    assert all(a.bits == 4 and torch.equal(a.scale, s) for a, s in zip(v.acts, steps, strict=True))
    # already at 8 bits or wider: nothing to raise (INT8 kernel inputs, 16-bit residual, UINT8 Shiftmax)
    assert raisable(by_name["scores"], 8) == raisable(by_name["residual"], 8) == raisable(by_name["probs"], 8) == 0
    assert raisable(v, 8) == 4 and raisable(by_name["blocks.0"], 8) == 11  # 7 activations at A4, 4 linears at W4
    # probs raised in ivit: the Shiftmax's output width (log2 codes off); left float: the float softmax
    probs = by_name["probs"]
    old = [a.backend for a in probs.shiftmax]
    with raised(probs, 12):
        assert all(a.backend.softmax_out_bits == 12 and not a.backend.softmax_log2 for a in probs.shiftmax)
    assert [a.backend for a in probs.shiftmax] == old
    with left_float(by_name["scores"]):  # the float softmax's output quantized at the Shiftmax's width
        assert all(a.probs_q.bits == a.backend.probs_bits and a.probs_q.mode == "quant" for a in probs.shiftmax)
    assert all(isinstance(a.probs_q, ActQuantizer) and a.probs_q.bits == 4 for a in probs.shiftmax)


def test_raising_every_group_is_the_config_at_those_widths(w4a4: tuple[QuantViT, torch.nn.Module, torch.Tensor]) -> None:
    """Weights (roles) all raised to 8 bits = the W8A4 (W4A8) QuantViT with the same calibration statistics."""
    q, fp, images = w4a4
    stats = calibration_stats(q)
    for wbits, abits, kind in [(8, 4, "weights"), (4, 8, "role")]:
        ref = QuantViT(fp, dataclasses.replace(q.settings, wbits=wbits, abits=abits))
        ref.load_state_dict(stats, strict=False)
        ref.freeze()
        with torch.no_grad(), ExitStack() as stack:
            for g in groups(q):
                if g.kind == kind:
                    stack.enter_context(raised(g, 8))
            assert torch.equal(q(images), ref(images)), kind


ENV = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}


def _sensitivity(tmp_path: Path, cache: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ptq.sensitivity", f"hydra.run.dir={tmp_path / 'run'}", f"cache_dir={cache}",
           "debug=quick", *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)


def test_cli_writes_metrics_chart_and_table(tmp_path: Path, cache: Path) -> None:
    extra = tmp_path / "docs" / "chart.png"
    # the fixture's configuration (its compiled kernels are in the shared cache), as AdaRound, without I/O quantizers
    proc = _sensitivity(tmp_path, cache, "sensitivity.eval_images=32", *W4A4_IVIT, "wquant=adaround",
                        "aquant.quant_io=false", f"sensitivity.plot={extra}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["n_eval"] == 32 and metrics["error"] is None
    assert metrics["name"].startswith("W4A4-adaround") and "no AdaRound" in metrics["rounding"]
    recs = {r["group"]: r for r in metrics["groups"]}
    assert set(recs) == {*ROLES, *(f"weights.{k}" for k in WEIGHT_KINDS), *(f"blocks.{i}" for i in range(4))}
    assert recs["input"]["skipped"] and recs["final_ln"]["skipped"] and recs["scores"]["members"] == 4
    assert all(set(RESULT_KEYS) <= set(r) for r in metrics["groups"])
    base = metrics["baseline"]["acc1"]
    for r in metrics["groups"]:
        if not r.get("skipped"):
            assert r["cost_float"] == pytest.approx(r["float_acc1"] - base)
            assert r["cost_high"] == pytest.approx(r["high_acc1"] - base)
    costs = [r["cost_float"] for r in metrics["groups"] if not r.get("skipped")]
    assert costs == sorted(costs, reverse=True)
    for png in (run / "sensitivity.png", extra):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = [ln for ln in proc.stdout.splitlines() if ln.startswith("|")]
    assert len(table) == 2 + 2 + len(recs) and "nearest rounding: no AdaRound" in table[3]


def test_a_bad_value_exits_2_in_one_line(tmp_path: Path, cache: Path) -> None:
    proc = _sensitivity(tmp_path, cache, "sensitivity.eval_images=0")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("ptq: config error: "), proc.stderr
    assert "sensitivity.eval_images" in lines[0] and not (tmp_path / "run" / "metrics.json").exists()


def test_a_failure_is_recorded_as_failed(compose_cfg: Callable[..., DictConfig], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(scan, "scan_groups", boom)
    cfg = compose_cfg("debug=quick", "sensitivity.eval_images=16", "wbits=4", "abits=4")
    with pytest.raises(RuntimeError, match="boom"):
        scan.run(cfg, tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["error"] == "RuntimeError: boom" and "groups" not in metrics


def test_a_finished_run_is_scanned_as_reconstructed(compose_cfg: Callable[..., DictConfig], tmp_path: Path,
                                                    cache: Path) -> None:
    """``sensitivity.run=RUN_DIR``: the run's own model (GPTQ's codes here, not nearest rounding) and
    config; its baseline is the run's top-1 and KL on the same images; groups are only left float."""
    run = tmp_path / "gptq_run"
    proc = subprocess.run([sys.executable, "-m", "ptq.main", f"hydra.run.dir={run}", f"cache_dir={cache}", "debug=quick",
                           "wquant=gptq", "data.eval_images=64", *W4A4_IVIT], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = json.loads((run / "metrics.json").read_text())
    metrics = scan.run(compose_cfg(f"sensitivity.run={run}", "sensitivity.eval_images=64", f"cache_dir={cache}"),
                       tmp_path / "scan")
    assert metrics["status"] == "ok" and metrics["name"] == done["name"] and metrics["rounding"] is None
    assert metrics["baseline"]["acc1"] == pytest.approx(done["acc1"]) and metrics["baseline"]["kl"] == pytest.approx(
        done["kl"], rel=1e-5)
    measured = [r for r in metrics["groups"] if not r.get("skipped")]
    assert measured and all(r["high_acc1"] is None and r["raised"] == 0 for r in measured)
    assert any(r["float_kl"] < metrics["baseline"]["kl"] for r in measured)  # something still costs after GPTQ
    from ptq.sensitivity import report

    assert "not measured (finished run)" in report.markdown(metrics)
    bad = _sensitivity(tmp_path, cache, f"sensitivity.run={tmp_path / 'nowhere'}")
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and "sensitivity.run" in lines[0] and "not a directory" in lines[0]
