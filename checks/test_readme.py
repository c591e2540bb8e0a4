"""The README's first lines are the two commands a newcomer runs; .ci/run runs the second one."""

from checks.conftest import ROOT


def readme_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    block = lines[lines.index("```bash") + 1: lines.index("```")]
    return [ln for ln in block if ln and not ln.startswith("#")]


def test_readme_opens_with_the_learner_and_the_maintainer_commands():
    learner, maintainer = readme_commands()
    assert learner.endswith(".venv/bin/pytest") and "pip install" in learner
    assert maintainer.endswith("pytest checks") and "'.[dev]'" in maintainer


def test_ci_runs_exactly_the_readme_maintainer_command():
    _, maintainer = readme_commands()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert maintainer in ci
