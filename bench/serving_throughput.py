"""Benchmark: serving throughput against the K/V memory budget, static reservation vs paging.

    python bench/serving_throughput.py [--requests 1000] [--rate 200] [--seed 0]

kvref's serving simulator (`kvref.serving_sim.simulate`: iteration-level batching, FCFS admission,
step times from kvref's roofline) serves one Poisson trace twice at each K/V budget: with a
static reservation of max_seq_len slots per request (what engines did before PagedAttention)
and with paged blocks of 16 slots allocated on demand (preemption by recompute when blocks run
out). Model Llama-2-7B in bf16 on an H100 SXM (datasheet: 3.35 TB/s, 989 dense bf16 TFLOP/s);
prompts and outputs uniform on 16..512 tokens (ShareGPT's means are about 160 and 340);
max_seq_len 2,048; arrivals at --rate requests/s, faster than either policy serves them at any
budget shown, so each run is saturated and its throughput is the server's capacity. It writes:

    bench/results/serving_throughput.json  every run's summary and the setup
    bench/results/serving_throughput.md    the table and how it was made
    bench/results/serving_throughput.png   throughput and memory waste against the budget

A simulation, not a GPU measurement: step times are the roofline's lower bound (perfect overlap
of compute and memory traffic, no launch overheads), so absolute tokens/s are optimistic; the
ratio between the policies at equal memory is the point.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kvref.config import preset  # noqa: E402
from kvref.hardware import H100_SXM  # noqa: E402
from kvref.serving_sim import SimConfig, poisson_trace, simulate  # noqa: E402

RESULTS = ROOT / "bench" / "results"
BUDGETS_GIB = [2, 4, 8, 12, 16, 24, 32, 48, 64]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cfg, hw, max_seq_len = preset("llama-2-7b"), H100_SXM, 2048
    trace = poisson_trace(args.requests, args.rate, (16, 512), (16, 512), seed=args.seed)
    rows, t0 = [], time.time()
    for gib in BUDGETS_GIB:
        row = {"budget_gib": gib}
        for policy in ("static", "paged"):
            res = simulate(trace, SimConfig(cfg, hw, gib * 2**30, policy=policy, max_seq_len=max_seq_len,
                                            max_batch=4096, dtype=torch.bfloat16))
            s = res.summary()
            s["recomputed_tokens"] = res.recomputed_tokens
            row[policy] = s
        rows.append(row)
        st, pg = row["static"], row["paged"]
        print(f"{gib:3d} GiB  static {st['throughput_tok_s']:8.0f} tok/s (batch <= {st['max_batch']:4d}, waste "
              f"{st['mem_waste']:.1%})   paged {pg['throughput_tok_s']:8.0f} tok/s (batch <= {pg['max_batch']:4d}, "
              f"waste {pg['mem_waste']:.1%})   x{pg['throughput_tok_s'] / st['throughput_tok_s']:.2f}")
    wall = time.time() - t0
    setup = {"command": "python bench/serving_throughput.py" + (
                 "" if (args.requests, args.rate, args.seed) == (1000, 200.0, 0)
                 else f" --requests {args.requests} --rate {args.rate} --seed {args.seed}"),
             "model": "llama-2-7b", "dtype": "bf16", "hardware": hw.name, "max_seq_len": max_seq_len, "block_size": 16,
             "requests": args.requests, "rate_per_s": args.rate, "seed": args.seed, "prompt_lens": [16, 512],
             "output_lens": [16, 512], "preemption": "recompute", "wall_s": round(wall, 1)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serving_throughput.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=1))
    write_md(setup, rows)
    plot(setup, rows)
    return 0


def write_md(setup: dict, rows: list[dict]) -> None:
    lines = ["# Serving throughput against K/V memory: static reservation vs paging (kvref simulator)", "",
             f"Command: `{setup['command']}` ({setup['wall_s']} s on a 2-core CPU)  ",
             f"Model: Llama-2-7B, bf16, on an {setup['hardware']} (roofline step times: kvref.roofline); "
             f"{setup['requests']} Poisson arrivals at {setup['rate_per_s']:g}/s (seed {setup['seed']}), prompts and "
             f"outputs uniform on 16..512 tokens; static reserves max_seq_len = {setup['max_seq_len']} slots a request; "
             f"paged holds blocks of {setup['block_size']} on demand and preempts by recompute. Arrivals outpace both "
             "policies, so throughput is each server's capacity. Waste: time-averaged share of allocated K/V slots "
             "that hold no token.", "",
             "| K/V budget | static tok/s | static max batch | static waste | paged tok/s | paged max batch | paged waste | paged / static |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        st, pg = r["static"], r["paged"]
        lines.append(f"| {r['budget_gib']} GiB | {st['throughput_tok_s']:,.0f} | {st['max_batch']} | {st['mem_waste']:.1%} | "
                     f"{pg['throughput_tok_s']:,.0f} | {pg['max_batch']} | {pg['mem_waste']:.1%} | "
                     f"{pg['throughput_tok_s'] / st['throughput_tok_s']:.2f}x |")
    lines += ["", "![throughput against memory](serving_throughput.png)", ""]
    (RESULTS / "serving_throughput.md").write_text("\n".join(lines))


def plot(setup: dict, rows: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["budget_gib"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for policy, style in (("static", "o-"), ("paged", "s-")):
        ax1.plot(x, [r[policy]["throughput_tok_s"] for r in rows], style, label=policy)
        ax2.plot(x, [100 * r[policy]["mem_waste"] for r in rows], style, label=policy)
    ax1.set(xlabel="K/V memory budget (GiB)", ylabel="throughput (output tokens/s)",
            title="Llama-2-7B bf16, H100 roofline: saturated throughput")
    ax2.set(xlabel="K/V memory budget (GiB)", ylabel="allocated K/V slots holding no token (%)",
            title=f"memory waste (static: {setup['max_seq_len']} slots a request; paged: 16)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.text(0.5, 0.005, f"kvref.serving_sim simulator: {setup['requests']} Poisson arrivals at {setup['rate_per_s']:g}/s, "
             "prompts and outputs uniform on 16..512 tokens; " + setup["command"], ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(RESULTS / "serving_throughput.png", dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
