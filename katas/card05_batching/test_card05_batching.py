"""card05: the batch size collapse problem.

The maximum batch is checked against `.nbytes` of the caches kvref allocates (StaticKVCache, one
per layer, on the meta device for real presets: shapes and dtypes, no storage). The deeper
model's throughput is checked against kvref's serving simulator: it admits sequences one by one
until its memory accounting refuses the next, and times the step with kvref's roofline. The
continuous-batching step drives kvref's model through `kvref.serving.batched_forward` (one
forward for the whole batch, attention per request) and each request's tokens are compared with
the same model generating for that request alone.
"""

import functools

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import kvkata
from kvkata.check import (PARAMETER_FIELDS, Mismatch, Shown, call_str, describe, describe_config, expect, expect_equal,
                          expect_real, plural)
from kvref.config import PRESETS, ModelConfig, preset
from kvref.hardware import A100_40GB, H100_SXM, H200, HARDWARE
from kvref.measure import cache_nbytes, kv_cache_bytes_measured
from kvref.model import build_model
from kvref.serving import Sequence, batched_forward
from kvref.serving_sim import steady_decode
from kvref.strategies import gqa_model_configs, model_configs

impl = kvkata.load("card05_batching.batching")

GQA = ModelConfig(vocab_size=64, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=32, max_seq_len=64)
# Dense presets without a sliding window: the simulator's roofline step has no window.
THROUGHPUT_PRESETS = [n for n, c in PRESETS.items() if not (c.is_mla or c.is_moe or c.sliding_window)]
DTYPES = st.sampled_from([torch.bfloat16, torch.float16, torch.float32])
GIB = 2**30
# An example that runs kvref's model costs tens of milliseconds: a deep run caps these tests at 80
# examples, so that each stays far under the kata timeout.
MEASURED = settings(max_examples=min(settings().max_examples, 80))


def shown(x) -> Shown:
    return Shown(describe_config(x, *PARAMETER_FIELDS) if isinstance(x, ModelConfig) else describe(x))


# --- the maximum batch ------------------------------------------------------------------------

def check_max_batch(cfg, free_bytes, seq_len, dtype):
    got = impl.max_batch_from_memory(cfg, free_bytes, seq_len, dtype)
    one = kv_cache_bytes_measured(cfg, 1, seq_len, dtype)
    want = free_bytes // one
    if want:  # the measured answer: batch `want` fits, batch want + 1 does not
        assert kv_cache_bytes_measured(cfg, want, seq_len, dtype) <= free_bytes
    assert kv_cache_bytes_measured(cfg, want + 1, seq_len, dtype) > free_bytes
    expect_equal(call_str("max_batch_from_memory", shown(cfg), free_bytes, seq_len, dtype), got, want,
                 f"the largest batch whose kvref StaticKVCache (K and V in each of the {plural(cfg.n_layers, 'layer')}, "
                 f"{plural(cfg.n_kv_heads, 'KV head')} of {cfg.head_dim}, {seq_len} positions, {dtype}) fits: its .nbytes "
                 f"is {one:,} per sequence, so {want} sequences hold {want * one:,} bytes of the {free_bytes:,} free")


@pytest.mark.kata("max_batch_from_memory")
@given(cfg=st.one_of(model_configs(), gqa_model_configs()), seq_len=st.integers(1, 64), dtype=DTYPES,
       batch=st.integers(0, 40), spare=st.floats(0, 0.999))
@example(cfg=GQA, seq_len=10, dtype=torch.float32, batch=3, spare=0.999)
@example(cfg=GQA, seq_len=10, dtype=torch.float32, batch=0, spare=0.5)
def test_max_batch_from_memory_matches_nbytes_of_kvrefs_static_caches(cfg, seq_len, dtype, batch, spare):
    one = kv_cache_bytes_measured(cfg, 1, seq_len, dtype)
    check_max_batch(cfg, batch * one + int(spare * one), seq_len, dtype)


@pytest.mark.kata("max_batch_from_memory")
@given(name=st.sampled_from(sorted(n for n, c in PRESETS.items() if not c.is_mla)), dtype=DTYPES,
       seq_len=st.sampled_from([1, 512, 2048, 4096, 8192]), free_gib=st.integers(1, 140))
@example(name="llama-3-8b", dtype=torch.bfloat16, seq_len=8192, free_gib=40)
@example(name="llama-2-70b", dtype=torch.bfloat16, seq_len=4096, free_gib=40)
@example(name="llama-2-7b", dtype=torch.float16, seq_len=4096, free_gib=40)
def test_max_batch_from_memory_of_real_presets_counts_layers_and_kv_heads(name, dtype, seq_len, free_gib):
    check_max_batch(preset(name), free_gib * GIB, seq_len, dtype)


@pytest.mark.kata("max_batch_from_memory")
def test_max_batch_from_memory_fills_memory_with_real_caches_of_a_small_model():
    model = build_model(GQA)
    per_seq = cache_nbytes(model.new_caches("static", 1, 12))  # real tensors, allocated on the CPU
    free = 5 * per_seq + per_seq // 2
    got = impl.max_batch_from_memory(GQA, free, 12, torch.float32)
    caches = model.new_caches("static", 5, 12)
    d_model_guess = free // (2 * 2 * GQA.d_model * 4 * 12)  # K and V of every query head's width
    cause = {d_model_guess: f" (yours counts d_model = {GQA.d_model} per position and layer; the cache holds "
                            f"{GQA.n_kv_heads} KV heads of {GQA.head_dim})",
             6: " (round down: a sixth sequence's cache does not fit)"}.get(got, "") if got != 5 else ""
    expect_equal(call_str("max_batch_from_memory", shown(GQA), free, 12, torch.float32), got, 5,
                 f"kvref allocated static caches for 5 sequences of 12 positions in {cache_nbytes(caches):,} bytes "
                 f"({per_seq:,} a sequence, the .nbytes of one sequence's static caches); "
                 f"a sixth does not fit in {free:,}" + cause)


# --- twice the layers ------------------------------------------------------------------------------

def measured_ratio(cfg, hw, free, seq_len, dtype):
    """tokens/s of the deeper model over tokens/s of cfg, from the simulator's admission and roofline step."""
    b1, t1 = steady_decode(cfg, hw, free, seq_len, dtype)
    b2, t2 = steady_decode(cfg.with_(n_layers=2 * cfg.n_layers), hw, free, seq_len, dtype)
    return (b2 / t2) / (b1 / t1), (b1, t1, b2, t2)


def check_ratio(cfg, hw, free, seq_len, dtype):
    got = impl.layers_doubled_throughput_ratio(cfg, hw, free, seq_len, dtype)
    want, (b1, t1, b2, t2) = measured_ratio(cfg, hw, free, seq_len, dtype)
    expect_real(call_str("layers_doubled_throughput_ratio", shown(cfg), shown(hw), free, seq_len, dtype), got, want,
                rel=1e-9, why=f"kvref's simulator admitted {b1} sequences of {seq_len} + 1 positions into {free:,} bytes "
                f"and a step took {t1 * 1e3:.4g} ms ({b1 / t1:,.0f} tokens/s); with {2 * cfg.n_layers} layers it admitted "
                f"{b2} and a step took {t2 * 1e3:.4g} ms ({b2 / t2:,.0f} tokens/s)")


@pytest.mark.kata("layers_doubled_throughput_ratio")
@given(name=st.sampled_from(THROUGHPUT_PRESETS), hw=st.sampled_from(list(HARDWARE.values())), dtype=DTYPES,
       data=st.data())
@example(name="llama-2-7b", hw=H100_SXM, dtype=torch.bfloat16, data=None)
def test_layers_doubled_throughput_ratio_matches_the_serving_simulator(name, hw, dtype, data):
    cfg = preset(name)
    if data is None:
        seq_len, free = 4095, 20 * GIB
    else:
        seq_len = data.draw(st.integers(1, cfg.max_seq_len - 1), label="seq_len")
        deep_seq = kv_cache_bytes_measured(cfg.with_(n_layers=2 * cfg.n_layers), 1, seq_len + 1, dtype)
        free = data.draw(st.integers(deep_seq, 600 * deep_seq), label="free_bytes")
    check_ratio(cfg, hw, free, seq_len, dtype)


@pytest.mark.kata("layers_doubled_throughput_ratio")
@given(cfg=gqa_model_configs(), hw=st.sampled_from([A100_40GB, H100_SXM]), dtype=DTYPES,
       seq_len=st.integers(1, 62), batch=st.integers(1, 300), spare=st.integers(0, 99))
@example(cfg=GQA, hw=A100_40GB, dtype=torch.float32, seq_len=10, batch=3, spare=50)  # 3.5 deep sequences: round down
@example(cfg=GQA, hw=A100_40GB, dtype=torch.float32, seq_len=1, batch=300, spare=0)  # compute-bound steps
def test_layers_doubled_throughput_ratio_of_small_models_matches_the_serving_simulator(cfg, hw, dtype, seq_len, batch,
                                                                                      spare):
    deep_seq = kv_cache_bytes_measured(cfg.with_(n_layers=2 * cfg.n_layers), 1, seq_len + 1, dtype)
    check_ratio(cfg, hw, batch * deep_seq + spare * deep_seq // 100, seq_len, dtype)


@pytest.mark.kata("layers_doubled_throughput_ratio")
def test_layers_doubled_throughput_ratio_when_weight_reads_dominate():
    """Llama-2-7B, bf16, on an H100 at 4,095 cached tokens: memory-bound steps, where the deeper
    model reads twice the layers' weights each step for half the sequences."""
    cfg, hw, dtype = preset("llama-2-7b"), H100_SXM, torch.bfloat16
    ratios = []
    for free_gib in (4, 20, 48, 400):  # 48 GiB: the most an H100 holds beside 64 layers' weights; 400: imaginary
        got = impl.layers_doubled_throughput_ratio(cfg, hw, free_gib * GIB, 4095, dtype)
        want, (b1, t1, b2, t2) = measured_ratio(cfg, hw, free_gib * GIB, 4095, dtype)
        expect_real(call_str("layers_doubled_throughput_ratio", shown(cfg), shown(hw), free_gib * GIB, 4095, dtype),
                    got, want, rel=1e-9,
                    why=f"with {free_gib} GiB for the cache the simulator ran {b1} sequences at {b1 / t1:,.0f} tokens/s "
                    f"and, with 64 layers, {b2} at {b2 / t2:,.0f} tokens/s: not half, since the weights read each step "
                    "doubled too")
        ratios.append(got)
    expect(all(0.25 < r < 0.5 for r in ratios) and ratios == sorted(ratios), "layers_doubled_throughput_ratio(...)",
           ratios, "ratios between 1/4 and 1/2 that rise towards 1/2 as the cache's share of the bytes grows "
           "(4, 20, 48, 400 GiB for the cache)")


# --- continuous batching ----------------------------------------------------------------------

@functools.cache
def small_model():
    return build_model(GQA, seed=3)


@functools.cache
def alone(prompt: tuple, n: int) -> list[int]:
    ids, _ = small_model().generate(torch.tensor([prompt]), n)
    return ids[0, len(prompt):].tolist()


REQUESTS = st.lists(st.tuples(st.lists(st.integers(0, 63), min_size=1, max_size=6), st.integers(1, 5),
                              st.integers(0, 4)), min_size=1, max_size=5)


def run_all(requests, max_batch, budget, forward, step_limit=200):
    """Drive the learner's step until every request finished; requests arrive at their step."""
    seqs = [Sequence(i, list(p), n) for i, (p, n, _) in enumerate(requests)]
    arrivals = sorted(range(len(requests)), key=lambda i: (requests[i][2], i))
    running, waiting, finished, step = [], [], {}, 0
    while len(finished) < len(seqs):
        while arrivals and requests[arrivals[0]][2] <= step:
            waiting.append(seqs[arrivals.pop(0)])
        if isinstance(forward, OneHot):
            forward.now = step
        for s in impl.continuous_batching_step(forward, running, waiting, max_batch, budget):
            finished[s.rid] = (step, s)
        step += 1
        if step > step_limit:
            raise Mismatch(f"called continuous_batching_step(forward, running, waiting, max_batch={max_batch}, "
                           f"kv_budget_tokens={budget}) once a step: after {step_limit} steps "
                           f"{len(seqs) - len(finished)} of {len(seqs)} requests had not finished ({len(running)} "
                           f"running, {len(waiting)} waiting); expected every request to finish: the budget of "
                           f"{budget} positions holds the largest request's whole cache")
    return seqs, finished


def reserve(seq) -> int:
    return len(seq.prompt) + seq.max_new_tokens - 1


@MEASURED
@pytest.mark.kata("continuous_batching_step")
@given(requests=REQUESTS, max_batch=st.integers(1, 4), slack=st.integers(0, 20))
@example(requests=[([5, 9, 1], 4, 0), ([7], 2, 0), ([3, 3, 8, 2, 61, 17], 5, 1), ([40, 2], 3, 3)], max_batch=2, slack=4)
def test_continuous_batching_step_gives_each_request_the_tokens_it_gets_alone(requests, max_batch, slack):
    budget = max(len(p) + n - 1 for p, n, _ in requests) + slack
    seqs, finished = run_all(requests, max_batch, budget, functools.partial(batched_forward, small_model()))
    for s in seqs:
        want = alone(tuple(s.prompt), s.max_new_tokens)
        expect_equal(f"continuous_batching_step(...) for request {s.rid} (prompt {s.prompt}, "
                     f"max_new_tokens {s.max_new_tokens})", s.output, want,
                     "the greedy tokens kvref's model generates for this prompt alone: requests joining and "
                     "leaving the batch must not change another request's tokens (fp32, one forward per step)")


class Recorder:
    """A forward that runs kvref's model and records, each step, who ran and the positions their caches hold."""

    def __init__(self, waiting: list) -> None:
        self.waiting, self.steps = waiting, []

    def __call__(self, running):
        logits = batched_forward(small_model(), running)
        self.steps.append(([s.rid for s in running], sum(s.cached_len for s in running), list(self.waiting),
                           sum(reserve(s) for s in running)))
        return logits


@MEASURED
@pytest.mark.kata("continuous_batching_step")
@given(requests=REQUESTS, max_batch=st.integers(1, 4), slack=st.integers(0, 12))
@example(requests=[([1, 2, 3], 3, 0), ([4, 5], 4, 0), ([6], 2, 0)], max_batch=3, slack=0)
@example(requests=[([1, 2, 3], 4, 0), ([4, 5, 6, 7, 8], 4, 0), ([9], 1, 0)], max_batch=3, slack=0)  # the head waits; 9 fits but must not overtake it
def test_continuous_batching_step_keeps_the_batch_and_the_cache_within_their_limits(requests, max_batch, slack):
    budget = max(len(p) + n - 1 for p, n, _ in requests) + slack
    seqs = [Sequence(i, list(p), n) for i, (p, n, _) in enumerate(requests)]
    waiting = []
    rec = Recorder(waiting)
    arrivals = sorted(range(len(requests)), key=lambda i: (requests[i][2], i))
    running, finished, step = [], 0, 0
    while finished < len(seqs) and step < 200:
        while arrivals and requests[arrivals[0]][2] <= step:
            waiting.append(seqs[arrivals.pop(0)])
        finished += len(impl.continuous_batching_step(rec, running, waiting, max_batch, budget))
        step += 1
    for i, (rids, held, queued, reserved) in enumerate(rec.steps):
        call = f"continuous_batching_step(forward, running, waiting, max_batch={max_batch}, kv_budget_tokens={budget})"
        expect(len(rids) <= max_batch, call, rids, f"at most {max_batch} requests in a step; step {i} ran {len(rids)}")
        expect(held <= budget, call, held, f"caches holding at most {budget} positions in all (the K/V budget): "
               f"after step {i} the running requests' kvref caches held {held}")
        if queued:
            head = queued[0]
            expect(len(rids) == max_batch or reserved + reserve(head) > budget, call, rids,
                   f"request {head.rid} (prompt {len(head.prompt)}, max_new_tokens {head.max_new_tokens}) admitted "
                   f"at step {i}: the batch had room and its cache fits in the {budget}-position budget beside the "
                   f"running requests' {reserved}")
    if finished != len(seqs):
        raise Mismatch(f"called continuous_batching_step(forward, running, waiting, max_batch={max_batch}, "
                       f"kv_budget_tokens={budget}) once a step: {finished} of {len(seqs)} requests finished within "
                       f"200 steps; expected all {len(seqs)}")
    admitted = list(dict.fromkeys(rid for rids, _, _, _ in rec.steps for rid in rids))  # in order of first run
    arrived = sorted(range(len(requests)), key=lambda i: (requests[i][2], i))
    expect(admitted == arrived, f"continuous_batching_step(forward, running, waiting, max_batch={max_batch}, "
           f"kv_budget_tokens={budget})", f"requests first ran in the order {admitted}",
           f"the arrival order {arrived}, first come first served: when the head of `waiting` does not fit, stop "
           f"admitting; a later, smaller request must not overtake it")


@pytest.mark.kata("continuous_batching_step")
def test_continuous_batching_step_admits_a_request_whose_whole_cache_fits_the_budget_exactly():
    """Two requests of 3 prompt tokens and 4 new ones: each cache holds at most 3 + 4 - 1 = 6
    positions (the last token is never fed back), so a budget of 12 runs both at once, whether
    the second arrives with the first or a step later, and a budget of 11 runs them one by one."""
    for budget, second_at, want in ((12, 0, [[0, 1]] * 4), (12, 1, [[0]] + [[0, 1]] * 3 + [[1]]),
                                    (11, 0, [[0]] * 4 + [[1]] * 4)):
        first, second = Sequence(0, [1, 2, 3], 4), Sequence(1, [4, 5, 6], 4)
        waiting = [first]
        rec = Recorder(waiting)
        running = []
        for step in range(len(want)):
            if step == second_at:
                waiting.append(second)
            impl.continuous_batching_step(rec, running, waiting, 8, budget)
        held = max(r[1] for r in rec.steps)
        expect_equal(f"continuous_batching_step(forward, running, waiting, max_batch=8, kv_budget_tokens={budget}), "
                     f"the second request arriving at step {second_at}", [r[0] for r in rec.steps], want,
                     f"the requests that ran in each step: together, their kvref caches reach 12 positions at their "
                     f"last step, which {'fits' if budget >= 12 else 'exceeds'} the budget of {budget} (this run's "
                     f"caches held at most {held})")


class OneHot:
    """A stand-in model: request r's j-th token is (7·r + 3·j + 1) mod 32, whatever ran beside it."""

    def __init__(self) -> None:
        self.calls, self.now = {}, 0  # {step: rids that ran}

    def __call__(self, running):
        self.calls[self.now] = [s.rid for s in running]
        logits = torch.zeros(len(running), 32)
        for i, s in enumerate(running):
            logits[i, (7 * s.rid + 3 * len(s.output) + 1) % 32] = 1.0
        return logits


@pytest.mark.kata("continuous_batching_step")
@given(requests=REQUESTS, max_batch=st.integers(1, 4))
@example(requests=[([1], 1, 0), ([2], 3, 0), ([3], 2, 0), ([4], 1, 1)], max_batch=3)
def test_continuous_batching_step_retires_each_request_at_its_last_token_in_arrival_order(requests, max_batch):
    fake = OneHot()
    budget = 1000
    seqs, finished = run_all(requests, max_batch, budget, fake)
    call = f"continuous_batching_step(forward, running, waiting, max_batch={max_batch}, kv_budget_tokens={budget})"
    for s in seqs:
        steps_in = [i for i, rids in fake.calls.items() if s.rid in rids]
        want = [(7 * s.rid + 3 * j + 1) % 32 for j in range(s.max_new_tokens)]
        expect_equal(f"{call} for request {s.rid}", s.output, want,
                     "the argmax of its own row of each step's logits, one token a step, as Python ints")
        expect(len(steps_in) == s.max_new_tokens and steps_in == list(range(steps_in[0], steps_in[-1] + 1)), call,
               steps_in, f"request {s.rid} in exactly {s.max_new_tokens} consecutive steps (one per token, then it leaves)")
        expect(finished[s.rid][0] == steps_in[-1], call, finished[s.rid][0],
               f"request {s.rid} returned by the step that made its last token (step {steps_in[-1]})")
    order = sorted(range(len(seqs)), key=lambda i: (requests[i][2], i))
    first = [min(i for i, rids in fake.calls.items() if r in rids) for r in order]
    expect(first == sorted(first), call, first,
           "first come, first served: requests start running in arrival order (their first steps, in arrival order)")
    for rids in fake.calls.values():
        expect(rids == sorted(rids, key=lambda r: order.index(r)), call, rids,
               "the running list in admission order: new requests join at its end")
    returned = {}  # step -> rids in the order that step returned them
    for rid, (step, _) in finished.items():
        returned.setdefault(step, []).append(rid)
    for step, rids in returned.items():
        expect(rids == sorted(rids, key=lambda r: order.index(r)), call, rids,
               f"the requests that finished together in step {step} returned in their running order "
               f"{sorted(rids, key=lambda r: order.index(r))}")
