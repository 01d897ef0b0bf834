"""The shape of the code base (docs/design.md, "Which part knows which"): imports run one way,
lazy imports included; short modules."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
# module name -> file, with pipelines/ and bench/ mapped into the package as installed
FOLDERS = {"meld_dali": ROOT / "meld_dali", "meld_dali.pipelines": ROOT / "pipelines",
           "meld_dali.bench": ROOT / "bench"}


def modules() -> dict[str, Path]:
    out = {}
    for prefix, folder in FOLDERS.items():
        for f in folder.rglob("*.py"):
            parts = list(f.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = f
    return out


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Project modules a file imports anywhere (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            if n in known:
                found.add(n)
    return found


@pytest.fixture(scope="module")
def graph():
    mods = modules()
    return {m: imports_of(p, set(mods)) - {m} for m, p in mods.items()}


def reachable(graph, start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_no_import_cycles(graph):
    # package __init__ modules are namespaces here: an edge to them is not an edge back
    cyclic = [m for m in graph if m in reachable(graph, m) and not m.endswith("__init__")]
    assert not cyclic, {m: sorted(graph[m]) for m in cyclic}


def test_engine_never_imports_the_cli(graph):
    for m in graph:
        if m not in ("meld_dali.cli", "meld_dali.__main__"):
            assert "meld_dali.cli" not in reachable(graph, m), m


@pytest.mark.parametrize("mod", ["meld_dali.trainer", "meld_dali.model",
                                 "meld_dali.evaluation", "meld_dali.checkpoint"])
def test_trainer_and_model_never_reach_dali(graph, mod):
    assert not any(r.startswith("meld_dali.pipelines") for r in reachable(graph, mod))


def test_modules_stay_short():
    long = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long
