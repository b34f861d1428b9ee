"""Authorization rules: ``[access:NAME]`` sections of node.ini.

::

    [access:public]
    interfaces = web ws-public        # interface names or patterns (default *)
    principals = *                    # * anyone (anonymous too), @authenticated,
                                      # a user name, or @ROLE
    call = catalog.* orders.status    # target patterns
    subscribe = news.* chat.*         # channel patterns
    publish = chat.*

A node without any ``[access:*]`` section allows everything (as it did
before rules existed).  With at least one, everything is refused unless some
rule allows it: the principal matches ``principals``, the interface matches
``interfaces`` and the target or channel matches the action's patterns.

A pattern *subscription* (``news.*``) is allowed only when it cannot reach a
channel outside an allowed pattern: it equals an allowed pattern, or an
allowed ``PREFIX*`` covers its literal prefix.

The keys of a section are declared in :class:`msgd.config.AccessConfig`
(with the node's other sections); this module imports nothing of msgd.
"""

from __future__ import annotations

import fnmatch


def _literal_prefix(name: str) -> str:
    for i, c in enumerate(name):
        if c in "*?[":
            return name[:i]
    return name


def covers(allowed: str, name: str) -> bool:
    """Does the allowed pattern cover every channel/target ``name`` can mean?"""
    if _literal_prefix(name) == name:               # a plain name
        return fnmatch.fnmatchcase(name, allowed)
    if allowed == name:
        return True
    if allowed.endswith("*") and _literal_prefix(allowed) == allowed[:-1]:
        return _literal_prefix(name).startswith(allowed[:-1])
    return False


def principal_matches(patterns: tuple, principal) -> bool:
    for p in patterns:
        if p == "*":
            return True
        if principal is None:
            continue
        if p == "@authenticated":
            return True
        if p.startswith("@"):
            if p[1:] in getattr(principal, "roles", ()):
                return True
        elif p == getattr(principal, "name", principal):     # a Principal, or a plain name (PB logins)
            return True
    return False


class Rules:
    """The ``[access:*]`` sections, checked in order."""

    def __init__(self, sections=()):
        self.sections = tuple(sections)     # ((name, AccessConfig), ...)

    @property
    def enabled(self) -> bool:
        return bool(self.sections)

    def allows(self, interface: str, principal, action: str, name: str) -> bool:
        if not self.sections:
            return True
        for _rule, r in self.sections:
            if (principal_matches(r.principals, principal)
                    and any(fnmatch.fnmatchcase(interface, i) for i in r.interfaces)
                    and any(covers(a, name) for a in getattr(r, action))):
                return True
        return False
