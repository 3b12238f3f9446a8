"""The code's shape, kept true by tests: no import cycles, modules and functions of readable size,
each source folder installed and imported under the `fedge` namespace."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# source folder -> import name (pyproject's package-dir mapping)
PACKAGES = {"fedge": "fedge", "cli": "fedge.cli", "protocol": "fedge.protocol", "cloud": "fedge.cloud",
            "edge": "fedge.edge", "peft_methods": "fedge.peft_methods", "kernels": "fedge.kernels",
            "simulations": "fedge.simulations"}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
GENERATED = ("_pb2.py", "_pb2_grpc.py")


def _modules() -> dict[str, Path]:
    found = {}
    for folder, name in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([name, *parts])] = path
    return found


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """fedge modules that `module` imports anywhere in its body (top level or inside functions)."""
    out = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, result, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return result


def test_no_module_imports_a_module_that_imports_it_back():
    modules = _modules()
    # a package's __init__ is not an edge target for its own submodules (importing fedge.kernels.x
    # runs fedge/kernels/__init__ first, but that is not a cycle unless __init__ imports x back)
    graph = {name: _imports(path, name, set(modules)) for name, path in modules.items()}
    graph = {name: {dep for dep in deps if not name.startswith(dep + ".")} for name, deps in graph.items()}
    assert _cycles(graph) == []


def test_modules_and_functions_stay_readable():
    too_long = []
    for name, path in _modules().items():
        if path.name.endswith(GENERATED):
            continue
        lines = path.read_text().count("\n")
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {lines} lines")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                parser_builder = name.startswith("fedge.cli") and node.name.startswith(("add_", "build_parser"))
                if length > MAX_FUNCTION_LINES and not parser_builder:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}(): {length} lines")
    assert too_long == []


def test_source_imports_use_the_fedge_namespace():
    bare = []
    top = tuple(folder for folder in PACKAGES if folder != "fedge")
    for path in [*(_modules().values()), *ROOT.joinpath("tests").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            bare += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in top]
    assert bare == []
