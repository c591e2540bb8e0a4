"""kvref.parallel against the single-process model: tensor parallelism on tp = 1, 2, 4 (including
fewer KV heads than ranks), 2 pipeline stages, caches resharded mid-decode (tp = 2 to 4, 4 to 2, 4 to 1),
and failures named by rank with no process left behind.

Every launch is real: gloo process groups over spawned CPU processes. One launch per layout,
shared by the tests (each costs seconds: every process imports torch).
"""

import functools
import multiprocessing
import os
import time

import numpy as np
import pytest
import torch

from kvref.config import ModelConfig
from kvref.parallel import (LaunchError, check_reshard_plan, faulty_worker, heads_in_cache, launch, pp_layers,
                            pp_worker, reshard_plan, reshard_worker, single_process, tp_kv_heads, tp_worker)

BATCH, PROMPT, LENGTH = 2, 5, 9  # a 5-token prompt, then 4 decode steps
GQA = ModelConfig(vocab_size=64, n_layers=2, d_model=32, n_heads=8, n_kv_heads=2, head_dim=4, d_ff=32)
LAYOUTS = [(GQA, 1), (GQA, 2), (GQA, 4), (GQA.with_(n_kv_heads=1), 4), (GQA.with_(n_kv_heads=8), 4)]
PIPELINE = GQA.with_(n_layers=4, head_dim=8)
IDS = torch.randint(0, 64, (BATCH, LENGTH), generator=torch.Generator().manual_seed(3)).numpy()
# fp32 sums in another order: the all-reduce adds per-rank partial outputs of o_proj. Measured
# differences are about 2e-6 on logits of order 1.
ATOL = RTOL = 1e-5


@functools.cache
def tp_reports():
    return launch(tp_worker, 4, [(cfg, 0, tp, IDS, PROMPT) for cfg, tp in LAYOUTS], timeout=60)


@functools.cache
def pp_reports():
    return launch(pp_worker, 2, PIPELINE, 0, IDS, PROMPT, timeout=60)


@pytest.mark.slow  # gloo ranks in new processes
@pytest.mark.parametrize("j", range(len(LAYOUTS)), ids=[f"Hkv{c.n_kv_heads}-tp{tp}" for c, tp in LAYOUTS])
def test_tensor_parallel_logits_equal_the_single_process_model(j):
    cfg, tp = LAYOUTS[j]
    want, _, _ = single_process(cfg, 0, IDS, PROMPT)  # (steps, B, V)
    for r in range(tp):
        got = tp_reports()[r][j].logits
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL, err_msg=f"tp = {tp}, rank {r}")


@pytest.mark.slow  # gloo ranks in new processes
@pytest.mark.parametrize("j", range(len(LAYOUTS)), ids=[f"Hkv{c.n_kv_heads}-tp{tp}" for c, tp in LAYOUTS])
def test_each_rank_caches_exactly_the_kv_heads_its_query_heads_read(j):
    cfg, tp = LAYOUTS[j]
    _, k_full, full_nbytes = single_process(cfg, 0, IDS, PROMPT)
    copies = [0] * cfg.n_kv_heads
    for r in range(tp):
        report = tp_reports()[r][j]
        held = heads_in_cache(report.k_layer0, k_full)
        assert held == report.kv_heads == tp_kv_heads(cfg, tp, r)
        assert held == sorted({h // cfg.group_size for h in range(r * cfg.n_heads // tp, (r + 1) * cfg.n_heads // tp)})
        assert report.cache_nbytes == full_nbytes * len(held) // cfg.n_kv_heads
        for h in held:
            copies[h] += 1
    assert copies == [max(1, tp // cfg.n_kv_heads)] * cfg.n_kv_heads  # vLLM's replication


@pytest.mark.slow  # gloo ranks in new processes
def test_pipeline_stages_give_the_single_process_logits_and_split_the_cache():
    want, _, full_nbytes = single_process(PIPELINE, 0, IDS, PROMPT)
    first, last = pp_reports()
    np.testing.assert_allclose(last.logits, want, atol=ATOL, rtol=RTOL)
    assert first.cache_nbytes == last.cache_nbytes == full_nbytes // 2  # no KV stored twice
    assert list(pp_layers(PIPELINE, 2, 1)) == [2, 3]
    hidden = BATCH * PIPELINE.d_model * 4  # fp32 [B, 1, d_model]
    assert first.bytes_sent == [PROMPT * hidden] + [hidden] * (LENGTH - PROMPT)
    assert last.bytes_sent == [0] * (LENGTH - PROMPT + 1)


# (n_kv_heads, tp_from, tp_to): up and down, each KV head on one GPU or replicated before and after.
RESHARDS = [(8, 2, 4), (2, 2, 4), (1, 2, 4), (2, 4, 2), (8, 4, 1)]


@functools.cache
def reshard_runs() -> dict:
    """{layout: one report per GPU}, from one gloo launch per world size."""
    out = {}
    for world in sorted({max(a, b) for _, a, b in RESHARDS}):
        layouts = [r for r in RESHARDS if max(r[1], r[2]) == world]
        jobs = [(GQA.with_(n_kv_heads=n), 0, IDS, PROMPT, 2, a, b, None) for n, a, b in layouts]
        reports = launch(reshard_worker, world, jobs, timeout=60)
        for j, lay in enumerate(layouts):
            out[lay] = [reports[g][j] for g in range(world)]
    return out


@pytest.mark.slow  # gloo ranks in new processes
@pytest.mark.parametrize("lay", RESHARDS, ids=lambda lay: f"hkv{lay[0]}-tp{lay[1]}to{lay[2]}")
def test_a_cache_resharded_mid_decode_resumes_with_unchanged_logits(lay):
    n_kv, a, b = lay
    cfg = GQA.with_(n_kv_heads=n_kv)
    before = 2  # decode steps on tp = a before the pause
    want, k_full, full_nbytes = single_process(cfg, 0, IDS, PROMPT)
    reports = reshard_runs()[lay]
    plan = reshard_plan(cfg, a, b)
    T = PROMPT + before
    message = BATCH * T * cfg.head_dim * 4  # one head's K (or V) in one layer, fp32
    for g, report in enumerate(reports):
        steps = [i for i in range(LENGTH - PROMPT + 1) if (i <= before and g < a) or (i > before and g < b)]
        np.testing.assert_allclose(report.logits, want[steps], atol=ATOL, rtol=RTOL, err_msg=f"GPU {g}")
        if g < b:
            held = heads_in_cache(report.k_layer0, k_full)
            assert held == tp_kv_heads(cfg, b, g)
            kept = tp_kv_heads(cfg, a, g) if g < a else []
            arriving = sorted(h for h, _, dst in plan if dst == g)
            assert sorted(set(held) - set(kept)) == arriving  # no head lost, none sent twice
        sends = sum(src == g for _, src, _ in plan)
        receives = sum(dst == g for _, _, dst in plan)
        assert (report.messages_sent, report.bytes_sent) == (2 * cfg.n_layers * sends, 2 * cfg.n_layers * sends * message)
        assert (report.messages_received, report.bytes_received) == (2 * cfg.n_layers * receives,
                                                                     2 * cfg.n_layers * receives * message)


@pytest.mark.parametrize("n_kv, a, b", [(8, 2, 4), (1, 2, 4), (2, 1, 8), (4, 8, 2), (16, 4, 8), (2, 4, 8)])
def test_the_reshard_plan_moves_each_missing_head_once_and_spreads_the_sends(n_kv, a, b):
    cfg = ModelConfig(vocab_size=8, n_layers=1, d_model=16, n_heads=16, n_kv_heads=n_kv, head_dim=2, d_ff=8)
    plan = reshard_plan(cfg, a, b)
    check_reshard_plan(cfg, a, b, plan)
    for h in range(n_kv):
        holders = [g for g in range(a) if h in tp_kv_heads(cfg, a, g)]
        counts = [sum(m == (h, g) for m in ((hh, s) for hh, s, _ in plan)) for g in holders]
        assert max(counts) - min(counts) <= 1, (h, counts)


def test_a_plan_that_loses_or_duplicates_a_head_is_refused():
    cfg = GQA.with_(n_kv_heads=8)
    plan = reshard_plan(cfg, 2, 4)
    with pytest.raises(ValueError, match="nothing sends it"):
        check_reshard_plan(cfg, 2, 4, plan[1:])
    with pytest.raises(ValueError, match="twice"):
        check_reshard_plan(cfg, 2, 4, plan + plan[:1])
    with pytest.raises(ValueError, match="already holds"):
        check_reshard_plan(cfg, 2, 4, plan + [(0, 0, 0)])
    with pytest.raises(ValueError, match="does not hold"):
        check_reshard_plan(cfg, 2, 4, [(h, 1 - s, d) for h, s, d in plan])


@pytest.mark.slow  # the launcher, with gloo ranks in new processes
def test_the_launcher_refuses_a_plan_that_loses_a_head():
    cfg = GQA.with_(n_kv_heads=8)
    plan = reshard_plan(cfg, 2, 4)
    with pytest.raises(LaunchError, match="nothing sends it"):
        launch(reshard_worker, 4, [(cfg, 0, IDS, PROMPT, 2, 2, 4, plan[1:])], timeout=60)


def _children_of_this_process() -> set[int]:
    """Pids whose parent is this process, read from /proc (no psutil)."""
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid():
                pids.add(int(entry))
    return pids


@pytest.mark.slow  # gloo ranks in new processes
@pytest.mark.parametrize("fault,words", [("raise", "rank 1 of 3 failed"),
                                         ("exit", "rank 1 of 3 exited with code 3"),
                                         ("hang", "rank 1 of 3 did not finish within 10 s")])
def test_a_failing_rank_is_named_within_the_timeout_and_no_process_is_left(fault, words):
    before = _children_of_this_process()
    start = time.monotonic()
    with pytest.raises(LaunchError) as info:
        launch(faulty_worker, 3, 1, fault, timeout=10)  # the healthy ranks need seconds to start
    assert words in str(info.value)
    assert time.monotonic() - start < 20
    assert multiprocessing.active_children() == []
    time.sleep(0.2)  # the resource tracker may outlive a launch; rank processes must not
    left = _children_of_this_process() - before
    assert not left or all("resource_tracker" in open(f"/proc/{p}/cmdline").read() for p in left), left
