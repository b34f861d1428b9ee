import os
import sys

from twisted.internet.task import Clock
from twisted.trial import unittest

from msgd.core.apps import AppRegistry
from msgd.core.errors import NotFound

from tests.helpers import write


class RegistryTests(unittest.TestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.clock = Clock()
        self.events = []
        self.apps = AppRegistry(self.dir, self.clock, interval=1.0)
        self.apps.on_change(lambda name, event: self.events.append((name, event)))
        self.addCleanup(self.apps.stop)

    def app(self, name, source):
        write(os.path.join(self.dir, name), source)

    def call(self, target, *args):
        return self.apps.resolve(target)(*args)

    def test_load_and_exports(self):
        self.app("calc.py", """
            import os
            from os.path import join
            def add(a, b): return a + b
            def _hidden(): pass
            class Thing: pass
            """)
        self.apps.start()
        self.assertEqual(self.call("calc.add", 1, 2), 3)
        self.assertEqual(self.apps.targets(), ["calc.add"])   # not join (imported), not _hidden, not Thing
        self.assertRaises(NotFound, self.apps.resolve, "calc._hidden")
        self.assertRaises(NotFound, self.apps.resolve, "calc.join")
        self.assertRaises(NotFound, self.apps.resolve, "nope.add")
        self.assertEqual(self.events, [("calc", "loaded")])

    def test_all_restricts_exports(self):
        self.app("m.py", "__all__ = ['a']\ndef a(): return 1\ndef b(): return 2\n")
        self.apps.scan()
        self.assertEqual(self.apps.targets(), ["m.a"])

    def test_reload_on_change(self):
        self.app("m.py", "def v(): return 1\n")
        self.apps.start()
        self.app("m.py", "def v(): return 2\n")
        self.assertEqual(self.call("m.v"), 1)        # not before the next check
        self.clock.advance(1)
        self.assertEqual(self.call("m.v"), 2)
        self.assertEqual(self.events, [("m", "loaded"), ("m", "reloaded")])
        self.assertEqual(self.apps.modules["m"].version, 2)

    def test_syntax_error_keeps_old_version(self):
        self.app("m.py", "def v(): return 1\n")
        self.apps.start()
        self.app("m.py", "def v(:\n    return 2\n")
        self.clock.advance(1)
        self.assertEqual(self.call("m.v"), 1)
        err = self.apps.errors()["m"]
        self.assertEqual(err["file"], os.path.join(self.dir, "m.py"))
        self.assertEqual(err["line"], 1)
        self.assertIn("SyntaxError", err["error"])
        self.assertEqual(self.flushLoggedErrors(), [])
        # fixed: serves the new version and the error is gone
        self.app("m.py", "def v(): return 3\n")
        self.clock.advance(1)
        self.assertEqual(self.call("m.v"), 3)
        self.assertEqual(self.apps.errors(), {})

    def test_exception_at_import_names_line(self):
        self.app("m.py", "def v(): return 1\n")
        self.apps.start()
        self.app("m.py", "x = 1\n\nraise ValueError('boom')\n")
        self.clock.advance(1)
        err = self.apps.errors()["m"]
        self.assertEqual(err["line"], 3)
        self.assertIn("ValueError: boom", err["error"])
        self.assertEqual(self.call("m.v"), 1)

    def test_broken_new_module_not_callable_and_logged_once(self):
        self.app("bad.py", "import nonexistent_module_xyz\n")
        self.apps.start()
        self.assertIn("bad", self.apps.errors())
        self.assertRaises(NotFound, self.apps.resolve, "bad.x")
        self.clock.advance(5)
        self.assertEqual([e for e in self.events if e[0] == "bad"], [("bad", "failed")])

    def test_new_and_removed_files(self):
        self.apps.start()
        self.app("late.py", "def f(): return 'here'\n")
        self.clock.advance(1)
        self.assertEqual(self.call("late.f"), "here")
        os.remove(os.path.join(self.dir, "late.py"))
        self.clock.advance(1)
        self.assertRaises(NotFound, self.apps.resolve, "late.f")
        self.assertEqual(self.events[-1], ("late", "removed"))

    def test_reload_hook_carries_state(self):
        self.app("counter.py", """
            n = [0]
            def bump():
                n[0] += 1
                return n[0]
            """)
        self.apps.start()
        self.call("counter.bump")
        self.call("counter.bump")
        self.app("counter.py", """
            n = [0]
            def __reload__(previous):
                n[0] = previous.n[0]
            def bump():
                n[0] += 10
                return n[0]
            """)
        self.clock.advance(1)
        self.assertEqual(self.call("counter.bump"), 12)

    def test_failing_reload_hook_keeps_old(self):
        self.app("m.py", "def v(): return 1\n")
        self.apps.start()
        self.app("m.py", "def __reload__(p): raise RuntimeError('no')\ndef v(): return 2\n")
        self.clock.advance(1)
        self.assertEqual(self.call("m.v"), 1)
        self.assertIn("RuntimeError", self.apps.errors()["m"]["error"])

    def test_package_with_relative_import(self):
        self.app("shop/__init__.py", "from .prices import price\ndef total(n): return n * price()\n")
        self.app("shop/prices.py", "def price(): return 3\n")
        self.apps.start()
        self.assertEqual(self.call("shop.total", 2), 6)
        self.app("shop/prices.py", "def price(): return 5\n")
        self.clock.advance(1)
        self.assertEqual(self.call("shop.total", 2), 10)

    def test_not_apps(self):
        self.app("_private.py", "def f(): pass\n")
        self.app("test_x.py", "def f(): pass\n")
        self.app("notes.txt", "x")
        self.apps.start()
        self.assertEqual(self.apps.modules, {})

    def test_modules_registered_under_package(self):
        self.app("m.py", "from dataclasses import dataclass\n@dataclass\nclass P:\n    x: int\ndef f(): return P(1).x\n")
        self.apps.start()
        self.assertEqual(self.call("m.f"), 1)
        self.assertIn(f"{self.apps.package}.m", sys.modules)
