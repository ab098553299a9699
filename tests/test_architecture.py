"""The package's import graph: no circle, and no module borrowing another's private parts."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "hpa_scc"


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = ("hpa_scc", *path.relative_to(package).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(package_dir: Path = PACKAGE) -> tuple[dict[str, set[str]], list[str]]:
    """Module -> the package modules it imports (function-level imports included), and every
    ``from X import _name`` of a private name across modules."""
    modules = {module_name(p, package_dir): p for p in package_dir.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    private: list[str] = []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([node.module] if node.module else []))
                if not base.startswith("hpa_scc"):
                    continue
                for alias in node.names:
                    deps.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        private.append(f"{name} imports {base}.{alias.name}")
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("hpa_scc")}
        graph[name] = deps - {name}
    return graph, private


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep] if dep in path else [node, dep]
            if dep not in state and (found := visit(dep, path + [dep])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    graph, _ = imports()
    assert "hpa_scc.evaluation.metric" in graph and "hpa_scc.utils.pool" in graph["hpa_scc.apps.prepare"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    assert "hpa_scc.apps.visualize" not in graph["hpa_scc.evaluation.metric"]  # the metric knows nothing of plots


def test_no_module_imports_a_private_name_or_worker_state_of_another():
    _, private = imports()
    assert private == []


def test_the_checks_see_a_private_import_and_a_circle(tmp_path):
    (tmp_path / "__init__.py").write_text("")
    (tmp_path / "a.py").write_text("def f():\n    from hpa_scc.b import _STATE\n")
    (tmp_path / "b.py").write_text("from . import a\n_STATE = {}\n")
    graph, private = imports(tmp_path)
    assert private == ["hpa_scc.a imports hpa_scc.b._STATE"]
    assert find_cycle(graph) == ["hpa_scc.a", "hpa_scc.b", "hpa_scc.a"]


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


# The stages, lowest first: a module imports only from its own stage or a lower one (the README's
# "Layout" section draws the same picture). Stages of equal rank do not import each other.
STAGES = {"hpa_scc": 0, "hpa_scc.constants": 0, "hpa_scc.utils": 1, "hpa_scc.config": 2,
          "hpa_scc.evaluation": 2, "hpa_scc.weak": 2, "hpa_scc.data": 3, "hpa_scc.segment": 4,
          "hpa_scc.models": 5, "hpa_scc.engine": 6, "hpa_scc.apps": 7, "hpa_scc.cli": 8, "hpa_scc.__main__": 9}


def stage(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def wrong_way(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, deps in sorted(graph.items()):
        for dep in sorted(deps):
            a, b = stage(module), stage(dep)
            if a != b and STAGES[b] >= STAGES[a]:
                bad.append(f"{module} -> {dep}")
    return bad


def test_every_module_sits_in_a_stage_and_imports_only_downwards():
    graph, _ = imports()
    assert {stage(m) for m in graph} <= set(STAGES), sorted({stage(m) for m in graph} - set(STAGES))
    assert wrong_way(graph) == []


def test_the_stage_check_sees_an_upward_arrow():
    graph = {"hpa_scc.data.synth": {"hpa_scc.models.detector"}, "hpa_scc.models.detector": {"hpa_scc.data.images"},
             "hpa_scc.weak.targets": {"hpa_scc.evaluation.metric"}}
    assert wrong_way(graph) == ["hpa_scc.data.synth -> hpa_scc.models.detector",
                                "hpa_scc.weak.targets -> hpa_scc.evaluation.metric"]
