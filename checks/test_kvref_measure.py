"""kvref.measure: the instruments the katas are checked against, checked themselves.

The references are independent of the instruments: a FLOP count written out by hand matmul by
matmul for one tiny config, numel x element_size of every tensor for bytes, our own forward
hooks on the projections for rows, and the same model run on the CPU against the meta device.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from kvref.cache import GrowingKVCache, StaticKVCache
from kvref.config import PRESETS, ModelConfig, preset
from kvref.measure import (ShapeOnlyCache, cache_nbytes, flops_of, forward_flops_measured, generation_flops_measured,
                           kv_bytes_per_token_measured, kv_cache_bytes_measured, kv_recompute_flops_measured, kv_rows_of_generation,
                           kv_rows_per_forward, meta_model, step_flops_measured, weight_bytes_read,
                           weight_nbytes)
from kvref.model import build_model
from kvref.strategies import gqa_model_configs, kv_dtypes, model_configs

CONFIGS = st.one_of(model_configs(), gqa_model_configs())
BATCHES = st.integers(1, 3)
# vocab 10, one layer, d_model 4, 2 query heads over 1 KV head of dim 2, SwiGLU width 6.
TINY = ModelConfig(vocab_size=10, n_layers=1, d_model=4, n_heads=2, n_kv_heads=1, head_dim=2, d_ff=6)


def ids(cfg, batch, length, seed=0):
    return torch.randint(0, cfg.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- FLOPs ----------------------------------------------------------------------------------

def test_flops_of_a_tiny_forward_match_a_hand_count():
    # Batch 1, 3 tokens, no cache. Every matmul, in FLOPs = 2 x rows x in x out:
    #   q_proj 3x4 @ 4x4: 96     k_proj 3x4 @ 4x2: 48     v_proj: 48      o_proj 3x4 @ 4x4: 96
    #   gate 3x4 @ 4x6: 144      up: 144                  down 3x6 @ 6x4: 144
    #   lm_head 3x4 @ 4x10: 240                                           -> 960 in nn.Linear
    #   scores q @ kᵀ per head 3x2 @ 2x3: 36, x 2 heads: 72; softmax @ v 3x3 @ 3x2: 36, x 2: 72
    #                                                                     -> 144 in attention
    measured = forward_flops_measured(build_model(TINY), ids(TINY, 1, 3))
    assert (measured.projections, measured.attention, measured.total) == (960, 144, 1104)
    assert set(measured.by_op) == {"aten.mm", "aten.bmm"}


@given(cfg=CONFIGS, batch=BATCHES, n_new=st.integers(1, 5))
def test_projection_flops_are_two_per_weight_of_every_linear_per_token(cfg, batch, n_new):
    model = build_model(cfg)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    measured = forward_flops_measured(model, ids(cfg, batch, n_new))
    assert measured.projections == 2 * batch * n_new * weights
    assert measured.total == measured.projections + measured.attention


@given(cfg=CONFIGS, batch=BATCHES, n_cached=st.integers(0, 5), n_new=st.integers(1, 4))
def test_the_meta_device_counts_the_same_flops_as_a_real_cpu_run(cfg, batch, n_cached, n_new):
    model = build_model(cfg)
    x = ids(cfg, batch, n_cached + n_new)
    caches = model.new_caches("growing")
    with torch.no_grad():
        if n_cached:
            model(x[:, :n_cached], torch.arange(n_cached), caches)
        cpu = forward_flops_measured(model, x[:, n_cached:], torch.arange(n_cached, n_cached + n_new), caches)
    assert step_flops_measured(cfg, batch, n_new, n_cached) == cpu
    assert step_flops_measured(cfg, batch, n_new, n_cached, device="cpu") == cpu


@given(cfg=CONFIGS, n_tokens=st.integers(1, 8))
def test_the_kv_rebuild_counts_the_same_flops_on_the_meta_device_and_the_cpu(cfg, n_tokens):
    meta = kv_recompute_flops_measured(cfg, n_tokens)
    assert kv_recompute_flops_measured(cfg, n_tokens, device="cpu") == meta
    assert meta.projections > 0


def test_the_flop_measurements_name_an_unknown_device():
    with pytest.raises(ValueError, match="device must be 'meta' or 'cpu'"):
        kv_recompute_flops_measured(TINY, 2, device="cuda")
    with pytest.raises(ValueError, match="device must be 'meta' or 'cpu'"):
        step_flops_measured(TINY, 1, 1, 0, device="gpu")


@given(cfg=CONFIGS, batch=BATCHES, p=st.integers(1, 5), n=st.integers(1, 4), use_cache=st.booleans())
def test_generation_flops_are_the_sum_of_the_forward_passes(cfg, batch, p, n, use_cache):
    model = build_model(cfg)
    total = generation_flops_measured(model, ids(cfg, batch, p), n, use_cache).total
    if use_cache:
        passes = [step_flops_measured(cfg, batch, p, 0)] + [step_flops_measured(cfg, batch, 1, p + i - 1)
                                                           for i in range(1, n)]
    else:
        passes = [step_flops_measured(cfg, batch, p + i, 0) for i in range(n)]
    assert total == sum(f.total for f in passes)


def test_sdpa_is_counted_as_attention_on_the_meta_device():
    B, H, S, D = 2, 3, 5, 4
    q = torch.randn(B, H, S, D, device="meta")
    measured = flops_of(F.scaled_dot_product_attention, q, q, q)
    assert (measured.attention, measured.projections) == (4 * B * H * S * S * D, 0)
    # On the CPU the fused kernel is invisible to FlopCounterMode in torch 2.13 (0 FLOPs); if a
    # later torch counts it, it must count the same.
    cpu = flops_of(F.scaled_dot_product_attention, *(torch.randn(B, H, S, D),) * 3)
    assert cpu.total in (0, measured.total)


def flop_counter_mode(fn, *args):
    """PyTorch's own FlopCounterMode around fn(*args): total and per-op counts, no grad."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, depth=0)
    with torch.no_grad(), counter:
        fn(*args)
    return counter.get_total_flops(), {str(op): n for op, n in counter.get_flop_counts().get("Global", {}).items()}


@given(cfg=CONFIGS, batch=BATCHES, n_cached=st.integers(0, 5), n_new=st.integers(1, 4))
def test_kvrefs_counter_counts_what_flop_counter_mode_counts_op_by_op(cfg, batch, n_cached, n_new):
    # kvref.opcount.MatmulFlops applies FlopCounterMode's formulas without FlopCounterMode (whose
    # first use imports torch._dynamo). Both count the same step, on the CPU and on the meta device;
    # each gets a fresh model and cache, since a step advances its cache.
    def step(device):
        pos = torch.arange(n_cached, n_cached + n_new, device=device)
        if device == "meta":
            caches = [ShapeOnlyCache(n_cached) for _ in range(cfg.n_layers)] if n_cached else None
            return meta_model(cfg), torch.zeros(batch, n_new, dtype=torch.long, device="meta"), pos, caches
        model, x = build_model(cfg), ids(cfg, batch, n_cached + n_new)
        caches = model.new_caches("growing")
        if n_cached:
            with torch.no_grad():
                model(x[:, :n_cached], torch.arange(n_cached), caches)
        return model, x[:, n_cached:], pos, caches

    for device in ("cpu", "meta"):
        ours = flops_of(*step(device))
        assert (ours.total, ours.by_op) == flop_counter_mode(*step(device)), device


def test_kvrefs_counter_counts_sdpa_as_flop_counter_mode_does_on_both_devices():
    q = torch.randn(2, 3, 5, 4)
    for device in ("cpu", "meta"):
        args = (q.to(device),) * 3
        ours = flops_of(F.scaled_dot_product_attention, *args)
        assert (ours.total, ours.by_op) == flop_counter_mode(F.scaled_dot_product_attention, *args)


def test_flop_counting_takes_no_gradients():
    model = build_model(TINY)
    x = ids(TINY, 1, 3)
    assert forward_flops_measured(model, x) == flops_of(lambda: model(x))
    assert all(p.grad is None for p in model.parameters())


# --- rows -----------------------------------------------------------------------------------

def _own_row_count(model, fn):
    """Rows through every k_proj and v_proj, counted by hooks written here, not kvref's."""
    rows = {"k": 0, "v": 0}
    handles = [mod.register_forward_hook(lambda m, i, o, key=name[-6]: rows.__setitem__(key, rows[key] + o.shape[0] * o.shape[1]))
               for name, mod in model.named_modules() if name.endswith(("k_proj", "v_proj"))]
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return rows


@given(cfg=CONFIGS, batch=BATCHES, p=st.integers(1, 5), n=st.integers(1, 4), use_cache=st.booleans())
def test_kv_rows_of_generation_agree_with_independent_hooks(cfg, batch, p, n, use_cache):
    model, prompt = build_model(cfg), ids(cfg, batch, p)
    counted = kv_rows_of_generation(model, prompt, n, use_cache)
    own = _own_row_count(model, lambda: model.generate(prompt, n, use_cache=use_cache))
    assert (counted.k_rows, counted.v_rows) == (own["k"], own["v"])


@given(cfg=CONFIGS, batch=BATCHES, p=st.integers(1, 5), n=st.integers(1, 5))
def test_kv_rows_per_forward_split_the_generation_into_its_passes(cfg, batch, p, n):
    model, prompt = build_model(cfg), ids(cfg, batch, p)
    for use_cache in (False, True):
        steps = kv_rows_per_forward(model, prompt, n, use_cache)
        assert len(steps) == n
        assert sum(s.total for s in steps) == kv_rows_of_generation(model, prompt, n, use_cache).total
        fed = [p] + [1 if use_cache else p + i for i in range(1, n)]
        assert [s.k_rows for s in steps] == [cfg.n_layers * batch * f for f in fed]


# --- bytes ----------------------------------------------------------------------------------

@given(cfg=CONFIGS, batch=BATCHES, length=st.integers(1, 6), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_cache_nbytes_is_numel_times_element_size_of_every_k_and_v(cfg, batch, length, dtype):
    model = build_model(cfg, dtype=dtype)
    for kind in ("growing", "static"):
        caches = model.new_caches(kind, batch, length + 2)
        with torch.no_grad():
            model.prefill(ids(cfg, batch, length), caches)
        tensors = [t for c in caches for t in (c.k, c.v)]
        assert cache_nbytes(caches) == sum(t.numel() * t.element_size() for t in tensors)


def test_cache_nbytes_skips_an_empty_cache_and_rejects_a_non_tensor():
    assert cache_nbytes([GrowingKVCache(), GrowingKVCache()]) == 0
    bad = GrowingKVCache()
    bad.k = [1, 2]
    with pytest.raises(TypeError, match=r"caches\[0\]\.k"):
        cache_nbytes([bad])


@given(cfg=CONFIGS, batch=BATCHES, length=st.integers(1, 9), dtype=kv_dtypes)
def test_a_meta_cache_measures_the_bytes_of_a_real_allocation(cfg, batch, length, dtype):
    real = [StaticKVCache(batch, cfg.n_kv_heads, length, cfg.head_dim, dtype) for _ in range(cfg.n_layers)]
    assert kv_cache_bytes_measured(cfg, batch, length, dtype) == cache_nbytes(real)
    assert kv_bytes_per_token_measured(cfg, dtype) * length * batch == cache_nbytes(real)


@pytest.mark.parametrize("name,per_token", [("llama-2-7b", 524_288), ("llama-2-70b", 327_680), ("llama-3-8b", 131_072),
                                            ("mistral-7b", 131_072), ("gpt-3-175b", 4_718_592)])
def test_kv_bytes_per_token_of_presets_match_the_facts_table(name, per_token):
    # CARDS.md, "Facts to build on": bf16 bytes per token.
    assert kv_bytes_per_token_measured(preset(name), torch.bfloat16) == per_token


def test_mla_presets_have_no_kvref_cache_to_measure():
    with pytest.raises(ValueError, match="MLA"):
        kv_bytes_per_token_measured(preset("deepseek-v2"), torch.bfloat16)


@pytest.mark.parametrize("name", [n for n, c in PRESETS.items() if not c.is_mla])
def test_weight_bytes_read_are_every_parameter_but_the_embedding_and_the_norms(name):
    model = meta_model(PRESETS[name], torch.bfloat16)
    everything = sum(p.nbytes for p in model.parameters())
    norms = sum(p.nbytes for n, p in model.named_parameters() if n.endswith("norm.weight"))
    # A tied lm_head is the embedding matrix: read once, as lm_head.
    embedding = 0 if PRESETS[name].tie_embeddings else model.embed_tokens.weight.nbytes
    assert weight_bytes_read(model) == everything - embedding - norms
    assert weight_nbytes(model) == everything


def test_a_meta_model_has_the_real_shapes_and_no_storage():
    model = meta_model(preset("llama-2-70b"))
    assert all(p.device.type == "meta" for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == preset("llama-2-70b").n_params


def test_a_shape_only_cache_returns_the_claimed_length_and_advances():
    cache = ShapeOnlyCache(7)
    k = torch.empty(2, 3, 1, 4, device="meta")
    k_all, v_all = cache.update(torch.tensor([7]), k, k)
    assert k_all.shape == v_all.shape == (2, 3, 8, 4) and cache.seq_len == 8


def test_bad_arguments_are_named():
    model = build_model(TINY)
    with pytest.raises(ValueError, match="n_new"):
        kv_rows_of_generation(model, ids(TINY, 1, 2), 0)
    with pytest.raises(TypeError, match="Transformer"):
        generation_flops_measured(nn.Linear(2, 2), ids(TINY, 1, 2), 1)
    with pytest.raises(ValueError, match="n_cached"):
        step_flops_measured(TINY, 1, 1, -1)
    with pytest.raises(ValueError, match="device"):
        step_flops_measured(TINY, 1, 1, 0, device="cuda")
    with pytest.raises(ValueError, match="seq_len"):
        kv_cache_bytes_measured(TINY, 1, 0, torch.float32)
    with pytest.raises(ValueError, match="device must be 'meta' or 'cpu'"):
        kv_recompute_flops_measured(TINY, 2, device="cuda")


@pytest.mark.parametrize("call, error, match", [
    (lambda: kv_rows_of_generation(build_model(TINY), ids(TINY, 1, 2).float(), 1), TypeError,
     r"prompt must hold integer token ids, got dtype torch.float32"),
    (lambda: generation_flops_measured(build_model(TINY), ids(TINY, 1, 2) > 0, 1), TypeError,
     r"prompt must hold integer token ids, got dtype torch.bool"),
    (lambda: step_flops_measured({"n_layers": 1}, 1, 1, 0), TypeError,
     r"cfg must be a kvref.config.ModelConfig, got dict"),
    (lambda: kv_recompute_flops_measured("llama-2-7b", 4), TypeError,
     r"cfg must be a kvref.config.ModelConfig, got str"),
    (lambda: flops_of(torch.zeros(2)), TypeError, r"fn must be callable, got Tensor"),
])
def test_a_wrong_kind_of_argument_is_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_a_remembered_count_is_the_callers_own_copy():
    first = step_flops_measured(TINY, 1, 2, 1, device="cpu")
    first.by_op.clear()  # a caller's edit must not reach the next caller
    again = step_flops_measured(TINY, 1, 2, 1, device="cpu")
    assert again.by_op and sum(again.by_op.values()) == again.total
    rebuild = kv_recompute_flops_measured(TINY, 3, device="cpu")
    rebuild.by_op["aten.mm"] = -1
    assert kv_recompute_flops_measured(TINY, 3, device="cpu").by_op["aten.mm"] > 0


# --- the elementwise instrument (kvref.opcount) -------------------------------------------------

def test_the_elementwise_counter_counts_in_place_and_reflected_arithmetic_as_the_plain_ops():
    from kvref.opcount import ElementwiseOps

    x, y = torch.rand(3, 5), torch.rand(3, 5)
    with ElementwiseOps() as plain:
        z = x * y + x - y / 2
        1 - z
    with ElementwiseOps() as in_place:
        z = x.clone()
        z *= y  # aten.mul_: another packet than aten.mul
        z += x
        z -= y / 2
        1 - z  # aten.rsub
    assert plain.by_op == in_place.by_op == {"mul": 15, "add": 15, "div": 15, "sub": 30}
    with ElementwiseOps() as fused:
        torch.addcmul(x, x, y)  # x + x * y: a multiply and an add per element
    assert fused.by_op == {"mul": 15, "add": 15} and fused.flops == 30


def test_the_rope_decode_count_names_a_prompt_that_is_not_b_by_t():
    from kvref.opcount import rope_flops_of_decode

    with pytest.raises(ValueError, match=r"prompt must be a tensor of token ids \[B, T\]"):
        rope_flops_of_decode(build_model(TINY), ids(TINY, 1, 3)[0])
