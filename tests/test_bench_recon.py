"""``python -m ptq.bench --recon``: GPTQ against AdaRound at equal accuracy, from real (quick) runs."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest

from ptq import bench
from ptq.bench.recon import equal_kl, render_recon


@pytest.fixture(scope="module")
def recon_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, Path]:
    out = tmp_path_factory.mktemp("recon") / "bench_recon.json"
    page = out.parent / "benchmarks.md"
    page.write_text("# B\n<!-- recon_time:start -->\nold\n<!-- recon_time:end -->\ntail\n")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert bench.main(["--recon", "--quick", "--threads", "1", "--out", str(out), "--write", str(page)]) == 0
    return json.loads(out.read_text()), stdout.getvalue(), page


def test_every_run_is_real_and_timed(recon_run) -> None:
    result, _, _ = recon_run
    rows = {r["tag"]: r for r in result["rows"]}
    assert list(rows) == ["absmax", "gptq", "adaround_block_10", "adaround_block_40"]
    for r in rows.values():
        assert 0 < r["acc1"] <= 100 and r["kl"] > 0 and r["reconstruct_s"] >= 0 and r["n_eval"] == 256
        assert "nonlinear=ivit" in r["overrides"] and "debug=quick" in r["overrides"]
    assert rows["gptq"]["name"] == "W4A8-gptq-ivit" and rows["adaround_block_40"]["name"] == "W4A8-adaround-block-lsq-ivit"
    # nearest rounding reconstructs nothing; GPTQ and every AdaRound rung take measured time (no speed
    # comparison here: the suite's machine is shared); the verdict is the rows' own
    assert rows["absmax"]["reconstruct_s"] < 0.5
    assert all(rows[t]["reconstruct_s"] > 0 for t in ("gptq", "adaround_block_10", "adaround_block_40"))
    assert result["equal_kl"] == equal_kl(result["rows"])


def test_block_written_and_printed(recon_run) -> None:
    result, stdout, page = recon_run
    text = page.read_text()
    assert text.startswith("# B\n<!-- recon_time:start -->\nMeasured by `python -m ptq.bench --recon --quick`")
    assert text.endswith("<!-- recon_time:end -->\ntail\n") and "old" not in text
    assert render_recon(result) in stdout and "| GPTQ |" in text and f"{result['rows'][1]['kl']:.4f}" in text


def _row(method: str, kl: float, s: float, iters: int | None = None) -> dict[str, Any]:
    return {"method": method, "kl": kl, "reconstruct_s": s, "iters": iters}


def test_equal_kl_picks_the_fewest_iterations_that_reach_gptq() -> None:
    rows = [_row("absmax", 0.04, 0.0), _row("gptq", 0.02, 5.0), _row("adaround", 0.019, 80.0, 500),
            _row("adaround", 0.03, 40.0, 250), _row("adaround", 0.01, 160.0, 1000)]
    e = equal_kl(rows)
    assert e["reached"] and (e["adaround_iters"], e["time_ratio"]) == (500, 16.0)
    e = equal_kl([*rows[:2], _row("adaround", 0.05, 40.0, 250), _row("adaround", 0.03, 80.0, 500)])
    assert not e["reached"] and (e["adaround_iters"], e["adaround_kl"]) == (500, 0.03)
    assert "No AdaRound rung reaches GPTQ's KL" in render_recon(
        {"quick": False, "created": "now", "cpu": "cpu", "threads": 1, "setting": ["wbits=4"],
         "rows": [{**r, "name": "n", "acc1": 80.0, "fp_acc1": 88.0, "n_eval": 10} for r in rows[:2]],
         "equal_kl": e})


def test_bad_combinations_fail_before_any_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--recon", "--onnx"])
    assert exit_info.value.code == 2 and "give one of them" in capsys.readouterr().err
    page = tmp_path / "no_markers.md"
    page.write_text("nothing\n")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--recon", "--write", str(page), "--out", str(tmp_path / "r.json")])
    assert exit_info.value.code == 2 and "recon_time:start" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()
