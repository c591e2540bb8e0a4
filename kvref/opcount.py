"""Instruments that count the arithmetic a run executes, op by op, as it runs.

- `MatmulFlops` counts what PyTorch's `FlopCounterMode` counts: each aten op that has a FLOP
  formula in `torch.utils.flop_counter` (mm, addmm, bmm, baddbmm, convolutions, the attention
  kernels) is charged by that formula (2 FLOPs per multiply-add of its real shapes), and an op
  that has a decomposition is counted as the ops it decomposes into, as FlopCounterMode does
  (so SDPA on the meta device is counted as its matmuls). The formulas are PyTorch's, not ours;
  `checks/test_kvref_measure.py` proves that both instruments give the same count, op by op, on
  kvref's models.
- `ElementwiseOps` counts what FlopCounterMode does not see: for every aten mul, add, sub and
  div on a floating-point tensor, in place or not (`x *= cos` is aten.mul_, `1 - x` aten.rsub),
  one operation per element of its output (x * cos on an `[B, H, S, D]` tensor: B·H·S·D
  multiplies; addcmul and addcdiv, a multiply or divide and an add per element). Negation, copies, casts, concatenation and indexing
  move or relabel data and count nothing; sin, cos and exp are tallied apart, as transcendentals,
  and pow (RMSNorm's x²) apart again, as pow: none of them is in `.flops`.

Both are `InstrumentMode`s: TorchDispatchModes that opt out of the torch._dynamo wrapper PyTorch
(2.13) puts around every mode's `__torch_dispatch__`. That wrapper imports torch._dynamo on a
mode's first op, about 1 s on a CPU: FlopCounterMode pays it, and it was the largest part of
each FLOP-counting card's run. kvref never compiles, so the wrapper would guard nothing. (Ops on
the meta device still import torch._dynamo: PyTorch's meta kernels for pow, mean, rsqrt and
others are Python references wrapped the same way.)
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# Each name once per element of the output; the in-place packets (mul_) are other packets than mul.
ARITHMETIC = {aten.mul: ("mul",), aten.mul_: ("mul",), aten.add: ("add",), aten.add_: ("add",),
              aten.sub: ("sub",), aten.sub_: ("sub",), aten.rsub: ("sub",), aten.div: ("div",), aten.div_: ("div",),
              aten.addcmul: ("mul", "add"), aten.addcmul_: ("mul", "add"),
              aten.addcdiv: ("div", "add"), aten.addcdiv_: ("div", "add")}
ARITHMETIC_NAMES = ("mul", "add", "sub", "div")
TRANSCENDENTAL = {aten.sin: "sin", aten.cos: "cos", aten.exp: "exp"}
POWER = {aten.pow: "pow"}  # x ** p: RMSNorm's x² (a multiply per element for p = 2), tallied on its own


class InstrumentMode(TorchDispatchMode):
    """A TorchDispatchMode whose `__torch_dispatch__` is not wrapped in `torch._dynamo.disable`.

    `_should_skip_dynamo` is a private classmethod of TorchDispatchMode whose own docstring calls
    it a temporary measure, not a public API: a later torch may drop or change it. On a torch
    without it, the override does nothing and the first op only costs the import.
    """

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False


class MatmulFlops(InstrumentMode):
    """FLOPs by PyTorch's FLOP formulas (FlopCounterMode's) while active: `.total` and `.by_op`."""

    def __init__(self) -> None:
        super().__init__()
        # Imported here: torch.utils.flop_counter imports triton where it is installed, and the
        # cards that only measure bytes should not pay for it.
        from torch.utils.flop_counter import FlopCounterMode

        self.formulas = FlopCounterMode(display=False).flop_registry
        self.by_op: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # As FlopCounterMode does: an op with a decomposition is counted as the ops it decomposes
        # into (SDPA on the meta device: its matmuls); the others run and meet their formula.
        if func is not torch.ops.prim.device.default:
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        formula = self.formulas.get(func.overloadpacket)
        if formula is not None:
            self.by_op[str(func.overloadpacket)] += int(formula(*args, **kwargs, out_val=out))
        return out


class ElementwiseOps(InstrumentMode):
    """Counts elementwise arithmetic on floating tensors while active: `.flops` (mul + add + sub + div)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_op: Counter[str] = Counter()

    @property
    def flops(self) -> int:
        return sum(self.by_op[name] for name in ARITHMETIC_NAMES)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        packet = func.overloadpacket
        names = ARITHMETIC.get(packet) or (TRANSCENDENTAL.get(packet) or POWER.get(packet),)
        if names[0] and isinstance(out, torch.Tensor) and out.is_floating_point():
            for name in names:
                self.by_op[name] += out.numel()
        return out


@contextmanager
def counting_rope_of_model():
    """Count the elementwise ops kvref's model spends inside `apply_rope` (its RoPE on q and k).

    Yields an `ElementwiseOps` that sees only what runs inside the model's calls to apply_rope:
    the cos/sin tables, computed from positions alone, are outside it.
    """
    import kvref.model as model_module

    counter = ElementwiseOps()
    original = model_module.apply_rope

    def counted(x, cos, sin):
        with counter:
            return original(x, cos, sin)

    model_module.apply_rope = counted
    try:
        yield counter
    finally:
        model_module.apply_rope = original


def rope_flops_of_decode(model, prompt: torch.Tensor) -> int:
    """Elementwise FLOPs of RoPE in one cached decode step of kvref's `model` after `prompt` `[B, T]`."""
    if not isinstance(prompt, torch.Tensor) or prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be a tensor of token ids [B, T] with T >= 1, got {prompt!r:.60}")
    B, T = prompt.shape
    caches = model.new_caches("growing", B, T + 1)
    with torch.no_grad():
        model.prefill(prompt, caches)
        with counting_rope_of_model() as counter:
            model(prompt[:, -1:], torch.tensor([T]), caches)
    return counter.flops


def rope_flops_of_rotation(x: torch.Tensor, rotary_dim: int, convention: str = "half") -> int:
    """Elementwise FLOPs `kvref.rope.rope_apply` spends rotating `x` `[..., S, D]` (tables built outside the count)."""
    from kvref.rope import rope_apply, rope_tables

    cos, sin = rope_tables(torch.arange(x.shape[-2]), rotary_dim, convention=convention)
    with ElementwiseOps() as counter:
        rope_apply(x, cos, sin, convention)
    return counter.flops
