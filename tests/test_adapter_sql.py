"""The SQL adapter: sqlite (embedded, WAL, one writer) and a real
PostgreSQL (tests/servers.py), in a real node; faults through a TCP proxy
that can be cut and restored, and a listener that never answers."""

from __future__ import annotations

import os
import threading
import time

from twisted.internet import defer, reactor
from twisted.protocols import portforward
from twisted.trial import unittest

from msgd.adapters import base
from msgd.adapters.sql import SQLAdapter
from msgd.core import errors
from msgd.testing import AppHarness

from tests import servers
from tests.helpers import eventually, hung_listener, make_node

PING = """
def ping():
    return "pong"
"""


def call(node, target, *args, timeout=5.0):
    return node.dispatcher.call(node.new_request("test", timeout=timeout), target, args, {})


class SQLiteOnAHarnessTests(unittest.TestCase):
    def test_default_file_under_the_state_dir_of_its_services(self):
        """Built on an AppHarness (no node): the default sqlite file is
        ``[node] state_dir``/NAME.sqlite of the services' settings."""
        apps = os.path.abspath(self.mktemp())
        os.makedirs(apps)
        state = os.path.abspath(self.mktemp())
        db = SQLAdapter("db", SQLAdapter.Options(), AppHarness(apps, state_dir=state))
        self.assertEqual(db.path, os.path.join(state, "db.sqlite"))
        self.assertEqual(SQLAdapter("db", SQLAdapter.Options(path="/x/y.db"), AppHarness(apps)).path, "/x/y.db")


class SQLiteTests(unittest.TestCase):
    def setUp(self):
        self.node = make_node(self, "[adapter:db]\ntype = sql\npool_size = 4\n", apps={"util2.py": PING})
        self.db = self.node.adapter("db")
        return self.db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL)")

    @defer.inlineCallbacks
    def test_query_execute_interaction(self):
        db = self.db
        self.assertEqual((yield db.execute("INSERT INTO users (name) VALUES (?)", ("ann",))), 1)
        self.assertEqual((yield db.executemany("INSERT INTO users (name) VALUES (?)", [("bob",), ("cy",)])), 2)
        rows = yield db.query("SELECT id, name FROM users WHERE name = :n", {"n": "bob"})
        self.assertEqual(rows, [{"id": 2, "name": "bob"}])

        def add(cur, name):
            cur.execute("INSERT INTO users (name) VALUES (?)", (name,))
            return cur.lastrowid
        self.assertEqual((yield db.interaction(add, "dee")), 4)
        self.assertEqual((yield db.execute("UPDATE users SET name = name || '!' WHERE id > ?", (2,))), 2)
        # default file under the node's state dir, in WAL mode
        self.assertEqual(db.path, os.path.join(self.node.config.node.state_dir, "db.sqlite"))
        self.assertEqual((yield db.query("PRAGMA journal_mode")), [{"journal_mode": "wal"}])

    @defer.inlineCallbacks
    def test_interaction_rolls_back(self):
        def half(cur):
            cur.execute("INSERT INTO users (name) VALUES (?)", ("ann",))
            cur.execute("INSERT INTO users (name) VALUES (?)", ("ann",))   # violates UNIQUE
        e = yield self.assertFailure(self.db.interaction(half), base.AdapterRejected)
        self.assertIn("IntegrityError", e.reason)
        self.assertFalse(e.retryable)
        self.assertEqual((yield self.db.query("SELECT count(*) AS n FROM users")), [{"n": 0}])
        yield self.assertFailure(self.db.query("SELEC nonsense"), base.AdapterRejected)

    def test_parameters_only_bound(self):
        self.assertRaises(TypeError, self.db.query, "SELECT * FROM users WHERE name = ?", "ann")
        self.assertRaises(TypeError, self.db.execute, b"DELETE FROM users")

    @defer.inlineCallbacks
    def test_one_writer_at_a_time(self):
        active, most = [0], [0]
        lock = threading.Lock()

        def write(cur, i):
            with lock:
                active[0] += 1
                most[0] = max(most[0], active[0])
            time.sleep(0.01)
            cur.execute("INSERT INTO users (name) VALUES (?)", (f"u{i}",))
            with lock:
                active[0] -= 1
        yield defer.gatherResults([self.db.interaction(write, i) for i in range(8)])
        self.assertEqual(most[0], 1)
        self.assertEqual((yield self.db.query("SELECT count(*) AS n FROM users")), [{"n": 8}])

    @defer.inlineCallbacks
    def test_does_not_block_reactor(self):
        started, release = threading.Event(), threading.Event()

        def slow(cur):
            started.set()
            release.wait(10)
            return "slow done"
        slow_d = self.db.interaction(slow)
        yield eventually(started.is_set)
        # the reactor is free: another request is answered meanwhile
        self.assertEqual((yield call(self.node, "util2.ping")), "pong")
        self.assertFalse(slow_d.called)
        release.set()
        self.assertEqual((yield slow_d), "slow done")


class Proxy:
    """A TCP forwarder on a fixed port that can be cut (listener closed,
    connections dropped) and restored: a server going down and up."""

    def __init__(self, host, port):
        self.target = (host, port)
        self.port = servers.free_port()
        self.listening = None
        self.conns = []

    def start(self):
        proxy = self

        class Server(portforward.ProxyServer):
            def connectionMade(self):
                proxy.conns.append(self)
                super().connectionMade()
        factory = portforward.ProxyFactory(*self.target)
        factory.protocol = Server
        self.listening = reactor.listenTCP(self.port, factory, interface="127.0.0.1")

    def stop(self):
        d = defer.maybeDeferred(self.listening.stopListening)
        for c in self.conns:
            c.transport.abortConnection()
        self.conns = []
        return d


class PostgresTests(unittest.TestCase):
    def setUp(self):
        self.srv = servers.postgres()
        self.dsn = self.srv.extra["dsn"]
        self.table = f"msgd_test_{os.getpid()}_{id(self)}"

    def node_for(self, dsn, **extra):
        keys = dict(driver="postgres", dsn=dsn, timeout="3s", retries="1", retry_backoff="10ms",
                    breaker_failures="3", breaker_reset="200ms", pool_size="2")
        keys.update(extra)
        text = "[adapter:pg]\ntype = sql\n" + "".join(f"{k} = {v}\n" for k, v in keys.items())
        return make_node(self, text, apps={"util2.py": PING})

    @defer.inlineCallbacks
    def test_roundtrip_and_not_blocking(self):
        node = self.node_for(self.dsn)
        db = node.adapter("pg")
        yield db.execute(f"CREATE TABLE {self.table} (id serial PRIMARY KEY, name text UNIQUE)")
        self.addCleanup(lambda: db.execute(f"DROP TABLE IF EXISTS {self.table}") if db.running else None)
        self.assertEqual((yield db.execute(f"INSERT INTO {self.table} (name) VALUES (%s)", ("ann",))), 1)
        new_id = yield db.interaction(lambda cur: cur.execute(
            f"INSERT INTO {self.table} (name) VALUES (%(n)s) RETURNING id", {"n": "bob"}) or cur.fetchone()["id"])
        self.assertEqual(new_id, 2)
        self.assertEqual((yield db.query(f"SELECT name FROM {self.table} ORDER BY id")),
                         [{"name": "ann"}, {"name": "bob"}])
        yield self.assertFailure(db.execute(f"INSERT INTO {self.table} (name) VALUES (%s)", ("ann",)),
                                 base.AdapterRejected)
        slow = db.query("SELECT true AS slept FROM pg_sleep(0.3)")
        self.assertEqual((yield call(node, "util2.ping")), "pong")   # answered while SQL runs
        self.assertFalse(slow.called)
        self.assertEqual((yield slow), [{"slept": True}])

    @defer.inlineCallbacks
    def test_down_at_start(self):
        node = self.node_for(f"host=127.0.0.1 port={servers.free_port()} user=postgres dbname=postgres",
                             retries="0")
        self.assertTrue(node.running)
        e = yield self.assertFailure(node.adapter("pg").query("SELECT 1"), base.AdapterUnavailable)
        self.assertTrue(e.retryable)
        self.assertIsInstance(e, errors.Unavailable)

    @defer.inlineCallbacks
    def test_cut_mid_traffic_breaker_and_recovery(self):
        proxy = Proxy(self.srv.host or "127.0.0.1", self.srv.port or 5432)
        proxy.start()
        self.addCleanup(lambda: proxy.stop() if proxy.listening and proxy.listening.connected else None)
        node = self.node_for(f"host=127.0.0.1 port={proxy.port} user=postgres dbname=postgres "
                             f"{' '.join(p for p in self.dsn.split() if p.startswith('password'))}")
        db = node.adapter("pg")
        for _ in range(3):
            self.assertEqual((yield db.query("SELECT 1 AS one")), [{"one": 1}])
        yield proxy.stop()
        seen = set()
        for _ in range(8):
            try:
                yield db.query("SELECT 1 AS one")
            except base.AdapterError as e:
                seen.add(type(e))
        self.assertIn(base.CircuitOpen, seen)
        self.assertEqual(db.describe()["breaker"], "open")
        proxy.start()
        yield eventually(lambda: db.query("SELECT 1 AS one").addCallbacks(lambda r: r == [{"one": 1}],
                                                                          lambda f: False))
        self.assertEqual(db.describe()["breaker"], "closed")
        # adbapi logs the rollback on each connection it finds dead; expected here
        import psycopg2
        from twisted.enterprise.adbapi import ConnectionLost
        self.flushLoggedErrors(psycopg2.Error, ConnectionLost)

    @defer.inlineCallbacks
    def test_hung_server(self):
        port = hung_listener(self)
        node = self.node_for(f"host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=2",
                             retries="0", breaker_failures="2", pool_queue="2", breaker_reset="10s")
        db = node.adapter("pg")
        results = yield defer.DeferredList([db.query("SELECT 1") for _ in range(6)], consumeErrors=True)
        kinds = {type(f.value).__name__ for ok, f in results}
        self.assertTrue(kinds <= {"AdapterTimeout", "AdapterOverloaded", "AdapterUnavailable"}, kinds)
        self.assertLessEqual(db.pool.in_use, 2)      # threads held by the hung server stay bounded
        self.assertEqual(len(db.pool.waiters), 0)
    test_hung_server.timeout = 30
