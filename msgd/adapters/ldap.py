"""``type = ldap``: an LDAP directory through ldap3, under the adapter rules.

::

    ldap = api.adapter("directory")
    people = await ldap.search("(&(objectClass=person)(cn={}))", name, attributes=["cn", "mail"])
    entry = await ldap.get(ldap_dn("uid={},ou=people,dc=example,dc=org", uid))   # or None
    await ldap.modify(entry["dn"], {"mail": "new@example.org", "description": None})  # None deletes
    user = await ldap.authenticate("ann", password)   # entry with "roles", or None

Filters are templates: every ``{}`` (or ``{name}``) is replaced by a value
escaped with RFC 4515 rules (``*``, ``(``, ``)``, ``\\``, NUL), so a value
can never change the filter's structure; :func:`ldap_dn` does the same for
DN values (RFC 4514).  Write a literal brace as ``{{`` / ``}}``.

ldap3 is blocking: every operation, connecting included, runs in the
adapter's own thread pool, sized to its connection pool (``pool_size``).
Each thread uses the connection it leased, so no ldap3 connection is ever
shared between threads.  ``timeout`` also bounds ldap3's own connect and
receive timeouts, so a thread stuck on a hung server is freed.

Entries are ``{"dn": str, "attributes": {name: [values…]}}`` (values are
str; binary values that are not UTF-8 stay bytes).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import ldap3
from twisted.internet import defer
from ldap3.core import exceptions as lx
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import escape_rdn

from msgd.adapters.base import Adapter, AdapterOptions, AdapterRejected, AdapterUnavailable
from msgd.config import Invalid, boolean, nonempty, option, optional_path, string
from msgd.services import Services

SCOPES = {"base": ldap3.BASE, "one": ldap3.LEVEL, "sub": ldap3.SUBTREE}
# result codes that mean "the server cannot serve now", not "bad request"
_UNAVAILABLE_RESULTS = {51, 52, 53, 80}   # busy, unavailable, unwillingToPerform, other


def ldap_filter(template: str, *values: Any, **named: Any) -> str:
    """``template`` with each ``{}``/``{name}`` replaced by its escaped value."""
    return template.format(*(escape_filter_chars(str(v)) for v in values),
                           **{k: escape_filter_chars(str(v)) for k, v in named.items()})


def ldap_dn(template: str, *values: Any, **named: Any) -> str:
    """A DN from ``template`` with escaped attribute values."""
    return template.format(*(escape_rdn(str(v)) for v in values),
                           **{k: escape_rdn(str(v)) for k, v in named.items()})


def _url(value: str, ctx=None) -> str:
    v = value.strip()
    u = urlsplit(v)
    if u.scheme not in ("ldap", "ldaps") or not u.hostname:
        raise Invalid(f"{v!r} is not an LDAP URL (ldap://host:389 or ldaps://host:636)")
    return v


def _value(v):
    if isinstance(v, bytes):
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError:
            return v
    return v


def _entry(item: dict) -> dict:
    attrs = {}
    for k, v in (item.get("raw_attributes") or {}).items():
        attrs[k] = [_value(x) for x in (v if isinstance(v, list) else [v])]
    return {"dn": item["dn"], "attributes": attrs}


class _Tls(ldap3.Tls):
    """ldap3's Tls with the server's name checked by Python's ssl during the
    handshake (and sent as SNI).  ldap3 2.9 checks it after the handshake
    with ssl.match_hostname, which warns on Python 3.11 and is gone from
    3.12, where ldap3 falls back to a copy that ignores IP addresses in the
    certificate (so ``ldaps://10.0.0.5`` never verified).  The original
    error of a failed handshake is kept on the connection (``tls_error``):
    ldap3 re-raises it as text only, once per address it tried."""

    def wrap_socket(self, connection, do_handshake=False):
        context = ssl.create_default_context(cafile=self.ca_certs_file)
        if self.validate == ssl.CERT_NONE:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        try:
            connection.socket = context.wrap_socket(connection.socket, server_hostname=connection.server.host,
                                                    do_handshake_on_connect=do_handshake)
        except Exception as e:
            connection.tls_error = e
            raise


class _TLSFailed(Exception):
    """The TLS handshake (LDAPS or StartTLS) failed; ``certificate``: the
    server's certificate was not accepted."""

    def __init__(self, text: str, certificate: bool):
        super().__init__(text)
        self.certificate = certificate


class LDAPAdapter(Adapter):
    threaded = True

    @dataclass(frozen=True, kw_only=True)
    class Options(AdapterOptions):
        url: str = option("ldap://127.0.0.1:389", parse=_url, doc="ldap://host:port, or ldaps:// for LDAPS")
        bind_dn: str = option("", parse=string, doc="DN the adapter binds as (empty: anonymous)")
        password: str = option("", parse=string, doc="password of bind_dn")
        base: str = option(parse=nonempty, doc="default search base, e.g. dc=example,dc=org")
        start_tls: bool = option(False, parse=boolean, doc="upgrade ldap:// connections with StartTLS")
        tls_verify: bool = option(True, parse=boolean, doc="verify the server certificate (LDAPS, StartTLS)")
        ca_file: str | None = option(None, parse=optional_path, doc="CA certificates (PEM) to verify against")
        user_base: str = option("", parse=string, doc="where authenticate() looks for users (default: base)")
        user_filter: str = option("(uid={user})", parse=nonempty,
                                  doc="filter finding a user for authenticate(); {user} is escaped")
        group_base: str = option("", parse=string, doc="where roles() looks for groups (default: base)")
        group_filter: str = option("(|(member={dn})(uniqueMember={dn})(memberUid={user}))", parse=nonempty,
                                   doc="filter finding a user's groups; {dn} and {user} are escaped")
        group_attribute: str = option("cn", parse=nonempty, doc="attribute of a group that names the role")

        def check(self):
            if self.start_tls and self.url.startswith("ldaps:"):
                raise Invalid("start_tls is for ldap:// URLs; ldaps:// is TLS already", "start_tls")

    def __init__(self, name, options, services: Services):
        super().__init__(name, options, services)
        u = urlsplit(options.url)
        tls = None
        if u.scheme == "ldaps" or options.start_tls:
            tls = _Tls(validate=ssl.CERT_REQUIRED if options.tls_verify else ssl.CERT_NONE,
                       ca_certs_file=options.ca_file)
            if not options.tls_verify:
                self.log.warn("adapter {adapter}: tls_verify = no: the LDAP server's certificate is not checked",
                              adapter=name)
        self._server_args = dict(host=u.hostname, port=u.port or (636 if u.scheme == "ldaps" else 389),
                                 use_ssl=u.scheme == "ldaps", tls=tls, get_info=ldap3.NONE,
                                 connect_timeout=max(1, round(options.timeout)))   # ldap3 wants ints

    # -- connections (in threads) -----------------------------------------------

    def _server(self) -> ldap3.Server:
        """A new ldap3 Server for each connection: a Server remembers which
        of its addresses failed and skips them for 5 seconds ("invalid server
        address", hiding the real error and a server that is back), and its
        current address is state no two threads should share."""
        return ldap3.Server(**self._server_args)

    def _open(self, user: str | None, password: str | None) -> ldap3.Connection:
        conn = ldap3.Connection(self._server(), user=user or None, password=password or None,
                                receive_timeout=max(1, round(self.options.timeout)), raise_exceptions=True,
                                client_strategy=ldap3.SYNC, auto_referrals=False)
        try:
            conn.open()
            if self.options.start_tls:
                conn.start_tls()
            conn.bind()
        except BaseException as e:
            _quietly(conn.unbind)   # an error here must not hide the first one
            tls_error = getattr(conn, "tls_error", None)
            if tls_error is not None and isinstance(e, Exception):
                raise self._tls_failed(tls_error) from e
            raise
        return conn

    def _tls_failed(self, e: Exception) -> _TLSFailed:
        s = self._server_args
        where = f"TLS ({'StartTLS' if self.options.start_tls else 'LDAPS'}) with {s['host']}:{s['port']}"
        if isinstance(e, ssl.SSLCertVerificationError):
            trusted = f"CAs of ca_file {self.options.ca_file}" if self.options.ca_file else \
                "the system's CAs; a private CA needs ca_file"
            return _TLSFailed(f"{where}: server certificate not accepted: {e.verify_message or e} ({trusted})",
                              certificate=True)
        return _TLSFailed(f"{where}: handshake failed: {e}", certificate=False)

    def connect(self):
        return self.in_thread(None, self._open, self.options.bind_dn, self.options.password)

    def disconnect(self, conn):
        self.threads.callInThread(_quietly, conn.unbind)

    def classify(self, e):
        if isinstance(e, _TLSFailed):
            # a certificate that is not accepted now will not be on a retry
            return AdapterUnavailable(self.name, f"ldap: {e}", retryable=not e.certificate)
        if isinstance(e, (lx.LDAPCommunicationError, lx.LDAPSocketOpenError, lx.LDAPResponseTimeoutError,
                          lx.LDAPStartTLSError, lx.LDAPSessionTerminatedByServerError)):
            return AdapterUnavailable(self.name, f"ldap: {e}", retryable=True)
        if isinstance(e, lx.LDAPOperationResult):
            if e.result in _UNAVAILABLE_RESULTS:
                return AdapterUnavailable(self.name, f"ldap: {e.description}: {e.message}", retryable=True)
            return AdapterRejected(self.name, f"ldap: {e.description}" + (f": {e.message}" if e.message else ""))
        if isinstance(e, lx.LDAPException):
            return AdapterRejected(self.name, f"ldap: {e}")
        return super().classify(e)

    def _op(self, op: str, fn, *args, safe: bool = False):
        """Run ``fn(conn, *args)`` in a thread with a pooled connection."""
        return self.call(op, lambda lease: self.in_thread(lease, fn, lease.conn, *args), safe=safe, lease_fn=True)

    # -- API ---------------------------------------------------------------------

    def search(self, filter: str, *values, base: str | None = None, scope: str = "sub",
               attributes=ldap3.ALL_ATTRIBUTES, size_limit: int = 0, **named):
        """Entries matching ``filter`` (a template; ``values``/``named``
        are escaped into it)."""
        flt = ldap_filter(filter, *values, **named)
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}")
        return self._op("search", _search, base or self.options.base, flt, SCOPES[scope], attributes,
                        size_limit, safe=True)

    def get(self, dn: str, attributes=ldap3.ALL_ATTRIBUTES):
        """The entry at ``dn``, or None."""
        def get(conn):
            try:
                found = _search(conn, dn, "(objectClass=*)", ldap3.BASE, attributes, 1)
            except lx.LDAPNoSuchObjectResult:
                return None
            return found[0] if found else None
        return self._op("get", get, safe=True)

    def add(self, dn: str, object_class, attributes: dict | None = None):
        return self._op("add", lambda conn: conn.add(dn, object_class, attributes or {}))

    def modify(self, dn: str, changes: dict):
        """Replace each attribute with the given value(s); None deletes it."""
        spec: dict[str, list] = {k: [(ldap3.MODIFY_DELETE, [])] if v is None
                                 else [(ldap3.MODIFY_REPLACE, v if isinstance(v, (list, tuple)) else [v])]
                                 for k, v in changes.items()}
        return self._op("modify", lambda conn: conn.modify(dn, spec))

    def delete(self, dn: str):
        return self._op("delete", lambda conn: conn.delete(dn))

    def compare(self, dn: str, attribute: str, value) -> Any:
        """True when ``dn`` has ``attribute`` = ``value``."""
        def compare(conn):
            try:
                return conn.compare(dn, attribute, value)
            except lx.LDAPCompareFalseResult:
                return False
        return self._op("compare", compare, safe=True)

    def authenticate(self, user: str, password: str):
        """Search-then-bind: find ``user`` with ``user_filter``, bind as
        that entry with ``password`` on a fresh connection.  The entry, with
        ``roles`` (see :meth:`roles`), or None when the user is unknown,
        ambiguous or the password is wrong.  An empty password is refused
        without asking the server (LDAP would take it as an anonymous bind)."""
        if not user or not password:
            return defer.succeed(None)
        return self._op("authenticate", self._authenticate, user, password)

    def roles(self, dn: str, user: str = ""):
        """Names (``group_attribute``) of the groups ``dn`` belongs to."""
        return self._op("roles", self._roles, dn, user, safe=True)

    # -- in threads ------------------------------------------------------------------

    def _authenticate(self, conn, user: str, password: str):
        o = self.options
        found = _search(conn, o.user_base or o.base, ldap_filter(o.user_filter, user=user), ldap3.SUBTREE,
                        ldap3.ALL_ATTRIBUTES, 2)
        if len(found) != 1:
            return None
        entry = found[0]
        try:
            self._open(entry["dn"], password).unbind()
        except lx.LDAPInvalidCredentialsResult:
            return None
        except lx.LDAPBindError:
            return None
        entry["roles"] = self._roles(conn, entry["dn"], user)
        return entry

    def _roles(self, conn, dn: str, user: str):
        o = self.options
        groups = _search(conn, o.group_base or o.base, ldap_filter(o.group_filter, dn=dn, user=user),
                         ldap3.SUBTREE, [o.group_attribute], 0)
        return sorted({v for g in groups for v in g["attributes"].get(o.group_attribute, [])})


def _search(conn, base, flt, scope, attributes, size_limit):
    try:
        conn.search(base, flt, search_scope=scope, attributes=attributes, size_limit=size_limit)
    except lx.LDAPSizeLimitExceededResult:
        pass   # what came back is what was asked for
    return [_entry(r) for r in conn.response or () if r.get("type") == "searchResEntry"]


def _quietly(fn):
    try:
        fn()
    except Exception:
        pass   # closing a connection that is already gone


__all__ = ["LDAPAdapter", "ldap_filter", "ldap_dn"]
