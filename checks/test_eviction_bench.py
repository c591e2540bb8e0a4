"""bench/eviction_quality.py measures what it says: its decode loop is the model, its oracle is top-k.

A random-weight kvref model (2 layers, GQA), a few positions:
- decoding byte by byte through EvictingKVCache with as many slots as positions gives the model's
  own logits, under both position schemes (nothing is evicted, so in-cache index = position);
- the oracle with a budget of every position is the full model, under both schemes;
- the oracle's attention at a small budget equals, query by query and head by head, attention over
  the top-k keys of the full weights computed from scratch: keys at their absolute positions
  ("original"), or renumbered 0..n-1 in position order with the query at n-1, or n when its own key
  is not kept ("in_cache").
"""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from kvref.attention import repeat_kv
from kvref.config import ModelConfig
from kvref.eviction import SCHEMES, rotate
from kvref.model import build_model

ROOT = Path(__file__).resolve().parent.parent
CFG = ModelConfig(vocab_size=256, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, max_seq_len=64)
S = 24


def bench():
    spec = importlib.util.spec_from_file_location("eviction_quality", ROOT / "bench" / "eviction_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = build_model(CFG, seed=3)
    ids = torch.randint(0, 256, (2, S), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids)
    return bench(), model, ids, want


@pytest.mark.parametrize("scheme", SCHEMES)
def test_cached_decode_with_room_for_every_position_is_the_model(setup, scheme):
    eq, model, ids, want = setup
    got = eq.decode_with_eviction(model, ids, S, "window", scheme)
    assert (got - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("per", ["head", "layer"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_oracle_with_a_budget_of_every_position_is_the_model(setup, scheme, per):
    eq, model, ids, want = setup
    got = eq.oracle_logits(model, ids, S, scheme, per)
    assert (got - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("scheme", SCHEMES)
def test_oracle_attention_is_attention_over_each_querys_top_k_keys(scheme):
    eq = bench()
    g = torch.Generator().manual_seed(5)
    B, H, Hkv, T, D, budget = 1, 4, 2, 12, 8, 4
    q, k, v = torch.randn(B, H, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    got = eq.oracle_attention(q, k, v, budget, scheme)
    kr, vr = repeat_kv(k, H), repeat_kv(v, H)
    for t in range(T):
        pos = torch.arange(t + 1)
        w = torch.softmax(rotate(q[:, :, t:t + 1], torch.tensor([t]), 1e4) @ rotate(kr[:, :, :t + 1], pos, 1e4).transpose(-2, -1)
                          / math.sqrt(D), dim=-1)  # (B, H, 1, t+1)
        for h in range(H):
            kept = w[0, h, 0].topk(min(budget, t + 1)).indices.sort().values
            if scheme == "original":
                k_pos, q_pos = kept, t
            else:
                k_pos, q_pos = torch.arange(len(kept)), len(kept) - 1 + int(t not in kept.tolist())
            qh = rotate(q[:, h:h + 1, t:t + 1], torch.tensor([q_pos]), 1e4)
            kh = rotate(kr[:, h:h + 1, kept], k_pos, 1e4)
            want = torch.softmax(qh @ kh.transpose(-2, -1) / math.sqrt(D), dim=-1) @ vr[:, h:h + 1, kept]
            assert (got[0, h, t] - want[0, 0, 0]).abs().max().item() < 1e-5, (t, h)
