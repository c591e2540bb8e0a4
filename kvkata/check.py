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


class Shown:
    """An argument shown in a call line by the text it is given: `call_str("f", Shown("llama-2-7b"))` reads
    `f(llama-2-7b)`, where describe would say less (a type's name) or more. No __dict__ (__slots__): describe
    shows an object that has one by its type's name, and this one by its repr, the text."""
    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def describe(x: object) -> str:
    """A short description of an argument or a result: tensors by dtype and shape, kvref's configs by their
    shape fields (describe_config), its devices by name."""
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
    shown = _describe_kvref(x)
    if shown:
        return shown
    if hasattr(x, "__dict__") and not isinstance(x, type):
        return type(x).__name__
    return repr(x)


# A config's fields under the names the katas use for shapes (STYLE.md: L, H, Hkv, D; W a window).
_FIELD_LABELS = {"n_layers": "L", "n_heads": "H", "n_kv_heads": "Hkv", "head_dim": "D", "sliding_window": "W",
                 "vocab_size": "V"}
# The fields that set a model's weights besides L, H, Hkv, D: for katas that count FLOPs or weight bytes.
PARAMETER_FIELDS = ("d_model", "d_ff", "vocab_size", "mlp", "tie_embeddings", "n_experts", "experts_per_token",
                    "n_shared_experts", "first_dense_layers", "dense_d_ff", "mla_q_rank")
_ALWAYS_SHOWN = ("d_model", "d_ff", "vocab_size")  # of PARAMETER_FIELDS; the rest where they are not the default


def describe_config(cfg, *more: str) -> str:
    """A ModelConfig by the fields that shape its KV cache, so that a learner can rebuild the call.

    `ModelConfig(L=2, H=4, Hkv=2, D=16)`; a sliding window (W) and MLA's cached widths where set.
    `more` names further fields the kata reads (PARAMETER_FIELDS for a kata that counts the
    weights); of those, a field other than d_model, d_ff and vocab_size is shown only where it
    differs from ModelConfig's default. A preset is shown by its name and the cache's fields
    alone, `llama-2-7b(L=32, H=32, Hkv=32, D=128)`: its name says the rest.
    """
    from dataclasses import fields

    from kvref.config import PRESETS
    names = ["n_layers", "n_heads", "n_kv_heads", "head_dim"]
    names += [n for n in ("sliding_window", "mla_latent_dim", "mla_rope_dim") if getattr(cfg, n)]
    is_preset = bool(cfg.name) and PRESETS.get(cfg.name) == cfg
    if not is_preset:
        default = {f.name: f.default for f in fields(cfg)}
        names += [n for n in more if n not in names and (n in _ALWAYS_SHOWN or getattr(cfg, n) != default[n])]
    text = ", ".join(f"{_FIELD_LABELS.get(n, n)}={getattr(cfg, n)!r}" for n in names)
    return f"{cfg.name if is_preset else 'ModelConfig'}({text})"


def _describe_kvref(x: object) -> str | None:
    """kvref's configs by their fields, its devices by name (None for anything else)."""
    kind = type(x).__module__, type(x).__name__
    if kind == ("kvref.config", "ModelConfig"):
        return describe_config(x)
    if kind == ("kvref.hardware", "Hardware"):
        from kvref.hardware import HARDWARE
        base, _, name = x.name.rpartition("x")
        known = HARDWARE.get(x.name) or (HARDWARE[name].tensor_parallel(int(base))
                                          if base.isdigit() and name in HARDWARE else None)
        return x.name if known == x else repr(x)  # a what-if device shows its numbers
    return None


def plural(n: int, word: str) -> str:
    """"1 layer", "2 layers", "1,000 sequences": counts in messages read as English."""
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}s"


def first_where(holds) -> int:
    """The smallest n >= 1 with holds(n), for a condition that stays true once it holds (a measured size
    or intensity that grows with n): doubling past it, then halving the gap, so a few dozen measurements
    instead of one per n."""
    hi = 1
    while not holds(hi):
        hi *= 2
    lo = hi // 2  # does not hold (or 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if holds(mid) else (mid, hi)
    return hi


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


_CONTAINER_HOW = {list: "list(x)", tuple: "tuple(x)", dict: "", set: "set(x)", frozenset: "frozenset(x)"}


def _container_of(x: object) -> type | None:
    return next((t for t in _CONTAINER_HOW if isinstance(x, t)), None)


def _type_slip(got: object, expected: object, where: str = "") -> tuple[str, object, object] | None:
    """The first place where `got` is not of `expected`'s type: a container's own type, then its elements'.

    Returns (where, the part of got, the part of expected); `where` is "" for got itself,
    else an index path such as "[0]" or "['A'][2]". Element types are compared only where the
    containers line up (same type, and for lists the same positions), so a wrong value is left
    to the value comparison.
    """
    want = _container_of(expected)
    if want is not None:
        if _container_of(got) is not want:
            return where, got, expected
        if want is dict:
            pairs = _members(f"{where} key", got, expected)
            pairs += [(f"{where}[{k!r}]", got[k], v) for k, v in expected.items() if k in got]
        elif want in (set, frozenset):
            pairs = _members(f"{where} element", got, expected)
        else:
            pairs = [(f"{where}[{i}]", g, e) for i, (g, e) in enumerate(zip(got, expected))]
        return next((slip for slip in (_type_slip(g, e, w) for w, g, e in pairs) if slip), None)
    kind = _kind_of(expected)
    ok = {"bool": lambda g: isinstance(g, bool), "int": _is_int, "float": _is_real}.get(kind)
    return None if ok is None or ok(got) else (where, got, expected)


def _members(where: str, got, expected) -> list[tuple[str, object, object]]:
    """Set elements or dict keys have no order: each of got's is held to the kind all of expected's share."""
    kinds = {_kind_of(v) for v in expected}
    one = next(iter(expected), None)
    return [(where.strip(), g, one) for g in got] if len(kinds) == 1 and None not in kinds else []


def _plain(x: object) -> object:
    """`x` with tensors, numpy values and containers made plain Python: to tell a right value of a wrong type."""
    if isinstance(x, torch.Tensor) or (hasattr(x, "tolist") and hasattr(x, "dtype")):  # numpy arrays and scalars
        return x.tolist()
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, dict):
        return {_plain(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (set, frozenset)):
        return {_plain(v) for v in x}
    return x


def _hint(got: object, expected: object) -> str:
    """What to return instead, in the words of a fix."""
    want = _container_of(expected)
    if want is not None:
        how = "x.tolist()" if want is list and hasattr(got, "tolist") else _CONTAINER_HOW[want]  # a tensor, an array
        return f"return a {want.__name__}" + (f" ({how})" if how else "")
    kind = _kind_of(expected)
    if hasattr(got, "item"):  # a tensor or a numpy value
        return f"return a Python {kind} (x.item(), or {kind}(x))"
    return {"int": "return a Python int (int(x), or integer arithmetic: // not /)",
            "float": "return a Python float", "bool": "return a Python bool"}[kind]


def _shown(x: object, limit: int = 120) -> str:
    text = describe(x) if isinstance(x, torch.Tensor) else repr(x)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _type_mistake(call: str, got: object, expected: object, why: str) -> str | None:
    """A learner's message when `got` (or an element of it) is of the wrong type, even if its value is right.

    Containers are held to the same standard as numbers: a tuple for a list, a tensor for a
    list, a list of 0-d tensors or numpy ints for a list of ints are each named, with the fix.
    """
    slip = _type_slip(got, expected)
    if slip is None:
        return None
    where, part, wanted = slip
    try:
        same = bool(_plain(got) == _plain(expected))
    except Exception:  # noqa: BLE001 - a value that cannot even be compared is simply wrong
        same = False
    value = "the value is right" if same else f"expected {_shown(expected)}" + (f" ({why})" if why else "")
    what = f"{_shown(part)} of type {type(part).__name__}"
    if where:
        what = f"{_shown(got)}, whose {where} is {what}"
    return f"called {call}: returned {what}: {_hint(part, wanted)}; {value}"


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
