"""Export a run's integer program and check it against the fake-quant simulation, bit for bit.

``export_and_verify`` is what the pipeline calls at the end of a run with
``export=true``; ``python -m ptq.intexec RUN_DIR`` does the same for any finished
``nonlinear=ivit`` run, rebuilding its quantized model from ``quant_state.pt``
(``ptq.intexec.rebuild``; checked against the run's own logits first), reusing an
artefact already in ``RUN_DIR/intexec`` (so a tampered one is caught), and prints
``mismatches=K/N`` (exit status 0 only when K is 0). ``--runs DIR`` does this for every
run under a sweep dir.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from ptq.intexec.build import build_program
from ptq.intexec.interp import GRAPH_FILE, ArtefactError, Interpreter, Program, load_program, save_program
from ptq.intexec.rebuild import NotReproduced, NotVerifiable, check_fingerprint, load_run_model
from ptq.intexec.widths import WidthRecorder
from ptq.quant import audit
from ptq.quant.vit import QuantViT
from ptq.rundir import find_run_dirs
from ptq.runspec import eval_set

log = logging.getLogger(__name__)

ARTEFACT_DIR = "intexec"
WIDTHS_FILE = "widths.json"
BATCH_SIZE = 128

Images = Tensor | Dataset | Iterable


def input_spec_of(cfg: Any) -> dict[str, Any]:
    """The float image the program expects: size and normalisation of the config's data set."""
    if cfg.data.name == "digits":
        from ptq.data.digits import DIGITS_MEAN, DIGITS_STD

        return {"normalisation": {"mean": [DIGITS_MEAN] * 3, "std": [DIGITS_STD] * 3,
                                  "formula": "(pixel - mean) / std, pixels in [0, 1]",
                                  "source": "ptq.data.digits (grey digits repeated on 3 channels)"}}
    if cfg.data.name == "imagenet":
        from torchvision.models import ViT_B_16_Weights

        t = ViT_B_16_Weights.IMAGENET1K_V1.transforms()
        return {"normalisation": {"mean": list(t.mean), "std": list(t.std),
                                  "formula": "(pixel - mean) / std, RGB pixels in [0, 1]",
                                  "resize": list(t.resize_size), "crop": list(t.crop_size),
                                  "interpolation": str(t.interpolation.value),
                                  "source": "torchvision ViT_B_16_Weights.IMAGENET1K_V1.transforms()"}}
    return {}


def eval_images(cfg: Any, limit: int | None = None) -> Dataset:
    """The run's eval set (the pipeline's subset of the eval split), optionally its first ``limit`` images."""
    ds = eval_set(cfg)
    if limit is not None and limit < len(ds):  # type: ignore[arg-type]
        ds = Subset(ds, list(range(limit)))
    return ds


def _batches(images: Images, batch_size: int) -> Iterator[Tensor]:
    """Image batches from a tensor, a dataset of (image, label) items or an iterable of batches."""
    if isinstance(images, Tensor):
        yield from images.split(batch_size)
        return
    if isinstance(images, Dataset):
        images = DataLoader(images, batch_size=batch_size, shuffle=False)
    for b in images:
        yield b[0] if isinstance(b, (list, tuple)) else b


# ----------------------------------------------------------------------------- checking


@torch.no_grad()
def simulate(qmodel: QuantViT, image: Tensor) -> tuple[Tensor, Tensor]:
    """The simulation's head accumulator (int64, exact integers) and logits for one batch."""
    got: list[Tensor] = []
    handle = qmodel.head.fc.register_forward_hook(lambda mod, args, out: got.append(out.v))
    try:
        dev = next(qmodel.parameters()).device
        logits = qmodel(image.to(dev))
    finally:
        handle.remove()
    acc = got[0]
    if not bool((acc == acc.round()).all()):
        raise ValueError("the simulation's head accumulator is not integer (not an integer-only model?)")
    return acc.to(torch.int64).cpu(), logits.float().cpu()


def _same_bits(a: Tensor, b: Tensor) -> Tensor:
    """Per row: float32 tensors equal bit for bit."""
    return (a.contiguous().view(torch.int32) == b.contiguous().view(torch.int32)).all(-1)


class _Capture(audit.RangeAudit):
    """Audit recorder that keeps the simulation's named integer tensors (last batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.tensors: dict[str, Tensor] = {}

    def record(self, name: str, q: Tensor, bits: int, signed: bool) -> None:
        self.tensors[name] = q.detach().cpu()


@torch.no_grad()
def diff_trace(qmodel: QuantViT, program: Program, image: Tensor) -> list[dict[str, Any]]:
    """Per program value the simulation also names: how many elements differ (first divergence locates a bug)."""
    cap = _Capture()
    with audit.active(cap):
        qmodel(image.to(next(qmodel.parameters()).device))
    env = Interpreter(program).run(image, keep=True)
    rows = []
    for op in program.ops:
        name = op["out"]
        if name not in cap.tensors:
            continue
        sim, got = cap.tensors[name], env[name]
        if sim.shape != got.shape:
            rows.append({"tensor": name, "differ": -1, "of": got.numel(), "note": f"shape {tuple(sim.shape)}"})
            continue
        sim = sim.to(torch.int64) if sim.is_floating_point() else sim
        rows.append({"tensor": name, "differ": int((sim != got).sum()), "of": got.numel(),
                     "max_abs_diff": int((sim - got).abs().max()) if got.numel() else 0})
    return rows


def verify_program(qmodel: QuantViT, program: Program, images: Images, batch_size: int = BATCH_SIZE,
                   keep_logits: bool = False) -> dict[str, Any]:
    """Run the simulation and the integer program on every image; count images whose outputs differ.

    An image mismatches when its head accumulator (exact integers) or its logits
    (float32, bit for bit after the identical dequantization) differ.
    """
    interp = Interpreter(program)
    rec = WidthRecorder(program.graph)
    acc_name, out_name = program.graph["output"]["accumulator"], program.graph["output"]["name"]
    n = bad = 0
    first_bad: Tensor | None = None
    sim_logits: list[Tensor] = []
    for x in tqdm(_batches(images, batch_size), desc="intexec verify", unit="batch", leave=False):
        acc_sim, logits_sim = simulate(qmodel, x)
        if keep_logits:
            sim_logits.append(logits_sim)
        out = interp.run(x, hook=rec)
        ok = (out[acc_name] == acc_sim).all(-1) & _same_bits(out[out_name], logits_sim)
        n += int(ok.numel())
        bad += int((~ok).sum())
        if first_bad is None and not bool(ok.all()):
            first_bad = x[~ok][:8]
    if first_bad is not None:
        rows = [r for r in diff_trace(qmodel, program, first_bad) if r["differ"]]
        log.error("integer program differs from the simulation; first diverging tensors: %s", rows[:5])
    res = {"exact": bad == 0, "mismatches": bad, "n": n, "widths": rec.report(program.tensors)}
    if keep_logits:  # the simulated logits (``verify_run`` checks them against the run's fingerprint)
        res["logits"] = torch.cat(sim_logits) if sim_logits else torch.empty(0)
    return res


def _log_widths(widths: dict[str, Any]) -> None:
    s = widths["summary"]
    for kind, k in s["matmuls"].items():
        log.info("accumulator %-11s max|acc|=%-11d needs %2d bits (INT32 %s, %d layers)", kind, k["max_abs"],
                 k["bits"], "ok" if k["fits_int32"] else "OVERFLOW", k["layers"])
    if s["over_declared_width"]:
        log.warning("%d tensor(s) exceed their declared width: %s", len(s["over_declared_width"]),
                    "; ".join(s["over_declared_width"][:10]))


def _check_and_report(qmodel: QuantViT, art: Path, images: Images, batch_size: int) -> dict[str, Any]:
    program = load_program(art)
    res = verify_program(qmodel, program, images, batch_size)
    (art / WIDTHS_FILE).write_text(json.dumps(res["widths"], indent=1))
    _log_widths(res["widths"])
    return res


def export_and_verify(qmodel: QuantViT, cfg: Any, run_dir: Path | str, images: Images,
                      batch_size: int = BATCH_SIZE) -> dict[str, Any]:
    """Export ``run_dir/intexec`` (program, tensors, widths.json), reload it, check it on ``images``.

    Returns ``{exact, mismatches, n, artefact, widths}`` with the widths summary (the
    full report is ``widths.json``), for ``metrics["intexec"]``.
    """
    art = Path(run_dir) / ARTEFACT_DIR
    meta = {"config": OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg}
    save_program(build_program(qmodel, input_spec_of(cfg), meta), art)
    res = _check_and_report(qmodel, art, images, batch_size)
    log.info("integer program vs simulation: mismatches=%d/%d", res["mismatches"], res["n"])
    return {"exact": res["exact"], "mismatches": res["mismatches"], "n": res["n"], "artefact": str(art),
            "widths": res["widths"]["summary"]}


# ----------------------------------------------------------------------------- CLI


def verify_run(run_dir: Path, out: Path | None = None, reexport: bool = False, images: int | None = None,
               batch_size: int = BATCH_SIZE, write: bool = True) -> dict[str, Any]:
    """Rebuild a finished run's model, export (unless an artefact exists) and verify it.

    ``write=False`` checks an in-memory program where the run dir holds none (``--runs``
    leaves sweep dirs as they were). Raises NotVerifiable (one line: why, what to do) and
    ArtefactError for a broken artefact.
    """
    qmodel, cfg, check = load_run_model(run_dir)
    art = out or run_dir / ARTEFACT_DIR
    if reexport or not (art / GRAPH_FILE).is_file():
        program = build_program(qmodel, input_spec_of(cfg), {"config": OmegaConf.to_container(cfg, resolve=True)})
        if write:
            save_program(program, art)
            program = load_program(art)
    else:
        log.info("verifying the existing artefact %s", art)
        program = load_program(art)
    res = verify_program(qmodel, program, eval_images(cfg, images), batch_size, keep_logits=True)
    check_fingerprint(res.pop("logits"), check, run_dir)
    if write:
        (art / WIDTHS_FILE).write_text(json.dumps(res["widths"], indent=1))
    _log_widths(res["widths"])
    return {**res, "name": cfg.get("name")}


def _verify_all(top: Path, batch_size: int) -> int:
    """``--runs``: one line per run dir under ``top``, then a total; exit 1 on any mismatch, 2 if none verified."""
    dirs = find_run_dirs(top) if top.is_dir() else []
    if not dirs:
        log.error("no run dirs under %s", top)
        return 2
    bad = n = verified = failed = 0
    for d in dirs:
        try:
            res = verify_run(d, batch_size=batch_size, write=False)
        except NotReproduced as exc:
            print(f"differs  {d.as_posix()}  {exc}")
            failed += 1
            continue
        except NotVerifiable as exc:
            print(f"skipped  {d.as_posix()}  {exc}")
            continue
        except ArtefactError as exc:
            print(f"broken   {d.as_posix()}  {exc}")
            failed += 1
            continue
        verified += 1
        bad, n = bad + res["mismatches"], n + res["n"]
        failed += int(not res["exact"])
        print(f"mismatches={res['mismatches']}/{res['n']}  {d.as_posix()}")
    print(f"total: mismatches={bad}/{n} over {verified} verified run(s), {len(dirs) - verified} not verified")
    if failed:
        return 1
    return 0 if verified else 2


def main(argv: list[str] | None = None) -> int:
    """``python -m ptq.intexec RUN_DIR`` or ``--runs DIR``: export (unless present) and verify; 0 only when exact."""
    ap = argparse.ArgumentParser(prog="python -m ptq.intexec", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path, nargs="?", help="a finished nonlinear=ivit run dir")
    ap.add_argument("--runs", type=Path, metavar="DIR", help="verify every run under DIR (e.g. a multirun sweep dir)")
    ap.add_argument("--out", type=Path, default=None, help="artefact dir (default RUN_DIR/intexec)")
    ap.add_argument("--reexport", action="store_true", help="rebuild the artefact even if one exists")
    ap.add_argument("--images", type=int, default=None, help="check only the first N eval images")
    ap.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if (args.run_dir is None) == (args.runs is None):
        ap.error("give one run dir, or --runs DIR")
    if args.images is not None and args.images < 1:
        ap.error(f"--images must be at least 1, got {args.images}")
    if args.runs is not None:
        return _verify_all(args.runs, args.batch_size)
    try:
        res = verify_run(args.run_dir, args.out, args.reexport, args.images, args.batch_size)
    except (NotVerifiable, ArtefactError) as exc:
        log.error("%s", exc)
        return 2
    print(f"mismatches={res['mismatches']}/{res['n']}")
    return 0 if res["exact"] else 1


def check_exportable(cfg: Any) -> None:
    """ConfigError unless the run's model is integer-only (what ``export=true`` needs), before anything heavy."""
    from ptq.config import ConfigError

    bad = []
    if cfg.nonlinear.name != "ivit":
        bad.append(f"nonlinear={cfg.nonlinear.name} (needs ivit)")
    if cfg.aquant.name == "none":
        bad.append("aquant=none (needs integer activations)")
    if cfg.wquant.name == "none":
        bad.append("wquant=none (needs integer weights)")
    if not cfg.aquant.quant_io:
        bad.append("aquant.quant_io=false (the input and final-LN quantizers are part of the integer graph)")
    if bad:
        raise ConfigError("export=true needs an integer-only model: " + "; ".join(bad))
