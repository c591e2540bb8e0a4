"""Accelerators as a cost model sees them: peak FLOP/s per dtype, memory bandwidth, memory size.

A spec module: it holds datasheet numbers and no answer to any kata. The FLOP/s a matmul can
reach depends on the dtype it computes in (an H100 does 989 dense TFLOP/s in bf16 and 67 in
fp32), so a `Hardware` carries a table of peaks and `hw.peak_flops(dtype)` looks one up,
raising for a dtype the device has no peak for (fp8 on an A100). PyTorch runs fp32 matmuls
in true fp32 unless TF32 is allowed (`torch.backends.cuda.matmul.allow_tf32`, off by default),
so `peak_flops(torch.float32)` is the fp32 peak and `peak_flops(torch.float32, allow_tf32=True)`
the TF32 one.

`memory_bytes` is the capacity the device reports (nvidia-smi's total), which is what a model
and its cache must fit in, not the marketing "80GB". `hw.tensor_parallel(n)` models n devices
as one: n times the FLOP/s, bandwidth and memory, communication ignored, so its times are
optimistic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from numbers import Real

import torch

TF32 = "tf32"  # the key of the TF32 peak: TF32 is a matmul mode for fp32 tensors, not a dtype


@dataclass(frozen=True, repr=False)
class Hardware:
    name: str
    peaks: Mapping  # {torch.dtype or "tf32": dense FLOP/s}; stored as sorted (key, FLOP/s) pairs
    mem_bandwidth: float  # bytes/s: HBM bandwidth
    memory_bytes: int     # bytes: the capacity the device reports (nvidia-smi); an upper bound on what a model
    #                       can use (the CUDA context, the allocator's reserve and fragmentation take some)
    source: str           # where the numbers come from
    n_devices: int = field(default=1)  # > 1: n devices as one (tensor parallel, communication ignored)

    def __post_init__(self) -> None:
        for name in ("name", "source"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TypeError(f"Hardware.{name} must be a str, got {type(value).__name__}")
            if not value:
                raise ValueError(f"Hardware.{name} must not be empty")
        for name in ("mem_bandwidth", "memory_bytes"):
            _check_positive(f"Hardware.{name}", getattr(self, name))
        if not isinstance(self.n_devices, int) or isinstance(self.n_devices, bool) or self.n_devices < 1:
            raise ValueError(f"Hardware.n_devices must be an int >= 1, got {self.n_devices!r}")
        pairs = self.peaks.items() if isinstance(self.peaks, Mapping) else self.peaks
        try:
            pairs = tuple((key, flops) for key, flops in pairs)
        except (TypeError, ValueError):
            raise TypeError("Hardware.peaks must map torch dtypes (or 'tf32') to FLOP/s") from None
        if not pairs:
            raise ValueError("Hardware.peaks must name at least one dtype's peak FLOP/s")
        for key, flops in pairs:
            if not (isinstance(key, torch.dtype) or key == TF32):
                raise TypeError(f"Hardware.peaks keys must be torch dtypes or 'tf32', got {key!r}")
            _check_positive(f"Hardware.peaks[{_dtype_name(key)}]", flops)
        # A tuple keeps the dataclass hashable and frozen; sorted so equal tables compare equal.
        object.__setattr__(self, "peaks", tuple(sorted(pairs, key=lambda p: _dtype_name(p[0]))))

    def peak_flops(self, dtype: torch.dtype, allow_tf32: bool = False) -> float:
        """Dense peak FLOP/s of matmuls computing in `dtype` (fp32 with `allow_tf32`: the TF32 peak)."""
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
        key = TF32 if (allow_tf32 and dtype == torch.float32) else dtype
        for k, flops in self.peaks:
            if k == key:
                return flops
        known = ", ".join(_dtype_name(k) for k, _ in self.peaks)
        raise ValueError(f"{self.name} has no peak FLOP/s for {_dtype_name(key)} (it has: {known})")

    def computes_in(self, dtype: torch.dtype) -> bool:
        """Whether the table has a peak for `dtype`."""
        return any(k == dtype for k, _ in self.peaks)

    def ridge_point(self, dtype: torch.dtype, allow_tf32: bool = False) -> float:
        """FLOPs per byte at which compute and memory take equally long, computing in `dtype`."""
        return self.peak_flops(dtype, allow_tf32) / self.mem_bandwidth

    def scaled(self, flops: float = 1, bandwidth: float = 1, memory: float = 1, name: str | None = None) -> Hardware:
        """A what-if device: every peak times `flops`, bandwidth times `bandwidth`, memory times `memory`."""
        for label, x in (("flops", flops), ("bandwidth", bandwidth), ("memory", memory)):
            _check_positive(label, x)
        return replace(self, name=name or self.name, peaks=tuple((k, f * flops) for k, f in self.peaks),
                       mem_bandwidth=self.mem_bandwidth * bandwidth, memory_bytes=int(self.memory_bytes * memory))

    def tensor_parallel(self, n: int) -> Hardware:
        """n of these devices as one: n times the FLOP/s, bandwidth and memory.

        Communication (an all-reduce per layer) and replicated weights or KV heads are ignored,
        so times computed on it are optimistic: a lower bound on the real ones.
        """
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        return replace(self.scaled(n, n, n, name=f"{n}x{self.name}"), n_devices=self.n_devices * n,
                       source=f"{self.source}; {n} devices, communication ignored (optimistic)")

    def __repr__(self) -> str:
        peaks = ", ".join(f"{_dtype_name(k)} {f / 1e12:.4g}" for k, f in self.peaks)
        return (f"Hardware({self.name}: {peaks} TFLOP/s, {self.mem_bandwidth / 1e12:.4g} TB/s, "
                f"{self.memory_bytes / 1e9:.4g} GB)")

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(repr(self))


def _dtype_name(key) -> str:
    return key if isinstance(key, str) else str(key).removeprefix("torch.")


def _check_positive(name: str, x) -> None:
    if not isinstance(x, Real) or isinstance(x, bool):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    if not (math.isfinite(x) and x > 0):
        raise ValueError(f"{name} must be finite and > 0, got {x!r}")


MIB = 2**20

# Dense peaks (no 2:4 sparsity): NVIDIA's headline tensor-core figures assume sparsity and are
# twice these. fp32 is the non-tensor-core (CUDA core) peak, what an fp32 matmul gets unless
# TF32 is allowed. Memory is nvidia-smi's "memory.total" for the part.
_A100_PEAKS = {torch.bfloat16: 312e12, torch.float16: 312e12, TF32: 156e12, torch.float32: 19.5e12}
# NVIDIA A100 Tensor Core GPU datasheet: BF16/FP16 tensor core 312 TFLOPS (624 sparse), TF32 156
# (312 sparse), FP32 19.5 TFLOPS; no FP8 tensor cores.
_H100_PEAKS = {torch.bfloat16: 989e12, torch.float16: 989e12, TF32: 495e12, torch.float32: 67e12,
               torch.float8_e4m3fn: 1979e12, torch.float8_e5m2: 1979e12}
# NVIDIA H100 Tensor Core GPU datasheet, SXM: BF16/FP16 1,979 TFLOPS sparse (989 dense), TF32 989
# sparse (495 dense), FP32 67 TFLOPS, FP8 3,958 sparse (1,979 dense). The H200 has the same compute.

A100_40GB = Hardware(
    "A100-40GB", _A100_PEAKS, 1555e9, 40_960 * MIB,
    # A100 datasheet: 40GB HBM2 at 1,555 GB/s; nvidia-smi reports 40960MiB.
    "NVIDIA A100 datasheet: 1,555 GB/s HBM2, dense 312 (bf16/fp16), 156 (tf32), 19.5 (fp32) TFLOP/s; "
    "nvidia-smi 40,960 MiB",
)
A100_80GB_SXM = Hardware(
    "A100-80GB-SXM", _A100_PEAKS, 2039e9, 81_920 * MIB,
    # A100 datasheet: 80GB SXM, HBM2e at 2,039 GB/s; nvidia-smi reports 81920MiB.
    "NVIDIA A100 datasheet: 80GB SXM, 2,039 GB/s HBM2e, the A100's dense peaks; nvidia-smi 81,920 MiB",
)
H100_SXM = Hardware(
    "H100-SXM", _H100_PEAKS, 3.35e12, 81_559 * MIB,
    # H100 datasheet: SXM 80GB HBM3 at 3.35 TB/s; nvidia-smi reports 81559MiB on an H100 80GB HBM3.
    "NVIDIA H100 datasheet: SXM, 3.35 TB/s HBM3, dense 989 (bf16/fp16), 495 (tf32), 67 (fp32), "
    "1,979 (fp8) TFLOP/s; nvidia-smi 81,559 MiB",
)
H200 = Hardware(
    "H200", _H100_PEAKS, 4.8e12, 143_771 * MIB,
    # H200 datasheet: 141GB HBM3e at 4.8 TB/s, the H100's compute; nvidia-smi reports 143771MiB.
    "NVIDIA H200 datasheet: 141GB HBM3e, 4.8 TB/s, the H100's dense peaks; nvidia-smi 143,771 MiB",
)
HARDWARE: dict[str, Hardware] = {hw.name: hw for hw in (A100_40GB, A100_80GB_SXM, H100_SXM, H200)}


def hardware(name: str) -> Hardware:
    """Look up a hardware preset by name."""
    try:
        return HARDWARE[name]
    except KeyError:
        raise ValueError(f"unknown hardware {name!r}; known: {', '.join(HARDWARE)}") from None


# --- energy per operation (card11) ---------------------------------------------------------------

@dataclass(frozen=True)
class EnergyCosts:
    """What one bit moved to or from memory and one multiply-add cost, in picojoules, and who says so.

    `pj_per_fma` is per fused multiply-add, which is 2 FLOPs as FLOPs are counted here (and by
    FlopCounterMode): a matmul of m·k·n does m·k·n multiply-adds, 2·m·k·n FLOPs. `pj_per_bit` is
    per bit, not per byte, moved between the memory (DRAM, HBM) and the chip.
    """
    name: str
    pj_per_bit: float  # picojoules per bit moved between memory and the chip
    pj_per_fma: float  # picojoules per multiply-add (2 FLOPs) in 16-bit floating point
    source: str

    def __post_init__(self) -> None:
        _check_positive("EnergyCosts.pj_per_bit", self.pj_per_bit)
        _check_positive("EnergyCosts.pj_per_fma", self.pj_per_fma)


# The two sets card11 compares. Neither is a measurement of a GPU you can rent: see the sources.
# A sanity bound from the H100 SXM datasheet (700 W board power, 989e12 dense bf16 FLOP/s =
# 494.5e12 FMA/s): at full rate the whole board spends at most 700 / 494.5e12 J = 1.42 pJ per FMA,
# memory and everything else included. 5 pJ/FMA at that rate would draw 2.5 kW, and Horowitz's
# 45 nm 1.1 + 0.4 pJ is already above the whole board's budget per FMA on this modern part.
H100_SXM_BOARD_WATTS = 700.0  # NVIDIA H100 datasheet: SXM max thermal design power "up to 700 W"
SOURCE_CARD_ENERGY = EnergyCosts(
    "source card", 0.5, 5.0,
    "a widely shared interview question's premise: 'A KV lookup consumes 0.5 pJ/bit while a FP16 FMA "
    "consumes 5 pJ/op'. No source given, and not a published figure (an H100 board has at most 1.4 pJ per FMA)",
)
PUBLISHED_ENERGY = EnergyCosts(
    "published (HBM2, 45 nm FP16)", 4.0, 1.1 + 0.4,
    "memory: about 4 pJ/bit for HBM2 (O'Connor et al., 'Fine-Grained DRAM', MICRO 2017, whose FGDRAM "
    "halves it); compute: Horowitz, 'Computing's energy problem', ISSCC 2014, 45 nm: FP16 multiply "
    "1.1 pJ + FP16 add 0.4 pJ = 1.5 pJ per multiply-add (the same table puts a 64-bit DRAM access at "
    "1.3-2.6 nJ, 20-40 pJ/bit, naming neither the DRAM type nor a node for it: off-chip DRAM, not HBM)",
)
ENERGY_COSTS: dict[str, EnergyCosts] = {c.name: c for c in (SOURCE_CARD_ENERGY, PUBLISHED_ENERGY)}
