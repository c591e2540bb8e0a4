"""card07: distributed cache consistency.

The answers are checked against a real run: kvref.launch starts one CPU process per rank,
joins them with torch.distributed's gloo backend and decodes a prompt and 3 more tokens with the
model sharded by tensor parallelism (tp = 1, 2, 4) or split into 2 pipeline stages. Each rank's
logits equal the single-process model's (checked by the maintainers' suite); here each rank's
cache is read back: which KV heads it holds (found by comparing its cached keys with the
single-process model's), its `.nbytes`, and the bytes a stage sends the next. One run per
layout serves every test, and every test calls your code before any run starts. Real presets are
measured on the meta device (shapes, no storage), with the same head and layer assignment the run
uses.
"""

import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

import kvkata
from kvkata.check import Shown, call_str, describe, describe_config, expect_close, expect_equal, expect_real, plural
from kvref.config import PRESETS, ModelConfig, preset
from kvref.measure import kv_cache_bytes_measured
from kvref.launch import choose_start_method, launch
from kvref.pipeline_parallel import pp_hidden_nbytes_meta, pp_stage_cache_nbytes_meta, pp_worker
from kvref.reshard import check_reshard_plan, reshard_message_nbytes_meta, reshard_worker
from kvref.reshard import reshard_plan as kvref_plan
from kvref.tensor_parallel import heads_in_cache, single_process, tp_cache_nbytes_meta, tp_kv_heads, tp_worker

impl = kvkata.load("card07_distributed.sharding")

# Where kvref forks its ranks (Linux without CUDA in this process), a launch takes a fraction of a
# second and the gloo tests keep the kata timeout (20 s); each launch stops itself after 15 s, naming
# the rank that hung, before that timeout would blame the kata. Where it must spawn them (each rank
# imports torch again; kvref warns why), they get 120 s and each launch 60 s.
SPAWNS = choose_start_method()[0] == "spawn"
LAUNCH_TIMEOUT = 60 if SPAWNS else 15


# For a test that may make a gloo launch: the kata timeout (20 s, as in pyproject.toml), or 120 s where ranks are spawned.
gloo = pytest.mark.timeout(120 if SPAWNS else 20)


BATCH, PROMPT, LENGTH = 2, 4, 7  # 2 sequences: a 4-token prompt, then 3 decode steps
GQA = ModelConfig(vocab_size=64, n_layers=2, d_model=32, n_heads=8, n_kv_heads=2, head_dim=4, d_ff=32)
MQA = GQA.with_(n_kv_heads=1)
MHA = GQA.with_(n_kv_heads=8)
# (config, tp): Hkv >= tp (each rank its own heads) and Hkv < tp (heads replicated).
LAYOUTS = [(GQA, 1), (GQA, 2), (GQA, 4), (MQA, 2), (MQA, 4), (MHA, 2), (MHA, 4)]
# H·D = 96 and the new token's K and V, 2·Hkv·D = 48, are not d_model = 32: the hidden state is d_model wide.
PIPELINE = GQA.with_(n_layers=4, head_dim=12)
IDS = torch.randint(0, 64, (BATCH, LENGTH), generator=torch.Generator().manual_seed(7)).numpy()

# Valid (Hkv, tp) pairs: one divides the other (what vLLM accepts); real presets among them.
PAIRS = st.sampled_from([(h, t) for h in (1, 2, 3, 4, 6, 8, 12, 16, 32) for t in (1, 2, 4, 8, 16, 32)
                         if h % t == 0 or t % h == 0])
REAL = [name for name, cfg in PRESETS.items() if not cfg.is_mla]


@functools.cache
def tp_runs() -> dict:
    """{(cfg, tp): [(heads found in rank r's cache, rank r's cache .nbytes) for each rank]}, from one gloo launch."""
    reports = launch(tp_worker, 4, [(cfg, 0, tp, IDS, PROMPT) for cfg, tp in LAYOUTS], timeout=LAUNCH_TIMEOUT)
    out = {}
    for j, (cfg, tp) in enumerate(LAYOUTS):
        k_full = single_process(cfg, 0, IDS, PROMPT)[1]
        out[cfg, tp] = [(heads_in_cache(reports[r][j].k_layer0, k_full), reports[r][j].cache_nbytes) for r in range(tp)]
    return out


@functools.cache
def pp_run() -> list:
    """Each stage's report from one 2-stage gloo launch over PIPELINE's 4 layers."""
    return launch(pp_worker, 2, PIPELINE, 0, IDS, PROMPT, timeout=LAUNCH_TIMEOUT)


def name_of(cfg: ModelConfig) -> str:
    return describe_config(cfg, "d_model")  # the pipeline sends d_model-wide hidden states


def layout(cfg: ModelConfig) -> str:
    return f"{cfg.n_heads} query heads over {plural(cfg.n_kv_heads, 'KV head')}, {plural(cfg.n_layers, 'layer')}"


@functools.cache
def heads_read_by(n_heads: int, n_kv: int, tp: int) -> list[list[int]]:
    """For each rank, the KV heads its contiguous block of query heads reads, measured with PyTorch's
    GQA attention (SDPA, enable_gqa): change one KV head and see whose outputs move."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, n_heads, 1, 4, generator=gen)
    k, v = torch.randn(1, n_kv, 3, 4, generator=gen), torch.randn(1, n_kv, 3, 4, generator=gen)
    base = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # (1, H, 1, 4)
    per = n_heads // tp
    read = [set() for _ in range(tp)]
    for h in range(n_kv):
        v2 = v.clone()
        v2[:, h] += 1.0
        moved = (F.scaled_dot_product_attention(q, k, v2, enable_gqa=True) != base).flatten(2).any(-1)[0]  # (H,)
        for r in range(tp):
            if moved[r * per:(r + 1) * per].any():
                read[r].add(h)
    return [sorted(s) for s in read]


# --- which heads, how many copies --------------------------------------------------------------

@gloo
@pytest.mark.kata("kv_heads_of_rank")
def test_kv_heads_of_rank_are_the_heads_each_ranks_cache_holds_in_a_gloo_run():
    answers = {(cfg, tp, r): impl.kv_heads_of_rank(cfg.n_kv_heads, tp, r) for cfg, tp in LAYOUTS for r in range(tp)}
    runs = tp_runs()
    for (cfg, tp, r), got in answers.items():
        expect_equal(call_str("kv_heads_of_rank", cfg.n_kv_heads, tp, r), got, runs[cfg, tp][r][0],
                     f"the KV heads whose keys rank {r} of {tp} cached in a gloo run of {layout(cfg)} "
                     "(its cached keys compared with the single-process model's, head by head)")


@pytest.mark.kata("kv_heads_of_rank")
@given(pair=PAIRS, data=st.data())
@example(pair=(2, 4), data=None)
@example(pair=(8, 4), data=None)
def test_kv_heads_of_rank_are_those_its_contiguous_query_heads_read(pair, data):
    n_kv, tp = pair
    n_heads = n_kv * max(1, tp // n_kv)  # the fewest query heads per KV head that lets tp divide H
    ranks = range(tp) if data is None else [data.draw(st.integers(0, tp - 1), label="rank")]
    for r in ranks:
        got = impl.kv_heads_of_rank(n_kv, tp, r)
        expect_equal(call_str("kv_heads_of_rank", n_kv, tp, r), got, heads_read_by(n_heads, n_kv, tp)[r],
                     f"the KV heads whose change moves the SDPA output (enable_gqa) of the query heads "
                     f"{r}·H/tp .. {r + 1}·H/tp - 1 that rank {r} owns ({n_heads} query heads)")


@gloo
@pytest.mark.kata("kv_replication")
def test_kv_replication_is_how_many_ranks_cache_each_head_in_a_gloo_run():
    answers = {(cfg, tp): impl.kv_replication(cfg.n_kv_heads, tp) for cfg, tp in LAYOUTS}
    runs = tp_runs()
    for (cfg, tp), got in answers.items():
        copies = [sum(h in heads for heads, _ in runs[cfg, tp]) for h in range(cfg.n_kv_heads)]
        expect_equal(call_str("kv_replication", cfg.n_kv_heads, tp), got, copies[0],
                     f"the number of ranks whose cache held each KV head in a gloo run of {layout(cfg)} on tp = {tp}: "
                     f"{copies} for heads 0 .. {cfg.n_kv_heads - 1}")


@pytest.mark.kata("kv_replication")
@given(pair=PAIRS)
@example(pair=(8, 8))
@example(pair=(8, 2))
@example(pair=(8, 16))
def test_kv_replication_counts_the_copies_over_every_valid_layout(pair):
    n_kv, tp = pair
    got = impl.kv_replication(n_kv, tp)
    read = heads_read_by(max(n_kv, tp), n_kv, tp)
    copies = [sum(h in heads for heads in read) for h in range(n_kv)]
    expect_equal(call_str("kv_replication", n_kv, tp), got, copies[0],
                 f"the ranks of {tp} whose query heads' SDPA output (enable_gqa) moves when a KV head changes: "
                 f"{copies} for KV heads 0 .. {n_kv - 1}; never below 1, and a whole number")


# --- bytes per rank and per stage --------------------------------------------------------------

@gloo
@pytest.mark.kata("kv_bytes_per_rank")
def test_kv_bytes_per_rank_match_nbytes_of_each_ranks_cache_in_a_gloo_run():
    answers = {(cfg, tp): impl.kv_bytes_per_rank(cfg, tp, BATCH, LENGTH, torch.float32) for cfg, tp in LAYOUTS}
    runs = tp_runs()
    for (cfg, tp), got in answers.items():
        for r, (_, nbytes) in enumerate(runs[cfg, tp]):
            expect_equal(call_str("kv_bytes_per_rank", Shown(name_of(cfg)), tp, BATCH, LENGTH, torch.float32), got,
                         nbytes, f".nbytes of K and V cached by rank {r} of {tp} in a gloo run of {layout(cfg)}, "
                         f"{plural(BATCH, 'sequence')} of {plural(LENGTH, 'position')} in fp32")


@pytest.mark.kata("kv_bytes_per_rank")
@given(name=st.sampled_from(REAL), tp=st.sampled_from([1, 2, 4, 8, 16, 32]), batch=st.integers(1, 64),
       seq_len=st.integers(1, 131072), dtype=st.sampled_from([torch.bfloat16, torch.float8_e4m3fn, torch.float32]))
@example(name="llama-2-70b", tp=8, batch=1, seq_len=4096, dtype=torch.bfloat16)
@example(name="llama-2-70b", tp=16, batch=1, seq_len=4096, dtype=torch.bfloat16)
@example(name="llama-2-7b", tp=4, batch=1, seq_len=4096, dtype=torch.bfloat16)
def test_kv_bytes_per_rank_of_real_presets_match_a_meta_allocated_shard(name, tp, batch, seq_len, dtype):
    cfg = preset(name)
    if cfg.n_heads % tp or (cfg.n_kv_heads % tp and tp % cfg.n_kv_heads):
        tp = 1  # a layout vLLM would refuse; the single-rank case stands in
    got = impl.kv_bytes_per_rank(cfg, tp, batch, seq_len, dtype)
    measured = tp_cache_nbytes_meta(cfg, tp, tp - 1, batch, seq_len, dtype)
    expect_equal(call_str("kv_bytes_per_rank", preset(name), tp, batch, seq_len, dtype), got, measured,
                 f".nbytes of the caches of the last of {tp} ranks, allocated on the meta device for the "
                 f"{plural(len(tp_kv_heads(cfg, tp, tp - 1)), 'KV head')} it holds of {cfg.n_kv_heads}")


@gloo
@pytest.mark.kata("pipeline_kv_bytes_per_stage")
def test_pipeline_kv_bytes_per_stage_match_each_stages_cache_in_a_gloo_run():
    got = impl.pipeline_kv_bytes_per_stage(PIPELINE, 2, BATCH, LENGTH, torch.float32)
    single = single_process(PIPELINE, 0, IDS, PROMPT)[2]
    for stage, report in enumerate(pp_run()):
        expect_equal(call_str("pipeline_kv_bytes_per_stage", Shown(name_of(PIPELINE)), 2, BATCH, LENGTH, torch.float32),
                     got, report.cache_nbytes,
                     f".nbytes of K and V cached by stage {stage} of 2 in a gloo run of {layout(PIPELINE)}; "
                     f"the single-process cache holds {single:,} bytes, so the 2 stages hold it once between them")


@pytest.mark.kata("pipeline_kv_bytes_per_stage")
@given(name=st.sampled_from(REAL), stages=st.sampled_from([1, 2, 4, 8]), batch=st.integers(1, 64),
       seq_len=st.integers(1, 131072), dtype=st.sampled_from([torch.bfloat16, torch.float32]))
@example(name="llama-2-70b", stages=4, batch=1, seq_len=4096, dtype=torch.bfloat16)
def test_pipeline_kv_bytes_per_stage_of_real_presets_summed_over_the_stages(name, stages, batch, seq_len,
                                                                                     dtype):
    cfg = preset(name)
    if cfg.n_layers % stages:
        stages = 1  # GPT-3's 96 layers split 8 ways, DeepSeek's 61 not at all: keep valid layouts
    got = impl.pipeline_kv_bytes_per_stage(cfg, stages, batch, seq_len, dtype)
    measured = pp_stage_cache_nbytes_meta(cfg, stages, 0, batch, seq_len, dtype)
    whole = kv_cache_bytes_measured(cfg, batch, seq_len, dtype)
    expect_equal(call_str("pipeline_kv_bytes_per_stage", preset(name), stages, batch, seq_len, dtype),
                 got, measured, f".nbytes of a stage's caches on the meta device, {cfg.n_layers // stages} of "
                 f"{cfg.n_layers} layers; the whole model's cache is {whole:,} bytes, stored once across the stages")


@gloo
@pytest.mark.kata("pipeline_bytes_sent_per_step")
def test_pipeline_bytes_sent_per_step_are_what_stage_0_sent_each_step_of_a_gloo_run():
    got = impl.pipeline_bytes_sent_per_step(PIPELINE, BATCH, torch.float32)
    sent = pp_run()[0].bytes_sent  # [prefill, then one entry per decode step]
    for step, nbytes in enumerate(sent[1:], start=1):
        expect_equal(call_str("pipeline_bytes_sent_per_step", Shown(name_of(PIPELINE)), BATCH, torch.float32), got,
                     nbytes, f"the bytes stage 0 sent stage 1 with dist.send at decode step {step} of a gloo run of "
                     f"{layout(PIPELINE)}, {plural(BATCH, 'sequence')} at {PROMPT + step} positions in fp32; "
                     f"the prefill of {PROMPT} tokens sent {sent[0]:,}")


@pytest.mark.kata("pipeline_bytes_sent_per_step")
@given(name=st.sampled_from(REAL), batch=st.integers(1, 256), dtype=st.sampled_from([torch.bfloat16, torch.float32]))
@example(name="llama-2-70b", batch=1, dtype=torch.bfloat16)
def test_pipeline_bytes_sent_per_step_of_real_presets(name, batch, dtype):
    cfg = preset(name)
    got = impl.pipeline_bytes_sent_per_step(cfg, batch, dtype)
    expect_equal(call_str("pipeline_bytes_sent_per_step", preset(name), batch, dtype), got,
                 pp_hidden_nbytes_meta(cfg, batch, 1, dtype),
                 f".nbytes of the hidden state [B, 1, d_model] of one new token per sequence, on the meta device; "
                 "it does not depend on how many positions are cached")


# --- preempt, reshard, resume ------------------------------------------------------------------

BEFORE = 1  # decode steps on the old layout before the pause
# (config, tp_from, tp_to), all on 4 GPUs: scale up, down, each head on one GPU or replicated.
RESHARDS = [(MHA, 2, 4), (MQA, 2, 4), (GQA, 1, 4), (GQA, 4, 2), (MHA, 4, 1)]
# Valid (Hkv, tp_from, tp_to): each tp and Hkv divide one another, as vLLM requires.
def _tp_ok(cfg: ModelConfig, tp: int) -> bool:
    return cfg.n_heads % tp == 0 and (cfg.n_kv_heads % tp == 0 or tp % cfg.n_kv_heads == 0)


# (preset, tp_from, tp_to) layouts vLLM would accept for both tps.
RESHARD_PRESETS = [(name, a, b) for name in REAL for a, b in [(1, 2), (2, 4), (4, 2), (2, 8), (8, 2), (4, 1), (8, 16),
                                                              (16, 4), (8, 1)]
                   if _tp_ok(preset(name), a) and _tp_ok(preset(name), b)]
TRIPLES = st.sampled_from([(h, a, b) for h in (1, 2, 4, 8, 16) for a in (1, 2, 4, 8, 16) for b in (1, 2, 4, 8, 16)
                           if a != b and all(h % t == 0 or t % h == 0 for t in (a, b))])


def reshard_run(plans: tuple | None = None) -> dict:
    """{(cfg, a, b): one report per GPU} from one gloo launch on 4 GPUs: decode the prompt and BEFORE
    tokens on tp = a, move K/V by `plans` (None: kvref's plan) with isend/irecv, decode the rest on tp = b.
    Plans equal to kvref's share its run."""
    ours = tuple(tuple(kvref_plan(cfg, a, b)) for cfg, a, b in RESHARDS)
    return _reshard_launch(ours if plans is None else tuple(tuple(tuple(m) for m in plan) for plan in plans))


@functools.cache
def _reshard_launch(plans: tuple) -> dict:
    jobs = [(cfg, 0, IDS, PROMPT, BEFORE, a, b, list(plan)) for (cfg, a, b), plan in zip(RESHARDS, plans)]
    reports = launch(reshard_worker, 4, jobs, timeout=LAUNCH_TIMEOUT)
    return {lay: [reports[g][j] for g in range(4)] for j, lay in enumerate(RESHARDS)}


def valid_plan(n_kv: int, a: int, b: int) -> list[tuple[int, int, int]]:
    """The learner's plan, with a learner's message for anything kvref's engine would refuse to run."""
    call = call_str("reshard_plan", n_kv, a, b)
    got = impl.reshard_plan(n_kv, a, b)
    if not isinstance(got, (list, tuple)):
        expect_equal(call, got, [], "a list of (head, source GPU, destination GPU) tuples")
    plan = [tuple(m) if isinstance(m, (list, tuple)) else m for m in got]
    cfg = ModelConfig(vocab_size=8, n_layers=1, d_model=8, n_heads=max(n_kv, a, b), n_kv_heads=n_kv, head_dim=2,
                      d_ff=8)
    try:
        check_reshard_plan(cfg, a, b, plan)
    except ValueError as e:
        raise AssertionError(f"{call} returned {describe(got)}\n  kvref's engine refuses to run it: {e}\n  "
                             f"(GPU g is rank g in both layouts; rank r of tp holds kv_heads_of_rank(Hkv, tp, r))") from None
    for h in range(n_kv):
        holders = [g for g in range(a) if h in tp_kv_heads(cfg, a, g)]
        counts = [sum(m[0] == h and m[1] == g for m in plan) for g in holders]
        if max(counts) - min(counts) > 1:
            raise AssertionError(f"{call} returned {describe(got)}\n  KV head {h} is held by GPUs {holders} on tp = {a}, "
                                 f"and they send it {counts} times: spread a replicated head's moves over its holders, "
                                 "so that no GPU's link carries more than it must")
    return plan


@gloo
@pytest.mark.kata("reshard_plan")
def test_reshard_plan_run_in_gloo_resumes_decoding_with_unchanged_logits():
    plans = tuple(tuple(valid_plan(cfg.n_kv_heads, a, b)) for cfg, a, b in RESHARDS)
    runs = reshard_run(plans)
    for (cfg, a, b), plan in zip(RESHARDS, plans):
        want, k_full, _ = single_process(cfg, 0, IDS, PROMPT)
        for g, report in enumerate(runs[cfg, a, b]):
            if g >= b:
                continue
            held = heads_in_cache(report.k_layer0, k_full)
            expect_equal(call_str("reshard_plan", cfg.n_kv_heads, a, b), held, heads_read_by(8, cfg.n_kv_heads, b)[g],
                         f"after your moves ran in a gloo run of {layout(cfg)} paused after {plural(BEFORE, 'decode step')} "
                         f"on tp = {a}, GPU {g}'s cache holds these KV heads (measured by value); rank {g} of tp = {b} "
                         "reads the expected ones (SDPA, enable_gqa)")
            resumed = torch.as_tensor(report.logits[-(LENGTH - PROMPT - BEFORE):])
            expect_close(call_str("reshard_plan", cfg.n_kv_heads, a, b), resumed,
                         torch.as_tensor(want[1 + BEFORE:]), axes=("step", "batch", "vocab"), atol=1e-5, rtol=1e-5,
                         why=f"GPU {g}'s logits after resuming on tp = {b} against the single-process model's")


@pytest.mark.kata("reshard_plan")
@given(triple=TRIPLES)
@example(triple=(8, 2, 4))
@example(triple=(1, 2, 4))
@example(triple=(8, 4, 1))
@example(triple=(2, 1, 8))
@example(triple=(4, 8, 2))
@example(triple=(8, 4, 4))  # the same layout: nothing moves
def test_reshard_plan_moves_each_missing_head_once_from_a_holder_it_spreads_over(triple):
    valid_plan(*triple)  # every check, and its message, is in valid_plan


@gloo
@pytest.mark.kata("reshard_seconds")
@pytest.mark.parametrize("alpha, beta", [(1e-3, 1e12), (0.0, 1e6), (5e-6, 2.5e10)],
                         ids=["latency-bound", "bandwidth-bound", "nvlink-like"])
def test_reshard_seconds_price_the_messages_a_gloo_reshard_sent_and_received(alpha, beta):
    T = PROMPT + BEFORE
    answers = {lay: impl.reshard_seconds(lay[0], lay[1], lay[2], BATCH, T, torch.float32, alpha, beta)
               for lay in RESHARDS}
    runs = reshard_run()
    for (cfg, a, b), got in answers.items():
        links = [(r.messages_sent, r.bytes_sent, r.messages_received, r.bytes_received) for r in runs[cfg, a, b]]
        busiest = max(max(ms * alpha + bs / beta, mr * alpha + br / beta) for ms, bs, mr, br in links)
        expect_real(call_str("reshard_seconds", Shown(name_of(cfg)), a, b, BATCH, T, torch.float32, alpha, beta), got,
                    busiest, rel=1e-9, why=f"the busiest link direction of a gloo reshard of {layout(cfg)} from tp = {a} "
                    f"to {b}; (messages, bytes) sent and received per GPU: "
                    f"{[((ms, bs), (mr, br)) for ms, bs, mr, br in links]}")


@pytest.mark.kata("reshard_seconds")
@given(job=st.sampled_from(RESHARD_PRESETS), batch=st.integers(1, 64), seq_len=st.integers(1, 131072),
       dtype=st.sampled_from([torch.bfloat16, torch.float32]), alpha=st.sampled_from([0.0, 2e-6, 1e-4]),
       beta=st.sampled_from([2.5e10, 4.5e11]))
@example(job=("llama-2-70b", 2, 4), batch=1, seq_len=4096, dtype=torch.bfloat16, alpha=5e-6, beta=2.5e10)
@example(job=("llama-2-70b", 16, 4), batch=1, seq_len=4096, dtype=torch.bfloat16, alpha=5e-6, beta=2.5e10)
@example(job=("llama-2-70b", 8, 1), batch=1, seq_len=4096, dtype=torch.bfloat16, alpha=5e-6, beta=2.5e10)
@example(job=("llama-2-70b", 4, 4), batch=1, seq_len=4096, dtype=torch.bfloat16, alpha=5e-6, beta=2.5e10)  # 0 s
def test_reshard_seconds_of_real_presets_price_the_busiest_link(job, batch, seq_len, dtype, alpha, beta):
    name, a, b = job
    cfg = preset(name)
    got = impl.reshard_seconds(cfg, a, b, batch, seq_len, dtype, alpha, beta)
    message = reshard_message_nbytes_meta(cfg, batch, seq_len, dtype)
    plan = kvref_plan(cfg, a, b)
    moves = [max(sum(s == g for _, s, _ in plan), sum(d == g for _, _, d in plan)) for g in range(max(a, b))]
    want = max(moves) * 2 * cfg.n_layers * (alpha + message / beta)
    expect_real(call_str("reshard_seconds", preset(name), a, b, batch, seq_len, dtype, alpha, beta), got,
                want, rel=1e-9, why=f"kvref's plan moves {plural(len(plan), 'head')}; moves sent or received per GPU "
                f"(the busier direction): {moves}; each move is 2 x {cfg.n_layers} messages of {message:,} bytes "
                "([B, T, D] on the meta device)")
