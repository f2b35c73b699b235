"""The dependency direction of docs/architecture.md, checked on every module's imports (any depth, so a
lazy import inside a function counts too): configs -> recdata -> teacher -> retrieval -> trainer -> cluster,
nothing imports upward, no import circles between modules, and only cluster/ imports Ray."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["configs", "recdata", "teacher", "retrieval", "trainer", "cluster"]
RANK = {name: i for i, name in enumerate(LAYERS)}


def _modules() -> dict[str, Path]:
    out = {}
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            out[".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")] = path
    return out


def _imports(path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import statement in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno))
            found += [(f"{node.module}.{a.name}", node.lineno) for a in node.names]
    return found


MODULES = _modules()


def _project_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for mod, path in MODULES.items():
        for name, _ in _imports(path):
            if name in MODULES and name != mod:
                edges[mod].add(name)
    return edges


def test_layers_cover_the_code():
    assert len(MODULES) > 40, sorted(MODULES)  # the walk really finds the packages


# The command users run (`python trainer/main.py`) stays where the design puts it; it is a script that calls
# the pipeline driver, not a module anything imports.
ENTRY_SCRIPTS = {"trainer.main"}


@pytest.mark.parametrize("mod", sorted(set(MODULES) - ENTRY_SCRIPTS))
def test_nothing_imports_upward(mod):
    here = RANK[mod.split(".")[0]]
    upward = [(name, line) for name, line in _imports(MODULES[mod])
              if name.split(".")[0] in RANK and RANK[name.split(".")[0]] > here]  # fmt: skip
    assert not upward, f"{MODULES[mod].relative_to(ROOT)} imports a higher layer: {upward}"


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_only_cluster_imports_ray(mod):
    if mod.startswith("cluster"):
        return
    ray = [(name, line) for name, line in _imports(MODULES[mod]) if name == "ray" or name.startswith("ray.")]
    assert not ray, f"{MODULES[mod].relative_to(ROOT)} imports Ray (only cluster/ may): {ray}"


def test_no_import_cycles():
    edges = _project_edges()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                cycles.append(path[path.index(n) :] + [n] if n in path else [m, n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, f"import cycles: {cycles}"


def test_the_check_catches_an_upward_import(tmp_path):
    """The walk sees imports inside functions too (the way cycles used to hide)."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from cluster.pool import run_sharded\n    import ray\n")
    names = [n for n, _ in _imports(f)]
    assert "cluster.pool" in names and "ray" in names


def _private_uses(path: Path) -> list[tuple[str, int]]:
    """`from project.module import _name` and `module._name` where `module` is an imported project module."""
    tree = ast.parse(path.read_text(), str(path))
    module_names, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in RANK:
                    module_names.add(a.asname or a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in RANK:
            for a in node.names:
                if f"{node.module}.{a.name}" in MODULES:  # a module imported by name
                    module_names.add(a.asname or a.name)
                elif a.name.startswith("_"):
                    found.append((f"{node.module}.{a.name}", node.lineno))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name) and node.value.id in module_names):  # fmt: skip
            found.append((f"{node.value.id}.{node.attr}", node.lineno))
    return found


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_no_private_names_across_modules(mod):
    uses = _private_uses(MODULES[mod])
    assert not uses, f"{MODULES[mod].relative_to(ROOT)} uses private names of other modules: {uses}"


def test_bench_uses_no_private_names():
    uses = {p.name: _private_uses(p) for p in sorted((ROOT / "bench").glob("*.py"))}
    assert not {k: v for k, v in uses.items() if v}
