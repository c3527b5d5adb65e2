"""The renovation's limits on the source (issue 15): no import cycle among prefalign's modules
(imports inside functions count too), no source file over 500 lines, no function over 80 lines
(its docstring excluded). Read from the source with ast; nothing is imported or run."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80


# ------------------------------------------------------------------ the import graph

def modules_under(src, package="prefalign"):
    """{dotted module name: path} for every .py file of ``package`` under ``src`` (a package
    is named by its __init__.py)."""
    found = {}
    for path in sorted((Path(src) / package).rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _ancestors(name):
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def _from_base(node, name, is_package):
    """The absolute module a `from X import ...` reads from, relative imports resolved."""
    if not node.level:
        return node.module
    package = name.split(".") if is_package else name.split(".")[:-1]
    base = package[:len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _dynamic_target(node):
    """importlib.import_module("a.b") / __import__("a.b") with a literal name: an import too."""
    func = node.func
    called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if called in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
            and isinstance(node.args[0].value, str):
        return node.args[0].value
    return None


def imports_of(tree, name, is_package, modules):
    """{module of ``modules`` that ``name`` imports: line of the first such import}, anywhere
    in the file (module level, functions, methods). `from P import x` reads P.x when x is a
    submodule, else P itself (even P = the importer's own package: its attributes are read).
    Importing a.b.c also runs the package a.b: an edge too, unless a.b is one of the
    importer's own parents, which are always initialised before it."""
    edges = {}

    def add(target, line):
        if target not in modules:
            return
        implicit = {t for t in _ancestors(target) if t in modules and t not in _ancestors(name)}
        for t in {target} | implicit:
            if t != name:
                edges.setdefault(t, line)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(node, name, is_package)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub in modules else base, node.lineno)
        elif isinstance(node, ast.Call) and _dynamic_target(node):
            add(_dynamic_target(node), node.lineno)
    return edges


def import_graph(src, package="prefalign"):
    """{module: {imported module: line}} over the package's own modules."""
    modules = modules_under(src, package)
    return {name: imports_of(ast.parse(path.read_text(), str(path)), name, path.name == "__init__.py", modules)
            for name, path in modules.items()}


def cycles(graph):
    """The strongly connected components with more than one member (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def describe(component, graph, modules, src=SRC):
    lines = [f"cycle of {len(component)} modules: {', '.join(component)}"]
    for a in component:
        for b, line in sorted(graph[a].items()):
            if b in component:
                lines.append(f"    {a} -> {b}  ({modules[a].relative_to(src.parent)}:{line})")
    return "\n".join(lines)


def test_no_import_cycle():
    graph, modules = import_graph(SRC), modules_under(SRC)
    assert len(modules) > 20 and sum(map(len, graph.values())) > len(modules)  # it read the real package
    found = cycles(graph)
    assert not found, "import cycles (function-level imports count):\n" + "\n".join(
        describe(c, graph, modules) for c in found)


# ------------------------------------------------------------------ sizes

def function_lengths(tree):
    """[(qualified name, lines from `def` to its end minus its docstring)] for every function
    and method, nested ones included (and counted in their parent too)."""
    out = []

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = child.end_lineno - child.lineno + 1
                first = child.body[0]
                if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                        and isinstance(first.value.value, str):
                    length -= first.end_lineno - first.lineno + 1
                out.append((prefix + child.name, length))
                walk(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                walk(child, f"{prefix}{child.name}.")
            else:
                walk(child, prefix)

    walk(tree, "")
    return out


def test_no_source_file_over_500_lines():
    sizes = {p.relative_to(SRC.parent): len(p.read_text().splitlines()) for p in modules_under(SRC).values()}
    long = [f"{p}: {n} lines" for p, n in sorted(sizes.items()) if n > MAX_FILE_LINES]
    assert not long, f"source files over {MAX_FILE_LINES} lines:\n" + "\n".join(long)


def test_no_function_over_80_lines():
    long = []
    for path in modules_under(SRC).values():
        for name, n in function_lengths(ast.parse(path.read_text(), str(path))):
            if n > MAX_FUNCTION_LINES:
                long.append(f"{path.relative_to(SRC.parent)}:{name}:{n}")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (docstring excluded):\n" + "\n".join(long)


# ------------------------------------------------------------------ the checkers themselves

def write_package(root, files):
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_graph_resolves_submodules_relative_and_function_level_imports(tmp_path):
    src = write_package(tmp_path / "src", {
        "pkg/__init__.py": "def lazy():\n    from pkg import api\n",
        "pkg/api.py": "from pkg import VERSION, core\n",  # core: a submodule; VERSION: the package's
        "pkg/core.py": "import os\nfrom .sub import leaf\nfrom . import util as u\n",
        "pkg/util.py": "def f():\n    import importlib\n    return importlib.import_module('pkg.sub.leaf')\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/leaf.py": "from .. import util\nfrom ..core import thing\n",
    })
    graph = import_graph(src, "pkg")
    assert {k: set(v) for k, v in graph.items()} == {
        "pkg": {"pkg.api"},
        "pkg.api": {"pkg", "pkg.core"},
        "pkg.core": {"pkg.sub.leaf", "pkg.sub", "pkg.util"},
        "pkg.util": {"pkg.sub.leaf", "pkg.sub"},
        "pkg.sub": set(),
        "pkg.sub.leaf": {"pkg.util", "pkg.core"},  # its own parents are not implicit edges
    }
    assert graph["pkg.util"]["pkg.sub.leaf"] == 3
    assert cycles(graph) == [["pkg", "pkg.api"], ["pkg.core", "pkg.sub.leaf", "pkg.util"]]
    message = describe(["pkg", "pkg.api"], graph, modules_under(src, "pkg"), src)
    assert "pkg -> pkg.api  (src/pkg/__init__.py:2)" in message and "pkg.api -> pkg  (src/pkg/api.py:1)" in message


def test_no_cycle_in_a_tree_and_self_imports_are_ignored(tmp_path):
    src = write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg import b\nfrom pkg.a import x\n",
        "pkg/b.py": "from pkg import c\n",
        "pkg/c.py": "import pkg\n",  # an edge to the package, which imports nothing
    })
    assert cycles(import_graph(src, "pkg")) == []


def test_function_lengths_exclude_the_docstring_and_include_methods():
    tree = ast.parse(
        "def f():\n    '''one\n    two'''\n    x = 1\n    return x\n"
        "class K:\n    async def m(self):\n        def inner():\n            pass\n        return 1\n")
    assert function_lengths(tree) == [("f", 3), ("K.m", 4), ("K.m.inner", 2)]


# ------------------------------------------------------------------ the slow table

def test_every_name_in_the_slow_table_is_a_test():
    """conftest.SLOW names tests by module and function: a renamed or removed test must not
    leave a stale entry behind (its successor would silently join the fast loop)."""
    import conftest

    tests_dir = Path(__file__).resolve().parent
    stale = []
    for module, names in conftest.SLOW.items():
        path = tests_dir / module
        if not path.is_file():
            stale.append(f"{module}: no such file")
            continue
        defined = {n.name for n in ast.parse(path.read_text()).body
                   if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name.startswith("test")}
        assert defined, f"{module} defines no test"
        stale += [f"{module}::{name}: no such test" for name in ([] if names == conftest.ALL else sorted(names))
                  if name.split("[")[0] not in defined]
    assert not stale, "\n".join(stale)
