"""Where the node's log events go and how they look.

Every part of msgd logs through :class:`twisted.logger.Logger` with named
fields.  This module turns those events into lines:

``text``
    ``2026-11-22T00:47:42+0000 [msgd.node.NodeService#info] node dev started … [req 3fa2c1-1f]``
    for a person at a terminal;
``json``
    one JSON object per line for journald and log collectors::

        {"time": 1795222062.123, "level": "info", "namespace": "msgd.node.NodeService",
         "message": "node dev started: …", "node": "dev", "request_id": "3fa2c1-1f"}

    the event's named fields are kept as keys (values that are not JSON
    become their ``str``).

``request_id`` is the event's own field of that name, else the id of the
request being served when the event was emitted (``msgd.core.request.current``),
so every line an app function or the dispatcher writes for a call carries it.

Levels are per namespace (``twisted.logger`` namespaces are module paths, and
a level set for ``msgd`` covers ``msgd.core.apps``).  They come from
``[node] log_level`` / ``log_levels`` and can be changed while running
(:meth:`LogSetup.set_level`, the admin call ``/admin/log-level``, or a reload).

Autobahn logs through txaio, whose loggers turn the levels below txaio's
global level into no-ops before any event is made (Autobahn logs at debug
several times per WebSocket message); :class:`LogSetup` keeps that level at
the most verbose one set for ``*`` or an ``autobahn``/``txaio`` namespace.

Twisted logs "Unable to write to plugin cache PATH" each time it scans a
plugin directory whose ``dropin.cache`` is out of date and not writable by
the node's user (a root-owned install run as another user, after an
upgrade): at start and again for every endpoint string with a plugin prefix
(``mtls:``), on every reload.  :class:`LogSetup` lets the first such line
for a directory through and drops the repeats; regenerating the cache at
install time (docs/operations.rst) removes it.

twistd's own logger is replaced through the application's ``ILogObserver``
component (see :mod:`msgd.tap`); lines go where twistd's ``--logfile`` says
(``-`` or ``--nodaemon`` without it: standard output, which systemd hands to
journald).
"""

from __future__ import annotations

import json
import re
import sys
from typing import cast

from twisted.logger import (FilteringLogObserver, ILogFilterPredicate, ILogObserver, InvalidLogLevelError, LogLevel,
                            LogLevelFilterPredicate, PredicateResult, formatEvent, formatTime)
from zope.interface import implementer

from msgd.core.request import current

NAMESPACE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


class BadLevel(ValueError):
    pass


def level_named(name: str) -> LogLevel:
    """``debug``/``info``/``warn`` (or ``warning``)/``error``/``critical``."""
    n = name.strip().lower()
    try:
        return LogLevel.levelWithName("warn" if n == "warning" else n)
    except InvalidLogLevelError:
        raise BadLevel(f"{name!r} is not a log level (debug, info, warn, error, critical)") from None


def request_id(event: dict) -> str | None:
    rid = event.get("request_id")
    if rid is None:
        req = current.get()
        rid = req.id if req is not None else None
    return rid


def _jsonable(value):
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


def event_as_json(event: dict) -> str:
    """One event → one line of JSON (no newline inside)."""
    level = event.get("log_level")
    out = {
        "time": round(event.get("log_time") or 0.0, 6),
        "level": level.name if level is not None else "info",
        "namespace": event.get("log_namespace", ""),
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if not key.startswith("log_") and key not in out and key not in ("format", "message", "isError",
                                                                          "failure", "why", "time"):
            out[key] = _jsonable(value)
    rid = request_id(event)
    if rid is not None:
        out["request_id"] = rid
    failure = event.get("log_failure")
    if failure is not None:
        out["traceback"] = failure.getTraceback()
    return json.dumps(out, ensure_ascii=False, separators=(",", ":")) + "\n"


def event_as_text(event: dict) -> str:
    level = event.get("log_level")
    line = "{time} [{ns}#{level}] {message}".format(
        time=formatTime(event.get("log_time")), ns=event.get("log_namespace", "-"),
        level=level.name if level is not None else "info", message=formatEvent(event))
    rid = request_id(event)
    if rid is not None and "request_id" not in (event.get("log_format") or ""):
        line += f" [req {rid}]"
    failure = event.get("log_failure")
    if failure is not None:
        line += "\n" + failure.getTraceback().rstrip()
    return line.replace("\n", "\n\t") + "\n"


def _set_txaio_level(level: LogLevel) -> None:
    import txaio
    txaio.use_twisted()
    # bound by use_twisted(), hence unknown to mypy; twisted's level names are txaio's
    txaio.set_global_log_level(level.name)   # type: ignore[attr-defined]


@implementer(ILogFilterPredicate)
class PluginCacheRepeats:
    """A log filter predicate: the first "Unable to write to plugin cache"
    event of each cache file passes, its repeats do not."""

    def __init__(self):
        self.seen: set = set()

    def __call__(self, event: dict) -> PredicateResult:
        if str(event.get("format") or "").startswith("Unable to write to plugin cache"):
            path = event.get("path")
            if path in self.seen:
                return PredicateResult.no
            self.seen.add(path)
        return PredicateResult.maybe


class LogSetup:
    """The node's log observer: format and per-namespace levels, both
    changeable while running.  ``stream`` is a file opened for text."""

    def __init__(self, stream=None, log_format: str = "text", level: str = "info", levels=()):
        self.stream = stream if stream is not None else sys.stdout
        self.predicate = LogLevelFilterPredicate()
        self.observer = FilteringLogObserver(cast(ILogObserver, self._write), [self.predicate, PluginCacheRepeats()])
        self.format = "text"
        self._levels: dict[str, str] = {}
        self.configure(log_format, level, levels)

    def configure(self, log_format: str, level: str, levels=()) -> None:
        """Apply ``[node] log_format``, ``log_level`` and ``log_levels``
        (replacing every level set before)."""
        self.format = log_format
        self.predicate.clearLogLevels()
        self._levels = {}
        self.set_level("*", level)
        for namespace, name in levels:
            self.set_level(namespace, name)

    def apply(self, node_config) -> None:
        self.configure(node_config.log_format, node_config.log_level, node_config.log_levels)

    def set_level(self, namespace: str, level: str) -> None:
        """Log ``namespace`` (and the namespaces under it) from ``level`` up;
        ``*`` or an empty namespace sets the default."""
        lvl = level_named(level)
        if namespace not in ("", "*") and not NAMESPACE.match(namespace):
            raise BadLevel(f"{namespace!r} is not a log namespace (e.g. msgd.core.apps)")
        self.predicate.setLogLevelForNamespace("" if namespace == "*" else namespace, lvl)
        self._levels["*" if namespace in ("", "*") else namespace] = lvl.name
        _set_txaio_level(min((level_named(name) for ns, name in self._levels.items()
                              if ns == "*" or ns.split(".")[0] in ("autobahn", "txaio")), default=lvl))

    def levels(self) -> dict:
        """The levels in force: ``{"*": default, namespace: level, ...}``."""
        return dict(self._levels)

    def _write(self, event: dict) -> None:
        line = event_as_json(event) if self.format == "json" else event_as_text(event)
        self.stream.write(line)
        self.stream.flush()

    def __call__(self, event: dict) -> None:
        self.observer(event)
