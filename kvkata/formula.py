"""The formula guard: a kata that asks for a closed form must not measure its answer.

While a formula kata runs, a TorchFunctionMode refuses every torch operation (a tensor made,
a model run, FlopCounterMode) and a profile hook refuses every call into kvref outside its
spec modules (`kvref/config.py`, `kvref/hardware.py`): kvref's measuring instruments and the
modules that hold the closed forms are off limits. Plain Python on the arguments is all a
formula needs: `cfg.n_layers`, `dtype.itemsize`, `hw.mem_bandwidth`.
"""

from __future__ import annotations

import functools
import sys
import threading
from pathlib import Path

from torch.overrides import TorchFunctionMode

from kvkata import ROOT

KVREF = ROOT / "kvref"
SPEC_MODULES = {KVREF / "config.py", KVREF / "hardware.py"}


class FormulaOnly(Exception):
    """A formula kata ran a torch operation or called into kvref's instruments."""


def _refusal(kata, what: str) -> str:
    return (f"{kata.card} {kata.name} asks for a closed form, computed from its arguments with plain Python "
            f"arithmetic (math is fine; no torch operation, no call into kvref's instruments); it {what}. "
            f"Derive the number from the arguments instead of measuring it.")


class _NoTorch(TorchFunctionMode):
    def __init__(self, kata) -> None:
        super().__init__()
        self.kata = kata

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        raise FormulaOnly(_refusal(self.kata, f"called torch.{name}"))


def _spec_or_outside(filename: str) -> bool:
    try:
        path = Path(filename).resolve()
    except (OSError, ValueError):
        return True
    return KVREF not in path.parents or path in SPEC_MODULES


def guarded(kata, fn):
    """`fn` wrapped so that it runs under the formula guard for `kata`."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            return fn(*args, **kwargs)
        refused: list[str] = []

        def profile(frame, event, arg):
            if event == "call" and not _spec_or_outside(frame.f_code.co_filename):
                where = Path(frame.f_code.co_filename).relative_to(ROOT)
                refused.append(f"called {frame.f_code.co_name} in {where}")
                raise FormulaOnly(_refusal(kata, refused[-1]))

        previous = sys.getprofile()
        sys.setprofile(profile)
        try:
            with _NoTorch(kata):
                return fn(*args, **kwargs)
        except FormulaOnly:
            raise
        except Exception as exc:
            if refused:  # the learner caught our refusal and raised something else
                raise FormulaOnly(_refusal(kata, refused[-1])) from exc
            raise
        finally:
            sys.setprofile(previous)

    return run
