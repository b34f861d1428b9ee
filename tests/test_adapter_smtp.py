"""The SMTP adapter against Twisted's own ESMTP server, in-process: plain
sends, STARTTLS with a verified certificate and AUTH, refusals, and the
faults (down at start, stopped and started again, hung)."""

from __future__ import annotations

import datetime
import os
import email
from email.message import EmailMessage

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, protocol, reactor, ssl
from twisted.mail import smtp
from twisted.mail.imap4 import LOGINCredentials, PLAINCredentials
from twisted.trial import unittest
from zope.interface import implementer

from msgd.adapters import base

from tests import servers
from tests.helpers import breaker_opens, eventually, hung_listener, make_node


def self_signed(hostname="localhost") -> tuple[bytes, bytes]:
    """(key PEM, certificate PEM) with ``hostname`` as subjectAltName."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return (key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()),
            cert.public_bytes(serialization.Encoding.PEM))


@implementer(smtp.IMessage)
class Message:
    def __init__(self, box, user):
        self.box, self.user, self.lines = box, user, []

    def lineReceived(self, line):
        self.lines.append(line)

    def eomReceived(self):
        self.box.append((str(self.user.orig), str(self.user.dest), b"\n".join(self.lines)))
        return defer.succeed(None)

    def connectionLost(self):
        pass


@implementer(smtp.IMessageDelivery)
class Delivery:
    def __init__(self, box):
        self.box = box

    def receivedHeader(self, helo, origin, recipients):
        return b"Received: by test"

    def validateFrom(self, helo, origin):
        return origin

    def validateTo(self, user):
        if user.dest.local == b"nobody":
            raise smtp.SMTPBadRcpt(user)
        return lambda: Message(self.box, user)


@implementer(IRealm)
class Realm:
    def __init__(self, delivery):
        self.delivery = delivery

    def requestAvatar(self, avatarId, mind, *interfaces):
        return smtp.IMessageDelivery, self.delivery, lambda: None


class MailServer(protocol.ServerFactory):
    """Twisted's ESMTP server; ``tls`` offers STARTTLS, ``users`` requires
    AUTH."""

    def __init__(self, tls=None, users=None, smtps=None):
        self.box = []
        self.delivery = Delivery(self.box)
        self.tls, self.users, self.smtps = tls, users, smtps
        self.port = None
        self.number = servers.free_port()
        self.conns = []

    def buildProtocol(self, addr):
        chal = {b"LOGIN": LOGINCredentials, b"PLAIN": PLAINCredentials} if self.users else None
        p = smtp.ESMTP(chal, self.tls)
        p.factory = self
        p.host = b"test.local"
        if self.users:
            checker = InMemoryUsernamePasswordDatabaseDontUse(**self.users)
            p.portal = Portal(Realm(self.delivery), [checker])
        else:
            p.delivery = self.delivery
        self.conns.append(p)
        lost = p.connectionLost

        def connectionLost(reason):
            self.conns.remove(p)      # only connections still open are aborted at stop
            lost(reason)
        p.connectionLost = connectionLost
        return p

    def start(self):
        if self.smtps is not None:     # implicit TLS from the first byte (SMTPS, port 465 style)
            self.port = reactor.listenSSL(self.number, self, self.smtps, interface="127.0.0.1")
        else:
            self.port = reactor.listenTCP(self.number, self, interface="127.0.0.1")
        return self

    def stop(self):
        for c in self.conns:
            if c.transport is not None:
                c.transport.abortConnection()
        return self.port.stopListening()


def message(to="ann@example.org", **headers) -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "app@example.org", to, "Hello"
    for k, v in headers.items():
        msg[k] = v
    msg.set_content("Hi there.\n.leading dot\n")
    return msg


def ini(port, **extra):
    keys = dict(endpoint=f"tcp:host=127.0.0.1:port={port}", timeout="2s", retries="1", retry_backoff="10ms",
                breaker_failures="3", breaker_reset="200ms")
    keys.update(extra)
    return "[adapter:mail]\ntype = smtp\n" + "".join(f"{k} = {v}\n" for k, v in keys.items())


class SMTPTests(unittest.TestCase):
    def server(self, **kw):
        srv = MailServer(**kw).start()
        self.addCleanup(lambda: srv.port.connected and srv.stop())
        return srv

    def adapter(self, srv_port, **extra):
        return make_node(self, ini(srv_port, **extra)).adapter("mail")

    @defer.inlineCallbacks
    def test_send(self):
        srv = self.server()
        mail = self.adapter(srv.number, starttls="auto")
        accepted = yield mail.send(message(Cc="Bob <bob@example.org>", Bcc="carl@example.org"))
        self.assertEqual(sorted(accepted), ["ann@example.org", "bob@example.org", "carl@example.org"])
        self.assertEqual(sorted(to for _, to, _ in srv.box),
                         ["ann@example.org", "bob@example.org", "carl@example.org"])
        sender, _, body = srv.box[0]
        self.assertEqual(sender, "app@example.org")
        got = email.message_from_bytes(body)
        self.assertEqual(got["Subject"], "Hello")
        self.assertIsNone(got["Bcc"])                 # Bcc never reaches the headers
        self.assertIsNotNone(got["Message-ID"])
        self.assertIn(".leading dot", got.get_payload())

    @defer.inlineCallbacks
    def test_refused_recipient(self):
        srv = self.server()
        mail = self.adapter(srv.number)
        e = yield self.assertFailure(mail.send(message(to="nobody@example.org")), base.AdapterRejected)
        self.assertIn("550", e.reason)
        self.assertFalse(e.retryable)
        # one good recipient is enough; the refused one is not in the answer
        self.assertEqual((yield mail.send(message(to="ann@example.org, nobody@example.org"))), ["ann@example.org"])

    @defer.inlineCallbacks
    def test_starttls_and_auth(self):
        key, cert = self_signed()
        path = os.path.abspath(self.mktemp())
        with open(path, "wb") as f:
            f.write(cert)
        tls = ssl.PrivateCertificate.loadPEM(key + cert).options()
        srv = self.server(tls=tls, users={"app": b"pw"})
        mail = self.adapter(srv.number, starttls="required", ca_file=path, tls_hostname="localhost",
                            username="app", password="pw")
        self.assertEqual((yield mail.send(message())), ["ann@example.org"])
        self.assertEqual(len(srv.box), 1)
        bad = self.adapter(srv.number, starttls="required", ca_file=path, tls_hostname="localhost",
                           username="app", password="nope")
        yield self.assertFailure(bad.send(message()), base.AdapterRejected)
        # an unknown certificate is refused
        unverified = self.adapter(srv.number, starttls="required", tls_hostname="localhost", retries="0")
        yield self.assertFailure(unverified.send(message()), base.AdapterError)
        self.assertEqual(len(srv.box), 1)

    @defer.inlineCallbacks
    def test_smtps_verifies_like_starttls(self):
        """A tls: endpoint (SMTPS) is verified against ca_file and
        tls_hostname, like STARTTLS, and tls_verify = no turns that off."""
        key, cert = self_signed()
        path = os.path.abspath(self.mktemp())
        with open(path, "wb") as f:
            f.write(cert)
        srv = self.server(smtps=ssl.PrivateCertificate.loadPEM(key + cert).options())
        smtps = f"tls:host=127.0.0.1:port={srv.number}"
        mail = self.adapter(srv.number, endpoint=smtps, ca_file=path, tls_hostname="localhost")
        self.assertEqual((yield mail.send(message())), ["ann@example.org"])
        for refused in (dict(tls_hostname="localhost"),                  # the system's roots do not know it
                        dict(ca_file=path, tls_hostname="mail.example.org")):   # not the certificate's name
            e = yield self.assertFailure(self.adapter(srv.number, endpoint=smtps, retries="0", **refused)
                                         .send(message()), base.AdapterUnavailable)
            self.assertRegex(str(e).lower(), "certificate|mismatch")
        unverified = self.adapter(srv.number, endpoint=smtps, tls_verify="no")
        self.assertEqual((yield unverified.send(message())), ["ann@example.org"])
        self.assertEqual(len(srv.box), 2)

    @defer.inlineCallbacks
    def test_starttls_required_but_not_offered(self):
        srv = self.server()
        mail = self.adapter(srv.number, starttls="required")
        yield self.assertFailure(mail.send(message()), base.AdapterRejected)
        self.assertEqual(srv.box, [])

    @defer.inlineCallbacks
    def test_down_at_start_then_stopped_and_restarted(self):
        srv = MailServer()
        node = make_node(self, ini(srv.number, retries="0"))
        mail = node.adapter("mail")
        self.assertTrue(node.running)
        e = yield self.assertFailure(mail.send(message()), base.AdapterUnavailable)
        self.assertFalse(e.sent)
        srv.start()
        yield eventually(lambda: mail.send(message()).addCallbacks(lambda r: True, lambda f: False))
        yield srv.stop()
        seen = set()
        for _ in range(6):
            try:
                yield mail.send(message())
            except base.AdapterUnavailable as e:
                seen.add(type(e))
        self.assertIn(base.CircuitOpen, seen)
        srv.start()
        self.addCleanup(srv.stop)
        yield eventually(lambda: mail.send(message()).addCallbacks(lambda r: True, lambda f: False))
        self.assertEqual(mail.describe()["breaker"], "closed")

    @defer.inlineCallbacks
    def test_hung_server(self):
        port = hung_listener(self)
        node = make_node(self, ini(port, timeout="300ms", retries="0", pool_size="2", pool_queue="2",
                                   breaker_failures="2", breaker_reset="10s"))
        mail = node.adapter("mail")
        results = yield defer.DeferredList([mail.send(message()) for _ in range(6)], consumeErrors=True)
        kinds = {type(f.value).__name__ for ok, f in results}
        self.assertTrue(kinds <= {"AdapterTimeout", "AdapterOverloaded"}, kinds)
        self.assertEqual((mail.pool.in_use, len(mail.pool.waiters)), (0, 0))
        yield breaker_opens(self, lambda: mail.send(message()))
