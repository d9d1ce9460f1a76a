"""The proof on the embedded default: the ONNX model == simulation on the whole eval set, on onnxruntime."""

from __future__ import annotations

from pathlib import Path

from ptq import pipeline
from ptq.data.build import splits


def full_eval(cfg) -> int:
    """Images in the whole eval split of ``cfg``'s data (the digits test split: 2,396 today)."""
    assert cfg.data.eval_images is None
    return len(splits(cfg)[1])


def test_w8a8_ivit_is_bit_exact_on_the_whole_eval_set(compose_cfg, tmp_path: Path) -> None:
    cfg = compose_cfg("nonlinear=ivit", "export=true", "aquant.calib_images=512")
    m = pipeline.run(cfg, tmp_path / "w8")
    assert m["intexec"]["n"] == m["n_eval"] == full_eval(cfg)
    assert m["intexec"]["exact"] and m["intexec"]["mismatches"] == 0
    assert m["intexec"]["widths"]["all_accumulators_fit_int32"]


def test_w4a8_adaround_exported_model_verifies_on_the_whole_eval_set(compose_cfg, tmp_path: Path) -> None:
    cfg = compose_cfg("nonlinear=ivit", "export=true", "wquant=adaround", "granularity=block", "wbits=4",
                      "aquant.calib_images=256", "adaround.iters=30", "adaround.calib_images=128")
    run_dir = tmp_path / "w4"
    m = pipeline.run(cfg, run_dir)
    n = full_eval(cfg)
    assert m["intexec"] == {**m["intexec"], "exact": True, "mismatches": 0, "n": n}
