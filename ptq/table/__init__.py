"""Results table in the seed's layout, from local run dirs or a W&B project.

``python -m ptq.table`` collects runs, aggregates repeated configurations
(same ``row``, different seeds) to mean ± std, and prints Markdown; it can
also rewrite a generated block (the README's results block, a docs page's block), write a CSV
and PNG charts.

Sources give the same *record* dicts (one per run)::

    {"name", "dir", "status": "ok" | "failed", "error", "row": {...},
     "acc1", "acc5", "fp_acc1", "fp_acc5", "agreement", "kl", "n_eval", "seed",
     "adaround.lr", "tracking.group", "config": {dotted key: value}}

Row order (matches the seed table): per model/data, the float ``Base`` row
first, then nonlinear (FP before I-ViT), then activation bits descending
(32 = no activation quantizer first), then weight quantizer (none < Abs <
AdaRound Layer < Block < Encoder < Model), then weight bits descending, then
activation quantizer (Mov < LSQ), then ``--by`` values ascending, then name.
"""

from ptq.table.cli import main
from ptq.table.frame import build_table, failed_table
from ptq.table.markdown import HOME, markers, page_for, render, to_markdown, write_readme_block
from ptq.table.plots import plot
from ptq.table.sources import (
    InputError,
    load_local_runs,
    load_wandb_runs,
    make_record,
    rows_from_wandb_runs,
    split_failed,
)

__all__ = ["HOME", "InputError", "build_table", "failed_table", "load_local_runs", "load_wandb_runs", "main", "make_record",
           "markers", "page_for", "plot", "render", "rows_from_wandb_runs", "split_failed", "to_markdown", "write_readme_block"]
