"""Fixtures for the maintainers' checks: runs of the kata suite (in a subprocess, or in this process
where a fresh process is not the point), one in-process collection of every kata test, and scratch
copies of the project for checks that must break a kata on purpose (never the real tree).

Tiers: `pytest checks -m "not slow"` is the fast tier a maintainer runs while editing; `slow` marks
what must start processes (pytest or kvkata runs in a subprocess, gloo launches, a browser, a
compiler in a clean interpreter), and the wrong-answer registries (hundreds of in-process runs).
`pytest checks` runs both.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvkata import runner

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Run:
    returncode: int
    output: str
    tests: dict  # nodeid -> {"outcome", "card", "kata"}


def run_suite(*args: str, cwd: Path = ROOT, mode: str | None = None, timeout: int = 600) -> Run:
    """Run pytest on the kata tests in a fresh process and collect each test's outcome."""
    env = {k: v for k, v in os.environ.items() if k not in ("KVKATA_MODE", "PYTEST_ADDOPTS")}
    env["HYPOTHESIS_PROFILE"] = "kata"  # the learners' profile: what a learner sees
    env["KVKATA_COUNT_WORK"] = "1"  # each test's CPU time and the processes it starts, in the JSON report
    if mode:
        env["KVKATA_MODE"] = mode
    result = runner.run(["katas", "-p", "no:randomly", *args], cwd=cwd, env=env, timeout=timeout)
    return Run(result.returncode, result.output, result.tests)


def run_kvkata(project: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m kvkata.cli ARGS` in a project copy, as a learner would run it (the learners' profile)."""
    env = {k: v for k, v in os.environ.items() if k not in ("KVKATA_MODE", "PYTEST_ADDOPTS")}
    return subprocess.run([sys.executable, "-m", "kvkata.cli", *args], cwd=project, capture_output=True, text=True,
                          env={**env, "PYTHONPATH": str(project), "HYPOTHESIS_PROFILE": "kata"}, timeout=timeout)


def inprocess_pytest(*args: str, plugins=(), env: dict | None = None) -> tuple[int, str]:
    """pytest.main on the kata tests in THIS process; returns (exit code, terminal output).

    What a nested session changes is put back afterwards: kvkata's mode, the plugin's config,
    the hypothesis profile, the environment, sys.path, the module named `conftest`, and this
    test's own timeout alarm (the kata timeout sets and clears SIGALRM). Kata test modules stay
    imported; a check that needs one imported afresh (under another profile) drops it first.
    """
    import kvkata
    import kvkata.plugin
    from hypothesis import settings

    saved = (kvkata._mode, kvkata.plugin._config, settings._current_profile, os.environ.copy(),
             list(sys.path), sys.modules.get("conftest"))
    main = threading.current_thread() is threading.main_thread()
    if main:
        alarm, (left, _) = signal.getsignal(signal.SIGALRM), signal.getitimer(signal.ITIMER_REAL)
    start = time.monotonic()
    out = io.StringIO()
    for name in ("KVKATA_MODE", "PYTEST_ADDOPTS"):
        os.environ.pop(name, None)
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out):
            code = pytest.main([*args, "-p", "no:randomly", f"--rootdir={ROOT}", "-c", str(ROOT / "pyproject.toml")],
                               plugins=list(plugins))
    finally:
        kvkata._mode, kvkata.plugin._config = saved[0], saved[1]
        if saved[2] is not None:
            settings.load_profile(saved[2])
        os.environ.clear()
        os.environ.update(saved[3])
        sys.path[:] = saved[4]
        if saved[5] is not None:
            sys.modules["conftest"] = saved[5]
        if main:
            signal.signal(signal.SIGALRM, alarm)
            if left:
                signal.setitimer(signal.ITIMER_REAL, max(left - (time.monotonic() - start), 0.001))
    return int(code), out.getvalue()


@dataclass(frozen=True)
class Collected:
    """One kata test as collected: its card (from its folder), its kata (from @pytest.mark.kata, when
    that names a kata of the card, as kvkata's plugin attributes it) and the names `-k` matches."""
    nodeid: str
    card: str | None
    kata: str | None
    keywords: frozenset[str]


class _Collector:
    """Records every collected item's card, kata and -k names, after kvkata's plugin added its keywords."""

    def __init__(self) -> None:
        self.items: list[Collected] = []

    @pytest.hookimpl(trylast=True)
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        from _pytest.mark import KeywordMatcher

        from kvkata import manifest

        for item in session.items:
            card = manifest.card_of_path(item.path)
            marker = item.get_closest_marker("kata")
            name = marker.args[0] if marker and marker.args else None
            kata = name if card is not None and name in {k.name for k in card.katas} else None
            self.items.append(Collected(item.nodeid, card.id if card else None, kata,
                                        frozenset(KeywordMatcher.from_item(item)._names)))


@pytest.fixture(scope="session")
def kata_collection() -> dict[str, Collected]:
    """Every kata test, from ONE collection of katas/ in this process (no -k, no --kata)."""
    collector = _Collector()
    code, output = inprocess_pytest(str(ROOT / "katas"), "--collect-only", "-q", plugins=[collector])
    assert code == 0 and collector.items, output[-3000:]
    return {c.nodeid: c for c in collector.items}


def selected_by_k(collection: dict[str, Collected], expression: str) -> set[str]:
    """The node ids `pytest -k EXPRESSION` keeps: pytest's own expression, over pytest's own -k names."""
    from _pytest.mark import KeywordMatcher
    from _pytest.mark.expression import Expression

    expr = Expression.compile(expression)
    return {n for n, c in collection.items() if expr.evaluate(KeywordMatcher(c.keywords))}


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
                                                               "bench", ".hypothesis", ".kvkata"))
    return dest


def pytest_collection_modifyitems(items) -> None:
    # The shared learner and interviewer runs, and any run_suite, start a pytest process: slow tier.
    for item in items:
        if {"learner_run", "interviewer_run", "project_copy", "page"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    # The 20 s in pyproject.toml is the kata tests' timeout; the checks run whole suites in
    # subprocesses, so each gets 15 minutes unless it says otherwise.
    for item in items:
        if item.get_closest_marker("timeout") is None and "checks" in item.path.parts:
            item.add_marker(pytest.mark.timeout(900))


def pytest_unconfigure(config) -> None:
    # The root conftest freezes what was imported before the run (gc.freeze). The kata collection
    # here imports every card's test module in-process, and with it triton; while the frozen objects
    # stay out of the collector's sight, some of triton's compiler objects tied to them outlive the
    # interpreter's teardown, and nanobind reports them as leaks at exit (measured: 3 reports).
    gc.unfreeze()


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "slow: starts processes, or runs the kata suite hundreds of times")
