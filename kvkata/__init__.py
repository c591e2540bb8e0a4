"""kvkata: the engine that runs the same kata tests against the learner's code or the solutions.

Tests import the code under test through `load`, never directly, so that one test file
serves all three modes:

- learner (default): `katas/`, the stubs the learner fills in;
- solutions: `solutions/`, the worked answers;
- interviewer: the solutions, plus the interviewer notes printed per card.

`load` is lazy: the module is imported when a test first uses it. A module that does not
import (a SyntaxError, a NameError at import time) then fails that card's tests, each with
one line naming the file, the line and the error, and leaves every other card's run alone.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from pathlib import Path
from types import ModuleType

from kvkata import manifest
from kvkata.paths import ROOT

MODES = ("learner", "solutions", "interviewer")
_mode: str | None = None


class KataImportError(ImportError):
    """The module under test could not be imported; kvkata never falls back to another one."""


def set_mode(mode: str) -> None:
    global _mode
    if mode not in MODES:
        raise ValueError(f"unknown kvkata mode {mode!r}; choose one of {', '.join(MODES)}")
    _mode = mode


def mode() -> str:
    if _mode is not None:
        return _mode
    env = os.environ.get("KVKATA_MODE", "learner")
    set_mode(env)
    return env


def package() -> str:
    """The package under test in the current mode: 'katas' or 'solutions'."""
    return "katas" if mode() == "learner" else "solutions"


def load(name: str) -> "KataModule":
    """The module `name` (e.g. "card00_cache_contract.cache") of the package under test, imported on first use."""
    return KataModule(name)


class KataModule:
    """A stand-in for a kata module that imports it on first attribute access.

    Formula katas (`formula = true` in cards.toml) come back wrapped: while one runs, measuring
    (kvref's models, instruments and answers, FlopCounterMode, hooks, real allocations) is refused
    (kvkata.formula).
    """

    def __init__(self, name: str) -> None:
        self._name = name

    def _module(self) -> ModuleType:
        full = f"{package()}.{self._name}"
        if full in sys.modules:
            return sys.modules[full]
        try:
            return importlib.import_module(full)
        except Exception as exc:
            path = ROOT / package() / (self._name.replace(".", "/") + ".py")
            raise KataImportError(import_failure(path, exc)) from None

    def __getattr__(self, attr: str):
        value = getattr(self._module(), attr)
        from kvkata import formula  # it imports torch: not before a kata is used

        kata = manifest.kata_named(self._name.split(".")[0], attr)
        if kata is not None and kata.formula and callable(value):
            return formula.guarded(kata, value)
        return value

    def __repr__(self) -> str:
        return f"<kata module {package()}.{self._name} (imported on first use)>"


def import_failure(path: Path, exc: BaseException) -> str:
    """One line naming the file, the line and the error (a SyntaxError shows the offending line)."""
    rel = path.relative_to(ROOT) if ROOT in path.parents else path
    if isinstance(exc, SyntaxError) and exc.filename:
        where = f"{_rel(exc.filename)}:{exc.lineno}"
        text = f": `{exc.text.strip()}`" if exc.text and exc.text.strip() else ""
        return (f"{rel} does not import: {type(exc).__name__} at {where}: {exc.msg}{text}. "
                f"Fix that file; kvkata never falls back to another implementation.")
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.startswith(str(ROOT))
              and "/kvkata/" not in f.filename]
    at = f" at {_rel(frames[-1].filename)}:{frames[-1].lineno} (`{(frames[-1].line or '').strip()}`)" if frames else ""
    return (f"{rel} does not import: {type(exc).__name__}{at}: {exc}. "
            f"Fix that file; kvkata never falls back to another implementation.")


def _rel(filename: str) -> str:
    p = Path(filename)
    return str(p.relative_to(ROOT)) if ROOT in p.parents else filename
