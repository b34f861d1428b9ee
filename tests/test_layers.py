"""The dependency rules of docs/architecture.rst, read from the source:
msgd's modules import each other without cycles (imports inside functions
count), the core imports only the core, the cluster and the adapters no
interface, and the leaves (the option parsers, the access rules) nothing of
msgd."""

from __future__ import annotations

import ast
import os

from twisted.trial import unittest

from tests.helpers import ROOT


def import_graph() -> dict[str, set[str]]:
    """module -> the msgd modules it imports (anywhere in its source)."""
    modules = {}
    for d, _, files in os.walk(os.path.join(ROOT, "msgd")):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                modules[name.removesuffix(".__init__")] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out = []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


class LayerTests(unittest.TestCase):
    def setUp(self):
        self.graph = import_graph()

    def imports(self, prefix: str) -> dict[str, set[str]]:
        found = {m: deps for m, deps in self.graph.items() if m == prefix or m.startswith(prefix + ".")}
        self.assertTrue(found, prefix)      # a renamed package must not skip its checks
        return found

    def test_the_graph_is_read(self):
        self.assertIn("msgd.options", self.graph["msgd.config"])
        self.assertIn("msgd.cluster.wire", self.graph["msgd.interfaces.pb"])

    def test_cycles_are_found(self):
        self.assertEqual(cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}), [["a", "b", "c"]])

    def test_no_import_cycles(self):
        self.assertEqual(cycles(self.graph), [])

    def test_core_imports_only_the_core(self):
        for module, deps in self.imports("msgd.core").items():
            self.assertEqual({d for d in deps if not d.startswith("msgd.core")}, set(), module)

    def test_cluster_imports_no_interface(self):
        for module, deps in self.imports("msgd.cluster").items():
            self.assertEqual({d for d in deps if d.startswith("msgd.interfaces")}, set(), module)

    def test_adapters_import_no_interface(self):
        # what an adapter shares with an interface (the STOMP codec and client) lives in a neutral package
        for module, deps in self.imports("msgd.adapters").items():
            self.assertEqual({d for d in deps if d.startswith("msgd.interfaces")}, set(), module)

    def test_xml_imports_only_the_core(self):
        # the XML formats of /RPC2 and /soap/: parsing and values, no transport
        for module, deps in self.imports("msgd.xml").items():
            self.assertEqual({d for d in deps if not d.startswith(("msgd.core", "msgd.xml"))}, set(), module)

    def test_leaves(self):
        for module in ("msgd.options", "msgd.security.rules"):
            self.assertEqual(self.graph[module], set(), module)


# -- components take services, not the node (docs/architecture.rst) --------------

# the node itself and twistd's entry point, which build and run it
NODE_OWNERS = {"msgd/node.py", "msgd/tap.py"}


def node_reaches(source: str, path: str) -> list[str]:
    """Where ``source`` reaches for the node: through an attribute
    (``self.node``, ``interface.node``, ``x.config.node.state_dir``), or
    through a constructor's ``node`` parameter (``node.reactor``).  Setting
    an attribute named ``node``, or passing ``node`` on to a base class, is
    not a reach."""
    tree = ast.parse(source, path)
    reaches = [n for n in ast.walk(tree)
               if isinstance(n, ast.Attribute) and n.attr == "node" and not isinstance(n.ctx, ast.Store)]
    for init in ast.walk(tree):
        if isinstance(init, ast.FunctionDef) and init.name == "__init__" \
                and any(a.arg == "node" for a in init.args.args + init.args.kwonlyargs):
            reaches += [n for n in ast.walk(init) if isinstance(n, ast.Attribute)
                        and isinstance(n.value, ast.Name) and n.value.id == "node"]
    return [f"{path}:{n.lineno}: {ast.unparse(n)}" for n in sorted(reaches, key=lambda n: (n.lineno, n.col_offset))]


class ServicesNotNodeTests(unittest.TestCase):
    def test_the_check_finds_reaches(self):
        source = ("class I:\n    def __init__(self, services):\n        self.node = services\n"
                  "    def f(self, interface):\n        return self.node.reactor, interface.node, "
                  "self.config.node.state_dir, self.services.settings\n"
                  "class J(I):\n    def __init__(self, node):\n        super().__init__(node)\n"
                  "        self.clock = node.reactor\n"
                  "def shard_up(node):\n    return node.placed\n")
        self.assertEqual(node_reaches(source, "m.py"),
                         ["m.py:5: self.node", "m.py:5: interface.node", "m.py:5: self.config.node",
                          "m.py:9: node.reactor"])

    def test_components_take_services_not_the_node(self):
        """Only the node and tap use ``.node``: every other part uses the
        msgd.services.Services it was given."""
        found = []
        for d, _, files in os.walk(os.path.join(ROOT, "msgd")):
            for f in sorted(files):
                rel = os.path.relpath(os.path.join(d, f), ROOT).replace(os.sep, "/")
                if not f.endswith(".py") or rel in NODE_OWNERS:
                    continue
                with open(os.path.join(d, f), encoding="utf-8") as src:
                    found += node_reaches(src.read(), rel)
        self.assertEqual(found, [])
