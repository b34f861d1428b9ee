"""node.ini → frozen, typed configuration.

Every error is a :class:`~msgd.options.ConfigError` whose text is one line naming the file,
the section and the key, with a "did you mean" when a name is close to a known
one.  Nothing here starts anything: the whole file is validated before the
node builds a single service.

Sections
--------
``[node]``               this node (:class:`NodeConfig`)
``[interface:NAME]``     a listener or input; ``type=`` picks its class
``[adapter:NAME]``       a client of an external system; ``type=`` picks it
``[peer:NAME]``          another node reached over Perspective Broker
``[pubsub]``             the pub/sub broker (:class:`PubSubConfig`)
``[channel:PATTERN]``    per-channel-pattern overrides of ``[pubsub]`` history, presence events
``[access:NAME]``        an authorization rule (:mod:`msgd.security.rules`)

Relative paths are taken relative to the directory of the ini file, so a node
behaves the same whatever the working directory is.
"""

from __future__ import annotations

import configparser
import os
import re
import socket
from dataclasses import dataclass
from typing import Any, Callable

from msgd import registry
from msgd.options import (  # noqa: F401  (re-exported: declarations may import them from here)
    REQUIRED, ConfigError, Invalid, string, nonempty, integer, boolean, duration, optional_duration, size,
    choice, words, networks, nonempty_words, path, optional_path, server_endpoint, client_endpoint,
    client_endpoints, target,
    _hint, option, Context, parse_section, describe)

# -- parsers of [node] keys ------------------------------------------------------

def log_level(value: str, ctx: "Context") -> str:
    """``debug``, ``info``, ``warn``, ``error`` or ``critical``."""
    from msgd.logging import BadLevel, level_named
    try:
        return level_named(value).name
    except BadLevel as e:
        raise Invalid(str(e)) from None


def log_levels(value: str, ctx: "Context") -> tuple:
    """``NAMESPACE=LEVEL`` items → ((namespace, level), ...)."""
    from msgd.logging import NAMESPACE
    out = []
    for item in words(value, ctx):
        namespace, sep, level = item.partition("=")
        if not sep or not NAMESPACE.match(namespace):
            raise Invalid(f"{item!r} is not NAMESPACE=LEVEL (e.g. msgd.core.apps=debug twisted=warn)")
        out.append((namespace, log_level(level, ctx)))
    return tuple(out)


# -- sections ------------------------------------------------------------------

@dataclass(frozen=True)
class NodeConfig:
    name: str = option(socket.gethostname().split(".")[0] or "node", parse=nonempty,
                       doc="this node's name; shown in /health and used by peers")
    apps: str = option("apps", parse=path, doc="directory of application modules")
    state_dir: str = option("state", parse=path,
                            doc="directory for durable state (outbox, ingest bookkeeping); created if missing")
    request_timeout: float = option(30.0, parse=duration,
                                    doc="default deadline of every request")
    threads: int = option(10, parse=integer(1, 1024),
                          doc="size of the thread pool for blocking app functions and file I/O")
    drain_timeout: float = option(10.0, parse=duration,
                                  doc="on SIGTERM/SIGINT, how long in-flight requests may take to finish")
    reload_interval: float = option(1.0, parse=duration,
                                    doc="how often app modules are checked for changes (0 turns reloading off)")
    outbox_retry_min: float = option(1.0, parse=duration,
                                     doc="first retry delay of an undelivered message to a peer (doubles each time)")
    outbox_retry_max: float = option(300.0, parse=duration, doc="longest retry delay of the outbox")
    outbox_window: int = option(64, parse=integer(1, 100000),
                                doc="messages in flight at once to one peer (without [peer:NAME] ordered)")
    dedup_retention: float = option(7 * 86400.0, parse=duration,
                                    doc="how long ids of handled peer messages are kept to drop duplicates; "
                                        "keep it above the senders' message_ttl")
    log_format: str = option("text", parse=choice("text", "json"),
                             doc="text (for a terminal) or json (one JSON object per line, for journald/collectors)")
    log_level: str = option("info", parse=log_level, doc="lowest level logged (debug, info, warn, error, critical)")
    log_levels: tuple = option((), parse=log_levels,
                               doc="per-namespace levels, e.g. msgd.core.apps=debug twisted=warn")


@dataclass(frozen=True)
class PubSubConfig:
    backend: str = option("memory", parse=choice("memory", "redis"),
                          doc="memory (one node) or redis (channels shared by nodes through Redis)")
    history_size: int = option(1000, parse=integer(0),
                               doc="events kept per channel for resuming subscribers")
    history_age: float = option(3600.0, parse=duration,
                                doc="how long events are kept for resuming subscribers")
    history_memory: int = option(256 * 1024 * 1024, parse=size,
                                 doc="bound of the memory all channels' history takes on this node (0: none); "
                                     "past it the oldest events of the channels holding the most are dropped")
    redis: tuple = option(("tcp:host=127.0.0.1:port=6379",), parse=client_endpoints,
                          doc="Redis endpoint when backend=redis; several (separated by commas or spaces) "
                              "spread the channels over them by a consistent hash; with cluster = yes, some "
                              "nodes of the Redis Cluster")
    cluster: bool = option(False, parse=boolean,
                           doc="the redis endpoints are nodes of one Redis Cluster (7+: sharded pub/sub)")
    redis_password: str = option("", doc="Redis password when backend=redis")
    redis_db: int = option(0, parse=integer(0), doc="Redis database number when backend=redis")
    prefix: str = option("msgd", parse=nonempty, doc="prefix of the Redis keys and channels used")
    keepalive: float = option(5.0, parse=duration,
                              doc="backend=redis: a PING on every Redis connection this often; a connection whose "
                                  "PING is still unanswered when the next is due is dropped (Redis away) (0: none)")
    presence_ttl: float = option(30.0, parse=duration,
                                 doc="backend=redis: a node's presence entries are refreshed every third of this, "
                                     "and gone this long after the node stopped refreshing them (died)")

    def check(self):
        if "{" in self.prefix or "}" in self.prefix:
            raise Invalid("must not contain { or } (they make Redis Cluster hash tags)", "prefix")
        if self.cluster and self.redis_db:
            raise Invalid("a Redis Cluster has only database 0", "redis_db")
        from msgd.cluster.endpoints import endpoint_name
        seen: dict[str, str] = {}
        for ep in self.redis:
            addr = endpoint_name(ep)
            if addr in seen:
                raise Invalid(f"{seen[addr]!r} and {ep!r} are the same Redis ({addr})", "redis")
            seen[addr] = ep


@dataclass(frozen=True)
class ChannelConfig:
    history_size: int | None = option(None, parse=integer(0), doc="overrides [pubsub] history_size")
    history_age: float | None = option(None, parse=duration, doc="overrides [pubsub] history_age")
    presence_events: bool | None = option(None, parse=boolean,
                                          doc="tell the channel's subscribers who joins and leaves (rpc.join, "
                                              "rpc.leave); the first matching section that sets it decides; "
                                              "default no")


@dataclass(frozen=True)
class PeerConfig:
    endpoints: tuple = option(parse=nonempty_words, doc="client endpoint strings of the node (several for replicas)")
    username: str = option("", doc="PB login name")
    password: str = option("", doc="PB password")
    ordered: bool = option(False, parse=boolean, doc="deliver async messages to this peer in order")
    timeout: float = option(10.0, parse=duration,
                            doc="deadline of a call made outside any request, and of each async message delivery")
    message_ttl: float | None = option(86400.0, parse=optional_duration,
                                       doc="async messages not accepted within this are dropped (none: kept forever)")
    max_retry_delay: float = option(30.0, parse=duration,
                                    doc="longest wait between reconnection attempts")


@dataclass(frozen=True)
class AccessConfig:
    principals: tuple = option(("*",), parse=nonempty_words,
                               doc="who: * (anyone, anonymous too), @authenticated, user names, @ROLE")
    interfaces: tuple = option(("*",), parse=nonempty_words, doc="interface names or patterns this rule covers")
    call: tuple = option((), parse=words, doc="target patterns that may be called, e.g. orders.* catalog.list")
    subscribe: tuple = option((), parse=words, doc="channel patterns that may be subscribed to")
    publish: tuple = option((), parse=words, doc="channel patterns that may be published to")


@dataclass(frozen=True)
class Component:
    """An ``[interface:NAME]`` or ``[adapter:NAME]`` section: its type and its
    type's own options dataclass."""
    name: str
    type: str
    options: Any


@dataclass(frozen=True)
class Config:
    path: str
    node: NodeConfig
    pubsub: PubSubConfig
    channels: tuple = ()           # ((pattern, ChannelConfig), ...)
    interfaces: tuple = ()         # (Component, ...)
    adapters: tuple = ()           # (Component, ...)
    peers: tuple = ()              # ((name, PeerConfig), ...)
    targets: tuple = ()            # ((section, key, target), ...)
    access: tuple = ()             # ((name, AccessConfig), ...): authorization rules

    def interface(self, name: str) -> Component:
        return {c.name: c for c in self.interfaces}[name]

    def check_targets(self, exists: Callable[[str], bool]) -> None:
        """Raise ConfigError for the first handler target that no app exports."""
        for section, key, t in self.targets:
            if not exists(t):
                raise ConfigError(self.path, section, key, f"no app exports {t!r}")


def _component(kind: str, table: dict, section: str, name: str, items: dict, ctx: Context) -> Component:
    if "type" not in items:
        raise ConfigError(ctx.path, section, "type", f"missing required key (one of {', '.join(sorted(table))})")
    typ = items["type"].strip()
    if typ not in table:
        raise ConfigError(ctx.path, section, "type", f"unknown {kind} type {typ!r}" + _hint(typ, table)
                          + f"; known: {', '.join(sorted(table))}")
    cls = registry.load(table, typ)
    return Component(name=name, type=typ, options=parse_section(cls.Options, items, ctx, section))


_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def parse_text(text: str, path: str = "<string>") -> Config:
    """Parse ini text; ``path`` is used in messages and as the base of
    relative paths."""
    parser = configparser.ConfigParser(interpolation=None, default_section="\x00no-defaults",
                                       strict=True, empty_lines_in_values=False)
    parser.optionxform = str   # type: ignore[assignment, method-assign]   # keys keep their case (configparser's documented way)
    try:
        parser.read_string(text, source=path)
    except configparser.DuplicateSectionError as e:
        raise ConfigError(path, e.section, None, f"section appears twice (line {e.lineno})") from None
    except configparser.DuplicateOptionError as e:
        raise ConfigError(path, e.section, e.option, f"key appears twice (line {e.lineno})") from None
    except configparser.MissingSectionHeaderError as e:
        raise ConfigError(path, None, None, f"line {e.lineno}: text before the first [section]") from None
    except configparser.ParsingError as e:
        lineno, line = e.errors[0] if e.errors else (0, "")
        raise ConfigError(path, None, None, f"line {lineno}: cannot parse {line.strip()!r}") from None

    ctx = Context(path=path, base_dir=os.path.dirname(os.path.abspath(path)) if path != "<string>" else os.getcwd())
    interfaces, adapters, peers, channels, access = [], [], [], [], []
    node = pubsub = None
    for section in parser.sections():
        items = dict(parser.items(section))
        kind, sep, name = section.partition(":")
        if sep and not name.strip():
            raise ConfigError(path, section, None, "section needs a name after the colon")
        name = name.strip()
        if sep and kind in ("interface", "adapter", "peer") and not _NAME.match(name):
            raise ConfigError(path, section, None, f"name {name!r} may hold only letters, digits, _ . -")
        if section == "node":
            node = parse_section(NodeConfig, items, ctx, section, skip=())
        elif section == "pubsub":
            pubsub = parse_section(PubSubConfig, items, ctx, section, skip=())
        elif kind == "interface" and sep:
            interfaces.append(_component("interface", registry.INTERFACES, section, name, items, ctx))
        elif kind == "adapter" and sep:
            adapters.append(_component("adapter", registry.ADAPTERS, section, name, items, ctx))
        elif kind == "peer" and sep:
            peer = parse_section(PeerConfig, items, ctx, section, skip=())
            for ep in peer.endpoints:
                try:
                    client_endpoint(ep, ctx)
                except Invalid as e:
                    raise ConfigError(path, section, "endpoints", str(e)) from None
            peers.append((name, peer))
        elif kind == "channel" and sep:
            channels.append((name, parse_section(ChannelConfig, items, ctx, section, skip=())))
        elif kind == "access" and sep:
            access.append((name, parse_section(AccessConfig, items, ctx, section, skip=())))
        else:
            known = ["node", "pubsub", "interface:NAME", "adapter:NAME", "peer:NAME", "channel:PATTERN",
                     "access:NAME"]
            raise ConfigError(path, section, None, "unknown section" + _hint(section, known)
                              + f"; known: {', '.join(known)}")
    if node is None:
        node = parse_section(NodeConfig, {}, ctx, "node", skip=())
    if pubsub is None:
        pubsub = parse_section(PubSubConfig, {}, ctx, "pubsub", skip=())
    return Config(path=path, node=node, pubsub=pubsub, channels=tuple(channels),
                  interfaces=tuple(interfaces), adapters=tuple(adapters), peers=tuple(peers),
                  targets=tuple(ctx.targets), access=tuple(access))


def load(path: str) -> Config:
    """Read and validate ``path``."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(path, None, None, f"cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(path, None, None, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    return parse_text(text, path)
