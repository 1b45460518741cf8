"""The dependency rule: imports point down the layers of DESIGN.md, function-level imports included.

    L5  immunize.cli, immunize.main, immunize.bench, immunize.judges.command, immunize.gguf_import,
        immunize.affinity, immunize.readme, immunize.stage_cache, benchmarks            (imported by nothing below)
    L4  immunize.callbacks        (no imports between sibling callbacks; immunize.callbacks.base is their shared base)
    L3  immunize.lightning_modules  (inside: methods and bases over evaluation/ over functional/ over modeling/)
    L2  immunize.judges, immunize.metrics, immunize.statistics
    L1  immunize.datamodules (the toy world included), immunize.outputs, immunize.fingerprint
    L0  immunize.errors, immunize.io                                                  (import nothing of the project)

The repository's folders lightning_modules/, datamodules/ and callbacks/ are the packages immunize.lightning_modules,
immunize.datamodules and immunize.callbacks (pyproject's package-dir); modules are named here by their import names.
"""
import ast
from pathlib import Path

from conftest import REPO

# folder -> import name of the package it holds
FOLDERS = {"immunize": "immunize", "lightning_modules": "immunize.lightning_modules",
           "datamodules": "immunize.datamodules", "callbacks": "immunize.callbacks", "benchmarks": "benchmarks"}
PACKAGES = ("immunize", "benchmarks")  # the roots of every import name of the project
LAYER_OF = {"immunize.errors": 0, "immunize.io": 0, "immunize.outputs": 1, "immunize.fingerprint": 1,
            "immunize.datamodules": 1, "immunize.judges": 2, "immunize.judges.command": 5, "immunize.metrics": 2,
            "immunize.statistics": 2, "immunize.lightning_modules": 3, "immunize.callbacks": 4}
CALLBACK_BASE = "immunize.callbacks.base"
# inside immunize.lightning_modules: each sub-package imports only the ones below it
LM = "immunize.lightning_modules"
SUBLAYER_OF = {f"{LM}.modeling": 0, f"{LM}.functional": 1, f"{LM}.evaluation": 2}


def layer(module: str) -> int:
    """The layer of a project module (longest matching prefix; anything else of the project is L5)."""
    best = max((p for p in LAYER_OF if module == p or module.startswith(p + ".")), key=len, default=None)
    return 5 if best is None else LAYER_OF[best]


def sublayer(module: str) -> int:
    """Inside immunize.lightning_modules: modeling 0, functional 1, evaluation 2, the methods and bases 3."""
    return next((v for p, v in SUBLAYER_OF.items() if module == p or module.startswith(p + ".")), 3)


def project_modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            name = ".".join([package, *(parts[:-1] if parts[-1] == "__init__" else parts)])
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
    if mine == theirs == 3 and target != LM and sublayer(target) > sublayer(module):
        return f"inside lightning_modules: {module} -> {target} points up (modeling < functional < evaluation < methods)"
    if mine == theirs == 0:
        return "L0 imports nothing of the project"
    if mine == theirs == 4 and module != "immunize.callbacks" and module != CALLBACK_BASE and target != CALLBACK_BASE:
        return "sibling callbacks (share code through immunize.callbacks.base)"
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
    assert ("immunize.bench.planner", 2) in imports_of(path, "immunize.datamodules.probe")
    assert layer("immunize.datamodules.probe") < layer("immunize.bench")


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


def test_nothing_imports_the_folders_by_their_old_top_level_names():
    """lightning_modules, datamodules and callbacks exist only as immunize.* (a user's own callbacks/ must not
    shadow ours)."""
    old = {"lightning_modules", "datamodules", "callbacks"}
    found = []
    for folder in (*FOLDERS, "tests"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
                found += [f"{path.relative_to(REPO)}:{node.lineno} {n}" for n in names if n.split(".")[0] in old]
    assert not found, found


def test_every_package_says_what_belongs_there_and_what_it_may_import():
    for init in sorted(p for folder in FOLDERS if folder != "benchmarks" for p in (REPO / folder).rglob("__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert len(doc) > 80, f"{init.relative_to(REPO)}: no docstring saying what belongs in the package"
        if init.parent.name in ("lightning_modules", "functional", "modeling", "evaluation", "datamodules", "callbacks",
                                "judges", "bench", "immunize"):
            assert "import" in doc, f"{init.relative_to(REPO)}: the docstring does not say what may be imported"
