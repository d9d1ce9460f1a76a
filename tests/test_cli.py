"""The real CLI and pipeline end to end: default run, config errors, pass-through, determinism, ImageNet path."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from ptq import calib, pipeline, runspec


def test_default_cli_run_writes_metrics(run_cli, tmp_path: Path) -> None:
    res = run_cli("debug=quick")
    assert res.returncode == 0, res.stderr[-3000:]
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith("W8A8-absmax-fp  acc1=")
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["status"] == "ok" and m["error"] is None
    for key in ("acc1", "acc5", "fp_acc1", "fp_acc5", "agreement", "kl", "n_eval"):
        assert isinstance(m[key], (int, float)), key
    assert m["n_eval"] == 256
    assert set(m["seconds"]) >= {"calibrate", "reconstruct", "evaluate"}
    assert m["row"]["wbits"] == 8 and m["row"]["aquant"] == "movavg" and m["row"]["nonlinear"] == "fp"
    _counts_of(m)
    # W8A8 is near-lossless on the embedded default: a broken quantizer falls far outside these, and one that
    # quantized nothing would give kl == 0
    assert abs(m["acc1"] - m["fp_acc1"]) <= 3 and m["agreement"] >= 95 and 0 < m["kl"] < 0.05


def _counts_of(m: dict) -> None:
    """Top-k and agreement are whole images out of ``n_eval``, top-5 at least top-1; KL is finite."""
    n = m["n_eval"]
    for key in ("acc1", "acc5", "fp_acc1", "fp_acc5", "agreement"):
        assert m[key] * n / 100 == pytest.approx(round(m[key] * n / 100), abs=1e-3), key
    assert m["acc5"] >= m["acc1"] and m["fp_acc5"] >= m["fp_acc1"] and math.isfinite(m["kl"])


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("wbits=0", "wbits"),
        ("abits=1", "abits"),
        ("aquant.momentum=2", "aquant.momentum"),
        ("aquant.calib_images=-5", "aquant.calib_images"),
        ("device=tpu", "device"),
    ],
)
def test_impossible_values_fail_fast_with_one_line(run_cli, override: str, needle: str) -> None:
    res = run_cli(override, timeout=60)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0] and "allowed" in lines[0], res.stderr


def test_unknown_key_and_wrong_type_fail_at_compose(run_cli) -> None:
    res = run_cli("wquant.bogus=1", timeout=60)
    assert res.returncode != 0 and "bogus" in res.stderr
    res = run_cli("+wquant.bogus=1", timeout=60)  # Hydra lets + add a key; validation still refuses it
    assert res.returncode == 2 and "wquant.bogus" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = run_cli("wbits=eight", timeout=60)
    assert res.returncode != 0 and "wbits" in res.stderr
    res = run_cli("wquant=nearest", timeout=60)
    assert res.returncode != 0 and "absmax" in res.stderr  # lists the available options


def test_ivit_needs_integer_tensors(compose_cfg) -> None:
    from ptq.config import ConfigError

    with pytest.raises(ConfigError, match="nonlinear=ivit"):
        pipeline.check_inputs(compose_cfg("nonlinear=ivit", "aquant=none"))


def test_no_quantization_is_the_float_model_bit_for_bit(compose_cfg, tmp_path: Path) -> None:
    m = pipeline.run(compose_cfg("debug=quick", "wquant=none", "aquant=none"), tmp_path / "r")
    assert m["acc1"] == m["fp_acc1"] and m["agreement"] == 100.0 and m["kl"] == 0.0


def test_same_config_and_seed_give_identical_metrics(compose_cfg, tmp_path: Path) -> None:
    cfg = compose_cfg("debug=quick", "wbits=4", "abits=4")
    a = pipeline.run(cfg, tmp_path / "a")
    b = pipeline.run(cfg, tmp_path / "b")
    drop = {"seconds", "cached"}
    assert {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}
    assert b["cached"]["fp_baseline"] is True and a["cached"]["fp_baseline"] is False


def test_failed_run_is_recorded_not_left_running(compose_cfg, tmp_path: Path, monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise RuntimeError("calibration exploded")

    monkeypatch.setattr(calib, "calibrate", boom)
    with pytest.raises(RuntimeError):
        pipeline.run(compose_cfg("debug=quick"), tmp_path / "f")
    m = json.loads((tmp_path / "f" / "metrics.json").read_text())
    assert m["status"] == "failed" and "calibration exploded" in m["error"]


def _fake_imagefolder(root: Path, classes: int = 2, per_class: int = 2) -> None:
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in range(classes):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True)
            for i in range(per_class):
                arr = torch.randint(0, 256, (64, 80, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(arr).save(d / f"img{i}.JPEG")


def test_imagenet_path_checks_inputs_before_loading(compose_cfg, tmp_path: Path) -> None:
    from ptq.config import ConfigError

    base = ("model=vit_b_16", "data=imagenet")
    with pytest.raises(ConfigError, match="data.root"):
        pipeline.check_inputs(compose_cfg(*base))
    (tmp_path / "only_val" / "val").mkdir(parents=True)
    with pytest.raises(ConfigError, match="train/"):
        pipeline.check_inputs(compose_cfg(*base, f"data.root={tmp_path / 'only_val'}"))
    _fake_imagefolder(tmp_path / "inet")
    with pytest.raises(ConfigError, match="weights_path"):
        pipeline.check_inputs(compose_cfg(*base, f"data.root={tmp_path / 'inet'}", "model.weights_path=/nope.pth"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    cfg = compose_cfg(*base, f"data.root={tmp_path / 'inet'}", f"model.weights_path={bad}")
    with pytest.raises(ConfigError, match="could not be read"):  # its content is checked before anything runs
        pipeline.check_inputs(cfg)


def test_imagenet_path_runs_on_a_fake_imagefolder(compose_cfg, tmp_path: Path) -> None:
    _fake_imagefolder(tmp_path / "inet")
    cfg = compose_cfg("model=vit_b_16", "data=imagenet", f"data.root={tmp_path / 'inet'}",
                      "model.pretrained=false", "data.num_workers=0", "data.batch_size=2",
                      "aquant.calib_images=2", "aquant.calib_batch_size=2", "tracking.mode=disabled")
    m = pipeline.run(cfg, tmp_path / "r")
    assert m["status"] == "ok" and m["n_eval"] == 4 and m["row"]["model"] == "vit_b_16"
    _counts_of(m)  # (torchvision's head starts at zero: untrained logits are all 0, so KL is 0 here)


def test_experiment_configs_compose_to_their_rows(compose_cfg) -> None:
    from ptq.naming import row_name

    names = {}
    for path in sorted((Path(__file__).resolve().parents[1] / "conf" / "experiment").glob("*.yaml")):
        names[path.stem] = row_name(runspec.row_of(compose_cfg(f"experiment={path.stem}")))
    assert len(set(names.values())) == len(names) == 12  # every table row is a distinct configuration
    assert names["abs_w4a32"] == "W4A32-absmax-fp"
    assert names["abs_w4a4_ivit"] == "W4A4-absmax-ivit"
    assert names["adaround_block_w4a8_ivit"] == "W4A8-adaround-block-lsq-ivit"
    assert names["w4a4_best"] == "W4A4-adaround-block-lsq-qdrop0.5-mse-lnrep0.5-k8-img8-gtwin-ivit"
    # the recipe is the third screen's measured configuration of docs/results.md (w4a4_screen3), key for key
    screened = ("+ablation=adaround_gtwin_qdrop_cal2k", "nonlinear=ivit", "wbits=4", "abits=4", "aquant.image_bits=8",
                "aquant.ln_reparam=true", "aquant.ln_reparam_alpha=0.5")
    recipe, bundle = compose_cfg("experiment=w4a4_best"), compose_cfg(*screened)
    for key in ("wquant", "aquant", "nonlinear", "granularity", "adaround", "lsq", "wbits", "abits"):
        assert recipe[key] == bundle[key], key
    quick = compose_cfg("experiment=w4a4_best", "debug=quick")  # debug wins over an experiment's budget
    assert (quick.adaround.iters, quick.adaround.calib_images) == (20, 64) and quick.wbits == 4
    # LN reparameterisation at full strength keeps its earlier name; any other strength is named by it
    full = runspec.row_of(compose_cfg(*screened[:-1]))
    assert "ln_reparam_alpha" not in full and row_name(full).endswith("-mse-lnrep-k8-img8-gtwin-ivit")
    assert row_name(runspec.row_of(compose_cfg("experiment=abs_w8a32", "wbits=4"))) == "W4A32-absmax-fp"


def test_cuda_without_a_cuda_device_fails_at_start_with_one_line(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "WANDB_MODE": "disabled", "CUDA_VISIBLE_DEVICES": ""}  # no GPU visible, even on a GPU box
    res = subprocess.run([sys.executable, "-m", "ptq.main", f"hydra.run.dir={tmp_path / 'run'}", "device=cuda"],
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120, env=env)
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and "device=cuda" in lines[0], res.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()  # refused before the run started
