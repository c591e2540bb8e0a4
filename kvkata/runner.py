"""One way to run the kata suite and read back what happened, for the CLI, watch, the checks and mutate.

Both functions run pytest with `--kvkata-json` and return a `Result` holding the parsed report:

- `run` starts a new interpreter (`python -m pytest ...`): it pays for importing torch every time;
- `run_forked` forks this process, which has already imported torch, hypothesis and pytest
  (`preload`), so a run pays for its tests and little else. The child runs `pytest.main`; its
  output goes to `Result.output`, and `plugins` (pytest plugin objects) may stream what they see
  to the terminal as each test ends. Needs `os.fork` (Linux, macOS).
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path

from kvkata import ROOT


@dataclass
class Result:
    returncode: int   # pytest's exit code; negative: the run was killed by that signal
    output: str       # pytest's stdout and stderr
    data: dict | None  # the --kvkata-json report ({"mode", "tests", "totals", "broken"}); None if the run did not finish
    timed_out: bool = False

    @property
    def tests(self) -> dict:
        """nodeid -> {"outcome", "card", "kata"}; empty when the run did not finish."""
        return self.data["tests"] if self.data else {}


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run(args: list[str], *, cwd: Path = ROOT, env: dict | None = None, timeout: float | None = None) -> Result:
    """`python -m pytest ARGS --kvkata-json=...` in a new interpreter; a timeout raises subprocess.TimeoutExpired."""
    with tempfile.TemporaryDirectory(prefix="kvkata-run-") as tmp:
        out = Path(tmp) / "results.json"
        cmd = [sys.executable, "-m", "pytest", *args, f"--kvkata-json={out}"]
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        return Result(proc.returncode, proc.stdout + proc.stderr, _read(out))


def preload(extra: tuple[str, ...] = ()) -> None:
    """Import what every run needs, once, before the first fork: torch, hypothesis, pytest and its
    plugins (found through their entry points, as pytest would), and `extra`. kvkata's own plugin is
    left to the caller (watch imports it): the runner does not depend on the plugin it runs."""
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton, as the root conftest does
    import hypothesis  # noqa: F401
    import pytest  # noqa: F401
    from importlib.metadata import entry_points
    for ep in entry_points(group="pytest11"):
        try:
            ep.load()
        except Exception:  # noqa: BLE001 - pytest itself will report a plugin that does not load
            pass
    for name in extra:
        try:
            __import__(name)
        except Exception:  # noqa: BLE001 - optional, or failing for a reason the run will report
            pass
    # All of it lives as long as this process: frozen, no garbage collection in a forked child walks it
    # again (nor touches its pages, which the child then shares with this process instead of copying).
    gc.freeze()


def run_forked(args: list[str], *, cwd: Path | None = None, env: dict | None = None, timeout: float | None = None,
               fresh: tuple[str, ...] = ("katas",), plugins: tuple = ()) -> Result:
    """pytest.main(ARGS + --kvkata-json) in a forked child of this process.

    `fresh`: top-level packages the child drops from sys.modules and imports again (the learner's
    katas always; mutate adds kvkata, kvref and solutions when it runs on a scratch copy).
    `cwd`: the child's working directory, put first on sys.path. `env`: variables set in the child.
    `timeout`: seconds before the child is killed (Result.timed_out).
    """
    with tempfile.TemporaryDirectory(prefix="kvkata-run-") as tmp:
        out, log = Path(tmp) / "results.json", Path(tmp) / "output.txt"
        sys.stdout.flush()
        sys.stderr.flush()  # else the child inherits unwritten text and writes it again
        pid = os.fork()
        if pid == 0:
            _child(args + [f"--kvkata-json={out}"], log, cwd, env, fresh, plugins)  # never returns
        fired = threading.Event()
        timer = threading.Timer(timeout, lambda: (fired.set(), _kill(pid))) if timeout else None
        if timer:
            timer.start()
        try:
            status = _wait(pid)
        finally:
            if timer:
                timer.cancel()
        code = os.waitstatus_to_exitcode(status)
        return Result(code, log.read_text(errors="replace") if log.exists() else "", _read(out),
                      timed_out=fired.is_set())


def _child(args, log: Path, cwd, env, fresh, plugins) -> None:
    code = 70
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        for name in list(sys.modules):
            if name.split(".")[0] in fresh:
                del sys.modules[name]
        if env:
            os.environ.update(env)
        if cwd is not None:
            os.chdir(cwd)
            sys.path.insert(0, str(cwd))
        import pytest
        code = int(pytest.main(args, plugins=list(plugins)))
    except BaseException:  # noqa: BLE001 - whatever happens, the child must not return into the parent's code
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _wait(pid: int) -> int:
    """Wait for the child; on Ctrl-C (which reaches the child too) wait for it to stop, then re-raise."""
    try:
        return os.waitpid(pid, 0)[1]
    except KeyboardInterrupt:
        timer = threading.Timer(5, _kill, (pid,))  # pytest stops on Ctrl-C; if it does not, kill it
        timer.start()
        try:
            os.waitpid(pid, 0)
        finally:
            timer.cancel()
        raise


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
