"""Fixtures for the maintainers' checks: runs of the kata suite in a subprocess, and scratch copies
of the project for checks that must break a kata on purpose (never the real tree)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Run:
    returncode: int
    output: str
    tests: dict  # nodeid -> {"outcome", "card", "kata"}


def run_suite(*args: str, cwd: Path = ROOT, mode: str | None = None, timeout: int = 600) -> Run:
    """Run pytest on the kata tests in a fresh process and collect each test's outcome."""
    out = cwd / f".kvkata-run-{os.getpid()}-{abs(hash(args))}.json"
    env = {k: v for k, v in os.environ.items() if k not in ("KVKATA_MODE", "PYTEST_ADDOPTS")}
    env["HYPOTHESIS_PROFILE"] = "kata"  # the learners' profile: what a learner sees
    if mode:
        env["KVKATA_MODE"] = mode
    cmd = [sys.executable, "-m", "pytest", "katas", "-p", "no:randomly", f"--kvkata-json={out}", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    try:
        tests = json.loads(out.read_text())["tests"] if out.exists() else {}
    finally:
        out.unlink(missing_ok=True)
    return Run(proc.returncode, proc.stdout + proc.stderr, tests)


@pytest.fixture(scope="session")
def learner_run() -> Run:
    return run_suite()


@pytest.fixture(scope="session")
def interviewer_run() -> Run:
    return run_suite("--interviewer")


@pytest.fixture
def project_copy(tmp_path: Path) -> Path:
    """A scratch copy of the project, to break on purpose."""
    dest = tmp_path / "project"
    shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", ".venv",
                                                               "bench", ".hypothesis"))
    return dest


def pytest_collection_modifyitems(items) -> None:
    # The 20 s in pyproject.toml is the kata tests' timeout; the checks run whole suites in
    # subprocesses, so each gets 15 minutes unless it says otherwise.
    for item in items:
        if item.get_closest_marker("timeout") is None and "checks" in item.path.parts:
            item.add_marker(pytest.mark.timeout(900))


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "slow: starts processes")
