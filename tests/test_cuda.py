"""CUDA checks (``-m cuda``; run by scripts/device_check.sh on a GPU machine, deselected by default)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Subset

from conftest import ROOT

pytestmark = pytest.mark.cuda
ENV = {**os.environ, "WANDB_MODE": "disabled"}


@pytest.fixture(autouse=True)
def _needs_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.fail("CUDA tests need a CUDA device (they are deselected by default; run them with -m cuda on a GPU)")


@pytest.mark.parametrize("abits", [8])
@pytest.mark.parametrize("wbits", [8, 4])
def test_integer_simulation_on_cuda_equals_cpu_bit_for_bit(compose_cfg, wbits: int, abits: int) -> None:
    from ptq.calib import calibrate
    from ptq.data import build
    from ptq.models.zoo import load_model
    from ptq.quant.vit import QuantViT
    from ptq.runspec import eval_set, settings_of

    cfg = compose_cfg("nonlinear=ivit", f"wbits={wbits}", f"abits={abits}")
    calib_source, ev = build.splits(cfg)
    q = QuantViT(load_model(cfg), settings_of(cfg))
    calibrate(q, build.loader(build.subset(calib_source, 512, 0), 128, 0, torch.device("cpu")), torch.device("cpu"))
    images = torch.stack([x for x, _ in DataLoader(Subset(eval_set(cfg, ev), range(512)), batch_size=512)][0])
    with torch.no_grad():
        cpu = q(images)
        gpu = q.to("cuda")(images.to("cuda")).cpu()
    assert torch.equal(cpu.view(torch.int32), gpu.view(torch.int32))



def test_fused_kernels_on_cuda_equal_the_int64_definition() -> None:
    """The compiled float32 requantizers (triton on CUDA) give requant.requantize's integers."""
    from ptq.quant import fused, requant

    gen = torch.Generator().manual_seed(7)
    for bits, mag, dtype in [(8, 2**20, torch.float32), (16, 2**22, torch.float32), (8, 2**31, torch.int64)]:
        q = torch.randint(-mag, mag, (4096, 64), generator=gen)
        s_in = torch.exp(torch.empty(64).uniform_(-14, -6, generator=gen)).float()
        want = requant.requantize(q, s_in, 0.03, bits)
        got = fused.requantize_float(q.to(dtype).cuda(), s_in.cuda(), 0.03, bits)
        assert got is not None and torch.equal(got.cpu().long(), want)
    qa = torch.randint(-(2**15), 2**15, (4096, 64), generator=gen).float()
    qb = torch.randint(-(2**20), 2**20, (4096, 64), generator=gen).float()
    want = requant.clamp_int(requant.requantize(qa, 0.011, 0.013, 16, clamp=False)
                             + requant.requantize(qb, 1e-5, 0.013, 16, clamp=False), 16)
    got = fused.requantize_add(qa.cuda(), 0.011, qb.cuda(), 1e-5, 0.013, 16)
    assert got is not None and torch.equal(got.cpu().long(), want)

def test_adaround_block_runs_on_cuda(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "ptq.main", f"hydra.run.dir={run}", f"cache_dir={tmp_path / 'c'}",
                           "device=cuda", "debug=quick", "wquant=adaround", "granularity=block", "wbits=4",
                           "nonlinear=ivit", "export=true"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "ok" and m["intexec"]["mismatches"] == 0 and len(m["units"]) == 10


def _values(obj, key: str):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == key:
                yield v
            yield from _values(v, key)
    elif isinstance(obj, list):
        for v in obj:
            yield from _values(v, key)


def test_bench_on_cuda_reports_peak_memory(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "ptq.bench", "--quick", "--device", "cuda", "--models", "tiny",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    peaks = [v for v in _values(json.loads(out.read_text()), "cuda_peak_bytes") if v is not None]
    assert peaks and all(int(v) > 0 for v in peaks)
