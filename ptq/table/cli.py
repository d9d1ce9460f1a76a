"""``python -m ptq.table``: collect runs, print the table, write the README's and docs pages' blocks, CSV and charts."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from ptq.table.frame import build_table, failed_table
from ptq.table.markdown import HOME, page_for, render, write_readme_block
from ptq.table.plots import plot
from ptq.table.sources import DEFAULT_RUNS, InputError, load_local_runs, load_wandb_runs, split_failed

log = logging.getLogger("ptq.table")

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ptq.table", description="Results table in the seed's layout, from local run dirs or a W&B project.")
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--runs", nargs="+", metavar="DIR", help="run/sweep dirs to scan (default: outputs/ multirun/)"
    )
    src.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read runs from a W&B project instead")
    p.add_argument("--group", help="only runs whose tracking.group (W&B group) is G")
    p.add_argument(
        "--by",
        action="append",
        default=[],
        metavar="KEY",
        help="extra grouping column from the config, e.g. adaround.lr (repeatable)",
    )
    p.add_argument("--write", type=Path, nargs="?", const=HOME, metavar="PAGE",
                   help="replace the --block of PAGE; --write alone: of the page that block lives on "
                        "(ptq.atomic.BLOCK_PAGES: README.md for results)")
    p.add_argument("--block", default="results",
                   help="name of the block to replace: <!-- NAME:start --> ... <!-- NAME:end --> (default results)")
    p.add_argument("--csv", type=Path, metavar="FILE", help="write the table as CSV")
    p.add_argument("--plot", type=Path, metavar="DIR", help="write PNG charts into DIR")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; 0 on success, 2 on bad input (one line on stderr)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    try:
        if args.write is not None:  # a page without the block's markers fails before any run is read
            args.write = page_for(args.write, args.block)
        if args.wandb:
            ok, failed = split_failed(load_wandb_runs(args.wandb, args.group))
            where = f"W&B project {args.wandb}"
        else:
            paths = args.runs or [d for d in DEFAULT_RUNS if Path(d).exists()]
            ok, failed = load_local_runs(paths)
            where = " ".join(map(str, args.runs or DEFAULT_RUNS))
        if args.group is not None:
            ok, failed = ([r for r in rs if r["tracking.group"] == args.group] for rs in (ok, failed))
            where += f" (group {args.group})"
        if not ok and not failed:
            raise InputError(f"no runs found in {where}")
        table = build_table(ok, args.by)
        text = render(table, failed_table(r for r in failed if r["status"] == "failed"),
                      failed_table((r for r in failed if r["status"] == "interrupted"), limit=None))
        print(text, end="")
        if args.write:
            write_readme_block(args.write, text, args.block)
        if args.csv:
            args.csv.parent.mkdir(parents=True, exist_ok=True)
            table.to_csv(args.csv, index=False)
        if args.plot:
            for path in plot(ok, args.plot, args.by):
                log.info("wrote %s", path)
    except InputError as exc:
        print(f"ptq.table: error: {exc}", file=sys.stderr)
        return 2
    return 0

