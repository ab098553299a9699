"""The package's import graph: no circle, and no module borrowing another's private parts."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

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


# --- one owner per on-disk format (STYLE.md habit 13) -------------------------------------------
# Each format's file and folder names, by the module that owns (reads and writes) it. A name two
# formats share (records/, cells.csv) has two owners; everyone else asks an owner for the path.
FORMAT_NAMES = {
    "data/synth.py": ("masks", "nuclei", "cells.csv", "solution.csv", "synth.json"),
    "data/prepared.py": ("folds.csv", "records", "segmentation", "coco_truth", "refine.json"),
    "evaluation/predictions.py": ("predict.log", "submission.csv", "cells.csv", "records", "segmentation"),
    "data/cache.py": ("records",),
    # fileio writes and checks every step's settings record (check_settings: one folder, one step;
    # the steps take their constant from fileio.SETTINGS_RECORDS) and names a step's failure list,
    # failures<suffix>.csv (fileio.failures_name)
    "utils/fileio.py": ("cache.json", "prepare.json", "segment.json", "predict.json", "download.json",
                        "failures*.csv"),
}
# Uses left outside the owner, each with its reason; those modules are not this change's to edit,
# and each entry says what it should ask instead. The list is meant to shrink.
KNOWN_LITERALS = {
    ("utils/fileio.py", "cells.csv"): "refuse_inside's message, an example of an output in a data folder (utils "
                                      "sits below data.synth, the owner)",
    ("cli.py", "folds.csv"): "EXAMPLES, help text held in a variable",
    ("cli.py", "failures*.csv"): "download's description, help text held in a variable",
}
# Text for people, where naming a file is the point: docstrings and the CLI's help.
HELP_KEYWORDS = ("help", "description", "epilog")


def _name_pattern(name: str) -> re.Pattern:
    """A file name (with a dot; * for any suffix, a shard's) anywhere in a literal; a folder name as
    a path component of one."""
    if "." in name:
        any_suffix = r"[\w{}-]*"  # {}: an f-string's value
        return re.compile(r"(?<![\w-])" + re.escape(name).replace(r"\*", any_suffix) + r"(?![\w])")
    return re.compile(rf"(?<![\w-]){re.escape(name)}/|/{re.escape(name)}(?![\w-])")


def _literals(tree: ast.AST) -> Iterator[tuple[str, bool]]:
    """(text, joined by '/') of every string literal that is not a docstring or help text; an
    f-string's values read as {}. ``joined``: an operand of '/' (a path component)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body and \
                isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            skip.add(id(body[0].value))
        if isinstance(node, ast.keyword) and node.arg in HELP_KEYWORDS:
            skip |= {id(n) for n in ast.walk(node.value)}
    joined = {id(side) for node in ast.walk(tree) if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div)
              for side in (node.left, node.right)}
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.JoinedStr):
            text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
            skip |= {id(v) for v in node.values}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
        else:
            continue
        yield text, id(node) in joined


def format_literals(package_dir: Path = PACKAGE) -> list[str]:
    """'module: name' for every format name typed outside its owners."""
    owners: dict[str, set[str]] = {}
    for owner, names in FORMAT_NAMES.items():
        for name in names:
            owners.setdefault(name, set()).add(owner)
    found = []
    for path in sorted(package_dir.rglob("*.py")):
        module = path.relative_to(package_dir).as_posix()
        literals = list(_literals(ast.parse(path.read_text())))
        for name, where in owners.items():
            if module in where:
                continue
            pattern = _name_pattern(name)
            if any(pattern.search(text) or (joined and text == name) for text, joined in literals):
                found.append(f"{module}: {name}")
    return found


def test_only_a_formats_owner_names_its_files():
    """Prepare, predict, visualize and refine ask PreparedSet, SynthSet and PredictionFolder for
    paths; what is left elsewhere is listed in KNOWN_LITERALS with its reason."""
    known = {f"{module}: {name}" for module, name in KNOWN_LITERALS}
    found = set(format_literals())
    assert sorted(found - known) == [], "a format's file named outside its owner"
    assert sorted(known - found) == [], "KNOWN_LITERALS lists a use that is gone: take it off the list"


def test_the_format_check_sees_a_literal_path(tmp_path):
    (tmp_path / "apps").mkdir()
    (tmp_path / "apps" / "a.py").write_text(
        '"""Reads masks/<ID>.png and prepare.json (a docstring: fine)."""\n'
        'def f(out, data, i, s):\n'
        '    return out / "prepare.json", data / "masks" / f"{i}.png", out / f"failures{s}.csv", "records/x"\n'
        'def g(p):\n'
        '    p.add_argument("x", help="submission.csv of predict")\n'
        '    return {"masks": 1}["masks"]\n')
    assert sorted(format_literals(tmp_path)) == ["apps/a.py: failures*.csv", "apps/a.py: masks",
                                                 "apps/a.py: prepare.json", "apps/a.py: records"]


def test_every_steps_settings_record_is_known_to_check_settings():
    """A step's settings record is its owner's constant, and fileio's table, which refuses one
    step's folder to another, holds every one of them."""
    from hpa_scc.data.cache import CACHE_JSON
    from hpa_scc.data.prepared import PREPARE_JSON
    from hpa_scc.data.public import DOWNLOAD_JSON
    from hpa_scc.evaluation.predictions import PREDICT_JSON
    from hpa_scc.segment.folder import SEGMENT_JSON
    from hpa_scc.utils.fileio import NOT_RESULTS, STEP_RECORDS, check_settings

    assert sorted((CACHE_JSON, PREPARE_JSON, DOWNLOAD_JSON, PREDICT_JSON, SEGMENT_JSON)) == sorted(STEP_RECORDS)
    assert all(NOT_RESULTS.search(name) for name in STEP_RECORDS)
    with pytest.raises(ValueError, match="'settings.json' is not a step's settings record"):
        check_settings(Path("unused"), {}, "settings.json")
