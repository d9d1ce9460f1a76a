"""PNG charts of a results table: top-1 and KL per configuration, top-1 and KL against the rounding LR."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

from ptq.table.frame import _table_columns, build_table
from ptq.table.markdown import _fmt

log = logging.getLogger("ptq.table")

def plot(data: pd.DataFrame | Iterable[dict], out_dir: Path, by: Sequence[str] = ()) -> list[Path]:
    """PNG charts: Acc@1 per configuration (float baseline as a line) and, when
    AdaRound runs differ in ``adaround.lr``, Acc@1 against the rounding LR per configuration.

    ``data`` is a table from :func:`build_table` (the LR chart then needs an
    ``adaround.lr`` column) or a list of records.
    """
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(data, pd.DataFrame):
        table, lr_table = data, (data if "adaround.lr" in data else None)
    else:
        records = list(data)
        table = build_table(records, by)
        lr_table = build_table(records, ["adaround.lr"])
    written: list[Path] = []
    extra = [c for c in table.columns if c not in _table_columns([], True)]
    base = table[table["[W]"] == "Base"]
    quant = table[table["[W]"] != "Base"]
    if len(quant):
        labels = [
            " ".join([name] + [f"{k}={_fmt(r[k])}" for k in extra if _fmt(r[k])])
            for name, (_, r) in zip(quant["Name"], quant.iterrows(), strict=True)
        ]
        fig = Figure(figsize=(12, 1.2 + 0.35 * len(quant)), layout="constrained")
        ax, ax_kl = fig.subplots(1, 2, sharey=True, width_ratios=[3, 2])
        y = list(range(len(quant)))[::-1]
        # KL to the float model on a log axis: it separates configurations whose top-1 barely moves
        kl = pd.to_numeric(quant["KL"], errors="coerce").clip(lower=1e-6)
        ax_kl.barh(y, kl, color="tab:orange")
        for yi, v in zip(y, kl, strict=True):
            ax_kl.text(v, yi, f" {v:.2g}", va="center", fontsize=7)
        ax_kl.set_xscale("log")
        ax_kl.set_xlabel("mean KL(float || quantized), log scale")
        ax_kl.set_title("Fidelity to the float model")
        ax.barh(y, quant["Acc@1"], xerr=quant["Acc@1 std"].fillna(0), color="tab:blue", capsize=2)
        for yi, v in zip(y, quant["Acc@1"], strict=True):
            ax.text(v, yi, f" {v:.2f}", va="center", fontsize=7)
        for _, b in base.iterrows():
            ax.axvline(
                b["Acc@1"],
                color="tab:red",
                ls="--",
                lw=1,
                label=" ".join(filter(None, ["float", b.get("Model"), f"{b['Acc@1']:.2f}"])),
            )
        ax.set_yticks(y, labels, fontsize=7)
        ax.set_xlabel("Acc@1 (%)")
        ax.set_xlim(0, max(100.0, float(quant["Acc@1"].max()) * 1.05))
        if len(base):
            ax.legend(loc="lower right", fontsize=7)
        ax.set_title("Top-1 accuracy by configuration")
        written.append(out_dir / "acc1_by_config.png")
        fig.savefig(written[-1], dpi=120)

    if lr_table is not None:
        ada = lr_table[lr_table["[W]"].str.startswith("AdaRound") & lr_table["adaround.lr"].notna()]
        ada = ada.assign(lr=pd.to_numeric(ada["adaround.lr"], errors="coerce")).dropna(subset=["lr"])
        if ada["lr"].nunique() > 1:
            fig = Figure(figsize=(12, 4.5), layout="constrained")
            ax, ax_kl = fig.subplots(1, 2)
            for name, g in ada.groupby("Name", sort=True):
                g = g.sort_values("lr")
                ax.errorbar(
                    g["lr"], g["Acc@1"], yerr=g["Acc@1 std"].fillna(0), marker="o", capsize=3, label=name
                )
                ax_kl.plot(g["lr"], pd.to_numeric(g["KL"], errors="coerce"), marker="o", label=name)
            ax_kl.set_xscale("log")
            ax_kl.set_yscale("log")
            ax_kl.set_xlabel("AdaRound rounding LR (adaround.lr)")
            ax_kl.set_ylabel("mean KL(float || quantized)")
            ax_kl.set_title("Fidelity to the float model vs rounding LR")
            ax_kl.legend(fontsize=7)
            for _, b in lr_table[lr_table["[W]"] == "Base"].iterrows():
                ax.axhline(b["Acc@1"], color="tab:red", ls="--", lw=1, label=f"float {b['Acc@1']:.2f}")
            ax.set_xscale("log")
            ax.set_xlabel("AdaRound rounding LR (adaround.lr)")
            ax.set_ylabel("Acc@1 (%)")
            ax.set_title("Top-1 accuracy vs rounding LR")
            ax.legend(fontsize=7)
            written.append(out_dir / "acc1_vs_lr.png")
            fig.savefig(written[-1], dpi=120)
    return written
