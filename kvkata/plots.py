"""`kvkata plot`: figures from kvref's models and measurements, as PNGs under a folder you choose.

- kv_bytes_vs_context.png: KV-cache bytes of one sequence against context for the presets
  (kvref.roofline.kv_bytes_per_token, bf16), with each device's memory as a line, in GiB (the
  capacities are nvidia-smi's MiB, kvref/hardware.py); presets whose lines nearly coincide are
  drawn in distinct styles and the figure says why they coincide;
- roofline.png: an H100's bf16 roofline with prefill and decode steps of Llama-2-7B placed on it
  (FLOPs and bytes from kvref.roofline.prefill_cost / decode_cost, the cost FlopCounterMode and
  .nbytes confirm in the checks);
- cached_vs_uncached.png: the roofline time of generating one more token with and without the
  cache against length (Llama-2-7B, H100, bf16, batch 1);
- and a copy of every figure a card's benchmark recorded under bench/results/, except those that
  give away a kata's answer (SPOILERS), which only `--spoilers` copies.

matplotlib is needed (`pip install matplotlib`, or the dev extra).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from kvkata import ROOT

# Bench figures that show a kata's answer, and what they give away: left out unless asked for.
SPOILERS = {
    "kv_quant_axes.png": "card04's key_axis_errors: which axis to quantize keys and values along",
    "recall_curve.png": "card10's recall_capacity: where a fixed state's recall falls off",
}
NEAR = 0.05  # presets whose bytes per token are within 5% draw as one line on a log plot


def _gib(n_bytes: float) -> str:
    """79.6, 80, 140.4: GiB to one decimal, no trailing .0."""
    return f"{n_bytes / 2**30:.1f}".removesuffix(".0")


def _formula(cfg, dtype_bytes: int) -> str:
    """kv_bytes_per_token as the product it is: L·2·Hkv·D·bytes, or MLA's L·(latent + rope)·bytes."""
    if cfg.is_mla:
        return f"{cfg.n_layers}·({cfg.mla_latent_dim}+{cfg.mla_rope_dim})·{dtype_bytes}"
    return f"{cfg.n_layers}·2·{cfg.n_kv_heads}·{cfg.head_dim}·{dtype_bytes}"


def _why_close(a, b) -> str:
    """Why two presets' caches are nearly the same size (lines of a figure's note)."""
    if a.is_mla and b.is_mla and (a.mla_latent_dim, a.mla_rope_dim) == (b.mla_latent_dim, b.mla_rope_dim):
        return (f"both MLA: one {a.mla_latent_dim}-wide latent and one {a.mla_rope_dim}-wide RoPE key\n"
                f"per layer, whatever the heads; {a.n_layers} and {b.n_layers} layers")
    if (a.n_kv_heads, a.head_dim) == (b.n_kv_heads, b.head_dim):
        return f"both cache {a.n_kv_heads} KV heads of {a.head_dim};\n{a.n_layers} and {b.n_layers} layers"
    return f"{_formula(a, 2)} B against\n{_formula(b, 2)} B"


def kv_bytes_figure():
    """KV bytes of one sequence against context, every preset and every device's memory, in GiB."""
    import matplotlib.pyplot as plt

    from kvref import roofline
    from kvref.config import PRESETS
    from kvref.hardware import HARDWARE

    fig, ax = plt.subplots(figsize=(8, 5.4))
    contexts = [2 ** i for i in range(10, 18)]  # 1k .. 128k
    by_bytes: dict[float, list[str]] = {}  # presets with the same bytes per token share a line
    for name, cfg in PRESETS.items():
        by_bytes.setdefault(roofline.kv_bytes_per_token(cfg, 2), []).append(name)
    drawn: list[tuple[float, str]] = []  # (bytes per token, first name) of the lines drawn so far
    styles = iter([("--", "s"), (":", "^"), ("-.", "D")])  # for a line that lands on one already drawn
    for per_token, names in sorted(by_bytes.items(), reverse=True):
        near = [(b, n) for b, n in drawn if abs(per_token - b) <= NEAR * b]
        ls, marker = next(styles) if near else ("-", "o")
        formulas = sorted({_formula(PRESETS[n], 2) for n in names})
        ax.plot(contexts, [per_token * t / 2**30 for t in contexts], ls=ls, marker=marker, ms=4 if near else 3,
                label=f"{', '.join(names)}: {' or '.join(formulas)} B = {per_token / 1024:,.4g} KiB/token")
        for b, other in near:
            gap = abs(per_token - b) / b
            ax.annotate(f"{other} and {names[0]} nearly coincide ({gap:.1%} apart):\n"
                        f"{_why_close(PRESETS[other], PRESETS[names[0]])}",
                        xy=(contexts[2], per_token * contexts[2] / 2**30), xytext=(0.02, 0.97),
                        textcoords="axes fraction", va="top", fontsize=7,
                        arrowprops=dict(arrowstyle="->", lw=0.6, color="grey"))
        drawn.append((per_token, names[0]))
    by_memory: dict[str, list] = {}  # devices whose capacities round to the same GiB share a label
    for hw in HARDWARE.values():
        by_memory.setdefault(str(round(hw.memory_bytes / 2**30)), []).append(hw)
    for devices in by_memory.values():
        for hw in devices:
            ax.axhline(hw.memory_bytes / 2**30, ls="--", lw=0.8, color="grey")
        label = ", ".join(f"{hw.name} {_gib(hw.memory_bytes)} GiB" for hw in devices)
        ax.text(contexts[-1], max(hw.memory_bytes for hw in devices) / 2**30 * 1.06, label, fontsize=7, color="grey",
                ha="right")
    ax.set(xscale="log", yscale="log", xlabel="context (tokens, one sequence)", ylabel="KV cache (GiB, bf16)",
           title="KV-cache bytes of one sequence against context (kvref.roofline)")
    ax.legend(fontsize=6.5, title_fontsize=6.5, loc="lower right",
              title="bytes a token = L·2·Hkv·D·bytes (MLA: L·(latent+rope)·bytes)")
    return fig


def plot_all(out: Path, spoilers: bool = False) -> list[Path]:
    """Write the figures under `out`; the bench figures in SPOILERS only with `spoilers`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from kvref import roofline
    from kvref.config import preset
    from kvref.hardware import H100_SXM

    out.mkdir(parents=True, exist_ok=True)
    written = [_save(kv_bytes_figure(), out / FIGURES[0])]

    # 2. the roofline with prefill and decode steps
    cfg, hw, dtype = preset("llama-2-7b"), H100_SXM, torch.bfloat16
    peak, bw = hw.peak_flops(dtype), hw.mem_bandwidth
    fig, ax = plt.subplots(figsize=(8, 5))
    xs = [2 ** (i / 4) for i in range(-8, 60)]
    ax.plot(xs, [min(peak, bw * x) / 1e12 for x in xs], color="black", label=f"{hw.name} bf16 roofline")
    for batch, marker in ((1, "o"), (64, "s")):
        d = roofline.decode_cost(cfg, batch, 4096, 2)
        ax.scatter([d.intensity], [min(peak, bw * d.intensity) / 1e12], marker=marker, label=f"decode, batch {batch}, 4k")
    for prompt in (128, 2048):
        p = roofline.prefill_cost(cfg, 1, prompt, 2)
        ax.scatter([p.intensity], [min(peak, bw * p.intensity) / 1e12], marker="^", label=f"prefill {prompt} tokens")
    ax.axvline(peak / bw, ls=":", color="grey")
    ax.text(peak / bw * 1.1, peak / 1e12 * 0.1, f"ridge {peak / bw:.0f} FLOP/B", fontsize=8, color="grey")
    ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOP per byte)", ylabel="attainable TFLOP/s",
           title=f"Llama-2-7B steps on the {hw.name} roofline (bf16)")
    ax.legend(fontsize=8)
    written.append(_save(fig, out / FIGURES[1]))

    # 3. cached against uncached cost of one more token
    lengths = [2 ** i for i in range(4, 16)]
    fig, ax = plt.subplots(figsize=(8, 5))
    for use_cache in (True, False):
        ts = [roofline.decode_time(cfg, hw, 1, t, dtype, use_cache=use_cache) * 1e3 for t in lengths]
        ax.plot(lengths, ts, marker="o", label="with the KV cache" if use_cache else "recompute everything")
    ax.set(xscale="log", yscale="log", xlabel="tokens so far", ylabel="roofline time of the next token (ms)",
           title=f"Llama-2-7B, {hw.name}, bf16, batch 1: cached against uncached")
    ax.legend()
    written.append(_save(fig, out / FIGURES[2]))

    # 4. what the cards' benchmarks recorded, less what would give a kata's answer away
    copied, left_out = copy_bench_figures(out, spoilers)
    if left_out:
        notes = "; ".join(f"bench_{name} (it gives away {SPOILERS[name]})" for name in left_out)
        print(f"kvkata plot: left out {notes}. `kvkata plot --spoilers` copies them.", file=sys.stderr)
    return written + copied


FIGURES = ("kv_bytes_vs_context.png", "roofline.png", "cached_vs_uncached_roofline.png")  # drawn here


def names(spoilers: bool = False) -> list[str]:
    """The files plot_all writes: the figures drawn here, then the bench figures it copies."""
    bench = sorted(png.name for png in (ROOT / "bench" / "results").glob("*.png"))
    return list(FIGURES) + [f"bench_{name}" for name in bench if spoilers or name not in SPOILERS]


def copy_bench_figures(out: Path, spoilers: bool = False) -> tuple[list[Path], list[str]]:
    """Copy bench/results/*.png to out/bench_*.png; those in SPOILERS only with `spoilers`. (copied, left out)"""
    out.mkdir(parents=True, exist_ok=True)
    copied, left_out = [], []
    for png in sorted((ROOT / "bench" / "results").glob("*.png")):
        if png.name in SPOILERS and not spoilers:
            left_out.append(png.name)
            continue
        dest = out / f"bench_{png.name}"
        shutil.copy2(png, dest)
        copied.append(dest)
    return copied, left_out


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path
