"""AdaRound: the rounding variable, hard weights, per-unit improvement, resume, all granularities."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import adaround_block_unit, small_vit
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


def _linear_unit(seed: int = 0) -> tuple[nn.Module, Cached, Cached]:
    """A 3-bit AdaRound linear layer (float in, float out) with its inputs and float targets."""
    from ptq.quant.vit import QLinear

    torch.manual_seed(seed)
    lin = nn.Linear(32, 16)
    x = torch.randn(512, 32)
    ql = QLinear(lin.weight, lin.bias, 3)
    ql.wq = AdaRoundQuantizer(ql.weight, 3)
    return _FloatIn(ql), Cached(x), Cached(lin(x).detach())


def _state(unit: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in unit.state_dict().items()}


def test_training_beats_nearest_and_ends_binary(compose_cfg) -> None:
    """One layer unit trained long enough to early-stop: h all 0/1 and the error below nearest rounding's."""
    cfg = compose_cfg("wquant=adaround", "wbits=3", "aquant=none", "adaround.iters=2000", "adaround.batch_size=64",
                      "adaround.warmup=0.2", "adaround.reg_weight=1.0")
    unit, inputs, target = _linear_unit()
    nearest = unit.lin.wq(unit.lin.weight).clone()
    record, curve = train.train_unit("fc", unit, inputs, target, cfg, torch.device("cpu"), seed=0)
    assert not record["kept_nearest"]  # the learned rounding itself, not the fallback
    assert record["loss_after"] == train.unit_loss(unit, inputs, target, torch.device("cpu"))  # the unit as left
    assert record["loss_after"] < record["loss_before"]
    assert not torch.equal(unit.lin.wq(unit.lin.weight), nearest)  # rounding moved off nearest
    assert record["early_stopped"] and record["iters"] < 2000
    h = unit.lin.wq.h()
    assert ((h == 0) | (h == 1)).float().mean() > 0.999
    assert curve["step"][0] == 0 and len(curve["loss"]) == len(curve["beta"]) == len(curve["reg"])
    assert curve["beta"][-1] < curve["beta"][len(curve["beta"]) // 2] <= 20.0


def test_a_unit_that_trains_worse_keeps_nearest_rounding(compose_cfg) -> None:
    """A step size far too large scrambles the rounding: the unit goes back to nearest rounding, bit for bit,
    and its record says so with nearest rounding's loss."""
    cfg = compose_cfg("wquant=adaround", "wbits=3", "aquant=none", "adaround.iters=30", "adaround.lr=50",
                      "adaround.warmup=0", "adaround.early_stop=0")
    unit, inputs, target = _linear_unit()
    nearest = _state(unit)
    record, _ = train.train_unit("fc", unit, inputs, target, cfg, torch.device("cpu"), seed=0)
    assert record["kept_nearest"] and record["iters"] == 30
    after = _state(unit)
    assert after.keys() == nearest.keys() and all(torch.equal(after[k], nearest[k]) for k in nearest)
    assert record["loss_after"] == record["loss_before"] == train.unit_loss(unit, inputs, target, torch.device("cpu"))


def test_the_iteration_hook_sees_every_iteration_and_changes_nothing(compose_cfg) -> None:
    """``train_unit(on_iter=...)`` (the bench's clock) is called once per iteration; training is bit-identical."""
    cfg = compose_cfg("wquant=adaround", "wbits=3", "aquant=none", "adaround.iters=200", "adaround.batch_size=64",
                      "adaround.warmup=0.2")
    runs = []
    for hook in (None, []):
        unit, inputs, target = _linear_unit()
        record, curve = train.train_unit("fc", unit, inputs, target, cfg, torch.device("cpu"), seed=3,
                                         on_iter=None if hook is None else hook.append)
        runs.append(({k: v for k, v in record.items() if k != "seconds"}, curve, _state(unit), hook))
    (rec_a, curve_a, state_a, _), (rec_b, curve_b, state_b, calls) = runs
    assert rec_a == rec_b and curve_a == curve_b
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert calls == list(range(rec_b["iters"]))


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
def test_every_granularity_runs_and_learns(compose_cfg, tmp_path: Path, granularity: str,
                                           aquant: str) -> None:
    iters = 40  # every layer, block and encoder unit of the embedded default beats nearest rounding by then
    cfg = compose_cfg("debug=quick", "wquant=adaround", f"granularity={granularity}", "wbits=4", f"aquant={aquant}",
                      f"adaround.iters={iters}", "adaround.calib_images=64", "data.eval_images=128")
    run_dir = tmp_path / f"{granularity}-{aquant}"
    m = pipeline.run(cfg, run_dir)
    assert m["status"] == "ok" and m["row"]["granularity"] == granularity
    layers = 4  # the embedded default's depth
    expected = {"layer": 1 + 4 * layers + 1, "block": 2 + 2 * layers, "encoder": 2 + layers, "model": 1}[granularity]
    assert len(m["units"]) == len(m["curves"]) == expected
    # no unit ends worse than nearest rounding: the fallback and the improvement are tested on one unit above
    assert all(1 <= r["iters"] <= iters and r["seconds"] > 0 for r in m["units"])
    if granularity != "model":  # one logits-MSE unit: a few iterations rarely beat nearest, and fall back to it
        assert any(not r["kept_nearest"] and r["loss_after"] < r["loss_before"] for r in m["units"])
    assert (run_dir / "recon_checkpoint.pt").exists()
    assert m["recon_plot"] == "recon.png"
    assert (run_dir / "recon.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("init", ["float", "gptq"])
def test_resume_equals_uninterrupted(compose_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, init: str) -> None:
    args = ("debug=quick", "wquant=adaround", "granularity=block", "wbits=4", "adaround.iters=15",
            "data.eval_images=128", f"adaround.init={init}")
    full = pipeline.run(compose_cfg(*args, f"cache_dir={tmp_path / 'c_full'}"), tmp_path / "full")
    index = list((tmp_path / "c_full" / "recon").iterdir())  # written atomically: one whole file, no temporary
    assert len(index) == 1 and json.loads(index[0].read_text()) == {
        "checkpoint": str((tmp_path / "full" / "recon_checkpoint.pt").resolve()), "done": len(full["units"])}

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
    def errors(m: dict) -> list:
        return [(r["name"], r["err_gptq"], r["err_nearest"]) for r in m.get("gptq_layers", [])]

    assert errors(resumed) == errors(full) and bool(errors(full)) == (init == "gptq")  # the start's records kept


def test_resume_key_follows_the_calibration_spec(compose_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    """The resume key holds the calibration stage's own cache key: a calibration option added later changes it
    without a second list of fields to forget."""
    from ptq import calib
    from ptq.runspec import settings_of

    base = ("wquant=adaround", "granularity=block", "wbits=4")

    def key(*overrides: str) -> str:
        cfg = compose_cfg(*base, *overrides)
        return adaround.resume_key(cfg, QuantViT(small_vit(layers=1), settings_of(cfg)))

    k = key()
    assert key() == k
    real = calib.calibration_spec
    monkeypatch.setattr(adaround, "calibration_spec", lambda cfg, q: {**real(cfg, q), "option_added_later": 1})
    assert key() != k
    monkeypatch.undo()
    changed = [key(o) for o in ("aquant.calib_batch_size=64", "aquant.calib_images=512", "aquant.momentum=0.9",
                                "aquant.quant_io=false", "aquant=mse", "aquant.kernel_in_bits=8", "adaround.lr=3e-3",
                                "lsq.enabled=false", "seed=1")]
    assert len({k, *changed}) == len(changed) + 1


def test_compiled_training_step_runs_and_learns(compose_cfg, tmp_path: Path) -> None:
    """adaround.compile (the default outside debug=quick) on the fp backend: same pipeline, compiled loss."""
    cfg = compose_cfg("debug=quick", "wquant=adaround", "granularity=block", "wbits=4", "adaround.compile=true",
                      "adaround.iters=60", "data.eval_images=128")
    assert train.loss_function(cfg) is not train.unit_step_loss
    assert torch._dynamo.config.recompile_limit >= train.RECOMPILE_LIMIT  # sweep jobs share the process
    m = pipeline.run(cfg, tmp_path / "compiled")
    assert m["status"] == "ok" and len(m["units"]) == 10
    assert any(r["loss_after"] < r["loss_before"] for r in m["units"])
    # the ivit backend's compiled step (integer kernels as opaque ops inside) is compared with the eager one below


@pytest.mark.parametrize(("backend", "kind"), [("fp", "mlp"), ("ivit", "mlp"), ("ivit", "attn")])
def test_compiled_step_trains_as_the_eager_step(compose_cfg, backend: str, kind: str,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """One block unit trained by the compiled step and by the eager one, from the same state on the same
    batches: the same loss and regularizer at every logged step (to float rounding) and the same rounding
    (ivit: ShiftGELU in the MLP, Shiftmax and I-LayerNorm in attention, as opaque ops in the graph)."""
    args = ("debug=quick", "wquant=adaround", "granularity=block", "wbits=4", f"nonlinear={backend}",
            "adaround.iters=40", "adaround.early_stop=0")
    compiled, eager = compose_cfg(*args, "adaround.compile=true"), compose_cfg(*args, "adaround.compile=false")
    assert train.loss_function(compiled) is not train.unit_step_loss
    cpu = torch.device("cpu")
    q, _, _, inputs, targets = adaround_block_unit(compiled, kind)
    results = []
    for cfg in (compiled, eager):
        unit = copy.deepcopy(getattr(q.blocks[1], kind))
        record, curve = train.train_unit(f"blocks.1.{kind}", unit, inputs, targets, cfg, cpu, seed=1)
        results.append((record, curve, unit))
    assert "torch.compile failed" not in caplog.text  # else both runs were eager
    (rec_c, curve_c, unit_c), (rec_e, curve_e, unit_e) = results
    assert curve_c["step"] == curve_e["step"] and rec_c["iters"] == rec_e["iters"] == 40
    # the first step: same state, same batch, so the same loss to float rounding
    assert curve_c["loss"][0] == pytest.approx(curve_e["loss"][0], rel=1e-5)
    assert curve_c["reg"][0] == pytest.approx(curve_e["reg"][0], rel=1e-5)
    # then the same training: the loss falls by 10-20 % in 40 steps; the two runs stay within 1 % of each other
    # (an integer kernel's output can flip on a float-rounding difference, so not bit for bit)
    assert curve_c["loss"][-1] < 0.9 * curve_c["loss"][0]
    torch.testing.assert_close(torch.tensor(curve_c["loss"]), torch.tensor(curve_e["loss"]), rtol=1e-2, atol=0)
    torch.testing.assert_close(torch.tensor(curve_c["reg"]), torch.tensor(curve_e["reg"]), rtol=1e-3, atol=1e-6)
    assert rec_c["loss_after"] == pytest.approx(rec_e["loss_after"], rel=1e-2)
    quantizers = [(n, m) for n, m in unit_c.named_modules() if isinstance(m, AdaRoundQuantizer)]
    assert len(quantizers) == 2  # qkv and proj, or fc1 and fc2
    for name, qc in quantizers:
        same = qc.rounding() == unit_e.get_submodule(name).rounding()
        assert same.float().mean() > 0.99, name


def test_denormals_flush_only_while_reconstructing() -> None:
    denormal = torch.tensor([1e-39])  # below float32's smallest normal (1.2e-38)
    supported = torch.set_flush_denormal(True)
    torch.set_flush_denormal(False)
    assert (denormal * 1.0).item() > 0.0
    with train.flush_denormals():
        assert ((denormal * 1.0).item() == 0.0) == supported
    assert (denormal * 1.0).item() > 0.0
