"""kvkata: the engine that runs the same kata tests against the learner's code or the solutions.

Tests import the code under test through `load`, never directly, so that one test file
serves all three modes:

- learner (default): `katas/`, the stubs the learner fills in;
- solutions: `solutions/`, the worked answers;
- interviewer: the solutions, plus the interviewer notes printed per card.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
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


def load(name: str) -> ModuleType:
    """Import `name` (e.g. "card00_cache_contract.cache") from the package under test."""
    full = f"{package()}.{name}"
    try:
        return importlib.import_module(full)
    except Exception as exc:
        path = ROOT / package() / (name.replace(".", "/") + ".py")
        raise KataImportError(
            f"{mode()} mode could not import {full} ({path.relative_to(ROOT)}): "
            f"{type(exc).__name__}: {exc}. Fix that file; kvkata never falls back to another implementation."
        ) from exc
