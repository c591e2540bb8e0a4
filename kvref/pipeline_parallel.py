"""Spoiler for card07: pipeline-parallel decoding, the layers each stage holds and what crosses a boundary (read it after you pass).

Pipeline parallelism: stage s owns layers s·L/P .. (s+1)·L/P - 1 and caches only those; stage 0
also embeds, the last stage also normalises and projects to logits. What crosses a stage
boundary is the hidden state `[B, S, d_model]`, sent with dist.send / dist.recv. No KV is
duplicated across stages.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from kvref.cache import GrowingKVCache, StaticKVCache
from kvref.config import ModelConfig
from kvref.measure import cache_nbytes
from kvref.model import build_model
from kvref.tensor_parallel import RankReport, decode_steps

# --- pipeline parallelism ----------------------------------------------------------------------

def pp_layers(cfg: ModelConfig, stages: int, stage: int) -> range:
    if cfg.n_layers % stages:
        raise ValueError(f"{stages} stages must divide n_layers = {cfg.n_layers}")
    per = cfg.n_layers // stages
    return range(stage * per, (stage + 1) * per)


def pp_worker(rank: int, world: int, cfg: ModelConfig, seed: int, ids, n_prompt: int) -> RankReport:
    """Stage `rank` of `world`: its layers only; receive the hidden state, run them, send it on."""
    model = build_model(cfg, seed)
    mine = pp_layers(cfg, world, rank)
    caches = [GrowingKVCache() for _ in mine]
    logits, sent = [], []
    ids = torch.as_tensor(ids)
    with torch.no_grad():
        for new, pos in decode_steps(ids, n_prompt):
            B, S = new.shape
            if rank == 0:
                x = model.embed_tokens(new)  # (B, S, d)
            else:
                x = torch.empty(B, S, cfg.d_model)
                dist.recv(x, src=rank - 1)
            for cache, i in zip(caches, mine):
                x = model.layers[i](x, pos, cache)
            if rank < world - 1:
                dist.send(x.contiguous(), dst=rank + 1)
                sent.append(x.nbytes)
            else:
                logits.append(model.lm_head(model.norm(x))[:, -1])
                sent.append(0)
    out = torch.stack(logits).numpy() if logits else None
    return RankReport(rank, [], cache_nbytes(caches), caches[0].k.numpy().copy(), out, sent)


def pp_stage_cache_nbytes_meta(cfg: ModelConfig, stages: int, stage: int, batch: int, seq_len: int,
                               dtype: torch.dtype) -> int:
    """`.nbytes` of the caches stage `stage` allocates: one per layer it owns, on the meta device."""
    caches = [StaticKVCache(batch, cfg.n_kv_heads, seq_len, cfg.head_dim, dtype, device="meta")
              for _ in pp_layers(cfg, stages, stage)]
    return cache_nbytes(caches)


def pp_hidden_nbytes_meta(cfg: ModelConfig, batch: int, n_new: int, dtype: torch.dtype) -> int:
    """`.nbytes` of the hidden state a stage sends for `n_new` tokens per sequence (the meta model's embedding output)."""
    # The table is made empty, not initialised: nn.Embedding's normal_ on the meta device runs a
    # Python decomposition whose first call imports torch._dynamo (1.6 s measured).
    table = torch.empty(cfg.vocab_size, cfg.d_model, dtype=dtype, device="meta")
    embed = nn.Embedding.from_pretrained(table)
    return embed(torch.zeros(batch, n_new, dtype=torch.long, device="meta")).nbytes  # (B, S, d)
