"""Spoiler for cards 05 and 12: a discrete-event serving simulator, static reservation against paging.

Read it after you pass those cards. The scheduler of kvref/serving.py, simulated (`simulate`):
Poisson arrivals (`poisson_trace`, seeded), uniform prompt and output lengths, FCFS admission
under a KV memory budget, one token per running request per step, step times from kvref's
roofline (`kvref.roofline`: FLOPs at peak against weights + K/V bytes at bandwidth; or a
constant). Two ways to hold memory:
- "static": admission reserves `max_seq_len` slots per request, held until it finishes
  (what systems before PagedAttention did: Kwon et al. §3, fig. 2);
- "paged": a request holds ceil(positions / block_size) blocks, growing by one block when
  its last one fills; when no block is free the latest-admitted request is preempted (vLLM's
  policy), by recompute or by swap. As in vLLM v1's scheduler, each step grows the running
  requests first and admits from the queue only if that preempted nobody.
It logs every step (time, batch, memory used and allocated) and every change in the number
of requests in the system, and reports throughput, TTFT and TPOT percentiles, memory
utilisation and waste (allocated slots not holding a token's K/V). `steady_decode` (card05) is
the batch and step time of a decode step at steady state under the same admission.

Positions held: after a request has been fed f tokens its cache holds f positions; a step that
generates its n-th output token has fed prompt + n - 1 tokens (the newest token is not fed yet).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from kvref import roofline
from kvref.config import ModelConfig
from kvref.hardware import Hardware

# PCIe Gen5 x16 (H100 SXM's host link; PCI-SIG spec, 32 GT/s x 16 lanes): 64 GB/s per direction raw,
# 63.0 GB/s after 128b/130b encoding; pinned host copies reach less. An upper bound on the swap rate.
HOST_BANDWIDTH = 64e9


# --- the simulator --------------------------------------------------------------------------

@dataclass(frozen=True)
class TraceRequest:
    rid: int
    arrival: float    # seconds
    prompt_len: int
    output_len: int   # tokens to generate (>= 1)


def poisson_trace(n: int, rate: float, prompt_lens: tuple[int, int], output_lens: tuple[int, int],
                  seed: int) -> list[TraceRequest]:
    """`n` requests arriving as a Poisson process of `rate` per second, from t = 0.

    Inter-arrival times are exponential with mean 1 / rate; prompt and output lengths uniform
    on the inclusive ranges given. The same seed gives the same trace.
    """
    _check_int("n", n, 1)
    if not (isinstance(rate, (int, float)) and not isinstance(rate, bool) and math.isfinite(rate) and rate > 0):
        raise ValueError(f"rate must be a finite number > 0, got {rate!r}")
    for name, (lo, hi) in (("prompt_lens", prompt_lens), ("output_lens", output_lens)):
        if not (1 <= lo <= hi):
            raise ValueError(f"{name} must be a range 1 <= lo <= hi, got {(lo, hi)}")
    rng = random.Random(seed)
    t, out = 0.0, []
    for rid in range(n):
        out.append(TraceRequest(rid, t, rng.randint(*prompt_lens), rng.randint(*output_lens)))
        t += rng.expovariate(rate)
    return out


@dataclass(frozen=True)
class SimConfig:
    cfg: ModelConfig
    hw: Hardware
    kv_budget_bytes: int          # memory for K/V, in bytes
    policy: str = "paged"         # "static" (reserve max_seq_len) or "paged" (blocks on demand)
    max_seq_len: int = 2048       # slots a static reservation holds per request
    block_size: int = 16          # positions per block when paged (vLLM's default)
    max_batch: int = 256          # requests per step at most
    preemption: str = "recompute"  # or "swap"
    dtype: torch.dtype = torch.bfloat16
    step_time: float | None = None  # seconds per step whatever it holds; None: kvref's roofline
    host_bandwidth: float = HOST_BANDWIDTH  # bytes/s for swapping

    def __post_init__(self) -> None:
        if self.policy not in ("static", "paged"):
            raise ValueError(f"policy must be 'static' or 'paged', got {self.policy!r}")
        if self.preemption not in ("recompute", "swap"):
            raise ValueError(f"preemption must be 'recompute' or 'swap', got {self.preemption!r}")
        for name in ("kv_budget_bytes", "max_seq_len", "block_size", "max_batch"):
            _check_int(name, getattr(self, name), 1)
        if self.step_time is not None and not (self.step_time > 0 and math.isfinite(self.step_time)):
            raise ValueError(f"step_time must be > 0 seconds or None, got {self.step_time!r}")
        if self.step_time is None and self.cfg.sliding_window:
            raise ValueError("the simulator's roofline costs have no sliding window")

    @property
    def kv_bytes_per_token(self) -> int:
        return int(roofline.kv_bytes_per_token(self.cfg, self.dtype.itemsize))

    @property
    def capacity_tokens(self) -> int:
        """K/V slots the budget holds (paged: whole blocks only)."""
        slots = self.kv_budget_bytes // self.kv_bytes_per_token
        return slots - slots % self.block_size if self.policy == "paged" else slots


@dataclass
class RequestRecord:
    rid: int
    arrival: float
    prompt_len: int
    output_len: int
    admitted: float | None = None     # first time it was scheduled
    first_token: float | None = None  # end of the step that generated its first token
    finish: float | None = None       # end of the step that generated its last token
    preemptions: int = 0


@dataclass(frozen=True)
class StepRecord:
    start: float
    end: float
    batch: int            # requests that ran
    tokens_fed: int       # prompt tokens (prefill, recompute) and one token per decoding request
    used_tokens: int      # positions holding a token's K/V after the step
    allocated_tokens: int  # slots reserved or in allocated blocks during the step
    waiting: int          # requests queued (arrived, not running) when the step started


@dataclass
class SimResult:
    sim: SimConfig
    requests: list[RequestRecord]
    steps: list[StepRecord]
    in_system: list[tuple[float, int]]  # (time, requests arrived and not finished), at every change
    swap_bytes: int = 0                 # bytes moved over the host link by swaps, both ways
    recomputed_tokens: int = 0          # tokens fed again after preemption by recompute

    @property
    def makespan(self) -> float:
        return max(r.finish for r in self.requests) - min(r.arrival for r in self.requests)

    @property
    def throughput(self) -> float:
        """Output tokens per second, first arrival to last finish."""
        return sum(r.output_len for r in self.requests) / self.makespan

    def ttft(self) -> list[float]:
        """Arrival to the end of the step that generated the first token. The roofline's prefill
        FLOPs charge the lm_head on every prompt position (kvref.roofline.forward_flops), where an
        engine computes logits for the last one only: 7.0-7.4% more prefill FLOPs than that for
        Llama-3-8B's prompts of 16 to 2,048 tokens, which lengthens a roofline-timed TTFT."""
        return [r.first_token - r.arrival for r in self.requests]

    def tpot(self) -> list[float]:
        return [(r.finish - r.first_token) / (r.output_len - 1) for r in self.requests if r.output_len > 1]

    def time_in_system(self) -> list[float]:
        return [r.finish - r.arrival for r in self.requests]

    def time_average_in_system(self, horizon: float) -> float:
        """∫ N(t) dt / horizon over [0, horizon], from the log of changes in N."""
        area, (t_prev, n_prev) = 0.0, (0.0, 0)
        for t, n in self.in_system:
            if t >= horizon:
                break
            area += n_prev * (t - t_prev)
            t_prev, n_prev = t, n
        return (area + n_prev * (horizon - t_prev)) / horizon

    def memory_utilisation(self) -> float:
        """Time-averaged share of the budget's slots holding a token's K/V."""
        busy = sum(s.end - s.start for s in self.steps)
        return sum(s.used_tokens * (s.end - s.start) for s in self.steps) / (busy * self.sim.capacity_tokens)

    def memory_waste(self) -> float:
        """Time-averaged share of allocated slots that hold no token's K/V (reserved, or a block's tail)."""
        alloc = sum(s.allocated_tokens * (s.end - s.start) for s in self.steps)
        used = sum(s.used_tokens * (s.end - s.start) for s in self.steps)
        return 1 - used / alloc

    def summary(self) -> dict[str, float]:
        ttft, tpot = self.ttft(), self.tpot()
        return {"throughput_tok_s": self.throughput, "ttft_p50": percentile(ttft, 50), "ttft_p90": percentile(ttft, 90),
                "ttft_p99": percentile(ttft, 99), "tpot_p50": percentile(tpot, 50) if tpot else 0.0,
                "tpot_p99": percentile(tpot, 99) if tpot else 0.0, "mem_utilisation": self.memory_utilisation(),
                "mem_waste": self.memory_waste(), "max_batch": max(s.batch for s in self.steps)}


def percentile(xs: list[float], p: float) -> float:
    """Nearest-rank percentile: the smallest x with at least p% of the values <= x."""
    if not xs:
        raise ValueError("percentile of no values")
    ordered = sorted(xs)
    return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]


@dataclass(eq=False)
class _Live:
    rec: RequestRecord
    fed: int = 0          # tokens whose K/V the cache holds
    generated: int = 0
    blocks: int = 0       # paged: blocks held
    swapped: bool = False


class _Costs:
    """Roofline step costs for one config, with the per-token constants computed once."""

    def __init__(self, sim: SimConfig) -> None:
        self.sim = sim
        if sim.step_time is not None:
            return  # a constant step: no roofline to cost (and none needed for configs it cannot cost)
        cfg, nb = sim.cfg, sim.dtype.itemsize
        self.decode_flops_0 = roofline.forward_flops(cfg, 1, 1, 0)  # a decode token with nothing cached
        self.flops_per_key = roofline.forward_flops(cfg, 1, 1, 1) - self.decode_flops_0
        self.kv_tok = roofline.kv_bytes_per_token(cfg, nb)

    def step_time(self, prefills: list[tuple[int, int]], decode_keys: list[int], tokens: int, swap_bytes: int) -> float:
        """prefills: (tokens fed, positions already cached); decode_keys: positions each decode token attends."""
        sim = self.sim
        if sim.step_time is not None:
            return sim.step_time + swap_bytes / sim.host_bandwidth
        flops = sum(roofline.forward_flops(sim.cfg, 1, s, c) for s, c in prefills)
        flops += len(decode_keys) * self.decode_flops_0 + self.flops_per_key * (sum(decode_keys) - len(decode_keys))
        kv = (sum(s + c for s, c in prefills) + sum(decode_keys)) * self.kv_tok  # read the cached, write the new
        bytes_ = roofline.weight_bytes(sim.cfg, tokens, sim.dtype.itemsize) + kv
        return roofline.step_time(flops, bytes_, sim.hw, sim.dtype) + swap_bytes / sim.host_bandwidth


def simulate(trace: list[TraceRequest], sim: SimConfig) -> SimResult:
    """Serve `trace` with iteration-level batching under `sim`'s memory policy; log every step."""
    if not isinstance(sim, SimConfig):
        raise TypeError(f"sim must be a SimConfig, got {type(sim).__name__}")
    if not trace:
        raise ValueError("an empty trace")
    bs, cap = sim.block_size, sim.capacity_tokens
    for r in trace:
        need = r.prompt_len + r.output_len - 1
        if sim.policy == "static" and need > sim.max_seq_len:
            raise ValueError(f"request {r.rid} needs {need} positions, more than max_seq_len {sim.max_seq_len}")
        if need > cap if sim.policy == "static" else _blocks(need, bs) * bs > cap:
            raise ValueError(f"request {r.rid} needs {need} positions; the budget holds {cap}")
    if sim.policy == "static" and sim.max_seq_len > cap:
        raise ValueError(f"a static reservation of max_seq_len {sim.max_seq_len} slots is more than the budget's "
                         f"{cap} slots: no request could ever be admitted")
    costs = _Costs(sim)
    records = [RequestRecord(r.rid, r.arrival, r.prompt_len, r.output_len) for r in trace]
    arrivals = sorted(records, key=lambda r: (r.arrival, r.rid))
    res = SimResult(sim, records, [], [])
    waiting: list[_Live] = []
    running: list[_Live] = []
    events: list[tuple[float, int]] = []  # (time, +1 arrival / -1 departure)
    t, nxt = 0.0, 0
    while nxt < len(arrivals) or waiting or running:
        while nxt < len(arrivals) and arrivals[nxt].arrival <= t:
            waiting.append(_Live(arrivals[nxt]))
            events.append((arrivals[nxt].arrival, +1))
            nxt += 1
        if not waiting and not running:
            t = arrivals[nxt].arrival
            continue
        n_waiting = len(waiting)
        # vLLM v1's order: the running requests get the blocks they grow into first, preempting
        # if they must; the queue is admitted only when nothing was preempted this step, into the
        # blocks the running ones left free. (v0 with chunked prefill also runs the running ones
        # first but, after a preemption, holds back only swapped-out requests; v0 without it
        # schedules prefills first.)
        swap_bytes, preempted = _grow(sim, running, waiting, res)
        if not preempted:
            swap_bytes += _admit(sim, running, waiting, t)
        if not running:
            raise RuntimeError(f"no request can run at t = {t} s with {len(waiting)} waiting: the simulator "
                               f"would log empty steps forever")
        prefills, decode_keys, tokens = [], [], 0
        for live in running:
            context = live.rec.prompt_len + live.generated
            if live.fed == 0:
                prefills.append((context, 0))
                tokens += context
            else:
                decode_keys.append(live.fed + 1)
                tokens += 1
        dt = costs.step_time(prefills, decode_keys, tokens, swap_bytes)
        res.swap_bytes += swap_bytes
        allocated = len(running) * sim.max_seq_len if sim.policy == "static" else bs * sum(x.blocks for x in running)
        for live in running:
            live.fed = live.rec.prompt_len + live.generated
            live.generated += 1
        used = sum(x.fed for x in running)
        res.steps.append(StepRecord(t, t + dt, len(running), tokens, used, allocated, n_waiting))
        t += dt
        for live in list(running):
            if live.generated == 1 and live.rec.first_token is None:
                live.rec.first_token = t
            if live.generated == live.rec.output_len:
                live.rec.finish = t
                running.remove(live)
                events.append((t, -1))
    events.sort(key=lambda e: (e[0], -e[1]))
    n = 0
    for time, d in events:
        n += d
        res.in_system.append((time, n))
    return res


def _blocks(positions: int, block_size: int) -> int:
    return -(-positions // block_size)


def _admit(sim: SimConfig, running: list[_Live], waiting: list[_Live], t: float) -> int:
    """FCFS admission: the head of the queue joins while the batch and its memory fit. Returns swap-in bytes."""
    swap_in = 0
    while waiting and len(running) < sim.max_batch:
        head = waiting[0]
        if sim.policy == "static":
            if (len(running) + 1) * sim.max_seq_len > sim.capacity_tokens:
                break
        else:
            # vLLM admits a request when the blocks for its context (prompt, and any tokens it
            # generated before a preemption) and the position it writes next are free.
            need = _blocks(head.rec.prompt_len + head.generated, sim.block_size)
            if sum(x.blocks for x in running) + need > sim.capacity_tokens // sim.block_size:
                break
            head.blocks = need
            if head.swapped:
                swap_in += head.fed * _kv_tok(sim)
                head.swapped = False
        waiting.pop(0)
        running.append(head)
        if head.rec.admitted is None:
            head.rec.admitted = t
    return swap_in


def _grow(sim: SimConfig, running: list[_Live], waiting: list[_Live], res: SimResult) -> tuple[int, int]:
    """Paged: give each request the block its next position needs, preempting the latest admitted
    when none is free. Returns (swap-out bytes, requests preempted)."""
    if sim.policy == "static":
        return 0, 0
    total = sim.capacity_tokens // sim.block_size
    swap_out = preempted = 0
    for live in list(running):
        if live not in running:
            continue  # preempted below
        need = _blocks(live.rec.prompt_len + live.generated, sim.block_size)
        while need > live.blocks and sum(x.blocks for x in running) + 1 > total:
            victim = running[-1]
            running.remove(victim)
            victim.rec.preemptions += 1
            preempted += 1
            if sim.preemption == "swap":
                swap_out += victim.fed * _kv_tok(sim)
                victim.swapped = True
            else:
                res.recomputed_tokens += victim.fed
                victim.fed = 0
            victim.blocks = 0
            waiting.insert(0, victim)
            if victim is live:
                break
        if live in running and need > live.blocks:
            live.blocks = need
    return swap_out, preempted


def _kv_tok(sim: SimConfig) -> int:
    return sim.kv_bytes_per_token


def steady_decode(cfg: ModelConfig, hw: Hardware, kv_budget_bytes: int, seq_len: int,
                  dtype: torch.dtype) -> tuple[int, float]:
    """(batch, step seconds) of a decode step at steady state: as many sequences of `seq_len`
    positions as admission fits under the budget (each reserving room for the position it
    writes), each adding one token, timed by the simulator's roofline step."""
    sim = SimConfig(cfg, hw, kv_budget_bytes, policy="static", max_seq_len=seq_len + 1, max_batch=2**62, dtype=dtype)
    running: list[_Live] = []
    waiting = [_Live(RequestRecord(0, 0.0, seq_len, 2))]
    while True:
        _admit(sim, running, waiting, 0.0)
        if waiting:
            break
        waiting.append(_Live(RequestRecord(len(running), 0.0, seq_len, 2)))
    if not running:
        return 0, math.inf
    dt = _Costs(sim).step_time([], [seq_len + 1] * len(running), len(running), 0)
    return len(running), dt


def _check_int(name: str, x, minimum: int) -> None:
    if not isinstance(x, int) or isinstance(x, bool):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if x < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {x}")
