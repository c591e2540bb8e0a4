"""Decode attention against the memory roofline: kvref's flash-decoding kernel, SDPA's backends, a naive decode.

Decode attention is memory-bound (card09): per KV head it does 4·G·T·D FLOPs over 2·T·D·bytes
of cache. Its speed limit is the device's memory bandwidth, so this script measures two
baselines first, a device-to-device copy and a read-only pass (a sum over a large tensor),
then reports the kernel's achieved bandwidth as a fraction of each, next to PyTorch's
scaled_dot_product_attention (enable_gqa=True): the backend its own dispatch picks, named,
and each of flash, cuDNN and memory-efficient forced in turn, so the kernel is compared with
the fastest of them. A naive decode (repeat K/V to H heads, matmul, softmax, matmul) is the
floor.

    python bench/decode_bandwidth.py            # B=1 at 4k/16k/32k/128k and B=64 at 4k, G = 1, 4, 8
    python bench/decode_bandwidth.py --quick    # B=1 at 4k and 16k, G = 4, for a smoke run
    python bench/decode_bandwidth.py --out DIR  # where the .json and .md go (default bench/results)

The points are tools/triton_static.py's (BENCH_POINTS x GROUPS), so the measured fractions sit
beside the modeled ones of `python tools/triton_static.py`.

How it measures, and why:
- copy bandwidth: a 1 GiB device-to-device copy, counting bytes read + written, median of 10.
- read bandwidth: a sum over the same 1 GiB (one fp32 scalar written), median of 10. Decode
  attention only reads, so this is the nearer roofline; the copy is the project's yardstick.
- bytes of a decode step: K and V for the valid lengths, plus q and the output. The kernel's
  partial results are overhead, so they are not counted as useful bytes.
- time: the median over 10 replays of a CUDA graph that runs each method back to back over
  several distinct input sets, divided by the number of calls. The graph removes Python and
  launch overhead, which at short contexts is larger than the kernel; rotating sets whose
  total exceeds four times the L2 cache keeps a small cache from being served out of L2.
  The kernel runs with check_seq_lens=False (no host sync, so it can be captured).
- which SDPA backend ran: the names of the CUDA kernels one default call launches
  (torch.profiler), classified as flash, cudnn, efficient or math.
- every sequence uses its full context (seq_lens = T), so SDPA runs without a mask, its
  fastest path.
Without CUDA it says so and exits 0. It is not a test: pytest collects only katas/ and test_*.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's kvref, not an installed one

from tools.triton_static import BENCH_POINTS, D, GROUPS, H  # noqa: E402  the shapes the static check models

DTYPE = torch.bfloat16
QUICK = dict(points=((1, 4096), (1, 16384)), groups=(4,))
SDPA_BACKENDS = ("flash", "cudnn", "efficient")  # compared one by one; the fastest is the bar
ROTATE_L2_MULTIPLE = 4  # input sets together span at least this many L2 caches
MAX_SETS = 64
MEMORY_FRACTION = 0.8  # of the free memory the inputs and temporaries may take
GOAL_RATIO, GOAL_MIN_CONTEXT = 0.85, 16384  # card09: >= 85% of copy bandwidth from 16k context on


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("CUDA is not available: this benchmark needs an NVIDIA GPU; nothing was measured.")
        return 0
    from kvref.triton_decode import choose_num_splits, decode_attention  # needs triton

    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    l2_bytes = getattr(props, "L2_cache_size", 50 * 2**20)
    nbytes = 2**28 if args.quick else 2**30
    copy_gbps = copy_bandwidth_gbps(device, nbytes)
    read_gbps = read_bandwidth_gbps(device, nbytes)
    print(f"{props.name}: {props.multi_processor_count} SMs, L2 {l2_bytes / 2**20:.0f} MiB, "
          f"copy bandwidth {copy_gbps:.0f} GB/s (read + write), read-only {read_gbps:.0f} GB/s")

    sweep = QUICK if args.quick else dict(points=BENCH_POINTS, groups=GROUPS)
    rows = []
    print(header())
    for G in sweep["groups"]:
        for B, T in sweep["points"]:
            row = measure_point(B, T, G, device, l2_bytes, decode_attention, choose_num_splits)
            if row.get("kernel_gbps"):
                row["ratio_to_copy"] = row["kernel_gbps"] / copy_gbps
                row["ratio_to_read"] = row["kernel_gbps"] / read_gbps
            rows.append(row)
            print(format_row(row), flush=True)
            torch.cuda.empty_cache()

    result = dict(
        device=props.name,
        date=datetime.date.today().isoformat(),
        torch=torch.__version__,
        triton=_triton_version(),
        dtype=str(DTYPE).removeprefix("torch."),
        H=H,
        D=D,
        copy_gbps=copy_gbps,
        read_gbps=read_gbps,
        goal=f"kernel >= {GOAL_RATIO:.0%} of copy bandwidth at T >= {GOAL_MIN_CONTEXT}, and no slower than "
        "the fastest of SDPA's flash, cuDNN and efficient backends",
        summary=summarize(rows),
        points=rows,
    )
    print(result["summary"]["text"])
    json_path, md_path = write_results(result, Path(args.out))
    print(f"wrote {json_path} and {md_path}")
    return 0


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small sweep: B = 1 at 4k and 16k, G = 4")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"),
                        help="directory for decode_bandwidth_<device>_<date>.json and .md")
    return parser.parse_args(argv)


# %%
# The three decode steps being compared


def sdpa_decode(q, k_cache, v_cache):
    B, Hq, Dh = q.shape
    out = F.scaled_dot_product_attention(q.view(B, Hq, 1, Dh), k_cache, v_cache, enable_gqa=True)  # (B, H, 1, D)
    return out.reshape(B, Hq, Dh)


def sdpa_backend(name):
    """A context that lets SDPA use only this backend (it raises if the backend cannot run)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                        "efficient": SDPBackend.EFFICIENT_ATTENTION}[name])


def sdpa_backend_that_ran(q, k_cache, v_cache):
    """(backend, kernel names) of one default SDPA call, from the CUDA kernels it launched."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        sdpa_decode(q, k_cache, v_cache)
        torch.cuda.synchronize()
    names = sorted({e.name for e in prof.events() if e.device_type.name == "CUDA"})
    text = " ".join(names).lower()
    for backend, marks in (("cudnn", ("cudnn", "fort_native_sdpa")), ("flash", ("flash",)),
                           ("efficient", ("fmha", "cutlass", "mem_eff", "attention_kernel"))):
        if any(mark in text for mark in marks):
            return backend, names
    return "math", names


def naive_decode(q, k_cache, v_cache):
    G = q.shape[1] // k_cache.shape[1]
    k = k_cache.repeat_interleave(G, dim=1)  # (B, H, T, D): every query head gets its own copy
    v = v_cache.repeat_interleave(G, dim=1)
    scores = (q.unsqueeze(2) @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, 1, T)
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return (probs @ v).squeeze(2)  # (B, H, D)


# %%
# Measuring


def measure_point(B, T, G, device, l2_bytes, decode_attention, choose_num_splits):
    """Time the three methods on one (B, T, G); a dict row, with `skipped` set when it does not fit."""
    Hkv = H // G
    elem = torch.finfo(DTYPE).bits // 8
    cache_bytes = 2 * B * Hkv * T * D * elem  # K and V, all of it valid
    useful_bytes = cache_bytes + 2 * B * H * D * elem  # + q read + output written
    row = dict(B=B, T=T, G=G, Hkv=Hkv, bytes=useful_bytes)
    free = torch.cuda.mem_get_info(device)[0] * MEMORY_FRACTION
    n_sets = min(MAX_SETS, max(1, math.ceil(ROTATE_L2_MULTIPLE * l2_bytes / cache_bytes)), int(free // cache_bytes))
    if n_sets < 1:
        return dict(row, skipped=f"K+V take {cache_bytes / 1e9:.1f} GB, over {free / 1e9:.1f} GB usable")

    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):  # drawn in place: no fp32 copy of a cache that may be most of memory
        return torch.empty(shape, dtype=DTYPE, device=device).normal_(generator=gen)

    sets = [(randn(B, H, D), randn(B, Hkv, T, D), randn(B, Hkv, T, D)) for _ in range(n_sets)]
    seq_lens = torch.full((B,), T, dtype=torch.int32, device=device)
    q, k_cache, v_cache = sets[0]
    ours = decode_attention(q, k_cache, v_cache, seq_lens)  # checked call: validates, compiles
    row["max_abs_err_vs_sdpa"] = (ours.float() - sdpa_decode(q, k_cache, v_cache).float()).abs().max().item()
    # From the first launch on, the wrapper knows the compiled kernel's programs per SM.
    from kvref import triton_decode

    pps = triton_decode._PROGRAMS_PER_SM_SEEN.get(triton_decode._occupancy_key(q, D, G))
    num_splits = choose_num_splits(B, Hkv, T, device, programs_per_sm=pps)
    row.update(n_sets=n_sets, num_splits=num_splits, programs_per_sm=pps)

    kernel = [lambda s=s: decode_attention(*s, seq_lens, num_splits=num_splits, check_seq_lens=False) for s in sets]
    row["kernel_us"], row["timing"] = time_per_call_us(kernel)
    row["kernel_gbps"] = useful_bytes / (row["kernel_us"] * 1e-6) / 1e9
    row["sdpa_backend"], row["sdpa_kernels"] = sdpa_backend_that_ran(*sets[0])
    row["sdpa_us"] = _time_or_none([lambda s=s: sdpa_decode(*s) for s in sets], row)
    for name in SDPA_BACKENDS:  # each backend forced in turn; one that cannot run says why
        try:
            with sdpa_backend(name):
                row[f"sdpa_{name}_us"] = _time_or_none([lambda s=s: sdpa_decode(*s) for s in sets], row)
        except RuntimeError as exc:
            torch.cuda.synchronize()
            row[f"sdpa_{name}_us"] = None
            row.setdefault("notes", []).append(f"SDPA {name}: {str(exc).splitlines()[0][:120]}")
    timed = {name: row[f"sdpa_{name}_us"] for name in SDPA_BACKENDS if row[f"sdpa_{name}_us"]}
    row["best_sdpa"] = min(timed, key=timed.get) if timed else None
    row["best_sdpa_us"] = timed[row["best_sdpa"]] if timed else None
    naive_temp = 2 * B * H * T * D * elem + 3 * B * H * T * 4  # repeated K, V; fp32 scores, probs
    if n_sets * cache_bytes + naive_temp > free:
        row["naive_us"], row["naive_note"] = None, "does not fit"
    else:
        row["naive_us"] = _time_or_none([lambda s=s: naive_decode(*s) for s in sets], row)
    row["speedup_vs_sdpa"] = row["sdpa_us"] / row["kernel_us"] if row["sdpa_us"] else None
    row["speedup_vs_best_sdpa"] = row["best_sdpa_us"] / row["kernel_us"] if row["best_sdpa_us"] else None
    del sets
    return row


def _time_or_none(calls, row):
    try:
        return time_per_call_us(calls)[0]
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        row.setdefault("notes", []).append("out of memory in a baseline")
        return None


def time_per_call_us(calls, min_calls=50, replays=10):
    """Median microseconds per call: CUDA-graph replays of `calls` run back to back.

    Falls back to timing an eager loop (launch overhead included) if capture fails.
    """
    for call in calls:  # compile, pick backends, warm the allocator, outside the graph
        call()
    torch.cuda.synchronize()
    rounds = max(1, math.ceil(min_calls / len(calls)))
    n_calls = rounds * len(calls)
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream before capture, as torch advises
            for call in calls:
                call()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(rounds):
                for call in calls:
                    call()
        graph.replay()  # once untimed: first replays upload the graph
        run, how = graph.replay, "cuda-graph"
    except RuntimeError:  # a capture error: time the eager loop instead
        torch.cuda.synchronize()

        def run():
            for _ in range(rounds):
                for call in calls:
                    call()

        how = "eager"
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / n_calls)  # ms -> us per call
    return statistics.median(times), how


def copy_bandwidth_gbps(device, nbytes, reps=10):
    """Device-to-device copy, bytes read + written over the median time."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return 2 * nbytes / statistics.median(times) / 1e9


def read_bandwidth_gbps(device, nbytes, reps=10):
    """A read-only pass: sum over nbytes of bf16 into one fp32 scalar, bytes read over the median time."""
    src = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)
    for _ in range(3):
        src.sum(dtype=torch.float32)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        src.sum(dtype=torch.float32)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return nbytes / statistics.median(times) / 1e9


# %%
# Reporting

COLUMNS = (  # title, row key, width, format
    ("B", "B", 3, "d"),
    ("T", "T", 7, "d"),
    ("G", "G", 2, "d"),
    ("splits", "num_splits", 6, "d"),
    ("kernel us", "kernel_us", 10, ".1f"),
    ("kernel GB/s", "kernel_gbps", 11, ".0f"),
    ("of copy", "ratio_to_copy", 8, ".1%"),
    ("of read", "ratio_to_read", 8, ".1%"),
    ("SDPA ran", "sdpa_backend", 9, "s"),
    ("SDPA us", "sdpa_us", 9, ".1f"),
    ("flash us", "sdpa_flash_us", 9, ".1f"),
    ("cudnn us", "sdpa_cudnn_us", 9, ".1f"),
    ("eff. us", "sdpa_efficient_us", 9, ".1f"),
    ("naive us", "naive_us", 9, ".1f"),
    ("vs best", "speedup_vs_best_sdpa", 8, ".2f"),
)


def header():
    return " ".join(title.rjust(width) for title, _, width, _ in COLUMNS)


def cells(row):
    """The row's values formatted per COLUMNS, "n/a" where a method was not run."""
    return [("n/a" if row.get(key) is None else format(row[key], fmt)) for _, key, _, fmt in COLUMNS]


def format_row(row):
    """One line of the printed table; skipped points say why."""
    if row.get("skipped"):
        return f"{row['B']:>3} {row['T']:>7} {row['G']:>2}  skipped: {row['skipped']}"
    return " ".join(cell.rjust(width) for cell, (_, _, width, _) in zip(cells(row), COLUMNS))


def summarize(rows):
    """The two goals, checked on the measured points."""
    measured = [r for r in rows if not r.get("skipped")]
    long = [r for r in measured if r["T"] >= GOAL_MIN_CONTEXT and r.get("ratio_to_copy") is not None]
    with_sdpa = [r for r in measured if r.get("speedup_vs_best_sdpa") is not None]
    worst_long = min((r["ratio_to_copy"] for r in long), default=None)
    not_faster = [(r["B"], r["T"], r["G"], r["best_sdpa"]) for r in with_sdpa if r["speedup_vs_best_sdpa"] < 1]
    text = (
        f"bandwidth goal (>= {GOAL_RATIO:.0%} of copy at T >= {GOAL_MIN_CONTEXT}): "
        + ("no point measured" if worst_long is None else
           f"worst {worst_long:.1%} over {len(long)} points, {'met' if worst_long >= GOAL_RATIO else 'NOT met'}")
        + f"; kernel >= the fastest SDPA backend at {len(with_sdpa) - len(not_faster)} of {len(with_sdpa)} points"
        + (f", slower at (B, T, G, backend) {not_faster}" if not_faster else "")
    )
    return dict(worst_ratio_at_long_context=worst_long, slower_than_sdpa=not_faster,
                bandwidth_goal_met=worst_long is not None and worst_long >= GOAL_RATIO,
                sdpa_goal_met=not not_faster and bool(with_sdpa), text=text)


def write_results(result, out_dir):
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "_", result["device"]).strip("_")
    stem = out_dir / f"decode_bandwidth_{slug}_{result['date']}"
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(to_markdown(result))
    return json_path, md_path


def to_markdown(result):
    lines = [
        f"# Decode attention bandwidth: {result['device']}, {result['date']}",
        "",
        f"torch {result['torch']}, triton {result['triton']}, {result['dtype']}, H = {result['H']} query heads, "
        f"D = {result['D']}, Hkv = H / G. Copy bandwidth (read + write): {result['copy_gbps']:.0f} GB/s; "
        f"read-only: {result['read_gbps']:.0f} GB/s. Measured, not modeled.",
        "Times are per decode step (one layer): medians over replays of the calls run back to back on rotating",
        f"input sets (timing: {', '.join(sorted({r['timing'] for r in result['points'] if r.get('timing')})) or 'none'}).",
        "",
        "| " + " | ".join(title for title, _, _, _ in COLUMNS) + " |",
        "|" + "---:|" * len(COLUMNS),
    ]
    for r in result["points"]:
        if r.get("skipped"):
            lines.append(f"| {r['B']} | {r['T']} | {r['G']} | skipped: {r['skipped']} |" + " |" * (len(COLUMNS) - 4))
        else:
            lines.append("| " + " | ".join(cells(r)) + " |")
    notes = [f"- B={r['B']} T={r['T']} G={r['G']}: {note}" for r in result["points"] for note in r.get("notes", [])]
    backends = sorted({f"{r['sdpa_backend']}: {', '.join(r['sdpa_kernels'][:3])}" for r in result["points"]
                       if r.get("sdpa_backend")})
    lines += ["", "SDPA's own dispatch ran (kernels seen by torch.profiler):", *[f"- {b}" for b in backends]]
    lines += ["", "Notes:", *notes] if notes else []
    lines += ["", f"Goal: {result['goal']}.", "", result["summary"]["text"], ""]
    return "\n".join(lines)


def _triton_version():
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


if __name__ == "__main__":
    sys.exit(main())
