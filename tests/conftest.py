"""Shared fixtures: compose the real Hydra config in-process, small fake ViTs, subprocess CLI runs."""

from __future__ import annotations

import getpass
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

XDIST = bool(os.environ.get("PYTEST_XDIST_WORKER"))
if XDIST:
    # `make test` runs two pytest workers on the 2-core machine: one thread each, and the same for the CLI
    # subprocesses they start, so that the two never oversubscribe the cores. torch.compile's pool of
    # compile processes is off too: two workers' pools on two cores made a compile-heavy test 2.2x
    # slower (84 s against 38 s for test_saving_transcendentals..., measured alone).
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = "1"

# One torch.compile cache for the whole suite and the CLI runs it starts (inductor's own default
# location), not one per test's tmp cache_dir: a cold compile of the fused kernels costs each run 10-15 s.
try:
    _user = getpass.getuser()
except (KeyError, OSError):
    _user = f"uid_{os.getuid()}"
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"torchinductor_{_user}"))

import torch  # noqa: E402  (after the thread settings above)
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from ptq.config import register_configs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
if XDIST:
    torch.set_num_threads(1)
else:
    torch.set_num_threads(2)
register_configs()


@pytest.fixture
def compose_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """Compose ``conf/config.yaml`` with overrides, caching stages under tmp_path."""

    def _compose(*overrides: str) -> DictConfig:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose("config", overrides=[f"cache_dir={tmp_path / 'cache'}", *overrides])

    return _compose


@pytest.fixture
def run_cli(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess]:
    """Run ``python -m ptq.main`` in a subprocess with outputs under tmp_path."""

    def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "ptq.main", f"hydra.run.dir={tmp_path / 'run'}",
               f"cache_dir={tmp_path / 'cache'}", *args]
        env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)

    return _run


def small_vit(layers: int = 2, dim: int = 32, heads: int = 2, image: int = 16, patch: int = 4,
              classes: int = 10, seed: int = 0):
    """A randomly initialised torchvision VisionTransformer (with non-trivial LayerNorm params)."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(image_size=image, patch_size=patch, num_layers=layers, num_heads=heads,
                              hidden_dim=dim, mlp_dim=2 * dim, num_classes=classes)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        model.heads.head.weight.normal_(0, 0.05)
    return model.eval()


def adaround_block_unit(cfg: DictConfig, kind: str):
    """The embedded default calibrated on 64 seeded random images with AdaRound installed, its float twin,
    the images, and the inputs / float targets of ``blocks.1.<kind>`` (``attn`` or ``mlp``)."""
    from ptq.calib import calibrate
    from ptq.models.zoo import load_model
    from ptq.quant.rounding import install_adaround
    from ptq.quant.vit import QuantSettings, QuantViT
    from ptq.recon.unitcache import capture
    from ptq.runspec import settings_of

    cpu = torch.device("cpu")
    torch.manual_seed(0)
    model = load_model(cfg)
    q = QuantViT(model, settings_of(cfg))
    images = torch.randn(64, 3, 24, 24)
    calibrate(q, [(images[:32], None), (images[32:], None)], cpu)
    install_adaround(q)
    twin = QuantViT(model, QuantSettings(wbits=None, abits=None))
    twin.set_mode("off")
    inputs = capture(q, getattr(q.blocks[1], kind), images, cpu, "input", 32)
    targets = capture(twin, getattr(twin.blocks[1], kind), images, cpu, "output", 32)
    return q, twin, images, inputs, targets
