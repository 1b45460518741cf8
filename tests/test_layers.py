"""The dependency rule: imports point down the layers of DESIGN.md, function-level imports included.

    L5  immunize.cli, immunize.bench, immunize.affinity, immunize.readme, benchmarks   (imported by nothing below)
    L4  callbacks            (no imports between sibling callbacks; callbacks.base is their shared base)
    L3  lightning_modules
    L2  immunize.judges, immunize.judges_llm, immunize.judge_inputs, immunize.judge_agreement, immunize.metrics,
        immunize.statistics
    L1  datamodules (including the toy world), immunize.outputs, immunize.fingerprint (output folders, input digests)
    L0  immunize.errors, immunize.io                                                  (import nothing of the project)
"""
import ast
from pathlib import Path

from conftest import REPO

PACKAGES = ("immunize", "lightning_modules", "datamodules", "callbacks", "benchmarks")
LAYER_OF = {"immunize.errors": 0, "immunize.io": 0, "immunize.outputs": 1, "immunize.fingerprint": 1, "datamodules": 1, "immunize.judges": 2, "immunize.judges_llm": 2,
            "immunize.judge_inputs": 2, "immunize.judge_agreement": 2, "immunize.metrics": 2, "immunize.statistics": 2,
            "lightning_modules": 3, "callbacks": 4}
CALLBACK_BASE = "callbacks.base"


def layer(module: str) -> int:
    """The layer of a project module (longest matching prefix; anything else of the project is L5)."""
    best = max((p for p in LAYER_OF if module == p or module.startswith(p + ".")), key=len, default=None)
    return 5 if best is None else LAYER_OF[best]


def project_modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imports_of(path: Path, module: str) -> list[tuple[str, int]]:
    """(imported project module, line) for every import statement in the file, at any depth."""
    found = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names]  # a submodule, or a name of module `base`
        else:
            continue
        for name in names:
            if name.split(".")[0] in PACKAGES:
                found.append((name, node.lineno))
    return found


def edges(modules: dict) -> set[tuple[str, str, int]]:
    """(module, imported project module, line), one per distinct target of an import statement."""
    out = set()
    for module, path in modules.items():
        for name, line in imports_of(path, module):
            target = _resolve(name, modules)
            if target and target != module:
                out.add((module, target, line))
    return out


def _resolve(name: str, modules: dict) -> str:
    """The project module an imported name lives in (`from pkg import Class` -> pkg)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name


def violation(module: str, target: str) -> str:
    """Why an import of `target` from `module` breaks the rule ("" when it does not)."""
    mine, theirs = layer(module), layer(target)
    if theirs > mine:
        return f"L{mine} -> L{theirs}: upward"
    if mine == theirs == 0:
        return "L0 imports nothing of the project"
    if mine == theirs == 4 and module != "callbacks" and module != CALLBACK_BASE and target != CALLBACK_BASE:
        return "sibling callbacks (share code through callbacks.base)"
    return ""


def test_every_import_points_down_the_layers():
    modules = project_modules()
    bad = [f"{modules[m].relative_to(REPO)}:{line} imports {t} ({violation(m, t)})"
           for m, t, line in sorted(edges(modules)) if violation(m, t)]
    assert not bad, "\n".join(bad)


def test_the_rule_sees_function_level_imports(tmp_path):
    """The checker itself: an upward import hidden inside a function is found."""
    path = tmp_path / "probe.py"
    path.write_text("def f():\n    from immunize.bench import planner\n")
    assert ("immunize.bench.planner", 2) in imports_of(path, "datamodules.probe")
    assert layer("datamodules.probe") < layer("immunize.bench")


def layer_picture() -> dict[int, dict[int, int]]:
    """{from layer: {to layer: number of import statements}} of the whole project (printed in the docs)."""
    picture: dict[int, dict[int, int]] = {}
    for module, target, _ in edges(project_modules()):
        row = picture.setdefault(layer(module), {})
        row[layer(target)] = row.get(layer(target), 0) + 1
    return picture


def cycles(modules: dict) -> list[list[str]]:
    """Groups of project modules that import each other (strongly connected components of size > 1)."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, target, _ in edges(modules):
        graph[module].add(target)
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_modules_import_each_other():
    assert cycles(project_modules()) == []
