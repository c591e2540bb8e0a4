"""Reset a stub to its pristine state, and bring back any earlier version: nothing a learner wrote is lost.

The pristine stubs ship inside the package as one archive, `kvkata/pristine.zip` (written by
`kvkata dev snapshot`, a maintainers' command; a check keeps it equal to `katas/`). Every command
that writes a learner's file first copies the file it replaces to

    .kvkata/backups/<YYYYmmdd-HHMMSS-ffffff>/<path inside the project>

and says where, with a note beside it (`<id>.json`: the command, card and kata, and how many of the
file's katas the saved progress counted solved then). `kvkata restore` lists the backups; `kvkata
restore ID` (or `--latest`) brings one back (after backing up the files it replaces, so a restore
can itself be undone). A reset that would change nothing writes nothing and backs up nothing; a reset
of one kata in a file that does not parse is refused (`--whole-file` puts the whole file back).
"""

from __future__ import annotations

import ast
import json
import shutil
import zipfile
from datetime import datetime
from pathlib import Path

from kvkata import ROOT, manifest
from kvkata.paths import PRISTINE, pristine_text


def backups_dir(root: Path = ROOT) -> Path:
    return root / ".kvkata" / "backups"


def stub_paths(root: Path = ROOT) -> list[Path]:
    """Every stub module the learner edits, relative to the project root, in card order."""
    seen = []
    for kata in manifest.all_katas():
        rel = Path("katas") / kata.dir / f"{kata.module}.py"
        if rel not in seen:
            seen.append(rel)
    return seen


def snapshot(root: Path = ROOT, dest: Path = PRISTINE) -> list[Path]:
    """Maintainers: pack the current stubs as the pristine copy. Returns the paths packed."""
    paths = stub_paths(root)
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as z:
        for rel in paths:
            info = zipfile.ZipInfo(rel.as_posix(), date_time=(2026, 1, 1, 0, 0, 0))  # reproducible bytes
            z.writestr(info, (root / rel).read_bytes(), zipfile.ZIP_DEFLATED)
    return paths


class Unparsable(ValueError):
    """A reset of one kata asked for in a file that does not parse (the message says how to go on)."""


def solved_in(rels: list[Path], root: Path = ROOT) -> dict[str, list[int]]:
    """{file: [katas the saved progress counts solved, katas in the file]} for each stub file in `rels`."""
    from kvkata import progress
    saved = progress.load(root)
    out = {}
    for rel in rels:
        katas = [k for k in manifest.all_katas() if Path("katas") / k.dir / f"{k.module}.py" == Path(rel)]
        if katas:
            solved = sum(saved.get(progress.key(k), {}).get("outcome") == "solved" for k in katas)
            out[Path(rel).as_posix()] = [solved, len(katas)]
    return out


def back_up(paths: list[Path], root: Path = ROOT, note: dict | None = None) -> Path:
    """Copy each existing file of `paths` (relative to root) into a new timestamped backup; return its folder.

    `note` (the command, card, kata) is kept beside the folder as `<id>.json`, with how many of each
    stub file's katas the saved progress counted solved at the time.
    """
    folder = backups_dir(root) / datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    for rel in paths:
        src = root / rel
        if src.exists():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, folder / rel)
    if not folder.exists():
        folder.mkdir(parents=True)
    record = dict(note or {})
    record["solved"] = solved_in(paths, root)
    folder.with_suffix(".json").write_text(json.dumps(record, indent=1, sort_keys=True))
    return folder


def note_of(backup_id: str, root: Path = ROOT) -> dict:
    """The note kept beside a backup ({} for a backup written before notes were kept)."""
    try:
        data = json.loads((backups_dir(root) / f"{backup_id}.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _definition_span(source: str, name: str) -> tuple[int, int] | None:
    """The lines [start, end) of the top-level function or class `name`, decorators included."""
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
            return start, node.end_lineno
    return None


def _reset_text(mine: str | None, fresh: str, kata: str | None, whole_file: bool, rel: Path) -> str:
    """What the file should read after the reset (raises Unparsable: one kata asked for, the file does not parse)."""
    if kata is None or mine is None or whole_file:
        return fresh
    try:
        ours = _definition_span(mine, kata)
    except SyntaxError as e:
        raise Unparsable(
            f"{rel} does not parse (line {e.lineno}: {e.msg}), so {kata} alone cannot be put back. "
            f"Fix the line, or put the whole file back to the stub with --whole-file "
            f"(every kata in it; your file is backed up first).") from None
    theirs = _definition_span(fresh, kata)
    if ours is None or theirs is None:  # the learner removed or renamed it: the stub's definition goes at the end
        if theirs is None:
            return fresh
        pristine = fresh.splitlines(keepends=True)
        return mine + ("" if mine.endswith("\n") else "\n") + "\n\n" + "".join(pristine[theirs[0]:theirs[1]])
    lines, pristine = mine.splitlines(keepends=True), fresh.splitlines(keepends=True)
    return "".join(lines[:ours[0]] + pristine[theirs[0]:theirs[1]] + lines[ours[1]:])


def reset(card_id: str, kata: str | None = None, root: Path = ROOT, *,
          whole_file: bool = False) -> tuple[Path | None, list[Path]]:
    """Put a card's stubs (or one kata's definition) back to pristine, after a backup of what changes.

    Returns (the backup folder, the files written); (None, []) when every file already reads as the
    stub would (nothing written, nothing backed up). Raises KeyError for an unknown card or kata, and
    Unparsable when `kata` is given, its file does not parse and `whole_file` is not set.
    """
    card = manifest.card(card_id)
    katas = [k for k in card.katas if kata is None or k.name == kata]
    if not katas:
        raise KeyError(f"{card.id} has no kata {kata!r}; its katas: {', '.join(k.name for k in card.katas)}")
    rels = list(dict.fromkeys(Path("katas") / k.dir / f"{k.module}.py" for k in katas))
    wanted = {}
    for rel in rels:
        path = root / rel
        mine = path.read_text() if path.exists() else None
        text = _reset_text(mine, pristine_text(rel), kata, whole_file, rel)
        if text != mine:
            wanted[rel] = text
    if not wanted:
        return None, []
    command = "reset " + " ".join([card.id] + ([kata] if kata else []) + (["--whole-file"] if whole_file else []))
    folder = back_up(list(wanted), root, note={"command": command, "card": card.id, "kata": kata})
    for rel, text in wanted.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return folder, list(wanted)


def list_backups(root: Path = ROOT) -> list[tuple[str, list[Path]]]:
    """(backup id, files in it) from oldest to newest."""
    base = backups_dir(root)
    if not base.exists():
        return []
    return [(d.name, sorted(p.relative_to(d) for p in d.rglob("*") if p.is_file()))
            for d in sorted(base.iterdir()) if d.is_dir()]


def latest(root: Path = ROOT) -> str | None:
    """The newest backup's id."""
    found = list_backups(root)
    return found[-1][0] if found else None


def describe(backup_id: str, files: list[Path], root: Path = ROOT) -> list[str]:
    """One entry of `kvkata restore`, in 80 columns: the id, card and kata, the time; the command it
    came before; each file with how many of its katas the saved progress counted solved then."""
    from kvkata.board import wrap
    note = note_of(backup_id, root)
    try:
        when = datetime.strptime(backup_id, "%Y%m%d-%H%M%S-%f").strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        when = "?"
    card = note.get("card")
    kata = note.get("kata") or ("(whole card)" if card else "")
    lines = wrap(f"{backup_id}  {card or ''} {kata}  ({when})", "", "    ")
    if note.get("command"):
        lines += wrap(f"before: kvkata {note['command']}", "    ", "      ")
    solved = note.get("solved", {})
    for f in files:
        counts = solved.get(Path(f).as_posix())
        then = f"  ({counts[0]}/{counts[1]} of its katas solved then)" if counts else ""
        lines += wrap(f"{f}{then}", "    ", "      ")
    return lines


HEADER = "Backups, oldest first (each: its id, card and kata, time; the command it came before; its files):"


def restore(backup_id: str, root: Path = ROOT) -> tuple[Path, list[Path]]:
    """Bring back the files of one backup, after backing up what they replace. Returns (new backup, files)."""
    src = backups_dir(root) / backup_id
    if not src.is_dir():
        known = ", ".join(b for b, _ in list_backups(root)) or "none yet"
        raise KeyError(f"no backup {backup_id!r}; backups: {known}")
    files = sorted(p.relative_to(src) for p in src.rglob("*") if p.is_file())
    folder = back_up(files, root, note={"command": f"restore {backup_id}"})
    for rel in files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, root / rel)
    return folder, files
