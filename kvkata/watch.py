"""`kvkata watch [CARD] [--once]`: rerun the kata you are on each time a file under katas/ is saved.

The kata is the first one not yet solved (of CARD, or of all cards), read from the saved progress
(kvkata.progress), so watch starts at once without a run of the whole suite. A save reruns the
katas whose stub changed (or the current kata, when none did); when the current kata passes,
watch moves on to the next one not yet solved.

The watcher imports torch, hypothesis, pytest and the card's kvref modules once, then forks a
child per run (kvkata.runner.run_forked), so a run costs its tests and not the imports. The child
streams each learner message as its test ends: the TODO line of a stub, the first failure's
message in full (what was called, what came back, what was expected), a module that does not
import with its file, line and the offending code. Then the board. watch never writes the
learner's files; the run records its results in .kvkata/progress.json, as every learner run does.
"""

from __future__ import annotations

import gc
import os
import sys
import time
import traceback
from pathlib import Path

from kvkata import ROOT, board, manifest, progress, runner
from kvkata.plugin import BROKEN_KEY, KATA_KEY, TODO_KEY  # imported before runner.preload's first fork

CLEAR = "\x1b[2J\x1b[H"


def _say(text: str = "") -> None:
    print(text, flush=True)


class Stream:
    """A pytest plugin for the forked child: writes what the learner needs as each test ends.

    It writes to `fd` (the watcher's terminal), not to pytest's output, which the child keeps apart.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.todo: set[str] = set()
        self.broken: set[str] = set()
        self.first_failure: str | None = None

    def _write(self, text: str) -> None:
        os.write(self.fd, (text.rstrip("\n") + "\n").encode())

    def pytest_collectreport(self, report) -> None:
        if report.failed:
            self._write(f"collecting {report.nodeid or 'the tests'} failed:\n{_clip_lines(str(report.longrepr))}")

    def pytest_runtest_logreport(self, report) -> None:
        if report.when == "call" and report.passed:
            self._write(f"  ok    {_test_name(report.nodeid)}")
        if not report.failed:
            return
        props = dict(report.user_properties)
        kata = props.get(KATA_KEY, "")
        if props.get(TODO_KEY):
            if kata not in self.todo:
                self.todo.add(kata)
                self._write(str(report.longrepr))
        elif props.get(BROKEN_KEY):
            card = kata.split(" ")[0]
            if card not in self.broken:
                self.broken.add(card)
                self._write(str(report.longrepr))
                detail = syntax_error_detail(kata)
                if detail:
                    self._write(detail)
        elif str(report.longrepr).startswith("NOT RUN "):  # the plugin's word for a test after a hang
            self._write(f"  not run  {_test_name(report.nodeid)}")  # the TIMEOUT message above says why
        elif self.first_failure is None:
            self.first_failure = report.nodeid
            self._write(f"  FAIL  {_test_name(report.nodeid)}\n\n{report.longrepr}\n")
        else:
            self._write(f"  FAIL  {_test_name(report.nodeid)}")


def _test_name(nodeid: str) -> str:
    return nodeid.split("::")[-1]


def _clip_lines(text: str, limit: int = 60) -> str:
    lines = text.splitlines()
    return "\n".join(lines if len(lines) <= limit else lines[:limit] + [f"... ({len(lines) - limit} more lines)"])


def syntax_error_detail(kata_key: str) -> str | None:
    """Python's own account of a SyntaxError in the kata's module: file, line, the code, a caret."""
    card_id, _, name = kata_key.partition(" ")
    kata = next((k for k in manifest.all_katas() if (k.card, k.name) == (card_id, name)), None)
    if kata is None:
        return None
    path = kata.path()
    try:
        compile(path.read_text(), str(path), "exec")
    except SyntaxError as exc:
        exc.filename = str(path.relative_to(ROOT))
        return "".join(traceback.format_exception_only(exc)).rstrip()
    except (OSError, ValueError):
        return None
    return None


# --- the warm process ---------------------------------------------------------------------

def _preload_card(card: manifest.Card, loaded: set[str]) -> None:
    """Import the card's test modules once, for the kvref modules (and triton) they pull in, then drop
    the modules of katas/ themselves: each run imports the learner's current files afresh."""
    if card.id in loaded:
        return
    loaded.add(card.id)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    for test in sorted((ROOT / "katas" / card.dir).glob("test_*.py")):
        try:
            __import__(f"katas.{card.dir}.{test.stem}")
        except KeyboardInterrupt:  # Ctrl-C while loading: stop watching
            raise
        except BaseException:  # noqa: BLE001 - the run itself will report a module that does not import
            pass
    for name in list(sys.modules):
        if name.split(".")[0] == "katas":
            del sys.modules[name]
    gc.collect()
    gc.freeze()  # the children share these objects and need not scan them


def _run(katas: list[manifest.Kata], stream_fd: int) -> runner.Result:
    folders = sorted({f"katas/{k.dir}" for k in katas})
    args = [*folders, "-q", "--no-header", "--learner", "-p", "no:randomly"]
    for k in katas:
        args += ["--kata", k.name]
    stream = Stream(stream_fd)
    env = {"KVKATA_MODE": "learner"}
    if hasattr(os, "fork"):
        return runner.run_forked(args, cwd=ROOT, env=env, plugins=(stream,))
    result = runner.run(args, env=dict(os.environ, **env))  # no fork: a new interpreter, and pytest's own words
    os.write(stream_fd, result.output.encode())
    return result


class Watcher:
    """The warm process: what it has loaded, the kata it is on, and each stub's hash at its last run."""

    def __init__(self, current: manifest.Kata, clear: bool) -> None:
        self.current = current
        self.clear = clear
        self.loaded: set[str] = set()
        self.fd = os.dup(sys.stdout.fileno())
        self.seen: dict[str, str | None] = progress.stub_hashes()

    def cycle(self, katas: list[manifest.Kata], why: str, clear: bool = True) -> bool:
        """Run `katas`, show what happened and the board, then move on while they pass: True if all pass."""
        done: set[manifest.Kata] = set()
        while True:
            solved, state = self.run_once(katas, why, clear)
            done.update(katas)
            status = progress.statuses()
            nxt = self._next(katas, status) if solved else None
            if not solved or nxt is None or nxt in done:  # (in done: the record could not be written)
                if state is not None:
                    _say("")
                    for line in board.render(state, status=status):
                        _say(line)
                if not solved:
                    self.current = next((k for k in katas if status[progress.key(k)] != "solved"), katas[0])
                elif nxt is None:
                    _say("kvkata watch: every kata is solved. A save still reruns the kata you change.")
                return solved
            _say("\n" + "\n".join(board.wrap(f"kvkata watch: {_names(katas)} solved.", "", "  ")))
            _say(f"kvkata watch: moving on to {nxt.card} {nxt.name}\n  in {nxt.where()}\n")
            katas, why, clear = [nxt], "next kata", False
            self.current = nxt

    def run_once(self, katas: list[manifest.Kata], why: str, clear: bool) -> tuple[bool, board.RunState | None]:
        """One run of `katas`, its messages streamed and summed up: (all of them solved, the run's state)."""
        if clear and self.clear:
            sys.stdout.write(CLEAR)
        _say("\n".join(board.wrap(f"kvkata watch: {why}; running {_names(katas)} ...", "", "  ")))
        started = time.monotonic()
        for card in {k.card: manifest.card(k.card) for k in katas}.values():
            if card.id not in self.loaded:
                _say(f"  (loading {card.id}'s test modules once)")
                _preload_card(card, self.loaded)
        ran = progress.stub_hashes(katas)  # before the run: a save while it runs is a change still to run
        result = _run(katas, self.fd)
        self.seen.update(ran)
        elapsed = time.monotonic() - started
        if result.data is None or not result.data["tests"]:
            why_not = "did not finish" if result.data is None else "selected no test"
            _say(f"\nkvkata watch: the run {why_not} (pytest exit code {result.returncode}); pytest said:")
            _say(_clip_lines(result.output.strip(), 40))
            return False, None
        state = board.RunState.from_json(result.data)
        statuses = {s.kata.name: s for _, ss in board.tally(state) for s in ss if s.outcomes}
        _say("")
        for k in katas:
            s = statuses.get(k.name)
            if s is not None:
                _say(f"{k.card} {k.name}: {_summary(s)}")
        failed = [k for k in katas if k.name in statuses and "failed" in statuses[k.name].outcomes]
        if sum(statuses[k.name].outcomes.count("failed") for k in failed) > 1:
            _say(f"  (the first failure's message is above; pytest -k {failed[0].name} shows every one)")
        _say(f"  ({elapsed:.1f} s)")
        return all(statuses.get(k.name) is not None and statuses[k.name].state == "solved" for k in katas), state

    def follow_saves(self) -> None:
        """Rerun on every save under katas/, until Ctrl-C."""
        from watchfiles import watch as watch_files  # imported here: the other commands do not need it

        folder = ROOT / "katas"
        _say("\nkvkata watch: waiting for a save under katas/ (Ctrl-C stops)")
        # The file watcher starts only now: a save made before (while watch loaded or ran) is found by
        # its hash on the watcher's first quiet second. Saves made during a run are queued by the watcher.
        started = False
        for changes in watch_files(folder, watch_filter=lambda change, path: path.endswith((".py", ".toml")),
                                   yield_on_timeout=True, rust_timeout=1000):
            if not changes:
                if started:
                    continue
                started, katas = True, self.unseen()
                if not katas:
                    continue
                names = ", ".join(sorted({f"{k.module}.py" for k in katas}))
            else:
                started = True
                paths = {p for _, p in changes}
                names = ", ".join(sorted({Path(p).name for p in paths}))
                katas = self.changed(paths) or [self.current]
            self.current = katas[0]
            self.cycle(katas, f"{names} saved")
            _say("\nkvkata watch: waiting for a save under katas/ (Ctrl-C stops)")

    def _next(self, after: list[manifest.Kata], status: dict[str, str]) -> manifest.Kata | None:
        card = manifest.card(after[-1].card)
        return progress.first_unsolved(card, status) or progress.first_unsolved(None, status)

    def unseen(self) -> list[manifest.Kata]:
        """The katas whose stub differs from what watch last ran or saw (saved before the watcher started)."""
        now = progress.stub_hashes()
        return [k for k in manifest.all_katas() if now[progress.key(k)] != self.seen.get(progress.key(k))]

    def changed(self, paths: set[str]) -> list[manifest.Kata]:
        """The katas whose stub changed since they last ran here, among the modules saved."""
        saved = {Path(p).resolve() for p in paths}
        katas = [k for k in manifest.all_katas() if k.path().resolve() in saved]
        now = progress.stub_hashes(katas)
        return [k for k in katas if now[progress.key(k)] != self.seen.get(progress.key(k))]


def _names(katas: list[manifest.Kata]) -> str:
    """card00 repeat_kv; several katas of a card: card00: repeat_kv, attend."""
    by_card: dict[str, list[str]] = {}
    for k in katas:
        by_card.setdefault(k.card, []).append(k.name)
    return "; ".join(f"{c} {n[0]}" if len(n) == 1 else f"{c}: {', '.join(n)}" for c, n in by_card.items())


def _summary(s: board.KataStatus) -> str:
    counts = {o: s.outcomes.count(o) for o in ("passed", "failed", "todo", "broken", "skipped") if o in s.outcomes}
    text = ", ".join(f"{n} {o}" for o, n in counts.items())
    verdict = {"solved": "SOLVED", "todo": "still the stub", "does not import": "does not import",
               "failing": "failing", "partial": "passed in part"}.get(s.state, s.state)
    return f"{verdict} ({text} of {s.total} tests)"


def watch(card_id: str | None = None, once: bool = False) -> int:
    start = manifest.card(card_id) if card_id else None
    status = progress.statuses()
    kata = progress.first_unsolved(start, status)
    if kata is None and start is None:
        _say("\n".join(board.wrap("kvkata watch: every kata is solved (kvkata status shows the board). "
                                  "Give a card to keep watching one: kvkata watch card00", "", "  ")))
        return 0
    katas = [kata] if kata is not None else list(start.katas)  # a solved card: rerun all of it
    _say(f"kvkata watch: starting with {katas[0].card} {katas[0].name}\n  in {katas[0].where()}")
    _say("\n".join(board.wrap("Loading torch, hypothesis and kvref once (a few seconds); after that a save reruns "
                              "your kata without reloading them.", "  ", "  ")))
    try:
        watcher = Watcher(katas[0], clear=sys.stdout.isatty() and not once)  # the stubs as they are now
        runner.preload()
        ok = watcher.cycle(katas, "starting", clear=False)
        if once:
            return 0 if ok else 1
        watcher.follow_saves()
    except KeyboardInterrupt:
        _say("\nkvkata watch: stopped.")
    return 0
