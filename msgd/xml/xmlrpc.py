"""XML-RPC values (http://xmlrpc.com/spec.md) without a transport: a
``<methodCall>`` read into Python values, results and faults written as a
``<methodResponse>``, and the signatures ``system.methodSignature`` gives.
The ``/RPC2`` mount (``msgd.interfaces.xmlrpc``) answers with them.

Types: int (i4), boolean, string, double, dateTime.iso8601, base64, struct,
array; ``nil`` and ``i8`` are always read and written only when the
:class:`Encoder` allows them.  A value it cannot write raises
:class:`Unsendable`, naming the value.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import decimal
import re
from collections.abc import Mapping
from xml.sax.saxutils import escape

from msgd.core import errors
from msgd.core import typehints


EXTENSIONS_NS = "{http://ws.apache.org/xmlrpc/namespaces/extensions}"
MAXINT = 2 ** 31 - 1
MAXI8 = 2 ** 63 - 1
_BAD_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")


class Unsendable(errors.InternalError):
    """A result holds a value XML-RPC (as configured) cannot carry."""


class Raw(str):
    """An already encoded ``<value>`` (multicall assembles its answer from
    results encoded one by one)."""


# -- decoding ----------------------------------------------------------------

def _datetime(text: str) -> datetime.datetime:
    t = text.strip().replace("-", "")
    if t.endswith("Z"):
        t = t[:-1]
    for fmt in ("%Y%m%dT%H:%M:%S", "%Y%m%dT%H%M%S", "%Y%m%dT%H:%M:%S.%f"):
        try:
            return datetime.datetime.strptime(t, fmt)
        except ValueError:
            pass
    raise ValueError(f"bad dateTime.iso8601 {text!r}")


def _int(text):
    return int(text.strip())


def _bool(text):
    t = text.strip()
    if t not in ("0", "1"):
        raise ValueError(f"bad boolean {text!r}")
    return t == "1"


_SCALAR_DECODERS = {
    "int": _int, "i4": _int, "i8": _int, "i2": _int, "i1": _int,
    "boolean": _bool, "string": lambda t: t, "double": lambda t: float(t.strip()),
    "dateTime.iso8601": _datetime, "base64": lambda t: base64.b64decode("".join(t.split()), validate=True),
    EXTENSIONS_NS + "i8": _int,
}


def load_value(el):
    """The Python value of a ``<value>`` element."""
    for typed in el:            # its one child names the type ...
        break
    else:
        return el.text or ""    # ... or it has none: a string
    tag = typed.tag
    decoder = _SCALAR_DECODERS.get(tag)
    if decoder is not None:
        try:
            return decoder(typed.text or "")
        except ValueError as e:
            raise errors.InvalidRequest(f"bad <{tag}> value: {e}") from None
    if tag == "struct":
        out = {}
        for m in typed:
            name, value = m.find("name"), m.find("value")
            if m.tag != "member" or name is None or value is None:
                raise errors.InvalidRequest("a struct <member> needs <name> and <value>")
            out[name.text or ""] = load_value(value)
        return out
    if tag == "array":
        data = typed.find("data")
        if data is None:
            raise errors.InvalidRequest("an <array> needs <data>")
        return [load_value(v) for v in data if v.tag == "value"]
    if tag in ("nil", EXTENSIONS_NS + "nil"):
        return None
    raise errors.InvalidRequest(f"unknown XML-RPC type <{tag}>")


def load_call(root) -> tuple[str, list]:
    """(methodName, params) of a parsed ``<methodCall>`` (one pass over its
    children: this runs for every call)."""
    if root.tag != "methodCall":
        raise errors.InvalidRequest(f"expected <methodCall>, got <{root.tag}>")
    name = ""
    args = []
    for child in root:
        tag = child.tag
        if tag == "methodName":
            name = (child.text or "").strip()
        elif tag == "params":
            for p in child:
                value = p[0] if len(p) == 1 else None
                if p.tag != "param" or value is None or value.tag != "value":
                    raise errors.InvalidRequest("each <param> needs one <value>")
                args.append(load_value(value))
    if not name:
        raise errors.InvalidRequest("<methodCall> without <methodName>")
    return name, args


# -- encoding ----------------------------------------------------------------

class Encoder:
    """Python values → XML-RPC ``<value>`` text."""

    def __init__(self, allow_none: bool = False, i8: bool = False):
        self.allow_none = allow_none
        self.i8 = i8
        self._by_type = {
            str: self._str, int: self._int, bool: self._bool, float: self._float,
            bytes: self._bytes, bytearray: self._bytes, dict: self._struct,
            list: self._array, tuple: self._array, type(None): self._nil,
            datetime.datetime: self._datetime, datetime.date: self._date,
            decimal.Decimal: self._decimal, Raw: self._raw,
        }

    def value(self, v) -> str:
        out: list[str] = []
        self._value(v, out)
        return "".join(out)

    def _value(self, v, out):
        write = self._by_type.get(type(v))
        if write is None:
            if dataclasses.is_dataclass(v) and not isinstance(v, type):
                write = self._struct
            elif isinstance(v, Mapping):
                write = self._struct
            else:
                raise Unsendable(f"result cannot be sent over XML-RPC: {type(v).__name__} value {_short(v)}")
        write(v, out)

    def _str(self, v, out):
        if _BAD_CHARS.search(v):
            raise Unsendable(f"result cannot be sent over XML-RPC: string {_short(v)} holds "
                             "characters XML 1.0 cannot carry")
        out.append("<value><string>%s</string></value>" % escape(v))

    def _int(self, v, out):
        if -MAXINT - 1 <= v <= MAXINT:
            out.append("<value><int>%d</int></value>" % v)
        elif self.i8 and -MAXI8 - 1 <= v <= MAXI8:
            out.append("<value><i8>%d</i8></value>" % v)
        else:
            limit = "64 bits" if self.i8 else "32 bits (xmlrpc_i8 is off)"
            raise Unsendable(f"result cannot be sent over XML-RPC: integer {v} does not fit in {limit}")

    def _bool(self, v, out):
        out.append("<value><boolean>%d</boolean></value>" % v)

    def _float(self, v, out):
        if v != v or v in (float("inf"), float("-inf")):
            raise Unsendable(f"result cannot be sent over XML-RPC: double {v!r}")
        out.append("<value><double>%r</double></value>" % v)

    def _bytes(self, v, out):
        out.append("<value><base64>%s</base64></value>" % base64.b64encode(v).decode("ascii"))

    def _datetime(self, v, out):
        if v.tzinfo is not None:
            v = v.astimezone(datetime.timezone.utc).replace(tzinfo=None)
        out.append("<value><dateTime.iso8601>%s</dateTime.iso8601></value>" % v.strftime("%Y%m%dT%H:%M:%S"))

    def _date(self, v, out):
        out.append("<value><dateTime.iso8601>%s</dateTime.iso8601></value>" % v.strftime("%Y%m%dT00:00:00"))

    def _decimal(self, v, out):
        self._str(str(v), out)

    def _nil(self, v, out):
        if not self.allow_none:
            raise Unsendable("result cannot be sent over XML-RPC: None (nil is off: xmlrpc_allow_none)")
        out.append("<value><nil/></value>")

    def _raw(self, v, out):
        out.append(v)

    def _struct(self, v, out):
        out.append("<value><struct>")
        for k, item in typehints.members(v).items():
            if not isinstance(k, str):
                raise Unsendable(f"result cannot be sent over XML-RPC: struct key {_short(k)} is not a string")
            if item is None and not self.allow_none:
                continue   # an absent member is how XML-RPC without nil says "no value"
            out.append("<member><name>%s</name>" % escape(k))
            self._value(item, out)
            out.append("</member>")
        out.append("</struct></value>")

    def _array(self, v, out):
        out.append("<value><array><data>")
        for item in v:
            self._value(item, out)
        out.append("</data></array></value>")

    def response(self, result) -> bytes:
        return ("<?xml version='1.0'?>\n<methodResponse><params><param>%s</param></params></methodResponse>\n"
                % self.value(result)).encode("utf-8")


def fault_struct(e: errors.MsgdError) -> dict:
    return {"faultCode": e.code, "faultString": e.message}


def fault(e: errors.MsgdError) -> bytes:
    body = Encoder().value(fault_struct(e))
    return ("<?xml version='1.0'?>\n<methodResponse><fault>%s</fault></methodResponse>\n" % body).encode("utf-8")



def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."



# -- types for introspection ---------------------------------------------------

XMLRPC_TYPES = {
    "str": "string", "int": "int", "float": "double", "bool": "boolean", "bytes": "base64",
    "datetime": "dateTime.iso8601", "date": "dateTime.iso8601", "decimal": "string",
    "list": "array", "struct": "struct", "none": "nil", "any": "any",
}


def _xmlrpc_type(t: typehints.Type) -> str:
    return "struct" if t.cls is dict else XMLRPC_TYPES[t.kind]      # a dict: untyped members


def signatures(sig: typehints.Signature) -> list[list[str]]:
    """One signature per number of arguments a call may pass: [result, p1, …]."""
    result = _xmlrpc_type(sig.result)
    types_ = [_xmlrpc_type(p.type) for p in sig.params]
    least = sum(1 for p in sig.params if p.required)
    return [[result] + types_[:n] for n in range(least, len(types_) + 1)]
