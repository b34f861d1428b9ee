"""The LDAP adapter against a real slapd (tests/servers.py) in a real node:
operations, filter escaping, search-then-bind, groups → roles, the
directory app, not blocking the reactor, and the faults."""

from __future__ import annotations

import os
import signal
import ssl
from types import SimpleNamespace

from twisted.internet import defer
from twisted.trial import unittest

from msgd.adapters import base
from msgd.adapters.ldap import ldap_dn, ldap_filter
from msgd.core import errors

from tests import servers
from tests.helpers import ROOT, eventually, hung_listener, make_node

BASE, LDIF = servers.PEOPLE_BASE, servers.PEOPLE_LDIF

DIRECTORY = open(os.path.join(ROOT, "apps", "directory.py")).read()
PING = "def ping():\n    return 'pong'\n"

def slapd(testcase):
    """A private slapd with the test directory, stopped at cleanup."""
    srv = servers.slapd(suffix=BASE, ldif=LDIF)
    testcase.addCleanup(srv.cleanup)
    return srv


NO_SERVER = SimpleNamespace(extra={"bind_dn": f"cn=admin,{BASE}", "password": "secret"})


def ini(url, srv, **extra):
    keys = dict(url=url, bind_dn=srv.extra["bind_dn"], password=srv.extra["password"], base=BASE,
                timeout="2s", retries="1", retry_backoff="10ms", breaker_failures="3", breaker_reset="200ms",
                pool_size="3")
    keys.update(extra)
    return "[adapter:directory]\ntype = ldap\n" + "".join(f"{k} = {v}\n" for k, v in keys.items())


def call(node, target, *args, timeout=5.0):
    return node.dispatcher.call(node.new_request("test", timeout=timeout), target, args, {})


class LDAPTests(unittest.TestCase):
    def setUp(self):
        self.srv = slapd(self)
        self.node = make_node(self, ini(f"ldap://127.0.0.1:{self.srv.port}", self.srv),
                              apps={"directory.py": DIRECTORY, "util2.py": PING})
        self.ldap = self.node.adapter("directory")

    def test_escaping_helpers(self):
        self.assertEqual(ldap_filter("(uid={})", "*)(uid=*"), r"(uid=\2a\29\28uid=\2a)")
        self.assertEqual(ldap_filter("(cn={name})", name="a\\b"), r"(cn=a\5cb)")
        self.assertEqual(ldap_dn("uid={},ou=people", "x,ou=admins"), r"uid=x\,ou\=admins,ou=people")

    @defer.inlineCallbacks
    def test_search_get_compare(self):
        found = yield self.ldap.search("(objectClass=inetOrgPerson)", attributes=["uid"])
        self.assertEqual(sorted(e["attributes"]["uid"][0] for e in found), ["ann", "bob"])
        # a value cannot widen the filter
        self.assertEqual((yield self.ldap.search("(uid={})", "*")), [])
        self.assertEqual((yield self.ldap.search("(uid={})", "*)(uid=*")), [])
        ann = yield self.ldap.get(f"uid=ann,ou=people,{BASE}")
        self.assertEqual(ann["attributes"]["mail"], ["ann@example.org"])
        self.assertIsNone((yield self.ldap.get(f"uid=nobody,ou=people,{BASE}")))
        self.assertTrue((yield self.ldap.compare(ann["dn"], "sn", "Smith")))
        self.assertFalse((yield self.ldap.compare(ann["dn"], "sn", "Jones")))
        e = yield self.assertFailure(self.ldap.search("(uid=ann", scope="one"), base.AdapterRejected)
        self.assertFalse(e.retryable)

    @defer.inlineCallbacks
    def test_add_modify_delete(self):
        dn = ldap_dn("uid={},ou=people," + BASE, "cy, the 2nd")
        yield self.ldap.add(dn, ["inetOrgPerson"], {"uid": "cy, the 2nd", "cn": "Cy", "sn": "Two"})
        yield self.ldap.modify(dn, {"mail": ["cy@example.org", "c2@example.org"], "sn": "Second"})
        entry = yield self.ldap.get(dn, ["mail", "sn"])
        self.assertEqual((sorted(entry["attributes"]["mail"]), entry["attributes"]["sn"]),
                         (["c2@example.org", "cy@example.org"], ["Second"]))
        yield self.ldap.modify(dn, {"mail": None})
        self.assertNotIn("mail", (yield self.ldap.get(dn))["attributes"])
        yield self.assertFailure(self.ldap.add(dn, ["inetOrgPerson"], {"cn": "Cy", "sn": "x"}),
                                 base.AdapterRejected)   # already exists
        yield self.ldap.delete(dn)
        self.assertIsNone((yield self.ldap.get(dn)))

    @defer.inlineCallbacks
    def test_authenticate_and_roles(self):
        ann = yield self.ldap.authenticate("ann", "annpw")
        self.assertEqual(ann["dn"], f"uid=ann,ou=people,{BASE}")
        self.assertEqual(ann["roles"], ["admins", "staff"])
        self.assertEqual((yield self.ldap.roles(f"uid=bob,ou=people,{BASE}", "bob")), ["staff"])
        self.assertIsNone((yield self.ldap.authenticate("ann", "wrong")))
        self.assertIsNone((yield self.ldap.authenticate("ann", "")))       # would be an anonymous bind
        self.assertIsNone((yield self.ldap.authenticate("nobody", "x")))
        self.assertIsNone((yield self.ldap.authenticate("*", "annpw")))     # no wildcard logins
        # the pooled connection still works as the service account afterwards
        self.assertEqual(len((yield self.ldap.search("(uid=bob)"))), 1)

    @defer.inlineCallbacks
    def test_directory_app(self):
        p = yield call(self.node, "directory.person", "ann")
        self.assertEqual((p["cn"], p["mail"]), ("Ann Smith", "ann@example.org"))
        self.assertEqual([x["uid"] for x in (yield call(self.node, "directory.find", "on"))], ["bob"])
        self.assertEqual((yield call(self.node, "directory.groups", "bob")), ["staff"])
        e = yield self.assertFailure(call(self.node, "directory.person", "*"), errors.ApplicationError)
        self.assertEqual(e.code, -32020)

    @defer.inlineCallbacks
    def test_does_not_block_reactor(self):
        yield self.ldap.search("(uid=ann)")          # a pooled connection exists
        pid = int(open(self.srv.pidfile).read().split()[0])
        os.kill(pid, signal.SIGSTOP)                  # slapd freezes: the search waits in its thread
        try:
            slow = self.ldap.search("(uid=bob)")
            self.assertEqual((yield call(self.node, "util2.ping")), "pong")   # answered meanwhile
            self.assertFalse(slow.called)
        finally:
            os.kill(pid, signal.SIGCONT)
        self.assertEqual(len((yield slow)), 1)

    @defer.inlineCallbacks
    def test_killed_and_restarted(self):
        yield self.ldap.search("(uid=ann)")
        self.srv.stop()
        try:
            seen = set()
            for _ in range(8):
                try:
                    yield self.ldap.search("(uid=ann)")
                except base.AdapterUnavailable as e:
                    seen.add(type(e))
            self.assertIn(base.CircuitOpen, seen)
            self.assertEqual(self.ldap.describe()["breaker"], "open")
        finally:
            self.srv.start()
        yield eventually(lambda: self.ldap.search("(uid=ann)").addCallbacks(lambda r: len(r) == 1,
                                                                            lambda f: False))
        self.assertEqual(self.ldap.describe()["breaker"], "closed")


class LDAPFaultTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_down_at_start(self):
        srv = NO_SERVER
        node = make_node(self, ini(f"ldap://127.0.0.1:{servers.free_port()}", srv, retries="0"),
                         apps={"directory.py": DIRECTORY})
        self.assertTrue(node.running)
        e = yield self.assertFailure(call(node, "directory.person", "ann", timeout=30), errors.Unavailable)
        self.assertIn("adapter directory", e.message)

    @defer.inlineCallbacks
    def test_hung_server(self):
        srv = NO_SERVER
        port = hung_listener(self)
        node = make_node(self, ini(f"ldap://127.0.0.1:{port}", srv, timeout="1s", retries="0", pool_size="2",
                                   pool_queue="2", breaker_failures="2", breaker_reset="10s"))
        ldap = node.adapter("directory")
        results = yield defer.DeferredList([ldap.search("(uid=ann)") for _ in range(6)], consumeErrors=True)
        kinds = {type(f.value).__name__ for ok, f in results}
        self.assertTrue(kinds <= {"AdapterTimeout", "AdapterOverloaded", "AdapterUnavailable"},
                        [f.value for ok, f in results])
        self.assertLessEqual(ldap.pool.total, 2)    # never more threads/connections than the pool
        self.assertEqual(len(ldap.pool.waiters), 0)


@defer.inlineCallbacks
def assertRefused(testcase, ldap, *words):
    """A search fails at once, not retried, with an error naming ``words``."""
    e = yield testcase.assertFailure(ldap.search("(uid=ann)"), base.AdapterUnavailable)
    testcase.assertNotIsInstance(e, base.CircuitOpen)
    testcase.assertFalse(e.retryable)
    for w in words:
        testcase.assertIn(w, e.reason)
    testcase.assertIn("adapter directory", e.message)
    testcase.assertEqual(ldap.pool.total, 0)
    testcase.assertEqual(ldap.describe()["failures"], 1)   # tried once: no retry of a certificate failure


class TLSTests(unittest.TestCase):
    """LDAPS and StartTLS against a slapd with a certificate for
    127.0.0.1/localhost from a test CA: verified against ``ca_file``, refused
    against the system's roots, taken unverified with ``tls_verify = no``."""

    def setUp(self):
        self.srv = servers.slapd(suffix=BASE, ldif=LDIF, tls=True)
        self.addCleanup(self.srv.cleanup)
        self.ldaps = self.srv.extra["ldaps_url"]
        self.plain = self.srv.extra["url"]

    def adapter(self, url, **extra):
        node = make_node(self, ini(url, self.srv, **extra))
        return node.adapter("directory")

    @defer.inlineCallbacks
    def assertWorks(self, ldap, start_tls=False):
        found = yield ldap.search("(uid={})", "ann", attributes=["mail"])
        self.assertEqual([e["attributes"]["mail"] for e in found], [["ann@example.org"]])
        # the pooled connection really is TLS
        (lease, _), = ldap.pool.idle
        self.assertIsInstance(lease.conn.socket, ssl.SSLSocket)
        self.assertEqual(lease.conn.tls_started, start_tls)
        # search-then-bind opens a second connection, the same way
        ann = yield ldap.authenticate("ann", "annpw")
        self.assertEqual(ann["roles"], ["admins", "staff"])

    def test_ldaps_with_ca_file(self):
        return self.assertWorks(self.adapter(self.ldaps, ca_file=self.srv.extra["ca"]))

    def test_start_tls_with_ca_file(self):
        return self.assertWorks(self.adapter(self.plain, start_tls="yes", ca_file=self.srv.extra["ca"]),
                                start_tls=True)

    def test_ldaps_by_name(self):
        # the certificate is for localhost too (and localhost may resolve to ::1 first)
        url = self.ldaps.replace("127.0.0.1", "localhost")
        return self.assertWorks(self.adapter(url, ca_file=self.srv.extra["ca"]))

    @defer.inlineCallbacks
    def test_system_roots_refuse_test_ca(self):
        for kind, url, extra in [("LDAPS", self.ldaps, {}), ("StartTLS", self.plain, {"start_tls": "yes"})]:
            ldap = self.adapter(url, **extra)
            yield assertRefused(self, ldap, f"TLS ({kind}) with 127.0.0.1:", "certificate not accepted",
                                "self-signed certificate", "ca_file")

    @defer.inlineCallbacks
    def test_ldaps_to_plain_port(self):
        # not a certificate problem: a failed handshake, which may be retried
        ldap = self.adapter(self.plain.replace("ldap:", "ldaps:"), ca_file=self.srv.extra["ca"], retries="0")
        e = yield self.assertFailure(ldap.search("(uid=ann)"), base.AdapterUnavailable)
        self.assertIn("TLS (LDAPS) with 127.0.0.1:", e.reason)
        self.assertIn("handshake failed", e.reason)
        self.assertTrue(e.retryable)

    @defer.inlineCallbacks
    def test_no_verify(self):
        yield self.assertWorks(self.adapter(self.ldaps, tls_verify="no"))
        yield self.assertWorks(self.adapter(self.plain, start_tls="yes", tls_verify="no"), start_tls=True)


class TLSNameTests(unittest.TestCase):
    """A certificate the CA signed, but for another name, is refused."""

    def setUp(self):
        self.srv = servers.slapd(suffix=BASE, ldif=LDIF, tls=True, tls_hosts=("other.example",))
        self.addCleanup(self.srv.cleanup)

    def adapter(self, url, **extra):
        return make_node(self, ini(url, self.srv, ca_file=self.srv.extra["ca"], **extra)).adapter("directory")

    @defer.inlineCallbacks
    def test_name_mismatch_refused(self):
        for url, extra in [(self.srv.extra["ldaps_url"], {}),
                           (self.srv.extra["ldaps_url"].replace("127.0.0.1", "localhost"), {}),
                           (self.srv.extra["url"], {"start_tls": "yes"})]:
            yield assertRefused(self, self.adapter(url, **extra), "certificate not accepted", "mismatch",
                                "certificate is not valid for")
        # the same server, unverified, is fine: only the name was wrong
        ldap = self.adapter(self.srv.extra["ldaps_url"], tls_verify="no")
        self.assertEqual(len((yield ldap.search("(uid=ann)"))), 1)
