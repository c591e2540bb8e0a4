"""kvref.tensor_parallel, pipeline_parallel, reshard and launch against the single-process model: tensor parallelism on tp = 1, 2, 4 (including
fewer KV heads than ranks), 2 pipeline stages, caches resharded mid-decode (tp = 2 to 4, 4 to 2, 4 to 1),
failures named by rank with no process left behind, and how the ranks start (forked here; spawned,
with a warning saying why, where fork is unsafe).

Every launch is real: gloo process groups over CPU processes, one launch per layout shared by the
tests. The tests that start processes are marked slow.
"""

import functools
import multiprocessing
import multiprocessing.process
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from kvref.config import ModelConfig
import kvref.launch as launcher
from checks.rank_faults import faulty_worker
from kvref.launch import LaunchError, choose_start_method, launch
from kvref.pipeline_parallel import pp_layers, pp_worker
from kvref.reshard import check_reshard_plan, reshard_plan, reshard_worker
from kvref.tensor_parallel import heads_in_cache, single_process, tp_kv_heads, tp_query_heads, tp_worker

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


@pytest.mark.slow
@pytest.mark.parametrize("j", range(len(LAYOUTS)), ids=[f"Hkv{c.n_kv_heads}-tp{tp}" for c, tp in LAYOUTS])
def test_tensor_parallel_logits_equal_the_single_process_model(j):
    cfg, tp = LAYOUTS[j]
    want, _, _ = single_process(cfg, 0, IDS, PROMPT)  # (steps, B, V)
    for r in range(tp):
        got = tp_reports()[r][j].logits
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL, err_msg=f"tp = {tp}, rank {r}")


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("tp, rank, error, words", [
    (0, 0, ValueError, "tp must be >= 1 ranks, got 0"),
    (4, 9, ValueError, r"rank must be in 0 \.\. tp - 1 = 3, got 9"),
    (4, -1, ValueError, r"rank must be in 0 \.\. tp - 1 = 3, got -1"),
    (2.0, 0, TypeError, "tp must be an int, got float"),
    (2, True, TypeError, "rank must be an int, got bool"),
])
def test_head_assignment_refuses_a_tp_or_rank_that_names_no_rank(tp, rank, error, words):
    for f in (tp_query_heads, tp_kv_heads):
        with pytest.raises(error, match=words):
            f(GQA, tp, rank)


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


@pytest.mark.slow
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


@pytest.mark.slow
def test_the_engine_refuses_a_plan_that_loses_a_head_before_anything_is_sent():
    cfg = GQA.with_(n_kv_heads=8)
    with pytest.raises(LaunchError, match="nothing sends it"):
        launch(reshard_worker, 4, [(cfg, 0, IDS, PROMPT, 2, 2, 4, reshard_plan(cfg, 2, 4)[1:])], timeout=60)


# --- how ranks start, and what is left when a launch ends ------------------------------------

MARK = "as imported"  # a forked rank sees the value this process set; a spawned one imports it afresh


def probe(rank: int, world: int) -> tuple:
    """For the start-method checks: what a rank sees of this module, its torch threads and its pid,
    after an op large enough to run on several threads if it had them."""
    torch.randn(1 << 21).exp().sum()
    return MARK, torch.get_num_threads(), os.getpid()


def _gone(pid: int, orphan: bool = False) -> bool:
    """A rank's pid no longer names a process; an orphan adopted by a non-reaping init may stay a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return orphan and state in ("Z", "X")


@pytest.fixture
def rank_pids(monkeypatch) -> list[int]:
    """The pid of every process started with multiprocessing during the test (the ranks, by fork or spawn)."""
    pids = []
    real = multiprocessing.process.BaseProcess.start

    def start(self):
        real(self)
        pids.append(self.pid)

    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", start)
    return pids


def _nothing_left(pids: list[int]) -> None:
    assert multiprocessing.active_children() == []
    assert [p for p in pids if not _gone(p)] == [], "rank processes still exist after launch ended"


def test_launch_chooses_fork_on_linux_without_cuda_and_spawn_where_fork_is_unsafe(monkeypatch):
    monkeypatch.delenv("KVREF_START_METHOD", raising=False)
    if sys.platform.startswith("linux") and not torch.cuda.is_initialized():
        assert choose_start_method() == ("fork", None)
        assert choose_start_method("fork") == ("fork", None)
    assert choose_start_method("spawn") == ("spawn", None)  # asked for by name: no warning
    monkeypatch.setenv("KVREF_START_METHOD", "spawn")
    assert choose_start_method() == ("spawn", "KVREF_START_METHOD=spawn is set")
    monkeypatch.setenv("KVREF_START_METHOD", "fork")
    with monkeypatch.context() as m:
        m.setattr(launcher.torch.cuda, "is_initialized", lambda: True)
        assert choose_start_method("fork") == ("spawn", "CUDA is initialised in this process, and a forked child "
                                                        "cannot use its CUDA context")
    with monkeypatch.context() as m:
        m.setattr(launcher.mp, "get_all_start_methods", lambda: ["spawn"])
        m.setattr(launcher.sys, "platform", "win32")
        assert choose_start_method() == ("spawn", "this platform (win32) has no fork")
    with monkeypatch.context() as m:
        m.setattr(launcher.sys, "platform", "darwin")
        method, why = choose_start_method()
        assert method == "spawn" and "macOS" in why
    monkeypatch.setenv("KVREF_START_METHOD", "forkserver")
    with pytest.raises(ValueError, match="KVREF_START_METHOD must be 'fork' or 'spawn'"):
        choose_start_method()
    with pytest.raises(ValueError, match="start_method must be None, 'fork' or 'spawn', got 'thread'"):
        choose_start_method("thread")


def test_launch_refuses_what_spawn_could_not_run_before_starting_anything(rank_pids):
    with pytest.raises(TypeError, match="module-level fn and arguments that pickle"):
        launch(lambda rank, world: rank, 2)
    with pytest.raises(TypeError, match="module-level fn and arguments that pickle"):
        launch(probe, 2, lambda: None)
    with pytest.raises(ValueError, match="world must be a positive int, got 0"):
        launch(probe, 0)
    with pytest.raises(ValueError, match="timeout must be a positive number of seconds, got 0"):
        launch(probe, 2, timeout=0)
    assert rank_pids == []


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork is the default on Linux only")
def test_ranks_are_forked_from_this_process_with_one_torch_thread_each(monkeypatch, rank_pids):
    if torch.cuda.is_initialized():
        pytest.skip("CUDA is initialised in this process: launch spawns")
    monkeypatch.delenv("KVREF_START_METHOD", raising=False)
    monkeypatch.setattr(sys.modules[__name__], "MARK", "set by this process after import")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the root conftest sets 1; a learner's OMP_NUM_THREADS may set more
    try:
        torch.randn(1 << 21).exp().sum()  # this process's OpenMP pool has run: a forked child entering it would hang
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fallback warning
            reports = launch(probe, 3, timeout=30)
    finally:
        torch.set_num_threads(threads)
    assert [r[0] for r in reports] == ["set by this process after import"] * 3  # forked: this process's memory
    assert [r[1] for r in reports] == [1, 1, 1]
    assert sorted(r[2] for r in reports) == sorted(rank_pids)
    _nothing_left(rank_pids)


@pytest.mark.slow
def test_where_fork_is_unsafe_ranks_are_spawned_with_a_warning_that_says_why(monkeypatch, rank_pids):
    monkeypatch.delenv("KVREF_START_METHOD", raising=False)
    monkeypatch.setattr(launcher.torch.cuda, "is_initialized", lambda: True)  # as after a CUDA op in this process
    monkeypatch.setattr(sys.modules[__name__], "MARK", "set by this process after import")
    with pytest.warns(RuntimeWarning, match="starts its 2 ranks with spawn, not fork: CUDA is initialised in this "
                                            "process") as caught:
        reports = launch(probe, 2, timeout=300)  # each rank imports torch: seconds, more on a loaded machine
    assert len(caught) == 1
    assert [r[0] for r in reports] == ["as imported"] * 2  # spawned: each rank imported this module afresh
    assert [r[1] for r in reports] == [1, 1]
    _nothing_left(rank_pids)


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


@pytest.mark.slow
@pytest.mark.parametrize("fault,words,method", [("raise", "rank 1 of 3 failed", None),
                                                ("exit", "rank 1 of 3 exited with code 3", None),
                                                ("hang", "rank 1 of 3 did not finish within 5 s", None),
                                                ("exit", "rank 1 of 3 exited with code 3", "spawn")])
def test_a_failing_rank_is_named_within_the_timeout_and_no_process_is_left(fault, words, method, rank_pids):
    before = _children_of_this_process()
    timeout = 5 if method is None else 120  # forked ranks start in a fraction of a second; spawned ones import torch
    start = time.monotonic()
    with pytest.raises(LaunchError) as info:
        launch(faulty_worker, 3, 1, fault, timeout=timeout, start_method=method)
    assert words in str(info.value)
    assert time.monotonic() - start < timeout + 15  # the timeout, then at most 5 s to terminate and 5 s to kill
    assert len(rank_pids) == 3
    _nothing_left(rank_pids)
    time.sleep(0.2)  # the resource tracker may outlive a launch; rank processes must not
    left = _children_of_this_process() - before
    assert not left or all("resource_tracker" in open(f"/proc/{p}/cmdline").read() for p in left), left


class Interrupted(BaseException):
    """What a test runner's timer raises in the launching process (kvkata's KataTimeout is a BaseException)."""


@pytest.mark.slow
def test_a_launch_interrupted_by_a_timer_signal_leaves_no_process(rank_pids):
    def handler(signum, frame):
        raise Interrupted

    old_handler = signal.signal(signal.SIGALRM, handler)
    old_timer = signal.setitimer(signal.ITIMER_REAL, 1.0)  # pytest-timeout's own timer, if any, is put back below
    start = time.monotonic()
    try:
        with pytest.raises(Interrupted):
            launch(faulty_worker, 3, 1, "hang", timeout=60)  # rank 1 sleeps for an hour
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_timer[0] > 0:
            signal.setitimer(signal.ITIMER_REAL, max(0.001, old_timer[0] - (time.monotonic() - start)))
    assert len(rank_pids) == 3
    _nothing_left(rank_pids)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_ranks_die_with_a_launcher_that_is_killed():
    script = ("import multiprocessing.process as mpp\n"
              "from checks.rank_faults import faulty_worker\nfrom kvref.launch import launch\n"
              "real = mpp.BaseProcess.start\n"
              "def start(self):\n"
              "    real(self)\n"
              "    print(self.pid, flush=True)\n"
              "mpp.BaseProcess.start = start\n"
              "launch(faulty_worker, 2, 1, 'hang', timeout=600)\n")  # rank 1 sleeps for an hour
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    launcher = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        pids = [int(launcher.stdout.readline()) for _ in range(2)]
    finally:
        launcher.kill()  # SIGKILL: no finally, no atexit; only the kernel can end its ranks
        launcher.wait()
        launcher.stdout.close()
    deadline = time.monotonic() + 60
    while not all(_gone(p, orphan=True) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [p for p in pids if not _gone(p, orphan=True)]
    for p in left:
        os.kill(p, signal.SIGKILL)  # do not leave them to the next test
    assert left == [], "a rank outlived its killed launcher"
