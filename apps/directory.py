"""People in an LDAP directory: a small, real use of an LDAP adapter.

Needs ``[adapter:directory] type = ldap`` (see etc/node.ini)::

    curl -s -d '{"jsonrpc":"2.0","id":1,"method":"directory.person","params":["ann"]}' \\
         http://127.0.0.1:8080/rpc

Values typed by callers go into filters through the adapter's template
escaping, so ``find("*)(uid=*")`` looks for that literal text and nothing else.
"""

from __future__ import annotations

from msgd import api

__all__ = ["person", "find", "groups"]

ADAPTER = "directory"
FIELDS = ("uid", "cn", "mail", "telephoneNumber")


def _ldap():
    return api.adapter(ADAPTER)


def _person(entry: dict) -> dict:
    attrs = entry["attributes"]
    return {"dn": entry["dn"], **{f: (attrs.get(f) or [None])[0] for f in FIELDS}}


async def person(uid: str) -> dict:
    """The person with login ``uid``."""
    found = await _ldap().search("(&(objectClass=inetOrgPerson)(uid={}))", uid, attributes=list(FIELDS))
    if not found:
        raise api.AppError(f"no person {uid!r}", code=-32020)
    return _person(found[0])


async def find(text: str, limit: int = 20) -> list:
    """People whose name contains ``text`` (at most ``limit``), sorted by uid."""
    if len(text.strip()) < 2:
        raise api.InvalidParams("text must have at least 2 characters")
    if not 1 <= limit <= 100:
        raise api.InvalidParams("limit must be 1..100")
    found = await _ldap().search("(&(objectClass=inetOrgPerson)(cn=*{}*))", text.strip(),
                                 attributes=list(FIELDS), size_limit=limit)
    return sorted((_person(e) for e in found), key=lambda p: p["uid"] or "")


async def groups(uid: str) -> list:
    """Names of the groups the person ``uid`` belongs to."""
    p = await person(uid)
    return await _ldap().roles(p["dn"], uid)
