"""Maintainers' study tool: what kvref's Triton decode kernel does on an H100, read from its compiled code on a CPU.

Nothing here runs on a GPU. ``triton.compile`` builds the kernel for sm_90a (``GPUTarget("cuda",
90, 32)``) from the exact launch the wrapper would make (``triton_decode._launch`` is run with
meta tensors and the kernel swapped for a recorder), and the bundled ``ptxas`` and ``cuobjdump``
report what the hardware will be given:

* registers, spills, local memory and shared memory (cuobjdump --dump-resource-usage, ptxas -v);
* programs per SM, from those and the H100's limits (``triton_decode.programs_per_sm``);
* the width of the main loop's K/V copies (PTX ``cp.async`` sizes, SASS ``LDGSTS.*.128``);
* how many K/V tiles a program keeps in flight (the shared-memory buffers per operand);
* how many global loads the first K/V copy waits for (SASS, before the first ``LDGSTS``);
* the grid: programs per (sequence, KV head) slice, so a kernel that reads K/V G times shows.

From those facts ``modeled_step`` estimates the time of one decode step and its fraction of the
copy bandwidth. Every constant is in ``H100`` (hardware facts, with their source) or ``MODEL``
(assumptions, with their reason). The numbers it prints are MODELED, not measured: only
bench/decode_bandwidth.py on a GPU measures.

    python tools/triton_static.py            # the table, bf16, the benchmark's shapes
    python tools/triton_static.py --json     # the same as JSON (checks/test_triton_static.py)

Run it with TRITON_INTERPRET unset: an interpreted kernel cannot be compiled.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's kvref, not an installed one

H100 = dict(  # H100 SXM5 80GB (compute capability 9.0)
    sms=132,  # NVIDIA H100 Tensor Core GPU datasheet: 132 SMs on the SXM5 part
    hbm_peak_gbps=3350,  # same datasheet: 3.35 TB/s HBM3
    regs_per_sm=65536,  # CUDA C++ Programming Guide, "Technical Specifications per Compute Capability", 9.0
    smem_per_sm=228 * 1024,  # same table (227 KiB usable by one block, 1 KiB reserved per block)
    max_threads_per_sm=2048,  # same table
    clock_ghz=1.755,  # datasheet boost is 1.98 GHz; clocks drop under load, 1.755 GHz assumed
)

MODEL = dict(  # assumptions of modeled_step; each one's reason beside it
    copy_gbps=3000,  # copy bandwidth, read + write: ~90% of the 3.35 TB/s peak, the share a device-
    # to-device copy typically reaches on HBM; bench/decode_bandwidth.py measures the real one
    read_vs_copy=1.0,  # a read-only stream is assumed no faster than a copy (the bench measures both)
    hbm_latency_us=1.0,  # round trip of one K/V tile under a saturated memory system: about twice
    # the unloaded global-memory latency microbenchmarks report for H100 (~0.5 us)
    l2_latency_us=0.5,  # round trip of a small load or atomic that hits L2 under load (seq_lens,
    # the split counters, the partials just written by other SMs)
    launch_us=1.0,  # one kernel boundary inside a CUDA graph (launch, fill, drain), as the bench times
    cpi=3.0,  # cycles per SASS instruction of one warp issuing alone (dependent ALU/MMA latency)
)

H, D = 32, 128  # query heads and head dim of Llama-3-8B (its config.json)
BENCH_POINTS = ((1, 4096), (1, 16384), (1, 32768), (1, 131072), (64, 4096))  # (B, T), issue 9
GROUPS = (1, 4, 8)  # G = H / Hkv: MHA, Llama-3-8B's GQA, and G = 8
SHAPES = tuple((B, H, H // G, T, D) for G in GROUPS for B, T in BENCH_POINTS)  # (B, H, Hkv, T, D)
SHAPES += ((128, H, H, 4096, D),)  # 4096 programs, 10.3 waves: one split, the build without the merge
TARGETS = {  # issue 9, "Done when": modeled fraction of copy bandwidth at G = 4, bf16
    (1, 32, 8, 4096, 128): 0.60,
    (1, 32, 8, 16384, 128): 0.85,
    (1, 32, 8, 32768, 128): 0.90,
    (1, 32, 8, 131072, 128): 0.90,
    (64, 32, 8, 4096, 128): 0.95,
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32"}


@dataclass
class KernelFacts:
    """What the compiled kernel of one launch is, read from its PTX, SASS and cubin."""

    regs: int  # per thread
    spill_bytes: int  # spill stores + spill loads, ptxas -v
    local_bytes: int  # local memory + stack, per thread
    smem: int  # bytes per program
    num_warps: int
    num_stages: int
    programs_per_sm: int
    kv_copy_bits: list  # width of every cp.async in the main loop, bits
    kv_buffers: int  # shared-memory buffers per K/V operand: tiles a program keeps in flight
    loads_before_first_copy: int  # global loads whose result the first K/V copy waits for
    loop_sass: int  # SASS instructions in the main loop
    tiles_in_flight_at_wait: int  # K/V tiles still loading while one is computed on (0: no overlap)
    evict_first_copies: int  # cp.async with an L2 evict_first hint
    grid: tuple
    reads_per_kv_byte: float  # programs streaming one (sequence, KV head) slice: 1 = read once


def capture_launch(B, H, Hkv, T, D, dtype, sms=H100["sms"], programs_per_sm=None):
    """The (grid, args, kwargs) the wrapper's _launch gives the kernel for this shape on an H100."""
    from kvref import triton_decode as td

    pps = programs_per_sm or td.DEFAULT_PROGRAMS_PER_SM
    num_splits = td.splits_for_waves(B, Hkv, T, sms, pps)
    meta = dict(device="meta")
    q = torch.empty(B, H, D, dtype=dtype, **meta)
    k_cache = torch.empty(B, Hkv, T, D, dtype=dtype, **meta)
    v_cache = torch.empty(B, Hkv, T, D, dtype=dtype, **meta)
    seq_lens = torch.full((B,), T, dtype=torch.int32, **meta)
    out = torch.empty_like(q)
    part_out = torch.empty(B, H, num_splits, D, dtype=torch.float32, **meta)
    part_lse = torch.empty(B, H, num_splits, dtype=torch.float32, **meta)
    seen = {}

    class Recorder:  # stands in for the JIT kernel: kernel[grid](*args, **kwargs)
        fn = td._decode_kernel

        def __getitem__(self, grid):
            def record(*args, **kwargs):
                seen.update(grid=tuple(grid), args=args, kwargs=kwargs)

            return record

    saved = td._decode_kernel
    td._decode_kernel = Recorder()
    try:
        td._launch(q, k_cache, v_cache, seq_lens, out, part_out, part_lse, D**-0.5, H // Hkv, D, num_splits)
    finally:
        td._decode_kernel = saved
    return num_splits, seen["grid"], seen["args"], seen["kwargs"]


def compile_for_h100(args, kwargs):
    """triton.compile the kernel for sm_90a as the JIT would specialize these arguments: ints equal
    to 1 become constants, ints divisible by 16 and (16-byte aligned) pointers get divisibility 16."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kvref import triton_decode as td

    fn = td._decode_kernel
    options = {k: kwargs[k] for k in ("num_warps", "num_stages")}
    constexprs = {k: v for k, v in kwargs.items() if k not in options}
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = args[i]
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + TYPE_NAMES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def read_facts(compiled, grid, B, Hkv) -> KernelFacts:
    """Registers, memory, load widths, buffers and the prologue of a compiled kernel."""
    from kvref import triton_decode as td

    work = tempfile.mkdtemp(prefix="kvref_static_")
    try:
        cubin, ptx_path = os.path.join(work, "k.cubin"), os.path.join(work, "k.ptx")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        with open(ptx_path, "w") as f:
            f.write(compiled.asm["ptx"])
        usage = _run(_tool("cuobjdump"), "--dump-resource-usage", cubin)
        regs = int(re.search(r"REG:(\d+)", usage)[1])
        local = int(re.search(r"LOCAL:(\d+)", usage)[1]) + int(re.search(r"STACK:(\d+)", usage)[1])
        ptxas_log = _run(_ptxas(), "-v", "--gpu-name=sm_90a", ptx_path, "-o", os.path.join(work, "v.o"))
        spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", ptxas_log))
        sass = _run(_tool("cuobjdump"), "-sass", cubin)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    md = compiled.metadata
    return KernelFacts(
        regs=regs,
        spill_bytes=spills,
        local_bytes=local,
        smem=md.shared,
        num_warps=md.num_warps,
        num_stages=md.num_stages,
        programs_per_sm=td.programs_per_sm(regs, md.shared, md.num_warps, regs_per_sm=H100["regs_per_sm"],
                                           smem_per_sm=H100["smem_per_sm"],
                                           max_threads_per_sm=H100["max_threads_per_sm"]),
        kv_copy_bits=main_loop_copy_bits(compiled.asm["ptx"]),
        kv_buffers=kv_buffers(compiled.asm["ttgir"]),
        loads_before_first_copy=loads_before_first_copy(sass),
        loop_sass=longest_loop(sass),
        tiles_in_flight_at_wait=tiles_in_flight_at_wait(compiled.asm["ptx"]),
        evict_first_copies=evict_first_copies(compiled.asm["ptx"]),
        grid=tuple(grid),
        reads_per_kv_byte=grid[0] * grid[1] / (B * Hkv),
    )


def main_loop_copy_bits(ptx: str) -> list:
    """Bits of each cp.async in the PTX loop that holds the asynchronous copies (the K/V loop)."""
    lines = ptx.splitlines()
    labels = {m[1]: i for i, line in enumerate(lines) if (m := re.match(r"\s*(\$L__\w+):", line))}
    for i, line in enumerate(lines):  # a backward branch closes a loop
        m = re.search(r"\bbra(?:\.uni)?\s+(\$L__\w+);", line)
        if m and labels.get(m[1], i) < i:
            body = "\n".join(lines[labels[m[1]]:i])
            sizes = re.findall(r"cp\.async\.c[ag]\.shared\.global\S*\s+\[[^\]]+\],\s*\[[^\]]+\],\s*(0x[0-9a-f]+|\d+)", body)
            if sizes:
                return [8 * int(s, 0) for s in sizes]
    return []


def kv_buffers(ttgir: str) -> int:
    """Shared-memory buffers per pipelined operand: the leading dim of the 3-D local allocations."""
    shapes = re.findall(r"ttg\.local_alloc\s*:\s*\(\)\s*->\s*!ttg\.memdesc<(\d+)x\d+x\d+x", ttgir)
    return min((int(n) for n in shapes), default=1)


def loads_before_first_copy(sass: str) -> int:
    """Global loads (LDG) before the first LDGSTS whose destination register is read before it:
    round trips a program waits through before it can ask for its first K/V tile."""
    lines = sass.splitlines()
    first = next((i for i, line in enumerate(lines) if "LDGSTS" in line), len(lines))
    waited = 0
    for i, line in enumerate(lines[:first]):
        if m := re.search(r"\bLDG\S*\s+(R\d+)", line):
            reg = re.compile(rf"\b{m[1]}\b")
            if any(reg.search(later.split(";")[0].split(None, 2)[-1]) for later in lines[i + 1:first]):
                waited += 1
    return waited


def longest_loop(sass: str) -> int:
    """SASS instructions in the longest backward branch (the main loop)."""
    best = 0
    for here, target in re.findall(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?BRA\s+0x([0-9a-f]+)", sass):
        if int(target, 16) < int(here, 16):
            best = max(best, (int(here, 16) - int(target, 16)) // 16 + 1)
    return best


def tiles_in_flight_at_wait(ptx: str) -> int:
    """K/V tiles still being copied while the main loop computes on one: the loop's
    cp.async.wait_group N lets N commit groups stay pending, and each tile commits as many
    groups as the loop does; 0 means every copy is waited for before its compute (no overlap)."""
    lines = ptx.splitlines()
    labels = {m[1]: i for i, line in enumerate(lines) if (m := re.match(r"\s*(\$L__\w+):", line))}
    for i, line in enumerate(lines):
        m = re.search(r"\bbra(?:\.uni)?\s+(\$L__\w+);", line)
        if m and labels.get(m[1], i) < i:
            body = "\n".join(lines[labels[m[1]]:i])
            groups = body.count("cp.async.commit_group")
            waits = [int(n) for n in re.findall(r"cp\.async\.wait_group\s+(\d+)", body)]
            if groups and waits:
                return min(waits) // groups
    return 0


def evict_first_copies(ptx: str) -> int:
    """cp.async copies carrying an L2 evict_first policy (eviction_policy="evict_first")."""
    policies = set(re.findall(r"createpolicy\.fractional\.L2::evict_first\.b64\s+(%rd\d+)", ptx))
    hinted = re.findall(r"cp\.async\.\S*L2::cache_hint[^;]*,\s*(%rd\d+);", ptx)
    return sum(reg in policies for reg in hinted)


def modeled_step(facts: KernelFacts, B, H, Hkv, T, D, elem, num_splits, model=MODEL, hw=H100) -> dict:
    """Modeled microseconds of one decode step and its fraction of the copy bandwidth.

    stream   K/V bytes at min(HBM, what the resident programs keep in flight): each program has
             kv_buffers tiles in flight, one round trip plus one tile's compute apart (Little's law),
             but never less than one program's own chain of tiles;
    fixed    one launch, the loads the first copy waits for (L2: seq_lens), the first tile's round
             trip, the last tile's compute;
    merge    (splits > 1) the counter atomic and the partials' load from L2, the partials' bytes,
             one more L2 round trip for the last stores to drain.
    """
    from kvref import triton_decode as td

    bw = model["copy_gbps"] * model["read_vs_copy"] * 1e3  # bytes per us
    kv_bytes = 2 * B * Hkv * T * D * elem * facts.reads_per_kv_byte
    useful = 2 * B * Hkv * T * D * elem + 2 * B * H * D * elem  # K, V, q read and out written
    tiles = math.ceil(T / td.BLOCK_N)
    tiles_per_program = math.ceil(tiles / num_splits)
    busy = B * Hkv * math.ceil(tiles / tiles_per_program) * facts.reads_per_kv_byte
    resident = min(busy, hw["sms"] * facts.programs_per_sm)
    per_sm = resident / min(hw["sms"], resident)
    # one tile's compute: latency-bound for a warp alone, issue-bound when per_sm programs share 4 schedulers
    t_compute = max(model["cpi"], per_sm * facts.num_warps / 4) * facts.loop_sass / (hw["clock_ghz"] * 1e3)
    L = model["hbm_latency_us"]
    period = max(t_compute, (L + t_compute) / max(1, facts.kv_buffers))  # per tile, per program
    tile_bytes = 2 * td.BLOCK_N * D * elem
    rate = min(bw, resident * tile_bytes / period)
    waves = math.ceil(busy / (hw["sms"] * facts.programs_per_sm))
    t_stream = max(kv_bytes / rate, waves * tiles_per_program * period)
    t_fixed = model["launch_us"] + facts.loads_before_first_copy * model["l2_latency_us"] + L + t_compute
    t_merge = model["l2_latency_us"]  # the last stores drain
    partial_bytes = 0
    if num_splits > 1:
        merge_s = max(1, td.MERGE_ELEMENTS // triton_next_pow2(D))
        steps = math.ceil(num_splits / merge_s)
        t_merge += model["l2_latency_us"] * (1 + steps)  # the atomic, then the partials (heads overlap)
        partial_bytes = 2 * B * H * num_splits * (D + 1) * 4  # written, then read by the merge
    total = t_stream + t_fixed + t_merge + partial_bytes / bw
    return dict(us=total, stream_us=t_stream, fixed_us=t_fixed, merge_us=t_merge + partial_bytes / bw,
                fraction=useful / (total * model["copy_gbps"] * 1e3), busy_programs=busy, waves=waves)


def modeled_floor(B, H, Hkv, T, D, elem, model=MODEL, hw=H100) -> dict:
    """The least time ``modeled_step``'s terms allow ANY single-launch decode kernel that reads
    K/V once, whatever its tiles, splits or instructions: the bound a kernel's modeled fraction is
    measured against.

    Every such kernel pays one launch, one HBM round trip before its first K/V byte arrives, and
    the K/V bytes at copy bandwidth. To reach that bandwidth, bw x round trip bytes must be in
    flight (Little's law); one program per (sequence, KV head) can keep at most one SM's shared
    memory in flight. If B x Hkv such programs cannot, the sequence must be split, and the
    merge inside the same launch costs three L2 round trips in a row: the partials reach L2
    before the release, the counter's atomic, the partials' load. One split pays one (the
    output's stores drain), as in modeled_step. Left out, so the floor stays a lower bound: the
    seq_lens wait, the partials' bytes, and all compute, the last tile's included.
    """
    bw = model["copy_gbps"] * model["read_vs_copy"] * 1e3  # bytes per us
    L, l2 = model["hbm_latency_us"], model["l2_latency_us"]
    kv_bytes = 2 * B * Hkv * T * D * elem
    useful = kv_bytes + 2 * B * H * D * elem
    one_split_rate = min(bw, B * Hkv * hw["smem_per_sm"] / L)
    one_split = model["launch_us"] + L + kv_bytes / one_split_rate + l2
    split = model["launch_us"] + L + kv_bytes / bw + 3 * l2
    us = min(one_split, split)
    return dict(us=us, fraction=useful / (us * model["copy_gbps"] * 1e3), splits_needed=split < one_split)


def triton_next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def study(shapes=SHAPES, dtype="bf16") -> list:
    """Facts and model for each shape: a list of dicts (the --json output). The split count is
    the wrapper's for the programs per SM of the compiled kernel: a first capture uses the
    wrapper's default, and if the compiled kernel fits a different number, the launch is captured
    again with it (as the wrapper does from its second call on)."""
    rows, cache = [], {}  # one compile per distinct specialization (G, BLOCK_S, one split or not)
    elem = torch.finfo(DTYPES[dtype]).bits // 8

    def compiled_facts(B, H, Hkv, T, D, pps):
        num_splits, grid, args, kwargs = capture_launch(B, H, Hkv, T, D, DTYPES[dtype], programs_per_sm=pps)
        key = repr(sorted(kwargs.items())) + repr([a == 1 for a in args if isinstance(a, int)])
        if key not in cache:
            cache[key] = compile_for_h100(args, kwargs)
        return num_splits, read_facts(cache[key], grid, B, Hkv)

    for B, H, Hkv, T, D in shapes:
        num_splits, facts = compiled_facts(B, H, Hkv, T, D, None)
        default_pps = facts.programs_per_sm
        from kvref.triton_decode import DEFAULT_PROGRAMS_PER_SM

        if facts.programs_per_sm != DEFAULT_PROGRAMS_PER_SM:
            num_splits, facts = compiled_facts(B, H, Hkv, T, D, facts.programs_per_sm)
        model = modeled_step(facts, B, H, Hkv, T, D, elem, num_splits)
        rows.append(dict(B=B, H=H, Hkv=Hkv, T=T, D=D, dtype=dtype, num_splits=num_splits,
                         default_programs_per_sm=DEFAULT_PROGRAMS_PER_SM, first_call_programs_per_sm=default_pps,
                         facts=asdict(facts), model=model, floor=modeled_floor(B, H, Hkv, T, D, elem)))
    return rows


def format_table(rows) -> str:
    head = (f"{'B':>3} {'H':>3} {'Hkv':>3} {'T':>7} {'splits':>6} {'grid':>15} {'regs':>4} {'spill':>5} "
            f"{'smem':>6} {'prog/SM':>7} {'K/V copy':>8} {'bufs':>4} {'waits':>5} {'loop':>4} "
            f"{'ahead':>5} {'step us':>7} {'of copy':>7} {'floor':>6}")
    lines = [head]
    for r in rows:
        f, m = r["facts"], r["model"]
        bits = sorted(set(f["kv_copy_bits"]))
        lines.append(
            f"{r['B']:>3} {r['H']:>3} {r['Hkv']:>3} {r['T']:>7} {r['num_splits']:>6} {str(f['grid']):>15} "
            f"{f['regs']:>4} {f['spill_bytes']:>5} {f['smem']:>6} {f['programs_per_sm']:>7} "
            f"{'/'.join(map(str, bits)) + 'b':>8} {f['kv_buffers']:>4} {f['loads_before_first_copy']:>5} "
            f"{f['loop_sass']:>4} {f['tiles_in_flight_at_wait']:>5} {m['us']:>7.1f} {m['fraction']:>7.1%} "
            f"{r['floor']['fraction']:>6.1%}"
        )
    return "\n".join(lines)


def _tool(name: str) -> str:
    """ptxas / cuobjdump: the ones bundled with triton, else PATH."""
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    path = bundled if os.path.exists(bundled) else shutil.which(name)
    if path is None:
        raise FileNotFoundError(f"{name} not found in triton's bundle or on PATH")
    return path


def unavailable() -> str | None:
    """Why the static check cannot run here (no triton, or no ptxas / cuobjdump), or None."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    try:
        for path in (_ptxas(), _tool("cuobjdump")):
            if not os.path.exists(path):
                return f"{path} is missing"
    except (FileNotFoundError, RuntimeError) as exc:
        return str(exc)
    return None


def _ptxas() -> str:
    """The ptxas triton itself compiles sm_90a with (triton 3.9: the bundled ptxas-blackwell)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(90).path
    except (ImportError, AttributeError):
        return _tool("ptxas")


def _run(*cmd) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return done.stdout + done.stderr


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: an interpreted kernel cannot be compiled")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, set to silence its warning
    if reason := unavailable():
        parser.exit(3, f"cannot compile for sm_90a here: {reason}\n")
    rows = study(dtype=args.dtype)
    if args.json:
        print(json.dumps(dict(hardware=H100, model=MODEL, rows=rows)))
    else:
        print(f"kvref.triton_decode compiled for sm_90a, {args.dtype}; MODELED on an H100 SXM "
              f"({H100['sms']} SMs, copy bandwidth assumed {MODEL['copy_gbps']} GB/s), not measured")
        print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
