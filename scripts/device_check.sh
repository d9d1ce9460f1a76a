#!/usr/bin/env bash
# The prepared GPU check (issue 15), under 8 minutes on one GPU:
#   (a) the CUDA-marked tests (simulation on CUDA == CPU bit for bit at W8A8 / W4A8 ivit; AdaRound block
#       on CUDA; the bench with --device cuda and its CUDA peak memory),
#   (b) wall time of the headline block command on the embedded default and of a reduced vit_b_16 run,
#   (c) JSON results under $OUT when that variable is set (else under outputs/device_check).
# On a machine without CUDA it says so, skips the CUDA parts and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled WANDB_SILENT=true
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || { make venv >/dev/null && PY=.venv/bin/python; }
DEST=${OUT:-outputs/device_check}
mkdir -p "$DEST"
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "device_check: no CUDA device here: skipped the CUDA tests and the GPU timings"
  printf '{"cuda": false, "skipped": "no CUDA device", "date": "%s"}\n' "$(date -u +%FT%TZ)" > "$DEST/device_check.json"
  exit 0
fi
status=0
"$PY" -c 'import json, torch; print(json.dumps({"device": torch.cuda.get_device_name(0), "torch": torch.__version__}))' \
  > "$DEST/device.json"
timeout 300 "$PY" -m pytest -q -m cuda tests/test_cuda.py --junitxml="$DEST/cuda_tests.xml" || status=1
WORK=$(mktemp -d)
t0=$(date +%s.%N)
timeout 240 "$PY" -m ptq.main device=cuda wquant=adaround granularity=block wbits=4 \
  hydra.run.dir="$WORK/headline" cache_dir="$WORK/cache" > "$DEST/headline.log" 2>&1 || status=1
t1=$(date +%s.%N)
timeout 240 "$PY" scripts/fullsize_check.py --work "$WORK/vit" --images 32 --iters 50 --out "$DEST/vit_b_16.json" \
  > "$DEST/vit_b_16.log" 2>&1 || status=1
t2=$(date +%s.%N)
cp "$WORK/headline/metrics.json" "$DEST/headline_metrics.json" 2>/dev/null || true
"$PY" - "$DEST" "$t0" "$t1" "$t2" "$status" <<'PYEOF'
import json, sys
from pathlib import Path
dest, t0, t1, t2, status = Path(sys.argv[1]), *map(float, sys.argv[2:5]), int(sys.argv[5])
out = {"cuda": True, **json.loads((dest / "device.json").read_text()), "ok": status == 0,
       "headline_block_wall_s": round(t1 - t0, 1), "vit_b_16_reduced_wall_s": round(t2 - t1, 1)}
for name in ("headline_metrics.json", "vit_b_16.json"):
    if (dest / name).is_file():
        out[name.removesuffix(".json")] = json.loads((dest / name).read_text())
(dest / "device_check.json").write_text(json.dumps(out, indent=1))
print(json.dumps({k: v for k, v in out.items() if not isinstance(v, dict)}))
PYEOF
exit $status
