"""``python -m ptq.sensitivity [the overrides of ptq.main]``: which quantizer group costs the accuracy.

From the configuration's *calibrated* model (no AdaRound: a ``wquant=adaround`` config is measured
with its nearest-rounding weights), top-1 and KL to the float model on ``sensitivity.eval_images``
eval images, with each group of ``ptq.quant.groups`` in turn left in float (the rest quantized)
and raised to ``sensitivity.high_bits`` (the rest as configured), next to the baseline and the
float model. ``scan`` measures and writes ``metrics.json``; ``report`` draws ``sensitivity.png``
and prints the Markdown table.
"""
