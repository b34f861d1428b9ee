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
        return {m: deps for m, deps in self.graph.items() if m == prefix or m.startswith(prefix + ".")}

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

    def test_leaves(self):
        for module in ("msgd.options", "msgd.security.rules"):
            self.assertEqual(self.graph[module], set(), module)
