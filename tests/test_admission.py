"""Admission in the listener base (msgd.interfaces.base.Listener.admit and
closed) with the real Guard, on an AppHarness and StringTransports: no
sockets."""

import os

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from msgd.interfaces.base import Listener
from msgd.security import Guard, SecurityOptions
from msgd.testing import AppHarness


class Plain(Listener):
    def __init__(self, harness, **options):
        super().__init__("plain", SecurityOptions(**options), harness)
        self.guard = Guard(self)
        self.gauge = Gauge()


class Gauge:
    value = 0

    def inc(self):
        self.value += 1

    def dec(self):
        self.value -= 1


def transport(host="10.0.0.1", port=1000):
    return StringTransport(peerAddress=IPv4Address("TCP", host, port))


class AdmissionTests(unittest.TestCase):
    def setUp(self):
        apps = os.path.abspath(self.mktemp())
        os.makedirs(apps)
        self.listener = Plain(AppHarness(apps), max_connections=2, max_connections_per_address=1)
        self.refused = []

    def test_admitted_connections_are_counted_until_closed(self):
        a, b = transport(), transport("10.0.0.2")
        self.assertTrue(self.listener.admit(a, self.refused.append))
        self.assertTrue(self.listener.admit(b, self.refused.append))
        self.assertEqual((self.listener.connections, self.listener.gauge.value), ({a, b}, 2))
        self.listener.closed(a)
        self.assertEqual((self.listener.connections, self.listener.gauge.value), ({b}, 1))
        self.assertTrue(self.listener.admit(transport("10.0.0.3"), self.refused.append))
        self.assertEqual(self.refused, [])

    def test_past_a_limit_the_protocol_refuses_in_its_own_form_and_nothing_is_counted(self):
        self.assertTrue(self.listener.admit(transport(), self.refused.append))
        late = transport(port=1001)
        self.assertFalse(self.listener.admit(late, self.refused.append))
        self.assertEqual(self.refused, ["connections_per_address"])
        self.assertNotIn(late, self.listener.connections)
        self.listener.closed(late)              # its end changes nothing
        self.assertEqual((len(self.listener.connections), self.listener.gauge.value), (1, 1))
        self.assertTrue(self.listener.admit(transport("10.0.0.2"), self.refused.append))
        self.assertFalse(self.listener.admit(transport("10.0.0.4"), self.refused.append))
        self.assertEqual(self.refused[-1], "connections")


class ThrottleTests(unittest.TestCase):
    """Guard.throttled: the one login throttle (password logins, PB's portal)."""

    def test_failed_logins_count_against_every_key_then_attempts_are_refused_unmade(self):
        from twisted.cred.error import UnauthorizedLogin
        from twisted.internet import defer

        from msgd.core import errors
        apps = os.path.abspath(self.mktemp())
        os.makedirs(apps)
        harness = AppHarness(apps)
        guard = Plain(harness, login_attempts=2, login_window=60).guard
        made = []

        def wrong():
            made.append(1)
            return defer.fail(UnauthorizedLogin())
        for _ in range(2):
            self.failureResultOf(guard.throttled(("user:u", "address:a"), wrong), UnauthorizedLogin)
        f = self.failureResultOf(guard.throttled(("address:a",), lambda: "never"), errors.Overloaded)
        self.assertIsInstance(f.value, errors.Overloaded)
        self.assertEqual(len(made), 2)
        self.assertEqual(self.successResultOf(guard.throttled(("user:v",), lambda: "ok")), "ok")
        harness.clock.advance(61)
        self.assertEqual(self.successResultOf(guard.throttled(("address:a",), lambda: "ok")), "ok")

    def test_no_certificate_principal_unless_asked_for(self):
        apps = os.path.abspath(self.mktemp())
        os.makedirs(apps)
        guard = Plain(AppHarness(apps)).guard
        self.assertIsNone(guard.certificate_principal(transport()))
        self.assertIsNone(Plain(AppHarness(apps), cert_principal=True).guard.certificate_principal(None))
