"""Entry point: ``python -m ptq.main [group=option ...] [key=value ...]`` (``-m`` for sweeps).

It only composes the config and hands it to the pipeline. A configuration
error ends a single run with one line on stderr and exit code 2. In a
multirun, a failing job is recorded (``metrics.json`` status ``failed``) and
the sweep goes on; every job of one sweep shares a W&B group.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from ptq import naming
from ptq.config import ConfigError, no_effect, register_configs, validate

register_configs()
log = logging.getLogger("ptq")


def sweep_group(cfg: DictConfig, sweep_dir: str) -> str:
    """W&B group of a sweep: its name and start time (the sweep dir is stamped once per sweep)."""
    d = Path(sweep_dir)
    return f"{cfg.sweep_name or 'multirun'}@{d.parent.name}_{d.name}"


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Run one configuration; returns top-1 (the objective of sweepers), NaN for a failed sweep job."""
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    run_dir = Path(hc.runtime.output_dir)
    if multirun and cfg.tracking.group is None:
        OmegaConf.update(cfg, "tracking.group", sweep_group(cfg, hc.sweep.dir))
    try:
        validate(cfg)  # the config's own values first: a bad one exits before torch and the pipeline are imported
        from ptq import pipeline

        pipeline.check_inputs(cfg)
    except ConfigError as exc:
        print(f"ptq: config error: {exc}", file=sys.stderr)
        if not multirun:
            sys.exit(2)
        from ptq import pipeline

        pipeline.record_failure(cfg, run_dir, exc)
        return math.nan
    from ptq.tracking import Tracker

    for line in no_effect(cfg, list(hc.overrides.task)):
        log.warning("%s", line)
    try:
        metrics = pipeline.run(cfg, run_dir, Tracker())
    except Exception as exc:
        if not multirun:
            raise
        log.error("job %s failed (%s: %s); the sweep goes on", hc.job.num, type(exc).__name__, exc, exc_info=True)
        return math.nan
    print(naming.summary_line(metrics["name"], metrics))
    return float(metrics["acc1"])


if __name__ == "__main__":
    main()
