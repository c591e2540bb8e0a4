"""A correct alternative to solutions/card13_prefix_sharing/sharing.py: keys from sha256 of the repr of (parent,
block ids).

Only what it writes differently is here: the check runs the solution, then these definitions
over it (EXTENDS, checks/test_alternatives.py).
"""

from __future__ import annotations

import hashlib


EXTENDS = "solutions/card13_prefix_sharing/sharing.py"


def prefix_block_keys(token_ids: list[int], block_size: int) -> list[bytes]:
    keys, parent = [], b"root"
    for i in range(len(token_ids) // block_size):
        block = token_ids[i * block_size:(i + 1) * block_size]
        parent = hashlib.sha256(repr((parent, tuple(block))).encode()).digest()
        keys.append(parent)
    return keys


