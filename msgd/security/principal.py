"""Who is calling: the one object every interface hands to the core."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Principal:
    """An authenticated caller.  ``via`` says how it proved who it is
    (``password``, ``ldap``, ``token``, ``certificate``); ``roles`` come from
    the password file, LDAP groups or the token.  ``None`` stands for an
    anonymous caller everywhere."""

    name: str
    roles: frozenset = frozenset()
    via: str = ""

    def __str__(self) -> str:
        return self.name
