"""The formula guard: a kata that asks for a closed form must derive its answer, not measure it.

A formula kata (`formula = true` in cards.toml) may do any arithmetic on the numbers it is given,
in Python, math, numpy or torch (a sum, a norm, a sqrt, `torch.linalg.svdvals` of a tensor made
from them), write a shape out on the meta device (`torch.empty(shape, device="meta").nbytes`
allocates nothing), read kvref's specs and call the learner's own katas of any card. While it
runs (on the main thread), the guard refuses what measures the answer:

- kvref beyond its specs: any call into a kvref module other than config.py and hardware.py
  (and validate.py, its argument checks). The others run a model, a cache or an engine, measure
  (measure.py, opcount.py) or hold the answers (roofline.py, paging.py, ...);
- an instrument or a run: a torch.nn module's forward, a hook, FlopCounterMode (or any
  TorchDispatchMode or TorchFunctionMode of its own: `torch.device("meta")` stays allowed), the
  profiler, torch.cuda's memory statistics;
- memory allocated from a shape on a real device: torch's empty, zeros, ones, full and rand*
  (and a tensor's `new_` forms) on any device but "meta", numpy's empty, zeros, ones and full.
  A tensor made from values (torch.tensor, arange, linspace) is arithmetic and allowed; so is a
  `_like` form of a tensor on a real device (`torch.zeros_like(x)` in a `torch.where`: its shape
  is that of a tensor that already exists, so it measures nothing `x` could not say), and a
  torch tensor of at most one element (`torch.empty(0, dtype=dtype).element_size()` is the
  dtype's itemsize: it measures nothing). A `_like` form that puts a meta tensor's shape on a
  real device is refused.
  A kata marked `allocates = true` in cards.toml (its answer is one no experiment gives: ALiBi's
  slopes, a bound, block keys, a reshard plan) may allocate and fill real tensors: there that is
  arithmetic.

kvref's cached instruments (`kvref.measure.step_flops_measured`, ...) keep their caches behind a
public Python function: a cache hit runs no Python code, so the guard sees the public call
(checks/test_formula_rule.py holds kvref to that).

It refuses the plausible ways to measure, not every conceivable one.
"""

from __future__ import annotations

import functools
import math
import sys
import threading
from pathlib import Path

import numpy as np
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from kvkata import manifest
from kvkata.paths import ROOT

KVREF = ROOT / "kvref"
SPEC_MODULES = {KVREF / "config.py", KVREF / "hardware.py", KVREF / "validate.py"}
TORCH = Path(torch.__file__).resolve().parent
NUMPY = Path(np.__file__).resolve().parent

RULE = ("Refused while a formula kata runs: kvref beyond its specs kvref/config.py and kvref/hardware.py "
        "(its models, caches, instruments and answers), a torch.nn module's forward, a hook, FlopCounterMode, "
        "the profiler, and memory allocated from a shape on a real device (torch.zeros/empty/ones/full/rand*, "
        "numpy's zeros/empty/ones/full). Allowed: arithmetic on the arguments in Python, math, numpy or torch "
        "(a sum, a norm, torch.tensor(values), svdvals), a shape written out on device='meta' (its .nbytes "
        "allocates nothing), and your own katas of any card.")

# The line every formula kata's docstring ends with (checks/test_formula_rule.py)
DOCSTRING_LINE = ("Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) "
                  "is refused.")

LIKE = {torch.empty_like, torch.zeros_like, torch.ones_like, torch.full_like, torch.rand_like, torch.randn_like,
        torch.randint_like}  # the shape of a tensor that exists: refused only when it moves a meta shape onto a device
TORCH_BUFFERS = {torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn, torch.randint,
                 torch.empty_strided, torch.empty_permuted, torch.Tensor.new_empty, torch.Tensor.new_empty_strided,
                 torch.Tensor.new_zeros, torch.Tensor.new_ones, torch.Tensor.new_full} | LIKE
NUMPY_BUFFERS = {np.empty, np.zeros, np.ones, np.full}  # empty, zeros: C functions; ones, full: Python
NUMPY_CODE = {f.__code__: f.__name__ for f in NUMPY_BUFFERS if hasattr(f, "__code__")}
MODULE_RUN = {torch.nn.Module._wrapped_call_impl.__code__, torch.nn.Module._call_impl.__code__}
INSTRUMENTS = {  # a file under torch/ -> what calling into it is
    "utils/flop_counter.py": "used FlopCounterMode: an instrument that counts what a run computes",
    "profiler/": "used the torch profiler: an instrument that measures a run",
    "autograd/profiler": "used the autograd profiler: an instrument that measures a run",
    "cuda/memory.py": "read torch.cuda's memory statistics: they measure an allocation",
}


class FormulaOnly(Exception):
    """A formula kata measured its answer (ran kvref, a model, an instrument, or allocated from a shape)."""


def _refusal(kata, what: str) -> str:
    return f"{kata.card} {kata.name} asks for a closed form, derived from its arguments, and it {what}. {RULE}"


def _device(args, kwargs) -> torch.device:
    if kwargs.get("device") is not None:
        return torch.device(kwargs["device"])
    if args and isinstance(args[0], torch.Tensor):  # the _like and new_ forms follow their tensor
        return args[0].device
    return torch.get_default_device()


def _elements(func, args, kwargs) -> int | None:
    """How many elements at most the call allocates: 0 or 1 (`torch.empty(0, dtype=d).element_size()`, a
    dtype's itemsize) measures nothing; None where the same call on the meta device fails."""
    try:
        shape = func(*args, **{**kwargs, "device": "meta"}).shape
    except Exception:  # noqa: BLE001 - an argument error shows when the real call runs
        return None
    return 1 if math.prod(shape) <= 1 else math.prod(shape)


class _NoRealBuffers(TorchFunctionMode):
    def __init__(self, refuse, allocates: bool = False) -> None:
        super().__init__()
        self.refuse = refuse
        self.allocates = allocates  # a kata whose answer is no size: allocating is arithmetic there

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.allocates:
            return func(*args, **kwargs)
        if func in LIKE and not (args[0] if args else kwargs["input"]).is_meta:  # a real tensor's shape, copied
            return func(*args, **kwargs)
        if func in TORCH_BUFFERS and (device := _device(args, kwargs)).type != "meta" and _elements(func, args, kwargs) != 1:
            name = ("Tensor." if func.__name__.startswith("new_") else "torch.") + func.__name__
            self.refuse(f"called {name} on {device.type}: memory allocated from a shape is measured, not derived "
                        f"(the same shape on device='meta', or dtype.itemsize, allocates nothing)")
        return func(*args, **kwargs)


@functools.lru_cache(maxsize=None)
def _where(filename: str) -> tuple[str, str] | None:
    """("kvref" | "torch" | "numpy", the path inside it) for a file in one of them, else None."""
    try:
        path = Path(filename).resolve()
    except (OSError, ValueError):
        return None
    if path in SPEC_MODULES:
        return None
    for name, root in (("kvref", KVREF), ("torch", TORCH), ("numpy", NUMPY)):
        if root in path.parents:
            return name, path.relative_to(root).as_posix()
    return None


def _numpy_buffer(name: str, caller) -> str | None:
    """numpy's own code may allocate; the kata's may not."""
    if caller is not None and (_where(caller.f_code.co_filename) or ("",))[0] == "numpy":
        return None
    return f"called numpy.{name}: memory allocated from a shape is measured, not derived"


def _measuring(frame, event, arg, allocates: bool = False) -> str | None:
    """What this call measures, or None. `allocates`: numpy's buffers are allowed (kata.allocates)."""
    if event == "c_call":  # numpy's empty and zeros, called from outside numpy
        return _numpy_buffer(arg.__name__, frame) if arg in NUMPY_BUFFERS and not allocates else None
    code = frame.f_code
    if event != "call" or (place := _where(code.co_filename)) is None:
        return None
    package, rel = place
    if package == "kvref":
        call = "imported" if code.co_name == "<module>" else f"called {code.co_name} in"
        qualname = f" ({code.co_qualname})" if code.co_qualname != code.co_name else ""
        return f"{call} kvref/{rel}{qualname}: beyond its specs, kvref runs, measures or holds the answers"
    if package == "numpy":
        return _numpy_buffer(NUMPY_CODE[code], frame.f_back) if code in NUMPY_CODE and not allocates else None
    if code in MODULE_RUN:
        return f"ran the torch.nn module {type(frame.f_locals.get('self')).__name__}: running a model measures it"
    if code is TorchDispatchMode.__enter__.__code__:
        return "entered a TorchDispatchMode: an instrument that sees every operation of a run"
    # torch.device("meta") enters by its own __enter__; _NoRealBuffers is a guarded kata calling another
    if code is TorchFunctionMode.__enter__.__code__ and not isinstance(frame.f_locals.get("self"), _NoRealBuffers):
        return "entered a TorchFunctionMode: an instrument that sees every torch call of a run"
    if code.co_name.startswith("register") and "hook" in code.co_name:
        return f"registered a hook ({code.co_name}): a hook measures a run"
    return next((what for prefix, what in INSTRUMENTS.items() if rel.startswith(prefix)), None)


def guarded(kata, fn):
    """`fn` wrapped so that it runs under the formula guard for `kata`."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            return fn(*args, **kwargs)
        refused: list[str] = []

        def refuse(what: str):
            refused.append(_refusal(kata, what))
            raise FormulaOnly(refused[-1])

        def profile(frame, event, arg):
            if (what := _measuring(frame, event, arg, kata.allocates)) is not None:
                refuse(what)  # raising here also turns the profile off

        previous = sys.getprofile()
        with _NoRealBuffers(refuse, kata.allocates):
            sys.setprofile(profile)
            try:
                result = fn(*args, **kwargs)
            except FormulaOnly:
                raise
            except Exception as exc:
                if refused:  # the learner caught our refusal and raised something else
                    raise FormulaOnly(refused[0]) from exc
                raise
            finally:
                sys.setprofile(previous)
        if refused:  # the learner caught our refusal and carried on
            raise FormulaOnly(refused[0])
        return result

    return run


def rule_markdown() -> str:
    """The rule and the formula katas of each card, from cards.toml (for the README)."""
    lines = ["A formula kata (`formula = true` in kvkata/cards.toml) asks for a closed form, derived from its "
             "arguments. " + RULE, ""]
    for card in manifest.cards():
        names = [f"`{k.name}`" + (" (may allocate)" if k.allocates else "") for k in card.katas if k.formula]
        if names:
            lines.append(f"- {card.id} ({card.title}): " + ", ".join(names))
    return "\n".join(lines)


if __name__ == "__main__":
    print(rule_markdown())
