"""Markdown rendering of the table and replacement of a marked block of a page (README or docs)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd

from ptq.atomic import block_markers, block_page, check_block, write_block
from ptq.table.frame import METRICS
from ptq.table.sources import InputError

log = logging.getLogger("ptq.table")

DECIMALS = {"KL": 4}  # everything else: 2


def _fmt(v: Any) -> str:
    """A plain cell: NaN/None empty, floats in %g, everything else str."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def to_markdown(df: pd.DataFrame) -> str:
    """A padded Markdown table; metric cells as ``88.12`` or ``88.12 ± 0.31`` (std only when n > 1)."""
    shown = [c for c in df.columns if not str(c).endswith(" std")]
    cells: dict[str, list[str]] = {}
    for c in shown:
        col = df[c]
        if c in METRICS:
            d = DECIMALS.get(c, 2)
            std = df[f"{c} std"] if f"{c} std" in df else pd.Series(math.nan, index=df.index)
            many = df["n"] > 1 if "n" in df else pd.Series(False, index=df.index)
            mean_s = col.map(lambda v, d=d: "" if pd.isna(v) else f"{v:.{d}f}")
            std_s = std.map(lambda v, d=d: "" if pd.isna(v) else f" ± {v:.{d}f}")
            cells[c] = (mean_s + std_s.where(many & (mean_s != ""), "")).tolist()
        else:
            cells[c] = [_fmt(v) for v in col]
        cells[c] = [s.replace("|", "\\|").replace("\n", " ") for s in cells[c]]
    right = {c for c in shown if c in METRICS or c in ("W", "A", "n") or pd.api.types.is_numeric_dtype(df[c])}
    width = {c: max([len(str(c)), 3, *map(len, cells[c])]) for c in shown}

    def line(vals: list[str]) -> str:
        return (
            "| "
            + " | ".join(
                v.rjust(width[c]) if c in right else v.ljust(width[c])
                for c, v in zip(shown, vals, strict=True)
            )
            + " |"
        )

    sep = (
        "| "
        + " | ".join(("-" * (width[c] - 1) + ":") if c in right else "-" * width[c] for c in shown)
        + " |"
    )
    body = [line([cells[c][i] for c in shown]) for i in range(len(df))]
    return "\n".join([line([str(c) for c in shown]), sep, *body]) + "\n"


NOTE = (
    "Acc@1, Acc@5 and Agree (top-1 agreement with the float model) in %, KL = mean "
    "KL(float ‖ quantized); mean ± sample std over `n` runs (seeds). `Base` is the float "
    "model on the same evaluation split.\n"
)


def render(table: pd.DataFrame, failed: pd.DataFrame | None = None, interrupted: pd.DataFrame | None = None) -> str:
    """The full Markdown report: results table, note, then the failed and the interrupted runs."""
    text = to_markdown(table) + "\n" + NOTE
    if failed is not None and len(failed):
        text += "\n### Failed runs\n\n" + to_markdown(failed)
    if interrupted is not None and len(interrupted):
        text += "\n### Interrupted runs\n\n" + to_markdown(interrupted.rename(columns={"error": "what happened"}))
    return text


def markers(block: str = "results") -> tuple[str, str]:
    """The HTML-comment markers around a generated block."""
    return block_markers(block)


HOME = Path("<the block's page>")  # ``--write`` without a page: the page the block lives on


def page_for(page: Path, block: str) -> Path:
    """The page to write ``block`` to: ``page``, or for ``HOME`` the block's own page
    (``ptq.atomic.block_page``); InputError unless it exists and holds the block's markers."""
    try:
        page = block_page(block) if page == HOME else Path(page)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    if not page.is_file():
        raise InputError(f"page not found: {page}")
    try:
        check_block(page, block)
    except (OSError, ValueError) as exc:
        raise InputError(f"{page} {exc}") from None
    return page


def write_readme_block(readme: Path, text: str, block: str = "results") -> None:
    """Replace the text between the ``block`` markers of ``readme`` (``ptq.atomic.write_block``);
    InputError when the file or its markers are missing."""
    readme = Path(readme)
    if not readme.is_file():
        raise InputError(f"page not found: {readme}")
    try:
        write_block(readme, block, text)
    except ValueError as exc:
        raise InputError(f"{readme} {exc}") from None
