"""A correct alternative to solutions/card12_trap/trap.py: the capacity as seats times each seat's completion
rate, and the time average by a sweep over sorted arrival and departure events (N(t) built after all).

checks/test_alternatives.py puts this module in place of the solution (`REPLACES`) and requires
every test of the card to pass.

The solution's docstring follows.

card12: the interview trap.

"Can the way a server holds its KV cache lower its throughput?" Per token, caching wins:
reading a token's K and V is far cheaper than recomputing them (card02). Per server, the cache
occupies memory, and memory caps how many requests run at once. A server that reserves
`max_seq_len` cache slots for every request it admits (a static cache, as engines did before
paged attention) holds most of those slots empty, runs few requests per step, and completes
fewer requests per second than the same memory allocated on demand in blocks (paged); once
requests arrive faster than that small batch completes them, the queue, and each request's
wait, grows without bound. Both servers cache: whether a server with no cache at all could
serve more is another question, which this card does not measure.

The model here is a serving simulator with iteration-level batching: at every step the
scheduler admits waiting requests first come, first served while their memory fits, runs one
step that gives every running request one token (a newly admitted request's prompt is fed in
that step and its first token comes out of it), and retires the requests that have all their
tokens. A request then leaves the system.

Little's law relates what the simulator logs: over a long enough run, the average number of
requests in the system L equals the arrival rate λ times the average time a request spends in
the system W (from its arrival to its last token): L = λ · W. On a run that starts and ends
empty it holds exactly, with L the time average over the run, λ = requests / run length and W
the mean of (departure - arrival).

Units: seconds, requests, tokens (one token = one cache slot of K and V in every layer).
"""

from __future__ import annotations

import math

REPLACES = "solutions/card12_trap/trap.py"


def static_capacity_rps(kv_budget_tokens: int, max_seq_len: int, output_len: int, step_time: float) -> float:
    """The most requests per second a server with static reservation can complete, in requests/s.

    The cache holds `kv_budget_tokens` slots; every admitted request reserves `max_seq_len` of
    them until its last token. Every request generates `output_len` tokens (its prompt fits in
    its reservation); every step takes `step_time` seconds whatever the batch. Requests are
    plentiful: whenever a reservation frees up, a request is waiting to take it. How many requests run at once (can a
    fraction of a request run?), and how many steps does each one occupy?

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    seats = math.floor(kv_budget_tokens / max_seq_len)
    per_seat = 1 / step_time / output_len  # one seat completes a request every output_len steps
    return seats * per_seat


def mean_in_system(arrivals: list[float], departures: list[float], horizon: float) -> float:
    """The time-averaged number of requests in the system over [0, horizon], from a log of requests.

    Request i is in the system from `arrivals[i]` (inclusive) until `departures[i]` (exclusive),
    both in seconds, arrivals[i] <= departures[i]. Some may arrive after the horizon, and some
    may still be in the system at the horizon (departures[i] > horizon). The time average is
    (1 / horizon) · ∫ N(t) dt over [0, horizon], N(t) the number in the system at time t. Is
    there a way to compute the integral without building N(t)?

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    # A request's stay clipped to [0, horizon]: nothing when it arrives after the horizon.
    events = sorted([(a, 1) for a in arrivals] + [(d, -1) for d in departures])
    area, n, t = 0.0, 0, 0.0
    for when, change in events:
        if when >= horizon:
            break
        area += n * (when - t)
        n, t = n + change, when
    area += n * (horizon - t)
    return area / horizon
