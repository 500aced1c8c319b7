"""Architecture: stored identities never change, imports only point down, the store needs no torch."""

from __future__ import annotations

import ast
import copy
import subprocess
import sys
from pathlib import Path

import pytest

from ldam_sweep.store.schema import StorePlan

pytestmark = pytest.mark.fast  # the whole file is in the quick tier (make test-fast)

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


def _imports(tree: ast.AST, modules: set[str], package: str, type_checking: bool = False) -> set[str]:
    """Every ldam_sweep module imported anywhere in ``tree`` (functions included), except under
    ``if TYPE_CHECKING:`` unless ``type_checking``. ``from a import b`` points at ``a.b`` when that is a module."""
    found: set[str] = set()

    def nearest(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node) and not type_checking:
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


def import_graph(type_checking: bool = False) -> dict[str, set[str]]:
    paths = _module_names()
    graph = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = _imports(ast.parse(path.read_text()), set(paths), package, type_checking) - {name}
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
    assert _imports(ast.parse(src), mods, "ldam_sweep", type_checking=True) == {"ldam_sweep.b", "ldam_sweep.c", "ldam_sweep.d"}
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
        if name == "ldam_sweep.planning":  # the store's schema is the store's; planning builds plans of it
            assert {d for d in deps if d.startswith("ldam_sweep.store")} <= {"ldam_sweep.store.schema"}, deps
        if name.startswith("ldam_sweep.store"):
            assert "ldam_sweep.planning" not in deps, f"{name} imports planning: the store stands below it"


def test_the_store_stands_below_find_atlas_sampling_model_and_cluster():
    """Nothing in ldam_sweep/store imports find, atlas, sampling, model or cluster: not at the top,
    not lazily inside a function, not under TYPE_CHECKING (the store is the bottom layer readers share)."""
    above = ("ldam_sweep.find", "ldam_sweep.atlas", "ldam_sweep.sampling", "ldam_sweep.model", "ldam_sweep.cluster")
    for name, deps in import_graph(type_checking=True).items():
        if name.startswith("ldam_sweep.store"):
            assert sorted(d for d in deps if d.startswith(above)) == [], name


def test_one_place_draws_a_unit_grid_parses_a_store_address_and_stamps_the_generation():
    """The code that three modules used to repeat (and let drift) lives in one place each."""
    def places(needle: str) -> list[str]:
        return sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if needle in p.read_text())

    assert places('row_labels=[f"chain') == [] and places("def chain_labels") == ["render.py"]  # rows of the chains grid
    assert places("unit_grid(") == ["atlas/site.py", "cli.py", "render.py", "store/unitview.py"]
    assert places("isinstance(url, StoreLocation)") == ["store/location.py"]  # StoreLocation.parse
    assert places('**r, "generation"') == ["store/schema.py"]  # stamp_generation
    assert places("stamp_generation(") == ["store/schema.py", "store/verify.py", "store/writer.py"]  # rows, tombstones, failed rows


@pytest.mark.parametrize("module", ["ldam_sweep", "ldam_sweep.store", "ldam_sweep.atlas.site", "ldam_sweep.planning",
                                    "ldam_sweep.spec", "ldam_sweep.compare"])
def test_importing_without_torch(module):
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"import {module} loaded {out.stdout.strip()}"


@pytest.mark.fast
def test_only_failpoints_names_the_fault_injection_variables():
    """Fault injection goes through ldam_sweep/failpoints.py: product code calls a point there and
    never reads a test variable itself (issue 28)."""
    allowed = PACKAGE / "failpoints.py"
    offenders = sorted({str(path.relative_to(PACKAGE.parent)) for path in PACKAGE.rglob("*")
                        if path.is_file() and path != allowed and "__pycache__" not in path.parts
                        for needle in (b"LDAM_SWEEP_TEST_", b"LDAM_SWEEP_FAILPOINTS")
                        if needle in path.read_bytes()})
    assert offenders == [], f"files naming a fault-injection variable outside failpoints.py: {offenders}"
