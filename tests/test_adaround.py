"""AdaRound: the rounding variable, hard weights, per-unit improvement, resume, all granularities."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import small_vit
from ptq import pipeline
from ptq.quant.quantizers import WeightQuantizer, channel_view
from ptq.quant.rounding import AdaRoundQuantizer
from ptq.quant.vit import QuantSettings, QuantViT
from ptq.recon import adaround, train
from ptq.recon.adaround import units_of
from ptq.recon.unitcache import Cached


def test_h_starts_at_the_fractional_part_and_hard_is_nearest() -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 12)
    q = AdaRoundQuantizer(w, 4)
    w_s = w / channel_view(q.scale, w)
    torch.testing.assert_close(q.h(), w_s - torch.floor(w_s), atol=1e-5, rtol=0)
    assert torch.equal(q(w), WeightQuantizer(w, 4)(w))  # untrained hard rounding = nearest (no exact ties here)


def test_hard_weights_are_floor_plus_binary_rounding() -> None:
    torch.manual_seed(0)
    w = torch.randn(6, 10)
    q = AdaRoundQuantizer(w, 3)
    with torch.no_grad():
        q.v.normal_(0, 3)  # arbitrary learned state
    r = q.rounding()
    assert set(r.unique().tolist()) <= {0.0, 1.0}
    expected = channel_view(q.scale, w) * torch.clamp(q.w_floor + r, -4, 3)
    assert torch.equal(q(w) * channel_view(q.scale, w), expected)
    q.soft = True
    assert not q.integer and not torch.equal(q(w), q(w).round())


def test_regularizer_is_zero_only_at_binary_h() -> None:
    q = AdaRoundQuantizer(torch.randn(4, 4), 4)
    with torch.no_grad():
        q.v.fill_(10.0)  # h clamps to 1
    assert q.regularizer(2.0).item() == 0.0
    with torch.no_grad():
        q.v.fill_(0.0)  # h = 0.5: maximal
    assert q.regularizer(2.0).item() == pytest.approx(16.0)


@pytest.mark.parametrize(("granularity", "count"), [("layer", 1 + 4 * 2 + 1), ("block", 2 + 2 * 2), ("encoder", 2 + 2), ("model", 1)])
def test_units_in_network_order(granularity: str, count: int) -> None:
    q = QuantViT(small_vit(layers=2), QuantSettings())
    names = [n for n, _ in units_of(q, granularity)]
    assert len(names) == count
    if granularity == "layer":
        assert names[:3] == ["embed.proj", "blocks.0.attn.qkv", "blocks.0.attn.proj"] and names[-1] == "head.fc"


def test_training_beats_nearest_and_ends_binary(compose_cfg) -> None:
    """One layer unit trained long enough to early-stop: h all 0/1 and the error below nearest rounding's."""
    cfg = compose_cfg("wquant=adaround", "wbits=3", "aquant=none", "adaround.iters=2000", "adaround.batch_size=64",
                      "adaround.warmup=0.2", "adaround.reg_weight=1.0")
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    x = torch.randn(512, 32)
    target = Cached(lin(x).detach())
    from ptq.quant.vit import QLinear

    ql = QLinear(lin.weight, lin.bias, 3)
    ql.wq = AdaRoundQuantizer(ql.weight, 3)
    inputs = Cached(x)
    record, curve = train.train_unit("fc", _FloatIn(ql), inputs, target, cfg, torch.device("cpu"), seed=0)
    assert record["loss_after"] < record["loss_before"]
    assert record["early_stopped"] and record["iters"] < 2000
    h = ql.wq.h()
    assert ((h == 0) | (h == 1)).float().mean() > 0.999
    assert curve["step"][0] == 0 and len(curve["loss"]) == len(curve["beta"]) == len(curve["reg"])
    assert curve["beta"][-1] < curve["beta"][len(curve["beta"]) // 2] <= 20.0


class _FloatIn(nn.Module):
    """Feeds a float tensor to a QLinear as a QTensor and returns the real output."""

    def __init__(self, lin: nn.Module) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ptq.quant.qtensor import QTensor

        return self.lin(QTensor.from_float(x)).real()


@pytest.mark.parametrize("aquant", ["movavg", "none"])
@pytest.mark.parametrize("granularity", ["layer", "block", "encoder", "model"])
def test_every_granularity_runs_and_no_unit_gets_worse(compose_cfg, tmp_path: Path, granularity: str,
                                                       aquant: str) -> None:
    cfg = compose_cfg("debug=quick", "wquant=adaround", f"granularity={granularity}", "wbits=4", f"aquant={aquant}",
                      "adaround.iters=150", "adaround.calib_images=64", "data.eval_images=128")
    run_dir = tmp_path / f"{granularity}-{aquant}"
    m = pipeline.run(cfg, run_dir)
    assert m["status"] == "ok" and m["row"]["granularity"] == granularity
    layers = 4  # the embedded default's depth
    expected = {"layer": 1 + 4 * layers + 1, "block": 2 + 2 * layers, "encoder": 2 + layers, "model": 1}[granularity]
    assert len(m["units"]) == len(m["curves"]) == expected
    for r in m["units"]:
        assert r["loss_after"] <= r["loss_before"] * 1.0001 + 1e-6, r
        assert r["iters"] >= 1 and r["seconds"] >= 0
    if granularity != "model":  # one logits-MSE unit: 150 iterations rarely beat nearest, and fall back to it
        assert any(not r["kept_nearest"] and r["loss_after"] < r["loss_before"] for r in m["units"])
    assert (run_dir / "recon_checkpoint.pt").exists()
    assert m["recon_plot"] == "recon.png"
    assert (run_dir / "recon.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_equals_uninterrupted(compose_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = ("debug=quick", "wquant=adaround", "granularity=block", "wbits=4", "adaround.iters=15",
            "data.eval_images=128")
    full = pipeline.run(compose_cfg(*args, f"cache_dir={tmp_path / 'c_full'}"), tmp_path / "full")

    real_train = adaround.train_unit
    calls = {"n": 0}

    def crash_after_three(*a, **k):
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated crash")
        calls["n"] += 1
        return real_train(*a, **k)

    cfg = compose_cfg(*args, f"cache_dir={tmp_path / 'c_resume'}")
    monkeypatch.setattr(adaround, "train_unit", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(cfg, tmp_path / "first")
    assert json.loads((tmp_path / "first" / "metrics.json").read_text())["status"] == "failed"
    monkeypatch.setattr(adaround, "train_unit", real_train)
    resumed = pipeline.run(cfg, tmp_path / "second")
    assert resumed["resumed_units"] == 3
    for key in ("acc1", "acc5", "agreement", "kl"):
        assert resumed[key] == full[key], key
    assert [r["loss_after"] for r in resumed["units"]] == [r["loss_after"] for r in full["units"]]


def test_compiled_training_step_runs_and_learns(compose_cfg, tmp_path: Path) -> None:
    """adaround.compile (the default outside debug=quick) on the fp backend: same pipeline, compiled loss."""
    cfg = compose_cfg("debug=quick", "wquant=adaround", "granularity=block", "wbits=4", "adaround.compile=true",
                      "adaround.iters=60", "data.eval_images=128")
    assert train.loss_function(cfg) is not train.unit_step_loss
    assert torch._dynamo.config.recompile_limit >= train.RECOMPILE_LIMIT  # sweep jobs share the process
    m = pipeline.run(cfg, tmp_path / "compiled")
    assert m["status"] == "ok" and len(m["units"]) == 10
    assert any(r["loss_after"] < r["loss_before"] for r in m["units"])
    ivit = compose_cfg("debug=quick", "wquant=adaround", "granularity=block", "wbits=4", "nonlinear=ivit",
                       "adaround.compile=true", "adaround.iters=40", "data.eval_images=128")
    assert train.loss_function(ivit) is not train.unit_step_loss  # integer kernels: opaque ops inside
    m = pipeline.run(ivit, tmp_path / "compiled_ivit")
    assert m["status"] == "ok" and len(m["units"]) == 10
    assert any(r["loss_after"] < r["loss_before"] for r in m["units"])


def test_denormals_flush_only_while_reconstructing() -> None:
    denormal = torch.tensor([1e-39])  # below float32's smallest normal (1.2e-38)
    supported = torch.set_flush_denormal(True)
    torch.set_flush_denormal(False)
    assert (denormal * 1.0).item() > 0.0
    with train.flush_denormals():
        assert ((denormal * 1.0).item() == 0.0) == supported
    assert (denormal * 1.0).item() > 0.0
