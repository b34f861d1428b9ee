"""The POP3 poller against a real dovecot (tests/servers.py), and a crash
test that SIGKILLs a real node process in the middle of polls."""

import json
import os
import random
import signal
import time
from email.message import EmailMessage

from twisted.internet import defer
from twisted.logger import Logger, globalLogPublisher
from twisted.trial import unittest

from msgd.config import ConfigError, parse_text
from tests import servers
from tests.helpers import eventually, make_node
from tests.process import NodeProcess
from tests.test_dirwatch import pause

APP = '''
from msgd import api
mails = []
fail = {}          # subject -> how many more times to fail ("always": forever)

def take(mail: dict):
    msg = mail["message"]
    subject = msg["subject"]
    mails.append(mail)
    left = fail.get(subject)
    if left == "always" or (left or 0) > 0:
        if left != "always":
            fail[subject] = left - 1
        raise api.AppError("refused " + subject)
    if subject.startswith("slow"):
        return api.sleep(0.3)
    return None
'''


def ini(srv, **keys):
    values = dict(endpoint=f"tcp:host=127.0.0.1:port={srv.port}", username="alice", password="secret",
                  handler="t.take", allow_plaintext="yes", interval="0.2s", error_backoff="0.05s",
                  retry_backoff="0.3s")
    values.update(keys)
    lines = "\n".join(f"{k} = {v}" for k, v in values.items())
    return f"[interface:mail]\ntype = pop3\n{lines}\n"


def plain(subject, text="hello", **headers):
    m = EmailMessage()
    m["From"] = "Bob <bob@example.org>"
    m["To"] = "alice@example.org"
    m["Subject"] = subject
    m["Message-ID"] = f"<{subject.replace(' ', '-')}@example.org>"
    for k, v in headers.items():
        m[k] = v
    m.set_content(text)
    return bytes(m)


def multipart(subject):
    m = EmailMessage()
    m["From"] = "bob@example.org"
    m["Subject"] = subject
    m.set_content("see attached")
    m.add_attachment(bytes(range(256)) * 40, maintype="application", subtype="octet-stream", filename="data.bin")
    m.add_attachment("a,b\n1,2\n", subtype="csv", filename="table.csv")
    return bytes(m)


def latin1(subject):
    body = "Grüße aus Köln, ça coûte 5 EUR"
    return (f"From: bob@example.org\r\nSubject: =?iso-8859-1?q?{subject}_=E0_Gr=FC=DFe?=\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\n").encode() + body.encode("iso-8859-1") + b"\r\n"


def dovecot(testcase, **kw):
    """A private dovecot, killed at cleanup (its master takes ~6 s to obey
    SIGTERM, and a throwaway instance has nothing to save)."""
    srv = servers.dovecot({"alice": "secret"}, **kw)
    testcase.addCleanup(srv.cleanup)
    testcase.addCleanup(srv.stop, signal.SIGKILL)
    return srv


class POP3Tests(unittest.TestCase):
    def setUp(self):
        self.srv = dovecot(self)

    def node(self, state_dir=None, **keys):
        text = ini(self.srv, **keys)
        if state_dir:
            text = f"[node]\nname = test\nstate_dir = {state_dir}\n" + text
        self.n = make_node(self, text, {"t.py": APP})
        self.iface = self.n.interfaces["mail"]
        self.app = self.n.apps.modules["t"].module
        return self.n

    def on_server(self) -> int:
        md = self.srv.extra["maildir"]("alice")
        return len(os.listdir(os.path.join(md, "new"))) + len(os.listdir(os.path.join(md, "cur")))

    def metric(self, what):
        return self.n.metrics.value(f"msgd_ingest_{what}", {"interface": "mail"}) or 0

    @defer.inlineCallbacks
    def test_messages_parsed_and_deleted(self):
        servers.deliver(self.srv, "alice", plain("plain one", "hello\nworld"))
        servers.deliver(self.srv, "alice", multipart("with files"))
        servers.deliver(self.srv, "alice", latin1("latin"))
        self.node()
        yield eventually(lambda: len(self.app.mails) == 3 and self.on_server() == 0)
        by = {str(m["message"]["subject"]).split()[0]: m for m in self.app.mails}
        p = by["plain"]["message"]
        self.assertEqual(p.get_body().get_content(), "hello\nworld\n")
        self.assertEqual(p["from"].addresses[0].display_name, "Bob")
        self.assertEqual(by["plain"]["mailbox"], "alice@127.0.0.1")
        self.assertTrue(by["plain"]["raw"].startswith(b"From: Bob"))
        m = by["with"]["message"]
        files = {a.get_filename(): a.get_content() for a in m.iter_attachments()}
        self.assertEqual(files["data.bin"], bytes(range(256)) * 40)
        self.assertEqual(files["table.csv"], "a,b\n1,2\n")
        lat = by["latin"]["message"]
        self.assertEqual(str(lat["subject"]), "latin à Grüße")
        self.assertEqual(lat.get_body().get_content(), "Grüße aus Köln, ça coûte 5 EUR\n")
        self.assertEqual(len({m["uid"] for m in self.app.mails}), 3)
        self.assertEqual((self.metric("taken_total"), self.metric("succeeded_total")), (3, 3))

    @defer.inlineCallbacks
    def test_failing_message_kept_and_retried_after_backoff(self):
        servers.deliver(self.srv, "alice", plain("flaky"))
        servers.deliver(self.srv, "alice", plain("fine"))
        self.node()
        self.app.fail["flaky"] = 2
        yield eventually(lambda: len(self.app.mails) >= 2)
        yield eventually(lambda: self.on_server() == 1)    # fine is gone, flaky is kept
        with open(self.iface.state.path) as f:
            state = json.load(f)
        (uid, entry), = state["retry"].items()
        self.assertEqual(entry["tries"], 1)
        self.assertEqual(entry["reason"], "application_error (-32000): refused flaky")
        self.assertEqual(len(self.app.mails), 2)         # polls in between do not retry before the back-off
        yield eventually(lambda: self.on_server() == 0)
        flaky = [m["message"]["subject"] for m in self.app.mails].count("flaky")
        self.assertEqual(flaky, 3)
        self.assertEqual(self.iface.state.retry, {})
        self.assertEqual((self.metric("failed_total"), self.metric("succeeded_total")), (2, 2))

    @defer.inlineCallbacks
    def test_gives_up_into_failed_list(self):
        servers.deliver(self.srv, "alice", plain("hopeless"))
        servers.deliver(self.srv, "alice", plain("huge", "x" * 5000))
        state = os.path.abspath(self.mktemp())
        self.node(state, max_tries="2", retry_backoff="0.05s", max_size="2KiB")
        self.app.fail["hopeless"] = "always"
        yield eventually(lambda: self.iface.describe()["failed"] == 2)
        yield pause(0.5)                                   # more polls: no more tries
        self.assertEqual([m["message"]["subject"] for m in self.app.mails], ["hopeless", "hopeless"])
        self.assertEqual(self.on_server(), 2)
        with open(self.iface.state.path) as f:
            failed = json.load(f)["failed"]
        reasons = sorted(e["reason"] for e in failed.values())
        self.assertEqual(reasons[0], "application_error (-32000): refused hopeless")
        self.assertTrue(reasons[1].startswith("too_large: "), reasons[1])
        # a restarted node remembers its failed list
        yield self.n.stopService()
        self.node(state, max_tries="2", retry_backoff="0.05s", max_size="2KiB")
        self.assertEqual(self.iface.describe()["failed"], 2)
        yield pause(0.5)
        self.assertEqual(self.app.mails, [])

    @defer.inlineCallbacks
    def test_apop(self):
        servers.deliver(self.srv, "alice", plain("by apop"))
        self.node(auth="apop", allow_plaintext="no")
        yield eventually(lambda: self.on_server() == 0)
        self.assertEqual(self.app.mails[0]["message"]["subject"], "by apop")

    @defer.inlineCallbacks
    def test_wrong_password_logged_and_backed_off(self):
        # one failure only: dovecot delays a repeated failed login by seconds
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.node(password="wrong", error_backoff="30s")
        yield eventually(lambda: self.iface.errors_in_row == 1)
        self.assertEqual(self.iface.next_delay, 30)
        logged = [e for e in events if e.get("interface") == "mail" and "error" in e and "delay" in e]
        self.assertIn("ServerErrorResponse", logged[0]["error"])
        self.assertIn("Authentication failed", logged[0]["error"])
        self.assertEqual(self.metric("errors_total"), 1)
        self.assertTrue(self.n.running)

    @defer.inlineCallbacks
    def test_server_down_then_back(self):
        self.srv.stop(signal.SIGKILL)
        self.node(error_backoff="0.02s", max_error_backoff="0.1s")
        yield eventually(lambda: self.iface.errors_in_row >= 5)
        self.assertEqual(self.iface.next_delay, 0.1)          # 0.02, 0.04, 0.08, then the cap
        servers.deliver(self.srv, "alice", plain("after outage"))
        self.srv.start()
        # the mail leaves the server at QUIT; the poller's own state is settled just after
        yield eventually(lambda: self.on_server() == 0 and self.iface.errors_in_row == 0, timeout=30)
        self.assertEqual(self.app.mails[0]["message"]["subject"], "after outage")
        self.assertEqual((self.iface.errors_in_row, self.iface.next_delay), (0, 0.2))

    @defer.inlineCallbacks
    def test_batches(self):
        for i in range(7):
            servers.deliver(self.srv, "alice", plain(f"m{i}"))
        self.node(batch="3", interval="1h")
        yield eventually(lambda: self.on_server() == 0)
        self.assertEqual(sorted(m["message"]["subject"] for m in self.app.mails), [f"m{i}" for i in range(7)])

    @defer.inlineCallbacks
    def test_stls_and_pop3s(self):
        self.srv = dovecot(self, tls=True)
        servers.deliver(self.srv, "alice", plain("over stls"))
        self.node(allow_plaintext="no", starttls="yes", tls_ca=self.srv.extra["ca"])
        yield eventually(lambda: self.on_server() == 0)
        yield self.n.stopService()
        servers.deliver(self.srv, "alice", plain("over pop3s"))
        tls = f"tls:host=127.0.0.1:port={self.srv.extra['tls_port']}:trustRoots={self.srv.extra['ca_dir']}"
        self.node(allow_plaintext="no", endpoint=tls)
        yield eventually(lambda: self.on_server() == 0)
        self.assertEqual(self.app.mails[0]["message"]["subject"], "over pop3s")

    @defer.inlineCallbacks
    def test_stls_refuses_an_unknown_certificate(self):
        self.srv = dovecot(self, tls=True)
        servers.deliver(self.srv, "alice", plain("never"))
        self.node(allow_plaintext="no", starttls="yes")       # system trust store: self-signed is refused
        yield eventually(lambda: self.iface.errors_in_row >= 1)
        self.assertEqual((self.app.mails, self.on_server()), ([], 1))

    @defer.inlineCallbacks
    def test_stop_commits_what_was_handled(self):
        for i in range(3):
            servers.deliver(self.srv, "alice", plain(f"slow {i}"))
        self.node()
        yield eventually(lambda: len(self.app.mails) == 1)
        yield self.n.stopService()
        self.assertEqual(len(self.app.mails), 1)
        self.assertEqual(self.on_server(), 2)

    @defer.inlineCallbacks
    def test_silent_server_times_out(self):
        from twisted.internet import protocol, reactor
        port = reactor.listenTCP(0, protocol.Factory.forProtocol(protocol.Protocol), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.node(endpoint=f"tcp:host=127.0.0.1:port={port.getHost().port}", server_timeout="0.2s",
                  error_backoff="30s")
        yield eventually(lambda: self.iface.errors_in_row == 1)
        self.assertEqual(self.metric("errors_total"), 1)

    def test_plaintext_needs_consent(self):
        text = ini(self.srv, allow_plaintext="no")
        e = self.assertRaises(ConfigError, parse_text, text, "n.ini")
        self.assertIn("[interface:mail] allow_plaintext", str(e))
        parse_text(ini(self.srv, allow_plaintext="no", starttls="yes"), "n.ini")
        parse_text(ini(self.srv, allow_plaintext="no",
                       endpoint="tls:host=127.0.0.1:port=995"), "n.ini")


class UnitTests(unittest.TestCase):
    def test_parse_arrival_and_line_ends(self):
        from msgd.interfaces.pop3 import parse
        raw = (b"Received: from a by b; Sat, 21 Nov 2026 10:00:05 +0000\r\n"
               b"Received: from c by a; Sat, 21 Nov 2026 09:00:00 +0000\r\n"
               b"Date: Fri, 20 Nov 2026 00:00:00 +0000\r\nSubject: x\r\n\r\nline\r\n")
        msg, when = parse(raw)
        self.assertEqual(when, 1795255205.0)
        self.assertEqual(msg.get_body().get_content(), "line\n")
        self.assertEqual(parse(b"Date: Fri, 20 Nov 2026 00:00:00 +0000\r\n\r\n")[1], 1795132800.0)
        self.assertIsNone(parse(b"Date: garbage\r\n\r\nx")[1])

    def test_endpoint_host(self):
        from msgd.interfaces.pop3 import endpoint_host
        self.assertEqual([endpoint_host(e) for e in ("tcp:host=pop.example.org:port=110", "tls:pop.example.org:995",
                                                     "unix:path=/run/pop3")], ["pop.example.org"] * 2 + [""])

    def test_state_due_prune_and_reload(self):
        from msgd.interfaces.pop3 import MailboxState
        path = os.path.abspath(self.mktemp())
        st = MailboxState(path)
        st.load()
        st.retry["a"] = {"tries": 1, "next": 100.0, "reason": "r"}
        st.failed["b"] = {"tries": 5, "reason": "r", "at": 1.0}
        self.assertEqual([st.due(u, 50.0) for u in "abc"], [False, False, True])
        self.assertTrue(st.due("a", 100.0))
        with open(path, "wb") as f:
            f.write(st.dump())
        again = MailboxState(path)
        again.load()
        self.assertEqual((again.retry, again.failed), (st.retry, st.failed))
        self.assertTrue(again.prune({"a"}))
        self.assertEqual((list(again.retry), again.failed), (["a"], {}))
        self.assertFalse(again.prune({"a"}))


CRASH_APP = '''
import os
from msgd import api

async def take(mail: dict):
    await api.sleep(0.05)
    with open(os.path.join(os.path.dirname(__file__), "..", "handled.log"), "a") as f:
        f.write(mail["message"]["message-id"] + "\\n")
'''

CRASH_INI = """
[node]
name = crash
drain_timeout = 1s

[interface:web]
type = http
endpoint = tcp:{port}:interface=127.0.0.1

[interface:mail]
type = pop3
endpoint = tcp:host=127.0.0.1:port=%d
username = alice
password = secret
allow_plaintext = yes
handler = t.take
interval = 0.2s
batch = 10
"""


class POP3CrashTests(unittest.TestCase):
    """SIGKILL a node in the middle of polls: every message reaches the
    handler at least once and the mailbox ends empty."""

    timeout = 120

    @defer.inlineCallbacks
    def test_sigkill_mid_poll_loses_nothing(self):
        srv = dovecot(self)
        rng = random.Random(os.environ.get("MSGD_CRASH_SEED", time.time_ns()))
        node = NodeProcess(self.mktemp(), CRASH_INI % srv.port, {"t.py": CRASH_APP})
        self.addCleanup(node.stop)
        md = srv.extra["maildir"]("alice")

        def on_server():
            return len(os.listdir(os.path.join(md, "new"))) + len(os.listdir(os.path.join(md, "cur")))

        ids = []
        interrupted = 0
        for _ in range(4):
            for _ in range(20):
                ids.append(f"<m{len(ids)}@example.org>")
                servers.deliver(srv, "alice", _with_id(ids[-1]))
            node.start()
            yield pause(rng.uniform(0.05, 0.4))
            node.signal(signal.SIGKILL)
            node.wait()
            node.stop()
            interrupted += on_server() > 0
        self.assertGreater(interrupted, 0, "the kills all came too late to interrupt anything")
        node.start()
        yield eventually(lambda: on_server() == 0, timeout=60, step=0.1)
        with open(os.path.join(node.base, "handled.log")) as f:
            handled = f.read().split()
        self.assertEqual(set(handled), set(ids))
        Logger().info("pop3 crash test: {n} mails, {again} handed again", n=len(ids),
                      again=len(handled) - len(ids))


def _with_id(message_id):
    m = EmailMessage()
    m["From"] = "bob@example.org"
    m["Subject"] = "crash"
    m["Message-ID"] = message_id
    m.set_content("x")
    return bytes(m)
