"""Full-size models through the whole pipeline on the CPU: a randomly initialised vit_b_16 (or
``--model`` any ImageNet model of ``ptq.config.MODELS``, e.g. timm's deit_small_patch16_224) on a
generated 224x224 ImageFolder, AdaRound (block) W4A8 with the integer backend, export and verify.

    python scripts/fullsize_check.py --work /tmp/fullsize [--model vit_b_16] [--images 64] [--iters 5]
        [--out report.json] [--write [PAGE]] [--block fullsize]
    python scripts/fullsize_check.py --from-json report.json --write   # the block from a saved run

It runs the real CLI (``python -m ptq.main``) in a subprocess and reports wall time per stage,
the child's peak host RSS, the stage cache's size on disk, the quantized state's size and the
widths report's largest accumulator; ``--write`` rewrites its block (``fullsize`` of docs/fullsize.md,
or ``--block NAME`` of ``--write PAGE``), after checking the page holds it, before the run.
It exits non-zero unless the run is ok and the integer program matches the simulation exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ptq.table import HOME, InputError, page_for, write_readme_block  # noqa: E402  (ptq from this checkout)

CLASSES = 4


def make_imagefolder(root: Path, per_split: int, size: int = 224) -> None:
    """Two ImageFolder splits, ``root/train`` and ``root/val``, each of ``per_split`` random RGB JPEGs in CLASSES class dirs."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for i in range(per_split):
            d = root / split / f"n{i % CLASSES:08d}"
            d.mkdir(parents=True, exist_ok=True)
            path = d / f"img{i:04d}.JPEG"
            if not path.exists():
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def command(work: Path, images: int, iters: int, model: str = "vit_b_16") -> list[str]:
    """The documented full-size command (docs/fullsize.md)."""
    return [sys.executable, "-m", "ptq.main", f"model={model}", "data=imagenet", f"data.root={work / 'data'}",
            "model.pretrained=false", "wquant=adaround", "granularity=block", "wbits=4", "nonlinear=ivit",
            "export=true", f"aquant.calib_images={images}", f"data.eval_images={images}",
            f"adaround.calib_images={images}", f"adaround.iters={iters}", "adaround.batch_size=8",
            "adaround.compile=false", "data.batch_size=16", "aquant.calib_batch_size=16", "data.num_workers=0",
            f"cache_dir={work / 'cache'}", f"hydra.run.dir={work / 'run'}", "tracking.mode=disabled"]


def run(work: Path, images: int, iters: int, model: str = "vit_b_16") -> dict:
    make_imagefolder(work / "data", images)
    cmd = command(work, images, iters, model)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "WANDB_MODE": "disabled"}, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    run_dir = work / "run"
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    report = {
        "model": model, "returncode": proc.returncode, "status": metrics.get("status"), "error": metrics.get("error"),
        "command": " ".join(["python", *cmd[1:]]).replace(str(work), "$WORK"),
        "images": images, "iters": iters, "wall_s": round(wall, 1), "seconds": metrics.get("seconds", {}),
        "peak_rss_gib": round(peak_kib / 2**20, 2), "cache_mib": round(dir_bytes(work / "cache") / 2**20, 1),
        "run_dir_mib": round(dir_bytes(run_dir) / 2**20, 1),
        "quant_state_mib": round((run_dir / "quant_state.pt").stat().st_size / 2**20, 2)
        if (run_dir / "quant_state.pt").is_file() else None,
    }
    ie = metrics.get("intexec") or {}
    report["intexec"] = {"mismatches": ie.get("mismatches"), "n": ie.get("n")}
    widths = ie.get("widths") or {}
    accs = (widths.get("matmuls") or {})
    if accs:
        kind, top = max(accs.items(), key=lambda kv: kv[1]["max_abs"])
        report["largest_accumulator"] = {"matmul": kind, "max_abs": top["max_abs"], "bits": top["bits"],
                                         "fits_int32": widths.get("all_accumulators_fit_int32")}
    if proc.returncode != 0:
        report["stderr_tail"] = proc.stderr[-3000:]
    return report


def markdown(r: dict) -> str:
    s = r["seconds"]
    acc = r.get("largest_accumulator") or {}
    rows = [("model (random weights)", f"`{r.get('model', 'vit_b_16')}`"),
            ("wall, whole command", f"{r['wall_s']:.0f} s"),
            *[(f"stage {k}", f"{v:.1f} s") for k, v in s.items()],
            ("peak host RSS", f"{r['peak_rss_gib']:.2f} GiB"),
            ("stage cache on disk", f"{r['cache_mib']:.1f} MiB"),
            ("run dir on disk (integer program included)", f"{r['run_dir_mib']:.1f} MiB"),
            ("quant_state.pt", f"{r['quant_state_mib']} MiB"),
            ("largest accumulator", f"{acc.get('matmul')}: max|acc| = {acc.get('max_abs')} ({acc.get('bits')} bits, "
                                    f"INT32 {'ok' if acc.get('fits_int32') else 'OVERFLOW'})"),
            ("integer program vs simulation", f"mismatches={r['intexec']['mismatches']}/{r['intexec']['n']}")]
    lines = ["| measure | value |", "| --- | --- |", *[f"| {a} | {b} |" for a, b in rows]]
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    """The command line of this script."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, help="scratch dir: data, cache and run dir go here")
    ap.add_argument("--from-json", type=Path, default=None, help="report of an earlier run (no new run)")
    ap.add_argument("--images", type=int, default=64, help="calibration and eval images each")
    ap.add_argument("--iters", type=int, default=5, help="AdaRound iterations per unit")
    ap.add_argument("--model", default="vit_b_16", help="an ImageNet model name (model=NAME), random weights")
    ap.add_argument("--block", default="fullsize", help="the block --write rewrites (default fullsize)")
    ap.add_argument("--out", type=Path, default=None, help="write the report as JSON")
    ap.add_argument("--write", "--readme", dest="write", type=Path, nargs="?", const=HOME, default=None,
                    metavar="PAGE", help="rewrite the --block of PAGE; --write alone: of the page the block lives on")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if (args.work is None) == (args.from_json is None):
        ap.error("give --work DIR (run it) or --from-json FILE (report a saved run)")
    if args.write is not None:  # a page without the block fails now, not after a quarter of an hour
        try:
            args.write = page_for(args.write, args.block)
        except InputError as exc:
            ap.error(f"--write: {exc}")
    report = json.loads(args.from_json.read_text()) if args.from_json else run(args.work, args.images, args.iters,
                                                                                     args.model)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    ok = report["status"] == "ok" and report["intexec"]["mismatches"] == 0
    if not ok:
        print(json.dumps(report, indent=1), file=sys.stderr)
        return 1
    text = markdown(report)
    print(text, end="")
    if args.write:
        write_readme_block(args.write, text, args.block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
