"""The package's shape (issue 15): no import cycle among kdbench modules (module-level or function-local),
no module over 500 lines, no private name imported across modules.

Read from the source with :mod:`ast`, so a function-local import counts like a module-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kdbench"
MAX_LINES = 500


def _modules(package: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of the package (``pkg/__init__.py`` is ``pkg``)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, str | None, int]]:
    """Every kdbench import of a module, anywhere in it: (imported module, imported name or None, line)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the importing module's package
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                full = f"{base}.{alias.name}"
                # ``from kdbench import errors`` imports a module; ``from kdbench.errors import X`` a name
                out.append((full, None, node.lineno) if full in modules else (base, alias.name, node.lineno))
    resolved = []
    for target, imported, line in out:
        while target and target not in modules:  # ``import kdbench.a.b.c`` where c is a name: its module
            target = target.rpartition(".")[0]
        if target and target.startswith("kdbench") and target != name:
            resolved.append((target, imported, line))
    return resolved


def _graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    return {name: {target for target, _, _ in _imports(name, path, modules)} for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            advanced = False
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def test_the_checker_sees_a_cycle_a_private_import_and_a_function_local_import(tmp_path):
    # the checks themselves can fail: a made-up package with a function-local cycle and a private import
    package = tmp_path / "kdbench"
    (package / "train").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "train" / "__init__.py").write_text("")
    (package / "train" / "a.py").write_text("from kdbench.train.b import helper\n")
    (package / "train" / "b.py").write_text("def helper():\n    from . import a\n    return a\n")
    (package / "train" / "c.py").write_text("from kdbench.train.b import _hidden\n")
    modules = _modules(package)
    assert _cycles(_graph(modules)) == [["kdbench.train.a", "kdbench.train.b"]]
    private = [(name, target, imported) for name, path in modules.items()
               for target, imported, _ in _imports(name, path, modules) if imported and imported.startswith("_")]
    assert private == [("kdbench.train.c", "kdbench.train.b", "_hidden")]


def test_no_import_cycle_among_kdbench_modules():
    cycles = _cycles(_graph(_modules()))
    assert cycles == [], f"import cycles (module-level or function-local): {cycles}"


def test_no_module_over_500_lines():
    sizes = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    over = {name: lines for name, lines in sizes.items() if lines > MAX_LINES}
    assert over == {}, f"modules over {MAX_LINES} lines (split them): {over}"


def test_no_private_name_imported_across_modules():
    modules = _modules()
    private = [f"{name}:{line} imports {imported} from {target}"
               for name, path in modules.items() for target, imported, line in _imports(name, path, modules)
               if imported and imported.startswith("_") and not imported.startswith("__")]
    private += [f"{name}:{line} imports module {target}"
                for name, path in modules.items() for target, imported, line in _imports(name, path, modules)
                if imported is None and target.rpartition(".")[2].startswith("_")
                and not target.endswith("__init__")]
    assert private == [], "private names imported across modules:\n" + "\n".join(private)
