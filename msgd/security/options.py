"""The security keys an interface section gains by inheriting
:class:`SecurityOptions` (see docs/security.rst); :class:`msgd.security.guard.Guard`
is built from them."""

from __future__ import annotations

from dataclasses import dataclass

from msgd.options import (
    Invalid,
    boolean,
    choice,
    duration,
    integer,
    networks,
    option,
    optional_path,
    string,
)


@dataclass(frozen=True, kw_only=True)
class SecurityOptions:
    auth: str = option("none", parse=choice("none", "password", "ldap"),
                       doc="how logins are checked: none, password (auth_file) or ldap (auth_adapter)")
    auth_file: str | None = option(None, parse=optional_path,
                                   doc="password file (user:bcrypt-hash[:roles] lines; see msgd passwd)")
    auth_adapter: str = option("", parse=string, doc="name of the [adapter:NAME] type = ldap used by auth = ldap")
    anonymous: bool = option(True, parse=boolean, doc="allow callers without credentials (rules still apply)")
    token_secret: str = option("", parse=string,
                               doc="HMAC key of signed tokens, at least 16 characters; share it between "
                                   "interfaces and nodes that accept each other's tokens "
                                   "(empty: random per start)")
    token_ttl: float = option(3600.0, parse=duration, doc="lifetime of tokens issued here")
    max_connections: int = option(0, parse=integer(0), doc="most open connections (0: no limit)")
    max_connections_per_address: int = option(0, parse=integer(0),
                                               doc="most open connections from one client address (0: no limit)")
    rate: int = option(0, parse=integer(0),
                         doc="calls per second allowed per principal (anonymous callers share one; 0: no limit)")
    rate_burst: int = option(0, parse=integer(0), doc="calls allowed at once above the rate (default: rate)")
    login_attempts: int = option(5, parse=integer(0),
                                 doc="failed logins per client address or user within login_window "
                                     "before further logins are refused (0: no throttling)")
    login_window: float = option(60.0, parse=duration, doc="window of login_attempts")
    cert_principal: bool = option(False, parse=boolean,
                                  doc="a client certificate verified by an mtls: endpoint names the principal "
                                      "(its CN) when no other credentials are given (HTTP, WebSocket)")
    trusted_proxies: tuple = option((), parse=networks,
                                    doc="addresses/networks of reverse proxies and load balancers whose word on "
                                        "the client's address is believed (HTTP: forwarded_header; "
                                        "proxy_protocol); nobody else's is")
    proxy_protocol: bool = option(False, parse=boolean,
                                  doc="every connection starts with a PROXY protocol v1/v2 header, accepted from "
                                      "trusted_proxies only (HAProxy send-proxy, nginx stream proxy_protocol)")

    def check(self):
        if self.auth == "password" and not self.auth_file:
            raise Invalid("auth = password needs auth_file", "auth_file")
        if self.auth == "ldap" and not self.auth_adapter:
            raise Invalid("auth = ldap needs auth_adapter", "auth_adapter")
        if self.token_secret and len(self.token_secret.encode()) < 16:
            raise Invalid("must be at least 16 characters", "token_secret")
        if self.proxy_protocol and not self.trusted_proxies:
            raise Invalid("proxy_protocol needs trusted_proxies (the proxies allowed to send the header)",
                          "trusted_proxies")
        if self.proxy_protocol and getattr(self, "endpoint", "").partition(":")[0] in ("ssl", "mtls"):
            # the PROXY header comes before any TLS handshake, and Twisted's TLS endpoints read TLS first
            raise Invalid("proxy_protocol needs a plain endpoint (tcp:, unix:, systemd:): terminate TLS at "
                          "the proxy", "proxy_protocol")
