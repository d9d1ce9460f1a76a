"""The benchmark (ptq.bench) in quick form: well-formed JSON, a Markdown table, the README block renderer.

No timing thresholds: only that every number is there, finite and positive.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path
from typing import Any

import pytest

from ptq import bench
from ptq.bench.onnxrt import B1_MAX_RUNS, B1_ROUND_S
from ptq.intexec.variants import u8s8_exact


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, Path]:
    """One quick benchmark of both models and both AdaRound backends (single thread: steadier on a shared
    machine; the eager AdaRound step, since compiling it for twenty unit shapes would dominate the suite)."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = bench.main(["--quick", "--device", "cpu", "--threads", "1", "--models", "tiny,vit_b_16",
                         "--no-adaround-compile", "--out", str(out)])
    assert rc == 0
    return json.loads(out.read_text()), stdout.getvalue(), out


def _positive(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_json_has_every_ratio_finite_and_positive(quick_run) -> None:
    result, _, _ = quick_run
    assert result["quick"] is True and result["device"] == "cpu"
    for key in bench.RATIO_KEYS:
        assert _positive(result["ratios"][key]), key
    for name in ("tiny", "vit_b_16"):
        for key in bench.RATIO_KEYS:
            assert _positive(result["ratios_by_model"][name][key]), (name, key)
    mach = result["machine"]
    for key in ("platform", "cpu_count", "torch", "device_name"):
        assert mach[key], key
    assert result["models"]["vit_b_16"]["model"]["reduced_depth"] is True  # quick mode says so


def test_throughput_and_memory_numbers_are_positive(quick_run) -> None:
    result, _, _ = quick_run
    for name, m in result["models"].items():
        for variant in ("float", "fp_ops", "ivit"):
            assert _positive(m["eval"][variant]["images_per_s"]), (name, variant)
            assert _positive(m["eval"][variant]["memory"]["host_peak_bytes"]), (name, variant)
        cal = m["calibration"]
        assert _positive(cal["images_per_s"]) and _positive(cal["memory"]["host_peak_bytes"])
        assert set(m["adaround"]) == {"fp", "ivit"}
        for backend, ada in m["adaround"].items():
            assert len(ada["units"]) == 5 and backend in ada["settings"]
            for kind, u in ada["units"].items():
                for key in ("adaround_iter_s", "float_fwd_bwd_s", "ratio"):
                    assert _positive(u[key]), (name, backend, kind, key)
            worst = max(ada["units"]["block_attn"]["ratio"], ada["units"]["block_mlp"]["ratio"])
            assert m["ratios"][bench.ratio_key("block", backend)] == worst
        mem = m["cache_memory"]
        for key in ("inputs_bytes", "targets_bytes", "steady_bytes", "capture_peak_bytes"):
            assert _positive(mem["analytic"][key]), (name, key)
        for key in ("measured_steady_bytes_at_1024", "measured_capture_peak_bytes_at_1024"):
            assert _positive(mem["measured"][key]), (name, key)
        assert mem["measured"]["points"][0]["inputs_dtype"] == "torch.int16"


def test_vit_b_16_cache_analytics_match_what_is_stored(quick_run) -> None:
    """1024 x 197 x 768: int16 inputs, float32 targets (below the float16 switch); the measured stored size agrees."""
    result, _, _ = quick_run
    mem = result["models"]["vit_b_16"]["cache_memory"]
    n = 1024 * 197 * 768
    assert mem["analytic"]["inputs_bytes"] == 2 * n and mem["analytic"]["targets_bytes"] == 4 * n
    assert mem["measured"]["measured_steady_bytes_at_1024"] == pytest.approx(6 * n, rel=1e-6)
    assert _positive(mem["host_total_estimate_bytes"])


def test_markdown_table_printed(quick_run) -> None:
    _, printed, _ = quick_run
    lines = [ln for ln in printed.splitlines() if ln.startswith("|")]
    assert lines[0].startswith("| model | measurement |") and set(lines[1]) <= set("|-: ")
    assert any("eval W8A8 ivit" in ln for ln in lines) and any("AdaRound encoder" in ln for ln in lines)
    assert any("block caches" in ln for ln in lines)


def test_readme_section_replaces_only_the_marked_block(quick_run, tmp_path: Path) -> None:
    result, _, out = quick_run
    readme = tmp_path / "README.md"
    before = ("# Title\n\nIntro.\n\n" + bench.MARK_START + "\nold stuff\n" + bench.MARK_END + "\n\n## After\n\nTail.\n"
              "<!-- onnx:start -->\n<!-- onnx:end -->\n")
    readme.write_text(before)
    assert bench.main(["--from-json", str(out), "--readme", str(readme)]) == 0
    text = readme.read_text()
    head, rest = text.split(bench.MARK_START)
    body, tail = rest.split(bench.MARK_END)
    assert head == "# Title\n\nIntro.\n\n" and tail.startswith("\n\n## After\n\nTail.\n<!-- onnx:start -->\nMeasured")
    assert "old stuff" not in body and "## Performance" in body and "onnxruntime `ort_int_w8a8`" in body
    mach = result["machine"]
    assert mach["torch"] in body and mach["device_name"] in body and "`cpu`" in body
    # idempotent: rendering again gives the same file
    bench.update_readme(readme, result)
    assert readme.read_text() == text


def test_write_alone_puts_each_block_on_its_own_page(quick_run, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """``--write`` without a page: the Performance block to docs/benchmarks.md, the onnx block to
    docs/deployment.md, the first linking to the second; ``--write PAGE`` puts both on PAGE, linked in place."""
    _, _, out = quick_run
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs").mkdir()
    perf, onnx = tmp_path / "docs" / "benchmarks.md", tmp_path / "docs" / "deployment.md"
    perf.write_text(f"# B\n{bench.MARK_START}\n{bench.MARK_END}\n")
    onnx.write_text("# D\n<!-- onnx:start -->\n<!-- onnx:end -->\n")
    with contextlib.redirect_stdout(io.StringIO()):
        assert bench.main(["--from-json", str(out), "--write"]) == 0
    text = perf.read_text()
    assert "## Performance" in text and "](deployment.md#deploying-the-integer-model)" in text
    assert "Regenerate: `python -m ptq.bench --out outputs/bench.json --write`." in text and "onnx:start" not in text
    assert onnx.read_text().startswith("# D\n<!-- onnx:start -->\nMeasured by") and "## Performance" not in onnx.read_text()
    both = tmp_path / "both.md"
    both.write_text(f"{bench.MARK_START}\n{bench.MARK_END}\n<!-- onnx:start -->\n<!-- onnx:end -->\n")
    with contextlib.redirect_stdout(io.StringIO()):
        assert bench.main(["--from-json", str(out), "--write", str(both)]) == 0
    text = both.read_text()
    assert "](#deploying-the-integer-model)" in text and f"--write {both}`." in text


def test_readme_without_markers_is_a_clear_error(quick_run, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _, _, out = quick_run
    readme = tmp_path / "README.md"
    readme.write_text("# No markers here\n")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--from-json", str(out), "--readme", str(readme)])
    assert exit_info.value.code == 2 and "perf:start" in capsys.readouterr().err
    with pytest.raises(ValueError, match="perf:start"):
        bench.replace_marked_block(readme.read_text(), "section")
    assert readme.read_text() == "# No markers here\n"


def test_onnx_comparison_is_part_of_the_benchmark(quick_run, tmp_path: Path) -> None:
    """The full benchmark ends with the onnxruntime comparison: float and both integer models timed per
    model, W8A8 profiled by role, its ``ort_*`` ratios among the model's ratios and rows in the table;
    ``--onnx --from-json`` renders the README's onnx block from it."""
    result, printed, out = quick_run
    for name in ("tiny", "vit_b_16"):
        ores = result["onnx"]["models"][name]
        kinds = ("int_w8a8", "int_w4a8", "qdq_w8a8", "static_w8a8") + (("int_w8a8_portable",) if u8s8_exact() else ())
        assert set(ores["ratios"]) == {f"ort_{k}{b}" for k in kinds for b in ("", "_b1")} | {
            "qdq_vs_static", "qdq_vs_static_b1"}
        assert ores["int_variant"] == ("vnni" if u8s8_exact() else "portable")
        assert all(_positive(v) for v in ores["ratios"].values())
        # batch 1 repeated within a round where one run is short (the slowest warm-up run decides)
        assert ores["b1_runs_per_round"] == max(1, min(B1_MAX_RUNS, int(B1_ROUND_S / ores["b1_warm_s"])))
        assert {k: result["ratios_by_model"][name][k] for k in ores["ratios"]} == ores["ratios"]
        for key, size in ores["bytes"].items():
            assert (out.parent / "onnx_models" / name / f"{key}.onnx").stat().st_size == size
        prof = ores["profile_int_w8a8"]
        assert {"gemm", "requant", "shiftmax", "shiftgelu", "layernorm", "residual"} <= set(prof["by_role_ms"])
        assert abs(sum(prof["by_role_ms"].values()) - prof["total_ms"]) < 0.01 * prof["total_ms"] + 0.1
    ratio = result["ratios"]["ort_int_w8a8_b1"]  # the primary model's, against its own target
    assert result["targets_met"]["ort_int_w8a8_b1"] == (ratio <= result["targets_by_model"]["vit_b_16"]["ort_int_w8a8_b1"])
    assert "ort_int_w4a8" not in result["targets_met"]  # no target
    rows = [ln for ln in printed.splitlines() if "`ort_int_w8a8`" in ln]
    assert len(rows) == 2 and rows[0].startswith("| tiny |") and f"{result['ratios']['ort_int_w8a8']:.2f}x" in rows[1]
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- onnx:start -->\nold\n<!-- onnx:end -->\ntail\n")
    with contextlib.redirect_stdout(io.StringIO()):
        assert bench.main(["--onnx", "--from-json", str(out), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n<!-- onnx:start -->\nMeasured by `python -m ptq.bench --quick`")
    assert text.endswith("<!-- onnx:end -->\ntail\n")
    assert "old" not in text and "| tiny (batch N = 64) | int_w8a8 |" in text


def test_readme_needs_the_onnx_block_when_the_result_has_one(quick_run, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    """A perf block alone is not enough for a result with the onnxruntime comparison: one clear line, exit 2."""
    _, _, out = quick_run
    readme = tmp_path / "README.md"
    readme.write_text(bench.MARK_START + "\nold\n" + bench.MARK_END + "\n")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--from-json", str(out), "--readme", str(readme)])
    assert exit_info.value.code == 2 and "onnx:start" in capsys.readouterr().err
    assert readme.read_text() == bench.MARK_START + "\nold\n" + bench.MARK_END + "\n"
