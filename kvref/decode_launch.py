"""How card09's Triton kernel kata is launched, and the counter that measures the bytes it loads.

Not a spoiler: this module holds no kernel and no attention. It says what the kata's kernel is
given (grid, arguments, scratch) and what it must write; it merges what the kernel wrote with
kvref's own merge (``kvref.triton_decode.merge_partials``, a spoiler for card09's merge kata);
and it counts, under Triton's CPU interpreter, every byte a kernel loads from K and from V.

The kernel's contract, in one place (the kata's stub says the same)::

    kernel[(B, Hkv, num_splits)](
        q_ptr, k_ptr, v_ptr, seq_lens_ptr, part_out_ptr, part_lse_ptr,
        sm_scale, split_len,
        stride_qb, stride_qh,
        stride_kb, stride_kh, stride_kt,
        stride_vb, stride_vh, stride_vt,
        stride_pb, stride_ph, stride_ps,
        stride_lb, stride_lh,
        G=G, D=D, BLOCK_G=max(16, next_power_of_2(G)), BLOCK_N=block_n,
    )

q ``[B, H, D]``, k/v ``[B, Hkv, T, D]``, each with the head dim contiguous (stride 1), seq_lens
``[B]`` int32 in 1..T. Program ``(b, kv_head, s)`` owns positions ``[s * split_len, (s + 1) *
split_len)`` of sequence b, cut at ``seq_lens[b]``; ``split_len`` is a multiple of ``BLOCK_N``.
For each of the G query heads ``h = kv_head * G + g`` that read that KV head it writes
``part_out[b, h, s, :]``, the output softmax-normalised over its own positions, and
``part_lse[b, h, s]``, the natural log-sum-exp of its scaled scores ``sm_scale * q . k``; a
split with no positions writes zeros and ``-inf``. Both scratch tensors are float32 and start
as NaN, so anything the kernel forgets to write shows.

On CPU tensors the kernel runs under Triton's interpreter, which needs ``TRITON_INTERPRET=1`` set
before triton is first imported (the root conftest sets it where there is no CUDA device);
``count_loads`` counts there. On CUDA tensors the kernel is compiled and runs on the GPU.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import math
import textwrap
from dataclasses import dataclass, field

import torch

from kvref.triton_decode import _INTERPRETED, MAX_SPLITS, _check_inputs, merge_partials
from kvref.validate import check_tensor

try:
    import triton
    from triton.runtime import interpreter as _interp
    from triton.runtime.errors import InterpreterError
except ImportError as exc:  # kvref imports without triton; launching needs it
    triton = None
    _TRITON_IMPORT_ERROR: ImportError | None = exc
else:
    _TRITON_IMPORT_ERROR = None

MIN_BLOCK_G = 16  # tl.dot needs every tile dimension >= 16; padding rows are masked
NUM_WARPS = 4


def split_len_for(T: int, num_splits: int, block_n: int) -> int:
    """Positions per split: T cut into num_splits pieces of whole BLOCK_N tiles (the last may be short or empty)."""
    if T < 1 or num_splits < 1 or block_n < 1:
        raise ValueError(f"need T, num_splits and block_n >= 1, got {T}, {num_splits}, {block_n}")
    return -(-(-(-T // num_splits)) // block_n) * block_n


def launch_split_kernel(
    kernel,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    num_splits: int,
    block_n: int = 16,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch `kernel` (a ``@triton.jit`` function with the contract above) on grid (B, Hkv, num_splits).

    Returns (part_out ``[B, H, num_splits, D]``, part_lse ``[B, H, num_splits]``), both float32,
    as the kernel wrote them. Raises ValueError / TypeError for inputs the contract does not
    cover (head dim not a power of two in 16..256, a non-contiguous head dim, a bad split count).
    """
    if triton is None:
        raise ImportError("the kernel kata needs triton (pip install triton, Linux)") from _TRITON_IMPORT_ERROR
    B, H, Hkv, T, D = _check_inputs(q, k_cache, v_cache, seq_lens)
    if D & (D - 1):
        raise ValueError(f"head dim D must be a power of two (tl.arange(0, D) needs one), got {D}")
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous head dim (stride(-1) == 1), got strides {x.stride()}")
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be an int in 1..{MAX_SPLITS}, got {num_splits!r}")
    if isinstance(block_n, bool) or not isinstance(block_n, int) or block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n!r}")
    G = H // Hkv
    scale = D**-0.5 if scale is None else float(scale)
    split_len = split_len_for(T, num_splits, block_n)
    part_out = torch.full((B, H, num_splits, D), math.nan, dtype=torch.float32, device=q.device)
    part_lse = torch.full((B, H, num_splits), math.nan, dtype=torch.float32, device=q.device)
    if B == 0:
        return part_out, part_lse

    fn = getattr(kernel, "fn", kernel)
    _run_if_stub(fn)
    if q.device.type == "cpu":
        if not _INTERPRETED:
            raise ValueError("CPU tensors run under Triton's interpreter, which needs TRITON_INTERPRET=1 set before "
                             "triton is first imported (kvkata's conftest sets it where there is no CUDA device); "
                             "on a GPU machine, pass CUDA tensors")
        if q.dtype == torch.bfloat16:
            raise TypeError("bfloat16 under Triton's CPU interpreter: its tl.dot multiplies bf16 bit patterns "
                            "(triton-lang/triton#11584); use float16 or float32 on the CPU")
        runner = _interp.InterpretedFunction(fn)
    elif q.device.type == "cuda":
        runner = kernel if isinstance(kernel, (triton.runtime.JITFunction, _interp.InterpretedFunction)) else triton.jit(fn)
    else:
        raise ValueError(f"tensors must be on the CPU (interpreted) or a CUDA device, got {q.device}")
    seq_lens_i32 = seq_lens.to(torch.int32)
    given = dict(q=q, k_cache=k_cache, v_cache=v_cache, seq_lens=seq_lens_i32, part_out=part_out, part_lse=part_lse)
    try:
        with (torch.cuda.device(q.device) if q.device.type == "cuda" else _in_bounds(fn.__name__, **given)):
            runner[(B, Hkv, num_splits)](
                q, k_cache, v_cache, seq_lens_i32, part_out, part_lse,
                scale, split_len,
                q.stride(0), q.stride(1),
                k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
                part_out.stride(0), part_out.stride(1), part_out.stride(2),
                part_lse.stride(0), part_lse.stride(1),
                G=G, D=D, BLOCK_G=max(MIN_BLOCK_G, triton.next_power_of_2(G)), BLOCK_N=block_n,
                num_warps=NUM_WARPS,
            )
    except InterpreterError as exc:
        # The interpreter wraps what the kernel raised; raise that, with the kernel's own frames.
        cause = exc.__cause__
        if cause is None:
            raise
        cause.add_note(f"(raised while Triton's CPU interpreter ran {fn.__name__} on grid ({B}, {Hkv}, {num_splits}))")
        raise cause from None
    return part_out, part_lse


def decode_with_kernel(
    kernel,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    num_splits: int,
    block_n: int = 16,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """launch_split_kernel, then kvref's merge of the splits: (out ``[B, H, D]`` in q's dtype, part_out, part_lse)."""
    part_out, part_lse = launch_split_kernel(kernel, q, k_cache, v_cache, seq_lens,
                                             num_splits=num_splits, block_n=block_n, scale=scale)
    out, _ = merge_partials(part_out.permute(2, 0, 1, 3), part_lse.permute(2, 0, 1))
    return out.to(q.dtype), part_out, part_lse


_NOT_STUBS: set = set()  # kernels already read: parsing the source on every launch would cost ~1 ms of host time


def _run_if_stub(fn) -> None:
    """A kernel whose body is only a docstring and a raise is called as plain Python, so that its
    NotImplementedError comes from its own frame (compiled for a GPU, a raise is a compile error)."""
    if fn in _NOT_STUBS:
        return
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.FunctionDef) else []
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]
    if len(body) == 1 and isinstance(body[0], ast.Raise):
        fn(*[None] * len(inspect.signature(fn).parameters))
    _NOT_STUBS.add(fn)


class KernelOutOfBounds(IndexError):
    """A kernel's masked-in load or store lanes fell outside every tensor it was given."""

    kvkata_header = "your kernel reached outside its tensors (kvref's guard stopped it before memory was touched)"


@contextlib.contextmanager
def _in_bounds(kernel_name: str, **tensors: torch.Tensor):
    """Under the interpreter, refuse a load or store whose masked-in lanes fall outside every given
    tensor: the interpreter does not check, so a stray store would corrupt memory or crash Python."""
    import numpy as np

    ranges = [(name, t.untyped_storage().data_ptr(), t.untyped_storage().data_ptr() + t.untyped_storage().nbytes())
              for name, t in tensors.items()]
    builder = _interp.interpreter_builder

    def check(what, ptrs, mask):
        shape = np.broadcast(ptrs.data, mask.data).shape
        addresses = np.broadcast_to(ptrs.data, shape)[np.broadcast_to(mask.data, shape).astype(bool)]
        itemsize = ptrs.get_element_ty().primitive_bitwidth // 8
        inside = np.zeros(addresses.shape, dtype=bool)
        for _, lo, hi in ranges:
            inside |= (addresses >= lo) & (addresses + itemsize <= hi)
        if not inside.all():
            stray = int(addresses[~inside][0])
            near = min(ranges, key=lambda r: min(abs(stray - r[1]), abs(stray - r[2])))
            side = "before the start" if stray < near[1] else "after the end"
            raise KernelOutOfBounds(
                f"{kernel_name}: a tl.{what} of {addresses.size} lanes has {int((~inside).sum())} outside every tensor "
                f"it was given (the first at {stray - near[2] if stray >= near[2] else near[1] - stray} B {side} "
                f"of {near[0]}). Mask the lanes that are not real: padding query rows g >= G, positions at or past "
                f"the split's end")

    shadowed = {name: vars(builder)[name] for name in ("create_masked_load", "create_masked_store") if name in vars(builder)}
    load, store = builder.create_masked_load, builder.create_masked_store

    def checked_load(ptrs, mask, other, cache_policy, is_volatile):
        check("load", ptrs, mask)
        return load(ptrs, mask, other, cache_policy, is_volatile)

    def checked_store(ptrs, value, mask, cache_policy):
        check("store", ptrs, mask)
        return store(ptrs, value, mask, cache_policy)

    builder.create_masked_load, builder.create_masked_store = checked_load, checked_store
    try:
        yield
    finally:
        for name in ("create_masked_load", "create_masked_store"):
            if name in shadowed:
                setattr(builder, name, shadowed[name])
            else:
                delattr(builder, name)


# %%
# Counting the bytes a kernel loads, under the interpreter
# ---------------------------------------------------------


@dataclass
class LoadCount:
    """Bytes and elements loaded from each named tensor, and from anywhere else, by masked-in lanes."""
    bytes: dict[str, int] = field(default_factory=dict)
    elements: dict[str, int] = field(default_factory=dict)
    other_bytes: int = 0
    loads: int = 0  # tl.load calls seen


@contextlib.contextmanager
def count_loads(**tensors: torch.Tensor):
    """Count, for every ``tl.load`` run by Triton's interpreter inside the block, the bytes its
    masked-in lanes read from each of `tensors` (CPU tensors, by their storage's address range).

    Every load of the interpreter (plain, masked, through a block pointer or a tensor
    descriptor) goes through ``InterpreterBuilder.create_masked_load``; the wrapper counts
    ``mask`` lanes whose address falls in each tensor's storage. A lane masked off reads nothing
    and counts nothing, as on a GPU. Yields a LoadCount, filled when the block ends.
    """
    if triton is None:
        raise ImportError("count_loads needs triton") from _TRITON_IMPORT_ERROR
    import numpy as np

    ranges = {}
    for name, t in tensors.items():
        check_tensor(name, t, device=torch.device("cpu"))
        storage = t.untyped_storage()
        ranges[name] = (storage.data_ptr(), storage.data_ptr() + storage.nbytes())
    count = LoadCount({name: 0 for name in tensors}, {name: 0 for name in tensors})
    builder = _interp.interpreter_builder
    original = builder.create_masked_load

    def counting_load(ptrs, mask, other, cache_policy, is_volatile):
        itemsize = ptrs.get_element_ty().primitive_bitwidth // 8
        addresses = np.broadcast_to(ptrs.data, np.broadcast(ptrs.data, mask.data).shape)[
            np.broadcast_to(mask.data, np.broadcast(ptrs.data, mask.data).shape).astype(bool)]
        seen = 0
        for name, (lo, hi) in ranges.items():
            n = int(np.count_nonzero((addresses >= lo) & (addresses < hi)))
            count.elements[name] += n
            count.bytes[name] += n * itemsize
            seen += n
        count.other_bytes += (addresses.size - seen) * itemsize
        count.loads += 1
        return original(ptrs, mask, other, cache_policy, is_volatile)

    shadowed = "create_masked_load" in vars(builder)  # already patched on the instance by someone else
    builder.create_masked_load = counting_load
    try:
        yield count
    finally:
        if shadowed:
            builder.create_masked_load = original
        else:
            del builder.create_masked_load  # back to the class's method
