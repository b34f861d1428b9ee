"""sd_notify: the Notifier on a fake clock, then a real node process under a
small sd_notify listener socket (what systemd gives a Type=notify service),
and socket activation through systemd-socket-activate."""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from msgd.systemd import Notifier
from tests.helpers import ROOT
from tests.process import TWISTD, NodeProcess
from tests.servers import free_port, port_open

INI = """
[node]
name = sd
drain_timeout = 5s

[interface:web]
type = http
endpoint = {endpoint}
"""


class NotifyListener:
    """The service manager's end of NOTIFY_SOCKET: a datagram socket in a
    short temp dir (AF_UNIX paths are limited to ~100 bytes)."""

    def __init__(self, testcase):
        d = tempfile.mkdtemp(prefix="msgd-sd-")
        testcase.addCleanup(shutil.rmtree, d, True)
        self.path = os.path.join(d, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.5)
        testcase.addCleanup(self.sock.close)
        self.messages: list[dict] = []

    def _until(self, predicate, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            msg = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append(msg)
            if predicate(msg):
                return msg
        raise AssertionError(f"no matching notification within {timeout}s; got {self.messages}")

    def until(self, predicate, timeout=30.0) -> defer.Deferred:
        """The first message (dict of KEY: value) matching ``predicate``,
        read in a thread so the reactor keeps running."""
        return deferToThread(self._until, predicate, timeout)


class NotifierTests(unittest.TestCase):
    def listener(self):
        return NotifyListener(self)

    def test_without_notify_socket_nothing_happens(self):
        n = Notifier(Clock(), environ={})
        self.assertFalse(n.enabled)
        n.ready("ok")
        n.start_watchdog()
        n.stop()

    def test_messages_and_watchdog_at_half_the_interval(self):
        lst = self.listener()
        clock = Clock()
        n = Notifier(clock, environ={"NOTIFY_SOCKET": lst.path, "WATCHDOG_USEC": "4000000"})
        self.addCleanup(n.stop)
        self.assertEqual(n.watchdog_interval, 2.0)
        n.ready("2 listener(s)")
        self.assertEqual(lst.sock.recv(100), b"READY=1\nSTATUS=2 listener(s)\n")
        n.start_watchdog()
        self.assertEqual(lst.sock.recv(100), b"WATCHDOG=1\n")
        clock.advance(1.9)
        lst.sock.setblocking(False)
        self.assertRaises(BlockingIOError, lst.sock.recv, 100)
        clock.advance(0.1)
        self.assertEqual(lst.sock.recv(100), b"WATCHDOG=1\n")
        n.stopping()
        self.assertEqual(lst.sock.recv(100), b"STOPPING=1\nSTATUS=draining\n")

    def test_watchdog_meant_for_another_process_is_ignored(self):
        n = Notifier(Clock(), environ={"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
        self.assertIsNone(n.watchdog_interval)

    def test_abstract_socket_name(self):
        self.assertEqual(Notifier(Clock(), environ={"NOTIFY_SOCKET": "@sd/notify"}).address, "\0sd/notify")


class EnvNodeProcess(NodeProcess):
    """A NodeProcess started with extra environment (and an optional
    wrapper command in front of twistd)."""

    def start_with(self, env: dict, wrapper=()):
        full = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
        self.proc = subprocess.Popen(
            [*wrapper, TWISTD, "--nodaemon", "--pidfile=", f"--logfile={self.log}", "msgd", "-c", self.ini],
            cwd=self.base, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        return self


class NodeUnderNotifySocketTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_ready_after_listening_watchdog_and_stopping(self):
        lst = NotifyListener(self)
        port = free_port()
        node = EnvNodeProcess(self.mktemp(), INI.replace("{endpoint}", f"tcp:{port}:interface=127.0.0.1"),
                              port=port)
        node.start_with({"NOTIFY_SOCKET": lst.path, "WATCHDOG_USEC": "400000"})
        self.addCleanup(node.stop)

        ready = yield lst.until(lambda m: m.get("READY") == "1")
        # READY=1 came only once the listener listens
        self.assertTrue((yield deferToThread(port_open, "127.0.0.1", port)), node.output())
        self.assertIn("1 listener(s)", ready["STATUS"])

        yield lst.until(lambda m: m.get("WATCHDOG") == "1")
        yield lst.until(lambda m: m.get("WATCHDOG") == "1")
        self.assertGreaterEqual(sum(1 for m in lst.messages if m.get("WATCHDOG") == "1"), 2)

        node.signal(signal.SIGTERM)
        stopping = yield lst.until(lambda m: m.get("STOPPING") == "1")
        self.assertEqual(stopping["STATUS"], "draining")
        self.assertEqual((yield deferToThread(node.wait, 30)), 0)

    @defer.inlineCallbacks
    def test_sighup_sends_reloading_then_ready(self):
        lst = NotifyListener(self)
        port = free_port()
        node = EnvNodeProcess(self.mktemp(), INI.replace("{endpoint}", f"tcp:{port}:interface=127.0.0.1"),
                              port=port)
        node.start_with({"NOTIFY_SOCKET": lst.path})
        self.addCleanup(node.stop)
        yield lst.until(lambda m: m.get("READY") == "1")
        node.signal(signal.SIGHUP)
        reloading = yield lst.until(lambda m: m.get("RELOADING") == "1")
        self.assertIn("MONOTONIC_USEC", reloading)
        yield lst.until(lambda m: m.get("READY") == "1")


class SocketActivationTests(unittest.TestCase):
    if shutil.which("systemd-socket-activate") is None:
        skip = "systemd-socket-activate is not installed"

    @defer.inlineCallbacks
    def test_systemd_endpoint_serves_the_passed_socket(self):
        """systemd-socket-activate listens, then starts the node on the first
        connection with the socket as fd 3 (LISTEN_FDS=1; Twisted also needs
        LISTEN_FDNAMES, which systemd ≥ 227 always sets): the node never
        binds the port itself."""
        lst = NotifyListener(self)
        port = free_port()
        node = EnvNodeProcess(self.mktemp(), INI.replace("{endpoint}", "systemd:domain=INET:index=0"), port=port)
        pythonpath = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
        node.start_with({}, wrapper=["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "--fdname=web",
                                     f"--setenv=PYTHONPATH={pythonpath}", f"--setenv=NOTIFY_SOCKET={lst.path}",
                                     f"--setenv=PATH={os.environ.get('PATH', '')}"])
        self.addCleanup(node.stop)

        def health():
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=20) as r:
                        return r.status
                except OSError:
                    if node.proc.poll() is not None:
                        raise AssertionError(f"node exited: {node.output()}")
                    time.sleep(0.1)
        self.assertEqual((yield deferToThread(health)), 200, node.output())
        yield lst.until(lambda m: m.get("READY") == "1")
