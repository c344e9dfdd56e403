"""The package's layers point one way: ops never import models, models never import the benchmark
machinery, and no module imports itself back through a cycle (module-level imports, read from the
source, so the test sees what a reader sees)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "sed_fast"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path):
    """The sed_fast modules ``path`` imports at module level (not inside functions)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("sed_fast")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("sed_fast"):
                found.add(target)
                found |= {f"{target}.{alias.name}" for alias in node.names}
    return found


def _graph():
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_ops_never_import_models_or_benchmarks():
    for name, targets in _graph().items():
        if name.startswith("sed_fast.kernels"):
            bad = {t for t in targets if t.startswith(("sed_fast.models", "sed_fast.bench", "sed_fast.api",
                                                       "sed_fast.cli"))}
            assert not bad, f"{name} (ops layer) imports {sorted(bad)}"


def test_models_never_import_benchmark_machinery():
    for name, targets in _graph().items():
        if name.startswith("sed_fast.models"):
            bad = {t for t in targets if t.startswith(("sed_fast.bench", "sed_fast.cli", "sed_fast.evaluation"))}
            assert not bad, f"{name} (models layer) imports {sorted(bad)}"


def test_no_import_cycles():
    graph = _graph()
    # A package importing its own submodules (its __init__ re-exporting them) is not a cycle.
    edges = {name: {t for t in targets if not t.startswith(name + ".")} for name, targets in graph.items()}
    state = {}

    def visit(node, path):
        state[node] = "open"
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                cycle = path[path.index(target):] + [target] if target in path else [node, target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


def test_the_checker_sees_a_cycle(tmp_path, monkeypatch):
    """The cycle check can fail: two modules importing each other are reported."""
    fake = tmp_path / "sed_fast"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "a.py").write_text("from . import b\n")
    (fake / "b.py").write_text("from .a import thing\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    try:
        test_no_import_cycles()
    except AssertionError as error:
        assert "sed_fast.a" in str(error) and "sed_fast.b" in str(error)
    else:
        raise AssertionError("the cycle a <-> b was not found")
