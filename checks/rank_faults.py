"""A worker that fails on purpose, for the checks of kvref/launch.py (module-level: spawn pickles it by name)."""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist


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
