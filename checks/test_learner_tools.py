"""The learner's and interviewer's commands: reset and restore with backups, saved progress and
status, watch, interview --live, the Anki deck and the plots, each run as a learner runs it
(`python -m kvkata.cli ...` in a scratch copy of the project), and the rule that no command writes a
learner's file without a backup."""

from __future__ import annotations

import ast
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from checks.conftest import run_kvkata as kvkata

from conftest import ROOT, run_suite
from kvkata import backup, board, manifest, progress


def learner_files(project: Path) -> dict[Path, bytes]:
    return {p.relative_to(project): p.read_bytes() for p in (project / "katas").rglob("*") if p.is_file()
            and "__pycache__" not in p.parts}


def kata_tests_in(path: Path, kata: str) -> list[str]:
    """The test functions in `path` marked @pytest.mark.kata(kata)."""
    found = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef):
            for d in node.decorator_list:
                if (isinstance(d, ast.Call) and ast.unparse(d.func) == "pytest.mark.kata"
                        and d.args and ast.literal_eval(d.args[0]) == kata):
                    found.append(node.name)
    return found


CARD01 = manifest.card("card01")
STUB01 = Path("katas") / CARD01.dir / "redundancy.py"


def test_the_pristine_copy_is_the_stubs_in_katas():
    with zipfile.ZipFile(backup.PRISTINE) as z:
        packed = {name: z.read(name) for name in z.namelist()}
    want = {p.as_posix(): (ROOT / p).read_bytes() for p in backup.stub_paths()}
    assert packed.keys() == want.keys(), "a stub was added or removed: run `kvkata dev snapshot` and commit kvkata/pristine.zip"
    stale = [name for name in want if packed[name] != want[name]]
    assert not stale, f"{stale} changed since the snapshot: run `kvkata dev snapshot` and commit kvkata/pristine.zip"


@pytest.mark.slow
def test_reset_of_one_kata_keeps_the_others_and_backs_up_the_file_and_restore_brings_it_back(project_copy):
    stub = project_copy / STUB01
    pristine = stub.read_text()
    solution = (project_copy / "solutions" / CARD01.dir / "redundancy.py").read_text()
    stub.write_text(solution)  # the learner solved every kata of card01
    proc = kvkata(project_copy, "reset", "card01", "token_passes")
    assert proc.returncode == 0, proc.stderr
    now = stub.read_text()
    assert 'raise NotImplementedError("token_passes:' in now  # that kata is a stub again
    assert now.count("raise NotImplementedError") == 1  # the other four answers are still there
    assert "def kv_projection_rows" in now and now != pristine
    found = backup.list_backups(project_copy)
    assert len(found) == 1 and found[0][1] == [STUB01]
    bid = found[0][0]
    assert (project_copy / ".kvkata" / "backups" / bid / STUB01).read_text() == solution
    assert f".kvkata/backups/{bid}/" in proc.stdout and f"kvkata restore {bid}" in proc.stdout
    proc = kvkata(project_copy, "restore", bid)
    assert proc.returncode == 0, proc.stderr
    assert stub.read_text() == solution
    assert len(backup.list_backups(project_copy)) == 2  # the restore backed up the version it replaced
    proc = kvkata(project_copy, "reset", "card01")
    assert stub.read_text() == pristine
    listing = kvkata(project_copy, "restore").stdout
    assert listing.count(str(STUB01)) == 3


@pytest.mark.slow
def test_reset_refuses_an_unknown_card_or_kata_and_writes_nothing(project_copy):
    before = learner_files(project_copy)
    assert kvkata(project_copy, "reset", "card99").returncode == 2
    proc = kvkata(project_copy, "reset", "card01", "no_such_kata")
    assert proc.returncode == 2 and "token_passes" in proc.stderr
    assert kvkata(project_copy, "restore", "20000101-000000-000000").returncode == 2
    assert learner_files(project_copy) == before


@pytest.mark.slow
def test_no_command_writes_a_learners_file_without_a_backup(project_copy, tmp_path):
    stub = project_copy / STUB01
    stub.write_text(stub.read_text() + "\n# my notes, which no command may lose\n")
    commands = [["list"], ["hint", "card01"], ["interview", "card01"], ["board", "-k", "token_passes"],
                ["cards", "--anki", str(tmp_path / "deck.apkg")], ["plot", "--out", str(tmp_path / "plots")],
                ["explore"], ["explore"],
                ["interview", "--live", "card01"], ["reset", "card01", "forward_flops"], ["reset", "card00"],
                ["hint"], ["solution", "--anyway"], ["run", "token_passes"], ["reset"], ["reset", "token_passes"],
                ["restore", "--latest"], ["reset", "card01", "forward_flops", "--whole-file"], ["solutions-branch"]]
    for cmd in commands:
        before = learner_files(project_copy)
        n_backups = len(backup.list_backups(project_copy))
        kvkata(project_copy, *cmd)
        changed = [p for p, data in learner_files(project_copy).items() if before.get(p) != data]
        if not changed:
            continue
        backups = backup.list_backups(project_copy)
        assert len(backups) == n_backups + 1, f"kvkata {' '.join(cmd)} changed {changed} without a backup"
        folder = project_copy / ".kvkata" / "backups" / backups[-1][0]
        for p in changed:
            assert (folder / p).read_bytes() == before[p], f"kvkata {' '.join(cmd)}: the backup of {p} is not the old file"
    assert len(backup.list_backups(project_copy)) >= 2  # the two resets wrote, and backed up
    assert kvkata(project_copy, "cards", "--anki", str(tmp_path / "deck.apkg")).returncode == 2  # never overwrites


@pytest.mark.slow
def test_explore_backs_up_a_page_it_replaces_and_refuses_one_outside_the_folder(project_copy, tmp_path):
    page = project_copy / "kvkata-explore.html"
    page.write_text("my annotated copy")
    n_backups = len(backup.list_backups(project_copy))
    proc = kvkata(project_copy, "explore")
    assert proc.returncode == 0, proc.stderr
    backups = backup.list_backups(project_copy)
    assert len(backups) == n_backups + 1 and "backed up the old kvkata-explore.html" in proc.stdout
    saved = project_copy / ".kvkata" / "backups" / backups[-1][0] / "kvkata-explore.html"
    assert saved.read_text() == "my annotated copy"
    assert "<script>" in page.read_text() and "/*DATA*/null" not in page.read_text()
    outside = tmp_path / "elsewhere.html"
    outside.write_text("not kvkata's")
    assert kvkata(project_copy, "explore", "--out", str(outside)).returncode == 2
    assert outside.read_text() == "not kvkata's"


@pytest.mark.slow
def test_watch_reruns_the_card_when_a_stub_is_saved_and_stops_cleanly(project_copy):
    env = {k: v for k, v in os.environ.items() if k not in ("KVKATA_MODE", "PYTEST_ADDOPTS")}
    proc = subprocess.Popen([sys.executable, "-m", "kvkata.cli", "watch", "card01"], cwd=project_copy,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**env, "PYTHONPATH": str(project_copy), "PYTHONUNBUFFERED": "1",
                                 "PYTHONFAULTHANDLER": "1"},
                            # Ctrl-C as a terminal delivers it: a suite started in the background (`cmd &` in a
                            # non-interactive shell) ignores SIGINT, and a Python started so never raises it.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: list[str] = []
    pending: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [pending.put(line) for line in proc.stdout], daemon=True).start()

    def read_until(text: str, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                line = pending.get(timeout=max(0.1, end - time.monotonic()))
            except queue.Empty:
                break
            lines.append(line)
            if text in line:
                return
        raise AssertionError(f"no {text!r} within {seconds} s:\n{''.join(lines)}")

    try:
        read_until("0/5 katas solved", 300)  # the first run's board
        stub = project_copy / STUB01
        solution = (project_copy / "solutions" / CARD01.dir / "redundancy.py").read_text()
        # One save, at once: before the file watcher has started. It must not be lost.
        stub.write_text(solution)
        read_until("redundancy.py saved; running card01", 60)
        read_until("5/5 katas solved", 300)
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:  # show where it hangs: faulthandler dumps every thread on SIGABRT
            proc.send_signal(signal.SIGABRT)
            proc.wait(timeout=30)
            time.sleep(0.5)
            while not pending.empty():
                lines.append(pending.get())
            raise AssertionError("watch did not stop within 60 s of Ctrl-C:\n" + "".join(lines[-120:])) from None
        time.sleep(0.5)
        while not pending.empty():
            lines.append(pending.get())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(lines)
    assert proc.returncode == 0, out
    assert "TODO card01 token_passes" in out and "kvkata watch: stopped." in out


@pytest.mark.slow
def test_live_interview_maps_a_known_wrong_answer_to_the_points_its_tests_probe(project_copy):
    card02 = manifest.card("card02")
    stub = project_copy / "katas" / card02.dir / "costs.py"
    solution = (project_copy / "solutions" / card02.dir / "costs.py").read_text()
    wrong = "return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize"
    assert solution.count(wrong) == 1, "card02's kv_bytes_per_token changed: update this check"
    stub.write_text(solution.replace(wrong, wrong.replace("2 * ", "", 1)))  # K only: the forgotten factor 2
    proc = kvkata(project_copy, "interview", "--live", "card02")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    probes = card02.notes()["probes"]
    failing = kata_tests_in(project_copy / "katas" / card02.dir / "test_card02_memory_vs_compute.py", "kv_bytes_per_token")
    assert failing
    for t in failing:
        said = "\n".join(board.wrap(probes[t], "      probes: ", " " * 14))  # wrapped to 80 columns
        assert f"  {t}\n{said}\n" in proc.stdout, proc.stdout
    for t in probes:
        if t not in failing:
            assert f"  {t}\n      probes:" not in proc.stdout, f"{t} passes, yet it is listed as failing"
    assert "Red flags to listen for:" in proc.stdout


@pytest.mark.slow
def test_plot_writes_the_figures_from_kvref(tmp_path, project_copy):
    pytest.importorskip("matplotlib", reason="kvkata plot needs matplotlib (the dev extra)")
    proc = kvkata(project_copy, "plot", "--out", str(tmp_path / "figs"))
    assert proc.returncode == 0, proc.stderr
    written = [Path(line) for line in proc.stdout.split()]
    names = {p.name for p in written}
    assert {"kv_bytes_vs_context.png", "roofline.png", "cached_vs_uncached_roofline.png"} <= names
    for p in written:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, p


# --- saved progress, status and the warm watcher ----------------------------------------------

N_KATAS = len(manifest.all_katas())


def with_solution_of(project: Path, kata: manifest.Kata, replace: tuple[str, str] | None = None) -> None:
    """Put the worked solution of one kata (its function or class, nothing else) into the stub,
    optionally with `replace` = (old, new) applied to it: a plausible wrong answer."""
    def segment(path: Path) -> tuple[str, ast.AST]:
        text = path.read_text()
        node = next(n for n in ast.parse(text).body if getattr(n, "name", None) == kata.name)
        return text, node

    solution, node = segment(project / "solutions" / kata.dir / f"{kata.module}.py")
    body = ast.get_source_segment(solution, node)
    if replace is not None:
        assert body.count(replace[0]) == 1, f"{kata.name}'s solution changed: update this check"
        body = body.replace(*replace)
    stub_path = project / "katas" / kata.dir / f"{kata.module}.py"
    stub, node = segment(stub_path)
    lines = stub.splitlines(keepends=True)
    stub_path.write_text("".join(lines[:node.lineno - 1]) + body + "\n" + "".join(lines[node.end_lineno:]))


def card_line(output: str, card: manifest.Card) -> str:
    return next(ln for ln in output.splitlines() if ln.startswith(f"  {card.id}  "))


def test_progress_merges_a_partial_run_and_never_counts_a_kata_solved_from_part_of_its_tests(project_copy):
    card = manifest.card("card01")
    a, b, c = card.katas[:3]

    def state(outcomes: dict[manifest.Kata, list[str]], totals: dict[manifest.Kata, int]) -> board.RunState:
        results, katas = {}, {}
        for kata, seq in outcomes.items():
            for i, outcome in enumerate(seq):
                results[f"t::{kata.name}[{i}]"] = outcome
                katas[f"t::{kata.name}[{i}]"] = kata
        return board.RunState(results, katas, {(k.card, k.name): n for k, n in totals.items()})

    progress.record_run(board.settled(state({a: ["passed", "passed"], b: ["todo"]}, {a: 2, b: 1})), root=project_copy)
    status = progress.statuses(root=project_copy)
    assert (status[progress.key(a)], status[progress.key(b)], status[progress.key(c)]) == ("solved", "todo", "not run")
    # A later run of other katas keeps a's result; a kata run in part (1 of its 2 tests) settles nothing.
    progress.record_run(board.settled(state({c: ["passed", "failed"], b: ["passed"]}, {c: 2, b: 2})), root=project_copy)
    status = progress.statuses(root=project_copy)
    assert (status[progress.key(a)], status[progress.key(b)], status[progress.key(c)]) == ("solved", "todo", "failing")
    # A run that named test ids may have collected fewer tests than the kata has: no pass counts solved.
    progress.record_run(board.settled(state({b: ["passed"]}, {b: 1})), narrowed=True, root=project_copy)
    assert progress.statuses(root=project_copy)[progress.key(b)] == "todo"
    # An edit of a's stub since its result makes it stale; an edit elsewhere in the file does not.
    stub = project_copy / "katas" / card.dir / f"{a.module}.py"
    stub.write_text(stub.read_text() + "\n# a note below every kata\n")
    assert progress.statuses(root=project_copy)[progress.key(a)] == "solved"
    shipped = stub.read_text()
    stub.write_text(shipped.replace(f"def {a.name}(", f"def {a.name}(  # edited\n        ", 1))
    assert progress.statuses(root=project_copy)[progress.key(a)] == "stale"
    # Solved as edited, then the shipped stub pasted back (or `kvkata reset`): a stub, not a stale result.
    progress.record_run(board.settled(state({a: ["passed", "passed"]}, {a: 2})), root=project_copy)
    assert progress.statuses(root=project_copy)[progress.key(a)] == "solved"
    stub.write_text(shipped)
    assert progress.statuses(root=project_copy)[progress.key(a)] == "todo"


def test_status_after_a_partial_run_shows_it_solved_others_not_run_and_an_edit_stale(project_copy):
    card = manifest.card("card01")
    token_passes, kv_rows, fraction = card.katas[:3]
    other = manifest.card("card00")
    with_solution_of(project_copy, token_passes)
    run = run_suite("--kata", token_passes.name, cwd=project_copy)
    assert run.returncode == 0, run.output[-3000:]
    # The end-of-run board, the status board and the list all read the same record.
    for output in (run.output, kvkata(project_copy, "status").stdout):
        assert re.search(rf"\[#\.{{4}}\] 1/5 katas solved", card_line(output, card)), output
        assert re.search(rf"\[\.{{6}}\] 0/6 katas solved", card_line(output, other)), output
        assert f"] 1/{N_KATAS} katas solved" in output
    listing = kvkata(project_copy, "list").stdout
    assert re.search(rf"# {token_passes.name}\s+solved ", listing) and re.search(rf"\. {kv_rows.name}\s+not run ", listing)
    status = kvkata(project_copy, "status").stdout
    for mark, meaning in (("#", "solved"), ("x", "failing"), ("-", "still the stub"), (".", "not run"), ("~", "stale")):
        assert f"{mark} {meaning}" in status, f"the legend must say what {mark} means"
    # An edit of the solved kata makes it stale; a run of two other katas (one a stub, one wrong) merges in.
    stub = project_copy / "katas" / card.dir / f"{token_passes.module}.py"
    stub.write_text(stub.read_text().replace("# the prompt once", "# the prompt once, as I worked out", 1))
    with_solution_of(project_copy, fraction, ("return (fed - new) / fed", "return new / fed"))
    run = run_suite("--kata", kv_rows.name, "--kata", fraction.name, cwd=project_copy)
    assert run.returncode == 1
    status = kvkata(project_copy, "status").stdout
    assert re.search(r"\[~-x\.\.\] 0/5 katas solved", card_line(status, card)), status
    assert f"] 0/{N_KATAS} katas solved" in status


def test_status_reads_the_record_without_importing_torch_or_running_anything(project_copy):
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "kvkata.cli", "status"], cwd=project_copy,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(project_copy)})
    assert proc.returncode == 0, proc.stderr
    imported = {ln.rsplit("|", 1)[-1].strip() for ln in proc.stderr.splitlines() if ln.startswith("import time:")}
    heavy = sorted(m for m in imported if m.split(".")[0] in ("torch", "hypothesis", "pytest", "kvref", "numpy"))
    assert len(imported) > 20 and not heavy, heavy[:10]
    assert f"0/{N_KATAS} katas solved" in proc.stdout and "nothing run yet" in proc.stdout


def watch_once(project: Path, *args: str) -> subprocess.CompletedProcess:
    return kvkata(project, "watch", *args, "--once")


def test_watch_shows_a_wrong_answers_whole_message_before_the_board(project_copy):
    before = learner_files(project_copy)
    repeat_kv = manifest.card("card00").katas[0]
    with_solution_of(project_copy, repeat_kv, ("repeat_interleave(G, dim=1)", "repeat(1, G, 1, 1)"))
    edited = learner_files(project_copy)
    assert edited != before
    proc = watch_once(project_copy, "card00")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    called = [ln for ln in out.splitlines() if ln.startswith("called repeat_kv(")]
    assert called, out
    # The whole message (pytest's short summary would cut it at 80 columns): what was called, what came
    # back, what was expected, the tolerance at its end, and the test and kata it comes from.
    assert "got " in called[0] and "expected " in called[0] and "(tolerance " in called[0], called[0]
    assert f"(kata card00 repeat_kv, {repeat_kv.where()})" in out
    assert out.index(called[0]) < out.index(f"] 0/{N_KATAS} katas solved") < out.index("next: fix card00 repeat_kv")
    assert learner_files(project_copy) == edited, "watch must not write the learner's files"


def test_watch_shows_a_syntax_error_in_full_with_file_line_and_code(project_copy):
    stub = project_copy / STUB01
    stub.write_text(stub.read_text() + "\ndef broken(:\n")
    line = len(stub.read_text().splitlines())
    proc = watch_once(project_copy, "card01")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    assert f'  File "{STUB01.as_posix()}", line {line}\n    def broken(:\n' in out, out
    assert re.search(r"\n\s+\^+\nSyntaxError: ", out), out
    assert f"{STUB01.as_posix()} does not import: SyntaxError at {STUB01.as_posix()}:{line}" in out
    assert re.search(rf"card01\s+{re.escape(CARD01.title)}\s+does not import", out)


def test_watch_without_a_card_starts_at_the_first_unsolved_kata_and_moves_on_when_it_passes(project_copy):
    card00 = manifest.card("card00")
    # card00 solved earlier (its record, with the stubs' current hashes): watch starts in card01.
    settled = {progress.key(k): ("solved", 1, "") for k in card00.katas}
    progress.record_run(settled, root=project_copy)
    first, second = CARD01.katas[:2]
    with_solution_of(project_copy, first)
    proc = watch_once(project_copy)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    assert out.splitlines()[0].startswith(f"kvkata watch: starting with card01 {first.name}"), out
    assert f"card01 {first.name}: SOLVED" in out
    assert f"moving on to card01 {second.name}" in out
    assert f"TODO card01 {second.name}: edit" in out
    assert out.index(f"card01 {first.name}: SOLVED") < out.index(f"TODO card01 {second.name}")
    assert "card00 repeat_kv" not in out.split("moving on")[0]


class _Stop(Exception):
    """Ends a fake file watcher's stream of changes."""


def test_watch_runs_a_save_made_before_its_file_watcher_started_and_only_once(monkeypatch):
    """A save while watch loads or runs (before, or while, the file watcher starts) is found by its hash."""
    import watchfiles

    from kvkata import watch

    first, saved = manifest.all_katas()[0], CARD01.katas[1]
    hashes = progress.stub_hashes()
    w = watch.Watcher(first, clear=False)
    assert w.unseen() == []
    # the learner saves `saved` while the first run runs: the run took the hashes from before the save
    edited = {**hashes, progress.key(saved): "saved while the first run ran"}
    monkeypatch.setattr(progress, "stub_hashes", lambda katas=None, root=ROOT: (
        {progress.key(k): edited[progress.key(k)] for k in katas} if katas is not None else edited))
    w.seen = dict(hashes)

    def fake_watch(*paths, **options):
        assert options.get("yield_on_timeout"), "without a quiet-second tick no save made before the start is found"
        yield from (set(), set(), set())  # three quiet seconds, no file event
        raise _Stop

    ran = []
    monkeypatch.setattr(watchfiles, "watch", fake_watch)
    monkeypatch.setattr(w, "cycle", lambda katas, why, clear=True: (ran.append((katas, why)), w.seen.update(
        {progress.key(k): edited[progress.key(k)] for k in katas}))[0])
    with pytest.raises(_Stop):
        w.follow_saves()
    assert ran == [([saved], f"{saved.module}.py saved")], ran  # the saved kata, once; not the current one
    os.close(w.fd)


def test_watch_remembers_the_stub_it_ran_not_the_one_saved_during_the_run(monkeypatch):
    from kvkata import runner, watch

    kata = CARD01.katas[0]
    hashes = progress.stub_hashes()
    w = watch.Watcher(kata, clear=False)
    during = {**hashes, progress.key(kata): "saved during the run"}

    def fake_run(katas, fd):
        monkeypatch.setattr(progress, "stub_hashes", lambda katas=None, root=ROOT: (
            {progress.key(k): during[progress.key(k)] for k in katas} if katas is not None else during))
        return runner.Result(1, "", None)

    monkeypatch.setattr(watch, "_run", fake_run)
    monkeypatch.setattr(watch, "_preload_card", lambda card, loaded: loaded.add(card.id))
    w.run_once([kata], "starting", clear=False)
    assert w.seen[progress.key(kata)] == hashes[progress.key(kata)]  # what ran, not what was saved meanwhile
    assert w.unseen() == [kata]
    os.close(w.fd)
