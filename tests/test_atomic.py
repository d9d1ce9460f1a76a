"""ptq.atomic: a write either lands whole or leaves the old file, and no temporary behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from ptq.atomic import atomic_path, block_markers, replace_block, write_block


def test_write_lands_whole_and_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    with atomic_path(target) as tmp:
        tmp.write_text("new")
        assert not target.exists()  # nothing visible until the block finishes
    assert target.read_text() == "new"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_block_rewrite_keeps_every_other_byte_and_refuses_without_markers(tmp_path: Path) -> None:
    start, end = block_markers("perf")
    assert (start, end) == ("<!-- perf:start -->", "<!-- perf:end -->")
    readme = tmp_path / "README.md"
    head, tail = "# T\r\nintro ü\r\n" + start, end + "\r\n## After\r\ntrailing   \r\n"
    readme.write_bytes((head + "\r\nold\r\n" + tail).encode())
    assert write_block(readme, "perf", "new\nlines\n")
    assert readme.read_bytes() == (head + "\r\nnew\r\nlines\r\n" + tail).encode()  # CRLF file keeps CRLF
    stamp = readme.stat().st_mtime_ns
    assert not write_block(readme, "perf", "new\nlines") and readme.stat().st_mtime_ns == stamp  # unchanged: untouched
    assert replace_block("a\n" + start + "x" + end + "\n", "perf", "y") == "a\n" + start + "\ny\n" + end + "\n"
    for bad in ("no markers\n", end + start, start + start + end):
        with pytest.raises(ValueError, match="perf:start"):
            replace_block(bad, "perf", "y")
    before = readme.read_bytes()
    with pytest.raises(ValueError, match="results:start"):
        write_block(readme, "results", "y")
    assert readme.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]
