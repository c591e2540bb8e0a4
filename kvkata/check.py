"""Assertions whose failure a learner can act on: what was called, what came back, what was expected.

Every helper raises `Mismatch` (an AssertionError) with a message in the form
"called f(args): returned X; expected Y", and for tensors names the first mismatching
element by its axes (step, layer, head, position, ...), the largest error and the tolerance.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class Mismatch(AssertionError):
    """A kata returned the wrong thing. The message says what and where."""


def describe(x: object) -> str:
    """A short description of an argument or a result: tensors by dtype and shape."""
    if isinstance(x, torch.Tensor):
        if x.numel() == 1 and x.ndim <= 1:
            return f"tensor({x.item()!r})"
        return f"{str(x.dtype).removeprefix('torch.')}{list(x.shape)}"
    if isinstance(x, (list, tuple)) and len(x) > 4:
        return f"{type(x).__name__} of {len(x)}"
    if isinstance(x, (list, tuple)):
        inner = ", ".join(describe(v) for v in x)
        return f"[{inner}]" if isinstance(x, list) else f"({inner})"
    if isinstance(x, float):
        return f"{x:.6g}"
    if hasattr(x, "__dict__") and not isinstance(x, type):
        return type(x).__name__
    return repr(x)


def call_str(fn: str, *args, **kwargs) -> str:
    parts = [describe(a) for a in args] + [f"{k}={describe(v)}" for k, v in kwargs.items()]
    return f"{fn}({', '.join(parts)})"


def expect(condition: bool, call: str, got: object, expected: str) -> None:
    """Fail unless `condition`; `expected` says in words what should have come back."""
    if not condition:
        raise Mismatch(f"called {call}: returned {describe(got)}; expected {expected}")


def expect_equal(call: str, got: object, expected: object, why: str = "") -> None:
    if isinstance(got, torch.Tensor) or isinstance(expected, torch.Tensor):
        raise TypeError("use expect_close or expect_tensor_equal for tensors")
    if got != expected:
        tail = f" ({why})" if why else ""
        raise Mismatch(f"called {call}: returned {got!r}; expected {expected!r}{tail}")


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
                 atol: float = 1e-5, rtol: float = 1e-5, layout: str = "") -> None:
    """Elementwise |got - expected| <= atol + rtol·|expected|, else name the first bad element."""
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
    )


def expect_tensor_equal(call: str, got: torch.Tensor, expected: torch.Tensor, axes: Sequence[str] = (),
                        layout: str = "") -> None:
    """Bit-identical: the same shape, dtype and every element."""
    expect_tensor(call, got, expected.shape, expected.dtype, layout=layout)
    if not torch.equal(got, expected):
        expect_close(call, got, expected, axes, atol=0.0, rtol=0.0, layout=layout)
        raise Mismatch(f"called {call}: values differ from the expected ones (NaN or signed zero)")
