"""card01: the computational redundancy problem.

Every count is checked against what kvref measures on a real run, never against a second
copy of the formula: K/V projection rows counted by forward hooks on the projections
(kvref.model.count_kv_rows, through kvref.measure) and FLOPs counted by PyTorch's
FlopCounterMode formulas (kvref.opcount.MatmulFlops applies them op by op as the model runs;
checks/test_kvref_measure.py proves it counts what FlopCounterMode counts). The draws include
several layers, batches above one and fewer KV heads than query heads, so forgetting V, a layer, a
sequence or the GQA ratio changes the number. One worked number, Llama-2-70B's, is too big to run:
it is compared with kvref.roofline's count, which the maintainers' checks prove equal to the
measurement on the meta device (shapes without storage).
"""

import functools
from contextlib import contextmanager

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import kvkata
from kvkata.check import Shown, call_str, expect, expect_equal, expect_real, plural
from kvref.config import ModelConfig, preset
from kvref.measure import (flops_of, forward_flops_measured, generation_flops_measured, kv_rows_of_generation,
                           kv_rows_per_forward)
from kvref.model import build_model
from kvref.roofline import active_matmul_params
from kvref.roofline import forward_flops as roofline_forward_flops
from kvref.strategies import gqa_model_configs, model_configs

impl = kvkata.load("card01_redundancy.redundancy")

CONFIGS = st.one_of(model_configs(), gqa_model_configs())
PROMPT_LENS = st.integers(1, 6)
NEW_TOKENS = st.integers(1, 5)
BATCHES = st.integers(1, 3)
# Two layers, 4 query heads over 2 KV heads: every memorised shortcut shows here.
GQA = ModelConfig(vocab_size=64, n_layers=2, d_model=16, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=32)
# The cheapest model kvref can build, for a 1000-token prompt run for real.
TINY = ModelConfig(vocab_size=8, n_layers=1, d_model=4, n_heads=1, head_dim=2, d_ff=4, max_seq_len=2048)


def shown(cfg) -> Shown:
    """A config shown by its fields in failure messages (call_str would only name its type)."""
    return Shown(f"ModelConfig(L={cfg.n_layers}, H={cfg.n_heads}, Hkv={cfg.n_kv_heads}, D={cfg.head_dim}, "
                 f"d_model={cfg.d_model}, d_ff={cfg.d_ff}, V={cfg.vocab_size})")


def prompt_ids(cfg, batch, length, seed=0):
    return torch.randint(0, cfg.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def split(measured) -> str:
    return (f"FlopCounterMode's formulas counted {measured.total:,} = {measured.projections:,} in the nn.Linear matmuls "
            f"+ {measured.attention:,} in the attention matmuls")


@contextmanager
def one_thread():
    # A toy model over ~1000x1000 scores: on a busy machine torch's intra-op threads spin
    # against each other and the run takes ten times longer than on one thread.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# Deep runs cap the FlopCounterMode tests: each example runs a whole model under the counter, and
# 500 of them pass the 20 s kata timeout (HYPOTHESIS_PROFILE=deep, seed 1, 2026-12-04).
MEASURED = settings(max_examples=min(settings().max_examples, 80))
# The tests that run the model under hooks: 500 examples took 8 to 15 s on 2 busy cores.
HOOKED = settings(max_examples=min(settings().max_examples, 200))


@functools.cache
def rows_of_a_100_token_answer_to_1000(use_cache: bool) -> int:
    """K rows of one layer, batch 1, for a 1000-token prompt and a 100-token answer, run for real."""
    prompt = torch.zeros(1, 1000, dtype=torch.long)
    with one_thread():
        return kv_rows_of_generation(build_model(TINY), prompt, 100, use_cache).k_rows


# --- token passes and projection rows ------------------------------------------------------

@HOOKED
@pytest.mark.kata("token_passes")
@given(cfg=CONFIGS, batch=BATCHES, p=PROMPT_LENS, n=NEW_TOKENS, use_cache=st.booleans())
@example(cfg=GQA, batch=2, p=3, n=4, use_cache=False)
@example(cfg=GQA, batch=2, p=3, n=4, use_cache=True)
@example(cfg=GQA, batch=1, p=1, n=1, use_cache=False)  # one new token: one pass, nothing fed back
@example(cfg=GQA, batch=1, p=1, n=1, use_cache=True)  # with a cache too: the prefill alone
def test_token_passes_match_the_rows_hooks_count_per_layer_and_sequence(cfg, batch, p, n, use_cache):
    got = impl.token_passes(p, n, use_cache)
    counted = kv_rows_of_generation(build_model(cfg), prompt_ids(cfg, batch, p), n, use_cache)
    per = counted.k_rows // (cfg.n_layers * batch)
    expect_equal(call_str("token_passes", p, n, use_cache), got, per,
                 f"K rows the hooks counted while generate() made {plural(n, 'token')} after a {p}-token prompt "
                 f"{'with' if use_cache else 'without'} a cache, per layer and per sequence")


@pytest.mark.kata("token_passes")
def test_token_passes_for_a_1000_token_prompt_and_a_100_token_answer():
    """A widely shared interview answer says this costs about 55,000 attention computations without a
    cache and 100 with one, a 550x saving. Run it: the hooks count every projected token."""
    got = {use_cache: impl.token_passes(1000, 100, use_cache) for use_cache in (False, True)}
    for use_cache in (False, True):
        expect_equal(call_str("token_passes", 1000, 100, use_cache), got[use_cache],
                     rows_of_a_100_token_answer_to_1000(use_cache),
                     f"K rows counted by hooks on a real generation {'with' if use_cache else 'without'} a cache "
                     "(one layer, one sequence); not the 55,000 and 100 of the widely shared answer")


@HOOKED
@pytest.mark.kata("kv_projection_rows")
@given(cfg=CONFIGS, batch=BATCHES, p=PROMPT_LENS, n=NEW_TOKENS, use_cache=st.booleans())
@example(cfg=GQA, batch=3, p=2, n=3, use_cache=False)
@example(cfg=GQA, batch=2, p=4, n=2, use_cache=True)
def test_kv_projection_rows_count_k_and_v_in_every_layer_and_sequence(cfg, batch, p, n, use_cache):
    got = impl.kv_projection_rows(cfg, batch, p, n, use_cache)
    counted = kv_rows_of_generation(build_model(cfg), prompt_ids(cfg, batch, p), n, use_cache)
    expect_equal(call_str("kv_projection_rows", shown(cfg), batch, p, n, use_cache), got, counted.total,
                 f"{counted.k_rows} K rows + {counted.v_rows} V rows counted by hooks over "
                 f"{plural(cfg.n_layers, 'layer')} and {plural(batch, 'sequence')}")


# --- the redundant fraction ------------------------------------------------------------------

@HOOKED
@pytest.mark.kata("redundant_fraction")
@given(cfg=CONFIGS, batch=BATCHES, p=PROMPT_LENS, n=st.integers(1, 6))
@example(cfg=GQA, batch=2, p=1, n=6)
# With a one-token prompt, step / (P + step) and 1 - 1/(P + step) are right at every pass; with
# four they are wrong at pass 1 and at pass 0.
@example(cfg=GQA, batch=1, p=4, n=3)
def test_redundant_fraction_is_what_a_cache_saves_at_each_pass(cfg, batch, p, n):
    got = [impl.redundant_fraction(p, step) for step in range(n)]
    model, prompt = build_model(cfg), prompt_ids(cfg, batch, p)
    uncached = kv_rows_per_forward(model, prompt, n, use_cache=False)
    cached = kv_rows_per_forward(model, prompt, n, use_cache=True)
    for step, (g, u, c) in enumerate(zip(got, uncached, cached)):
        want = 1 - c.k_rows / u.k_rows
        expect_real(call_str("redundant_fraction", p, step), g, want, rel=1e-12, abs=1e-12,
                    why=f"pass {step} projected {u.k_rows} K rows without a cache and {c.k_rows} with one "
                        f"(counted by hooks, {plural(cfg.n_layers, 'layer')} x {plural(batch, 'sequence')})")


@pytest.mark.kata("redundant_fraction")
def test_redundant_fraction_is_a_float_at_every_pass_the_prompts_included():
    """Pass 0 (the prompt's) has nothing redundant: 0.0, a float like every other pass's answer, not the int 0."""
    got = [impl.redundant_fraction(4, step) for step in range(3)]
    model, prompt = build_model(GQA), prompt_ids(GQA, 1, 4)
    uncached = kv_rows_per_forward(model, prompt, 3, use_cache=False)
    cached = kv_rows_per_forward(model, prompt, 3, use_cache=True)
    for step, (g, u, c) in enumerate(zip(got, uncached, cached)):
        call = call_str("redundant_fraction", 4, step)
        expect_real(call, g, 1 - c.k_rows / u.k_rows, rel=1e-12, abs=1e-12,
                    why=f"pass {step} projected {u.k_rows} K rows without a cache and {c.k_rows} with one")
        expect(isinstance(g, float), call, g, "a Python float, as the docstring asks (0.0 at pass 0, not the int 0)")


# --- FLOPs ---------------------------------------------------------------------------------------

@MEASURED
@pytest.mark.kata("forward_flops")
@given(cfg=CONFIGS, batch=BATCHES, n_cached=st.integers(0, 5), n_new=st.integers(1, 4))
@example(cfg=GQA, batch=2, n_cached=0, n_new=4)  # a prefill
@example(cfg=GQA, batch=2, n_cached=4, n_new=1)  # a cached decode step
@example(cfg=GQA, batch=3, n_cached=3, n_new=2)  # a chunk after a cached prefix
def test_forward_flops_match_flop_counter_mode_on_a_real_forward_pass(cfg, batch, n_cached, n_new):
    got = impl.forward_flops(cfg, batch, n_new, n_cached)
    model = build_model(cfg)
    ids = prompt_ids(cfg, batch, n_cached + n_new)
    caches = model.new_caches("growing")
    with torch.no_grad():
        if n_cached:
            model(ids[:, :n_cached], torch.arange(n_cached), caches)
        measured = forward_flops_measured(model, ids[:, n_cached:], torch.arange(n_cached, n_cached + n_new), caches)
    expect_equal(call_str("forward_flops", shown(cfg), batch, n_new, n_cached), got, measured.total, split(measured))


@pytest.mark.kata("forward_flops")
def test_forward_flops_of_one_llama_2_70b_token_after_4095_cached():
    """The real shapes: 80 layers, 64 query heads over 8 KV heads, 4,096 keys.

    The count is kvref.roofline's, which checks/test_kvref_roofline.py proves equal to what
    FlopCounterMode's formulas count on kvref's model of these shapes on the meta device. The
    drawn configs above are measured here, on a real run; measuring 70B on the meta device here
    would add about 1.3 s to every run of this card (its meta kernels import torch._dynamo).
    """
    cfg = preset("llama-2-70b")
    got = impl.forward_flops(cfg, 1, 1, 4095)
    want = roofline_forward_flops(cfg, 1, 1, 4095)
    weights = active_matmul_params(cfg)
    expect_equal("forward_flops(llama-2-70b, 1, 1, 4095)", got, want,
                 f"{want:,} = 2 x {weights:,} weights of the nn.Linear layers (lm_head included) + "
                 f"{want - 2 * weights:,} in the attention matmuls, over 4,096 keys in each of 80 layers")


@MEASURED
@pytest.mark.kata("generation_flops")
@given(cfg=CONFIGS, batch=BATCHES, p=PROMPT_LENS, n=NEW_TOKENS, use_cache=st.booleans())
@example(cfg=GQA, batch=2, p=3, n=4, use_cache=False)
@example(cfg=GQA, batch=2, p=3, n=4, use_cache=True)
def test_generation_flops_match_flop_counter_mode_over_a_whole_generation(cfg, batch, p, n, use_cache):
    got = impl.generation_flops(cfg, batch, p, n, use_cache)
    measured = generation_flops_measured(build_model(cfg), prompt_ids(cfg, batch, p), n, use_cache)
    expect_equal(call_str("generation_flops", shown(cfg), batch, p, n, use_cache), got, measured.total,
                 f"{split(measured)}, over generate()'s {n} forward passes")


@MEASURED
@pytest.mark.kata("generation_flops")
@given(cfg=CONFIGS, batch=BATCHES, p=PROMPT_LENS, n=st.integers(3, 6))
@example(cfg=GQA, batch=2, p=2, n=5)
def test_a_cached_step_still_costs_more_as_the_sequence_grows(cfg, batch, p, n):
    got = [impl.generation_flops(cfg, batch, p, k, True) for k in range(1, n + 1)]
    model = build_model(cfg)
    caches = model.new_caches("growing")
    with torch.no_grad():
        model.prefill(prompt_ids(cfg, batch, p), caches)
        # The token fed does not change the FLOPs; the cache length does.
        measured = [flops_of(model.decode_step, torch.zeros(batch, 1, dtype=torch.long), caches) for _ in range(1, n)]
    for k, m in enumerate(measured, start=1):
        extra = got[k] - got[k - 1]
        expect_equal(f"generation_flops(..., {k + 1}, True) - generation_flops(..., {k}, True)", extra, m.total,
                     f"the FLOPs of cached pass {k}, over {p + k} keys: {split(m)}; the scores grow with "
                     "the sequence even with a cache")
