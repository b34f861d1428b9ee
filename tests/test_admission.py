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
        self.assertFalse(self.listener.admit(transport("10.0.0.2"), self.refused.append) and
                         self.listener.admit(transport("10.0.0.4"), self.refused.append))
        self.assertEqual(self.refused[-1], "connections")
