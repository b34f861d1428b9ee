"""The node's authorization: the ``[access:*]`` rules (plain logic in
:mod:`msgd.security.rules`) with each interface's rate limit and
``anonymous`` key, as the dispatcher's ``authorize`` hook and the channel
check behind every pub/sub :class:`~msgd.core.pubsub.Session`
(``Session.check``).  A new access rule goes in :mod:`msgd.security.rules`
(``Rules.allows``); this module is where it is asked."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

from msgd.core import errors
from msgd.security.rules import Rules

log = Logger(namespace="msgd.security")


def denials(metrics):
    """``msgd_auth_denied_total``: refusals by the guards and the rules (one registration)."""
    return metrics.counter("msgd_auth_denied_total", "Refused authentications and authorizations",
                           ["interface", "reason"])


class Access:
    """The node's authorization: ``authorize(request, target)`` is the
    dispatcher's hook; ``authorize_channel(request, action, channel)`` is
    given to pub/sub Sessions.  Calls an app makes through ``api.call`` are
    not checked again (``request.meta["internal"]``)."""

    def __init__(self, metrics, sections=(), guard_of: Callable[[str], Any] | None = None):
        self.rules = Rules(sections)
        self._denied = denials(metrics)
        self.guard_of = guard_of or (lambda interface: None)   # an interface's Guard (anonymous? rate)

    def update(self, sections) -> None:
        self.rules = Rules(sections)

    def _check(self, request, action: str, name: str) -> None:
        if request.meta.get("internal"):
            return
        guard = self.guard_of(request.interface)
        if guard is not None:
            if request.principal is None:
                # where no handshake could refuse it first (a stream before rpc.login):
                # the guard refuses, counts and logs, as at a handshake
                guard.anonymous()
            guard.check_rate(request)
        if not self.rules.allows(request.interface, request.principal, action, name):
            self._denied.labels(request.interface, "rule").inc()
            log.info("denied on {interface}: {principal} may not {action} {name}", interface=request.interface,
                     principal=str(request.principal or "anonymous"), action=action, name=name[:200])
            raise errors.Unauthorized("unauthorized")

    def authorize(self, request, target: str) -> None:
        self._check(request, "call", target)

    def authorize_channel(self, request, action: str, channel: str) -> None:
        self._check(request, action, channel)

    def check_visible(self, interface: str, principal, target: str) -> None:
        """For decoders that must look a target up before the dispatcher
        runs (SOAP): refuse, as the dispatcher would, a target the caller
        may not call, before its existence shows."""
        if not self.rules.allows(interface, principal, "call", target):
            self._denied.labels(interface, "rule").inc()
            raise errors.Unauthorized("unauthorized")

    def allows(self, request, target: str) -> bool:
        """For listings (XML-RPC ``system.listMethods``): no rate, no log."""
        return self.rules.allows(request.interface, request.principal, "call", target)
