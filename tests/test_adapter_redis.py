"""The Redis adapter against a real redis-server (tests/servers.py), in a
real node: commands, pipelines, MULTI/EXEC, pub/sub, URL with password and
database, and the faults: down at start, killed and restarted, hung."""

from __future__ import annotations

import json
import os

from twisted.internet import defer
from twisted.trial import unittest

from msgd.adapters import base
from msgd.core import errors

from tests import servers
from tests.helpers import ROOT, breaker_opens, eventually, hung_listener, make_node

COUNTER = open(os.path.join(ROOT, "apps", "counter.py")).read()


def ini(url: str, **extra) -> str:
    keys = {"retries": "1", "retry_backoff": "10ms", "breaker_failures": "3", "breaker_reset": "200ms",
            "timeout": "2s"}
    keys.update(extra)
    body = "".join(f"{k} = {v}\n" for k, v in keys.items())
    return f"[adapter:cache]\ntype = redis\nurl = {url}\n{body}"


def call(node, target, *args, timeout=5.0):
    return node.dispatcher.call(node.new_request("test", timeout=timeout), target, args, {})


class RedisTests(unittest.TestCase):
    def setUp(self):
        self.srv = servers.redis()
        self.addCleanup(self.srv.cleanup)
        self.url = f"redis://127.0.0.1:{self.srv.port}/3"
        self.node = make_node(self, ini(self.url), apps={"counter.py": COUNTER})
        self.cache = self.node.adapter("cache")

    @defer.inlineCallbacks
    def test_commands_pipeline_multi(self):
        c = self.cache
        self.assertEqual((yield c.set("k", "v")), "OK")
        self.assertEqual((yield c.get("k")), "v")
        self.assertEqual((yield c.execute("SET", "n", 5)), "OK")
        self.assertEqual((yield c.incr("n")), 6)
        self.assertEqual((yield c.pipeline(lambda p: [p.incr("n"), p.get("k")])), [7, "v"])
        self.assertEqual((yield c.multi(lambda t: [t.incr("n"), t.incr("n")])), [8, 9])
        e = yield self.assertFailure(c.execute("INCR", "k"), base.AdapterRejected)
        self.assertFalse(e.retryable)
        self.assertEqual((yield c.get("n")), 9)   # the connection is still good after an error reply
        self.assertEqual(self.node.metrics.value("msgd_adapter_calls_total",
                                                 {"adapter": "cache", "op": "get", "outcome": "ok"}), 2)

    @defer.inlineCallbacks
    def test_database_from_url(self):
        yield self.cache.set("where", "db3")
        raw = yield self.cache.execute("CLIENT", "INFO")
        self.assertIn("db=3", raw)

    @defer.inlineCallbacks
    def test_password(self):
        yield self.cache.execute("CONFIG", "SET", "requirepass", "s3cr:et")   # a private server
        node = make_node(self, ini(f"redis://:s3cr%3Aet@127.0.0.1:{self.srv.port}/1", breaker_failures="100"))
        self.assertEqual((yield node.adapter("cache").ping()), "PONG")
        bad = make_node(self, ini(f"redis://:wrong@127.0.0.1:{self.srv.port}/1", retries="0"))
        e = yield self.assertFailure(bad.adapter("cache").ping(), base.AdapterUnavailable)
        self.assertIn("auth", e.reason.lower())

    @defer.inlineCallbacks
    def test_watch_conflict(self):
        c = self.cache
        yield c.set("w", 1)
        self.assertEqual((yield c.multi(lambda t: t.incr("w"), watch=["w"])), [2])
        other = make_node(self, ini(self.url)).adapter("cache")

        @defer.inlineCallbacks
        def run(conn):
            # another client changes the watched key between WATCH and EXEC
            t = yield conn.multi(["w"])
            yield other.set("w", 10)
            t.incr("w")
            return (yield t.commit())
        e = yield self.assertFailure(c.call("multi", run), base.AdapterRejected)
        self.assertTrue(e.retryable)
        self.assertEqual((yield c.get("w")), 10)

    @defer.inlineCallbacks
    def test_app_counter(self):
        self.assertEqual((yield call(self.node, "counter.hit", "home")), 1)
        self.assertEqual((yield call(self.node, "counter.hit", "home", 4)), 5)
        yield call(self.node, "counter.hit", "about")
        self.assertEqual((yield call(self.node, "counter.get", "home")), 5)
        self.assertEqual((yield call(self.node, "counter.top", 2)), [["home", 5], ["about", 1]])
        self.assertEqual((yield call(self.node, "counter.reset", "home")), 5)
        self.assertEqual((yield call(self.node, "counter.get", "home")), 0)

    @defer.inlineCallbacks
    def test_pubsub_survives_restart(self):
        got = []
        sub = self.cache.subscribe(["news"], lambda ch, msg: got.append((ch, msg)))
        yield sub.ready
        yield self.cache.publish("news", "one")
        yield eventually(lambda: got == [("news", "one")])
        self.srv.stop()
        self.srv.start()
        yield eventually(lambda: self.cache.execute("PUBSUB", "NUMSUB", "news").addCallbacks(
            lambda r: r[1] == 1, lambda f: False))
        yield self.cache.publish("news", "two")
        yield eventually(lambda: got[-1:] == [("news", "two")])
        yield sub.stop()

    @defer.inlineCallbacks
    def test_killed_mid_traffic_breaker_opens_and_recovers(self):
        for i in range(5):
            yield self.cache.set(f"k{i}", i)
        self.srv.stop()
        seen = set()
        for i in range(10):
            try:
                yield self.cache.get("k1")
            except base.AdapterUnavailable as e:
                seen.add(type(e))
        self.assertIn(base.CircuitOpen, seen)
        health = json.loads(json.dumps(self.node.health()))     # /health shows it
        self.assertEqual(health["adapters"]["cache"]["breaker"], "open")
        self.assertIn("cannot connect", health["adapters"]["cache"]["last_error"])
        self.assertEqual(self.node.metrics.value("msgd_adapter_breaker_open", {"adapter": "cache"}), 1)
        self.srv.start()
        yield eventually(lambda: self.cache.get("k1").addCallbacks(lambda v: v is None, lambda f: False))
        self.assertEqual(self.cache.describe()["breaker"], "closed")
        self.assertEqual((yield call(self.node, "counter.hit", "back")), 1)


class RedisDownTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_down_at_start(self):
        port = servers.free_port()
        node = make_node(self, ini(f"redis://127.0.0.1:{port}/0"), apps={"counter.py": COUNTER})
        self.assertTrue(node.running)   # the node starts without its Redis
        res = yield call(node, "counter.hit", "x", timeout=30).addErrback(lambda f: f.value)
        self.assertIsInstance(res, errors.Unavailable)
        self.assertIn("adapter cache", res.message)
        self.assertTrue(res.data["retryable"])

    @defer.inlineCallbacks
    def test_hung_server_calls_end_at_deadline(self):
        port = hung_listener(self)
        node = make_node(self, ini(f"redis://127.0.0.1:{port}/0", pool_size="2", pool_queue="3",
                                   breaker_failures="2", retries="0", timeout="300ms", breaker_reset="10s"),
                         apps={"counter.py": COUNTER})
        cache = node.adapter("cache")
        results = yield defer.DeferredList([call(node, "counter.get", "x", timeout=0.3) for _ in range(8)],
                                           consumeErrors=True)
        kinds = {type(r.value).__name__ for ok, r in results}
        self.assertTrue(kinds <= {"Timeout", "AdapterTimeout", "AdapterOverloaded"}, kinds)
        self.assertIn("AdapterOverloaded", kinds)   # beyond pool + queue, refused at once
        self.assertLessEqual(cache.pool.total, 2)
        self.assertEqual(len(cache.pool.waiters), 0)
        f = yield breaker_opens(self, lambda: cache.get("x"))
        self.assertIn("circuit open", f.message)


class RedisTLSTests(unittest.TestCase):
    """rediss:// against a redis-server that speaks only TLS, with a
    certificate from a test CA: verified with ``ca_file``, refused against
    the system's roots or when the name does not match, taken unverified only
    with ``tls_verify = no``; pub/sub goes over TLS too."""

    def node(self, srv, **keys):
        keys.setdefault("retries", "0")
        node = make_node(self, ini(f"rediss://127.0.0.1:{srv.port}/0", **keys))
        return node.adapter("cache")

    def server(self, names=("127.0.0.1", "localhost")):
        srv = servers.redis(tls=names)
        self.addCleanup(srv.cleanup)
        return srv

    @defer.inlineCallbacks
    def test_verified_with_ca_file(self):
        srv = self.server()
        cache = self.node(srv, ca_file=srv.extra["ca"])
        self.assertEqual((yield cache.set("k", "v")), "OK")
        self.assertEqual((yield cache.get("k")), "v")
        got = []
        sub = cache.subscribe(["news"], lambda channel, message: got.append((channel, message)))
        self.addCleanup(sub.stop)
        yield sub.ready
        yield cache.publish("news", "over tls")
        yield eventually(lambda: got == [("news", "over tls")])

    @defer.inlineCallbacks
    def test_verified_with_a_ca_bundle(self):
        """Every certificate of a ca_file counts, not only its first."""
        from msgd.security.tls import load_certificates, make_ca
        srv = self.server()
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        bundle = os.path.join(d, "bundle.pem")
        with open(bundle, "wb") as out:
            for path in (make_ca(d, "unrelated")["cert"], srv.extra["ca"]):
                with open(path, "rb") as f:
                    out.write(f.read())
        self.assertEqual(len(load_certificates(bundle)), 2)
        self.assertEqual((yield self.node(srv, ca_file=bundle).set("k", "v")), "OK")
        empty = os.path.join(d, "empty.pem")
        open(empty, "w").close()
        self.assertRaises(ValueError, load_certificates, empty)

    @defer.inlineCallbacks
    def test_refused_without_the_ca(self):
        srv = self.server()
        e = yield self.assertFailure(self.node(srv).get("k"), base.AdapterUnavailable)
        self.assertIn("certificate", str(e).lower())

    @defer.inlineCallbacks
    def test_refused_when_the_name_does_not_match(self):
        srv = self.server(names=("other.example",))
        e = yield self.assertFailure(self.node(srv, ca_file=srv.extra["ca"]).get("k"), base.AdapterUnavailable)
        self.assertIn("mismatch", str(e).lower())     # service_identity: the name is not the certificate's

    @defer.inlineCallbacks
    def test_unverified_when_told(self):
        srv = self.server(names=("other.example",))
        cache = self.node(srv, tls_verify="no")
        self.assertEqual((yield cache.set("k", "v")), "OK")
