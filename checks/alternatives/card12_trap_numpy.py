"""A correct alternative to solutions/card12_trap/trap.py: the area under N(t) as numpy's clipped stays, returned
as a Python float.

Only what it writes differently is here: the check runs the solution, then these definitions
over it (EXTENDS, checks/test_alternatives.py).
"""

from __future__ import annotations

import numpy as np

EXTENDS = "solutions/card12_trap/trap.py"


def mean_in_system(arrivals: list[float], departures: list[float], horizon: float) -> float:
    # A request's stay clipped to [0, horizon]: nothing when it arrives after the horizon.
    a, d = np.asarray(arrivals, dtype=float), np.asarray(departures, dtype=float)
    return float(np.clip(np.minimum(d, horizon) - a, 0.0, None).sum() / horizon)
