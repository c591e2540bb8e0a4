"""The commands' defaults and refusals: where you are is the default (`run`, `hint`, `solution`,
`reset` with no argument), unknown names refused at once, pipes that end quietly, `--version`,
solutions only after the kata passed, reset/restore that say what they do, the solutions branch
built without touching the learner's branch or files, and `kvkata dev snapshot`."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvkata import backup, board, cli, manifest, progress
from test_learner_tools import kvkata, learner_files

FIRST = manifest.all_katas()[0]          # the kata a fresh checkout starts on
SECOND = manifest.all_katas()[1]
CARD0 = manifest.card(FIRST.card)
STUB0 = Path("katas") / FIRST.dir / f"{FIRST.module}.py"
SOLUTION0 = Path("solutions") / FIRST.dir / f"{FIRST.module}.py"


def test_version_is_the_installed_packages(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"kvkata {importlib.metadata.version('kvkata')}"


def test_where_takes_a_kata_a_card_both_or_nothing_and_refuses_the_rest(capsys):
    assert cli.where([SECOND.name]) == (CARD0, SECOND)
    assert cli.where([CARD0.id]) == (CARD0, None)
    assert cli.where([CARD0.id, SECOND.name]) == (CARD0, SECOND)
    other = manifest.cards()[1].katas[0]
    for words in (["card42"], [CARD0.id, other.name], ["repeat_kvv"], [SECOND.name, CARD0.id], ["a", "b", "c"]):
        with pytest.raises(SystemExit) as e:
            cli.where(words)
        assert e.value.code == 2, words
        err = capsys.readouterr().err
        assert "kvkata:" in err and words[-1] in err, (words, err)
    with pytest.raises(SystemExit):
        cli.where(["card42"])
    err = capsys.readouterr().err
    assert all(c.id in err for c in manifest.cards()) and all(k.name in err for k in manifest.all_katas())


def test_a_k_expression_that_matches_nothing_is_refused_before_anything_runs(capsys):
    for expr in ("card42", "card00 and decode_stepp"):
        with pytest.raises(SystemExit) as e:
            cli.check_k(expr)
        assert e.value.code == 2
        assert expr.split()[-1] in capsys.readouterr().err
    for expr in ("card00 and", "(card00", "card00 or or attend"):  # pytest would stop with a usage error
        with pytest.raises(SystemExit) as e:
            cli.check_k(expr)
        assert e.value.code == 2 and "does not parse" in capsys.readouterr().err, expr
    for expr in ("card00", "decode_step", "card00 and not attend", "test_card07", "CARD00"):
        cli.check_k(expr)  # each selects tests: no refusal


def test_solution_source_is_the_worked_definition_with_its_helpers_and_no_other_kata():
    for kata in manifest.all_katas():
        text = cli.solution_source(kata)
        tree = ast.parse(text)
        names = [n.name for n in tree.body]
        assert kata.name in names, kata
        assert not (set(names) - {kata.name}) & {k.name for k in manifest.all_katas()}, (kata, names)
        assert "NotImplementedError" not in ast.get_source_segment(text, tree.body[names.index(kata.name)]), kata


def test_pipes_end_quietly(project_copy):
    env = {k: v for k, v in os.environ.items() if k not in ("KVKATA_MODE", "PYTEST_ADDOPTS")}
    for cmd in (["list"], ["cards"], ["interview", "card07"], ["hint", "card07"]):
        proc = subprocess.Popen([sys.executable, "-m", "kvkata.cli", *cmd], cwd=project_copy, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env={**env, "PYTHONPATH": str(project_copy)})
        proc.stdout.close()  # the reader leaves before the first line: every write meets a closed pipe
        err = proc.stderr.read().decode()
        proc.stderr.close()
        assert proc.wait(timeout=120) == 0 and "Traceback" not in err and "BrokenPipe" not in err, (cmd, err)


def test_unknown_names_are_refused_at_once_everywhere_and_write_nothing(project_copy):
    before = learner_files(project_copy)
    for cmd in (["hint", "card42"], ["run", "card42"], ["reset", "card42"], ["solution", "card42"],
                ["board", "-k", "card42"], ["run", "card00", "no_such_kata"], ["reset", "no_such_kata"],
                ["watch", "card42"], ["interview", "card42"]):
        proc = kvkata(project_copy, *cmd, timeout=60)
        assert proc.returncode == 2, (cmd, proc.stdout, proc.stderr)
        assert "card00" in proc.stderr and "running" not in proc.stdout, (cmd, proc.stdout, proc.stderr)
    assert learner_files(project_copy) == before
    assert not (project_copy / ".kvkata" / "backups").exists()


def test_a_fresh_checkout_starts_at_the_first_kata_and_moves_on_after_it_passes(project_copy):
    hint = kvkata(project_copy, "hint")
    assert hint.returncode == 0 and f"{FIRST.name}  (katas/{FIRST.dir}/{FIRST.module}.py)" in hint.stdout, hint.stdout
    assert f"kvkata hint {CARD0.id} {FIRST.name} --level 2" in hint.stdout
    run = kvkata(project_copy, "run")
    assert run.returncode == 1 and f"kvkata run: {FIRST.card} {FIRST.name}" in run.stdout, run.stdout + run.stderr
    assert f"TODO {FIRST.card} {FIRST.name}" in run.stdout and "still the stub" in run.stdout
    assert "overall" in run.stdout  # the board
    refused = kvkata(project_copy, "solution")
    assert refused.returncode == 1 and f"kvkata solution {FIRST.name} --anyway" in refused.stderr
    assert f"def {FIRST.name}" not in refused.stdout + refused.stderr
    # the learner solves the first kata (the worked answer, pasted over the stub's definition)
    stub, worked = project_copy / STUB0, cli.solution_source(FIRST, project_copy)
    tree = ast.parse(stub.read_text())
    node = next(n for n in tree.body if getattr(n, "name", None) == FIRST.name)
    lines = stub.read_text().splitlines(keepends=True)
    stub.write_text("".join(lines[:node.lineno - 1]) + worked + "\n" + "".join(lines[node.end_lineno:]))
    run = kvkata(project_copy, "run", FIRST.name)
    assert run.returncode == 0 and "SOLVED" in run.stdout, run.stdout + run.stderr
    assert f"next: kvkata run (that is {SECOND.card} {SECOND.name})" in run.stdout
    shown = kvkata(project_copy, "solution", FIRST.name)
    assert shown.returncode == 0, shown.stderr
    assert worked in shown.stdout and str(SOLUTION0) in shown.stdout
    from kvkata import interview
    tagged = [q for q in interview.questions(CARD0) if FIRST.name in q.katas]
    untagged = [q for q in interview.questions(CARD0) if FIRST.name not in q.katas]
    assert tagged and all(f"Q{q.number}." in shown.stdout for q in tagged)
    assert all(f"Q{q.number}." not in shown.stdout for q in untagged)
    nxt = kvkata(project_copy, "hint")
    assert f"{SECOND.name}  (katas/{SECOND.dir}/{SECOND.module}.py)" in nxt.stdout  # where you are moved on
    still = kvkata(project_copy, "solution")  # the next kata is not solved: refused
    assert still.returncode == 1 and SECOND.name in still.stderr
    anyway = kvkata(project_copy, "solution", "--anyway")
    assert anyway.returncode == 0 and f"def {SECOND.name}" in anyway.stdout


def test_reset_says_what_it_does_and_restore_lists_what_each_backup_holds(project_copy):
    stub = project_copy / STUB0
    pristine = stub.read_text()
    untouched = kvkata(project_copy, "reset", FIRST.name)
    assert untouched.returncode == 0 and "already the stub" in untouched.stdout
    assert backup.list_backups(project_copy) == []  # nothing changed, nothing backed up
    broken = pristine + "\ndef broken(:\n"
    stub.write_text(broken)
    refused = kvkata(project_copy, "reset", CARD0.id, SECOND.name)
    assert refused.returncode == 2 and "does not parse" in refused.stderr and "--whole-file" in refused.stderr
    assert stub.read_text() == broken and backup.list_backups(project_copy) == []
    whole = kvkata(project_copy, "reset", CARD0.id, SECOND.name, "--whole-file")
    assert whole.returncode == 0 and "the whole file" in whole.stdout, whole.stdout + whole.stderr
    assert stub.read_text() == pristine
    # a progress record that counts one kata of the file solved, then a reset of that kata
    stub.write_text(pristine.replace(f"def {FIRST.name}(", f"def {FIRST.name}(  # mine\n    ", 1))
    hashes = progress.stub_hashes([FIRST], project_copy)
    record = progress.merge({}, {progress.key(FIRST): ("solved", 4, "")}, hashes)
    progress.path(project_copy).write_text(__import__("json").dumps({"version": 1, "katas": record}))
    kvkata(project_copy, "reset", FIRST.name)
    assert stub.read_text() == pristine
    listing = kvkata(project_copy, "restore")
    assert not _too_wide(listing.stdout.splitlines()), listing.stdout
    rows = []  # one entry per backup: its first line starts with the id, the next ones are indented
    for line in listing.stdout.splitlines():
        if line[:8].isdigit():
            rows.append(line)
        elif rows and line.startswith("    "):
            rows[-1] += "\n" + line
    assert len(rows) == 2, listing.stdout
    n = len([k for k in manifest.all_katas() if (k.dir, k.module) == (FIRST.dir, FIRST.module)])
    assert f"{CARD0.id}" in rows[0] and SECOND.name in rows[0] and f"0/{n}" in rows[0]
    assert FIRST.name in rows[1] and f"1/{n}" in rows[1] and str(STUB0) in rows[1]
    latest = kvkata(project_copy, "restore", "--latest")
    assert latest.returncode == 0 and "# mine" in stub.read_text()


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(repo.parent), "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True, env=env).stdout


def test_solutions_branch_holds_the_worked_solutions_and_leaves_the_checkout_alone(project_copy, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(project_copy.parent))  # the copy is not inside another repo
    outside = kvkata(project_copy, "solutions-branch")
    assert outside.returncode == 2 and "not in a git repository" in outside.stderr
    git(project_copy, "init", "-q", "-b", "learner")
    git(project_copy, "add", "-A")
    git(project_copy, "commit", "-qm", "fresh checkout")
    (project_copy / STUB0).write_text((project_copy / STUB0).read_text() + "# my work in progress\n")
    (project_copy / "notes.txt").write_text("untracked")
    git(project_copy, "add", "notes.txt")  # something staged, too
    status, head = git(project_copy, "status", "--porcelain"), git(project_copy, "rev-parse", "HEAD")
    made = kvkata(project_copy, "solutions-branch")
    assert made.returncode == 0, made.stderr
    assert git(project_copy, "status", "--porcelain") == status and git(project_copy, "rev-parse", "HEAD") == head
    assert git(project_copy, "branch", "--show-current").strip() == "learner"
    changed = set(git(project_copy, "diff", "--name-only", "HEAD", "solutions", "--").split())
    assert changed == {p.as_posix() for p in backup.stub_paths(project_copy)}
    for stub, solution in {(f"katas/{k.dir}/{k.module}.py", f"solutions/{k.dir}/{k.module}.py")
                           for k in manifest.all_katas()}:
        assert git(project_copy, "show", f"solutions:{stub}") == (project_copy / solution).read_text()
    stat = git(project_copy, "diff", "--stat", "solutions", "--", "katas")
    assert all(p.as_posix() in stat for p in backup.stub_paths(project_copy)), stat
    tip = git(project_copy, "rev-parse", "refs/heads/solutions")
    again = kvkata(project_copy, "solutions-branch")
    assert "already up to date" in again.stdout and git(project_copy, "rev-parse", "refs/heads/solutions") == tip
    git(project_copy, "commit", "-qam", "more work")
    kvkata(project_copy, "solutions-branch")
    parents = git(project_copy, "rev-list", "--parents", "-n", "1", "refs/heads/solutions", "--").split()[1:]
    assert parents == [git(project_copy, "rev-parse", "HEAD").strip(), tip.strip()]  # refreshed, history kept
    # the interviewer's run on the branch: the worked answers pass
    git(project_copy, "worktree", "add", "-q", str(project_copy.parent / "interviewer"), "solutions")
    graded = kvkata(project_copy.parent / "interviewer", "board", "-k", CARD0.id)
    assert graded.returncode == 0, graded.stdout[-3000:] + graded.stderr[-3000:]


def test_dev_snapshot_packs_the_stubs_and_the_old_name_says_it_moved(project_copy):
    packed = project_copy / "kvkata" / "pristine.zip"
    before = packed.read_bytes()
    proc = kvkata(project_copy, "dev", "snapshot")
    assert proc.returncode == 0 and packed.read_bytes() == before  # reproducible bytes: same stubs, same zip
    old = kvkata(project_copy, "snapshot")
    assert old.returncode == 0 and "kvkata dev snapshot" in old.stderr
    assert "snapshot" not in kvkata(project_copy, "--help").stdout  # hidden: only `dev snapshot` is offered


# --- 80 columns ----------------------------------------------------------------------------------

def _too_wide(lines: list[str], verbatim: set[str] = frozenset()) -> list[str]:
    """Lines over 80 columns that could have been wrapped: not one long word (a test's name, a path)
    and not a line kept as written (a formula of the notes, lined up by hand)."""
    return [ln for ln in lines if len(ln) > 80 and len(ln.split()) > 1 and ln.rstrip() not in verbatim]


def _printed(capsys, *argv: str) -> list[str]:
    try:
        cli.main(list(argv))
    except SystemExit:
        pass  # a refusal: its words are checked like any other
    out = capsys.readouterr()
    return (out.out + out.err).splitlines()


def test_the_board_list_hints_and_notes_fit_80_columns(capsys):
    katas = manifest.all_katas()
    # every mark on the board at once (solved, failing, stub, not run, stale), and a run that adds its own lines
    status = {progress.key(k): list(board.MARKS)[i % len(board.MARKS)] for i, k in enumerate(katas)}
    nodes = {f"t::{k.name}": k for k in katas}
    state = board.RunState({n: "passed" for n in nodes}, nodes, {(k.card, k.name): 3 for k in katas},
                           broken={"card06": "SyntaxError"})
    lines = board.render(None, status=status) + board.render(state, status=status) + board.render_list(status)
    assert not _too_wide(lines), _too_wide(lines)
    assert any("katas solved" in ln and "card06" in ln for ln in board.render(None, status=status))
    for argv in (["status"], ["list"], ["hint", "card42"], ["hint", "card00", "no_such_kata"],
                 ["hint", "card00", "--kata", "no_such_kata"], ["reset", "card00", "no_such_kata"]):
        assert not _too_wide(_printed(capsys, *argv)), argv
    for card in manifest.cards():
        formulas = {"  " + ln.rstrip() for ln in card.notes()["derivation"].splitlines() if ln[:1].isspace()}
        for argv in ([card.id, "--sheet"], [card.id]):
            printed = _printed(capsys, "interview", *argv)
            assert not _too_wide(printed, formulas), (argv, _too_wide(printed, formulas))
        for level in (1, 2, 3):
            printed = _printed(capsys, "hint", card.id, "--level", str(level))
            assert not _too_wide(printed), (card.id, level, _too_wide(printed))
    # the notes' prose is rewrapped, never lost: the same words in the same order
    for card in manifest.cards():
        derivation = card.notes()["derivation"]
        assert " ".join(board.reflow(derivation)).split() == derivation.split(), card.id


# --- the maintainers' tools ------------------------------------------------------------------------

def _mutate():
    import importlib.util
    spec = importlib.util.spec_from_file_location("kvkata_mutate", Path(cli.ROOT) / "tools" / "mutate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mutate_refuses_an_unknown_card_or_module_with_the_valid_names(capsys):
    mutate = _mutate()
    for argv, valid in ((["card42"], "card00"), (["card09", "--module", "nope", "--list"], "kernel")):
        with pytest.raises(SystemExit) as e:
            mutate.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and valid in err and "Traceback" not in err, (argv, err)
    assert mutate.main(["card12", "--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed and all(line.startswith("trap.py line ") for line in listed), listed


@pytest.mark.slow
def test_mutate_on_one_card_ends_on_its_score_without_teardown_noise():
    proc = subprocess.run([sys.executable, "tools/mutate.py", "card12"], cwd=cli.ROOT, capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k not in ("KVKATA_MODE", "PYTEST_ADDOPTS")},
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert any(ln.startswith("card12: ") and "mutants killed" in ln for ln in proc.stdout.splitlines()), proc.stdout
    assert "leaked" not in proc.stderr, proc.stderr[-1000:]  # triton's bindings at interpreter exit
