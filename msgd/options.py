"""Declaring and parsing the keys of a config section: the leaf that
:mod:`msgd.config` and every section's options dataclass build on.

A section is a frozen dataclass whose fields are declared with
:func:`option` (a default, a parser, a line of documentation);
:func:`parse_section` builds it from an ini section's items, and every
problem is a :class:`ConfigError` naming the file, section and key.  A
parser takes ``(text, ctx)`` and returns the value or raises
:class:`Invalid`.  A check across keys is the dataclass's ``check()``
method, which raises ``Invalid(problem, key)``; ``parse_section`` calls it
once the keys are parsed.

This module imports nothing of msgd at import time, so anything may declare
options (interfaces, adapters, the access rules) without importing the
config loader, and the loader may import them without a cycle.
:mod:`msgd.config` re-exports every name here.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

REQUIRED = object()


class ConfigError(Exception):
    """One line: ``FILE: [SECTION] KEY: problem``."""

    def __init__(self, path: str, section: str | None, key: str | None, problem: str):
        self.path, self.section, self.key, self.problem = path, section, key, problem
        where = path
        if section is not None:
            where += f": [{section}]"
        if key is not None:
            where += f" {key}"
        super().__init__(f"{where}: {problem}")


class Invalid(ValueError):
    """Raised by a key parser; turned into a ConfigError naming the key."""


# -- key parsers -------------------------------------------------------------

def string(value: str, ctx: "Context") -> str:
    return value


def nonempty(value: str, ctx: "Context") -> str:
    if not value.strip():
        raise Invalid("must not be empty")
    return value.strip()


def integer(lo: int | None = None, hi: int | None = None) -> Callable:
    def parse(value: str, ctx: "Context") -> int:
        try:
            n = int(value.strip(), 0)
        except ValueError:
            raise Invalid(f"{value!r} is not an integer") from None
        if lo is not None and n < lo:
            raise Invalid(f"{n} is below the minimum {lo}")
        if hi is not None and n > hi:
            raise Invalid(f"{n} is above the maximum {hi}")
        return n
    return parse


_BOOLS = {"1": True, "yes": True, "true": True, "on": True,
          "0": False, "no": False, "false": False, "off": False}


def boolean(value: str, ctx: "Context") -> bool:
    try:
        return _BOOLS[value.strip().lower()]
    except KeyError:
        raise Invalid(f"{value!r} is not a boolean (use yes/no, true/false, on/off, 1/0)") from None


_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600, "d": 86400}


def duration(value: str, ctx: "Context") -> float:
    """``30``, ``30s``, ``250ms``, ``5m``, ``1h``, ``2d`` → seconds."""
    m = _DURATION.match(value)
    if not m:
        raise Invalid(f"{value!r} is not a duration (e.g. 30s, 250ms, 5m, 1h)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def optional_duration(value: str, ctx: "Context") -> float | None:
    if value.strip().lower() in ("", "none", "off", "never"):
        return None
    return duration(value, ctx)


_SIZE = re.compile(r"^\s*([0-9]+)\s*(b|k|kb|kib|m|mb|mib|g|gb|gib)?\s*$", re.I)
_SIZE_UNITS = {None: 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024 ** 2,
               "mb": 1000 ** 2, "mib": 1024 ** 2, "g": 1024 ** 3, "gb": 1000 ** 3, "gib": 1024 ** 3}


def size(value: str, ctx: "Context") -> int:
    """``65536``, ``64k``, ``64KiB``, ``1MiB``, ``1MB`` → bytes."""
    m = _SIZE.match(value)
    if not m:
        raise Invalid(f"{value!r} is not a size (e.g. 65536, 64KiB, 1MiB)")
    unit = m.group(2).lower() if m.group(2) else None
    return int(m.group(1)) * _SIZE_UNITS[unit]


def choice(*options: str) -> Callable:
    def parse(value: str, ctx: "Context") -> str:
        v = value.strip().lower()
        if v not in options:
            raise Invalid(f"{value!r} is not one of {', '.join(options)}" + _hint(v, options))
        return v
    return parse


def words(value: str, ctx: "Context") -> tuple[str, ...]:
    """A list separated by commas and/or whitespace."""
    return tuple(w for w in re.split(r"[,\s]+", value.strip()) if w)


def networks(value: str, ctx: "Context") -> tuple[str, ...]:
    """Addresses or networks (``127.0.0.1 ::1 10.0.0.0/8``), checked."""
    import ipaddress
    out = words(value, ctx)
    for w in out:
        try:
            ipaddress.ip_network(w, strict=False)
        except ValueError:
            raise Invalid(f"{w!r} is not an IP address or network (e.g. 127.0.0.1, 10.0.0.0/8, ::1)") from None
    return out


def pairs(form: str = "name:value", value_needed: bool = False) -> Callable:
    """A parser of ``name:value name:value`` (words, see :func:`words`) →
    ``((name, value), ...)``; ``form`` names the form in its errors."""
    def parse(value: str, ctx: "Context") -> tuple[tuple[str, str], ...]:
        out = []
        for w in words(value, ctx):
            name, sep, v = w.partition(":")
            if not sep or not name or (value_needed and not v):
                raise Invalid(f"{w!r} is not {form}")
            out.append((name, v))
        return tuple(out)
    return parse


def nonempty_words(value: str, ctx: "Context") -> tuple[str, ...]:
    w = words(value, ctx)
    if not w:
        raise Invalid("must list at least one value")
    return w


def path(value: str, ctx: "Context") -> str:
    """A filesystem path, relative to the ini file's directory."""
    v = os.path.expanduser(value.strip())
    if not v:
        raise Invalid("must not be empty")
    return os.path.normpath(os.path.join(ctx.base_dir, v))


def optional_path(value: str, ctx: "Context") -> str | None:
    return path(value, ctx) if value.strip() else None


def server_endpoint(value: str, ctx: "Context") -> str:
    """A Twisted server endpoint string, checked by parsing it."""
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.testing import MemoryReactor
    v = value.strip()
    if v.startswith("systemd:"):
        return v  # needs LISTEN_FDS, which exist only when systemd started us
    try:
        serverFromString(MemoryReactor(), v)
    except Exception as e:  # endpoint parsers raise ValueError, KeyError, TypeError, ...
        raise Invalid(f"{v!r} is not a server endpoint string ({_exc_text(e)}); e.g. tcp:8080:interface=127.0.0.1") from None
    return v


def client_endpoint(value: str, ctx: "Context") -> str:
    """A Twisted client endpoint string, checked by parsing it."""
    from twisted.internet.endpoints import clientFromString
    from twisted.internet.testing import MemoryReactor
    v = value.strip()
    try:
        clientFromString(MemoryReactor(), v)
    except Exception as e:
        raise Invalid(f"{v!r} is not a client endpoint string ({_exc_text(e)}); e.g. tcp:host=127.0.0.1:port=6379") from None
    return v


def client_endpoints(value: str, ctx: "Context") -> tuple[str, ...]:
    """One or more client endpoint strings, separated by commas and/or
    whitespace, each checked."""
    out = nonempty_words(value, ctx)
    for ep in out:
        client_endpoint(ep, ctx)
    return out


_TARGET = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*$")


def target(value: str, ctx: "Context") -> str:
    """An app target ``module.function``; checked against the apps when the
    node starts (see :meth:`Config.check_targets`)."""
    v = value.strip()
    if not _TARGET.match(v):
        raise Invalid(f"{v!r} is not a target of the form module.function")
    ctx.targets.append(v)
    return v



def _exc_text(e: Exception) -> str:
    return str(e) or type(e).__name__


def _hint(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def option(default: Any = REQUIRED, *, parse: Callable = string, doc: str = "") -> Any:
    """Declare a key of a section dataclass."""
    meta = {"parse": parse, "doc": doc}
    if default is REQUIRED:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Context:
    path: str
    base_dir: str
    targets: list = field(default_factory=list)   # (section, key, target)


def parse_section(cls, items: dict[str, str], ctx: Context, section: str, skip=("type",)) -> Any:
    """Build the frozen dataclass ``cls`` from an ini section's items."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in items:
        if key in skip:
            continue
        if key not in fields:
            raise ConfigError(ctx.path, section, key, "unknown key" + _hint(key, fields))
    values = {}
    for name, f in fields.items():
        if name in items:
            raw = items[name]
            parse = f.metadata.get("parse", string)
            before = len(ctx.targets)
            try:
                values[name] = parse(raw, ctx)
            except Invalid as e:
                raise ConfigError(ctx.path, section, name, str(e)) from None
            for i in range(before, len(ctx.targets)):
                t = ctx.targets[i]
                if isinstance(t, str):
                    ctx.targets[i] = (section, name, t)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(ctx.path, section, name, "missing required key")
        elif isinstance(f.default, str) and f.metadata.get("parse") in (path, optional_path):
            values[name] = f.metadata["parse"](f.default, ctx)   # defaults are relative to the file too
    options = cls(**values)
    check = getattr(options, "check", None)
    if check is not None:
        try:
            check()
        except Invalid as e:
            raise ConfigError(ctx.path, section, e.args[1] if len(e.args) > 1 else None, e.args[0]) from None
    return options


def describe(cls) -> list[tuple[str, Any, str]]:
    """(key, default, doc) for every key of a section class, for the docs."""
    out = []
    for f in dataclasses.fields(cls):
        default = "(required)" if f.default is dataclasses.MISSING else f.default
        out.append((f.name, default, f.metadata.get("doc", "")))
    return out
