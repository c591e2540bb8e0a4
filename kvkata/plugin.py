"""The pytest plugin: modes, one-line reports a learner can act on, one timeout per hang, the board.

Loaded by the project's root conftest.py. It uses pytest's own hooks and nothing else.

Every failure of a kata test becomes a few lines, never a traceback through torch:
- a stub still a stub: one TODO line per kata;
- a kata module that does not import: one line naming the file, the line and the error;
- a wrong answer (kvkata.check.Mismatch): what was called, what came back, what was expected;
- a hang: TIMEOUT naming the kata, and the kata's other tests stop at once;
- any other exception: its message (kvref's first, when kvref refused what the learner passed
  it), then the learner's own frames.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

import kvkata
from kvkata import board, check, manifest, progress, selection
from kvkata.check import Mismatch
from kvkata.formula import FormulaOnly

TODO_KEY, BROKEN_KEY, KATA_KEY = "kvkata_todo", "kvkata_broken", "kvkata_kata"
KVREF = kvkata.ROOT / "kvref"
_results_key = pytest.StashKey[dict]()    # nodeid -> outcome of this run
_katas_key = pytest.StashKey[dict]()      # nodeid -> Kata, the selected tests
_totals_key = pytest.StashKey[dict]()     # (card, kata) -> tests collected, before -k / --kata
_broken_key = pytest.StashKey[dict]()     # card -> why its module does not import
_hung_key = pytest.StashKey[dict]()       # (card, kata) -> the test that hung
_durations_key = pytest.StashKey[dict]()  # nodeid -> seconds of setup, call and teardown
_work_key = pytest.StashKey[dict]()  # nodeid -> {"cpu": this process's CPU seconds, "processes": started}
_messages_key = pytest.StashKey[dict]()   # nodeid -> the learner message of a failed test
_pruner_key = pytest.StashKey[selection.Pruner]()  # which kata test modules -k / --kata cannot select
_config: pytest.Config | None = None


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kvkata", "kvkata modes")
    group.addoption("--learner", action="store_const", const="learner", dest="kvkata_mode",
                    help="test your code in katas/ (the default)")
    group.addoption("--solutions", action="store_const", const="solutions", dest="kvkata_mode",
                    help="test the worked solutions in solutions/")
    group.addoption("--interviewer", action="store_const", const="interviewer", dest="kvkata_mode",
                    help="test the solutions and print the interviewer notes of each selected card")
    group.addoption("--kata", action="append", dest="kvkata_katas", metavar="NAME", default=[],
                    help="run exactly the tests of kata NAME (e.g. --kata decode_step); may repeat")
    group.addoption("--kvkata-json", dest="kvkata_json", metavar="PATH",
                    help="write each test's outcome (and whether it was a TODO) to PATH as JSON")


def _tensor_printer(t, printer, cycle) -> None:
    """How hypothesis shows a drawn tensor in a failing example: its values up to 8 elements, else its dtype
    and shape (the values of a [2, 3, 9, 12] draw fill a screen; the failure above names the element)."""
    printer.text(repr(t) if t.numel() <= 8 else f"<tensor {check.describe(t)}>")


def pytest_configure(config: pytest.Config) -> None:
    global _config
    _config = config
    try:  # hypothesis's printer registry (a vendored module): without it, failing examples show tensors in full
        from hypothesis.vendor.pretty import for_type_by_name
    except ImportError:
        pass
    else:
        for_type_by_name("torch", "Tensor", _tensor_printer)
    chosen = config.getoption("kvkata_mode") or os.environ.get("KVKATA_MODE", "learner")
    try:
        kvkata.set_mode(chosen)
    except ValueError as exc:
        raise pytest.UsageError(f"KVKATA_MODE: {exc}") from None
    known = {k.name for k in manifest.all_katas()}
    unknown = [k for k in config.getoption("kvkata_katas") if k not in known]
    if unknown:
        raise pytest.UsageError(f"--kata: no kata named {', '.join(unknown)}; `kvkata list` shows them all")
    config.addinivalue_line("markers", "kata(name): the stub this test checks (a name in kvkata/cards.toml)")
    for key in (_results_key, _katas_key, _totals_key, _broken_key, _hung_key, _durations_key, _messages_key, _work_key):
        config.stash[key] = {}


def pytest_report_header(config: pytest.Config) -> str:
    mode = kvkata.mode()
    what = {"learner": "YOUR code in katas/ (fill in the stubs until the tests pass)",
            "solutions": "the worked solutions in solutions/",
            "interviewer": "the worked solutions in solutions/, with interviewer notes"}[mode]
    return f"kvkata: {mode} mode: testing {what}"


# --- collection: kata names as keywords, and what a whole kata is -------------------------

def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """A kata test module that -k or --kata cannot select from is never imported (kvkata.selection)."""
    if _pruner_key not in config.stash:
        config.stash[_pruner_key] = selection.Pruner(config)
    return True if config.stash[_pruner_key].skips(collection_path) else None


def _kata_of(item: pytest.Item) -> manifest.Kata | None:
    marker = item.get_closest_marker("kata")
    card = manifest.card_of_path(item.path)
    if marker is None or card is None:
        return None
    return next((k for k in card.katas if k.name == marker.args[0]), None)


def _one_line_failure(excinfo: pytest.ExceptionInfo) -> str:
    """What pytest reports for a failed kata test before pytest_runtest_makereport rewrites it.

    That hook replaces the report of every failed kata test, so pytest's long traceback (each
    frame's source and the test's arguments: about 60 ms a test, 1.2 s of a card on fresh stubs)
    would be built only to be thrown away.
    """
    return excinfo.exconly()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    # tryfirst: before -k and -m deselect, so a kata's total counts all of its tests.
    totals = config.stash[_totals_key]
    for item in items:
        kata = _kata_of(item)
        if kata is None:
            continue
        item.extra_keyword_matches.add(kata.name)  # pytest -k <kata name> selects its tests
        item.repr_failure = _one_line_failure  # pytest_runtest_makereport rewrites the report anyway
        key = (kata.card, kata.name)
        totals[key] = totals.get(key, 0) + 1
    wanted = set(config.getoption("kvkata_katas"))
    if wanted:
        keep = [i for i in items if (k := _kata_of(i)) is not None and k.name in wanted]
        dropped = [i for i in items if i not in keep]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
        items[:] = keep


def pytest_collection_finish(session: pytest.Session) -> None:
    # After -k, -m and --kata have deselected: only the tests that will run count.
    katas = session.config.stash[_katas_key]
    for item in session.items:
        kata = _kata_of(item)
        if kata is not None:
            katas[item.nodeid] = kata


# --- one timeout per hang ------------------------------------------------------------------

class KataTimeout(BaseException):
    """Raised in the running kata when its time is up.

    A BaseException on purpose: hypothesis retries a test that fails with an ordinary
    exception (or pytest.fail, which pytest-timeout raises), and replaying a kata that hangs
    would hang again with no timer left.
    """


class KataHungEarlier(Exception):
    """An earlier test of this kata hung in this run: this one is not run."""


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


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function):
    kata = _kata_of(pyfuncitem)
    hung = pyfuncitem.config.stash[_hung_key].get((kata.card, kata.name)) if kata else None
    if hung:
        raise KataHungEarlier(hung)
    return None


def _timeout_of(item: pytest.Item) -> str:
    marker = item.get_closest_marker("timeout")
    value = marker.args[0] if marker and marker.args else (item.config.getoption("timeout", None)
                                                          or item.config.getini("timeout"))
    return f"{float(value):g}"


# --- failures a learner can act on -------------------------------------------------------

def _is_test_file(path: Path) -> bool:
    return path.name.startswith("test_") or path.name == "conftest.py"


def _code_entries(excinfo: pytest.ExceptionInfo) -> list:
    """Traceback entries in the code under test (katas/ or solutions/), test files excluded."""
    code_root = kvkata.ROOT / kvkata.package()
    return [e for e in excinfo.traceback
            if code_root in Path(str(e.path)).parents and not _is_test_file(Path(str(e.path)))]


def _leaf_exceptions(exc: BaseException):
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            yield from _leaf_exceptions(sub)
    else:
        yield exc


def _rel(path) -> str:
    p = Path(str(path))
    return str(p.relative_to(kvkata.ROOT)) if kvkata.ROOT in p.parents else str(p)


def _frame_line(entry) -> str:
    try:
        source = str(entry.statement).strip().splitlines()[0]
    except Exception:  # noqa: BLE001 - no source to show (a compiled or generated frame)
        source = ""
    return f"  {_rel(entry.path)}:{entry.lineno + 1} in {entry.name}: {source}"


def _clip(text: str, limit: int = 600) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[:limit] + f" ... ({len(text) - limit} more characters)"


def _kata_label(item, kata) -> str:
    where = f", {kata.where(kvkata.package())}" if kata else ""
    return f"in {item.name} (kata {kata.card} {kata.name}{where})" if kata else f"in {item.nodeid}"


def _short_report(item, kata, excinfo, leaf: BaseException) -> str:
    """The exception, kvref's message first when kvref raised it, then the learner's own frames."""
    deepest = Path(str(excinfo.traceback[-1].path)) if excinfo.traceback else None
    message = _clip(f"{type(leaf).__name__}: {leaf}")
    lines = []
    if deepest is not None and KVREF in deepest.parents:
        last = excinfo.traceback[-1]
        # kvref's guards that stop the learner's own code (a kernel's stray load or store) say so.
        lines.append(f"{getattr(leaf, 'kvkata_header', 'kvref refused what it was given')}: {message}")
        lines.append(f"  (raised in {_rel(last.path)}:{last.lineno + 1} in {last.name})")
    else:
        lines.append(message)
    code = _code_entries(excinfo)
    if code:
        lines.append("your code:" if kvkata.mode() == "learner" else "the solution's code:")
        lines += [_frame_line(e) for e in code]
    tests = [e for e in excinfo.traceback if _is_test_file(Path(str(e.path)))]
    if tests:
        lines.append("called from the test:")
        lines.append(_frame_line(tests[-1]))
    lines += _learner_notes(leaf)
    lines.append(_kata_label(item, kata))
    return "\n".join(lines)


_OTHER_EXAMPLES = re.compile(r"\(note: (\d+) other explicit examples? also failed with this error; .*\)")


def _learner_notes(exc: BaseException) -> list[str]:
    """An exception's notes (hypothesis's falsifying example among them) in a learner's words: hypothesis's
    aside about other failing explicit examples points at a setting the learner does not have."""
    notes, asides = [], []
    for note in getattr(exc, "__notes__", []):
        other = _OTHER_EXAMPLES.fullmatch(note.strip())
        if other:
            n = int(other.group(1))
            asides.append(f"({n} other pinned input{'s' if n > 1 else ''} of this test fail{'' if n > 1 else 's'} "
                          "the same way)")
        else:
            notes.append(note)
    return notes + asides  # the failing input first, then how many others fail with it


def _todo_line(kata: manifest.Kata | None, where: str) -> str:
    card = kata.card if kata else "?"
    name = kata.name if kata else "?"
    return f"TODO {card} {name}: edit {where}  (stuck? kvkata hint {name})"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    kata = _kata_of(item)
    if kata is not None:
        report.user_properties.append((KATA_KEY, f"{kata.card} {kata.name}"))
    if not report.failed or call.excinfo is None or kata is None:
        return report
    excinfo = call.excinfo
    leaves = list(_leaf_exceptions(excinfo.value))
    code = _code_entries(excinfo)
    broken = next((e for e in leaves if isinstance(e, kvkata.KataImportError)), None)
    if broken is not None:
        item.config.stash[_broken_key].setdefault(kata.card, str(broken))
        report.longrepr = f"{kata.card} {kata.name}: {broken}"
        report.user_properties.append((BROKEN_KEY, True))
    elif code and all(isinstance(e, NotImplementedError) for e in leaves):
        # The stub is still a stub: one line, no traceback.
        where = f"{_rel(code[-1].path)}::{code[-1].frame.code.raw.co_qualname}"
        report.longrepr = _todo_line(kata, where)
        report.user_properties.append((TODO_KEY, True))
    elif excinfo.errisinstance(KataHungEarlier):
        report.longrepr = (f"NOT RUN {kata.card} {kata.name}: an earlier test of this kata hung "
                           f"({excinfo.value}); fix that hang first.")
    elif excinfo.errisinstance(KataTimeout) or (excinfo.typename == "Failed" and "Timeout" in str(excinfo.value)):
        item.config.stash[_hung_key][(kata.card, kata.name)] = item.name
        at = f" while running {code[-1].frame.code.raw.co_qualname} ({_rel(code[-1].path)}:{code[-1].lineno + 1})" if code else ""
        report.longrepr = (f"TIMEOUT {kata.card} {kata.name}: stopped after {_timeout_of(item)} s{at}. "
                           "Look for a loop that never ends, a shape that grows every step, or a loop far longer "
                           "than the answer needs (each test of the worked solution takes a few seconds at most). "
                           "The kata's other tests are not run in this session.")
    elif any(isinstance(e, FormulaOnly) for e in leaves):
        refusal = next(e for e in leaves if isinstance(e, FormulaOnly))
        report.longrepr = "\n".join([f"REFUSED {refusal}"] + [_frame_line(e) for e in code] + [_kata_label(item, kata)])
    elif any(isinstance(e, Mismatch) for e in leaves):
        lines = [str(e) for e in leaves if isinstance(e, Mismatch)]
        notes = [n for e in leaves for n in _learner_notes(e)]
        report.longrepr = "\n".join(lines + notes + [_kata_label(item, kata)])
    else:
        report.longrepr = _short_report(item, kata, excinfo, leaves[0])
    return report


def pytest_report_teststatus(report: pytest.TestReport, config: pytest.Config):
    props = dict(getattr(report, "user_properties", ()))
    if report.failed and props.get(BROKEN_KEY):
        return "broken", "B", ("DOES NOT IMPORT", {"red": True})
    if report.failed and props.get(TODO_KEY):
        return "todo", "T", ("TODO", {"yellow": True})
    return None


# --- results, board, notes ---------------------------------------------------------------

def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if _config is None:
        return
    results = _config.stash[_results_key]
    durations = _config.stash[_durations_key]
    durations[report.nodeid] = durations.get(report.nodeid, 0.0) + report.duration
    props = dict(report.user_properties)
    outcome = "broken" if props.get(BROKEN_KEY) else "todo" if props.get(TODO_KEY) else report.outcome
    previous = results.get(report.nodeid)
    # A test's result is its worst phase: a failed setup or teardown fails the test.
    if previous is None or previous == "passed" or outcome in ("failed", "todo", "broken"):
        if not (report.when == "teardown" and outcome == "passed"):
            results[report.nodeid] = outcome
    if report.failed:  # the learner message (called/got/expected), for `kvkata interview --live`
        _config.stash[_messages_key].setdefault(report.nodeid, str(report.longrepr))


# --- the work a test does, for the maintainers' stub-first check ---------------------------------
# With KVKATA_COUNT_WORK=1 (the maintainers' shared learner run), each test's CPU time in this process and
# the processes it starts are recorded. CPU time, not wall time: a loaded machine does not change it much.

_started = [0]


def _count_starts() -> None:
    import multiprocessing.process
    import subprocess

    def counted(real):
        def start(self, *args, **kwargs):
            _started[0] += 1
            return real(self, *args, **kwargs)
        return start

    multiprocessing.process.BaseProcess.start = counted(multiprocessing.process.BaseProcess.start)
    subprocess.Popen.__init__ = counted(subprocess.Popen.__init__)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem):
    if os.environ.get("KVKATA_COUNT_WORK") != "1":
        return (yield)
    if not getattr(_count_starts, "done", False):
        _count_starts()
        _count_starts.done = True
    cpu, started = time.process_time(), _started[0]
    try:
        return (yield)
    finally:
        item.config.stash[_work_key][item.nodeid] = {"cpu": time.process_time() - cpu,
                                                     "processes": _started[0] - started}


def _state(config: pytest.Config) -> board.RunState:
    return board.RunState(results=dict(config.stash[_results_key]), katas=dict(config.stash[_katas_key]),
                          totals=dict(config.stash[_totals_key]), broken=dict(config.stash[_broken_key]),
                          durations=dict(config.stash[_durations_key]), work=dict(config.stash[_work_key]))


_unsaved_key = pytest.StashKey[str]()  # why .kvkata/progress.json could not be written


def _narrowed(config: pytest.Config) -> bool:
    """The run named test ids (file::test): a kata's collected tests may then be fewer than it has."""
    return any("::" in arg for arg in config.args)


def pytest_sessionfinish(session: pytest.Session) -> None:
    state = _state(session.config)
    if kvkata.mode() == "learner" and state.katas:
        try:
            progress.record_run(board.settled(state), narrowed=_narrowed(session.config))
        except OSError as exc:  # a read-only checkout: the run still reports, the record is not kept
            session.config.stash[_unsaved_key] = str(exc)
    path = session.config.getoption("kvkata_json")
    if path:
        data = {"mode": kvkata.mode(), **state.to_json(), "messages": session.config.stash[_messages_key]}
        Path(path).write_text(json.dumps(data, indent=1))


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    state = _state(config)
    if not state.katas or config.getoption("collectonly"):
        return
    tw = terminalreporter
    if kvkata.mode() == "learner":
        if state.broken:
            tw.section("does not import", sep="-", red=True)
            for card_id, why in state.broken.items():
                tw.line(f"{card_id}: {why}")
        todos, seen = [], set()
        for report in terminalreporter.stats.get("todo", []):
            kata = dict(report.user_properties).get(KATA_KEY)
            if kata not in seen:
                seen.add(kata)
                todos.append(str(report.longrepr))
        if todos:
            tw.section("TODO: stubs still to fill in", sep="-", yellow=True)
            for line in todos:
                tw.line(line)
        tw.section("kvkata progress", sep="=")
        record = progress.after_run(board.settled(state), narrowed=_narrowed(config))
        for line in board.render(state, record):
            tw.line(line)
        if config.stash.get(_unsaved_key, None):
            tw.line(f"  (this run's results are not saved: {config.stash[_unsaved_key]})")
    elif kvkata.mode() == "interviewer":
        for card_id in sorted({k.card for k in state.katas.values()}):
            tw.section(f"interviewer notes: {card_id}", sep="=")
            for line in board.render_notes(manifest.card(card_id)):
                tw.line(line)


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    report = yield
    text = str(report.longrepr) if report.failed else ""
    found = re.search(r"KataImportError: (.+)", text)
    if found:
        # A kata module imported at a test module's top level: say which file and why.
        report.longrepr = found.group(1).strip()
    return report
