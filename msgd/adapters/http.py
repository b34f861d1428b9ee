"""``type = http``: an HTTP(S) service through treq, under the adapter rules.

::

    api_ = api.adapter("billing")
    invoice = await api_.get_json("/invoices/{}", number)            # path values are URL-quoted
    created = await api_.post_json("/invoices", {"amount": 10})
    r = await api_.request("DELETE", "/invoices/7", headers={"If-Match": etag})   # r.code, r.headers, r.body

Paths are joined to ``base_url``; ``{}`` placeholders in a path are filled
with URL-quoted values, so a value cannot change the path.  ``headers`` are
sent with every request.  TLS certificates are verified (against the
system's roots, or ``ca_file``) unless ``tls_verify = no``.

The JSON helpers fail on any status outside 2xx: 5xx, 408 and 429 as
:class:`AdapterUnavailable` (retryable), other 4xx as
:class:`AdapterRejected`; ``request`` returns every response as it came.
GET, HEAD and OPTIONS are retried when safe; other methods only when the
connection could not be made.  Bodies are read within the deadline and
bounded by ``max_body``.

Connections are kept alive in a treq/Agent pool of ``pool_size`` per host,
closed after ``pool_idle``.
"""

from __future__ import annotations

import json as jsonlib
from dataclasses import dataclass
from urllib.parse import quote, urljoin, urlsplit

import treq
from treq.client import HTTPClient
from twisted.internet import defer, ssl
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool, ResponseFailed
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from msgd.adapters.base import Adapter, AdapterOptions, AdapterRejected, AdapterUnavailable
from msgd.config import Invalid, boolean, option, optional_path, size, string
from msgd.security.tls import client_tls, trust_root
from msgd.services import Services

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _base_url(value: str, ctx=None) -> str:
    v = value.strip()
    u = urlsplit(v)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise Invalid(f"{v!r} is not an http:// or https:// URL")
    return v if v.endswith("/") else v + "/"


def _headers(value: str, ctx=None) -> tuple:
    """``Name: value`` pairs, one a line (or separated by ``;``)."""
    out = []
    for line in value.replace(";", "\n").splitlines():
        if not line.strip():
            continue
        name, sep, val = line.partition(":")
        if not sep or not name.strip():
            raise Invalid(f"{line.strip()!r} is not 'Name: value'")
        out.append((name.strip(), val.strip()))
    return tuple(out)


@implementer(IPolicyForHTTPS)
class _NoVerify:
    def creatorForNetloc(self, hostname, port):
        return ssl.CertificateOptions()


@implementer(IPolicyForHTTPS)
class _TrustRoot:
    def __init__(self, trust):
        self.trust = trust

    def creatorForNetloc(self, hostname, port):
        return client_tls(hostname.decode("ascii"), self.trust)


class _Pool(HTTPConnectionPool):
    """Closes, instead of keeping, connections that finish their response
    after the adapter stopped (they would outlive it)."""

    closed = False

    def _putConnection(self, key, connection):
        if self.closed:
            connection.transport.loseConnection()
        else:
            super()._putConnection(key, connection)


class Response:
    """What came back: ``code``, ``headers`` (lower-case names → last
    value), ``body`` (bytes); :meth:`json` decodes the body."""

    __slots__ = ("code", "headers", "body")

    def __init__(self, code: int, headers: dict, body: bytes):
        self.code, self.headers, self.body = code, headers, body

    def json(self):
        return jsonlib.loads(self.body) if self.body else None

    def __repr__(self):
        return f"Response({self.code}, {len(self.body)} bytes)"


class HTTPAdapter(Adapter):
    @dataclass(frozen=True, kw_only=True)
    class Options(AdapterOptions):
        base_url: str = option(parse=_base_url, doc="URL that request paths are joined to")
        headers: tuple = option((), parse=_headers,
                               doc="headers sent with every request: 'Name: value' lines (or ; separated)")
        tls_verify: bool = option(True, parse=boolean, doc="verify server certificates")
        ca_file: str | None = option(None, parse=optional_path, doc="CA certificates (PEM) to verify against")
        max_body: int = option(10 * 1024 * 1024, parse=size, doc="largest response body read")
        user_agent: str = option("msgd", parse=string, doc="User-Agent header")

    def __init__(self, name, options, services: Services):
        super().__init__(name, options, services)
        self.http_pool = _Pool(self.reactor, persistent=True)
        self.http_pool.maxPersistentPerHost = options.pool_size
        self.http_pool.cachedConnectionTimeout = options.pool_idle
        self.http_pool.retryAutomatically = False   # the adapter decides what is safe to retry
        if not options.tls_verify:
            policy: IPolicyForHTTPS = _NoVerify()
        elif options.ca_file:
            policy = _TrustRoot(trust_root(options.ca_file))
        else:
            policy = BrowserLikePolicyForHTTPS()
        self.client = HTTPClient(Agent(self.reactor, contextFactory=policy, pool=self.http_pool))

    def startService(self):
        self.http_pool.closed = False
        super().startService()

    def stopService(self):
        super().stopService()
        self.http_pool.closed = True
        return self.http_pool.closeCachedConnections()

    def classify(self, e):
        if isinstance(e, ResponseFailed):
            return AdapterUnavailable(self.name, f"http: response failed: "
                                      f"{', '.join(r.getErrorMessage() for r in e.reasons)}", retryable=True)
        return super().classify(e)

    def url(self, path: str, *values) -> str:
        """``path`` (``{}`` filled with URL-quoted ``values``) joined to
        ``base_url``."""
        if values:
            path = path.format(*(quote(str(v), safe="") for v in values))
        return urljoin(self.options.base_url, path.lstrip("/"))

    def request(self, method: str, path: str, *values, params=None, headers=None, json=None,
                data: bytes | None = None, expect_2xx: bool = False) -> defer.Deferred:
        """Any request; fires with a :class:`Response` whatever its status,
        unless ``expect_2xx``: then another status fails the call (and, when
        it says the service is in trouble, counts for retry and breaker)."""
        method = method.upper()
        url = self.url(path, *values)
        hdrs = {"User-Agent": self.options.user_agent, **dict(self.options.headers), **(headers or {})}

        @defer.inlineCallbacks
        def run(conn):
            kw = {"params": params, "headers": hdrs}
            if json is not None:
                kw["json"] = json
            elif data is not None:
                kw["data"] = data
            r = yield self.client.request(method, url, **kw)
            length = r.length if isinstance(r.length, int) else None
            if length is not None and length > self.options.max_body:
                r.original.deliverBody(_Discard())
                raise AdapterRejected(self.name, f"{method} {url}: body of {length} bytes exceeds max_body")
            body = yield treq.content(r)
            if len(body) > self.options.max_body:
                raise AdapterRejected(self.name, f"{method} {url}: body exceeds max_body")
            if expect_2xx and not 200 <= r.code < 300:
                text = f"{method} {url}: HTTP {r.code} {body[:200].decode('utf-8', 'replace')}".strip()
                if r.code >= 500 or r.code in (408, 429):
                    raise AdapterUnavailable(self.name, text, retryable=True)
                raise AdapterRejected(self.name, text)
            headers_ = {k.decode("latin-1").lower(): v[-1].decode("latin-1")
                        for k, v in r.headers.getAllRawHeaders()}
            return Response(r.code, headers_, body)
        return self.call(method.lower(), run, safe=method in SAFE_METHODS)

    @defer.inlineCallbacks
    def _json(self, method: str, path: str, values, **kw):
        r = yield self.request(method, path, *values, headers={"Accept": "application/json"},
                               expect_2xx=True, **kw)
        try:
            return r.json()
        except ValueError:
            raise AdapterRejected(self.name, f"{method} {path}: answer is not JSON") from None

    def get_json(self, path: str, *values, params=None):
        return self._json("GET", path, values, params=params)

    def post_json(self, path: str, body, *values):
        return self._json("POST", path, values, json=body)

    def put_json(self, path: str, body, *values):
        return self._json("PUT", path, values, json=body)

    def delete_json(self, path: str, *values):
        return self._json("DELETE", path, values)


class _Discard:
    def makeConnection(self, transport):
        transport.stopProducing()

    def dataReceived(self, data):
        pass

    def connectionLost(self, reason):
        pass
