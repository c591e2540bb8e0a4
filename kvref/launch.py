"""How card07's ranks run: one CPU process per rank in a gloo process group, and every way a launch can fail.

`launch` starts one CPU process per rank, joins them into a
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

Failures: a worker's exception is reported with its rank; a rank that dies without a result
(os._exit, a signal) is reported by rank and exit code; a rank that has not finished when the
launch's timeout expires is reported by rank; every child is terminated (then killed) and
joined before `launch` returns or raises, whichever way it ends (a KeyboardInterrupt or a test
runner's timeout included; those signals are held while the ranks start). A rank waits in the
rendezvous or a collective no longer than the launch's timeout, and dies with the launcher.


The engines it runs are kvref/tensor_parallel.py, kvref/pipeline_parallel.py and kvref/reshard.py.
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

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


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
        warnings.warn(f"kvref.launch.launch starts its {world} ranks with spawn, not fork: {why}; each rank "
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
