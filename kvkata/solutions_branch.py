"""`kvkata solutions-branch`: a local git branch `solutions` whose katas/ hold the worked solutions.

The branch is HEAD's tree with each stub module katas/<dir>/<module>.py replaced by the committed
solutions/<dir>/<module>.py (the tests, hints and everything else as HEAD has them). It is built
with git's plumbing on a temporary index, so the current branch, the index and the working tree are
never touched:

    GIT_INDEX_FILE=tmp git read-tree HEAD
    GIT_INDEX_FILE=tmp git update-index --cacheinfo 100644,<blob of solutions/…>,katas/…   (per stub)
    GIT_INDEX_FILE=tmp git write-tree
    git commit-tree TREE -p HEAD [-p <the old solutions tip>] -m …
    git update-ref refs/heads/solutions COMMIT [OLD]

Then an interviewer runs the worked answers with `git switch solutions && pytest --interviewer -k
card07`, and `git diff solutions -- katas/card07_distributed` shows a candidate's answers against them.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

from kvkata import ROOT, manifest

BRANCH = "solutions"
REF = f"refs/heads/{BRANCH}"


class NotARepo(RuntimeError):
    """The project is not in a git repository, has no commit yet, or is on the solutions branch."""


def _git(root: Path, *args: str, env: dict | None = None, check: bool = True) -> str:
    proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                          env=None if env is None else {**os.environ, **env})
    if check and proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip() if proc.returncode == 0 else ""


def stub_pairs(root: Path = ROOT) -> list[tuple[str, str]]:
    """(stub module, its worked solution), relative to the project root, one per module, in card order."""
    pairs = []
    for kata in manifest.all_katas():
        pair = (f"katas/{kata.dir}/{kata.module}.py", f"solutions/{kata.dir}/{kata.module}.py")
        if pair not in pairs:
            pairs.append(pair)
    return pairs


def _identity(root: Path) -> dict:
    """An author for commit-tree when the repository has none configured (a fresh container, a CI box)."""
    env = {}
    if not _git(root, "config", "user.name", check=False):
        env.update(GIT_AUTHOR_NAME="kvkata", GIT_COMMITTER_NAME="kvkata")
    if not _git(root, "config", "user.email", check=False):
        env.update(GIT_AUTHOR_EMAIL="kvkata@localhost", GIT_COMMITTER_EMAIL="kvkata@localhost")
    return env


def build(root: Path = ROOT) -> tuple[str, str, bool]:
    """Create or refresh the branch. Returns (commit, HEAD's commit, whether the branch changed)."""
    try:
        top = _git(root, "rev-parse", "--show-toplevel")
    except (RuntimeError, OSError):
        raise NotARepo(f"{root} is not in a git repository (or git is not installed): the solutions branch "
                       "is a git branch. Clone the project with git, or read the solutions in solutions/.") from None
    head = _git(root, "rev-parse", "--verify", "-q", "HEAD^{commit}", check=False)
    if not head:
        raise NotARepo("this repository has no commit yet: commit first, then build the solutions branch from it.")
    if _git(root, "symbolic-ref", "-q", "HEAD", check=False) == REF:
        raise NotARepo(f"you are on the {BRANCH} branch; switch back (git switch -) and build it from there.")
    prefix = Path(os.path.relpath(Path(root).resolve(), Path(top).resolve()))
    prefix_str = "" if str(prefix) == "." else prefix.as_posix() + "/"
    old = _git(root, "rev-parse", "--verify", "-q", f"{REF}^{{commit}}", check=False) or None
    with tempfile.TemporaryDirectory(prefix="kvkata-index-") as tmp:
        env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
        _git(root, "read-tree", head, env=env)
        for stub, solution in stub_pairs(root):
            blob = _git(root, "rev-parse", "--verify", "-q", f"{head}:{prefix_str}{solution}", check=False)
            if not blob:  # not committed yet: the working tree's copy
                blob = _git(root, "hash-object", "-w", "--", solution)
            _git(root, "update-index", "--add", "--cacheinfo", f"100644,{blob},{prefix_str}{stub}", env=env)
        tree = _git(root, "write-tree", env=env)
    if old is not None and _git(root, "rev-parse", f"{old}^{{tree}}") == tree and \
            head in _git(root, "rev-list", "--parents", "-n", "1", old).split()[1:]:
        return old, head, False  # already built from this HEAD
    parents = ["-p", head] + (["-p", old] if old is not None and old != head else [])
    message = (f"kvkata solutions-branch: the worked solutions in katas/, built from {head[:12]}\n\n"
               "Made by `kvkata solutions-branch` (git plumbing; your branch and files are untouched).\n"
               "Run them: git switch solutions && pytest --interviewer -k card07\n"
               "Compare a candidate's answers: git diff solutions -- katas/card07_distributed\n")
    commit = _git(root, "commit-tree", tree, *parents, "-m", message, env=_identity(root))
    _git(root, "update-ref", "-m", "kvkata solutions-branch", REF, commit, *([old] if old else []))
    return commit, head, True
