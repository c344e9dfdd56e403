"""The package's layers point one way, with no cycle, read from every import in the source
(``ast.walk``: imports inside functions count as much as those at the top of a module).

The layer order is data (:data:`LAYERS`): a module may import its own layer's modules and those of
the layers below, never one above. ``from sed_fast.pkg import X`` where ``X`` is a submodule is an
edge to that submodule (not to ``pkg/__init__``); ``sed_fast.cli`` dispatches to the commands by
module name, and those names are edges too.
"""
import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "sed_fast"

#: Bottom to top. A prefix names a package (all its modules) or a module.
LAYERS = (
    ("base", ("sed_fast.base",)),
    ("kernels", ("sed_fast.kernels", "sed_fast._build")),
    ("inputs", ("sed_fast.inputs",)),
    ("data", ("sed_fast.data",)),
    ("models", ("sed_fast.models",)),
    ("api", ("sed_fast.api", "sed_fast.visualize", "sed_fast")),  # the package root re-exports the API
    ("toolkit", ("sed_fast.toolkit",)),
    ("commands", ("sed_fast.segment", "sed_fast.video", "sed_fast.serve", "sed_fast.evaluation",
                  "sed_fast.training", "sed_fast.export", "sed_fast.doctor", "sed_fast.bench", "sed_fast.demo")),
    ("cli", ("sed_fast.cli", "sed_fast.__main__")),
)
#: The most modules on an import chain from the command line down to a leaf module.
MAX_LEVELS = 9


def layer_of(module: str) -> int:
    best, best_length = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")
    return best


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, name: str, modules) -> set:
    """The sed_fast modules ``path`` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "sed_fast"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "sed_fast":
                continue
            submodules = {f"{target}.{alias.name}" for alias in node.names} & set(modules)
            found |= submodules
            if len(submodules) < len(node.names):  # a name defined in the module (or package) itself
                found.add(target)
        elif name.endswith(".cli") and name.count(".") == 1 and isinstance(node, ast.Constant) \
                and isinstance(node.value, str) and node.value in modules:
            found.add(node.value)  # the top-level command line dispatches by module name
    return found


def import_graph(root: Path = None) -> dict:
    root = root or PACKAGE
    modules = {_module_name(p, root): p for p in root.rglob("*.py")}
    return {name: {m for m in _imports(path, name, modules) if m in modules and m != name}
            for name, path in modules.items()}


def find_cycle(graph: dict):
    """One import cycle of ``graph`` as a list of modules (first = last), or None. A package
    importing its own submodules (its ``__init__`` re-exporting them) is not a cycle."""
    edges = {name: {t for t in targets if not t.startswith(name + ".")} for name, targets in graph.items()}
    state = {}
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))

    def visit(node, path):
        state[node] = "open"
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target, path + [target])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for module in sorted(edges):
        if module not in state:
            cycle = visit(module, [module])
            if cycle:
                return cycle
    return None


def longest_chain(graph: dict, start: str) -> list:
    """The longest import chain from ``start`` (the graph has no cycle)."""
    memo = {}

    def chain(node):
        if node not in memo:
            memo[node] = [node]
            below = [chain(t) for t in graph.get(node, ()) if not t.startswith(node + ".")]
            if below:
                memo[node] = [node] + max(below, key=len)
        return memo[node]

    return chain(start)


def test_every_module_is_in_a_layer_and_no_import_points_up():
    upward = []
    for name, targets in sorted(import_graph().items()):
        for target in sorted(targets):
            if layer_of(target) > layer_of(name):
                upward.append(f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})")
    assert not upward, "imports that point up the layers:\n" + "\n".join(upward)


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


#: The most modules on a chain from the command line down to the API, above it (the tools' part).
MAX_TOOL_LEVELS = 7


def test_the_tools_part_of_the_chain_is_short():
    graph = import_graph()
    above_api = {name: {t for t in targets if layer_of(t) > layer_of("sed_fast.api") or t == "sed_fast.api"}
                 for name, targets in graph.items() if layer_of(name) > layer_of("sed_fast.api")}
    chain = longest_chain(above_api, "sed_fast.cli")
    assert len(chain) <= MAX_TOOL_LEVELS, f"{len(chain)} levels: " + " -> ".join(chain)


def test_at_most_nine_levels_from_the_command_line_to_the_leaves():
    chain = longest_chain(import_graph(), "sed_fast.cli")
    assert len(chain) <= MAX_LEVELS, f"{len(chain)} levels: " + " -> ".join(chain)


def test_the_ops_stand_directly_on_dispatch():
    """dispatch imports nothing of sed_fast (the kernels package hands it the environment reader and
    the autotune chooser), so an op file is 2 levels and the reference decoder, on the ops, 3."""
    graph = import_graph()
    assert graph["sed_fast.kernels.dispatch"] == set()
    assert "sed_fast.models.rejection" not in graph["sed_fast.models.decoder"]
    assert len(longest_chain(graph, "sed_fast.models.decoder")) <= 3


#: Fronts of command lines: ``python -m sed_fast`` runs ``sed_fast.cli``. (The demo, a front of
#: ``segment`` and ``serve``, imports neither: ``sed_fast.cli`` runs the command line it rewrites.)
CLI_FRONTS = {"sed_fast.__main__"}


def _top_package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_the_commands_never_import_a_siblings_cli_nor_a_private_name_of_another_package():
    problems = []
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path, PACKAGE)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = package.split(".")
                target = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("sed_fast.") or _top_package(target) == _top_package(name):
                continue
            private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
            if private:
                problems.append(f"{name} imports {private} from {target}")
            if (target.endswith(".cli") or any(a.name == "cli" for a in node.names)) and name not in CLI_FRONTS:
                problems.append(f"{name} imports the command line of {target}")
    assert not problems, "\n".join(problems)


def _fake_package(tmp_path, files: dict) -> Path:
    root = tmp_path / "sed_fast"
    root.mkdir()
    (root / "__init__.py").write_text("")
    for name, text in files.items():
        (root / name).write_text(text)
    return root


def test_the_checker_sees_a_cycle_through_a_function_level_import(tmp_path):
    """The checker can fail: ``a`` imports ``b`` at the top, ``b`` imports ``a`` inside a function."""
    root = _fake_package(tmp_path, {"a.py": "from . import b\n",
                                    "b.py": "def late():\n    from .a import thing\n    return thing\n"})
    cycle = find_cycle(import_graph(root))
    assert cycle is not None and "sed_fast.a" in cycle and "sed_fast.b" in cycle


def test_the_checker_reads_from_package_import_submodule_as_an_edge_to_the_submodule(tmp_path):
    root = _fake_package(tmp_path, {"a.py": "def f():\n    from sed_fast import b\n", "b.py": "X = 1\n"})
    graph = import_graph(root)
    assert graph["sed_fast.a"] == {"sed_fast.b"}
