"""Saved progress: what each kata's last learner-mode run said, kept in `.kvkata/progress.json`.

Every learner-mode pytest run records the katas it ran (the plugin calls `record_run` at the end
of the session); a partial run merges in, so a kata not run keeps its last result. Each result
carries a hash of the kata's stub source (its function or class in katas/<dir>/<module>.py), so an
edit since then shows as *stale* rather than as a result that no longer holds.

Reading the record costs no torch import: `kvkata status` prints the board from it at once.

    {"version": 1,
     "katas": {"card00 repeat_kv": {"outcome": "solved", "time": "2026-01-01T12:00:00",
                                    "stub": "3f2a…", "tests": 5, "note": ""}}}
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import os
import time
from pathlib import Path

from kvkata import ROOT, manifest
from kvkata.paths import pristine_text

OUTCOMES = ("solved", "failing", "todo")  # what a run records
STATUSES = ("solved", "failing", "todo", "not run", "stale")  # what the board shows
VERSION = 1


def path(root: Path = ROOT) -> Path:
    return root / ".kvkata" / "progress.json"


def key(kata: manifest.Kata) -> str:
    return f"{kata.card} {kata.name}"


# --- the stub's source ---------------------------------------------------------------------

def stub_hashes(katas=None, root: Path = ROOT) -> dict[str, str | None]:
    """key -> hash of the kata's function or class in katas/ (None when its file does not parse or lacks it).

    Each module file is read and parsed once, however many katas it holds.
    """
    katas = manifest.all_katas() if katas is None else list(katas)
    parsed: dict[Path, tuple[str, dict] | None] = {}
    out = {}
    for kata in katas:
        file = root / "katas" / kata.dir / f"{kata.module}.py"
        if file not in parsed:
            parsed[file] = _definitions(file)
        out[key(kata)] = _hash(parsed[file], kata.name)
    return out


def pristine_hashes(katas=None) -> dict[str, str | None]:
    """key -> hash of the kata's stub as shipped (kvkata/pristine.zip), as `stub_hashes` hashes it."""
    katas = manifest.all_katas() if katas is None else list(katas)
    parsed: dict[str, tuple[str, dict] | None] = {}
    out = {}
    for kata in katas:
        rel = f"katas/{kata.dir}/{kata.module}.py"
        if rel not in parsed:
            try:
                parsed[rel] = _parse(pristine_text(Path(rel)))
            except OSError:  # no archive, or no copy of this file in it (FileNotFoundError)
                parsed[rel] = None
        out[key(kata)] = _hash(parsed[rel], kata.name)
    return out


def _hash(found: tuple[str, dict] | None, name: str) -> str | None:
    node = found[1].get(name) if found else None
    segment = ast.get_source_segment(found[0], node) if node is not None else None
    return hashlib.sha256(segment.encode()).hexdigest()[:16] if segment is not None else None


def _definitions(file: Path) -> tuple[str, dict] | None:
    try:
        return _parse(file.read_text())
    except OSError:
        return None


def _parse(source: str) -> tuple[str, dict] | None:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    defs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    return source, defs


# --- reading and writing the record ----------------------------------------------------------

def load(root: Path = ROOT) -> dict:
    """The saved results, key -> entry; {} when there is no record yet (or it is unreadable)."""
    try:
        data = json.loads(path(root).read_text())
    except (OSError, ValueError):
        return {}
    return data.get("katas", {}) if isinstance(data, dict) and data.get("version") == VERSION else {}


def merge(saved: dict, settled: dict[str, tuple[str, int, str]], hashes: dict[str, str | None],
          now: float | None = None) -> dict:
    """The record after a run: the settled katas replaced, every other kata as it was."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now))
    merged = dict(saved)
    for k, (outcome, tests, note) in settled.items():
        merged[k] = {"outcome": outcome, "time": stamp, "stub": hashes.get(k), "tests": tests, "note": note}
    return merged


def after_run(settled: dict[str, tuple[str, int, str]], *, narrowed: bool = False, root: Path = ROOT) -> dict:
    """The record as it stands once a run's settled katas (kvkata.board.settled) are merged in.

    `narrowed`: the run named test ids (`file::test`), so a kata's collected tests may be fewer than
    it has and no pass can count it solved; its failures still count.
    """
    if narrowed:
        settled = {k: v for k, v in settled.items() if v[0] != "solved"}
    katas = [k for k in manifest.all_katas() if key(k) in settled]
    return merge(load(root), settled, stub_hashes(katas, root))


def record_run(settled: dict[str, tuple[str, int, str]], *, narrowed: bool = False, root: Path = ROOT) -> dict:
    """Merge a learner-mode run into the saved record and write it (atomically, under a lock)."""
    if not settled:  # nothing ran to the end (a collection, an interrupted start): leave the record alone
        return load(root)
    target = path(root)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.with_suffix(".lock")):
        merged = after_run(settled, narrowed=narrowed, root=root)
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": VERSION, "katas": merged}, indent=1, sort_keys=True))
        os.replace(tmp, target)
    return merged


@contextlib.contextmanager
def _locked(lock: Path):
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows): two runs that finish together may lose one's results
        yield
        return
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --- what the board shows -------------------------------------------------------------------

def statuses(saved: dict | None = None, hashes: dict | None = None, root: Path = ROOT) -> dict[str, str]:
    """key -> one of STATUSES, for every kata in cards.toml.

    A kata whose source is the shipped stub again (a `kvkata reset`, or the stub pasted back) shows as
    "todo" whatever its last run said: a stub fails its tests as a TODO, run or not.
    """
    saved = load(root) if saved is None else saved
    hashes = stub_hashes(root=root) if hashes is None else hashes
    shipped = pristine_hashes()
    out = {}
    for kata in manifest.all_katas():
        entry, now = saved.get(key(kata)), hashes.get(key(kata))
        if entry is None:
            out[key(kata)] = "not run"
        elif entry.get("stub") == now:
            out[key(kata)] = entry["outcome"]
        elif now is not None and now == shipped.get(key(kata)):
            out[key(kata)] = "todo"
        else:
            out[key(kata)] = "stale"
    return out


def first_unsolved(card: manifest.Card | None = None, status: dict[str, str] | None = None) -> manifest.Kata | None:
    """The first kata (of `card`, or of all cards) whose saved status is not a fresh "solved"."""
    status = statuses() if status is None else status
    katas = card.katas if card is not None else manifest.all_katas()
    return next((k for k in katas if status[key(k)] != "solved"), None)
