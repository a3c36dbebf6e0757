"""The shape of the code (README, "How the code is organised"): two tiers of flat files.

Stage files hold the paper, one section each; support modules hold the guarantees of the README's
Reliability section. Stage files may import support modules, never the reverse, and no import
chain comes back to where it started. These tests read the files' import statements (every
`import`, also the ones inside functions) and import each module in a fresh interpreter.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
STAGES = {"losses", "model", "data", "synthetic", "train", "infer", "evaluate", "boundary", "crf", "plot"}
SUPPORT = {"checks", "checkpoint", "distributed", "finite", "runfolder", "layouts"}
TOOLS = {"bench", "experiments", "hubconf"}  # measure or package the stages; nothing imports them
LIMITS = {"train": 800}  # lines; every other stage file: STAGE_LIMIT
STAGE_LIMIT = 1000
FUNCTION_LIMIT = 80  # lines of one function in a stage file


def modules() -> dict[str, Path]:
    return {p.stem: p for p in sorted(ROOT.glob("*.py")) if not p.stem.startswith("test_") and p.stem != "conftest"}


def project_imports(path: Path, names: set[str]) -> set[str]:
    """The project modules `path` imports anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return (found & names) - {path.stem}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: project_imports(path, set(mods)) for name, path in mods.items()}


def test_every_file_belongs_to_a_tier():
    unplaced = set(modules()) - STAGES - SUPPORT - TOOLS
    assert not unplaced, f"place {sorted(unplaced)} in STAGES, SUPPORT or TOOLS (and in the README's file table)"


def test_support_modules_import_no_stage_file():
    g = graph()
    wrong = {m: sorted(g[m] & (STAGES | TOOLS)) for m in SUPPORT & set(g) if g[m] & (STAGES | TOOLS)}
    assert not wrong, f"support modules importing stage files: {wrong}"


def test_nothing_imports_the_tools():
    g = graph()
    wrong = {m: sorted(g[m] & TOOLS) for m in g if g[m] & TOOLS}
    assert not wrong, wrong


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, colours white/grey/black)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(g):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_find_cycle_finds_one():  # the check below must be able to fail
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle():
    cycle = find_cycle(graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_losses_imports_torch_alone():
    tree = ast.parse((ROOT / "losses.py").read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    assert roots <= {"torch", "__future__", "math", "functools", "typing", "collections", "dataclasses"}, roots


@pytest.mark.parametrize("name", sorted(STAGES | SUPPORT))
def test_each_module_imports_alone_in_a_fresh_interpreter(name):
    if not (ROOT / f"{name}.py").exists():
        pytest.skip(f"{name}.py not in this checkout")
    done = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_stage_files_keep_their_size():
    """train.py shows the recipe (<= 800 lines), every stage file stays under 1,000 lines, and no
    function of a stage file runs past about a screen."""
    problems = []
    for name in sorted(STAGES & set(modules())):
        path = ROOT / f"{name}.py"
        lines = len(path.read_text().splitlines())
        if lines > LIMITS.get(name, STAGE_LIMIT):
            problems.append(f"{path.name} has {lines} lines (limit {LIMITS.get(name, STAGE_LIMIT)})")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > FUNCTION_LIMIT:
                    problems.append(f"{path.name}:{node.lineno} {node.name}() has {length} lines")
    assert not problems, "; ".join(problems)


def test_nothing_is_defined_after_the_main_guard():
    """`python X.py` runs main() at the `if __name__ == "__main__":` line: a function defined below
    it does not exist yet then (importing the module, as the tests do, would not notice)."""
    late = []
    for name, path in modules().items():
        body = ast.parse(path.read_text()).body
        guards = [i for i, node in enumerate(body) if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)]
        if guards:
            late += [f"{path.name}: {node.name}" for node in body[guards[0] + 1:] if hasattr(node, "name")]
    assert not late, f"defined after the __main__ guard: {late}"
