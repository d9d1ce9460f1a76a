"""The README as a front door and the docs pages behind it: short, every page linked, every link and anchor
resolving, every generated block on the page its writer writes, every writer command shown naming a page
that holds its block."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest

from conftest import ROOT
from ptq.atomic import BLOCK_PAGES, block_page, check_block
from ptq.bench.cli import parser as bench_parser
from ptq.bench.cli import write_pages
from ptq.bench.plans import ONNX_BLOCK, PERF_BLOCK
from ptq.table.cli import _parser as table_parser
from ptq.table.markdown import page_for

README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
MARKER = re.compile(r"^<!-- (\w+):start -->$", re.M)
WRITER = re.compile(r"(?:python -m ptq\.(?:table|bench)|python scripts/fullsize_check\.py)\b(?:[^`\n\\]|\\\n)*")


def _fullsize():
    spec = importlib.util.spec_from_file_location("fullsize_check", ROOT / "scripts" / "fullsize_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", text, re.M)}


def test_readme_is_a_front_door() -> None:
    """Under 250 lines; the set-up and test commands (``.ci/run`` runs ``make test``), the headline run, the
    main results block and the deployment snippet are on it."""
    text = README.read_text()
    assert text.count("\n") <= 250
    assert "make run" in text and "make test" in text and "make test" in (ROOT / ".ci" / "run").read_text()
    assert "python -m ptq.main wquant=adaround granularity=block wbits=4 nonlinear=ivit export=true" in text
    assert MARKER.findall(text) == ["results"] and "ort.InferenceSession(" in text


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = {(README.parent / t.split("#")[0]).resolve() for t in LINK.findall(README.read_text())}
    missing = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not missing, f"docs pages the README does not link to: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_and_anchors_resolve(page: Path) -> None:
    """Every relative link or image of a page names a file that exists, and an anchor a heading of its page."""
    bad = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor} on {dest.name}")
    assert not bad, f"{page.name}: " + "; ".join(bad)


def test_every_block_is_on_its_page_and_every_page_block_is_known() -> None:
    for block in BLOCK_PAGES:
        check_block(ROOT / block_page(block), block)  # its two markers, exactly once
    found = {b: p.relative_to(ROOT).as_posix() for p in PAGES for b in MARKER.findall(p.read_text())}
    assert found == BLOCK_PAGES
    assert block_page("results") == Path("README.md") and block_page(PERF_BLOCK) != block_page(ONNX_BLOCK)
    with pytest.raises(ValueError, match="no page of its own"):
        block_page("nonesuch")


def writer_commands() -> list[str]:
    """Every ``ptq.table`` / ``ptq.bench`` / ``scripts/fullsize_check.py`` command of the pages that writes a
    block (``--write``, or its old name ``--readme``), continuations joined, comments dropped."""
    out = []
    for page in PAGES:
        for m in WRITER.finditer(page.read_text()):
            cmd = re.split(r"\s#\s", re.sub(r"\\\n\s*", " ", m.group(0)), maxsplit=1)[0]
            if re.search(r"--(write|readme)\b", cmd):
                out.append(" ".join(cmd.split()))
    return out


def test_every_writer_command_names_a_page_holding_its_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a reader runs to regenerate a block reaches that block: the page named, or the block's own page
    for ``--write`` alone, holds the markers (each writer checks this first, and stops with one line)."""
    monkeypatch.chdir(ROOT)  # pages are named from the repository root, where the commands run
    cmds = writer_commands()
    assert sum("ptq.table" in c for c in cmds) >= 8 and any("ptq.bench" in c for c in cmds)
    assert sum("fullsize_check" in c for c in cmds) == 3
    fullsize = _fullsize().parser()
    bad = []
    for cmd in cmds:
        args = shlex.split(cmd)
        try:
            if "ptq.table" in cmd:
                a = table_parser().parse_args(args[3:])
                page_for(a.write, a.block)
            elif "ptq.bench" in cmd:
                a = bench_parser().parse_args(args[3:])
                blocks = [ONNX_BLOCK] if a.onnx else [PERF_BLOCK] + ([] if a.skip_onnx else [ONNX_BLOCK])
                for block in blocks:
                    check_block(write_pages(a.write)[block], block)
            else:
                a = fullsize.parse_args(args[2:])
                _fullsize().page_for(a.write, a.block)
        except (Exception, SystemExit) as exc:
            bad.append(f"{cmd}: {type(exc).__name__}: {exc}")
    assert not bad, "\n".join(bad)


REPORT = {"model": "vit_b_16", "status": "ok", "wall_s": 1.0, "seconds": {"calibrate": 0.5}, "peak_rss_gib": 1.0,
          "cache_mib": 0.1, "run_dir_mib": 2.0, "quant_state_mib": 0.3, "intexec": {"mismatches": 0, "n": 4},
          "largest_accumulator": {"matmul": "scores", "max_abs": 100, "bits": 8, "fits_int32": True}}


def test_fullsize_check_writes_its_page_and_checks_it_before_the_run(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """``--write`` alone: the block's own page (docs/fullsize.md); a page without the block stops the script
    with one line before the quarter-hour run makes its data."""
    mod = _fullsize()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "fullsize.md"
    page.write_text("# F\n<!-- fullsize_deit:start -->\n<!-- fullsize_deit:end -->\n")
    with pytest.raises(SystemExit) as exit_info:
        mod.main(["--work", str(tmp_path / "work"), "--write"])  # the page lacks the fullsize block
    assert exit_info.value.code == 2 and "fullsize:start" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()
    report = tmp_path / "report.json"
    report.write_text(json.dumps(REPORT))
    assert mod.main(["--from-json", str(report), "--write", "--block", "fullsize_deit"]) == 0
    assert "| integer program vs simulation | mismatches=0/4 |" in page.read_text()
