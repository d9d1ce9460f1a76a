"""Export a run's integer ONNX model and check it on onnxruntime against the simulation, bit for bit.

``export_and_verify`` is what the pipeline calls at the end of a run with ``export=true``;
``python -m ptq.intexec RUN_DIR`` does the same for any finished ``nonlinear=ivit`` run,
rebuilding its quantized model from ``quant_state.pt`` (``ptq.intexec.rebuild``; checked
against the run's own logits first), reusing a ``model.onnx`` already in ``RUN_DIR/intexec``
(checked against its manifest's sha256, so a damaged one is refused), and prints
``mismatches=K/N`` (exit status 0 only when K is 0). ``--runs DIR`` does this for every run
under a sweep dir.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from ptq.atomic import atomic_path
from ptq.intexec import artefact
from ptq.intexec.artefact import MODEL_FILE, ArtefactError
from ptq.intexec.build import HEAD_ACC, INPUT, OUTPUT, OUTPUT_INT, build_onnx
from ptq.intexec.rebuild import NotReproduced, NotVerifiable, check_fingerprint, load_run_model
from ptq.intexec.simcheck import capture, simulate
from ptq.intexec.variants import int8_weights, u8s8_exact
from ptq.intexec.widths import WidthRecorder
from ptq.quant.vit import QuantModel
from ptq.rundir import find_run_dirs
from ptq.runspec import eval_set

log = logging.getLogger(__name__)

ARTEFACT_DIR = "intexec"
WIDTHS_FILE = "widths.json"
BATCH_SIZE = 128
WIDTH_IMAGES = 512  # widths.json: ranges over the first eval images (every image is still verified)

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


def _same_bits(a: Tensor, b: Tensor) -> Tensor:
    """Per row: float32 tensors equal bit for bit."""
    return (a.contiguous().view(torch.int32) == b.contiguous().view(torch.int32)).all(-1)


def _feed(x: Tensor) -> dict[str, np.ndarray]:
    return {INPUT: x.detach().float().cpu().contiguous().numpy()}


def diff_trace(qmodel: QuantModel, debug: Any, image: Tensor) -> list[dict[str, Any]]:
    """Per named integer value, in graph order: how many elements the ONNX model and the simulation
    disagree on (the first row with ``differ > 0`` is the first diverging tensor). ``debug``: a session
    over the debug export (every named value an output)."""
    sim = capture(qmodel, image)
    names = [o.name for o in debug.get_outputs()]
    rows = []
    for name, got in zip(names, debug.run(None, _feed(image)), strict=True):
        if name not in sim:
            continue
        want = sim[name].double().numpy()
        if want.shape != got.shape:
            rows.append({"tensor": name, "differ": -1, "of": got.size, "note": f"shape {want.shape} vs {got.shape}"})
            continue
        diff = want != got.astype(np.float64)
        rows.append({"tensor": name, "differ": int(diff.sum()), "of": int(got.size),
                     "max_abs_diff": float(np.abs(want - got).max()) if got.size else 0.0})
    return rows


def _agrees(sess: Any, feed: dict[str, np.ndarray], acc_sim: Tensor, logits_sim: Tensor) -> Tensor:
    """Per image: the session's ``logits_int`` and ``logits`` equal the simulation's, bit for bit."""
    logits, acc = sess.run([OUTPUT, OUTPUT_INT], feed)
    return (torch.from_numpy(acc).to(torch.int64) == acc_sim).all(-1) & _same_bits(torch.from_numpy(logits),
                                                                                  logits_sim)


def _guarded(sess: Any, feed: dict[str, np.ndarray]) -> bool:
    """A variant this CPU cannot run exactly says so: every logit NaN, every integer logit INT32_MIN."""
    logits, acc = sess.run([OUTPUT, OUTPUT_INT], feed)
    return bool(np.isnan(logits).all() and (acc == np.iinfo(np.int32).min).all())


def verify_program(qmodel: QuantModel, model: onnx.ModelProto, decl: dict[str, Any], images: Images,
                   batch_size: int = BATCH_SIZE, keep_logits: bool = False,
                   variants: dict[str, onnx.ModelProto] | None = None) -> dict[str, Any]:
    """Run the simulation and the ONNX model (onnxruntime) on every image; count images whose outputs differ.

    An image mismatches when ``logits_int`` (exact integers) or ``logits`` (float32, bit for bit
    after the identical dequantization) differ, in the model or in any of its ``variants`` this
    CPU runs exactly (``ptq.intexec.variants.u8s8_exact``); a variant it cannot run must flag
    every output instead (its guard). The widths report comes from the same model with
    its named integer values (``decl``) exposed as outputs, run on the first ``WIDTH_IMAGES``
    images; on a mismatch that copy also names the first diverging tensors.
    """
    sess = artefact.session(model.SerializeToString())
    debug = artefact.session(artefact.with_outputs(model, list(decl["values"])).SerializeToString())
    fast = {k: artefact.session(v.SerializeToString()) for k, v in (variants or {}).items()}
    runnable = u8s8_exact()
    fast_bad = dict.fromkeys(fast, 0)
    guarded: dict[str, bool] = {}
    names = [o.name for o in debug.get_outputs()]
    rec = WidthRecorder(decl)
    n = bad = 0
    first_bad: Tensor | None = None
    sim_logits: list[Tensor] = []
    for x in tqdm(_batches(images, batch_size), desc="intexec verify (onnxruntime)", unit="batch", leave=False):
        acc_sim, logits_sim = simulate(qmodel, x)
        if keep_logits:
            sim_logits.append(logits_sim)
        feed = _feed(x)
        ok = _agrees(sess, feed, acc_sim, logits_sim)
        for k, fs in fast.items():
            if runnable:
                fok = _agrees(fs, feed, acc_sim, logits_sim)
                fast_bad[k] += int((~fok).sum())
                ok = ok & fok
            elif k not in guarded:  # one batch shows the guard
                guarded[k] = _guarded(fs, feed)
        if rec.images < WIDTH_IMAGES:  # the debug copy costs a second pass: ranges from the first images
            named = dict(zip(names, debug.run(None, feed), strict=True))
            rec.update({**named, HEAD_ACC: named[OUTPUT_INT]}, int(x.shape[0]))
        n += int(ok.numel())
        bad += int((~ok).sum())
        if first_bad is None and not bool(ok.all()):
            first_bad = x[~ok][:8]
    if first_bad is not None:
        rows = [r for r in diff_trace(qmodel, debug, first_bad) if r["differ"]]
        log.error("the ONNX model differs from the simulation; first diverging tensors: %s", rows[:5])
    report = {k: {"runnable": True, "mismatches": fast_bad[k], "n": n} if runnable else
              {"runnable": False, "guarded": guarded.get(k, False)} for k in fast}
    for k, r in report.items():
        if not r["runnable"]:
            log.info("%s variant not run: this CPU's uint8 x int8 kernel saturates; its guard %s", k,
                     "flags every output (as it must)" if r["guarded"] else "DID NOT FIRE")
    exact = bad == 0 and all(r["runnable"] or r["guarded"] for r in report.values())
    res = {"exact": exact, "mismatches": bad, "n": n, "runtime": artefact.runtime(), "widths": rec.report(),
           "variants": report}
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


def _write_widths(art: Path, widths: dict[str, Any]) -> None:
    with atomic_path(art / WIDTHS_FILE) as tmp:
        tmp.write_text(json.dumps(widths, indent=1))
    _log_widths(widths)


def export(qmodel: QuantModel, cfg: Any, art: Path) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Build the run's integer ONNX model, write it (with its manifest) into ``art``; returns it and its declarations."""
    meta = {"config": OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg}
    model, decl = build_onnx(qmodel, input_spec_of(cfg), meta)
    fast, rewritten = int8_weights(model)
    log.info("model_vnni.onnx: %d uint8 weight(s) stored int8 for uint8 x int8 kernels", rewritten)
    artefact.save_model(model, decl, art, {"vnni": fast})
    return model, decl


def _read(path: Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path))
    except Exception as exc:  # protobuf decode errors
        raise ArtefactError(f"{path}: not an ONNX model ({exc.__class__.__name__}); "
                            "rerun with --reexport to write it again") from exc


def load(art: Path) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """``art/model.onnx`` after its checksum (ArtefactError when damaged or unreadable), and its manifest."""
    manifest = artefact.load_manifest(art)
    return _read(art / MODEL_FILE), manifest


def load_variants(art: Path, manifest: dict[str, Any]) -> dict[str, onnx.ModelProto]:
    """The artefact's variant files (``model_vnni.onnx``), checked by :func:`load` already."""
    return {k: _read(art / v["model"]) for k, v in manifest.get("variants", {}).items()}


def export_and_verify(qmodel: QuantModel, cfg: Any, run_dir: Path | str, images: Images,
                      batch_size: int = BATCH_SIZE) -> dict[str, Any]:
    """Write ``run_dir/intexec/model.onnx``, check it on ``images`` in onnxruntime, write ``widths.json``.

    Returns ``{exact, mismatches, n, runtime, artefact, bytes, widths}`` with the widths summary
    (the full report is ``widths.json``), for ``metrics["intexec"]``.
    """
    art = Path(run_dir) / ARTEFACT_DIR
    export(qmodel, cfg, art)
    model, manifest = load(art)  # what was written, read back
    res = verify_program(qmodel, model, manifest, images, batch_size, variants=load_variants(art, manifest))
    _write_widths(art, res["widths"])
    log.info("ONNX model on %s vs simulation: mismatches=%d/%d", res["runtime"], res["mismatches"], res["n"])
    return {"exact": res["exact"], "mismatches": res["mismatches"], "n": res["n"], "runtime": res["runtime"],
            "artefact": str(art / MODEL_FILE), "bytes": manifest["bytes"], "widths": res["widths"]["summary"],
            "variants": res["variants"]}


# ----------------------------------------------------------------------------- CLI


def verify_run(run_dir: Path, out: Path | None = None, reexport: bool = False, images: int | None = None,
               batch_size: int = BATCH_SIZE, write: bool = True) -> dict[str, Any]:
    """Rebuild a finished run's model, export it (unless a model is there) and verify it on onnxruntime.

    An existing ``model.onnx`` is checked against its manifest's sha256 first (ArtefactError when
    damaged). ``write=False`` checks an in-memory model where the run dir holds none (``--runs``
    leaves sweep dirs as they were). Raises NotVerifiable (one line: why, what to do).
    """
    art = out or run_dir / ARTEFACT_DIR
    existing = not reexport and (art / MODEL_FILE).is_file()
    if existing:  # a damaged file is refused before the model is rebuilt
        model, decl = load(art)
    qmodel, cfg, check = load_run_model(run_dir)
    if existing:
        log.info("verifying the existing model %s", art / MODEL_FILE)
    else:
        if write:
            export(qmodel, cfg, art)
            model, decl = load(art)
        else:
            model, decl = build_onnx(qmodel, input_spec_of(cfg))
    fast = load_variants(art, decl) if write or existing else {"vnni": int8_weights(model)[0]}
    res = verify_program(qmodel, model, decl, eval_images(cfg, images), batch_size, keep_logits=True, variants=fast)
    check_fingerprint(res.pop("logits"), check, run_dir)
    if write:
        _write_widths(art, res["widths"])
    else:
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
        print(f"mismatches={res['mismatches']}/{res['n']}  {d.as_posix()}  ({res['runtime']})")
    print(f"total: mismatches={bad}/{n} over {verified} verified run(s), {len(dirs) - verified} not verified")
    if failed:
        return 1
    return 0 if verified else 2


def _qdq_main(run_dir: Path, images: int | None, batch_size: int) -> int:
    from ptq.intexec.qdq import qdq_run

    try:
        rec = qdq_run(run_dir, images, batch_size)
    except (NotVerifiable, ArtefactError) as exc:
        log.error("%s", exc)
        return 2
    print(f"qdq acc1={rec['acc1']:.2f}  agree_sim={rec['agreement_sim']:.2f}  kl_sim={rec['kl_sim']:.4g}  "
          f"n={rec['n']}  {rec['artefact']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m ptq.intexec RUN_DIR`` or ``--runs DIR``: export (unless present) and verify; 0 only when exact."""
    ap = argparse.ArgumentParser(prog="python -m ptq.intexec", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path, nargs="?", help="a finished nonlinear=ivit run dir")
    ap.add_argument("--runs", type=Path, metavar="DIR", help="verify every run under DIR (e.g. a multirun sweep dir)")
    ap.add_argument("--out", type=Path, default=None, help="model dir (default RUN_DIR/intexec)")
    ap.add_argument("--reexport", action="store_true", help="export model.onnx again even if one exists")
    ap.add_argument("--images", type=int, default=None, help="check only the first N eval images")
    ap.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    ap.add_argument("--format", choices=("integer", "qdq"), default="integer",
                    help="integer: the integer-only model, verified bit for bit (default); qdq: the run's QDQ model "
                         "for onnxruntime's quantized kernels, written to RUN_DIR/qdq and measured (any run)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if (args.run_dir is None) == (args.runs is None):
        ap.error("give one run dir, or --runs DIR")
    if args.images is not None and args.images < 1:
        ap.error(f"--images must be at least 1, got {args.images}")
    if args.format == "qdq":
        if args.run_dir is None or args.out is not None or args.reexport:
            ap.error("--format qdq takes one run dir (no --runs, --out or --reexport)")
        return _qdq_main(args.run_dir, args.images, args.batch_size)
    if args.runs is not None:
        return _verify_all(args.runs, args.batch_size)
    try:
        res = verify_run(args.run_dir, args.out, args.reexport, args.images, args.batch_size)
    except (NotVerifiable, ArtefactError) as exc:
        log.error("%s", exc)
        return 2
    print(f"mismatches={res['mismatches']}/{res['n']}  ({res['runtime']})")
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
