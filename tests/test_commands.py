"""What a user types: every command of the README and the docs pages composes as written; a misspelt choice
stops before any work."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

from conftest import CONF, ROOT
from ptq.config import Config

COMMAND = re.compile(r"python -m ptq\.main\b(?:[^`\n\\]|\\\n)*")  # up to a backtick or line end; \ continues
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]  # every page a reader is sent to


def _synopsis(cmd: str) -> str:
    """A command as it runs: an optional ``[key=value]`` of a synopsis unwrapped, a ``[placeholder]`` dropped."""
    return " ".join(t[1:-1] if t.startswith("[") and t.endswith("]") and "=" in t else t
                    for t in cmd.split() if not (t.startswith("[") and t.endswith("]") and "=" not in t))


def page_commands(page: Path) -> list[str]:
    """Every ``python -m ptq.main ...`` of one page (code blocks and inline), continuations joined,
    comments dropped."""
    out = []
    for m in COMMAND.finditer(page.read_text()):
        cmd = re.sub(r"\\\n\s*", " ", m.group(0))
        cmd = re.split(r"\s#\s", cmd, maxsplit=1)[0]
        out.append(_synopsis(cmd))
    return out


def readme_commands() -> list[str]:
    """Every ``python -m ptq.main ...`` of README.md and of every docs/*.md page."""
    return [c for page in PAGES for c in page_commands(page)]


# what an override's key may be: a conf/ group, sweeps/sweep, a top-level key of the schema, a hydra/ group
KEYS = {d.name for d in CONF.iterdir() if d.is_dir()} | {"sweep"} | {f.name for f in fields(Config)}


def _braces(span: str) -> list[str]:
    """``swin_{tiny,small}_x`` as the spans it stands for (``swin_tiny_x``, ``swin_small_x``), shell-style."""
    m = re.search(r"\{([^{}]*,[^{}]*)\}", span)
    if not m:
        return [span]
    return [e for alt in m.group(1).split(",") for e in _braces(span[:m.start()] + alt + span[m.end():])]


def readme_choices() -> list[str]:
    """The pages' inline code spans made only of config overrides, one at least of a group or top-level key
    (``aquant=mse``, ``+sweep=w4a8_ablation``, ``wbits=4 abits=8``, ``model=swin_{tiny,small,base}_...``
    expanded), which a reader pastes onto a command line; a ``<placeholder>`` is not a choice."""
    out = []
    for page in PAGES:
        for span in re.findall(r"`([^`\n]+)`", page.read_text()):
            toks = span.split()
            if "<" in span or not all(re.fullmatch(r"[+~]?[\w./{},]+=\S*", t) for t in toks):
                continue
            keys = [t.split("=")[0].lstrip("+~") for t in toks]
            if any("." not in k for k in keys) and all(k.split(".")[0] in KEYS or "/" in k for k in keys):
                out += _braces(span)
    return out


def jobs_of(command: str) -> list[list[str]]:
    """The override lists of the runs a command starts: one, or every job of a ``-m`` sweep
    (expanded by Hydra's own basic sweeper)."""
    args = shlex.split(command)[3:]
    multirun = any(a in ("-m", "--multirun") for a in args)
    overrides = [a for a in args if a not in ("-m", "--multirun")]
    assert all(not a.startswith("-") for a in overrides), f"{command}: a flag this test does not know"
    if not multirun:
        return [overrides]
    return BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(overrides), None)[0]


def test_readme_names_the_commands_this_test_checks() -> None:
    cmds = readme_commands()
    assert len(cmds) >= 40 and "python -m ptq.main debug=quick" in page_commands(ROOT / "README.md")
    assert any(c.startswith("python -m ptq.main +sweep=rounding_lr hydra/launcher=slurm") and "mem_gb=64" in c
               for c in page_commands(ROOT / "docs" / "sweeps.md"))  # a continued line is read whole
    assert all(page_commands(ROOT / "docs" / f"{p}.md") for p in ("configuration", "adaround", "results", "swin"))
    assert len(jobs_of("python -m ptq.main -m wbits=4,8 granularity=layer,block")) == 4
    choices = readme_choices()
    assert "aquant=mse" in choices and "data.root=DIR" not in choices and "mismatches=0" not in choices
    assert "model=swin_small_patch4_window7_224" in choices and not any("<" in c for c in choices)
    assert _synopsis("python -m ptq.main [overrides] +sweep=optuna_lr [hydra.sweeper.n_trials=20]") == \
        "python -m ptq.main +sweep=optuna_lr hydra.sweeper.n_trials=20"


def test_every_readme_command_composes(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--cfg job`` for each line and inline group choice of the README and the docs pages, in one process: each job's config
    composes (``+experiment=...`` fails here with Hydra's ``Multiple values for experiment``)."""
    monkeypatch.chdir(ROOT)  # conf/config.yaml puts sweeps/ on the search path relative to the repo root
    jobs = {tuple(job) for c in readme_commands() if "--help" not in c for job in jobs_of(c)}
    jobs |= {tuple(span.split()) for span in readme_choices()}
    failed = []
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for job in sorted(jobs):
            try:
                compose("config", overrides=list(job), return_hydra_config=True)
            except Exception as exc:
                failed.append(f"{' '.join(job)}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
    assert not failed, "\n".join(failed)


def _cli(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ptq.main", f"hydra.run.dir={tmp_path / 'run'}", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_help_lists_real_choices_only(tmp_path: Path) -> None:
    res = _cli("--help", tmp_path=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    groups = dict(ln.split(": ", 1) for ln in res.stdout.split("== Config ==")[0].splitlines() if ": " in ln)
    from ptq.config import MODELS

    # every model choice is a config name ptq.config knows, and every known name has its config
    assert groups["model"] == ", ".join(sorted(MODELS)) and groups["debug"] == "quick"
    assert "schema" not in res.stdout.split("== Config ==")[0]


@pytest.mark.parametrize(("override", "group", "choice"), [
    ("experiment=w4a4_bset", "experiment", "w4a4_best"),
    ("debug=quik", "debug", "quick"),
    ("model=tiny", "model", "tiny_digits"),
])
def test_a_misspelt_choice_stops_before_any_work(tmp_path: Path, override: str, group: str, choice: str) -> None:
    res = _cli(override, tmp_path=tmp_path)
    assert res.returncode != 0 and not (tmp_path / "run").exists()  # no run dir, no metrics.json: nothing ran
    assert f"Could not find '{group}/{override.split('=')[1]}'" in res.stderr
    listed = res.stderr.split(f"Available options in '{group}':")[1].split("Config search path")[0].split()
    assert choice in listed and "schema" not in listed
    expected = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
    assert listed == expected
