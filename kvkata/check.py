"""Assertions whose failure a learner can act on: what was called, what came back, what was expected.

Every helper raises `Mismatch` (an AssertionError) with a message in the form
"called f(args): returned X; expected Y", and for tensors names the first mismatching
element by its axes (step, layer, head, position, ...), the largest error and the tolerance.
"""

from __future__ import annotations

import builtins
import math
from collections.abc import Sequence

import torch


class Mismatch(AssertionError):
    """A kata returned the wrong thing. The message says what and where."""


def describe(x: object) -> str:
    """A short description of an argument or a result: tensors by dtype and shape."""
    if isinstance(x, torch.Tensor):
        if x.ndim == 0:
            return f"tensor({x.item()!r})"
        if x.ndim == 1 and x.numel() <= 8 and not x.is_floating_point() and x.device.type != "meta":
            return f"tensor({x.tolist()!r})"  # positions, e.g. input_pos=tensor([0])
        return f"{str(x.dtype).removeprefix('torch.')}{list(x.shape)}"
    if isinstance(x, (list, tuple)) and len(x) > 4:
        return f"{type(x).__name__} of {len(x)}"
    if isinstance(x, (list, tuple)):
        inner = ", ".join(describe(v) for v in x)
        return f"[{inner}]" if isinstance(x, list) else f"({inner})"
    if isinstance(x, float):
        text = f"{x:.6g}"
        return text + ".0" if text.lstrip("-").isdigit() else text  # 4.0 reads as a float, not the int 4
    if hasattr(x, "__dict__") and not isinstance(x, type):
        return type(x).__name__
    return repr(x)


def plural(n: int, word: str) -> str:
    """"1 layer", "2 layers", "1,000 sequences": counts in messages read as English."""
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}s"


def call_str(fn: str, *args, **kwargs) -> str:
    parts = [describe(a) for a in args] + [f"{k}={describe(v)}" for k, v in kwargs.items()]
    return f"{fn}({', '.join(parts)})"


def expect(condition: bool, call: str, got: object, expected: str) -> None:
    """Fail unless `condition`; `expected` says in words what should have come back."""
    if not condition:
        raise Mismatch(f"called {call}: returned {describe(got)}; expected {expected}")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _kind_of(expected: object) -> str | None:
    """What a learner must return when `expected` is the answer: a Python int, float or bool."""
    if isinstance(expected, bool):
        return "bool"
    if _is_int(expected):
        return "int"
    if isinstance(expected, float):
        return "float"
    return None


def _type_mistake(call: str, got: object, expected: object, why: str) -> str | None:
    """A learner's message when `got` is of the wrong type for `expected`, even if its value is right."""
    kind = _kind_of(expected)
    ok = {"bool": lambda g: isinstance(g, bool), "int": _is_int, "float": _is_real}.get(kind)
    if ok is None or ok(got):
        return None
    try:
        same = bool(got == expected) if not isinstance(got, torch.Tensor) or got.numel() == 1 else False
    except Exception:  # noqa: BLE001 - a value that cannot even be compared is simply wrong
        same = False
    value = "the value is right" if same else f"expected {expected!r}" + (f" ({why})" if why else "")
    hint = {"int": "return a Python int (int(x), or integer arithmetic: // not /)",
            "float": "return a Python float", "bool": "return a Python bool"}[kind]
    shown = describe(got) if isinstance(got, torch.Tensor) else repr(got)
    return f"called {call}: returned {shown} of type {type(got).__name__}: {hint}; {value}"


def _element_mistake(call: str, got: object, expected: object, why: str) -> str | None:
    """The first element of a list, tuple or dict answer of the wrong type, at any depth.

    `[tensor(3), tensor(5)] == [3, 5]` is True in Python (each 0-d tensor compares equal to its int),
    so equality alone would pass a list of tensors where the kata asks for Python ints.
    """
    if isinstance(expected, (list, tuple)) and isinstance(got, (list, tuple)) and len(got) == len(expected):
        pairs = [(f"[{i}]", g, e) for i, (g, e) in enumerate(zip(got, expected))]
    elif isinstance(expected, dict) and isinstance(got, dict) and got.keys() == expected.keys():
        pairs = [(f"[{k!r}]", got[k], e) for k, e in expected.items()]
    else:
        return None
    for where, g, e in pairs:
        mistake = _type_mistake(call + where, g, e, why) or _element_mistake(call + where, g, e, why)
        if mistake:
            return mistake
    return None


def expect_equal(call: str, got: object, expected: object, why: str = "") -> None:
    """`got` must equal `expected` and be of its Python type (an int answer must be an int, not a tensor),
    and so must every element of a list, tuple or dict answer."""
    if isinstance(expected, torch.Tensor):
        raise TypeError("kvkata maintainers: use expect_close or expect_tensor_equal to compare tensors")
    mistake = _type_mistake(call, got, expected, why)
    if mistake:
        raise Mismatch(mistake)
    if got != expected:
        tail = f" ({why})" if why else ""
        raise Mismatch(f"called {call}: returned {got!r}; expected {expected!r}{tail}")
    mistake = _element_mistake(call, got, expected, why)
    if mistake:
        raise Mismatch(mistake)


def expect_real(call: str, got: object, want: float, rel: float = 1e-9, abs: float = 0.0, why: str = "") -> None:
    """`got` must be a Python number (int or float, not a tensor) within rel·|want| + abs of `want`."""
    if not _is_real(got):
        raise Mismatch(_type_mistake(call, got, float(want), why))
    if not (math.isfinite(got) and builtins.abs(got - want) <= rel * builtins.abs(want) + abs):
        tail = f" ({why})" if why else ""
        raise Mismatch(f"called {call}: returned {got:.6g}; expected {want:.6g} "
                       f"(within {rel:g}·|expected| + {abs:g}){tail}")


def expect_tensor(call: str, got: object, shape: Sequence[int], dtype: torch.dtype | None = None,
                  layout: str = "") -> None:
    """The result must be a tensor of `shape` (and `dtype`); `layout` names the axes."""
    want = f"{layout} = {list(shape)}" if layout else str(list(shape))
    if not isinstance(got, torch.Tensor):
        raise Mismatch(f"called {call}: returned {type(got).__name__}; expected a tensor {want}")
    if tuple(got.shape) != tuple(shape):
        raise Mismatch(f"called {call}: returned a tensor of shape {list(got.shape)}; expected shape {want}")
    if dtype is not None and got.dtype != dtype:
        raise Mismatch(f"called {call}: returned dtype {got.dtype}; expected {dtype}")


def expect_close(call: str, got: torch.Tensor, expected: torch.Tensor, axes: Sequence[str] = (),
                 atol: float = 1e-5, rtol: float = 1e-5, layout: str = "", why: str = "") -> None:
    """Elementwise |got - expected| <= atol + rtol·|expected|, else name the first bad element (and say why)."""
    expect_tensor(call, got, expected.shape, layout=layout)
    g, e = got.detach().double().cpu(), expected.detach().double().cpu()
    err = (g - e).abs()
    bad = ~(err <= atol + rtol * e.abs())  # NaN counts as bad
    if not bad.any():
        return
    idx = [int(i) for i in bad.nonzero()[0]]
    names = list(axes) + [f"dim{i}" for i in range(len(axes), len(idx))]
    where = ", ".join(f"{n}={i}" for n, i in zip(names, idx))
    raise Mismatch(
        f"called {call}: wrong values at {bad.sum().item()} of {bad.numel()} elements; "
        f"first at [{where}]: got {g[tuple(idx)].item():.6g}, expected {e[tuple(idx)].item():.6g}; "
        f"largest error {err.nan_to_num(float('inf')).max().item():.3g} (tolerance {atol:g} + {rtol:g}·|expected|)"
        + (f"\n  expected: {why}" if why else "")
    )


def expect_tensor_equal(call: str, got: torch.Tensor, expected: torch.Tensor, axes: Sequence[str] = (),
                        layout: str = "") -> None:
    """Bit-identical: the same shape, dtype and every element."""
    expect_tensor(call, got, expected.shape, expected.dtype, layout=layout)
    if not torch.equal(got, expected):
        expect_close(call, got, expected, axes, atol=0.0, rtol=0.0, layout=layout)
        raise Mismatch(f"called {call}: values differ from the expected ones (NaN or signed zero)")
