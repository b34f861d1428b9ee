"""POP3 poller: ``[interface:NAME] type=pop3``.

Every ``interval`` (and once at start) the poller opens one POP3 session
with :class:`twisted.mail.pop3.AdvancedPOP3Client` (plain TCP, STLS, or
POP3S through a ``tls:`` endpoint), logs in (USER/PASS or APOP), lists the
mailbox with UIDL and LIST, and for each message due: RETR, parse with the
``email`` package (``policy=default``), call ``handler(mail)`` with one
dict::

    {"uid": "000000017a2b...",            # the UIDL: stable across sessions
     "size": 2345,                       # octets, as LIST reported
     "message": email.message.EmailMessage,
     "raw": b"...",                      # the message as retrieved
     "mailbox": "alice@pop.example.org"}

then DELE it only after the handler succeeded, and QUIT (the server removes
DELEted messages only at QUIT; a session that dies before leaves them all:
at-least-once).  A poll takes at most ``batch`` messages, then QUITs and
polls again at once, so a crash re-delivers at most one batch.

A message whose handler fails stays on the server; its UIDL, number of tries
and reason are kept in ``[node] state_dir``/``pop3-NAME.json`` (written
crash-safely), and it is tried again after ``retry_backoff``, doubling per
try; after ``max_tries`` it joins the failed list (same file, /health), is
no longer tried and stays on the server for a person to look at.  Messages
above ``max_size`` join the failed list at once.  Entries of messages no
longer on the server are forgotten.

Connection and server errors (refused, wrong password, timeouts) are logged
and the next poll waits ``error_backoff``, doubling up to
``max_error_backoff``; they never stop the node.

Why not ClientService: a POP3 session is a unit of work that must end with
QUIT to commit deletions, so the poller opens one per poll instead of keeping
a connection alive.
"""

from __future__ import annotations

import email
import email.policy
import email.utils
import hashlib
import json
import os
import re
from dataclasses import dataclass

from twisted.internet import defer, protocol
from twisted.internet.endpoints import clientFromString
from twisted.logger import Logger
from twisted.mail.pop3 import AdvancedPOP3Client

from msgd.config import (Invalid, boolean, choice, client_endpoint, duration, integer, nonempty, option,
                         optional_duration, optional_path, size, string, target)
from msgd.interfaces.ingest import Input, atomic_write
from msgd.services import Services


@dataclass(frozen=True)
class Options:
    endpoint: str = option(parse=client_endpoint,
                           doc="the POP3 server, e.g. tcp:host=pop.example.org:port=110, or tls:...:port=995 (POP3S)")
    username: str = option(parse=nonempty, doc="mailbox login name")
    handler: str = option(parse=target, doc="app target called as handler(mail) for each message")
    password: str = option("", parse=string, doc="mailbox password")
    auth: str = option("user", parse=choice("user", "apop"), doc="user (USER/PASS) or apop (APOP digest)")
    starttls: bool = option(False, parse=boolean, doc="upgrade with STLS before logging in (certificate verified)")
    tls_ca: str | None = option(None, parse=optional_path,
                                doc="PEM CA certificate trusted for STLS instead of the system's (tls: endpoints "
                                    "take trustRoots=DIR)")
    allow_plaintext: bool = option(False, parse=boolean,
                                   doc="allow USER/PASS over an unencrypted connection (loopback test servers)")
    interval: float = option(60.0, parse=duration, doc="time between polls")
    batch: int = option(100, parse=integer(1), doc="most messages taken per session before QUIT commits deletions")
    max_size: int = option(10 * 1024 * 1024, parse=size,
                           doc="larger messages are not retrieved: they join the failed list at once")
    max_tries: int = option(5, parse=integer(1), doc="handler failures before a message joins the failed list")
    retry_backoff: float = option(60.0, parse=duration,
                                  doc="wait before a failed message is tried again; doubles per try")
    error_backoff: float = option(5.0, parse=duration,
                                  doc="wait after a connection or server error; doubles per error in a row")
    max_error_backoff: float = option(300.0, parse=duration, doc="longest wait after errors")
    server_timeout: float = option(60.0, parse=duration, doc="how long to wait for a connection or an answer")
    request_timeout: float | None = option(None, parse=optional_duration,
                                           doc="deadline of each handler call (default: [node] request_timeout)")

    def check(self):
        encrypted = self.starttls or not self.endpoint.startswith(("tcp:", "unix:"))
        if self.auth == "user" and not encrypted and not self.allow_plaintext:
            raise Invalid("USER/PASS over an unencrypted connection: use a tls: endpoint, starttls = yes, "
                          "auth = apop, or allow_plaintext = yes", "allow_plaintext")


def parse(raw: bytes):
    """(message, arrival time or None): arrival is the date of the newest
    Received header (the last hop, our server), else the Date header.  The
    ``email`` package wants ``\n`` line ends (with CRLF, text parts keep
    their ``\r``)."""
    msg = email.message_from_bytes(raw.replace(b"\r\n", b"\n"), policy=email.policy.default)
    when = None
    received = msg.get_all("received") or []
    stamp = str(received[0]).rpartition(";")[2] if received else str(msg.get("date", ""))
    try:
        when = email.utils.parsedate_to_datetime(stamp.strip()).timestamp()
    except (TypeError, ValueError, IndexError):
        pass
    return msg, when


def endpoint_host(endpoint: str) -> str:
    """The host of a client endpoint string (``tcp:host=H:port=P``,
    ``tls:H:P``...): the name a certificate must carry."""
    named = re.search(r"(?:^|:)host=([^:]+)", endpoint)
    if named:
        return named.group(1)
    fields = endpoint.split(":")
    return fields[1] if len(fields) > 2 and "=" not in fields[1] else ""


class _Client(AdvancedPOP3Client):
    """Tells when the server greeted (the APOP challenge is known then)."""

    def connectionMade(self):
        self.greeted = defer.Deferred()
        super().connectionMade()

    def serverGreeting(self, greeting):
        self.greeted.callback(greeting)

    def connectionLost(self, reason):
        if not self.greeted.called:
            self.greeted.errback(reason)
        super().connectionLost(reason)


class MailboxState:
    """Retry bookkeeping of one mailbox: ``retry`` {uid: {tries, next,
    reason}} and ``failed`` {uid: {tries, reason, at}}, kept as JSON."""

    def __init__(self, path: str):
        self.path = path
        self.retry: dict = {}
        self.failed: dict = {}

    def load(self) -> None:
        try:
            with open(self.path, "rb") as f:
                data = json.loads(f.read())
        except FileNotFoundError:
            return
        self.retry, self.failed = data.get("retry", {}), data.get("failed", {})

    def dump(self) -> bytes:
        return json.dumps({"retry": self.retry, "failed": self.failed}, indent=1, sort_keys=True).encode()

    def due(self, uid: str, now: float) -> bool:
        return uid not in self.failed and self.retry.get(uid, {}).get("next", 0) <= now

    def prune(self, present: set) -> bool:
        """Forget messages no longer on the server; True if anything went."""
        gone = [u for u in self.retry if u not in present] + [u for u in self.failed if u not in present]
        for u in gone:
            self.retry.pop(u, None)
            self.failed.pop(u, None)
        return bool(gone)


class POP3Poller(Input):
    Options = Options
    log = Logger()

    def __init__(self, name: str, options, services: Services):
        super().__init__(name, options, services)
        self.state = MailboxState(os.path.join(services.settings.state_dir, f"pop3-{name}.json"))
        self.host = endpoint_host(options.endpoint)
        self.mailbox = f"{options.username}@{self.host}"
        self.errors_in_row = 0
        self.next_delay = 0.0
        self._call = None         # the scheduled next poll
        self._session: defer.Deferred | None = None      # the Deferred of the poll running now
        self._client = None
        self._tls = None          # client TLS options for STLS

    # -- start / stop -----------------------------------------------------------------

    def startService(self):
        super().startService()
        try:
            os.makedirs(os.path.dirname(self.state.path), exist_ok=True)
            self.state.load()
            if self.options.starttls:
                self._tls = self._tls_options()
        except Exception as e:
            self.cannot_start("start", e)
            return
        self.accepting = True
        self._schedule(0)
        self.log.info("interface {interface} (pop3) polling {mailbox} every {interval}s", interface=self.name,
                      mailbox=self.mailbox, interval=self.options.interval)
        self.ready.callback(self)

    def _tls_options(self):
        from twisted.internet.ssl import Certificate, optionsForClientTLS
        trust = None
        if self.options.tls_ca:
            with open(self.options.tls_ca, "rb") as f:
                trust = Certificate.loadPEM(f.read())
        return optionsForClientTLS(self.host, trustRoot=trust)

    def stop_accepting(self):
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        return super().stop_accepting()

    def unfinished(self):
        return [self._session] if self._session is not None else []

    def stopService(self):
        """Let a running session DELE and QUIT for a moment; then drop it
        (its deletions are not committed: those mails come again)."""
        session = self._session

        def abort(_):
            if session is not None and session is self._session and self._client is not None \
                    and self._client.transport is not None:
                self._client.transport.abortConnection()
        return super().stopService().addCallback(abort)

    def describe(self) -> dict:
        return dict(super().describe(), mailbox=self.mailbox, errors_in_row=self.errors_in_row,
                    retrying=len(self.state.retry), failed=len(self.state.failed),
                    failed_uids=sorted(self.state.failed)[:20])

    # -- polling --------------------------------------------------------------------

    def _schedule(self, delay: float) -> None:
        self.next_delay = delay
        if self.accepting:
            self._call = self.services.reactor.callLater(delay, self.poll)

    def poll(self) -> defer.Deferred:
        """One session; schedules the next poll when it ends."""
        self._call = None
        self._session = d = self._run_session()
        d.addCallbacks(self._polled, self._poll_failed)
        return d

    def _polled(self, more: bool):
        self._session = None
        self.errors_in_row = 0
        self._schedule(0 if more else self.options.interval)

    def _poll_failed(self, f):
        self._session = None
        if not self.accepting:
            self.log.info("interface {interface}: session cut short by the stop ({error}); its mail comes again",
                          interface=self.name, error=_error_text(f))
            return
        self.errors_in_row += 1
        self.metrics.errors.inc()
        o = self.options
        delay = min(o.error_backoff * 2 ** (self.errors_in_row - 1), o.max_error_backoff)
        self.log.warn("interface {interface}: POP3 session with {mailbox} failed ({error}); next try in {delay}s",
                      interface=self.name, mailbox=self.mailbox, error=_error_text(f), delay=delay)
        self._schedule(delay)

    @defer.inlineCallbacks
    def _run_session(self):
        o, reactor = self.options, self.services.reactor
        endpoint = clientFromString(reactor, o.endpoint)
        client = yield endpoint.connect(protocol.Factory.forProtocol(_Client)).addTimeout(o.server_timeout, reactor)
        self._client = client
        client.callLater = reactor.callLater
        client.timeout = o.server_timeout
        client.setTimeout(o.server_timeout)      # connectionMade ran before we could set it
        client.MAX_LENGTH = max(client.MAX_LENGTH, o.max_size)
        try:
            yield client.greeted
            if o.starttls:
                yield client.startTLS(self._tls)
            yield self._login(client)
            uids = yield client.listUID()
            sizes = yield client.listSize()
            present = {u.decode() for u in uids if u is not None}
            changed = self.state.prune(present)
            taken = 0
            more = False
            for index, uid in enumerate(uids):
                if not self.accepting:
                    break
                if uid is None or not self.state.due(uid.decode(), reactor.seconds()):
                    continue
                if taken >= o.batch:
                    more = True
                    break
                taken += 1
                uid = uid.decode()
                if sizes[index] > o.max_size:
                    self._give_up(uid, f"too_large: {sizes[index]} octets, above max_size {o.max_size}", 0)
                    yield self._save()
                    continue
                ok = yield self._take(client, index, uid, sizes[index])
                if ok:
                    yield client.delete(index)
                    changed = self.state.retry.pop(uid, None) is not None or changed
                else:
                    yield self._save()   # before anything else: a crash must not forget the try
            if changed:
                yield self._save()
            yield client.quit()
            return more
        finally:
            self._client = None
            if client.transport is not None:
                client.transport.loseConnection()

    def _login(self, client) -> defer.Deferred:
        o = self.options
        user, password = o.username.encode(), o.password.encode()
        if o.auth == "apop":
            if client.serverChallenge is None:
                return defer.fail(RuntimeError("the server offers no APOP challenge; use auth = user"))
            digest = hashlib.md5(client.serverChallenge + password).hexdigest().encode()
            return client.apop(user, digest)
        return client.user(user).addCallback(lambda _: client.password(password))

    @defer.inlineCallbacks
    def _take(self, client, index: int, uid: str, octets: int):
        """RETR, parse and hand one message; True if the handler succeeded."""
        services = self.services
        lines = yield client.retrieve(index)
        raw = b"\r\n".join(lines) + b"\r\n"
        msg, arrived = yield services.run_blocking(parse, raw)
        mail = {"uid": uid, "size": octets, "message": msg, "raw": raw, "mailbox": self.mailbox}
        client.setTimeout(None)     # the server is not expected to say anything while the handler runs
        try:
            failed = yield self.call_handler(mail, None if arrived is None
                                             else max(0.0, services.reactor.seconds() - arrived))
        finally:
            client.setTimeout(self.options.server_timeout)
        if failed is not None:
            self._failed_try(uid, *failed)
        return failed is None

    def _failed_try(self, uid: str, why: str, request_id: str) -> None:
        entry = self.state.retry.setdefault(uid, {"tries": 0})
        entry["tries"] += 1
        entry["reason"] = why
        if entry["tries"] >= self.options.max_tries:
            self._give_up(uid, why, entry["tries"])
            return
        delay = self.options.retry_backoff * 2 ** (entry["tries"] - 1)
        entry["next"] = self.services.reactor.seconds() + delay
        self.log.warn("interface {interface}: message {uid} failed (try {tries} of {max_tries}), kept on the "
                      "server, retried in {delay}s: {reason}", interface=self.name, uid=uid, tries=entry["tries"],
                      max_tries=self.options.max_tries, delay=delay, reason=why, request_id=request_id)

    def _give_up(self, uid: str, why: str, tries: int) -> None:
        self.state.retry.pop(uid, None)
        self.state.failed[uid] = {"tries": tries, "reason": why, "at": self.services.reactor.seconds()}
        self.log.error("interface {interface}: message {uid} joins the failed list (kept on the server, no longer "
                       "tried): {reason}", interface=self.name, uid=uid, reason=why)

    def _save(self) -> defer.Deferred:
        return self.services.run_blocking(atomic_write, self.state.path, self.state.dump())


def _error_text(f) -> str:
    text = f.getErrorMessage()
    if isinstance(f.value, Exception) and f.value.args and isinstance(f.value.args[0], bytes):
        text = f.value.args[0].decode(errors="replace")   # ServerErrorResponse carries the server's bytes
    return f"{f.type.__name__}: {text}"
