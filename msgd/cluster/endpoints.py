"""Redis client endpoint strings (Twisted's ``tcp:host=...:port=...``):
what names a server (a shard's stable name, the duplicate check of
``[pubsub] redis``), where one connects, and one aimed at another address
(a Redis Cluster's nodes).  A leaf: the bridge, the cluster client and the
config import it."""

from __future__ import annotations


def _split_endpoint(description: str) -> list[str]:
    """Split a Twisted endpoint string on unescaped colons (escapes kept)."""
    parts, cur, i = [], "", 0
    while i < len(description):
        c = description[i]
        if c == "\\" and i + 1 < len(description):
            cur += description[i:i + 2]
            i += 2
            continue
        if c == ":":
            parts.append(cur)
            cur = ""
        else:
            cur += c
        i += 1
    parts.append(cur)
    return parts


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


def endpoint_for(template: str, host: str, port: int) -> str:
    """``template`` (a client endpoint string) aimed at ``host``:``port``:
    its ``host=``/``port=`` (or first two positional) arguments replaced,
    every other option kept."""
    parts = _split_endpoint(template)
    kind, args = parts[0], parts[1:]
    positional = [i for i, a in enumerate(args) if "=" not in a]
    keyword = {a.partition("=")[0]: i for i, a in enumerate(args) if "=" in a}
    out = list(args)
    for name, value, pos in (("host", _escape(host), 0), ("port", str(port), 1)):
        if name in keyword:
            out[keyword[name]] = f"{name}={value}"
        elif len(positional) > pos:
            out[positional[pos]] = value
        else:
            out.append(f"{name}={value}")
    return ":".join([kind, *out])


def address_of(template: str) -> tuple[str, int]:
    """The ``(host, port)`` a client endpoint string connects to."""
    args = _split_endpoint(template)[1:]
    positional = [a for a in args if "=" not in a]
    keyword = dict(a.partition("=")[::2] for a in args if "=" in a)
    host = keyword.get("host", positional[0] if positional else "127.0.0.1")
    port = keyword.get("port", positional[1] if len(positional) > 1 else "6379")
    return host.replace("\\:", ":").replace("\\\\", "\\"), int(port)


def endpoint_name(description: str) -> str:
    """What names a Redis server reached through a client endpoint string:
    ``host:port``, or ``unix:PATH`` for a Unix socket."""
    parts = _split_endpoint(description.strip())
    if parts[0] == "unix":
        args = parts[1:]
        keyword = dict(a.partition("=")[::2] for a in args if "=" in a)
        path = keyword.get("path", next((a for a in args if "=" not in a), ""))
        return "unix:" + path.replace("\\:", ":")
    return "%s:%d" % address_of(description)
