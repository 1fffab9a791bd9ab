"""The data flow stays one-way: no stage imports a later one, and no two modules import each other.

cytocore -> segmentation / classification -> fusion -> experiments; cytosynth (synthetic data) sits
on cytocore and is used by experiments and tests only. The check reads every module's source with
``ast`` (imports inside functions count too: a lazy import is still a dependency a reader has to
follow), so it needs no MindSpore and runs in well under a second.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Package -> the packages it may import (besides itself).
ALLOWED: dict[str, set[str]] = {
    "cytocore": set(),
    "cytosynth": {"cytocore"},
    "segmentation": {"cytocore"},
    "classification": {"cytocore"},
    "fusion": {"cytocore", "segmentation", "classification"},
    "experiments": {"cytocore", "cytosynth", "segmentation", "classification", "fusion"},
}


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages."""
    out = {}
    for package in ALLOWED:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imported_names(name: str, path: Path) -> set[str]:
    """Every dotted name ``path`` imports, at any depth, relative imports made absolute."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".") if is_package else name.split(".")[:-1]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # ``from pkg import module``
    return found


def module_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the project modules it imports (a name resolves to its longest existing module)."""
    files = module_files(root)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets = set()
        for imported in imported_names(name, path):
            while imported and imported not in files:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def backward_imports(graph: dict[str, set[str]]) -> list[str]:
    """``"a.b -> c.d"`` for every import of a package that ``a`` may not use."""
    bad = []
    for module, targets in sorted(graph.items()):
        own = module.split(".")[0]
        for target in sorted(targets):
            other = target.split(".")[0]
            if other != own and other not in ALLOWED[own]:
                bad.append(f"{module} -> {target}")
    return bad


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    cycles.append(sorted(group))
    return cycles


def test_no_stage_imports_a_later_one():
    assert backward_imports(module_graph()) == []


def test_no_import_cycles():
    assert import_cycles(module_graph()) == []


def test_the_checks_catch_a_backward_import_and_a_cycle(tmp_path):
    """The checker itself: a segmentation module importing fusion, and two modules importing each
    other inside functions, are both found."""
    for package in ALLOWED:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "segmentation" / "a.py").write_text("def f():\n    from .b import g\n")
    (tmp_path / "segmentation" / "b.py").write_text("def g():\n    from segmentation import a\n")
    (tmp_path / "segmentation" / "c.py").write_text("import fusion.d\n")
    (tmp_path / "fusion" / "d.py").write_text("from cytocore import e\n")
    (tmp_path / "cytocore" / "e.py").write_text("from . import f\n")
    (tmp_path / "cytocore" / "f.py").write_text("X = 1\n")
    graph = module_graph(tmp_path)
    assert backward_imports(graph) == ["segmentation.c -> fusion.d"]
    assert import_cycles(graph) == [["segmentation.a", "segmentation.b"]]
    assert graph["cytocore.e"] == {"cytocore", "cytocore.f"}


def test_every_package_is_read():
    """Guards the two checks above against passing on an empty graph (a wrong ROOT)."""
    packages = {name.split(".")[0] for name in module_files()}
    assert packages == set(ALLOWED)
