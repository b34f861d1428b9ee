"""``type = smtp``: send mail through an SMTP server with twisted.mail.

::

    from email.message import EmailMessage
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "app@example.org", "ann@example.org", "Hello"
    msg.set_content("…")
    accepted = await api.adapter("mail").send(msg)     # ["ann@example.org"]

``send`` fires once the server accepted the message for at least one
recipient, with the list of accepted recipients; recipients come from To,
Cc and Bcc (Bcc is removed from what is sent) unless given.  A message the
server refused (5xx) fails with :class:`AdapterRejected`, a temporary
refusal (4xx) or a connection problem with :class:`AdapterUnavailable`.
A send is retried only when it could not connect: a repeated DATA could
deliver the mail twice.

TLS: ``starttls = auto`` upgrades when the server offers it, ``required``
refuses to send in clear, ``off`` never upgrades; for SMTPS use a ``tls:``
endpoint (``tls:host=smtp.example.org:port=465``).  Certificates are verified
(against ``ca_file``, else the system's roots; the name is ``tls_hostname``,
else the endpoint's host) unless ``tls_verify = no``, for STARTTLS and SMTPS
alike.  ``username``/``password`` turn on AUTH (then
only over TLS unless ``starttls = off``).

There is no connection pool: each message is one connection; ``pool_size``
bounds how many are sent at once.
"""

from __future__ import annotations

import email.utils
import io
from dataclasses import dataclass
from email.message import EmailMessage, Message

from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, clientFromString, wrapClientTLS
from twisted.mail import smtp

from msgd.adapters.base import Adapter, AdapterOptions, AdapterRejected, AdapterUnavailable
from msgd.config import boolean, choice, client_endpoint, option, optional_path, string
from msgd.security.tls import client_tls, trust_root
from msgd.services import Services


class _Sender(smtp.ESMTPSender):
    """Reports a connection lost mid-send to its factory (endpoints do not
    call ``clientConnectionLost``), and honours ``starttls``/SMTPS."""

    def connectionMade(self):
        adapter = self.factory.adapter
        if adapter.options.starttls == "off":
            self.context = None
        if adapter.implicit_tls:
            self._tlsMode = True
        super().connectionMade()

    def connectionLost(self, reason):
        super().connectionLost(reason)
        result = getattr(self.factory, "result", None)   # gone once it fired
        if not self.factory.sendFinished and result is not None and not result.called:
            self.factory.sendFinished = True
            self.factory.result.errback(smtp.SMTPConnectError(-1, f"connection lost: {reason.getErrorMessage()}"))


def _fields(description: str) -> tuple[str, list, dict]:
    """(kind, positional, keyword) arguments of a Twisted endpoint string
    (``\\`` escapes a colon, as in Twisted's own parser)."""
    parts, cur, escaped = [], [], False
    for ch in description:
        if escaped:
            cur.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    kw = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    return parts[0], [p for p in parts[1:] if "=" not in p], kw


class _Factory(smtp.ESMTPSenderFactory):
    protocol = _Sender
    adapter: "SMTPAdapter"


class SMTPAdapter(Adapter):
    @dataclass(frozen=True, kw_only=True)
    class Options(AdapterOptions):
        endpoint: str = option("tcp:host=127.0.0.1:port=25", parse=client_endpoint,
                               doc="the server; a tls: endpoint for SMTPS")
        starttls: str = option("auto", parse=choice("auto", "required", "off"),
                               doc="auto: upgrade when offered; required: never send in clear; off: never")
        tls_verify: bool = option(True, parse=boolean, doc="verify the server certificate")
        tls_hostname: str = option("", parse=string, doc="name the certificate must match (default: host=)")
        ca_file: str | None = option(None, parse=optional_path, doc="CA certificates (PEM) to verify against")
        username: str = option("", parse=string, doc="AUTH user (empty: no AUTH)")
        password: str = option("", parse=string, doc="AUTH password")
        sender: str = option("", parse=string, doc="envelope sender when the message has no From")

    def __init__(self, name, options, services: Services):
        super().__init__(name, options, services)
        kind, args, kw = _fields(options.endpoint)
        host = kw.get("host") or (args[0] if args else "localhost")
        self.hostname = options.tls_hostname or host
        self.trust = trust_root(options.ca_file)
        self.implicit_tls = kind in ("tls", "ssl")
        if self.implicit_tls:
            # SMTPS: TLS is layered here, on a plain connection to the same place, so that
            # ca_file and tls_verify apply (Twisted's own tls:/ssl: would ignore them)
            port = int(kw.get("port") or (args[1] if len(args) > 1 else 465))
            bind = kw.get("bindAddress")
            self.smtps = HostnameEndpoint(self.reactor, host, port, timeout=float(kw.get("timeout", 30)),
                                          bindAddress=(bind, 0) if bind else None)

    def _tls(self):
        return client_tls(self.hostname, self.trust, self.options.tls_verify)

    def classify(self, e):
        if isinstance(e, smtp.SMTPDeliveryError) or (isinstance(e, smtp.SMTPClientError)
                                                      and not isinstance(e, smtp.SMTPConnectError)):
            code = getattr(e, "code", -1)
            text = f"smtp {code}: {_decode(getattr(e, 'resp', b''))}"
            if 400 <= code < 500:
                return AdapterUnavailable(self.name, text, retryable=True)
            if code >= 500 or isinstance(e, (smtp.AUTHDeclinedError, smtp.TLSRequiredError)):
                return AdapterRejected(self.name, text)
            return AdapterUnavailable(self.name, f"smtp: {e}", retryable=True)
        if isinstance(e, smtp.SMTPConnectError):
            return AdapterUnavailable(self.name, f"smtp: {_decode(e.resp)}", retryable=True,
                                      sent=False if e.code == -2 else True)
        return super().classify(e)

    def send(self, message: Message, recipients=None, sender: str | None = None) -> defer.Deferred:
        """Send ``message`` (an :mod:`email` message); fires with the
        recipients the server accepted."""
        if not isinstance(message, Message):
            raise TypeError("message must be an email.message.Message (e.g. EmailMessage)")
        if recipients is None:
            recipients = [addr for _, addr in email.utils.getaddresses(
                message.get_all("To", []) + message.get_all("Cc", []) + message.get_all("Bcc", [])) if addr]
        if isinstance(recipients, str):
            recipients = [recipients]
        if not recipients:
            raise ValueError("message has no recipients")
        sender = sender or email.utils.parseaddr(message.get("From", ""))[1] or self.options.sender
        if not sender:
            raise ValueError("no sender: set From, pass sender=, or configure sender")
        if "Bcc" in message:
            message = _copy(message)
            del message["Bcc"]
        if "Date" not in message or "Message-ID" not in message:
            message = _copy(message)
            if "Date" not in message:
                message["Date"] = email.utils.formatdate(localtime=True)
            if "Message-ID" not in message:
                message["Message-ID"] = email.utils.make_msgid()
        data = message.as_bytes()
        return self.call("send", lambda conn: self._send(sender, list(recipients), data))

    @defer.inlineCallbacks
    def _send(self, sender: str, recipients: list, data: bytes):
        o = self.options
        result: defer.Deferred = defer.Deferred()
        factory = _Factory(o.username.encode() or None, o.password.encode() or None, sender, recipients,
                           io.BytesIO(data), result, retries=0, timeout=None,
                           contextFactory=None if o.starttls == "off" else self._tls(),
                           heloFallback=not o.username and o.starttls != "required",
                           requireAuthentication=bool(o.username),
                           requireTransportSecurity=o.starttls == "required" or (
                               bool(o.username) and o.starttls != "off"),
                           hostname=self.hostname)
        factory.adapter = self
        try:
            endpoint = (wrapClientTLS(self._tls(), self.smtps) if self.implicit_tls
                        else clientFromString(self.reactor, o.endpoint))
            proto = yield endpoint.connect(factory)
        except Exception as e:
            raise smtp.SMTPConnectError(-2, f"cannot connect: {e}") from e   # nothing was sent
        try:
            count, addresses = yield result
        except defer.CancelledError:
            if proto.transport is not None:
                proto.transport.abortConnection()
            raise
        return [_decode(a) for a, code, _ in addresses if 200 <= code < 300] if addresses else recipients[:count]


def _copy(message: Message) -> Message:
    from email import message_from_bytes, policy
    return message_from_bytes(message.as_bytes(), policy=getattr(message, "policy", policy.default),
                              _class=EmailMessage if isinstance(message, EmailMessage) else Message)


def _decode(v) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
