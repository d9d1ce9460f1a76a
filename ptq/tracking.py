"""Weights & Biases tracking that can never lose or break a run.

The run's source of truth is its ``metrics.json`` (written by the caller
*before* :meth:`Tracker.finish`); W&B is a mirror of it.  Every W&B call goes
through :meth:`Tracker._guard`: the first exception (missing package, no API
key, network failure, client crash) is logged as ONE warning and turns the
tracker into a no-op for the rest of the run, so the experiment itself always
completes.

Config node ``tracking`` (all keys optional)::

    mode: offline          # online | offline | disabled
    project: ptq
    entity: null
    group: null
    tags: []
    dir: null              # null = the run dir (wandb writes <dir>/wandb/...)
    init_timeout: 30       # seconds wandb.init may take
    finish_timeout: 60     # online only: seconds finish may spend uploading
                           # (unsent data stays on disk for `wandb sync`)

Online mode without credentials falls back to offline with a warning instead
of prompting or hanging; ``wandb sync <dir>/wandb/offline-run-*`` uploads the
run later.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MODES = ("online", "offline", "disabled")
DEFAULTS: dict[str, Any] = {
    "mode": "offline",
    "project": "ptq",
    "entity": None,
    "group": None,
    "tags": [],
    "dir": None,
    "init_timeout": 30.0,
    "finish_timeout": 60.0,
}
#: metrics.json keys kept out of the summary: curves go to history via
#: :meth:`Tracker.log_curves` (thousands of points per unit would bloat it).
SUMMARY_EXCLUDE = ("curves",)
#: x axis of the reconstruction curves (outside the ``recon/*`` glob on purpose).
RECON_STEP = "recon_step"


def to_plain(cfg: Any) -> dict[str, Any]:
    """A DictConfig/Mapping as a plain, resolved dict (unresolvable interpolations kept as text)."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        try:
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
        except Exception:  # e.g. ${hydra:...} outside a Hydra app
            return OmegaConf.to_container(cfg, resolve=False)  # type: ignore[return-value]
    return {k: (to_plain(v) if isinstance(v, Mapping) else v) for k, v in dict(cfg or {}).items()}


def flatten(d: Mapping[str, Any], sep: str = "/", prefix: str = "") -> dict[str, Any]:
    """Nested mappings to one level, keys joined with ``sep`` (lists are kept as values)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, sep, key))
        else:
            out[key] = v
    return out


def has_api_key() -> bool:
    """Whether W&B credentials exist locally (env, settings file or netrc); never prompts or verifies online."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    import wandb

    try:
        return bool(wandb.login(prompt=False, verify=False))
    except Exception:  # older/newer clients: fall back to the deprecated lookup
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return bool(getattr(getattr(wandb, "api", None), "api_key", None))


def _first_line(exc: BaseException) -> str:
    """First line of an exception's message (wandb errors can be long)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _settings(wandb: Any, mode: str, tcfg: Mapping[str, Any]) -> Any:
    """Quiet settings that never block: bounded init, bounded upload at finish (online only)."""
    online = mode == "online"
    return wandb.Settings(
        silent=True,
        console="off",
        init_timeout=float(tcfg["init_timeout"]),
        finish_timeout=float(tcfg["finish_timeout"]) if online else 0.0,
        x_disable_viewer=not online,
        save_code=False,
    )


class Tracker:
    """Mirror one run to W&B; every method is safe to call in any state (and never raises)."""

    def __init__(self) -> None:
        self.run: Any = None
        self.mode: str = "disabled"
        self.run_dir: Path | None = None
        self.failed: bool = False

    @property
    def active(self) -> bool:
        """True while a W&B run is open and no W&B error has happened."""
        return self.run is not None and not self.failed

    @contextlib.contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """Turn any W&B exception into one warning and a no-op tracker."""
        try:
            yield
        except (Exception, SystemExit) as exc:  # wandb has raised SystemExit before
            self.failed = True
            self.run = None
            where = f" in {self.run_dir}" if self.run_dir else ""
            log.warning(
                "W&B tracking disabled: %s failed (%s: %s); the run continues and "
                "metrics.json%s is unaffected.",
                what,
                type(exc).__name__,
                _first_line(exc),
                where,
            )

    def start(self, cfg: Any, run_dir: Path, name: str, row: dict) -> None:
        """Open a W&B run named ``name`` whose config is the full resolved ``cfg``.

        One Tracker per run: after a W&B error the tracker stays a no-op, start included.
        """
        if self.failed:
            return
        with self._guard("wandb.init"):
            self.run_dir = Path(run_dir)
            plain = to_plain(cfg)
            node = plain.get("tracking") or {}
            tcfg = {**DEFAULTS, **{k: v for k, v in node.items() if v is not None}}
            self.mode = str(tcfg["mode"])
            if self.mode == "disabled":
                return
            if self.mode not in MODES:
                raise ValueError(f"tracking.mode must be one of {MODES}, got {self.mode!r}")
            import wandb

            if self.active:  # a previous start() without finish()
                self.run.finish()
                self.run = None
            if self.mode == "online" and not has_api_key():
                log.warning(
                    "W&B online mode requested but no API key found (WANDB_API_KEY unset, "
                    "no netrc/`wandb login`); logging offline instead, sync later with "
                    "`wandb sync`. metrics.json in %s is unaffected.",
                    self.run_dir,
                )
                self.mode = "offline"
            wdir = Path(tcfg["dir"]) if tcfg["dir"] else self.run_dir
            wdir.mkdir(parents=True, exist_ok=True)
            kwargs = dict(
                project=tcfg["project"],
                entity=tcfg["entity"],
                group=tcfg["group"],
                tags=[str(t) for t in (tcfg["tags"] or [])],
                name=name,
                config=plain,
                dir=str(wdir),
                reinit="finish_previous",
            )
            try:
                self.run = wandb.init(**kwargs, mode=self.mode, settings=_settings(wandb, self.mode, tcfg))
            except Exception as exc:
                if self.mode != "online":
                    raise
                # Unreachable server / bad key: keep the data locally instead of dropping it.
                # If offline fails too, the guard reports the online error (still one warning).
                try:
                    self.run = wandb.init(
                        **kwargs, mode="offline", settings=_settings(wandb, "offline", tcfg)
                    )
                except Exception:
                    raise exc from None
                self.mode = "offline"
                log.warning(
                    "W&B online init failed (%s: %s); logging offline instead, sync later with "
                    "`wandb sync`. metrics.json in %s is unaffected.",
                    type(exc).__name__,
                    _first_line(exc),
                    self.run_dir,
                )
            # Known before any metric exists, so a crashed run is still identifiable.
            self.run.summary.update(
                {"name": name, "status": "running", "run_dir": str(self.run_dir), **flatten({"row": row})}
            )

    def log(self, metrics: dict, step: int | None = None) -> None:
        """Log scalar metrics (``step`` is kept as a field if it would go backwards in W&B)."""
        if not self.active:
            return
        with self._guard("wandb.log"):
            if step is not None and step < self.run.step:
                self.run.log({**metrics, "step": step})
            else:
                self.run.log(dict(metrics), step=step)

    def log_curves(self, curves: dict) -> None:
        """Log per-unit reconstruction curves as ``recon/<unit>/<series>`` against ``recon_step``.

        ``curves`` is ``{unit: {"step": [...], "loss": [...], "reg": [...], "beta": [...]}}``.
        All units share the ``recon_step`` axis (each unit restarts at 0), so one
        ``log`` call per distinct step carries every unit's values at that step.
        """
        if not self.active or not curves:
            return
        with self._guard("log_curves"):
            self.run.define_metric(RECON_STEP, hidden=True)
            self.run.define_metric("recon/*", step_metric=RECON_STEP)
            by_step: dict[int, dict[str, float]] = {}
            for unit, series in curves.items():
                steps = list(series.get("step") or [])
                for key, values in series.items():
                    if key == "step":
                        continue
                    for i, v in enumerate(values or []):
                        s = int(steps[i]) if i < len(steps) else i
                        if isinstance(v, (int, float)) and math.isfinite(v):
                            by_step.setdefault(s, {})[f"recon/{unit}/{key}"] = float(v)
            for s in sorted(by_step):
                self.run.log({RECON_STEP: s, **by_step[s]})

    def log_image(self, key: str, path: Path) -> None:
        """Log a PNG the run wrote (e.g. the reconstruction picture) as a W&B image."""
        if not self.active or not Path(path).is_file():
            return
        with self._guard("log_image"):
            import wandb

            self.run.log({key: wandb.Image(str(path))})

    def finish(self, metrics: dict) -> None:
        """Copy metrics.json (flattened with '/') into the summary and close the run."""
        if not self.active:
            return
        with self._guard("wandb.finish"):
            summary = flatten({k: v for k, v in metrics.items() if k not in SUMMARY_EXCLUDE})
            self.run.summary.update(summary)
            self.run.finish(exit_code=0 if metrics.get("status", "ok") == "ok" else 1)
        self.run = None
