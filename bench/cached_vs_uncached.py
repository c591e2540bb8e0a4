"""Benchmark: greedy generation with and without the KV cache, kvref's decoder on the CPU.

    python bench/cached_vs_uncached.py [--max-len 1024] [--prompt-len 16] [--threads 1]

One run generates a sequence token by token with a static KV cache (prefill, then one token
per step; three times, keeping each step's median) and then without one (every step runs the
whole sequence so far). Both feed the same tokens (the cached run's greedy choices), so they
do the same work per position. Every step is timed. The script prints the time per token against position and the speed-up
at several lengths, fits the curves (cached: linear in T; uncached: quadratic in T, since a
step over T tokens does T times the projections and T² scores) and writes:

    bench/results/cached_vs_uncached.json  every step's time, the table, the fits, the setup
    bench/results/cached_vs_uncached.md    the table and how it was made
    bench/results/cached_vs_uncached.png   time per token and total time against length

Timings are wall-clock on whatever CPU runs this; the ratios and the shapes of the curves are
the point. One thread by default: on a shared machine torch's intra-op threads can spin
against other processes and add noise far larger than the effect of a second core.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kvref.config import ModelConfig  # noqa: E402
from kvref.model import build_model  # noqa: E402

RESULTS = ROOT / "bench" / "results"
# Small but not tiny: 4 layers, d_model 256, 8 query heads over 2 KV heads (GQA, G = 4).
CONFIG = dict(vocab_size=512, n_layers=4, d_model=256, n_heads=8, n_kv_heads=2, head_dim=32, max_seq_len=4096)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


@torch.inference_mode()
def generate_cached(model, prompt: torch.Tensor, max_len: int):
    """Prefill, then one token per step into a static cache. Step i feeds the token at position
    P + i, so its forward reads T = P + i + 1 tokens; the last step reads max_len."""
    caches = model.new_caches("static", 1, max_len)
    logits, prefill = timed(model.prefill, prompt, caches)
    ids, steps = prompt, []
    for _ in range(prompt.shape[1], max_len):
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)  # (1, T)
        logits, dt = timed(model.decode_step, ids[:, -1:], caches)  # one token, reading the cache
        steps.append(dt)
    return ids, prefill, steps


@torch.inference_mode()
def generate_uncached(model, ids: torch.Tensor, prompt_len: int):
    """The same tokens without a cache: step i runs all P + i + 1 tokens again."""
    last, prefill = timed(lambda x: model(x)[:, -1], ids[:, :prompt_len])
    steps, agree = [], 0
    for T in range(prompt_len + 1, ids.shape[1] + 1):
        agree += int(last.argmax(-1).item() == ids[0, T - 1].item())  # would it pick the same token?
        last, dt = timed(lambda x: model(x)[:, -1], ids[:, :T])
        steps.append(dt)
    return prefill, steps, agree / len(steps)


def run(model, prompt: torch.Tensor, max_len: int, repeats: int):
    """The cached generation `repeats` times (it is cheap; per step the median is kept), then the
    uncached one once, on the cached run's tokens. They run one after the other, not interleaved:
    an uncached pass between two cached steps would evict the weights from the CPU caches and
    slow the cached steps down, which no real generation does."""
    runs = [generate_cached(model, prompt, max_len) for _ in range(repeats)]
    ids = runs[0][0]
    prefill_uncached, uncached, agreement = generate_uncached(model, ids, prompt.shape[1])
    return dict(prefill_cached=float(np.median([r[1] for r in runs])),
                cached=[float(x) for x in np.median([r[2] for r in runs], axis=0)],
                prefill_uncached=prefill_uncached, uncached=uncached, greedy_agreement=agreement)


def window_median(times: list[float], index: int, half: int = 8) -> float:
    lo, hi = max(0, index - half), min(len(times), index + half + 1)
    return float(np.median(times[lo:hi]))


def summarize(res: dict, prompt_len: int, max_len: int) -> list[dict]:
    """At each checkpoint length L: time of the step whose forward reads L tokens, and totals."""
    rows = []
    cum_c = np.cumsum(res["cached"]) + res["prefill_cached"]
    cum_u = np.cumsum(res["uncached"]) + res["prefill_uncached"]
    checkpoints = [L for L in (32, 64, 128, 256, 512, 768, 1024, 2048, 4096) if prompt_len < L <= max_len]
    for L in checkpoints:
        i = L - prompt_len - 1  # step i feeds position P + i: its forward reads L = P + i + 1 tokens
        c, u = window_median(res["cached"], i), window_median(res["uncached"], i)
        rows.append(dict(length=L, cached_ms_per_token=1e3 * c, uncached_ms_per_token=1e3 * u, speedup_per_token=u / c,
                         cached_total_s=float(cum_c[i]), uncached_total_s=float(cum_u[i]),
                         speedup_total=float(cum_u[i] / cum_c[i])))
    return rows


def fit(res: dict, prompt_len: int) -> dict:
    """Least squares of seconds per token against T (tokens the step's forward reads)."""
    T = np.arange(len(res["cached"])) + prompt_len + 1
    c = np.polyfit(T, res["cached"], 1)
    u = np.polyfit(T, res["uncached"], 2)
    return dict(cached_linear=dict(s_per_token_per_position=float(c[0]), intercept_s=float(c[1])),
                uncached_quadratic=dict(s_per_position_squared=float(u[0]), s_per_position=float(u[1]),
                                        intercept_s=float(u[2])))


def plot(res: dict, rows: list[dict], prompt_len: int, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = np.arange(len(res["cached"])) + prompt_len + 1
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax1.plot(T, 1e3 * np.array(res["uncached"]), lw=0.8, label="no cache: whole sequence every step")
    ax1.plot(T, 1e3 * np.array(res["cached"]), lw=0.8, label="KV cache: one token per step")
    ax1.set(xlabel="tokens the step reads (T)", ylabel="ms per token", yscale="log",
            title="Time per generated token")
    ax1.legend()
    cum_c = np.cumsum(res["cached"]) + res["prefill_cached"]
    cum_u = np.cumsum(res["uncached"]) + res["prefill_uncached"]
    ax2.plot(T, cum_u, label="no cache (quadratic)")
    ax2.plot(T, cum_c, label="KV cache (linear)")
    for r in rows:
        ax2.annotate(f"{r['speedup_total']:.0f}x", (r["length"], r["uncached_total_s"]), fontsize=8,
                     textcoords="offset points", xytext=(-10, 6))
    ax2.set(xlabel="sequence length", ylabel="seconds since the prompt", title="Total generation time (speed-up marked)")
    ax2.legend()
    fig.suptitle(f"kvref decoder on the CPU: {CONFIG['n_layers']} layers, d_model {CONFIG['d_model']}, "
                 f"{CONFIG['n_heads']} heads / {CONFIG['n_kv_heads']} KV heads, fp32, batch 1")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(rows, fits, setup) -> str:
    cfg = setup["config"]
    lines = [
        "# Cached vs uncached greedy generation (kvref, CPU)",
        "",
        f"Command: `{setup['command']}`  ",
        f"Model: kvref decoder, {cfg['n_layers']} layers, d_model {cfg['d_model']}, {cfg['n_heads']} query heads over "
        f"{cfg['n_kv_heads']} KV heads of dim {cfg['head_dim']}, vocab {cfg['vocab_size']} (fp32, batch 1, random weights); "
        f"prompt {setup['prompt_len']} tokens, generated until a step reads {setup['max_len']} tokens.  ",
        f"Machine: {setup['machine']}; torch {setup['torch']}, {setup['threads']} thread(s); "
        f"wall time of the run {setup['wall_s']:.0f} s; 1-minute load average {setup['load_average_1min']['before']:.2f} "
        f"before, {setup['load_average_1min']['after']:.2f} after (other processes share the machine).  ",
        f"Greedy tokens of the uncached run agreed with the cached run's at {100 * setup['greedy_agreement']:.1f}% of steps.",
        "",
        f"Per-token times are medians over the 17 steps around each length (the cached steps first take the median "
        f"of {setup['repeats_cached']} runs); totals include the prompt pass.",
        "",
        "| length | cached ms/token | uncached ms/token | speed-up per token | cached total s | uncached total s | speed-up total |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['length']} | {r['cached_ms_per_token']:.2f} | {r['uncached_ms_per_token']:.2f} | "
                     f"{r['speedup_per_token']:.1f}x | {r['cached_total_s']:.2f} | {r['uncached_total_s']:.2f} | "
                     f"{r['speedup_total']:.1f}x |")
    c, u = fits["cached_linear"], fits["uncached_quadratic"]
    lines += [
        "",
        f"Fits (seconds per token against T): cached {c['intercept_s'] * 1e3:.3f} ms + {c['s_per_token_per_position'] * 1e6:.3f} µs·T; "
        f"uncached {u['intercept_s'] * 1e3:.3f} ms + {u['s_per_position'] * 1e6:.3f} µs·T + {u['s_per_position_squared'] * 1e9:.4f} ns·T².",
        "",
        "An uncached step over T tokens costs about a + b·T + c·T² (projections, then the T² scores), so its",
        "total to length L grows like b·L²/2 + c·L³/3: doubling L multiplies it by 4 to 8. A cached step costs",
        "about a + b·T (the scores over T keys), nearly constant here, so its total about doubles. Measured: "
        + ", ".join(f"{a['length']}->{b['length']}: uncached x{b['uncached_total_s'] / a['uncached_total_s']:.2f}, "
                    f"cached x{b['cached_total_s'] / a['cached_total_s']:.2f}"
                    for a in rows for b in rows if b["length"] == 2 * a["length"]) + ".",
        "",
        "![time per token and total time](cached_vs_uncached.png)",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-len", type=int, default=1024, help="the last step's forward reads this many tokens")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=3, help="cached generations (per-step median)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not 1 <= args.prompt_len < args.max_len:
        parser.error("need 1 <= --prompt-len < --max-len")
    torch.set_num_threads(args.threads)
    cfg = ModelConfig(**{**CONFIG, "max_seq_len": max(CONFIG["max_seq_len"], args.max_len)})
    model = build_model(cfg)
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))

    start = time.perf_counter()
    load_before = os.getloadavg()[0]
    run(model, prompt, min(args.max_len, args.prompt_len + 40), 1)  # warm-up: allocator, kernels, caches
    res = run(model, prompt, args.max_len, args.repeats)
    wall = time.perf_counter() - start
    rows, fits = summarize(res, args.prompt_len, args.max_len), fit(res, args.prompt_len)

    print(f"{'length':>7} {'cached ms/tok':>14} {'uncached ms/tok':>16} {'x/tok':>7} {'cached tot s':>13} "
          f"{'uncached tot s':>15} {'x total':>8}")
    for r in rows:
        print(f"{r['length']:>7} {r['cached_ms_per_token']:>14.2f} {r['uncached_ms_per_token']:>16.2f} "
              f"{r['speedup_per_token']:>7.1f} {r['cached_total_s']:>13.2f} {r['uncached_total_s']:>15.2f} "
              f"{r['speedup_total']:>8.1f}")

    setup = dict(command=" ".join(["python bench/cached_vs_uncached.py", *(argv if argv is not None else sys.argv[1:])]),
                 config=CONFIG, prompt_len=args.prompt_len, max_len=args.max_len, threads=args.threads,
                 torch=torch.__version__, machine=f"{cpu_name()}, {os.cpu_count()} logical CPUs",
                 wall_s=wall, greedy_agreement=res["greedy_agreement"], repeats_cached=args.repeats,
                 load_average_1min=dict(before=load_before, after=os.getloadavg()[0]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cached_vs_uncached.json").write_text(json.dumps(
        dict(setup=setup, table=rows, fits=fits, prefill_s=dict(cached=res["prefill_cached"], uncached=res["prefill_uncached"]),
             step_seconds=dict(first_position=args.prompt_len + 1, cached=res["cached"], uncached=res["uncached"])), indent=1))
    (args.out / "cached_vs_uncached.md").write_text(markdown(rows, fits, setup))
    plot(res, rows, args.prompt_len, args.out / "cached_vs_uncached.png")
    print(f"wrote {args.out / 'cached_vs_uncached.json'}, .md and .png ({wall:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
