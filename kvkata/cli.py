"""The `kvkata` command: the progress board, graded hints, interviewer notes.

    kvkata                        run your katas (learner mode) and print the board
    kvkata board [-k EXPR]        the same, for the tests pytest's -k selects
    kvkata run [WHERE]            run the kata you are on (or WHERE) and print its message and the board
    kvkata hint [WHERE] [--level N]  hints (1 = nudge, 2 = method, 3 = near-answer) for the kata you are on
    kvkata solution [WHERE] [--anyway]  the worked solution and its interviewer notes, once the kata passed
    kvkata interview CARD         the interviewer notes for a card: agenda, questions with rubric, derivation
    kvkata interview CARD --sheet the questions only, to hand to the candidate
    kvkata interview --live CARD  run the card's tests on the code in katas/ and say what to probe
    kvkata status                 the board from your saved progress, at once (runs nothing)
    kvkata list                   the cards and their katas, with each kata's saved status
    kvkata watch [CARD] [--once]  rerun the kata you are on whenever a file under katas/ is saved
    kvkata reset [WHERE] [--whole-file]  put a kata's stub (or a card's) back, after backing up your file
    kvkata restore [ID|--latest]  list the backups, or bring one back (backing up what it replaces)
    kvkata plot [--out DIR]       figures from kvref's models and the benchmarks, as PNGs
    kvkata explore [--out PATH]   one self-contained HTML page: the calculator, the cache filling, paging
    kvkata cards --anki PATH      an Anki deck of the interviewer questions
    kvkata solutions-branch       interviewers: a local git branch `solutions` with the worked solutions in katas/
    kvkata dev snapshot           maintainers: pack the current stubs as the pristine copy reset uses

WHERE is a kata (decode_step), a card (card00), both (card00 decode_step), or nothing: the first kata
your saved progress does not count solved.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import sys
from pathlib import Path

from kvkata import ROOT, board, manifest, progress, runner


def _card_or_exit(card_id: str) -> manifest.Card:
    try:
        return manifest.card(card_id)
    except KeyError:
        valid = ", ".join(c.id for c in manifest.cards())
        print(f"kvkata: unknown card {card_id!r}. Valid cards: {valid}", file=sys.stderr)
        raise SystemExit(2) from None


def _valid_names() -> str:
    cards = ", ".join(c.id for c in manifest.cards())
    text = board.wrap(f"Cards: {cards}.", "", "  ") + board.wrap(", ".join(k.name for k in manifest.all_katas()),
                                                                 "Katas: ", "  ")
    return "\n".join(text + ["(kvkata list shows them by card, with your status.)"])


def _refuse(text: str) -> SystemExit:
    """Print `text` (wrapped to the terminal's 80 columns, line by line) and return the exit to raise."""
    lines = f"kvkata: {text}".splitlines()
    print("\n".join(w for line in lines for w in board.wrap(line, "", "  ")), file=sys.stderr)
    return SystemExit(2)


def _kata_by_name(name: str) -> manifest.Kata | None:
    return next((k for k in manifest.all_katas() if k.name == name), None)


def where(words: list[str] | None) -> tuple[manifest.Card, manifest.Kata | None]:
    """(card, kata or None) for WHERE: a kata, a card, both, or nothing (the first kata not yet solved).

    An unknown name exits at once (code 2) with the valid names.
    """
    words = [w for w in (words or []) if w]
    if not words:
        kata = progress.first_unsolved()
        if kata is None:
            raise _refuse("every kata is solved (kvkata status shows the board); name one: kvkata CMD card00 decode_step")
        return manifest.card(kata.card), kata
    if len(words) > 2:
        raise _refuse(f"expected a card, a kata or both; got {' '.join(words)!r}")
    first = words[0]
    if any(c.id == first for c in manifest.cards()):
        card = manifest.card(first)
        if len(words) == 1:
            return card, None
        kata = next((k for k in card.katas if k.name == words[1]), None)
        if kata is None:
            raise _refuse(f"{card.id} has no kata {words[1]!r}. Its katas: {', '.join(k.name for k in card.katas)}")
        return card, kata
    kata = _kata_by_name(first)
    if kata is None or len(words) == 2:
        near = [k.name for k in manifest.all_katas() if first.lower() in k.name.lower()][:8]
        also = f" Did you mean: {', '.join(near)}?" if near else ""
        raise _refuse(f"no card or kata named {' '.join(words)!r}.{also}\n{_valid_names()}")
    return manifest.card(kata.card), kata


def _test_names() -> set[str]:
    """The kata tests' function names, read from katas/*/test_*.py without importing them."""
    names = set()
    for path in (ROOT / "katas").glob("*/test_*.py"):
        try:
            tree = ast.parse(path.read_text())
        except (OSError, SyntaxError):
            continue
        names.update(n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef)))
    return names


def check_k(expr: str) -> None:
    """Refuse at once a -k expression that pytest cannot parse, or one of whose words matches no card,
    kata, test file or test."""
    try:
        from _pytest.mark.expression import Expression  # pytest's own parser of -k
    except ImportError:  # another pytest: the run itself reports an expression it cannot parse
        pass
    else:
        try:
            Expression.compile(expr)
        except Exception as e:  # noqa: BLE001 - SyntaxError in pytest 9, ParseError before
            raise _refuse(f"-k {expr!r} does not parse: {e}. Example: -k 'card00 and not attend'") from None
    words = [w for w in re.findall(r"[A-Za-z_][\w.\[\]-]*", expr) if w not in ("and", "or", "not")]
    known = [c.id for c in manifest.cards()] + [c.dir for c in manifest.cards()]
    known += [k.name for k in manifest.all_katas()] + [p.name for p in (ROOT / "katas").glob("*/test_*.py")]
    known += sorted(_test_names())
    haystack = "\n".join(known).lower()
    unknown = [w for w in words if w.lower() not in haystack]
    if unknown:
        raise _refuse(f"-k {expr!r}: {', '.join(unknown)} matches no card, kata or test, so no test would run. "
                      + _valid_names())


def _learner_run(args: list[str]) -> runner.Result:
    """The learner's tests in a new interpreter, in learner mode whatever KVKATA_MODE says."""
    return runner.run(["-q", "--tb=no", "--no-header", "--learner", *args], env=dict(os.environ, KVKATA_MODE="learner"))


def cmd_board(args) -> int:
    """Run the learner's tests in a subprocess and build the board from their real outcomes."""
    if args.k:
        check_k(args.k)
    selected = ["-k", args.k] if args.k else []
    print(f"kvkata: running your katas (pytest {' '.join(selected) or 'with every card'}) ...", flush=True)
    result = _learner_run(selected)
    data = result.data
    if data is None or result.returncode not in (0, 1) or not data["tests"]:
        # Interrupted (a test module that does not import, a usage error) or nothing selected:
        # show pytest's own words rather than an empty board.
        errors = [ln for ln in result.output.splitlines() if ln.startswith("ERROR:")]
        if result.returncode == 4 and errors:  # pytest refused its command line (a -k that does not parse)
            print("\n".join(errors), file=sys.stderr)
            print("kvkata: pytest refused the command line (above); nothing ran.", file=sys.stderr)
            return 2
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
        head = f"kvkata progress, as your runs left it (the latest at {latest.replace('T', ' ')}):"
    else:
        head = "kvkata progress: nothing run yet (pytest, kvkata and watch save what they run):"
    print("\n".join(board.wrap(head, "", "  ")))
    for line in board.render(None, status=progress.statuses(saved)):
        print(line)
    return 0


def cmd_hint(args) -> int:
    card, kata = where(args.where)
    hints = card.hints()
    if args.kata:
        if args.kata not in hints:
            raise _refuse(f"{card.id} has no kata {args.kata!r}. Its katas: {', '.join(k.name for k in card.katas)}")
        kata = next(k for k in card.katas if k.name == args.kata)
    names = [kata.name] if kata else [k.name for k in card.katas]
    label = {1: "nudge", 2: "method", 3: "near-answer"}
    print("\n".join(board.wrap(f"{card.id}: {card.title} - hints, level {args.level} ({label[args.level]})",
                              "", "  ")))
    for name in names:
        levels = hints[name]
        level = min(args.level, len(levels))
        k = next(k for k in card.katas if k.name == name)
        print(f"\n  {name}  (katas/{k.dir}/{k.module}.py)")
        print("\n".join(board.wrap(levels[level - 1], "    ", "    ")))
    if args.level < 3:
        target = f"{card.id} {kata.name}" if kata else card.id
        print(f"\nMore: kvkata hint {target} --level {args.level + 1}")
    return 0


def cmd_run(args) -> int:
    """Run one kata (or a card's katas): each test's learner message as it ends, a summary, the board."""
    from kvkata import watch
    card, kata = where(args.where)
    katas = [kata] if kata else list(card.katas)
    names = ", ".join(f"{k.card} {k.name}" for k in katas)
    print(f"kvkata run: {names} ({katas[0].where()}) ...", flush=True)
    result = watch._run(katas, os.dup(sys.stdout.fileno()))
    if result.data is None or not result.data["tests"]:
        why = "did not finish" if result.data is None else "selected no test"
        print(f"\nkvkata run: the run {why} (pytest exit code {result.returncode}); pytest said:", file=sys.stderr)
        print(watch._clip_lines(result.output.strip(), 40), file=sys.stderr)
        return 2
    state = board.RunState.from_json(result.data)
    statuses = {s.kata.name: s for _, ss in board.tally(state) for s in ss if s.outcomes}
    print()
    for k in katas:
        if k.name in statuses:
            print(f"{k.card} {k.name}: {watch._summary(statuses[k.name])}")
    status = progress.statuses()
    print()
    for line in board.render(state, status=status):
        print(line)
    solved = all(k.name in statuses and statuses[k.name].state == "solved" for k in katas)
    if solved:
        nxt = progress.first_unsolved(None, status)
        print(f"\nSolved. kvkata solution {katas[0].name} shows the worked answer"
              + (f"; next: kvkata run (that is {nxt.card} {nxt.name})" if nxt else "; every kata is solved."))
    else:
        print(f"\nStuck? kvkata hint {katas[0].name}   (--level 2, --level 3 say more)")
    return 0 if solved else 1


def solution_source(kata: manifest.Kata, root: Path = ROOT) -> str:
    """The worked solution's definition of the kata, with the module's helpers it uses (not other katas)."""
    path = root / "solutions" / kata.dir / f"{kata.module}.py"
    source = path.read_text()
    tree = ast.parse(source)
    defs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    katas = {k.name for k in manifest.all_katas()}
    node = defs[kata.name]
    wanted, todo = [kata.name], [node]
    while todo:
        for n in ast.walk(todo.pop()):
            if isinstance(n, ast.Name) and n.id in defs and n.id not in katas and n.id not in wanted:
                wanted.append(n.id)
                todo.append(defs[n.id])
    lines = source.splitlines()
    parts = []
    for name in sorted(wanted, key=lambda w: defs[w].lineno):
        d = defs[name]
        start = min([d.lineno] + [x.lineno for x in d.decorator_list])
        parts.append("\n".join(lines[start - 1:d.end_lineno]))
    return "\n\n\n".join(parts)


def cmd_solution(args) -> int:
    from kvkata import interview
    card, kata = where(args.where)
    katas = [kata] if kata else list(card.katas)
    saved = progress.load()
    refused = [k for k in katas if saved.get(progress.key(k), {}).get("outcome") != "solved"]
    if refused and not args.anyway:
        names = ", ".join(k.name for k in refused)
        print(f"kvkata: {card.id} {names}: not solved yet in your saved progress, so the worked solution stays "
              f"closed (reading it first spoils the kata).\nSolve it (kvkata run {refused[0].name}; "
              f"kvkata hint {refused[0].name} helps), or force it: kvkata solution {refused[0].name} --anyway",
              file=sys.stderr)
        return 1
    qs = interview.questions(card)
    for k in katas:
        rel = f"solutions/{k.dir}/{k.module}.py"
        print(f"=== {k.card} {k.name}: the worked solution ({rel}) ===\n")
        print(solution_source(k))
        tagged = [q for q in qs if k.name in q.katas]
        if tagged:
            print(f"\n--- the interviewer's questions on {k.name} ({card.id}: {card.title}) ---")
            for q in tagged:
                print("\n" + "\n".join(board.wrap(q.text, f"  Q{q.number}. ", "      ")))
                for line in interview.rubric_lines(q):
                    print(line)
        print()
    if not kata:
        print(f"(kvkata interview {card.id} has the card's whole notes: agenda, derivation, red flags)")
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
    card, kata = where(args.where)
    what = f"{card.id} {kata.name}" if kata else card.id
    try:
        folder, files = backup.reset(card.id, kata.name if kata else None, whole_file=args.whole_file)
    except KeyError as e:
        print(f"kvkata: {e.args[0]}", file=sys.stderr)
        return 2
    except backup.Unparsable as e:
        print(f"kvkata: reset {what} refused: {e}", file=sys.stderr)
        print(f"  kvkata reset {what} --whole-file", file=sys.stderr)
        return 2
    if folder is None:
        print(f"kvkata: {what} is already the stub; nothing written, nothing backed up.")
        return 0
    scope = ": the whole file" if args.whole_file and kata else ("" if kata else f": every kata of {card.id}")
    print(f"kvkata: reset {what}{scope}")
    print("\n".join(board.wrap(f"back to the stub in {', '.join(str(f) for f in files)}.", "  ", "  ")))
    print(f"Your previous version is saved in {folder.relative_to(ROOT)}/\n  (kvkata restore {folder.name} brings it back).")
    return 0


def cmd_restore(args) -> int:
    from kvkata import backup
    bid = args.id
    if args.latest:
        bid = backup.latest()
        if bid is None:
            print("kvkata: no backups yet (kvkata reset writes one before it changes a file).", file=sys.stderr)
            return 2
    if not bid:
        found = backup.list_backups()
        if not found:
            print("kvkata: no backups yet (kvkata reset writes one before it changes a file).")
            return 0
        print("\n".join(board.wrap(backup.HEADER)))
        for b, files in found:
            print("\n".join(backup.describe(b, files)))
        print(f"\nkvkata restore ID brings one back; kvkata restore --latest the newest\n  ({found[-1][0]}).")
        return 0
    try:
        folder, files = backup.restore(bid)
    except KeyError as e:
        print(f"kvkata: {e.args[0]}", file=sys.stderr)
        return 2
    print("\n".join(board.wrap(f"kvkata: restored {', '.join(str(f) for f in files)} from backup {bid}.", "", "  ")))
    print(f"The versions it replaced are saved in {folder.relative_to(ROOT)}/\n  (kvkata restore {folder.name} undoes this).")
    return 0


def cmd_solutions_branch(args) -> int:
    from kvkata import solutions_branch as sb
    try:
        commit, head, changed = sb.build()
    except sb.NotARepo as e:
        print(f"kvkata: {e}", file=sys.stderr)
        return 2
    verb = "built" if changed else "already up to date:"
    lines = board.wrap(f"kvkata: {verb} branch {sb.BRANCH} ({commit[:12]}): your HEAD ({head[:12]}) with the "
                       "worked solutions in katas/. Your branch, index and files are unchanged.", "", "  ")
    lines += ["  on it, katas/ hold the worked answers (plain pytest grades them too):",
              f"    git switch {sb.BRANCH} && pytest --interviewer -k card07", "    (git switch - goes back)",
              "  a candidate's answers against them:",
              f"    git diff {sb.BRANCH} -- katas/card07_distributed",
              "  after a new commit, run kvkata solutions-branch again to refresh it."]
    print("\n".join(lines))
    return 0


def cmd_snapshot(args) -> int:
    from kvkata import backup
    if args.command == "snapshot":
        print("kvkata: `kvkata snapshot` moved to `kvkata dev snapshot` (maintainers' commands live under dev).",
              file=sys.stderr)
    paths = backup.snapshot()
    print(f"kvkata: packed {len(paths)} stubs into {backup.PRISTINE.relative_to(ROOT)}")
    return 0


def _back_up_or_refuse(paths: list[Path], shown: str) -> bool:
    """Before a command replaces files of its own name: back up those under this folder (say where);
    False (after saying why) when one lies outside it, where kvkata keeps no backups."""
    from kvkata import backup
    cwd = Path.cwd().resolve()
    found = [p.resolve() for p in paths if p.exists()]
    if not found:
        return True
    outside = [p for p in found if cwd not in p.parents]
    if outside:
        print("\n".join(board.wrap(f"kvkata: {shown} already holds {', '.join(p.name for p in outside)}, outside "
                                   "this folder; give a new path (kvkata never overwrites a file it did not "
                                   "back up)", "", "  ")), file=sys.stderr)
        return False
    folder = backup.back_up([p.relative_to(cwd) for p in found], root=cwd, note={"command": "plot"})
    print("\n".join(board.wrap(f"kvkata: backed up the old {', '.join(p.name for p in found)} to "
                               f"{folder.relative_to(cwd)}/", "", "  ")))
    return True


def cmd_plot(args) -> int:
    from kvkata.plots import names, plot_all
    out = Path(args.out)
    if not _back_up_or_refuse([out / name for name in names(args.spoilers)], args.out):
        return 2
    try:
        written = plot_all(out, spoilers=args.spoilers)
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


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("kvkata")
    except PackageNotFoundError:
        return "unknown (not installed)"


WHERE_HELP = "a kata (decode_step), a card (card00), both, or nothing: the first kata not yet solved"
VISIBLE = ("board", "run", "hint", "solution", "interview", "status", "list", "watch", "reset", "restore",
           "plot", "explore", "cards", "solutions-branch", "dev")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvkata", description="KV-cache interview katas.")
    parser.add_argument("--version", action="version", version=f"kvkata {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(VISIBLE) + "}")
    p_board = sub.add_parser("board", help="run your katas and print the progress board (the default)")
    p_board.add_argument("-k", help="only the tests pytest's -k expression selects, e.g. card00")
    p_run = sub.add_parser("run", help="run the kata you are on (or a kata, or a card): its messages and the board")
    p_run.add_argument("where", nargs="*", metavar="WHERE", help=WHERE_HELP)
    p_hint = sub.add_parser("hint", help="graded hints for the kata you are on (or a kata, or a card)")
    p_hint.add_argument("where", nargs="*", metavar="WHERE", help=WHERE_HELP)
    p_hint.add_argument("--level", type=int, default=1, choices=(1, 2, 3))
    p_hint.add_argument("--kata", help="only this kata's hint")
    p_sol = sub.add_parser("solution", help="the worked solution and its interviewer notes, once the kata passed")
    p_sol.add_argument("where", nargs="*", metavar="WHERE", help=WHERE_HELP)
    p_sol.add_argument("--anyway", action="store_true", help="show it before your saved progress says it passed")
    p_int = sub.add_parser("interview", help="interviewer notes for a card")
    p_int.add_argument("card")
    p_int.add_argument("--live", action="store_true", help="run the card's tests on katas/ and say what to probe")
    p_int.add_argument("--sheet", action="store_true", help="the questions only, to hand to the candidate")
    sub.add_parser("status", help="the board from your saved progress, at once (runs nothing)")
    sub.add_parser("list", help="the cards and their katas, with each kata's saved status")
    p_watch = sub.add_parser("watch", help="rerun the kata you are on whenever a file under katas/ is saved")
    p_watch.add_argument("card", nargs="?", help="the card to start in (default: the first with a kata not yet solved)")
    p_watch.add_argument("--once", action="store_true", help="run the current kata once, print, and exit")
    p_reset = sub.add_parser("reset", help="put a kata's stub (or a card's) back, after a backup of your file")
    p_reset.add_argument("where", nargs="*", metavar="WHERE", help=WHERE_HELP)
    p_reset.add_argument("--whole-file", action="store_true",
                         help="put the whole file back to the stub (needed when your file does not parse)")
    p_restore = sub.add_parser("restore", help="list the backups, or bring one back")
    p_restore.add_argument("id", nargs="?")
    p_restore.add_argument("--latest", action="store_true", help="bring back the newest backup")
    p_plot = sub.add_parser("plot", help="figures from kvref's models and the benchmarks, as PNGs")
    p_plot.add_argument("--out", default="kvkata-plots", help="folder to write into (default ./kvkata-plots)")
    p_plot.add_argument("--spoilers", action="store_true",
                        help="also copy the bench figures that give answers away: kv_quant_axes (card04's "
                             "key_axis_errors) and recall_curve (card10's recall_capacity)")
    p_explore = sub.add_parser("explore", help="one self-contained HTML page to explore the cache, from kvref's numbers")
    p_explore.add_argument("--out", default="kvkata-explore.html", help="file to write (default ./kvkata-explore.html)")
    p_cards = sub.add_parser("cards", help="the cards; with --anki PATH, an Anki deck of the interview questions")
    p_cards.add_argument("--anki", metavar="PATH")
    sub.add_parser("solutions-branch", help="interviewers: a local git branch `solutions` with the worked solutions "
                                            "in katas/ (your branch and files untouched)")
    p_dev = sub.add_parser("dev", help="maintainers' commands")
    dev = p_dev.add_subparsers(dest="dev_command", required=True)
    dev.add_parser("snapshot", help="pack the current stubs as the pristine copy kvkata reset uses")
    sub.add_parser("snapshot")  # moved to `kvkata dev snapshot`; kept (hidden) so old notes still work
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["board"])
    command = {"board": cmd_board, "run": cmd_run, "status": cmd_status, "hint": cmd_hint, "solution": cmd_solution,
               "interview": cmd_interview, "list": cmd_list, "watch": cmd_watch, "reset": cmd_reset,
               "restore": cmd_restore, "snapshot": cmd_snapshot, "dev": cmd_snapshot, "plot": cmd_plot,
               "explore": cmd_explore, "cards": cmd_cards, "solutions-branch": cmd_solutions_branch}[args.command]
    try:
        code = command(args)
        sys.stdout.flush()  # a reader that left shows here, inside the handler, not at exit
        return code
    except BrokenPipeError:  # `kvkata list | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
