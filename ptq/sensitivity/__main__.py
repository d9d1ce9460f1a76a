"""``python -m ptq.sensitivity [group=option ...] [key=value ...]``: the overrides of ``ptq.main``.

A configuration error ends it with one line on stderr and exit code 2, before any model or data
is loaded. At the end it prints the scan as one Markdown table (logs go to the Hydra run dir too).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ptq.config import ConfigError, no_effect, register_configs, validate

register_configs()
log = logging.getLogger("ptq")


@hydra.main(version_base="1.3", config_path="../../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    """Check the config, scan it, print the table."""
    hc = HydraConfig.get()
    try:
        validate(cfg)  # the config's own values first: a bad one exits before torch and the pipeline are imported
        from ptq import pipeline
        from ptq.sensitivity import scan

        pipeline.check_inputs(cfg)
        scan.check(cfg)
    except ConfigError as exc:
        print(f"ptq: config error: {exc}", file=sys.stderr)
        sys.exit(2)
    from ptq.sensitivity import report
    from ptq.tracking import Tracker

    for line in no_effect(cfg, list(hc.overrides.task)):
        log.warning("%s", line)
    metrics = scan.run(cfg, Path(hc.runtime.output_dir), Tracker())
    print(report.markdown(metrics))


if __name__ == "__main__":
    main()
