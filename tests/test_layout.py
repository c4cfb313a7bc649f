"""The package's shape (docs/design.md section 3): no public name hides a module, the oracle
imports nothing from pdepth, and the import graph has no cycle."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import types
from pathlib import Path

import pdepth

PACKAGE = Path(pdepth.__file__).parent
PACKAGES = ["pdepth", "pdepth.depth", "pdepth.distributed", "pdepth.protocol", "pdepth.compat"]


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return found


def _relative_imports(name: str, path: Path, is_pkg: bool, modules) -> set[str]:
    """The pdepth modules ``name`` imports (at the top or inside functions)."""
    package = name if is_pkg else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.ImportFrom) and node.level):
            continue
        base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
        out |= {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules}
        if target in modules and node.module is not None:
            out.add(target)
    out.discard(name)
    return out


def test_no_public_name_hides_a_module():
    for package_name in PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(package.__path__):
            if info.name == "__main__":
                continue
            importlib.import_module(f"{package_name}.{info.name}")
            attr = getattr(package, info.name)
            assert isinstance(attr, types.ModuleType), f"{package_name}.{info.name} is hidden"


def test_reference_imports_nothing_from_pdepth():
    modules = _modules()
    path, is_pkg = modules["pdepth.reference"]
    assert _relative_imports("pdepth.reference", path, is_pkg, modules) == set()
    tree = ast.parse(path.read_text())
    absolute = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not any("pdepth" in (getattr(n, "module", None) or "") for n in absolute)
    assert not any(a.name.startswith("pdepth") for n in absolute for a in n.names)


def test_import_graph_has_no_cycle():
    """Edges into a package's own ``__init__`` (the re-export hub a submodule's package is)
    are left out; every other import, lazy ones included, must run one way."""
    modules = _modules()
    edges = {
        name: {
            t for t in _relative_imports(name, path, is_pkg, modules)
            if not (modules[t][1] and name.startswith(t + "."))
        }
        for name, (path, is_pkg) in modules.items()
    }
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in edges[node]:
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join(trail + [node, nxt])
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [])
