"""Range audit: largest integers per quantized tensor against the declared width."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ptq import pipeline
from ptq.quant import audit


def test_audit_on_the_embedded_default_reports_no_overflow(compose_cfg, tmp_path: Path) -> None:
    m = pipeline.run(compose_cfg("debug=quick", "nonlinear=ivit", "nonlinear.audit=true"), tmp_path / "r")
    rows = {r["tensor"]: r for r in m["audit"]}
    assert not any(r["overflow"] for r in rows.values())
    # integer kernels, accumulators and activation quantizers of every block are covered
    assert {"blocks.0.attn.probs_q.int", "blocks.0.mlp.gelu_q.int", "blocks.0.attn.ln_q.int",
            "blocks.0.mlp.fc1.acc", "blocks.0.attn.res_q", "head.fc.acc"} <= set(rows)
    assert rows["blocks.0.attn.res_q"]["bits"] == 16 and rows["blocks.0.attn.res_q"]["max_abs"] <= 2**15
    assert 0 < rows["blocks.0.attn.probs_q.int"]["max_abs"] <= 128  # UINT8 probabilities, 2**7 = one


def test_overflow_fails_loudly() -> None:
    rec = audit.RangeAudit()
    with audit.active(rec):
        audit.record("fine", torch.tensor([-128, 127]), 8)
        audit.record("wide", torch.tensor([0, 300]), 8)
    bad = [r["tensor"] for r in rec.report() if r["overflow"]]
    assert bad == ["wide"]
    with pytest.raises(audit.RangeOverflow, match="wide"):
        rec.check()
    audit.record("ignored", torch.tensor([10**6]), 8)  # no active audit: nothing recorded
    assert "ignored" not in rec.records
