"""ptq.table: loading run dirs, aggregation, Markdown/README/CSV/PNG output, W&B adapter."""

from __future__ import annotations

import copy
import json
import logging
import math
import statistics
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

from ptq import table as T
from ptq.naming import row_name
from ptq.tracking import SUMMARY_EXCLUDE, flatten

FP = {"fp_acc1": 81.07, "fp_acc5": 95.32}
ROWS = {
    "abs_w8_fp": {
        "model": "tiny_digits",
        "data": "digits",
        "wquant": "absmax",
        "wbits": 8,
        "aquant": "none",
        "abits": 8,
        "nonlinear": "fp",
        "granularity": None,
        "lsq": False,
        "quant_io": True,
        "softmax": {"n": 15, "out_bits": 8},
        "gelu": {"n": 23, "sig_bits": 8},
        "idadd_bits": 16,
    },
}
ROWS["abs_w4a8_ivit"] = {**ROWS["abs_w8_fp"], "wbits": 4, "aquant": "movavg", "nonlinear": "ivit"}
ROWS["ada_block_ivit"] = {**ROWS["abs_w4a8_ivit"], "wquant": "adaround", "granularity": "block"}
ROWS["ada_layer_ivit"] = {**ROWS["ada_block_ivit"], "granularity": "layer"}


def make_metrics(row: dict, seed: int = 0, acc1: float = 80.0, **over) -> dict:
    """metrics.json content of an ok run."""
    m = {
        "status": "ok",
        "error": None,
        "name": row_name(row),
        "row": copy.deepcopy(row),
        "acc1": acc1,
        "acc5": acc1 + 10,
        **FP,
        "agreement": acc1 + 5,
        "kl": 0.01 * (seed + 1),
        "n_eval": 2400,
        "seed": seed,
        "seconds": {"calibrate": 1.0, "reconstruct": 0.0, "evaluate": 2.0},
        "cached": {"calibrate": False, "fp_baseline": True},
        "something_new": [1, 2],
    }
    if row["wquant"] == "adaround":
        m["units"] = [
            {
                "unit": "encoder.layers.0.attn",
                "loss_before": 1.0,
                "loss_after": 0.5,
                "iters": 10,
                "early_stopped": True,
                "seconds": 0.1,
            }
        ]
        m["curves"] = {
            "encoder.layers.0.attn": {"step": [0, 5], "loss": [1.0, 0.5], "reg": [2, 1], "beta": [20, 2]}
        }
    m.update(over)
    return m


def make_config(row: dict, seed: int = 0, lr: float = 1e-2, group: str | None = "g1") -> dict:
    """A resolved Hydra config as .hydra/config.yaml holds it."""
    return {
        "seed": seed,
        "model": {"name": row["model"]},
        "adaround": {"lr": lr, "iters": 100},
        "tracking": {"mode": "offline", "project": "ptq", "entity": None, "group": group, "tags": ["t"]},
    }


def write_run(d: Path, metrics: dict | None, config: dict | None, raw: str | None = None) -> Path:
    """A fake Hydra run dir."""
    d.mkdir(parents=True)
    if config is not None:
        (d / ".hydra").mkdir()
        (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    if raw is not None:
        (d / "metrics.json").write_text(raw)
    elif metrics is not None:
        (d / "metrics.json").write_text(json.dumps(metrics))
    return d


@pytest.fixture(autouse=True)
def _quiet_wandb(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """Three configurations; abs_w4a8_ivit with three seeds; one failed run."""
    root = tmp_path / "multirun" / "2026-01-01" / "00-00-00"
    write_run(root / "0", make_metrics(ROWS["abs_w8_fp"], acc1=81.0), make_config(ROWS["abs_w8_fp"]))
    for s, a in enumerate([70.0, 72.0, 77.0]):
        write_run(
            root / f"{1 + s}",
            make_metrics(ROWS["abs_w4a8_ivit"], seed=s, acc1=a),
            make_config(ROWS["abs_w4a8_ivit"], seed=s),
        )
    write_run(
        root / "4", make_metrics(ROWS["ada_block_ivit"], acc1=79.5), make_config(ROWS["ada_block_ivit"])
    )
    write_run(
        root / "5",
        {
            "status": "failed",
            "error": "Traceback ...\nRuntimeError: CUDA out of memory",
            "name": row_name(ROWS["ada_layer_ivit"]),
            "row": ROWS["ada_layer_ivit"],
            "seed": 0,
        },
        make_config(ROWS["ada_layer_ivit"]),
    )
    return tmp_path / "multirun"


def test_table_holds_exactly_the_metrics(runs: Path) -> None:
    ok, failed = T.load_local_runs([runs])
    assert len(ok) == 5 and len(failed) == 1
    df = T.build_table(ok)
    assert list(df.columns[:8]) == ["[W]", "[A]", "W", "A", "SoftMax", "GELU", "LN", "IdAdd"]
    assert list(df.columns[8:13]) == ["Acc@1", "Acc@5", "Agree", "KL", "n"]
    # seed order: Base, FP rows, then I-ViT rows with Abs before AdaRound
    assert df["[W]"].tolist() == ["Base", "Abs", "Abs", "AdaRound(Block)"]
    assert df["[A]"].tolist() == ["Base", "-", "Mov", "Mov"]
    assert df[["W", "A"]].values.tolist() == [[32, 32], [8, 32], [4, 8], [4, 8]]
    assert df["SoftMax"].tolist() == ["FP", "FP", "I[b8,n15]", "I[b8,n15]"]
    assert df["IdAdd"].tolist() == ["FP", "FP", "16", "16"]
    w8 = df.iloc[1]
    assert (w8["Acc@1"], w8["Acc@5"], w8["Agree"], w8["KL"], w8["n"]) == (81.0, 91.0, 86.0, 0.01, 1)
    assert math.isnan(w8["Acc@1 std"])
    ada = df.iloc[3]
    assert (ada["Acc@1"], ada["n"], ada["Name"]) == (79.5, 1, "W4A8-adaround-block-ivit")
    base = df.iloc[0]
    assert (base["Acc@1"], base["Acc@5"], base["n"]) == (81.07, 95.32, 3)  # one per seed
    assert math.isnan(base["Agree"])


def test_aggregation_over_seeds(runs: Path) -> None:
    ok, _ = T.load_local_runs([runs])
    row = T.build_table(ok).iloc[2]
    accs = [70.0, 72.0, 77.0]
    assert row["n"] == 3
    assert row["Acc@1"] == pytest.approx(statistics.mean(accs))
    assert row["Acc@1 std"] == pytest.approx(statistics.stdev(accs))
    assert row["KL"] == pytest.approx(0.02) and row["KL std"] == pytest.approx(0.01)
    md = T.to_markdown(T.build_table(ok))
    assert "73.00 ± 3.61" in md and " 81.00 |" in md and "0.0200 ± 0.0100" in md
    assert "81.00 ±" not in md  # n == 1: no std


def test_failed_runs_listed_separately_not_averaged(runs: Path) -> None:
    ok, failed = T.load_local_runs([runs])
    df = T.build_table(ok + failed)  # even if passed in, failed records are ignored
    assert "W4A8-adaround-layer-ivit" not in df["Name"].tolist()
    fdf = T.failed_table(failed)
    assert fdf.to_dict("records") == [
        {
            "name": "W4A8-adaround-layer-ivit",
            "dir": (runs / "2026-01-01/00-00-00/5").as_posix(),
            "error": "RuntimeError: CUDA out of memory",
        }
    ]
    text = T.render(df, fdf)
    assert "### Failed runs" in text and "CUDA out of memory" in text
    assert text.index("### Failed runs") > text.index("AdaRound(Block)")


def test_malformed_and_half_written_dirs_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    row = ROWS["abs_w8_fp"]
    write_run(tmp_path / "good", make_metrics(row), make_config(row))
    write_run(tmp_path / "no_metrics", None, make_config(row))
    write_run(tmp_path / "truncated", None, make_config(row), raw='{"status": "ok", "acc1": 8')
    write_run(tmp_path / "running", {"status": "running", "row": row}, make_config(row))
    write_run(tmp_path / "no_acc", {"status": "ok", "row": row}, make_config(row))
    write_run(tmp_path / "list", None, None, raw="[1, 2]")
    with caplog.at_level(logging.WARNING, logger="ptq.table"):
        ok, failed = T.load_local_runs([tmp_path])
    assert [r["dir"] for r in ok] == [(tmp_path / "good").as_posix()] and failed == []
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 5
    for name in ("no_metrics", "truncated", "running", "no_acc", "list"):
        assert sum(f"/{name}:" in w for w in warned) == 1, name


def test_group_filter_and_by_key(
    tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    row = ROWS["ada_block_ivit"]
    for i, (lr, acc, group) in enumerate(
        [(1e-2, 79.0, "lr"), (1e-2, 81.0, "lr"), (1e-3, 75.0, "lr"), (1e-2, 10.0, "other")]
    ):
        write_run(
            tmp_path / "runs" / str(i),
            make_metrics(row, seed=i, acc1=acc),
            make_config(row, seed=i, lr=lr, group=group),
        )
    ok, _ = T.load_local_runs([tmp_path / "runs"])
    with caplog.at_level(logging.WARNING, logger="ptq.table"):
        T.build_table(ok)  # averaging different LRs is flagged
        assert [r.getMessage().count("--by adaround.lr") for r in caplog.records] == [1]
        caplog.clear()
        df = T.build_table([r for r in ok if r["tracking.group"] == "lr"], by=["adaround.lr"])
        assert caplog.records == []
    assert df["adaround.lr"].tolist()[1:] == [0.001, 0.01]
    assert df["Acc@1"].tolist()[1:] == [75.0, 80.0] and df["n"].tolist()[1:] == [1, 2]
    assert T.main(["--runs", str(tmp_path / "runs"), "--group", "lr", "--by", "adaround.lr"]) == 0
    out = capsys.readouterr().out
    assert "80.00 ± 1.41" in out and " 10.00 |" not in out and " 0.001 |" in out


def test_readme_block_replaced_in_place_and_idempotent(runs: Path, tmp_path: Path) -> None:
    prefix = "# Title\r\n\nintro ü\n<!-- results:start -->"
    suffix = "<!-- results:end -->\n\n## After\ntrailing   \n"
    readme = tmp_path / "README.md"
    readme.write_bytes((prefix + "\nold table\n" + suffix).encode())
    assert T.main(["--runs", str(runs), "--write", str(readme)]) == 0
    first = readme.read_bytes()
    assert first.startswith(prefix.encode()) and first.endswith(suffix.encode())
    assert b"old table" not in first and b"AdaRound(Block)" in first and b"### Failed runs" in first
    assert T.main(["--runs", str(runs), "--write", str(readme)]) == 0
    assert readme.read_bytes() == first
    T.write_readme_block(readme, "x")
    assert readme.read_bytes() == (prefix + "\r\nx\r\n" + suffix).encode()  # CRLF file keeps CRLF


def test_readme_without_markers_is_an_error(
    runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# nothing here\n")
    with pytest.raises(T.InputError, match="results:start"):
        T.write_readme_block(readme, "x")
    assert T.main(["--runs", str(runs), "--write", str(readme)]) == 2
    assert "results:start" in capsys.readouterr().err
    assert readme.read_text() == "# nothing here\n"


def test_write_alone_writes_the_page_the_block_lives_on(runs: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """``--write`` without a page: the block's own page (``ptq.atomic.BLOCK_PAGES``, from the repository root)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "results.md"
    page.write_text("# Results\n<!-- models:start -->\n<!-- models:end -->\n")
    assert T.main(["--runs", str(runs), "--write", "--block", "models"]) == 0
    assert "| AdaRound(Block)" in page.read_text() and page.read_text().endswith("<!-- models:end -->\n")
    assert T.main(["--runs", str(runs), "--block", "models", "--write"]) == 0  # the flag last: the same


def test_a_page_without_the_block_fails_before_any_run_is_read(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    page = tmp_path / "page.md"
    page.write_text("<!-- results:start -->\n<!-- results:end -->\n")
    # the runs dir does not exist: the page is checked first, so its error, not the runs', is the one line
    assert T.main(["--runs", str(tmp_path / "missing"), "--write", str(page), "--block", "models"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "models:start" in err and "does not exist" not in err
    assert T.main(["--runs", str(tmp_path / "missing"), "--write", "--block", "nonesuch"]) == 2
    assert "no page of its own" in capsys.readouterr().err
    assert T.main(["--runs", str(tmp_path / "missing"), "--write", str(tmp_path / "absent.md")]) == 2
    assert "page not found" in capsys.readouterr().err


def test_bad_input_exit_code_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert T.main(["--runs", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert T.main(["--runs", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "no runs found" in err and len(err.strip().splitlines()) == 1
    assert T.main(["--wandb", "not a spec"]) == 2
    assert "ENTITY/PROJECT" in capsys.readouterr().err


def test_csv_and_plots(runs: Path, tmp_path: Path) -> None:
    # a second rounding LR for the AdaRound run -> the LR chart is drawn too
    row = ROWS["ada_block_ivit"]
    write_run(runs / "extra", make_metrics(row, acc1=60.0), make_config(row, lr=1e-4))
    assert (
        T.main(["--runs", str(runs), "--csv", str(tmp_path / "t.csv"), "--plot", str(tmp_path / "png")]) == 0
    )
    csv = pd.read_csv(tmp_path / "t.csv")
    assert csv["Acc@1"].iloc[0] == 81.07 and "Acc@1 std" in csv
    pngs = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert pngs == ["acc1_by_config.png", "acc1_vs_lr.png"]
    import matplotlib.image as mpimg

    for p in (tmp_path / "png").iterdir():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = mpimg.imread(p)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    ok, _ = T.load_local_runs([runs])
    assert [p.name for p in T.plot(T.build_table(ok), tmp_path / "png2")] == ["acc1_by_config.png"]


def test_markdown_is_deterministic(runs: Path, tmp_path: Path) -> None:
    ok, failed = T.load_local_runs([runs])
    a = T.render(T.build_table(ok), T.failed_table(failed))
    b = T.render(T.build_table(list(reversed(ok))), T.failed_table(list(reversed(failed))))
    assert a == b
    lines = a.splitlines()
    assert lines[0].startswith("| [W]") and len({len(x) for x in lines[:6]}) == 1  # padded columns


class FakeSummary:
    """Quacks like wandb.apis.public HTTPSummary: keys()/items() only."""

    def __init__(self, d: dict) -> None:
        self._d = d

    def keys(self):  # noqa: ANN201
        return self._d.keys()

    def items(self):  # noqa: ANN201
        return iter(self._d.items())


def test_wandb_adapter_matches_local_loader(runs: Path) -> None:
    ok, failed = T.load_local_runs([runs])
    api_runs = []
    for d in sorted(p for p in runs.rglob("metrics.json")):
        metrics = json.loads(d.read_text())
        config = yaml.safe_load((d.parent / ".hydra" / "config.yaml").read_text())
        summary = {
            "name": metrics["name"],
            "status": "running",
            "run_dir": d.parent.as_posix(),
            **flatten({"row": metrics["row"]}),
        }  # what Tracker.start writes
        summary.update(
            flatten({k: v for k, v in metrics.items() if k not in SUMMARY_EXCLUDE})
        )  # Tracker.finish
        summary.update({"_runtime": 3.2, "_step": 7, "_wandb": {"runtime": 3}})
        state = "finished" if metrics["status"] == "ok" else "failed"
        api_runs.append(
            SimpleNamespace(
                config={**config, "_wandb": {"x": 1}},
                summary=FakeSummary(summary),
                state=state,
                name=metrics["name"],
                group="g1",
            )
        )
    # a crashed run (no finish) and a running one
    api_runs.append(
        SimpleNamespace(
            config={},
            summary={"name": "crashed", "status": "running", "run_dir": "zz/crash"},
            state="crashed",
            name="crashed",
            group=None,
        )
    )
    api_runs.append(SimpleNamespace(config={}, summary={}, state="running", name="live", group=None))
    got = T.rows_from_wandb_runs(reversed(api_runs))
    w_ok, w_failed = T.split_failed(got)
    assert w_ok == ok
    assert w_failed[:-1] == failed
    assert w_failed[-1]["name"] == "crashed" and "crashed" in w_failed[-1]["error"]
    pd.testing.assert_frame_equal(T.build_table(w_ok), T.build_table(ok))
