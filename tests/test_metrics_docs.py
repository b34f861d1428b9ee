"""docs/metrics.rst names every metric: those the source registers, and
those a running node with several parts actually has."""

import ast
import os
import re

from twisted.internet import defer
from twisted.trial import unittest

from tests.helpers import ROOT, http_port, make_node, rpc

DOC = os.path.join(ROOT, "docs", "metrics.rst")


def documented() -> set[str]:
    with open(DOC, encoding="utf-8") as f:
        return set(re.findall(r"^``(msgd_[a-z_]+)``", f.read(), re.M))


def registered_in_source() -> dict[str, str]:
    """name -> file, for every ``.counter/.gauge/.histogram("msgd_…", …)``."""
    found = {}
    for folder, _, files in os.walk(os.path.join(ROOT, "msgd")):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
            for n in ast.walk(tree):
                if (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                        and n.func.attr in ("counter", "gauge", "histogram") and n.args
                        and isinstance(n.args[0], ast.Constant) and str(n.args[0].value).startswith("msgd_")):
                    found[n.args[0].value] = os.path.relpath(path, ROOT)
    return found


class MetricsDocTests(unittest.TestCase):
    def test_every_metric_in_the_source_is_documented(self):
        missing = {n: f for n, f in registered_in_source().items() if n not in documented()}
        self.assertEqual(missing, {}, "add these to docs/metrics.rst")

    @defer.inlineCallbacks
    def test_every_metric_of_a_running_node_is_documented(self):
        node = make_node(self, """
            [interface:web]
            type = http
            endpoint = tcp:0:interface=127.0.0.1
            status = yes
            admin = yes

            [interface:drop]
            type = dirwatch
            directory = drop
            handler = m.take

            [adapter:db]
            type = sql
            driver = sqlite
            """, {"m.py": "def ping():\n    return 1\n\ndef take(item):\n    return None\n"})
        yield node.ready()
        yield rpc(http_port(node), {"jsonrpc": "2.0", "id": 1, "method": "m.ping"})
        names = {m.name + "_total" if m.type == "counter" else m.name for m in node.metrics.registry.collect()}
        self.assertGreater(len(names), 15)
        self.assertEqual(sorted(names - documented()), [])
