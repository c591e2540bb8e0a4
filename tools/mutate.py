"""Mutation testing of a card's solutions: how many single-site mutants do the card's tests kill?

    python tools/mutate.py card00 [--timeout 120] [--list] [--fresh] [--module NAME]

Each mutant changes one site of a solution module (an operator swapped, a comparison
loosened, a constant changed, n_kv_heads exchanged for n_heads, a slice bound moved); the
card's tests run in solutions mode against it, in a scratch copy of the project. A mutant
is killed when the tests fail. Equivalent mutants (same behaviour) cannot be killed; the
report lists the survivors so a maintainer can tell which is which.

By default torch, hypothesis and pytest are imported once and each mutant's pytest runs in a
forked child that drops every project module (kvkata, kvref, katas, solutions) and imports them
again from the scratch copy: about 1 s per mutant instead of 6. `--fresh` starts a new
interpreter per mutant instead (slower; for a platform without fork).
"""

from __future__ import annotations

import argparse
import ast
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kvkata import manifest, runner  # noqa: E402

BINOPS = {ast.Add: [ast.Sub, ast.Mult], ast.Sub: [ast.Add], ast.Mult: [ast.Add, ast.Div], ast.Div: [ast.Mult, ast.FloorDiv],
          ast.FloorDiv: [ast.Mult, ast.Mod], ast.Mod: [ast.FloorDiv], ast.Pow: [ast.Mult]}
CMPOPS = {ast.Gt: [ast.GtE, ast.Lt], ast.GtE: [ast.Gt], ast.Lt: [ast.LtE, ast.Gt], ast.LtE: [ast.Lt],
          ast.Eq: [ast.NotEq], ast.NotEq: [ast.Eq]}
NAME_SWAPS = {"n_kv_heads": "n_heads", "n_heads": "n_kv_heads", "Hkv": "H", "H": "Hkv", "k": "v", "v": "k",
              "min": "max", "max": "min", "k_new": "v_new", "v_new": "k_new"}


def sites(tree: ast.AST):
    """Yield (description, mutate) pairs; mutate(node) edits a deep copy in place."""
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp):
            for new in BINOPS.get(type(node.op), []):
                yield node, f"line {node.lineno}: {type(node.op).__name__} -> {new.__name__}", lambda n, new=new: setattr(n, "op", new())
        elif isinstance(node, ast.Compare) and len(node.ops) == 1:
            for new in CMPOPS.get(type(node.ops[0]), []):
                yield node, f"line {node.lineno}: {type(node.ops[0]).__name__} -> {new.__name__}", lambda n, new=new: setattr(n, "ops", [new()])
        elif isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            for new in {node.value + 1, node.value - 1, 0 if node.value else 1} - {node.value}:
                yield node, f"line {node.lineno}: constant {node.value!r} -> {new!r}", lambda n, new=new: setattr(n, "value", new)
        elif isinstance(node, ast.Name) and node.id in NAME_SWAPS and isinstance(node.ctx, ast.Load):
            new = NAME_SWAPS[node.id]
            yield node, f"line {node.lineno}: name {node.id} -> {new}", lambda n, new=new: setattr(n, "id", new)
        elif isinstance(node, ast.Attribute) and node.attr in NAME_SWAPS and isinstance(node.ctx, ast.Load):
            new = NAME_SWAPS[node.attr]
            yield node, f"line {node.lineno}: attribute .{node.attr} -> .{new}", lambda n, new=new: setattr(n, "attr", new)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            yield node, f"line {node.lineno}: unary minus removed", "drop-usub"


def _targets(tree: ast.AST):
    """The mutation sites of `tree`, docstrings left alone (mutating prose is not a mutant)."""
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(n)}
    return [(n, d, m) for n, d, m in sites(tree) if id(n) not in docs]


def mutants(source: str):
    """Yield (description, mutated source), one site at a time, each from a fresh parse."""
    for index, (_, desc, _) in enumerate(_targets(ast.parse(source))):
        fresh = ast.parse(source)
        node, _, mutate = _targets(fresh)[index]
        if mutate == "drop-usub":
            node.op = ast.UAdd()
        else:
            mutate(node)
        yield desc, ast.unparse(fresh)


PROJECT_PACKAGES = {"kvkata", "kvref", "katas", "solutions", "conftest", "tools"}


def preload() -> None:
    """Import the heavy third-party modules once, before the first fork."""
    runner.preload(extra=("transformers", "triton", "numpy"))


def killed_in_fork(work: Path, args: list[str], env: dict, timeout: int) -> bool:
    """Run pytest `args` in a forked child on the scratch copy `work`; True when the tests fail or hang."""
    result = runner.run_forked(args, cwd=work, env=env, timeout=timeout, fresh=tuple(PROJECT_PACKAGES))
    return result.returncode != 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("card")
    parser.add_argument("--timeout", type=int, default=120)
    parser.add_argument("--list", action="store_true", help="list the mutants without running them")
    parser.add_argument("--fresh", action="store_true", help="a new interpreter per mutant instead of a fork")
    parser.add_argument("--module", help="mutate only this solution module of the card (e.g. kernel)")
    args = parser.parse_args(argv)
    try:
        card = manifest.card(args.card)
    except KeyError as e:
        parser.error(e.args[0])
    modules = sorted({k.module for k in card.katas})
    if args.module is not None and args.module not in modules:
        parser.error(f"{card.id} has no solution module {args.module!r}; its modules: {', '.join(modules)}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "project"
        shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "bench", "*.egg-info", ".hypothesis"))
        env = {**os.environ, "KVKATA_MODE": "solutions", "HYPOTHESIS_PROFILE": "ci"}
        killed, survivors, total = 0, [], 0
        pytest_args = ["-x", "-q", "-k", card.id, "-p", "no:randomly", "-p", "no:cacheprovider"]
        fork = hasattr(os, "fork") and not args.fresh and not args.list
        if fork:
            preload()
            # A runner that fails every run would "kill" every mutant: the unmutated solutions must pass.
            if killed_in_fork(work, pytest_args, env, args.timeout):
                print(f"{card.id}: the tests fail on the unmutated solutions (run pytest --solutions -k {card.id})")
                return 1
        for module in sorted({k.module for k in card.katas if args.module in (None, k.module)}):
            path = work / "solutions" / card.dir / f"{module}.py"
            original = path.read_text()
            for desc, text in mutants(original):
                total += 1
                if args.list:
                    print(f"{module}.py {desc}")
                    continue
                path.write_text(text)
                if fork:
                    dead = killed_in_fork(work, pytest_args, env, args.timeout)
                else:
                    try:
                        dead = runner.run(pytest_args, cwd=work, env=env, timeout=args.timeout).returncode != 0
                    except subprocess.TimeoutExpired:
                        dead = True  # a mutant that hangs is caught by the timeout
                killed += dead
                if not dead:
                    survivors.append(f"{module}.py {desc}")
                print(f"{'killed  ' if dead else 'SURVIVED'} {module}.py {desc}", flush=True)
            path.write_text(original)
    if not args.list:
        print(f"\n{card.id}: {killed}/{total} mutants killed ({100 * killed / max(total, 1):.1f}%)")
        for s in survivors:
            print(f"  survived: {s}")
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip the interpreter's teardown: triton's bindings (preloaded for the forks) print hundreds of
    # lines of "nanobind: leaked ..." at exit, burying the report. The scratch copy is already removed.
    os._exit(code)
