"""The shape of the code: layers without cycles or upward imports, kinds as plug-ins, small files.

docs/architecture.md draws the same layers; a new module gets a layer here (and there) or this
test names it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "evomerge"
MAX_LINES = 400

# Bottom to top. A module imports modules of its own layer (without a cycle) or of lower ones.
LAYERS: list[tuple[str, list[str]]] = [
    ("base", ["version", "schema", "refs", "dims", "faults", "progress", "groups", "kernels", "sparsify", "hf_config",
              "lm_eval_compat", "toy"]),
    ("building blocks", ["method_registry", "merge_ops", "task_vectors", "methods", "sources", "evaluate",
                         "fitness", "vllm_args", "vllm_backend", "racing", "objectives", "pareto",
                         "sampler_registry", "sampler",
                         "study", "lease", "ledger", "status"]),
    ("kinds", ["kinds"]),
    ("config", ["config"]),
    ("orchestration", ["output_dir", "workers", "baselines", "dispatch", "search", "report", "plan", "preflight",
                       "runner", "stages", "rescore", "exporter", "front_export", "modelcard", "trial_table"]),
    ("interfaces", ["cli", "dashboard", ""]),  # "": the package itself, the public API
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every evomerge module `name` imports, at any depth of the file (function-level included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            subs = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known}
            out |= subs
            if len(subs) < len(node.names) and base in known:
                out.add(base)
    out.discard(name)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {n: imports_of(n, p, set(mods)) for n, p in mods.items()}


def layer_of(module: str) -> int:
    rest = module.removeprefix("evomerge").removeprefix(".")
    top = rest.split(".")[0]
    for i, (_, names) in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module} has no layer: add it to LAYERS in tests/test_architecture.py and to "
                         "docs/architecture.md")


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_analysis_sees_function_level_and_relative_imports(tmp_path):
    code = "import evomerge.a\nfrom . import b\ndef f():\n    from evomerge.c import thing\n"
    (tmp_path / "m.py").write_text(code)
    known = {"evomerge.a", "evomerge.b", "evomerge.c", "evomerge.m"}
    assert imports_of("evomerge.m", tmp_path / "m.py", known) == {"evomerge.a", "evomerge.b", "evomerge.c"}
    assert cycles({"x": {"y"}, "y": {"x"}, "z": {"x"}}) == [["x", "y"]]


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_nothing_imports_upward():
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
              for m, targets in graph().items() for t in sorted(targets) if layer_of(t) > layer_of(m)]
    assert upward == []


def test_a_kind_imports_no_other_kind():
    kinds = {m.split(".")[2] for m in modules() if m.startswith("evomerge.kinds.") and m.count(".") >= 2}
    kinds.discard("base")
    crossing = [f"{m} imports {t}" for m, targets in graph().items() for t in targets
                for k in kinds if m.startswith(f"evomerge.kinds.{k}") and t.startswith("evomerge.kinds.")
                and not t.startswith(f"evomerge.kinds.{k}") and t != "evomerge.kinds.base"]
    assert crossing == []


# A comparison with a kind's name, or a type test against one kind's classes.
KIND_BRANCH = re.compile(r"""(==|!=)\s*["'](ps|dfs)["']|["'](ps|dfs)["']\s*(==|!=)|\.kind\s+(not\s+)?in\s*[(\[{]\s*["'](ps|dfs)|"""
                         r"""isinstance\([^)]*\b(PS|DFS)(Recipe|Space|SpaceConfig)\b|\bis_dfs\b""")


def test_nothing_outside_the_kinds_branches_on_the_kind():
    hits = [f"{p.relative_to(PACKAGE.parent)}:{i}: {line.strip()}"
            for p in PACKAGE.rglob("*.py") if "kinds" not in p.relative_to(PACKAGE).parts
            for i, line in enumerate(p.read_text().splitlines(), 1) if KIND_BRANCH.search(line)]
    assert hits == []


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_over_400_lines(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE.parent)} has {lines} lines: split it by concept"
