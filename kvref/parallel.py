"""Spoiler for card07: tensor and pipeline parallel decoding on torch.distributed (read it after you pass).

A real engine, nothing simulated: `launch` starts one CPU process per rank, joins them into a
gloo process group on a free localhost port, runs a worker function in each and returns what
every rank measured.

How ranks start. On Linux they are forked from the calling process, which has already imported
torch and kvref: a launch of 4 ranks costs a fraction of a second, where "spawn" (a fresh
interpreter per rank, each importing torch again) costs seconds. Forking a process whose torch
has run multi-threaded ops is safe only if the child never enters an OpenMP parallel region (a
forked child that does hangs in libgomp: measured 10 hangs in 10 forks), so a rank's first act
is `torch.set_num_threads(1)`, which keeps every op on its own thread; it also restores the
default SIGTERM, SIGINT and SIGALRM handlers (a test runner's alarm handler is not the rank's)
and asks the kernel to kill it if the launching process dies (Linux's PR_SET_PDEATHSIG).
Ranks are spawned instead, with a RuntimeWarning saying why, when fork is unsafe or absent:
CUDA is initialised in the launching process, the platform has no fork (Windows) or fork is
unsafe there (macOS's system frameworks), or KVREF_START_METHOD=spawn is set. `launch(...,
start_method="spawn")` asks for spawn without a warning. The rules for `fn` and its arguments
are those of spawn whichever method runs (checked before any process starts), so a launch that
works here works everywhere: `fn` is a module-level function and its arguments and results
pickle (numpy arrays, ints, lists, dataclasses of those: not tensors, which torch would pass by
shared memory).

Tensor parallelism (Megatron-style attention, as vLLM shards it). With tp ranks, rank r owns
the contiguous query heads r·H/tp .. (r+1)·H/tp - 1 and the KV heads those query heads read
(query head h reads KV head h // G). So when Hkv >= tp each rank holds Hkv / tp KV heads; when
Hkv < tp each rank holds one, KV head r // (tp / Hkv), and every KV head is replicated
tp / Hkv times (vLLM's rule for GQA under TP). A rank slices q/k/v_proj's rows and o_proj's
columns out of the full model's weights, caches only its own KV heads, and all-reduces (sums)
o_proj's partial outputs. The MLP, embedding, norms and lm_head are replicated, not sharded:
every rank computes them in full (simple, and exact).

Pipeline parallelism: stage s owns layers s·L/P .. (s+1)·L/P - 1 and caches only those; stage 0
also embeds, the last stage also normalises and projects to logits. What crosses a stage
boundary is the hidden state `[B, S, d_model]`, sent with dist.send / dist.recv. No KV is
duplicated across stages.

Preemption and resume on another layout: `reshard_worker` decodes on tp = a, moves each KV head
a GPU of the tp = b layout lacks from an old GPU that holds it (isend / irecv, one message per
head, layer and K or V; messages and bytes counted on both ends), and resumes decoding on tp = b.
GPU g is rank g in both layouts; a plan that loses, duplicates or misroutes a head is refused.

Failures: a worker's exception is reported with its rank; a rank that dies without a result
(os._exit, a signal) is reported by rank and exit code; a rank that has not finished when the
launch's timeout expires is reported by rank; every child is terminated (then killed) and
joined before `launch` returns or raises, whichever way it ends (a KeyboardInterrupt or a test
runner's timeout included; those signals are held while the ranks start). A rank waits in the
rendezvous or a collective no longer than the launch's timeout, and dies with the launcher.
"""

from __future__ import annotations

import ctypes
import datetime
import os
import pickle
import queue
import signal
import socket
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from kvref.attention import attention
from kvref.cache import GrowingKVCache, StaticKVCache
from kvref.config import ModelConfig
from kvref.measure import cache_nbytes
from kvref.model import build_model
from kvref.rope import apply_rope, rope_cos_sin


class LaunchError(RuntimeError):
    """A rank failed or did not finish in time; the message names the rank."""


# --- the launcher ------------------------------------------------------------------------------

def free_port() -> int:
    """A localhost port nobody listens on now: bind to port 0 and let the OS choose."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


START_METHODS = ("fork", "spawn")


def choose_start_method(requested: str | None = None) -> tuple[str, str | None]:
    """The start method `launch` uses, and why it is not fork (None when fork, or spawn asked for by name).

    `requested`: None or "fork" (fork where it is safe), or "spawn". Fork is refused, in favour
    of spawn, when KVREF_START_METHOD=spawn is set, when the platform has no fork or fork is
    unsafe there (macOS), or when CUDA is initialised in this process (a forked child cannot use
    its parent's CUDA context).
    """
    if requested not in (None, *START_METHODS):
        raise ValueError(f"start_method must be None, 'fork' or 'spawn', got {requested!r}")
    if requested == "spawn":
        return "spawn", None
    env = os.environ.get("KVREF_START_METHOD", "")
    if env not in ("", *START_METHODS):
        raise ValueError(f"KVREF_START_METHOD must be 'fork' or 'spawn' (or unset), got {env!r}")
    if env == "spawn":
        return "spawn", "KVREF_START_METHOD=spawn is set"
    if "fork" not in mp.get_all_start_methods():
        return "spawn", f"this platform ({sys.platform}) has no fork"
    if sys.platform == "darwin":
        return "spawn", "fork is unsafe on macOS (system frameworks are not fork-safe)"
    if torch.cuda.is_initialized():
        return "spawn", "CUDA is initialised in this process, and a forked child cannot use its CUDA context"
    return "fork", None


def _die_with(parent: int | None) -> None:
    """Have Linux kill this rank if the launching process `parent` dies (PR_SET_PDEATHSIG); elsewhere,
    or when this rank's parent is not the launcher (None), nothing."""
    if parent is None or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the launcher died before prctl took effect: nothing would kill this rank
        os._exit(1)


_PARENT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGALRM)


def _entry(rank: int, world: int, port: int, results, fn, args, parent: int | None, timeout: float) -> None:
    # Before anything else: a forked child that runs an op on several threads enters OpenMP with
    # its parent's thread pool, which does not exist in the child, and hangs. One thread keeps
    # every op inline (and several ranks share two cores anyway).
    torch.set_num_threads(1)
    for sig in _PARENT_SIGNALS:  # a forked child inherits its parent's handlers, and the mask launch set
        signal.signal(sig, signal.SIG_DFL)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _PARENT_SIGNALS)
    _die_with(parent)
    try:
        # A rank never waits longer than the launch does, in the rendezvous or in a collective.
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout))
        out = fn(rank, world, *args)
        results.put(("ok", rank, out))
    except BaseException:  # noqa: BLE001 - everything a rank raises goes back to the launcher
        results.put(("error", rank, traceback.format_exc()))
        results.close()
        results.join_thread()  # the message must reach the launcher before this process ends
        os._exit(1)  # do not wait in a collective that the other ranks will never finish
    dist.destroy_process_group()


def launch(fn, world: int, *args, timeout: float = 60.0, start_method: str | None = None) -> list:
    """Run `fn(rank, world, *args)` in `world` gloo processes; return each rank's result, by rank.

    Ranks are forked from this process where that is safe, else spawned with a RuntimeWarning
    saying why (see `choose_start_method`; `start_method="spawn"` asks for spawn). Whichever
    method runs, `fn` must be importable by name (a module-level function) and `fn` and `args`
    must pickle, as spawn needs: checked here, before any process starts (TypeError). Results
    must pickle too (numpy arrays, ints, lists: not tensors, which torch would pass by shared
    memory). Raises LaunchError naming the rank that raised or died, or the ranks still running
    at `timeout` seconds. Every rank process is ended and joined before this returns or raises.
    """
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be a positive int, got {world!r}")
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    try:
        pickle.dumps((fn, args))
    except Exception as e:  # noqa: BLE001 - pickle raises several types
        raise TypeError(f"launch needs a module-level fn and arguments that pickle (spawned ranks receive them "
                        f"pickled): {type(e).__name__}: {e}") from None
    method, why = choose_start_method(start_method)
    if why:
        warnings.warn(f"kvref.parallel.launch starts its {world} ranks with spawn, not fork: {why}; each rank "
                      "imports torch again, which costs seconds per launch", RuntimeWarning, stacklevel=2)
    ctx = mp.get_context(method)
    results = ctx.Queue()
    port = free_port()
    parent = os.getpid() if method in START_METHODS else None  # a forkserver would be the ranks' parent
    procs = [ctx.Process(target=_entry, args=(r, world, port, results, fn, args, parent, timeout),
                         daemon=True)
             for r in range(world)]
    out: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    try:
        _start(procs)
        while len(out) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(world)) - set(out))
                raise LaunchError(f"rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} of {world} "
                                  f"did not finish within {timeout:g} s")
            try:
                status, rank, value = results.get(timeout=min(left, 0.2))
            except queue.Empty:
                for r, p in enumerate(procs):
                    if r not in out and p.exitcode not in (None, 0) and results.empty():
                        raise LaunchError(f"rank {r} of {world} exited with code {p.exitcode} without a result")
                continue
            if status == "error":
                raise LaunchError(_blame(procs, results, rank, value, out))
            out[rank] = value
        return [out[r] for r in range(world)]
    finally:
        _end(procs, grace=2.0 if len(out) == world else 0.0)
        results.close()
        results.join_thread()


def _start(procs) -> None:
    """Start every rank with SIGTERM, SIGINT and SIGALRM (a test runner's timeout) held until each
    has a Process that `_end` can join: a signal between a fork and its bookkeeping would orphan a rank."""
    masked = hasattr(signal, "pthread_sigmask")
    if masked:
        held = signal.pthread_sigmask(signal.SIG_BLOCK, _PARENT_SIGNALS)
    try:
        with warnings.catch_warnings():
            # Python 3.12+ warns that forking a multi-threaded process may deadlock the child;
            # torch's OpenMP pool is such a thread, and _entry's first line is what makes it safe.
            warnings.filterwarnings("ignore", r"This process .* is multi-threaded", DeprecationWarning)
            for p in procs:
                p.start()
    finally:
        if masked:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a signal that came meanwhile is delivered now


def _end(procs, grace: float) -> None:
    """Join every started rank: wait up to `grace` s for those that finished their work, then
    terminate (SIGTERM), and kill (SIGKILL) any still alive 5 s later."""
    started = [p for p in procs if p.pid is not None]
    until = time.monotonic() + grace
    for p in started:
        p.join(max(0.0, until - time.monotonic()))
    for p in started:
        if p.is_alive():
            p.terminate()
    for p in started:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join()


def _blame(procs, results, rank: int, error: str, out: dict) -> str:
    """The message for a failed launch: a rank that died without a word is the cause, if there is one."""
    time.sleep(0.5)  # let a rank that died outright show its exit code
    reported = {rank}
    while True:
        try:
            status, r, _ = results.get(timeout=0.05)
        except queue.Empty:
            break
        reported.add(r)
    world = len(procs)
    for r, p in enumerate(procs):
        if r not in reported and r not in out and p.exitcode not in (None, 0):
            return (f"rank {r} of {world} exited with code {p.exitcode} without a result; "
                    f"then rank {rank} failed: {error.strip().splitlines()[-1]}")
    return f"rank {rank} of {world} failed:\n{error}"


# --- tensor parallelism ------------------------------------------------------------------------

def tp_query_heads(cfg: ModelConfig, tp: int, rank: int) -> range:
    """The query heads rank `rank` owns: a contiguous H / tp of them."""
    if cfg.n_heads % tp:
        raise ValueError(f"tp = {tp} must divide n_heads = {cfg.n_heads}")
    per = cfg.n_heads // tp
    return range(rank * per, (rank + 1) * per)


def tp_kv_heads(cfg: ModelConfig, tp: int, rank: int) -> list[int]:
    """The KV heads rank `rank` caches: those its query heads read (head h reads KV head h // G)."""
    if cfg.n_kv_heads % tp and tp % cfg.n_kv_heads:
        raise ValueError(f"tp = {tp} and n_kv_heads = {cfg.n_kv_heads}: one must divide the other")
    return sorted({h // cfg.group_size for h in tp_query_heads(cfg, tp, rank)})


class TPAttention(nn.Module):
    """One rank's shard of an attention layer: its query heads, their KV heads, o_proj's columns."""

    def __init__(self, full: nn.Module, cfg: ModelConfig, tp: int, rank: int, group) -> None:
        super().__init__()
        D = cfg.head_dim
        self.cfg, self.group = cfg, group
        self.q_heads = tp_query_heads(cfg, tp, rank)
        self.kv_heads = tp_kv_heads(cfg, tp, rank)
        q_rows = slice(self.q_heads.start * D, self.q_heads.stop * D)
        kv_rows = slice(self.kv_heads[0] * D, (self.kv_heads[-1] + 1) * D)
        self.q_w = full.q_proj.weight[q_rows].clone()    # (H/tp · D, d)
        self.k_w = full.k_proj.weight[kv_rows].clone()   # (Hkv_r · D, d)
        self.v_w = full.v_proj.weight[kv_rows].clone()
        self.o_w = full.o_proj.weight[:, q_rows].clone()  # (d, H/tp · D)

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor, cache=None) -> torch.Tensor:
        B, S, _ = x.shape
        H, Hkv, D = len(self.q_heads), len(self.kv_heads), self.cfg.head_dim
        q = (x @ self.q_w.T).view(B, S, H, D).transpose(1, 2)    # (B, H/tp, S, D)
        k = (x @ self.k_w.T).view(B, S, Hkv, D).transpose(1, 2)  # (B, Hkv_r, S, D)
        v = (x @ self.v_w.T).view(B, S, Hkv, D).transpose(1, 2)
        cos, sin = rope_cos_sin(input_pos, D, self.cfg.rope_theta, dtype=x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(input_pos, k, v)  # (B, Hkv_r, T, D): only this rank's KV heads
        y = attention(q, k, v, None if cache is None else input_pos)  # (B, H/tp, S, D): masked by position
        partial = y.transpose(1, 2).reshape(B, S, H * D) @ self.o_w.T  # (B, S, d): this rank's share
        dist.all_reduce(partial, group=self.group)  # the sum over ranks is the full o_proj output
        return partial


@dataclass
class RankReport:
    """What one rank measured: its KV heads, its caches' bytes, layer 0's K, and the logits it computed."""
    rank: int
    kv_heads: list[int]            # as the engine assigned them
    cache_nbytes: int              # .nbytes of K and V over every layer this rank caches
    k_layer0: object               # numpy (B, Hkv_r, T, D): layer 0's cached keys
    logits: object                 # numpy (N + 1, B, V): after the prompt, then after each decode step
    bytes_sent: list[int] = field(default_factory=list)  # pipeline: bytes this rank sent, per step


def _steps(ids: torch.Tensor, n_prompt: int):
    """The forward calls of a prefill and its decode steps: (new ids, their positions)."""
    yield ids[:, :n_prompt], torch.arange(n_prompt)
    for t in range(n_prompt, ids.shape[1]):
        yield ids[:, t:t + 1], torch.tensor([t])


def tp_worker(rank: int, world: int, jobs: list) -> list:
    """Run each (cfg, seed, tp, ids, n_prompt) job on ranks 0 .. tp-1 of a group made for it."""
    reports = []
    for cfg, seed, tp, ids, n_prompt in jobs:
        group = dist.new_group(list(range(tp)))  # every rank must take part in making every group
        if rank >= tp:
            reports.append(None)
            continue
        model = build_model(cfg, seed)
        for layer in model.layers:
            layer.self_attn = TPAttention(layer.self_attn, cfg, tp, rank, group)
        caches = [GrowingKVCache() for _ in model.layers]
        logits = []
        with torch.no_grad():
            for new, pos in _steps(torch.as_tensor(ids), n_prompt):
                logits.append(model(new, pos, caches)[:, -1])
        reports.append(RankReport(rank, tp_kv_heads(cfg, tp, rank), cache_nbytes(caches), caches[0].k.numpy().copy(),
                                  torch.stack(logits).numpy()))
    return reports


def tp_cache_nbytes_meta(cfg: ModelConfig, tp: int, rank: int, batch: int, seq_len: int, dtype: torch.dtype) -> int:
    """`.nbytes` of the caches rank `rank` allocates under TP, on the meta device (real presets cost nothing)."""
    heads = len(tp_kv_heads(cfg, tp, rank))
    caches = [StaticKVCache(batch, heads, seq_len, cfg.head_dim, dtype, device="meta") for _ in range(cfg.n_layers)]
    return cache_nbytes(caches)


def heads_in_cache(k_rank, k_full) -> list[int]:
    """Which of the full model's KV heads a rank's cached K holds, found by comparing values.

    `k_rank` is `[B, Hkv_r, T, D]` from one rank, `k_full` `[B, Hkv, T, D]` from the single-process
    model (numpy or tensors). Slot i holds head j when the two agree to fp32 rounding.
    """
    k_rank, k_full = torch.as_tensor(k_rank), torch.as_tensor(k_full)
    held = []
    for i in range(k_rank.shape[1]):
        match = [j for j in range(k_full.shape[1]) if torch.allclose(k_rank[:, i], k_full[:, j], atol=1e-5, rtol=1e-5)]
        if len(match) != 1:
            raise ValueError(f"cached slot {i} matches {len(match)} of the model's KV heads, not exactly one")
        held += match
    return held


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
        for new, pos in _steps(ids, n_prompt):
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


# --- preemption and resume on another layout ---------------------------------------------------

def reshard_plan(cfg: ModelConfig, tp_from: int, tp_to: int) -> list[tuple[int, int, int]]:
    """(head, source GPU, destination GPU) for every KV head a GPU lacks in the new layout.

    GPU g is rank g in both layouts (a scale-up adds GPUs tp_from .. tp_to-1; a scale-down
    drops the highest ones). A head a GPU already holds stays where it is; any other is sent
    once, from a GPU that held it. When several old GPUs hold a head (replicated, Hkv < tp_from),
    its sends are spread over them, each to the one that has sent the fewest so far: no GPU
    sends more than it must.
    """
    for tp in (tp_from, tp_to):
        if not isinstance(tp, int) or tp < 1:
            raise ValueError(f"tp must be a positive int, got {tp!r}")
    holders = {h: [g for g in range(tp_from) if h in tp_kv_heads(cfg, tp_from, g)] for h in range(cfg.n_kv_heads)}
    sends = [0] * tp_from
    plan = []
    for dst in range(tp_to):
        held = tp_kv_heads(cfg, tp_from, dst) if dst < tp_from else []
        for h in tp_kv_heads(cfg, tp_to, dst):
            if h not in held:
                src = min(holders[h], key=lambda g: (sends[g], g))
                sends[src] += 1
                plan.append((h, src, dst))
    return plan


def check_reshard_plan(cfg: ModelConfig, tp_from: int, tp_to: int, plan) -> None:
    """Raise ValueError naming the first move of `plan` that loses, duplicates or misroutes a head."""
    seen = set()
    for move in plan:
        if not (isinstance(move, tuple) and len(move) == 3 and all(isinstance(x, int) for x in move)):
            raise ValueError(f"a move must be a (head, source, destination) tuple of ints, got {move!r}")
        h, src, dst = move
        if not (0 <= src < tp_from and 0 <= dst < tp_to):
            raise ValueError(f"move {move}: GPUs of tp = {tp_from} are 0..{tp_from - 1}, of tp = {tp_to} 0..{tp_to - 1}")
        if h not in tp_kv_heads(cfg, tp_from, src):
            raise ValueError(f"move {move}: GPU {src} does not hold KV head {h} on tp = {tp_from}")
        if h not in tp_kv_heads(cfg, tp_to, dst):
            raise ValueError(f"move {move}: rank {dst} of tp = {tp_to} does not cache KV head {h}")
        if dst < tp_from and h in tp_kv_heads(cfg, tp_from, dst):
            raise ValueError(f"move {move}: GPU {dst} already holds KV head {h}")
        if (h, dst) in seen:
            raise ValueError(f"move {move}: KV head {h} is sent to GPU {dst} twice")
        seen.add((h, dst))
    for dst in range(tp_to):
        held = tp_kv_heads(cfg, tp_from, dst) if dst < tp_from else []
        for h in tp_kv_heads(cfg, tp_to, dst):
            if h not in held and (h, dst) not in seen:
                raise ValueError(f"GPU {dst} needs KV head {h} on tp = {tp_to} and nothing sends it")


@dataclass
class ReshardReport:
    """What one GPU measured in a reshard: messages and bytes it sent and received, and the rest of the run."""
    rank: int
    kv_heads: list[int]            # the KV heads its new cache holds, as the engine assigned them ([] if it left)
    cache_nbytes: int              # .nbytes of its new caches
    k_layer0: object               # numpy (B, Hkv_r, T, D): layer 0's cached keys after the reshard (None if it left)
    logits: object                 # numpy: every step this GPU took part in, before and after the reshard
    messages_sent: int
    bytes_sent: int
    messages_received: int
    bytes_received: int


def reshard_worker(rank: int, world: int, jobs: list) -> list:
    """Run each (cfg, seed, ids, n_prompt, n_before, tp_from, tp_to, plan) job: decode the prompt and
    `n_before` tokens on GPUs 0 .. tp_from-1, move the K/V of every head in `plan` (None: reshard_plan's)
    with point-to-point sends, one message per (head, layer, K or V), then decode the rest on GPUs
    0 .. tp_to-1. `world` must be max(tp_from, tp_to). The plan is checked first (check_reshard_plan)."""
    reports = []
    for cfg, seed, ids, n_prompt, n_before, tp_from, tp_to, plan in jobs:
        if world != max(tp_from, tp_to):
            raise ValueError(f"world = {world} must be max(tp_from, tp_to) = {max(tp_from, tp_to)}")
        plan = reshard_plan(cfg, tp_from, tp_to) if plan is None else [tuple(m) for m in plan]
        check_reshard_plan(cfg, tp_from, tp_to, plan)
        reports.append(_reshard_one(rank, cfg, seed, torch.as_tensor(ids), n_prompt, n_before, tp_from, tp_to, plan))
    return reports


def _reshard_one(rank, cfg, seed, ids, n_prompt, n_before, tp_from, tp_to, plan) -> ReshardReport:
    steps = list(_steps(ids, n_prompt))
    old_group = dist.new_group(list(range(tp_from)))  # every rank takes part in making every group
    new_group = dist.new_group(list(range(tp_to)))
    logits, caches = [], None
    with torch.no_grad():
        if rank < tp_from:
            model = build_model(cfg, seed)
            for layer in model.layers:
                layer.self_attn = TPAttention(layer.self_attn, cfg, tp_from, rank, old_group)
            caches = [GrowingKVCache() for _ in model.layers]
            for new, pos in steps[:1 + n_before]:
                logits.append(model(new, pos, caches)[:, -1])
        old_heads = tp_kv_heads(cfg, tp_from, rank) if rank < tp_from else []
        B, T, D = ids.shape[0], n_prompt + n_before, cfg.head_dim
        received, ops = {}, []
        sent = [0, 0]
        got = [0, 0]
        for h, src, dst in plan:
            for i in range(cfg.n_layers):
                for name in ("k", "v"):
                    if rank == src:
                        t = getattr(caches[i], name)[:, old_heads.index(h)].contiguous()  # (B, T, D)
                        ops.append(dist.isend(t, dst))
                        sent[0] += 1
                        sent[1] += t.nbytes
                    elif rank == dst:
                        t = torch.empty(B, T, D)
                        received[h, i, name] = t
                        ops.append(dist.irecv(t, src))
                        got[0] += 1
                        got[1] += t.nbytes
        for op in ops:
            op.wait()
        if rank >= tp_to:  # this GPU leaves the job
            return ReshardReport(rank, [], 0, None, torch.stack(logits).numpy(), *sent, *got)
        new_heads = tp_kv_heads(cfg, tp_to, rank)
        new_caches = []
        for i in range(cfg.n_layers):
            c = GrowingKVCache()
            for name in ("k", "v"):
                parts = [getattr(caches[i], name)[:, old_heads.index(h)] if h in old_heads else received[h, i, name]
                         for h in new_heads]
                setattr(c, name, torch.stack(parts, dim=1))  # (B, Hkv_r, T, D)
            new_caches.append(c)
        model = build_model(cfg, seed)
        for layer in model.layers:
            layer.self_attn = TPAttention(layer.self_attn, cfg, tp_to, rank, new_group)
        for new, pos in steps[1 + n_before:]:
            logits.append(model(new, pos, new_caches)[:, -1])
    return ReshardReport(rank, new_heads, cache_nbytes(new_caches), new_caches[0].k.numpy().copy(),
                         torch.stack(logits).numpy(), *sent, *got)


def reshard_message_nbytes_meta(cfg: ModelConfig, batch: int, seq_len: int, dtype: torch.dtype) -> int:
    """`.nbytes` of one reshard message (one head's K, or V, in one layer: `[B, T, D]`), on the meta device."""
    return torch.empty(batch, seq_len, cfg.head_dim, dtype=dtype, device="meta").nbytes


# --- the reference and faults ------------------------------------------------------------------

def single_process(cfg: ModelConfig, seed: int, ids, n_prompt: int):
    """The same steps on the unsharded model: (logits (N + 1, B, V), layer 0's K (B, Hkv, T, D), caches' bytes)."""
    model = build_model(cfg, seed)
    caches = model.new_caches()
    logits = []
    with torch.no_grad():
        for new, pos in _steps(torch.as_tensor(ids), n_prompt):
            logits.append(model(new, pos, caches)[:, -1])
    return torch.stack(logits).numpy(), caches[0].k.numpy().copy(), cache_nbytes(caches)


def faulty_worker(rank: int, world: int, bad_rank: int, fault: str) -> int:
    """For testing the launcher: rank `bad_rank` raises ("raise"), hangs ("hang") or dies ("exit")."""
    if fault == "hang" and rank != bad_rank:
        return 1  # the healthy ranks finish: only the hanging one is still running at the timeout
    if rank == bad_rank:
        if fault == "raise":
            raise ValueError(f"injected fault on rank {rank}")
        if fault == "hang":
            time.sleep(3600)
        if fault == "exit":
            os._exit(3)
    t = torch.ones(1)
    dist.all_reduce(t)  # the healthy ranks wait here for the faulty one
    return int(t.item())
