"""QDrop (``adaround.qdrop_prob``) and the Fisher-weighted reconstruction loss (``adaround.loss=fisher``)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import adaround_block_unit
from ptq import pipeline
from ptq.quant.qtensor import QTensor
from ptq.quant.quantizers import ActQuantizer
from ptq.recon import adaround, train, unitcache

CPU = torch.device("cpu")


def _block_unit(compose_cfg, backend: str, kind: str, *extra: str):
    """A calibrated W4A8 model with AdaRound installed, its float twin, images and one block unit's caches."""
    cfg = compose_cfg("debug=quick", "wquant=adaround", "granularity=block", "wbits=4", f"nonlinear={backend}",
                      "adaround.iters=12", "adaround.early_stop=0", *extra)
    return (cfg, *adaround_block_unit(cfg, kind))


def _states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_qdrop_zero_trains_bit_for_bit_as_without_qdrop(compose_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    """``qdrop_prob=0`` draws no mask and runs the fake quantization alone: the same curve and the same
    rounding and steps as the training step with the QDrop code taken out."""
    cfg, q, _, _, inputs, targets = _block_unit(compose_cfg, "ivit", "attn", "adaround.qdrop_prob=0")
    runs = []
    for without_qdrop in (False, True):
        with monkeypatch.context() as m:
            if without_qdrop:  # the step as it was before QDrop existed
                m.setattr(ActQuantizer, "_drop", lambda self, real, s, quant: quant)
            else:  # and qdrop_prob=0 never draws a mask
                m.setattr(torch, "rand_like", lambda *a, **k: pytest.fail("qdrop_prob=0 drew a QDrop mask"))
            unit = copy.deepcopy(q.blocks[1].attn)
            record, curve = train.train_unit("blocks.1.attn", unit, inputs, targets, cfg, CPU, seed=1)
        runs.append((record, curve, unit))
    (rec_a, curve_a, unit_a), (rec_b, curve_b, unit_b) = runs
    assert curve_a == curve_b and rec_a["loss_after"] == rec_b["loss_after"]
    assert _states_equal(unit_a, unit_b)


def test_qdrop_passes_float_values_of_matmul_operands_only_while_training(compose_cfg,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """At 0.5, about half the elements of every quantizer feeding a matmul are float while training; the
    inputs of Shiftmax / I-LayerNorm (scores, residual stream) stay integer; evaluation is untouched."""
    cfg, q, _, _, inputs, targets = _block_unit(compose_cfg, "ivit", "attn", "adaround.qdrop_prob=0.5")
    unit = copy.deepcopy(q.blocks[1].attn)
    fractions: dict[str, list[float]] = {}

    emit = ActQuantizer._emit

    def spy(self: ActQuantizer, v: torch.Tensor, s: torch.Tensor) -> QTensor:  # every output, residual adds too
        if torch.is_grad_enabled():
            fractions.setdefault(self.name.rsplit(".", 1)[-1], []).append(float((v != v.round()).float().mean()))
        return emit(self, v, s)

    monkeypatch.setattr(ActQuantizer, "_emit", spy)
    reference = copy.deepcopy(unit)
    _, curve = train.train_unit("blocks.1.attn", unit, inputs, targets, cfg, CPU, seed=1)
    for role in ("ln_q", "q_q", "k_q", "v_q", "ctx_q"):
        assert 0.4 < min(fractions[role]) and max(fractions[role]) < 0.6, (role, fractions[role])
    for role in ("scores_q", "res_q"):  # integer kernels read these: never dropped
        assert max(fractions[role]) == 0.0, role
    assert all(a.qdrop == 0.0 for a in unit.modules() if isinstance(a, ActQuantizer))
    with torch.no_grad():  # evaluation after training: integers only
        out = unit(inputs.take(torch.arange(16), CPU))
    assert torch.equal(out.v, out.v.round())
    _, curve_plain = train.train_unit("blocks.1.attn", reference, inputs, targets,
                                      compose_cfg("debug=quick", "wquant=adaround", "granularity=block", "wbits=4",
                                                  "nonlinear=ivit", "adaround.iters=12", "adaround.early_stop=0"),
                                      CPU, seed=1)
    assert curve["loss"] != curve_plain["loss"]  # the dropped elements changed the training


def test_fisher_weights_are_the_squared_task_gradient_normalised(compose_cfg) -> None:
    """At the head unit the task gradient is softmax(logits) - onehot(argmax): the weights are its square over
    its mean. At a block unit they have the unit output's shape and mean 1."""
    _, _, twin, images, _, targets = _block_unit(compose_cfg, "fp", "mlp")
    got = unitcache.capture_fisher(twin, twin.head, images, CPU, 32).v
    with torch.no_grad():
        logits = twin(images)
    g2 = (F.softmax(logits, 1) - F.one_hot(logits.argmax(1), logits.shape[1])).pow(2)
    torch.testing.assert_close(got, g2 / g2.mean(), rtol=1e-4, atol=1e-6)
    block = unitcache.capture_fisher(twin, twin.blocks[1].mlp, images, CPU, 32).v
    assert block.shape == targets.v.shape
    assert block.mean().item() == pytest.approx(1.0, rel=1e-5) and block.min() >= 0 and block.std() > 0


def test_fisher_loss_is_the_weighted_squared_error() -> None:
    torch.manual_seed(0)
    out, target, w = torch.randn(4, 3, 5), torch.randn(4, 3, 5), torch.rand(4, 3, 5)
    expected = ((out - target) ** 2 * w).sum((1, 2)).mean()
    torch.testing.assert_close(train.recon_loss(out, target, w), expected)
    assert torch.equal(train.recon_loss(out, target), train.recon_loss(out, target, torch.ones_like(w)))


def test_qdrop_fisher_run_computes_fisher_once_per_unit(compose_cfg, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def counting(*args, **kwargs):
        calls.append(1)
        return unitcache.capture_fisher(*args, **kwargs)

    monkeypatch.setattr(adaround, "capture_fisher", counting)
    cfg = compose_cfg("debug=quick", "wquant=adaround", "granularity=block", "wbits=4", "nonlinear=ivit",
                      "adaround.iters=6", "adaround.qdrop_prob=0.5", "adaround.loss=fisher", "data.eval_images=64")
    m = pipeline.run(cfg, tmp_path / "run")
    assert m["status"] == "ok" and m["name"] == "W4A8-adaround-block-lsq-qdrop0.5-fisher-ivit"
    assert len(calls) == len(m["units"]) == 2 + 2 * 4  # embed, 4 x (attn, mlp), head
