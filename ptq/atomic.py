"""Atomic file writes: a reader (or a crashed run's rerun) sees the old file or the new one, never half of one.

Also the one rewrite of a generated block between marker lines of a Markdown file (the README's
results block, the docs pages' blocks), and the one record of which page each block lives on.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write; renamed onto ``path`` when the block finishes,
    removed when it raises."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path | str, obj: dict) -> None:
    """Atomic JSON write: a reader sees the old file or the new one, never half of one."""
    import json

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))


# Which page (a path from the repository root) holds each generated block: the default page of every
# writer (``ptq.table --write``, ``ptq.bench --write``, ``scripts/fullsize_check.py --write``).
BLOCK_PAGES: dict[str, str] = {
    "results": "README.md",
    "models": "docs/results.md",
    "spread": "docs/results.md",
    "ablation": "docs/results.md",
    "recon": "docs/results.md",
    "recon_spread": "docs/results.md",
    "fieldq": "docs/results.md",
    "w4a4_screen": "docs/results.md",
    "w4a4_recipe": "docs/results.md",
    "w4a4_screen2": "docs/results.md",
    "w4a4_screen3": "docs/results.md",
    "w4a4_cpu": "docs/results.md",
    "softmax_in": "docs/act-quantizers.md",
    "actq": "docs/act-quantizers.md",
    "rounding_lr": "docs/sweeps.md",
    "granularity": "docs/sweeps.md",
    "adaround_spec": "docs/sweeps.md",
    "onnx": "docs/deployment.md",
    "perf": "docs/benchmarks.md",
    "recon_time": "docs/benchmarks.md",
    "fullsize": "docs/fullsize.md",
    "fullsize_deit": "docs/fullsize.md",
    "fullsize_swin": "docs/fullsize.md",
}


def block_page(block: str) -> Path:
    """The page ``block`` lives on (``BLOCK_PAGES``, relative to the repository root, where commands run);
    ValueError naming the known blocks for any other name."""
    if block not in BLOCK_PAGES:
        raise ValueError(f"block {block!r} has no page of its own (known: {', '.join(BLOCK_PAGES)}); "
                         "name the page to write")
    return Path(BLOCK_PAGES[block])


def check_block(path: Path | str, block: str) -> None:
    """Fail early, before the work whose result goes there: OSError unless ``path`` is readable, ValueError
    (as :func:`replace_block`) unless it holds ``block``'s two markers."""
    with open(path, encoding="utf-8", newline="") as f:
        replace_block(f.read(), block, "")


def block_markers(block: str) -> tuple[str, str]:
    """The HTML-comment lines around a generated block of a Markdown file (``<!-- perf:start -->`` ...)."""
    return f"<!-- {block}:start -->", f"<!-- {block}:end -->"


def replace_block(text: str, block: str, body: str) -> str:
    """``text`` with everything between ``block``'s markers replaced by ``body`` (its line ends as ``text``'s).

    ValueError naming the markers unless ``text`` holds exactly one start marker followed by one end marker.
    """
    start, end = block_markers(block)
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ValueError(f"needs exactly one '{start}' line followed by one '{end}' line, around the generated "
                         "block")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    nl = "\r\n" if "\r\n" in text else "\n"
    return head + start + nl + body.strip("\n").replace("\n", nl) + nl + end + tail


def write_block(path: Path | str, block: str, body: str) -> bool:
    """Replace ``block`` of the file at ``path`` by ``body``, atomically; every other byte stays as it was.

    The one writer of the generated blocks (``ptq.table``, ``ptq.bench``, ``scripts/fullsize_check.py``). Returns whether the
    file changed (an identical body leaves it untouched); FileNotFoundError, or ValueError as
    :func:`replace_block`.
    """
    path = Path(path)
    with open(path, encoding="utf-8", newline="") as f:
        old = f.read()
    new = replace_block(old, block, body)
    if new == old:
        return False
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(new)
    return True
