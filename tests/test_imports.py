"""The package's imports point one way: no cycles (package ``__init__`` files included), and the component layers
(encoders, bridges, LLMs, objectives) import neither Lightning nor the layers above them.

``python tests/test_imports.py`` prints the graph (module -> the vlgen modules it imports at import time) and exits
with 1 when it finds a cycle.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
# Each layer and what it must never import at import time (module-level imports; lazy ones inside functions and
# TYPE_CHECKING blocks do not run on import).
FORBIDDEN = {
    "vlgen.interfaces": ("vlgen.", "lightning"),
    "vlgen.dist": ("vlgen.", "lightning"),
    "vlgen.errors": ("vlgen.", "lightning"),
    "vlgen.loading": ("vlgen.encoders", "vlgen.bridges", "vlgen.llms", "vlgen.models", "vlgen.data", "lightning"),
    "vlgen.lora": ("vlgen.encoders", "vlgen.bridges", "vlgen.llms", "vlgen.models", "vlgen.data", "lightning"),
    "vlgen.encoders": ("vlgen.bridges", "vlgen.llms", "vlgen.objectives", "vlgen.models", "vlgen.data", "lightning"),
    "vlgen.bridges": ("vlgen.encoders", "vlgen.llms", "vlgen.objectives", "vlgen.models", "vlgen.data", "lightning"),
    "vlgen.llms": ("vlgen.encoders", "vlgen.bridges", "vlgen.objectives", "vlgen.models", "vlgen.data", "lightning"),
    "vlgen.objectives": ("vlgen.models", "vlgen.data", "vlgen.callbacks", "vlgen.cli", "lightning"),
}
ALLOWED = {"vlgen.errors", "vlgen.interfaces", "vlgen.dist", "vlgen.loading", "vlgen.lora"}  # below every layer


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_at_load(path: Path) -> set[str]:
    """Modules named by the module-level imports of ``path`` (not those under ``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    package = module_name(path) if is_package else module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for child in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else [node]:
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: from the package, up level - 1
                    up = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*up, base]).strip(".")
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in child.names)
    return found


def graph() -> dict[str, set[str]]:
    """vlgen module -> the vlgen modules importing it runs (a module's own parent packages left out: Python
    imports those first, whatever the module says)."""
    files = {module_name(p): p for p in (SRC / "vlgen").rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in files.items():
        targets = set()
        for imported in imports_at_load(path):
            parts = imported.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if prefix in files and prefix != name and not name.startswith(prefix + "."):
                    targets.add(prefix)
        edges[name] = targets
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
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
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycle():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_layers_import_only_what_is_below_them():
    files = {module_name(p): p for p in (SRC / "vlgen").rglob("*.py")}
    wrong = []
    for name, path in sorted(files.items()):
        layer = next((k for k in FORBIDDEN if name == k or name.startswith(k + ".")), None)
        if layer is None:
            continue
        for imported in sorted(imports_at_load(path)):
            if imported in ALLOWED or imported.startswith(layer):
                continue
            if any(imported == bad.rstrip(".") or imported.startswith(bad) for bad in FORBIDDEN[layer]):
                wrong.append(f"{name} imports {imported}")
    assert wrong == []


def test_importing_a_bridge_loads_no_lightning_module():
    import subprocess

    code = "import sys, vlgen.bridges.connector; print(any(m.startswith('lightning') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


if __name__ == "__main__":
    edges = graph()
    for module in sorted(edges):
        print(f"{module} -> {', '.join(sorted(edges[module])) or '-'}")
    found = cycles(edges)
    for component in found:
        print("cycle:", " <-> ".join(component))
    sys.exit(1 if found else 0)
