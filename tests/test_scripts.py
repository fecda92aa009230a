"""The set-up and demo scripts: they show progress and time rather than a silent pip, and a second run installs nothing.

A real install takes a minute or more and the network, so it is measured by hand (README.md gives the figures);
these tests run the scripts' quick paths in a copy of the repository's scripts with a stand-in ``.venv``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETUP = ROOT / "scripts" / "setup.sh"
DEMO = ROOT / "scripts" / "demo.sh"


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """A folder laid out as a clone for setup.sh: scripts/, pyproject.toml, and a .venv whose python is this one."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(SETUP, tmp_path / "scripts" / "setup.sh")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    # A wrapper, not a symlink: Python finds its environment from the path it was started by.
    python = tmp_path / ".venv" / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    return tmp_path


def setup(clone: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key != "VIRTUAL_ENV"}
    return subprocess.run(
        ["bash", "scripts/setup.sh", *args], cwd=clone, capture_output=True, text=True, timeout=60, env=env
    )


def test_pip_is_never_silenced_and_the_time_is_reported() -> None:
    script = SETUP.read_text(encoding="utf-8")
    # pip's own lines are the progress of a minute-long install (pip download --quiet is only a probe for a wheel).
    installs = [line for line in script.splitlines() if re.search(r"\bpip(_install| install)\b", line)]
    assert len(installs) >= 4
    assert not [line for line in installs if re.search(r"--quiet|\s-q\b", line)]
    assert "done in $(elapsed)" in script
    demo = DEMO.read_text(encoding="utf-8")
    assert "bash scripts/setup.sh examples" in demo and "training $((SECONDS - trained)) s" in demo


@pytest.mark.parametrize(("stamp", "asked"), [("dev", "dev"), ("dev", "examples"), ("examples", "examples")])
def test_a_finished_install_is_not_repeated(clone: Path, stamp: str, asked: str) -> None:
    (clone / ".venv" / ".lit_decay-setup").write_text(f"{stamp}\n")
    # A pyproject.toml older than the stamp: nothing asked for since the install.
    hour_ago = time.time() - 3600
    os.utime(clone / "pyproject.toml", (hour_ago, hour_ago))
    done = setup(clone, asked)
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"lit_decay \S+ with torch \S+ in \.venv \(already set up\)\n", done.stdout)


def test_unknown_extras_are_refused(clone: Path) -> None:
    refused = setup(clone, "everything")
    assert refused.returncode == 2
    assert "unknown extras 'everything' (examples or dev)" in refused.stderr
