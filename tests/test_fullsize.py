"""Full-size vit_b_16 end to end on the CPU (slow: ``make test-slow``, not in the default suite)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def _script():
    spec = importlib.util.spec_from_file_location("fullsize_check", ROOT / "scripts" / "fullsize_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_vit_b_16_adaround_block_w4_ivit_exports_and_verifies(tmp_path: Path) -> None:
    report = _script().run(tmp_path, images=64, iters=5)
    assert report["returncode"] == 0 and report["status"] == "ok", report.get("stderr_tail")
    assert report["intexec"] == {"mismatches": 0, "n": 64}
    assert report["largest_accumulator"]["fits_int32"]
    assert report["peak_rss_gib"] < 24  # the 2-core, 24 GB machine
    assert set(report["seconds"]) >= {"calibrate", "reconstruct", "evaluate", "export"}
