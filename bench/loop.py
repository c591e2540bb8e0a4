"""The learner's loop, timed on a fresh clone of HEAD, as ratios to `python -c "import torch, hypothesis"`.

    python bench/loop.py                                # every card
    python bench/loop.py --cards card07,card12 --repeat 3
    python bench/loop.py --out DIR                      # results elsewhere (default bench/results)

Clones this repository's HEAD into a temporary folder (`git clone`, then a checkout of HEAD's
commit: uncommitted changes are not measured) and runs everything there with THIS interpreter
(no install: PYTHONPATH points at the clone, and the script checks that the clone's kvkata is the
one imported). It times, interleaved with the baseline `python -c "import torch, hypothesis"` so
that every ratio comes from the same run on the same machine:

- `pytest -k cardNN` on fresh stubs, for each card (issue 20's target: at most 2.0x);
- `pytest --solutions -k cardNN`, for each card (at most 3.0x);
- `pytest` on fresh stubs, all cards (at most 5.0x);
- `kvkata status`, where the command exists (it reads saved progress; timed after the full run);
- `kvkata watch CARD`: from a save of the card's stub to the first failure's message on screen
  (at most 1.5x; card07 3x), for each selected card.

Each figure is the median of --repeat runs. Writes `loop.md` (and `loop.json`) with the ratios, the
raw seconds, every baseline sample, the date, the commit and the load average before and after.
The machine is often shared: quote the load average with any figure, and rerun on a quiet machine
before comparing with a target.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BASELINE = [sys.executable, "-c", "import torch, hypothesis"]
TARGETS = {"learner": 2.0, "solutions": 3.0, "full": 5.0, "watch": 1.5, "watch card07": 3.0}
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1bc")
# What counts as "the first failure's message on screen" after a save: the lines kvkata writes for a
# failing kata (a TODO, a hang, a refusal, a wrong answer, a failure), whatever watch's layout.
MESSAGE = re.compile(r"^\s*(TODO |TIMEOUT |REFUSED |NOT RUN |FAILED |first failure|called |.*does not import)")


def sh(*args: str, cwd: Path | None = None) -> str:
    return subprocess.run(args, cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def clone_head(dest: Path) -> str:
    commit = sh("git", "rev-parse", "HEAD", cwd=REPO)
    top = sh("git", "rev-parse", "--show-toplevel", cwd=REPO)
    sh("git", "clone", "--quiet", "--no-checkout", top, str(dest))
    sh("git", "-c", "advice.detachedHead=false", "checkout", "--quiet", commit, cwd=dest)
    return commit


def env_for(clone: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("KVKATA_MODE", "PYTEST_ADDOPTS", "HYPOTHESIS_PROFILE", "PYTHONPATH")}
    return {**env, "PYTHONPATH": str(clone)}


def timed(cmd: list[str], cwd: Path, env: dict, timeout: float = 900) -> tuple[float, int]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return time.perf_counter() - start, proc.returncode


def median_of(repeat: int, cmd: list[str], cwd: Path, env: dict) -> tuple[float, list[float], int]:
    samples, code = [], 0
    for _ in range(repeat):
        seconds, code = timed(cmd, cwd, env)
        samples.append(seconds)
    return statistics.median(samples), samples, code


def reset_stubs(clone: Path) -> None:
    """Fresh stubs and no saved progress: the tree as cloned."""
    sh("git", "checkout", "--quiet", "--", "katas", cwd=clone)
    sh("git", "clean", "-fdxq", "--", "katas", cwd=clone)
    shutil.rmtree(clone / ".kvkata", ignore_errors=True)


def has_command(clone: Path, env: dict, name: str) -> bool:
    """Whether `kvkata NAME` exists at this commit (argparse exits 2 on an unknown command)."""
    proc = subprocess.run([sys.executable, "-m", "kvkata.cli", name, "--help"], cwd=clone, env=env,
                          capture_output=True, text=True)
    return proc.returncode == 0


def watch_save_to_message(clone: Path, env: dict, card_id: str, timeout: float = 120) -> float | str:
    """Seconds from a save of the card's first stub to the first failure's message that `kvkata watch`
    prints after it; a string saying why when it could not be measured."""
    sys.path.insert(0, str(clone))
    try:
        from kvkata import manifest  # the clone's manifest, for the stub's path
        card = manifest.card(card_id)
        stub = clone / "katas" / card.dir / f"{card.katas[0].module}.py"
    finally:
        sys.path.pop(0)
    proc = subprocess.Popen([sys.executable, "-m", "kvkata.cli", "watch", card_id], cwd=clone,
                            env={**env, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0)
    fd = proc.stdout.fileno()
    pending = b""

    def lines_until(deadline: float, quiet: float | None = None):
        """Complete lines as they arrive, read straight from the pipe (no buffer that select cannot see);
        with `quiet`, stop once nothing has arrived for that long."""
        nonlocal pending
        last = time.monotonic()
        while time.monotonic() < deadline and (quiet is None or time.monotonic() - last < quiet):
            if not select.select([fd], [], [], 0.1)[0]:
                if proc.poll() is not None:
                    return
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                return
            last = time.monotonic()
            pending += chunk
            *done, pending = pending.split(b"\n")
            for line in done:
                yield ANSI.sub("", line.decode(errors="replace"))

    def wait_for_message(deadline: float) -> bool:
        return any(MESSAGE.match(line) for line in lines_until(deadline))

    try:
        if not wait_for_message(time.monotonic() + timeout):
            return "watch printed no failure message for the first run"
        # Let the first run's output finish (2 s of quiet) and the file watcher start, then save.
        for _ in lines_until(time.monotonic() + 60, quiet=2.0):
            pass
        pending = b""
        start = time.monotonic()
        stub.write_text(stub.read_text() + "\n")
        if not wait_for_message(start + timeout):
            return f"no failure message within {timeout:g} s of the save"
        return time.monotonic() - start
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        sh("git", "checkout", "--quiet", "--", str(stub.relative_to(clone)), cwd=clone)


def fmt(seconds) -> str:
    return f"{seconds:.2f}" if isinstance(seconds, float) else str(seconds)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cards", help="comma-separated card ids (default: every card)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per figure; the median is kept (default 1)")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for loop.md and loop.json")
    parser.add_argument("--no-watch", action="store_true", help="skip the watch figures")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    load_before = os.getloadavg()
    started = dt.datetime.now().astimezone()
    with tempfile.TemporaryDirectory(prefix="kvkata-loop-") as tmp:
        clone = Path(tmp) / "kvkata"
        commit = clone_head(clone)
        env = env_for(clone)
        where = subprocess.run([sys.executable, "-c", "import kvkata; print(kvkata.ROOT)"], cwd=clone, env=env,
                               capture_output=True, text=True).stdout.strip()
        if Path(where).resolve() != clone.resolve():
            sys.exit(f"bench/loop.py: the clone's kvkata is not the one imported ({where}); "
                     "is an installed kvkata shadowing PYTHONPATH?")
        sys.path.insert(0, str(clone))
        from kvkata import manifest
        all_ids = [c.id for c in manifest.cards()]
        sys.path.pop(0)
        cards = args.cards.split(",") if args.cards else all_ids
        unknown = [c for c in cards if c not in all_ids]
        if unknown:
            parser.error(f"no card named {', '.join(unknown)}; cards: {', '.join(all_ids)}")

        baselines: list[float] = []

        def baseline() -> None:
            seconds, code = timed(BASELINE, clone, env)
            assert code == 0, "python -c 'import torch, hypothesis' failed"
            baselines.append(seconds)

        pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly"]
        # Untimed: one collection writes the clone's bytecode caches, which a fresh clone lacks; otherwise
        # the first card measured pays for compiling every module.
        warm_up, _ = timed(pytest + ["--collect-only"], clone, env)
        rows = []
        for card_id in cards:
            baseline()
            reset_stubs(clone)
            learner, learner_samples, learner_code = median_of(args.repeat, pytest + ["-k", card_id], clone, env)
            solutions, solutions_samples, solutions_code = median_of(
                args.repeat, pytest + ["--solutions", "-k", card_id], clone, env)
            rows.append({"card": card_id, "learner": learner, "learner_samples": learner_samples,
                         "learner_exit": learner_code, "solutions": solutions,
                         "solutions_samples": solutions_samples, "solutions_exit": solutions_code})
            print(f"{card_id}: -k {learner:.2f} s (exit {learner_code}), --solutions -k {solutions:.2f} s "
                  f"(exit {solutions_code})", flush=True)
        baseline()
        reset_stubs(clone)
        full, full_samples, full_code = median_of(args.repeat, pytest, clone, env)
        print(f"pytest (all cards): {full:.2f} s (exit {full_code})", flush=True)

        notes = []
        status = None
        if has_command(clone, env, "status"):
            # After the full run above: the progress it saved is what status reads.
            status, status_samples, status_code = median_of(args.repeat, [sys.executable, "-m", "kvkata.cli", "status"],
                                                            clone, env)
            print(f"kvkata status: {status:.2f} s (exit {status_code})", flush=True)
        else:
            notes.append("`kvkata status` does not exist at this commit: not measured.")

        watch = {}
        if args.no_watch:
            notes.append("watch: skipped (--no-watch).")
        elif not has_command(clone, env, "watch"):
            notes.append("`kvkata watch` does not exist at this commit: not measured.")
        else:
            for card_id in cards:
                baseline()
                reset_stubs(clone)
                samples = [watch_save_to_message(clone, env, card_id) for _ in range(args.repeat)]
                numbers = [s for s in samples if isinstance(s, float)]
                watch[card_id] = statistics.median(numbers) if numbers else samples[0]
                print(f"watch {card_id}: save -> message {fmt(watch[card_id])} s", flush=True)
        baseline()
        reset_stubs(clone)

    load_after = os.getloadavg()
    base = statistics.median(baselines)
    versions = subprocess.run([sys.executable, "-c", "import torch, hypothesis, pytest; "
                               "print(torch.__version__, hypothesis.__version__, pytest.__version__)"],
                              capture_output=True, text=True).stdout.split()

    def ratio(seconds, target_key) -> str:
        if not isinstance(seconds, float):
            return "-"
        r = seconds / base
        target = TARGETS[target_key]
        return f"{r:.2f}x {'ok' if r <= target else 'OVER'} (≤ {target:g}x)"

    lines = [
        "# The learner's loop (bench/loop.py)",
        "",
        f"- date: {started:%Y-%m-%d %H:%M %Z}; commit `{commit}` (a fresh clone of HEAD)",
        f"- machine: {os.cpu_count()} cores, {platform.platform()}; python {platform.python_version()}, "
        f"torch {versions[0] if versions else '?'}, hypothesis {versions[1] if len(versions) > 1 else '?'}, "
        f"pytest {versions[2] if len(versions) > 2 else '?'}",
        f"- load average (1, 5, 15 min): before {', '.join(f'{x:.2f}' for x in load_before)}; "
        f"after {', '.join(f'{x:.2f}' for x in load_after)}",
        f"- baseline `python -c \"import torch, hypothesis\"`: median {base:.2f} s of {len(baselines)} samples taken "
        f"between the runs ({', '.join(f'{b:.2f}' for b in baselines)})",
        f"- each figure: the median of {args.repeat} run(s), wall time of the whole command; ratios are to the "
        "baseline's median",
        f"- before timing: one untimed `pytest --collect-only` in the clone ({warm_up:.1f} s) writes its bytecode "
        "caches",
        f"- command: `python bench/loop.py{' --cards ' + args.cards if args.cards else ''} --repeat {args.repeat}`",
        "",
        "| card | `pytest -k cardNN` (stubs) | ratio | `pytest --solutions -k cardNN` | ratio | watch: save → message | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        card_id = row["card"]
        w = watch.get(card_id, "-")
        lines.append(f"| {card_id} | {row['learner']:.2f} s | {ratio(row['learner'], 'learner')} "
                     f"| {row['solutions']:.2f} s | {ratio(row['solutions'], 'solutions')} "
                     f"| {fmt(w)}{' s' if isinstance(w, float) else ''} "
                     f"| {ratio(w, 'watch card07' if card_id == 'card07' else 'watch')} |")
    lines += ["", f"- `pytest` (all cards, fresh stubs): {full:.2f} s, {ratio(full, 'full')}, exit {full_code}"]
    if status is not None:
        lines.append(f"- `kvkata status` (after that run): {status:.2f} s, {status / base:.2f}x")
    exits = [f"{r['card']} learner exit {r['learner_exit']}, solutions exit {r['solutions_exit']}" for r in rows
             if r["learner_exit"] != 1 or r["solutions_exit"] != 0]
    if exits:
        lines.append(f"- unexpected exit codes (want 1 on stubs, 0 on solutions): {'; '.join(exits)}")
    lines += [f"- {n}" for n in notes]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "loop.md").write_text("\n".join(lines) + "\n")
    (args.out / "loop.json").write_text(json.dumps({
        "date": started.isoformat(), "commit": commit, "load_before": load_before, "load_after": load_after,
        "baselines": baselines, "repeat": args.repeat, "cards": rows, "full": full, "full_samples": full_samples,
        "full_exit": full_code, "status": status, "watch": watch, "notes": notes}, indent=1))
    print("\n".join(lines))
    print(f"\nwrote {args.out / 'loop.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
