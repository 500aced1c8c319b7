"""Architecture: stored identities never change, imports only point down, the store needs no torch."""

from __future__ import annotations

import ast
import copy
import subprocess
import sys
from pathlib import Path

import pytest

from ldam_sweep.planning import StorePlan

# A plan exactly as zarr.json stores it (attrs "plan"), with a spec that has every field the
# identity rules treat specially: store, resources, model.memory_format, model.precision float32.
PLAN_JSON = {
    "layers": [
        {"name": "conv2", "kind": "conv", "module_type": "Conv2d", "units": 32, "output_shape": [32, 14, 14],
         "block_size": 4, "objective": "channel", "selected": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]},
        {"name": "fc2", "kind": "logit", "module_type": "Linear", "units": 10, "output_shape": [10],
         "block_size": 4, "objective": "logit", "selected": None},
    ],
    "chains": 2, "steps": 12, "snapshot_steps": [6, 12], "image_shape": [1, 28, 28], "value_range": [0.0, 1.0],
    "realism": True, "exemplars_k": 3, "model_name": "digits-cnn", "model_fingerprint": "ab" * 32,
    "spec": {
        "name": "pin", "model": {"zoo": "digits-cnn", "memory_format": "auto", "precision": "float32"},
        "layers": ["conv2", "fc2"], "units": {"conv2": "0-15"},
        "sampler": {"method": "ldam", "steps": 12, "chains": 2, "lam": 0.5, "seed": 0},
        "resources": {"actors": 2, "block_size": 4, "max_attempts": 3, "commit_every": 8},
        "store": "storage/pin.zarr", "exemplars": 3,
    },
}


def test_stored_plan_hashes_never_change():
    """Stores record these hashes: a change here would make every existing store refuse to resume."""
    plan = StorePlan.from_json(copy.deepcopy(PLAN_JSON))
    assert plan.to_json() == PLAN_JSON
    assert plan.spec_hash() == "05b5bf2e10ed048ccbb95448874a8e071ff751836ba94f93798fe5ef3d941808"
    assert plan.plan_hash() == "78e58023430addb3d90b62f55fc1dd3f0e9831c04a4d27abf7f915606267b27b"


PACKAGE = Path(__file__).resolve().parents[1] / "ldam_sweep"


def _module_names() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, modules: set[str], package: str) -> set[str]:
    """Every ldam_sweep module imported anywhere in ``tree`` (functions included), except under
    ``if TYPE_CHECKING:``. ``from a import b`` points at ``a.b`` when that is a module."""
    found: set[str] = set()

    def nearest(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(filter(None, (nearest(a.name) for a in node.names if a.name.startswith("ldam_sweep"))))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.startswith("ldam_sweep"):
                for a in node.names:
                    target = f"{base}.{a.name}"
                    found.add(target if target in modules else nearest(base))  # type: ignore[arg-type]
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = _module_names()
    graph = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = _imports(ast.parse(path.read_text()), set(paths), package) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_the_graph_walker_sees_lazy_imports_and_skips_type_checking():
    src = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ldam_sweep.b import X\n"
           "def f():\n    from ldam_sweep import c\n    import ldam_sweep.d.e\n")
    mods = {"ldam_sweep", "ldam_sweep.b", "ldam_sweep.c", "ldam_sweep.d"}
    assert _imports(ast.parse(src), mods, "ldam_sweep") == {"ldam_sweep.c", "ldam_sweep.d"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_package_imports_only_point_down():
    """No import circle anywhere in the package, lazy (in-function) imports included; nothing in the
    package imports the package root (its lazy ``__getattr__`` table may then point anywhere)."""
    graph = import_graph()
    importers_of_root = sorted(m for m, deps in graph.items() if "ldam_sweep" in deps)
    assert importers_of_root == [], f"modules importing the package root: {importers_of_root}"
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_store_never_imports_the_sampler():
    graph = import_graph()
    for name, deps in graph.items():
        if name.startswith(("ldam_sweep.store", "ldam_sweep.planning", "ldam_sweep.atlas")):
            bad = sorted(d for d in deps if d.startswith(("ldam_sweep.sampling", "ldam_sweep.model", "ldam_sweep.cluster")))
            assert bad == [], f"{name} imports {bad}"
        if name == "ldam_sweep.planning":
            assert not any(d.startswith("ldam_sweep.store") for d in deps), "planning must not import the store"


@pytest.mark.parametrize("module", ["ldam_sweep", "ldam_sweep.store", "ldam_sweep.atlas.site", "ldam_sweep.planning",
                                    "ldam_sweep.spec", "ldam_sweep.compare"])
def test_importing_without_torch(module):
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"import {module} loaded {out.stdout.strip()}"
