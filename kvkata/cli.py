"""The `kvkata` command: the progress board, graded hints, interviewer notes.

    kvkata                        run your katas (learner mode) and print the board
    kvkata board [-k EXPR]        the same, for the tests pytest's -k selects
    kvkata hint CARD [--level N]  hints for a card's katas (1 = nudge, 2 = method, 3 = near-answer)
    kvkata interview CARD         the interviewer notes for a card: agenda, questions with rubric, derivation
    kvkata interview CARD --sheet the questions only, to hand to the candidate
    kvkata interview --live CARD  run the card's tests on the code in katas/ and say what to probe
    kvkata status                 the board from your saved progress, at once (runs nothing)
    kvkata list                   the cards and their katas, with each kata's saved status
    kvkata watch [CARD] [--once]  rerun the kata you are on whenever a file under katas/ is saved
    kvkata reset CARD [KATA]      put a card's stubs (or one kata) back, after backing up your file
    kvkata restore [ID]           list the backups, or bring one back (backing up what it replaces)
    kvkata plot [--out DIR]       figures from kvref's models and the benchmarks, as PNGs
    kvkata explore [--out PATH]   one self-contained HTML page: the calculator, the cache filling, paging
    kvkata cards --anki PATH      an Anki deck of the interviewer questions
    kvkata snapshot               maintainers: pack the current stubs as the pristine copy reset uses
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path

from kvkata import ROOT, board, manifest, progress, runner


def _card_or_exit(card_id: str) -> manifest.Card:
    try:
        return manifest.card(card_id)
    except KeyError:
        valid = ", ".join(c.id for c in manifest.cards())
        print(f"kvkata: unknown card {card_id!r}. Valid cards: {valid}", file=sys.stderr)
        raise SystemExit(2) from None


def _learner_run(args: list[str]) -> runner.Result:
    """The learner's tests in a new interpreter, in learner mode whatever KVKATA_MODE says."""
    return runner.run(["-q", "--tb=no", "--no-header", "--learner", *args], env=dict(os.environ, KVKATA_MODE="learner"))


def cmd_board(args) -> int:
    """Run the learner's tests in a subprocess and build the board from their real outcomes."""
    selected = ["-k", args.k] if args.k else []
    print(f"kvkata: running your katas (pytest {' '.join(selected) or 'with every card'}) ...", flush=True)
    result = _learner_run(selected)
    data = result.data
    if data is None or result.returncode not in (0, 1) or not data["tests"]:
        # Interrupted (a test module that does not import, a usage error) or nothing selected:
        # show pytest's own words rather than an empty board.
        print(result.output[-8000:], file=sys.stderr)
        why = "no test was selected" if data is not None and not data["tests"] else "the test run did not finish"
        print(f"kvkata: {why}; see pytest's output above.", file=sys.stderr)
        return result.returncode or 2
    state = board.RunState.from_json(data)
    outcomes = list(state.results.values())
    counts = {o: outcomes.count(o) for o in ("passed", "failed", "todo", "broken", "skipped")}
    print("kvkata progress (" + ", ".join(f"{n} {o}" for o, n in counts.items() if n) + ")")
    for card_id, why in state.broken.items():
        print(f"  {card_id} does not import: {why}")
    for line in board.render(state, progress.after_run(board.settled(state))):
        print(line)
    return 0 if counts["failed"] == counts["todo"] == counts["broken"] == 0 else 1


def cmd_status(args) -> int:
    """The board from the saved progress: runs nothing, imports no torch."""
    saved = progress.load()
    if saved:
        latest = max(entry.get("time", "") for entry in saved.values())
        print(f"kvkata progress, as your runs left it (the latest at {latest.replace('T', ' ')}; "
              "pytest, kvkata and kvkata watch update it):")
    else:
        print("kvkata progress: nothing run yet (pytest, kvkata and kvkata watch save what they run):")
    for line in board.render(None, status=progress.statuses(saved)):
        print(line)
    return 0


def cmd_hint(args) -> int:
    card = _card_or_exit(args.card)
    hints = card.hints()
    names = [k.name for k in card.katas]
    if args.kata:
        if args.kata not in hints:
            print(f"kvkata: {card.id} has no kata {args.kata!r}. Its katas: {', '.join(names)}", file=sys.stderr)
            return 2
        names = [args.kata]
    label = {1: "nudge", 2: "method", 3: "near-answer"}
    print(f"{card.id}: {card.title} - hints, level {args.level} ({label.get(args.level, 'level ' + str(args.level))})")
    for name in names:
        levels = hints[name]
        level = min(args.level, len(levels))
        kata = next(k for k in card.katas if k.name == name)
        print(f"\n  {name}  ({kata.where()})")
        print(textwrap.fill(levels[level - 1], width=96, initial_indent="    ", subsequent_indent="    "))
    if args.level < 3:
        print(f"\nMore: kvkata hint {card.id} --level {args.level + 1}")
    return 0


def cmd_interview(args) -> int:
    from kvkata import interview
    card = _card_or_exit(args.card)
    if args.live:
        return interview.live(card)
    lines = interview.sheet(card) if args.sheet else board.render_notes(card)
    print("\n".join(lines))
    return 0


def cmd_watch(args) -> int:
    from kvkata.watch import watch
    if args.card:
        _card_or_exit(args.card)
    return watch(args.card, once=args.once)


def cmd_reset(args) -> int:
    from kvkata import backup
    card = _card_or_exit(args.card)
    try:
        folder, files = backup.reset(card.id, args.kata)
    except KeyError as e:
        print(f"kvkata: {e.args[0]}", file=sys.stderr)
        return 2
    what = f"{card.id} {args.kata}" if args.kata else card.id
    print(f"kvkata: reset {what}: {', '.join(str(f) for f in files)} back to the stub.")
    print(f"Your previous version is saved in {folder.relative_to(ROOT)}/ (kvkata restore {folder.name} brings it back).")
    return 0


def cmd_restore(args) -> int:
    from kvkata import backup
    if not args.id:
        found = backup.list_backups()
        if not found:
            print("kvkata: no backups yet (kvkata reset writes one before it changes a file).")
        for bid, files in found:
            print(f"{bid}  {', '.join(str(f) for f in files)}")
        return 0
    try:
        folder, files = backup.restore(args.id)
    except KeyError as e:
        print(f"kvkata: {e.args[0]}", file=sys.stderr)
        return 2
    print(f"kvkata: restored {', '.join(str(f) for f in files)} from backup {args.id}.")
    print(f"The versions it replaced are saved in {folder.relative_to(ROOT)}/.")
    return 0


def cmd_snapshot(args) -> int:
    from kvkata import backup
    paths = backup.snapshot()
    print(f"kvkata: packed {len(paths)} stubs into {backup.PRISTINE.relative_to(ROOT)}")
    return 0


def cmd_plot(args) -> int:
    from kvkata.plots import plot_all
    try:
        written = plot_all(Path(args.out), spoilers=args.spoilers)
    except ImportError as e:
        print(f"kvkata plot needs matplotlib ({e}): pip install matplotlib", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


def cmd_explore(args) -> int:
    from kvkata import backup
    from kvkata.explore import write_page
    path, cwd = Path(args.out).resolve(), Path.cwd().resolve()
    if path.exists():
        if cwd not in path.parents:
            print(f"kvkata: {args.out} exists outside this folder; give a new path "
                  "(kvkata never overwrites a file it did not back up)", file=sys.stderr)
            return 2
        folder = backup.back_up([path.relative_to(cwd)], root=cwd)
        print(f"kvkata: backed up the old {args.out} to {folder.relative_to(cwd)}/")
    write_page(path)
    print(f"kvkata: wrote {args.out}; open it in a browser (it uses no network)")
    return 0


def cmd_cards(args) -> int:
    if not args.anki:
        return cmd_list(args)
    from kvkata.anki import build_deck
    path = Path(args.anki)
    if path.exists():
        print(f"kvkata: {path} exists; give a new path (kvkata never overwrites a file it did not back up)",
              file=sys.stderr)
        return 2
    try:
        n = build_deck(path)
    except ImportError as e:
        print(f"kvkata cards --anki needs genanki ({e}): pip install genanki", file=sys.stderr)
        return 2
    print(f"kvkata: wrote {n} notes to {path}")
    return 0


def cmd_list(args) -> int:
    for line in board.render_list(progress.statuses()):
        print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvkata", description="KV-cache interview katas.")
    sub = parser.add_subparsers(dest="command")
    p_board = sub.add_parser("board", help="run your katas and print the progress board (the default)")
    p_board.add_argument("-k", help="only the tests pytest's -k expression selects, e.g. card00")
    p_hint = sub.add_parser("hint", help="graded hints for a card")
    p_hint.add_argument("card")
    p_hint.add_argument("--level", type=int, default=1, choices=(1, 2, 3))
    p_hint.add_argument("--kata", help="only this kata's hint")
    p_int = sub.add_parser("interview", help="interviewer notes for a card")
    p_int.add_argument("card")
    p_int.add_argument("--live", action="store_true", help="run the card's tests on katas/ and say what to probe")
    p_int.add_argument("--sheet", action="store_true", help="the questions only, to hand to the candidate")
    sub.add_parser("status", help="the board from your saved progress, at once (runs nothing)")
    sub.add_parser("list", help="the cards and their katas, with each kata's saved status")
    p_watch = sub.add_parser("watch", help="rerun the kata you are on whenever a file under katas/ is saved")
    p_watch.add_argument("card", nargs="?", help="the card to start in (default: the first with a kata not yet solved)")
    p_watch.add_argument("--once", action="store_true", help="run the current kata once, print, and exit")
    p_reset = sub.add_parser("reset", help="put a card's stubs (or one kata) back, after a backup of your file")
    p_reset.add_argument("card")
    p_reset.add_argument("kata", nargs="?")
    p_restore = sub.add_parser("restore", help="list the backups, or bring one back")
    p_restore.add_argument("id", nargs="?")
    sub.add_parser("snapshot", help="maintainers: pack the current stubs as the pristine copy")
    p_plot = sub.add_parser("plot", help="figures from kvref's models and the benchmarks, as PNGs")
    p_plot.add_argument("--out", default="kvkata-plots", help="folder to write into (default ./kvkata-plots)")
    p_plot.add_argument("--spoilers", action="store_true",
                        help="also copy the bench figures that give answers away: kv_quant_axes (card04's "
                             "key_axis_errors) and recall_curve (card10's recall_capacity)")
    p_explore = sub.add_parser("explore", help="one self-contained HTML page to explore the cache, from kvref's numbers")
    p_explore.add_argument("--out", default="kvkata-explore.html", help="file to write (default ./kvkata-explore.html)")
    p_cards = sub.add_parser("cards", help="the cards; with --anki PATH, an Anki deck of the interview questions")
    p_cards.add_argument("--anki", metavar="PATH")
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["board"])
    command = {"board": cmd_board, "status": cmd_status, "hint": cmd_hint, "interview": cmd_interview,
               "list": cmd_list, "watch": cmd_watch, "reset": cmd_reset, "restore": cmd_restore,
               "snapshot": cmd_snapshot, "plot": cmd_plot, "explore": cmd_explore, "cards": cmd_cards}[args.command]
    try:
        return command(args)
    except BrokenPipeError:  # `kvkata list | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
