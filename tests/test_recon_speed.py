"""The AdaRound step's speed levers change no number: fused Adam, precomputed LayerNorm, opaque integer kernels."""

from __future__ import annotations

import pytest
import torch

from conftest import small_vit
from ptq.calib import calibrate
from ptq.quant import ivit
from ptq.quant.nonlinear import Backend
from ptq.quant.rounding import AdaRoundQuantizer, install_adaround
from ptq.quant.vit import QuantSettings, QuantViT
from ptq.recon import partition, train, unitcache
from ptq.recon.unitcache import Cached, batches, capture, precompute_norm


def test_fused_adam_equals_torch_adam_bit_for_bit() -> None:
    torch.manual_seed(0)
    mine = [torch.randn(16, 24, requires_grad=True), torch.randn(24, requires_grad=True),
            torch.tensor(0.3, requires_grad=True)]
    ref = [p.detach().clone().requires_grad_(True) for p in mine]
    groups = lambda ps: [{"params": ps[:2], "lr": 1e-2}, {"params": ps[2:], "lr": 4e-5}]  # noqa: E731
    opt, ref_opt = train.FusedAdam(groups(mine)), torch.optim.Adam(groups(ref), fused=True)
    for step in range(12):
        w = torch.randn(16, 24)
        for ps in (mine, ref):
            loss = (ps[0] * w).sin().sum() + ps[2] ** 3
            if step % 3:  # the bias gets no gradient on some steps: skipped, as Adam skips it
                loss = loss + ps[1].pow(2).sum()
            loss.backward()
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad(set_to_none=True)
    for a, b in zip(mine, ref, strict=True):
        assert torch.equal(a, b)
    assert all(p.grad is None for p in mine)


def _trainable(backend: str) -> tuple[QuantViT, torch.Tensor]:
    model = small_vit()
    q = QuantViT(model, QuantSettings(wbits=4, abits=8, backend=Backend(backend)))
    images = torch.randn(24, 3, 16, 16)
    calibrate(q, [(images[i:i + 8], None) for i in range(0, 24, 8)], torch.device("cpu"))
    q.freeze()
    install_adaround(q)
    for m in q.modules():
        if isinstance(m, AdaRoundQuantizer):
            m.soft = True
            m.v.requires_grad_(True)
    for a in q.act_quantizers():
        if a.mode == "quant":
            a.scale.requires_grad_(True)
    return q, images


def test_saving_transcendentals_keeps_a_units_loss_and_gradients_bit_for_bit() -> None:
    """The compiled step's partitioner saves exp / erf / GELU / softmax outputs instead of recomputing
    them: on an fp-backend attention and MLP unit, the same loss and gradients as the default partitioner.
    (Not a general law: where a saved value changes how a reduction is fused, sums can move by an ulp.)"""
    assert partition.AVAILABLE
    q, images = _trainable("fp")
    cpu = torch.device("cpu")
    for unit in (q.blocks[0].attn, q.blocks[0].mlp):
        inputs = capture(q, unit, images, cpu, "input", 8)
        x, target = inputs.take(torch.arange(6), cpu), torch.randn(6, *inputs.v.shape[1:])
        params = [p for p in unit.parameters() if p.requires_grad]
        part = partition.SaveTranscendentals()
        got = []
        for partitioner in (None, part):
            torch._dynamo.reset()
            with torch._inductor.config.patch(custom_partitioner_fn=partitioner):
                step = torch.compile(train.unit_step_loss, dynamic=False)
                loss, rec, reg = step(unit, x, target, torch.tensor(4.0), torch.tensor(1.0))
            got.append((rec.detach(), reg.detach(), *torch.autograd.grad(loss, params)))
        assert part.tagged >= 1
        for a, b in zip(*got, strict=True):
            assert torch.equal(a, b)


def test_chunked_batches_sample_what_one_draw_per_iteration_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    """Gathering several iterations at once keeps the seeded sequence of batches (and so every result)."""
    g = torch.Generator().manual_seed(3)
    inputs = Cached(torch.randint(-300, 300, (50, 5, 4), generator=g).to(torch.int16), torch.tensor(0.1), 16,
                    qtensor=True)
    targets = Cached(torch.randn(50, 5, 4, generator=g), qtensor=True)
    normed = Cached(torch.randn(50, 5, 4, generator=g), qtensor=True)
    cpu = torch.device("cpu")
    per_iter = 7 * 3 * 5 * 4 * 4  # bytes of one iteration's three batches
    monkeypatch.setattr(unitcache, "BATCH_CHUNK_BYTES", 3 * per_iter)  # chunks of 3 iterations, 11 = 3+3+3+2
    fisher = Cached(torch.rand(50, 5, 4, generator=g))
    for n, f in ((normed, None), (None, fisher)):
        got = list(batches(inputs, targets, n, 7, 11, torch.Generator().manual_seed(9), cpu, f))
        ref_gen = torch.Generator().manual_seed(9)
        assert len(got) == 11
        for x, t, nb, fb in got:
            idx = torch.randint(50, (7,), generator=ref_gen)
            ref_x = inputs.take(idx, cpu)
            assert torch.equal(x.v, ref_x.v) and torch.equal(x.s, ref_x.s) and x.bits == 16
            assert torch.equal(t, targets.take_real(idx, cpu))
            assert (nb is None) if n is None else torch.equal(nb.v, normed.take(idx, cpu).v)
            assert (fb is None) if f is None else torch.equal(fb, fisher.take_real(idx, cpu))


@pytest.mark.parametrize("backend", ["fp", "ivit"])
def test_precomputed_norm_gives_the_same_loss_and_gradients(backend: str) -> None:
    q, images = _trainable(backend)
    cpu = torch.device("cpu")
    for unit in (q.blocks[1].attn, q.blocks[1].mlp, q.blocks[1]):
        inputs = capture(q, unit, images, cpu, "input", 8)
        normed = precompute_norm(unit, inputs, cpu, batch_size=5)  # batches must not matter either
        assert normed is not None and len(normed) == len(inputs)
        idx = torch.tensor([3, 0, 17, 9])
        x, target = inputs.take(idx, cpu), torch.randn(4, *inputs.v.shape[1:])
        grads = []
        for n in (None, normed.take(idx, cpu)):
            params = [p for p in unit.parameters() if p.requires_grad]
            rec, reg = train.unit_recon_loss(unit, x, target, torch.tensor(4.0), n)
            grads.append((rec.detach(), reg.detach(), torch.autograd.grad(rec + reg, params, allow_unused=True)))
        assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
        for a, b in zip(grads[0][2], grads[1][2], strict=True):
            assert (a is None and b is None) or torch.equal(a, b)
        assert any(g is not None for g in grads[1][2])
    layer = q.blocks[1].attn.qkv
    assert precompute_norm(layer, capture(q, layer, images, cpu, "input", 8), cpu) is None


def test_integer_kernels_trace_without_graph_breaks() -> None:
    """The ivit kernels are opaque ops in the compiled step: one graph, and the kernels' own integers."""
    q, images = _trainable("ivit")
    cpu = torch.device("cpu")
    unit = q.blocks[0]
    inputs = capture(q, unit, images, cpu, "input", 8)
    x, target = inputs.take(torch.arange(4), cpu), torch.randn(4, *inputs.v.shape[1:])
    explained = torch._dynamo.explain(train.unit_step_loss)(unit, x, target, torch.tensor(4.0), torch.tensor(1.0))
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    scores = torch.randint(-120, 120, (2, 3, 7, 7)).float()
    p, s = torch.ops.ptq.shiftmax(scores, torch.tensor(0.05), 15, 8)
    p_ref, s_ref = ivit.shiftmax(scores, torch.tensor(0.05), 15, 8)
    assert torch.equal(p, p_ref) and torch.equal(s, s_ref)


def test_compile_cache_lives_with_the_stage_caches(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ptq
    from ptq.runtime import COMPILE_CACHE_ENV, use_compile_cache

    monkeypatch.setattr(ptq, "USER_COMPILE_CACHE", None)
    monkeypatch.delenv(COMPILE_CACHE_ENV, raising=False)
    assert use_compile_cache(None) is None  # no cache_dir: inductor's own default
    assert use_compile_cache(tmp_path / "cache") == str((tmp_path / "cache").resolve() / "inductor")
    # importing inductor wrote its default into the variable: still ours, the user did not choose it
    import torch._inductor.codecache  # noqa: F401

    monkeypatch.setenv(COMPILE_CACHE_ENV, "/tmp/inductor-default")
    assert use_compile_cache(tmp_path / "cache") == str((tmp_path / "cache").resolve() / "inductor")
    monkeypatch.setattr(ptq, "USER_COMPILE_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv(COMPILE_CACHE_ENV, str(tmp_path / "mine"))
    assert use_compile_cache(tmp_path / "cache") == str(tmp_path / "mine")  # an explicit setting wins
