"""A correct alternative to solutions/card12_trap/trap.py: the capacity as seats times each seat's completion
rate, and the time average by a sweep over sorted arrival and departure events (N(t) built after all).

checks/test_alternatives.py puts this module in place of the solution (`REPLACES`) and requires
every test of the card to pass.
"""

from __future__ import annotations

import math

REPLACES = "solutions/card12_trap/trap.py"


def static_capacity_rps(kv_budget_tokens: int, max_seq_len: int, output_len: int, step_time: float) -> float:
    seats = math.floor(kv_budget_tokens / max_seq_len)
    per_seat = 1 / step_time / output_len  # one seat completes a request every output_len steps
    return seats * per_seat


def mean_in_system(arrivals: list[float], departures: list[float], horizon: float) -> float:
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
