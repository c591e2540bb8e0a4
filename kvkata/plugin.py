"""The pytest plugin: modes, one-line TODOs, readable mismatches, timeouts, the board, the notes.

Loaded by the project's root conftest.py. It uses pytest's own hooks and nothing else.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
from pathlib import Path

import pytest

import kvkata
from kvkata import board, manifest
from kvkata.check import Mismatch

TODO_KEY = "kvkata_todo"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kvkata", "kvkata modes")
    group.addoption("--learner", action="store_const", const="learner", dest="kvkata_mode",
                    help="test your code in katas/ (the default)")
    group.addoption("--solutions", action="store_const", const="solutions", dest="kvkata_mode",
                    help="test the worked solutions in solutions/")
    group.addoption("--interviewer", action="store_const", const="interviewer", dest="kvkata_mode",
                    help="test the solutions and print the interviewer notes of each selected card")
    group.addoption("--kvkata-json", dest="kvkata_json", metavar="PATH",
                    help="write each test's outcome (and whether it was a TODO) to PATH as JSON")


def pytest_configure(config: pytest.Config) -> None:
    chosen = config.getoption("kvkata_mode") or os.environ.get("KVKATA_MODE", "learner")
    try:
        kvkata.set_mode(chosen)
    except ValueError as exc:
        raise pytest.UsageError(f"KVKATA_MODE: {exc}") from None
    config.addinivalue_line("markers", "kata(name): the stub this test checks (a name in kvkata/cards.toml)")
    config.stash[_results_key] = {}


_results_key = pytest.StashKey[dict]()


def pytest_report_header(config: pytest.Config) -> str:
    mode = kvkata.mode()
    what = {"learner": "YOUR code in katas/ (fill in the stubs until the tests pass)",
            "solutions": "the worked solutions in solutions/",
            "interviewer": "the worked solutions in solutions/, with interviewer notes"}[mode]
    return f"kvkata: {mode} mode: testing {what}"


# --- failures a learner can act on -------------------------------------------------------

def _kata_frame(excinfo: pytest.ExceptionInfo):
    """The deepest traceback entry inside katas/ or solutions/, or None."""
    code_root = kvkata.ROOT / kvkata.package()
    found = None
    for entry in excinfo.traceback:
        path = Path(str(entry.path))
        if code_root in path.parents:
            found = entry
    return found


def _leaf_exceptions(exc: BaseException):
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            yield from _leaf_exceptions(sub)
    else:
        yield exc


def _kata_of(item: pytest.Item) -> manifest.Kata | None:
    marker = item.get_closest_marker("kata")
    card = manifest.card_of_path(item.path)
    if marker is None or card is None:
        return None
    return next((k for k in card.katas if k.name == marker.args[0]), None)


def _todo_line(item: pytest.Item, kata: manifest.Kata | None, where: str) -> str:
    card = kata.card if kata else (manifest.card_of_path(item.path) or manifest.Card("?", "", "", ())).id
    name = kata.name if kata else "?"
    return f"TODO {card} {name}: edit {where}  (stuck? kvkata hint {card})"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if not report.failed or call.excinfo is None:
        return report
    kata = _kata_of(item)
    leaves = list(_leaf_exceptions(call.excinfo.value))
    entry = _kata_frame(call.excinfo)
    if entry is not None and all(isinstance(e, NotImplementedError) for e in leaves):
        # The stub is still a stub: one line, no traceback.
        qualname = entry.frame.code.raw.co_qualname
        where = f"{Path(str(entry.path)).relative_to(kvkata.ROOT)}::{qualname}"
        report.longrepr = _todo_line(item, kata, where)
        report.user_properties.append((TODO_KEY, True))
    elif call.excinfo.errisinstance(KataTimeout) or (call.excinfo.typename == "Failed"
                                                      and "Timeout" in str(call.excinfo.value)):
        at = f" while running {entry.frame.code.raw.co_qualname} ({entry.path.name}:{entry.lineno + 1})" if entry else ""
        name = f"{kata.card} {kata.name}" if kata else item.nodeid
        report.longrepr = (f"TIMEOUT {name}: stopped after {_timeout_of(item)} s{at}. "
                           "Look for a loop that never ends or a shape that grows every step.")
    elif any(isinstance(e, Mismatch) for e in leaves):
        lines = [str(e) for e in leaves if isinstance(e, Mismatch)]
        notes = [n for e in leaves for n in getattr(e, "__notes__", [])]
        test_line = f"in {item.nodeid}" + (f" (kata {kata.card} {kata.name}, {kata.where(kvkata.package())})" if kata else "")
        report.longrepr = "\n".join(lines + notes + [test_line])
    return report


class KataTimeout(BaseException):
    """Raised in the running kata when its time is up.

    A BaseException on purpose: hypothesis retries a test that fails with an ordinary
    exception (or pytest.fail, which pytest-timeout raises), and replaying a kata that hangs
    would hang again with no timer left.
    """


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_timeout_set_timer(item: pytest.Item, settings):
    """pytest-timeout's hook: for kata tests, a SIGALRM that raises KataTimeout in the kata."""
    if (settings.method != "signal" or threading.current_thread() is not threading.main_thread()
            or item.get_closest_marker("kata") is None):
        return None  # pytest-timeout's own timer

    def handler(signum, frame):
        raise KataTimeout(settings.timeout)

    def cancel():
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)

    item.cancel_timeout = cancel
    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, settings.timeout)
    return True


def _timeout_of(item: pytest.Item) -> str:
    marker = item.get_closest_marker("timeout")
    value = marker.args[0] if marker and marker.args else (item.config.getoption("timeout", None)
                                                          or item.config.getini("timeout"))
    return f"{float(value):g}"


def pytest_report_teststatus(report: pytest.TestReport, config: pytest.Config):
    if report.failed and dict(getattr(report, "user_properties", ())).get(TODO_KEY):
        return "todo", "T", ("TODO", {"yellow": True})
    return None


# --- results, board, notes ---------------------------------------------------------------

def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    results = _config.stash[_results_key] if _config else {}
    outcome = "todo" if dict(report.user_properties).get(TODO_KEY) else report.outcome
    previous = results.get(report.nodeid)
    # A test's result is its worst phase: a failed setup or teardown fails the test.
    if previous is None or previous == "passed" or outcome in ("failed", "todo"):
        if not (report.when == "teardown" and outcome == "passed"):
            results[report.nodeid] = outcome


_config: pytest.Config | None = None


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    global _config
    _config = session.config


def pytest_collection_finish(session: pytest.Session) -> None:
    # After -k and -m have deselected: only the tests that will run count.
    katas = session.config.stash.setdefault(_katas_key, {})
    for item in session.items:
        kata = _kata_of(item)
        if kata is not None:
            katas[item.nodeid] = kata


_katas_key = pytest.StashKey[dict]()


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = session.config.getoption("kvkata_json")
    if path:
        results, katas = session.config.stash[_results_key], session.config.stash.get(_katas_key, {})
        rows = {nodeid: {"outcome": outcome, "card": katas[nodeid].card if nodeid in katas else None,
                         "kata": katas[nodeid].name if nodeid in katas else None}
                for nodeid, outcome in results.items()}
        Path(path).write_text(json.dumps({"mode": kvkata.mode(), "tests": rows}, indent=1))


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    results = config.stash[_results_key]
    katas = config.stash.get(_katas_key, {})
    if not katas:
        return
    tw = terminalreporter
    if kvkata.mode() == "learner":
        todos = [(n, o) for n, o in results.items() if o == "todo"]
        if todos:
            tw.section("TODO: stubs still to fill in", sep="-", yellow=True)
            for report in terminalreporter.stats.get("todo", []):
                tw.line(f"{report.longrepr}   [{report.nodeid.split('::')[-1]}]")
        tw.section("kvkata progress", sep="=")
        for line in board.render(board.tally(results, katas)):
            tw.line(line)
    elif kvkata.mode() == "interviewer":
        selected = sorted({k.card for k in katas.values()})
        for card_id in selected:
            tw.section(f"interviewer notes: {card_id}", sep="=")
            for line in board.render_notes(manifest.card(card_id)):
                tw.line(line)


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    report = yield
    text = str(report.longrepr) if report.failed else ""
    found = re.search(r"KataImportError: (.+)", text)
    if found:
        # A missing or broken kata module: say which file and why, without pytest's import traceback.
        report.longrepr = found.group(1).strip()
    return report
