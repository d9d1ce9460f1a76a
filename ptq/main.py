"""Entry point: ``python -m ptq.main [group=option ...] [key=value ...]``.

It only composes the config and hands it to the pipeline. Configuration
errors end the run with one line on stderr and exit code 2.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ptq import naming
from ptq.config import ConfigError, register_configs

register_configs()
log = logging.getLogger("ptq")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Run one configuration; returns top-1 (the objective of sweepers)."""
    from ptq import pipeline
    from ptq.tracking import Tracker

    try:
        pipeline.check_inputs(cfg)
    except ConfigError as exc:
        print(f"ptq: config error: {exc}", file=sys.stderr)
        sys.exit(2)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    metrics = pipeline.run(cfg, run_dir, Tracker())
    print(naming.summary_line(metrics["name"], metrics))
    return float(metrics["acc1"])


if __name__ == "__main__":
    main()
