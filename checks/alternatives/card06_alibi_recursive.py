"""A correct alternative to solutions/card06_positions/alibi.py: the slopes of a head count that is not a power
of two taken from the slopes of twice the lower power, recursively.

Only what it writes differently is here: the check runs the solution, then these definitions
over it (EXTENDS, checks/test_alternatives.py).
"""

from __future__ import annotations

import math


EXTENDS = "solutions/card06_positions/alibi.py"


def alibi_slopes(n_heads: int) -> list[float]:
    def power_of_two(n):  # the geometric sequence: first term and ratio 2^(-8/n)
        start = 2 ** (-8 / n)
        return [start * start ** i for i in range(n)]
    if math.log2(n_heads).is_integer():
        return power_of_two(n_heads)
    low = 2 ** math.floor(math.log2(n_heads))
    return power_of_two(low) + alibi_slopes(2 * low)[0::2][: n_heads - low]


