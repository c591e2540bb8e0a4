"""The formula rule refuses measuring, and only measuring (kvkata/formula.py).

In-process: each check wraps a function in `formula.guarded` for a formula kata, calls it, and
compares with the worked solution (a correct alternative must pass) or reads the refusal (a
measuring one must be refused, the message naming the call).
"""

from __future__ import annotations

import importlib
import math
import sys

import numpy as np
import pytest
import torch

import kvref.measure
import kvref.paging
import kvref.roofline
from kvkata import formula, manifest
from kvkata.formula import FormulaOnly
from kvref.config import PRESETS, ModelConfig
from kvref.hardware import H100_SXM, H200
from kvref.model import build_model

SMALL = ModelConfig(vocab_size=64, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64)
WINDOWED = ModelConfig(vocab_size=64, n_layers=3, d_model=32, n_heads=4, n_kv_heads=1, d_ff=48, max_seq_len=64,
                       sliding_window=5)
CONFIGS = [SMALL, WINDOWED, PRESETS["llama-2-7b"], PRESETS["llama-2-70b"], PRESETS["llama-3-8b"]]
DTYPES = [torch.bfloat16, torch.float32, torch.float8_e4m3fn]


def kata(name: str) -> manifest.Kata:
    found = next(k for k in manifest.all_katas() if k.name == name)
    assert found.formula, f"{name} is no longer a formula kata: update this check"
    return found


def solution(name: str):
    k = kata(name)
    return getattr(importlib.import_module(f"solutions.{k.dir}.{k.module}"), name)


def refusal(name: str, fn, *args) -> str:
    with pytest.raises(FormulaOnly) as caught:
        formula.guarded(kata(name), fn)(*args)
    message = str(caught.value)
    k = kata(name)
    assert message.startswith(f"{k.card} {k.name} asks for a closed form"), message
    assert "Allowed: arithmetic on the arguments" in message, message  # says what is allowed
    return message


# --- correct implementations pass ----------------------------------------------------------------

def low_rank_key_error_by_vector_norm(singular_values, rank):
    return torch.linalg.vector_norm(torch.tensor(singular_values[rank:], dtype=torch.float64)).item()


def low_rank_key_error_by_svdvals(singular_values, rank):
    # A diagonal matrix with those singular values, its dropped part's Frobenius norm, in numpy
    dropped = np.diag(np.asarray(singular_values[rank:], dtype=np.float64))
    return float(np.linalg.norm(torch.linalg.svdvals(torch.from_numpy(dropped)).numpy()))


def low_rank_key_error_by_masking_the_kept_values(singular_values, rank):
    # zeros_like copies the shape of a tensor made from the values: it writes no shape out
    values = torch.tensor(singular_values, dtype=torch.float64)
    dropped = torch.where(torch.arange(len(singular_values)) >= rank, values, torch.zeros_like(values))
    return torch.linalg.vector_norm(dropped).item()


@pytest.mark.parametrize("alternative", [low_rank_key_error_by_vector_norm, low_rank_key_error_by_svdvals,
                                         low_rank_key_error_by_masking_the_kept_values])
def test_a_norm_of_the_dropped_singular_values_taken_in_torch_or_numpy_passes(alternative):
    want = solution("low_rank_key_error")
    guarded = formula.guarded(kata("low_rank_key_error"), alternative)
    for values in ([4.0, 3.0], [10.0, 5.0, 2.5, 1e-3], [7.0]):
        for rank in range(len(values) + 2):
            assert guarded(values, rank) == pytest.approx(want(values, rank), rel=1e-12, abs=1e-12), (values, rank)


def paged_waste_bytes_off_a_meta_tensor(cfg, lengths, block_size, dtype):
    unused = sum(-n % block_size for n in lengths)
    slot = torch.empty(2, cfg.n_layers, cfg.n_kv_heads, unused, cfg.head_dim, dtype=dtype, device="meta")
    return slot.nbytes


def pipeline_bytes_sent_per_step_off_a_meta_tensor(cfg, batch, dtype):
    hidden = torch.empty(batch, 1, cfg.d_model, dtype=dtype, device="meta")  # (B, 1, d): the new token's activations
    return hidden.element_size() * hidden.numel()


def linear_state_bytes_sized_on_meta(cfg, batch, dtype):
    with torch.device("meta"):
        S = torch.empty(cfg.n_layers, batch, cfg.n_kv_heads, cfg.head_dim, cfg.head_dim, dtype=dtype)
        z = torch.zeros(cfg.n_layers, batch, cfg.n_kv_heads, cfg.head_dim, dtype=dtype)
    return S.nbytes + z.nbytes


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name or ("windowed" if c.sliding_window else "small"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bytes_read_off_a_meta_tensor_whose_shape_the_learner_wrote_pass(cfg, dtype):
    cases = [
        ("paged_waste_bytes", paged_waste_bytes_off_a_meta_tensor,
         [(cfg, [1, 16, 17, 70], 16, dtype), (cfg, [5], 8, dtype)]),
        ("pipeline_bytes_sent_per_step", pipeline_bytes_sent_per_step_off_a_meta_tensor,
         [(cfg, 1, dtype), (cfg, 7, dtype)]),
        ("linear_state_bytes", linear_state_bytes_sized_on_meta, [(cfg, 1, dtype), (cfg, 3, dtype)]),
    ]
    for name, alternative, calls in cases:
        for args in calls:
            assert formula.guarded(kata(name), alternative)(*args) == solution(name)(*args), (name, args)


def dollars_per_million_tokens_from_the_card02_kata(cfg, hw, batch, seq_len, dtype, dollars_per_device_hour):
    # The learner's own card02 kata (solved: the solution stands in), as card11's docstring suggests
    from solutions.card02_memory_vs_compute.costs import roofline_step_time
    step = roofline_step_time(cfg, hw, batch, seq_len, dtype, use_cache=True)
    return dollars_per_device_hour * hw.n_devices / 3600 * step / batch * 1e6


@pytest.mark.parametrize("cfg", [SMALL, WINDOWED, PRESETS["llama-2-70b"], PRESETS["mistral-7b"]],
                         ids=lambda c: c.name or ("windowed" if c.sliding_window else "small"))
def test_calling_the_card02_roofline_kata_from_card11_passes(cfg):
    want = solution("dollars_per_million_tokens")
    guarded = formula.guarded(kata("dollars_per_million_tokens"), dollars_per_million_tokens_from_the_card02_kata)
    for hw, batch, seq_len in [(H100_SXM.tensor_parallel(2), 3, 7), (H200, 64, 4095), (H100_SXM, 1, 1)]:
        args = (cfg, hw, batch, seq_len, torch.bfloat16, 2.5)
        assert guarded(*args) == pytest.approx(want(*args), rel=1e-12), args


def test_a_guarded_kata_calling_another_guarded_kata_passes_and_leaves_no_guard_behind(monkeypatch):
    import kvkata

    monkeypatch.setattr(kvkata, "_mode", "solutions")
    costs = kvkata.load("card02_memory_vs_compute.costs")  # formula katas come back guarded

    def via_load(cfg, hw, batch, seq_len, dtype, price):
        return price * hw.n_devices / 3600 * costs.roofline_step_time(cfg, hw, batch, seq_len, dtype, True) / batch * 1e6

    args = (SMALL, H100_SXM, 2, 9, torch.bfloat16, 1.0)
    previous = sys.getprofile()
    assert formula.guarded(kata("dollars_per_million_tokens"), via_load)(*args) == \
        pytest.approx(solution("dollars_per_million_tokens")(*args), rel=1e-12)
    assert sys.getprofile() is previous
    assert torch._C._len_torch_function_stack() == 0
    torch.zeros(2)  # outside the guard, allocating is fine again


# --- measuring is refused, naming the call -------------------------------------------------------

def kv_projection_rows_by_hooks_on_kvref_model(cfg, batch, prompt_len, n_new, use_cache):
    model = build_model(SMALL)  # imported at the top, as a kata module would
    rows = []
    for block in model.layers:
        block.self_attn.k_proj.register_forward_hook(lambda m, i, o: rows.append(o.shape[0] * o.shape[1]))
    model(torch.tensor([[0] * prompt_len] * batch))
    return sum(rows)


def test_building_kvref_model_to_count_rows_with_hooks_is_refused(monkeypatch):
    message = refusal("kv_projection_rows", kv_projection_rows_by_hooks_on_kvref_model, SMALL, 1, 3, 2, True)
    assert "called build_model in kvref/model.py" in message, message

    def importing(cfg, batch, prompt_len, n_new, use_cache):
        from kvref.measure import kv_rows_per_forward  # first imported here, under the guard
        return kv_rows_per_forward

    import kvref
    monkeypatch.delitem(sys.modules, "kvref.measure", raising=False)  # restored after the test
    monkeypatch.delattr(kvref, "measure", raising=False)
    message = refusal("kv_projection_rows", importing, SMALL, 1, 3, 2, True)
    assert "imported kvref/measure.py" in message, message


def test_running_a_model_built_outside_the_kata_is_refused():
    model = build_model(SMALL)  # built at import time, say: only the run happens under the guard

    def run(cfg, batch, prompt_len, n_new, use_cache):
        return model(torch.tensor([[0] * prompt_len] * batch)).shape[1]  # ids from values: allowed

    message = refusal("kv_projection_rows", run, SMALL, 1, 3, 2, True)
    assert "ran the torch.nn module Transformer" in message, message


def test_a_hook_on_a_meta_module_is_refused():
    def hooked(cfg, batch, n_new, n_cached):
        layer = torch.nn.Linear(cfg.d_model, cfg.d_model, device="meta")  # a shape: allowed
        layer.register_forward_hook(lambda *a: None)
        return 0

    message = refusal("forward_flops", hooked, SMALL, 1, 1, 0)
    assert "registered a hook (register_forward_hook)" in message, message


def forward_flops_by_flop_counter(cfg, batch, n_new, n_cached):
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.empty(batch, n_new, cfg.d_model, device="meta")
    w = torch.empty(cfg.d_model, cfg.d_model, device="meta")
    with FlopCounterMode(display=False) as counter:
        x @ w
    return counter.get_total_flops()


def test_flop_counter_mode_is_refused_even_on_meta_tensors():
    message = refusal("forward_flops", forward_flops_by_flop_counter, SMALL, 1, 1, 0)
    assert "used FlopCounterMode" in message, message


def forward_flops_by_a_torch_function_mode(cfg, batch, n_new, n_cached):
    from torch.overrides import TorchFunctionMode

    class CountMatmuls(TorchFunctionMode):  # sees every torch call, as FlopCounterMode sees every aten op
        def __init__(self):
            super().__init__()
            self.flops = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.matmul:
                self.flops += 2 * args[0].numel() * args[1].shape[-1]
            return out

    x = torch.empty(batch, n_new, cfg.d_model, device="meta")
    with CountMatmuls() as counter:
        torch.matmul(x, torch.empty(cfg.d_model, cfg.d_model, device="meta"))
    return counter.flops


def test_a_torch_function_mode_of_its_own_is_refused_as_an_instrument():
    message = refusal("forward_flops", forward_flops_by_a_torch_function_mode, SMALL, 1, 1, 0)
    assert "entered a TorchFunctionMode" in message, message


def forward_flops_by_the_cached_instrument(cfg, batch, n_new, n_cached):
    return kvref.measure.step_flops_measured(cfg, batch, n_new, n_cached, device="cpu").total


def paged_waste_bytes_by_the_cached_block_size(cfg, lengths, block_size, dtype):
    per_block = kvref.paging.block_nbytes_measured(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, block_size, dtype)
    return per_block * sum(-n % block_size for n in lengths) // block_size


@pytest.mark.parametrize("name, fn, args, called", [
    ("forward_flops", forward_flops_by_the_cached_instrument, (SMALL, 1, 2, 3),
     "called step_flops_measured in kvref/measure.py"),
    ("paged_waste_bytes", paged_waste_bytes_by_the_cached_block_size, (SMALL, [3, 17], 16, torch.float16),
     "called block_nbytes_measured in kvref/paging.py"),
])
def test_a_kvref_instrument_is_refused_when_its_answer_is_already_cached(name, fn, args, called):
    fn(*args)  # measured once outside the guard, as a test computing its expected value would
    message = refusal(name, fn, *args)
    assert called in message, message


def test_no_kvref_function_is_a_cache_the_guard_cannot_see_called():
    # A functools cache hit runs no Python code: sys.setprofile sees no call into kvref at all.
    import functools
    import pkgutil

    hidden = []
    for info in pkgutil.iter_modules(kvref.__path__):
        module = importlib.import_module(f"kvref.{info.name}")
        for name, value in vars(module).items():
            if not name.startswith("_") and isinstance(value, functools._lru_cache_wrapper) \
                    and value.__module__ == module.__name__:
                hidden.append(f"kvref.{info.name}.{name}")
    assert not hidden, f"cache these behind a public Python function (as kvref.measure does): {hidden}"


@pytest.mark.parametrize("name, fn, args, called", [
    ("kv_cache_bytes", lambda cfg, b, t, dtype: kvref.roofline.memory_needed(cfg, b, t, 2),
     (SMALL, 1, 8, torch.bfloat16), "called memory_needed in kvref/roofline.py"),
    ("roofline_step_time", lambda cfg, hw, b, t, dtype, c: kvref.roofline.decode_time(cfg, hw, b, t, dtype, c),
     (SMALL, H100_SXM, 1, 8, torch.bfloat16, True), "called decode_time in kvref/roofline.py"),
    ("paged_slot_waste", lambda lengths, bs: kvref.paging.paged_waste_measured(lengths, bs)[0],
     ([3, 17], 16), "called paged_waste_measured in kvref/paging.py"),
    ("blocks_for_tokens", lambda n, bs: len(kvref.paging.BlockAllocator(64, bs).allocate(0, n)),
     (70, 16), "called __init__ in kvref/paging.py (BlockAllocator.__init__)"),
    ("kv_cache_bytes", lambda cfg, b, t, dtype: kvref.measure.kv_cache_bytes_measured(cfg, b, t, dtype),
     (SMALL, 1, 8, torch.bfloat16), "called kv_cache_bytes_measured in kvref/measure.py"),
])
def test_calling_kvrefs_answers_or_instruments_is_refused(name, fn, args, called):
    message = refusal(name, fn, *args)
    assert called in message, message


def kv_cache_bytes_by_allocating_the_cache(cfg, batch, seq_len, dtype):
    cache = torch.zeros(2, cfg.n_layers, batch, cfg.n_kv_heads, seq_len, cfg.head_dim, dtype=dtype)  # the full cache
    return cache.nbytes


@pytest.mark.parametrize("fn, called", [
    (kv_cache_bytes_by_allocating_the_cache, "called torch.zeros on cpu"),
    (lambda cfg, b, t, dtype: b * t * torch.randn(2, cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, dtype=dtype).nbytes,
     "called torch.randn on cpu"),
    (lambda cfg, b, t, dtype: torch.tensor([1.0], dtype=dtype).new_empty(2, cfg.n_layers, b, t, cfg.head_dim).nbytes,
     "called Tensor.new_empty on cpu"),
    (lambda cfg, b, t, dtype: np.zeros((2, cfg.n_layers, b, t, cfg.n_kv_heads * cfg.head_dim), dtype=np.float16).nbytes,
     "called numpy.zeros"),
    (lambda cfg, b, t, dtype: np.ones((2, cfg.n_layers, b, t, cfg.n_kv_heads * cfg.head_dim), dtype=np.float16).nbytes,
     "called numpy.ones"),
    (lambda cfg, b, t, dtype: torch.empty_permuted((2, cfg.n_layers, b, t, cfg.n_kv_heads * cfg.head_dim),
                                                   (0, 1, 2, 3, 4), dtype=dtype).nbytes,
     "called torch.empty_permuted on cpu"),
    (lambda cfg, b, t, dtype: torch.zeros_like(torch.empty(2, cfg.n_layers, b, t, cfg.n_kv_heads * cfg.head_dim,
                                                           dtype=dtype, device="meta"), device="cpu").nbytes,
     "called torch.zeros_like on cpu"),  # a shape written out on meta, then allocated for real
])
def test_allocating_a_real_cache_to_read_its_bytes_is_refused(fn, called):
    message = refusal("kv_cache_bytes", fn, SMALL, 2, 8, torch.float16)
    assert called in message, message


def test_a_refusal_the_kata_catches_is_still_refused():
    def swallowing(cfg, batch, seq_len, dtype):
        try:
            return kv_cache_bytes_by_allocating_the_cache(cfg, batch, seq_len, dtype)
        except Exception:  # noqa: BLE001 - what a learner might write
            return 2 * cfg.n_layers * batch * seq_len * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize

    message = refusal("kv_cache_bytes", swallowing, SMALL, 2, 8, torch.float16)
    assert "called torch.zeros on cpu" in message, message


def test_arithmetic_on_tensors_made_from_the_arguments_is_allowed():
    def arithmetic(cfg, batch, seq_len, dtype):
        per_token = torch.tensor([2, cfg.n_layers, cfg.n_kv_heads, cfg.head_dim]).prod()
        steps = torch.arange(seq_len).numel()  # values, not a buffer sized to measure
        return int(per_token) * batch * steps * dtype.itemsize + int(math.sqrt(np.sum(np.array([0.0]))))

    args = (SMALL, 3, 11, torch.bfloat16)
    assert formula.guarded(kata("kv_cache_bytes"), arithmetic)(*args) == solution("kv_cache_bytes")(*args)


def paged_waste_bytes_by_element_size(cfg, lengths, block_size, dtype):
    unused = sum(-n % block_size for n in lengths)
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * unused * torch.empty(0, dtype=dtype).element_size()


def paged_waste_bytes_by_a_scalar(cfg, lengths, block_size, dtype):
    per_slot = torch.zeros((), dtype=dtype).nbytes * torch.ones(1, dtype=dtype).element_size() // dtype.itemsize
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * sum(-n % block_size for n in lengths) * per_slot


@pytest.mark.parametrize("alternative", [paged_waste_bytes_by_element_size, paged_waste_bytes_by_a_scalar])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_an_element_size_read_off_a_tensor_of_at_most_one_element_passes(alternative, dtype):
    for args in [(SMALL, [1, 16, 17, 70], 16, dtype), (PRESETS["llama-2-70b"], [5], 8, dtype)]:
        assert formula.guarded(kata("paged_waste_bytes"), alternative)(*args) == solution("paged_waste_bytes")(*args)


def test_two_elements_allocated_from_a_shape_are_refused_again():
    message = refusal("paged_waste_bytes", lambda cfg, lengths, block, dtype: torch.empty(2, dtype=dtype).nbytes // 2
                      * 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * sum(-n % block for n in lengths),
                      SMALL, [3], 4, torch.float16)
    assert "called torch.empty on cpu" in message, message


# --- the rule is stated where the learner reads ----------------------------------------------------

def formula_katas():
    return [k for k in manifest.all_katas() if k.formula]


@pytest.mark.parametrize("package", ["katas", "solutions"])
def test_every_formula_kata_docstring_states_the_rule(package):
    missing = []
    for k in formula_katas():
        doc = getattr(importlib.import_module(f"{package}.{k.dir}.{k.module}"), k.name).__doc__ or ""
        if formula.DOCSTRING_LINE not in " ".join(doc.split()):
            missing.append(k.where(package))
    assert not missing, f"these formula katas do not say {formula.DOCSTRING_LINE!r}: {missing}"


def test_the_rule_for_the_readme_lists_every_formula_kata_by_card():
    text = formula.rule_markdown()
    for k in formula_katas():
        line = next(line for line in text.splitlines() if line.startswith(f"- {k.card} "))
        assert f"`{k.name}`" in line
    assert formula.RULE in text


def test_the_guard_applies_on_the_main_thread_only_and_leaves_it_as_it_was():
    import threading

    results = []
    guarded = formula.guarded(kata("kv_cache_bytes"), kv_cache_bytes_by_allocating_the_cache)
    worker = threading.Thread(target=lambda: results.append(guarded(SMALL, 1, 4, torch.float32)))
    worker.start()
    worker.join()
    assert results == [solution("kv_cache_bytes")(SMALL, 1, 4, torch.float32)]  # unguarded there, as documented
    previous = sys.getprofile()
    with pytest.raises(FormulaOnly):
        guarded(SMALL, 1, 4, torch.float32)
    assert sys.getprofile() is previous and torch._C._len_torch_function_stack() == 0


# --- a kata whose answer no experiment gives may allocate (allocates = true) ---------------------------

def alibi_slopes_filled_into_a_tensor(n_heads):
    slopes = torch.zeros(n_heads, dtype=torch.float64)  # allocated, then filled: arithmetic
    closest = 2 ** math.floor(math.log2(n_heads))
    for h in range(closest):
        slopes[h] = 2.0 ** (-8.0 * (h + 1) / closest)
    extra = [2.0 ** (-4.0 * (2 * i + 1) / closest) for i in range(n_heads - closest)]
    slopes[closest:] = torch.tensor(extra, dtype=torch.float64)
    return slopes.tolist()


def test_a_kata_whose_answer_no_experiment_gives_may_fill_a_real_tensor():
    k = kata("alibi_slopes")
    assert k.allocates
    for n in (1, 2, 6, 8, 12, 32, 40):
        got = formula.guarded(k, alibi_slopes_filled_into_a_tensor)(n)
        assert got == pytest.approx(solution("alibi_slopes")(n), rel=1e-12), n
    # the same allocation in a kata whose answer is a size is still refused
    message = refusal("kv_cache_bytes", lambda cfg, b, t, dtype: torch.zeros(b, t).numel() * 2 * cfg.n_layers
                      * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize, SMALL, 2, 8, torch.float16)
    assert "called torch.zeros on cpu" in message, message


def test_only_katas_whose_answer_is_no_size_may_allocate():
    allowed = {k.name for k in formula_katas() if k.allocates}
    assert allowed == {"key_error_score_bound", "softmax_weight_ratio_bound", "alibi_slopes", "reshard_plan",
                       "prefix_block_keys"}, allowed
    sizes = ("bytes", "waste", "batch", "rows", "passes", "flops", "seconds", "capacity", "blocks")
    assert not [n for n in allowed if any(word in n for word in sizes)], allowed
