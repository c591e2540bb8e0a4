"""A correct alternative to solutions/card12_trap/trap.py: the same katas, other algebra.

checks/test_alternatives.py puts this module in place of the solution (`REPLACES`) and requires
every card12 test to pass. Here the capacity is steps per second times seats over steps a seat
(math.floor of a float division for the seats), and the time average builds N(t) after all: a
sweep over the arrival and departure events, each stay clipped to the horizon, adding N · dt
between consecutive events, where the solution slices the area by request instead.
"""

from __future__ import annotations

import math

REPLACES = "solutions/card12_trap/trap.py"


def static_capacity_rps(kv_budget_tokens: int, max_seq_len: int, output_len: int, step_time: float) -> float:
    """The most requests per second a server with static reservation can complete, in requests/s.

    The cache holds `kv_budget_tokens` slots; every admitted request reserves `max_seq_len` of
    them until its last token. Every request generates `output_len` tokens (its prompt fits in
    its reservation); every step takes `step_time` seconds whatever the batch. Requests are
    plentiful: whenever a slot frees up, one is waiting. How many requests run at once (can a
    fraction of a request run?), and how many steps does each one occupy?
    """
    seats = math.floor(kv_budget_tokens / max_seq_len)  # exact for budgets far below 2**52
    steps_per_second = 1.0 / step_time
    return steps_per_second * seats / output_len


def mean_in_system(arrivals: list[float], departures: list[float], horizon: float) -> float:
    """The time-averaged number of requests in the system over [0, horizon], from a log of requests.

    Request i is in the system from `arrivals[i]` (inclusive) until `departures[i]` (exclusive),
    both in seconds, arrivals[i] <= departures[i]. Some may arrive after the horizon, and some
    may still be in the system at the horizon (departures[i] > horizon). The time average is
    (1 / horizon) · ∫ N(t) dt over [0, horizon], N(t) the number in the system at time t.
    """
    events = []  # (time, +1 arrival / -1 departure), inside [0, horizon] only
    for a, d in zip(arrivals, departures):
        if a < horizon:
            events += [(a, 1), (min(d, horizon), -1)]
    area, in_system, last = 0.0, 0, 0.0
    for t, change in sorted(events):
        area += in_system * (t - last)
        in_system, last = in_system + change, t
    return area / horizon
