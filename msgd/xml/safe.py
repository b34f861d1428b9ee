"""The one way msgd parses XML that came from a client (XML-RPC and SOAP).

libxml2 is fast but, left to its defaults, it will read a DTD, expand
entities (the "billion laughs") and may fetch external ones (XXE: a
``SYSTEM "file:///etc/passwd"`` entity read into the document).  Here:

* a document with a DTD is refused outright: neither XML-RPC nor SOAP has any
  use for one (SOAP 1.1 and 1.2 forbid it), so there is nothing to expand;
* the parser itself is built with entity resolution, DTD loading and network
  access off and ``huge_tree`` off, so even a DTD that slipped past the check
  is never acted on;
* the body size and the element nesting depth are bounded; a document past
  either bound is refused with ``TooLarge``.

Every refusal is an :class:`msgd.core.errors.MsgdError` (``ParseError`` or
``TooLarge``), which each protocol renders as its own fault.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

from lxml import etree

from msgd.core import errors


@dataclass(frozen=True)
class Limits:
    """Bounds for one document: ``max_size`` bytes, ``max_depth`` levels of
    nested elements (the root is level 1)."""

    max_size: int = 1024 * 1024
    max_depth: int = 64


def make_parser() -> etree.XMLParser:
    """A parser that never reads a DTD, expands an entity or opens a
    connection; comments and processing instructions are dropped (neither
    protocol gives them a meaning).  lxml parsers must not be shared between threads, so
    :func:`parse` keeps one per thread."""
    return etree.XMLParser(
        resolve_entities=False, load_dtd=False, dtd_validation=False, no_network=True,
        huge_tree=False, remove_pis=True, remove_comments=True, collect_ids=False)


_local = threading.local()


def _parser() -> etree.XMLParser:
    p = getattr(_local, "parser", None)
    if p is None:
        p = _local.parser = make_parser()
    return p


@functools.lru_cache(maxsize=16)
def _too_deep(max_depth: int) -> etree.XPath:
    """An XPath that is true when some element sits below ``max_depth``
    levels; evaluated in C, one pass per level."""
    return etree.XPath("boolean(" + "/*" * (max_depth + 1) + ")")


def parse(data: bytes, limits: Limits = Limits()) -> etree._Element:
    """The root element of ``data``, or a ParseError / TooLarge naming what
    is wrong."""
    if len(data) > limits.max_size:
        raise errors.TooLarge(f"XML body of {len(data)} bytes is larger than {limits.max_size}")
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise errors.ParseError("XML with a DTD or entity declarations is refused")
    if not data or data.isspace():
        raise errors.ParseError("empty XML body")
    try:
        root = etree.fromstring(data, _parser())
    except etree.XMLSyntaxError as e:
        message = str(e).splitlines()[0] if str(e) else "malformed XML"
        if "depth" in message.lower():
            raise errors.TooLarge(f"XML nested deeper than {limits.max_depth} levels") from None
        raise errors.ParseError(f"malformed XML: {message}") from None
    info = root.getroottree().docinfo
    # A DTD in an encoding the byte check above cannot see (UTF-16, ...).
    if info.doctype:
        raise errors.ParseError("XML with a DTD or entity declarations is refused")
    # An element nested d levels deep has d - 1 ancestors, each with a start and
    # an end tag (the document is well-formed), so at least 2d - 1 "<" bytes when
    # "<" is one byte, as in UTF-8: a call with no more than 2 * max_depth of them
    # cannot be too deep, and most calls skip the walk.
    if (info.encoding.upper() != "UTF-8" or data.count(b"<") > 2 * limits.max_depth) \
            and _too_deep(limits.max_depth)(root):
        raise errors.TooLarge(f"XML nested deeper than {limits.max_depth} levels")
    return root
