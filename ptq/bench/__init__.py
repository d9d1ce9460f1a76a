"""Performance benchmark: quantized evaluation, AdaRound iterations, calibration and cache memory.

``python -m ptq.bench [--quick] [--device auto|cpu|cuda] [--models tiny,vit_b_16] [--out FILE.json]``
(``--threads 1`` for steadier CPU timings on a shared machine, ``--tune-malloc`` to raise glibc's
mmap threshold) measures, on the embedded tiny model and on a randomly initialised vit_b_16-shaped model:

* evaluation throughput of the float torchvision model, the calibrated W8A8 ``QuantViT``
  with float nonlinear ops (``fp``) and with the integer I-ViT backend (``ivit``);
* the time of one AdaRound iteration (the loop body of ``ptq.recon.train.train_unit``,
  timed inside the real function, so compiled as in a run) for layer,
  block and encoder units, next to one plain eager
  forward+backward of the same float unit on the same batch;
* calibration throughput (observe mode) and its peak memory;
* the host memory of the block-granularity reconstruction caches of vit_b_16 at 1024
  calibration images, analytically (from what ``Cached.pack`` stores) and measured at
  two smaller image counts, extrapolated linearly.

Every quantized time is measured interleaved with its float counterpart in the same
process and reported as a ratio (median over repeats), since absolute timings on a
shared machine are noisy. Results go to a JSON file (top-level ``ratios``) and a
Markdown table on stdout; ``--write`` renders a "Performance" section between
``<!-- perf:start -->`` and ``<!-- perf:end -->`` of docs/benchmarks.md and the onnxruntime comparison
into the onnx block of docs/deployment.md (``--write PAGE``: both into PAGE).
"""

from ptq.bench.cli import main, run_bench
from ptq.bench.plans import MARK_END, MARK_START, RATIO_KEYS, TARGETS, ratio_key
from ptq.bench.report import markdown_table, render_readme_section, replace_marked_block, update_readme

__all__ = ["MARK_END", "MARK_START", "RATIO_KEYS", "TARGETS", "main", "markdown_table", "render_readme_section",
           "ratio_key", "replace_marked_block", "run_bench", "update_readme"]
