"""XML-RPC at ``/RPC2`` on the HTTP Site (key ``xmlrpc`` of ``type = http``).

Wire protocol (http://xmlrpc.com/spec.md)::

    POST /RPC2                      Content-Type: text/xml
    <methodCall><methodName>orders.place</methodName>
      <params><param><value><string>book</string></value></param>...</params>
    </methodCall>

    200 OK  <methodResponse><params><param><value>…</value></param></params></methodResponse>
    200 OK  <methodResponse><fault><value><struct>
              faultCode (int: the taxonomy code, e.g. -32601), faultString
            </struct></value></fault></methodResponse>

Methods are the node's targets (``module.function``, positional params)
plus ``system.listMethods``, ``system.methodHelp`` (the docstring),
``system.methodSignature`` (from the type hints) and ``system.multicall``.

Values: int (i4), boolean, string, double, dateTime.iso8601, base64, struct,
array; ``nil`` and ``i8`` are understood on input always and sent only when
``xmlrpc_allow_none`` / ``xmlrpc_i8`` are on.  A result XML-RPC cannot carry
(None with nil off, an int past 32 bits with i8 off, a set, ...) is a fault
with code -32603 naming the value, never a broken response.  Parameters are
turned into what the hints ask for (a struct into its dataclass, a string into
a Decimal); Decimal results are sent as strings (exact), aware datetimes in UTC.

Bodies are parsed by :mod:`msgd.interfaces.xmlsafe` (no DTD, no entities,
bounded size and depth).  A client that disconnects cancels its call.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import decimal
import re
import weakref
from collections.abc import Mapping
from xml.sax.saxutils import escape

from twisted.internet import defer
from twisted.python.failure import Failure

from msgd.core import errors
from msgd.core import typehints
from msgd.interfaces import xmlsafe
from msgd.interfaces.responder import Answer, CallResource
from msgd.options import boolean, option

EXTENSIONS_NS = "{http://ws.apache.org/xmlrpc/namespaces/extensions}"
MAXINT = 2 ** 31 - 1
MAXI8 = 2 ** 63 - 1
_BAD_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")


@dataclasses.dataclass(frozen=True, kw_only=True)
class XMLRPCOptions:
    """``/RPC2``: XML-RPC (switch ``xmlrpc``)"""

    xmlrpc: bool = option(True, parse=boolean, doc="serve XML-RPC at /RPC2")
    xmlrpc_allow_none: bool = option(False, parse=boolean, doc="send None as the XML-RPC <nil/> extension")
    xmlrpc_i8: bool = option(False, parse=boolean, doc="send integers past 32 bits as the XML-RPC <i8> extension")


class Unsendable(errors.InternalError):
    """A result holds a value XML-RPC (as configured) cannot carry."""


class _Raw(str):
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
            decimal.Decimal: self._decimal, _Raw: self._raw,
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


XML = b"text/xml; charset=utf-8"


def _fault(e: errors.MsgdError) -> Answer:
    return Answer(200, XML, fault(e))


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def refuse(request, error: errors.MsgdError):
    """An XML-RPC body above ``max_body`` still gets a fault (it is refused
    before it is read: see ``http.Mount.refuse``).  SOAP 1.1 also posts
    text/xml, but with a SOAPAction header."""
    ctype = (request.getHeader(b"content-type") or b"").lower()
    if ctype.startswith((b"text/xml", b"application/xml")) and request.getHeader(b"soapaction") is None:
        return b"200 OK", XML, fault(error)
    return None


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


# -- the resource ----------------------------------------------------------------

SYSTEM_HELP = {
    "system.listMethods": "Names of every method this server offers.",
    "system.methodHelp": "The documentation of a method (its docstring).",
    "system.methodSignature": "Signatures of a method, from its type hints: [[result, param, ...], ...].",
    "system.multicall": "Calls [{methodName, params}, ...] in order; returns [[result] or fault struct, ...].",
}
SYSTEM_SIGNATURES = {
    "system.listMethods": [["array"]],
    "system.methodHelp": [["string", "string"]],
    "system.methodSignature": [["array", "string"]],
    "system.multicall": [["array", "array"]],
}


class XMLRPCResource(CallResource):
    """``/RPC2``: decode → ``dispatcher`` → encode, answered through
    :func:`~msgd.interfaces.responder.respond`."""

    def __init__(self, interface):
        super().__init__(interface)
        opts = interface.options
        self.encoder = Encoder(allow_none=opts.xmlrpc_allow_none, i8=opts.xmlrpc_i8)
        self.limits = xmlsafe.Limits(max_size=opts.max_body, max_depth=opts.xml_max_depth)
        self.max_calls = opts.max_batch
        self._signatures: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
        self._coercions: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

    def render_GET(self, request):
        request.setResponseCode(405)
        request.setHeader(b"allow", b"POST")
        request.setHeader(b"content-type", b"text/plain")
        return b"XML-RPC: POST a <methodCall> here\n"

    def render_POST(self, request):
        method = req = None
        try:
            method, params = load_call(xmlsafe.parse(request.content.read(), self.limits))
            req = self.new_request(request)
            outcome = self.call(req, method, params)
        except errors.MsgdError:
            outcome = Failure()
        return self.respond(request, outcome, self.response, _fault, "XML-RPC call {method} failed",
                            request_id=req.id if req is not None else None, method=method)

    def response(self, result) -> Answer:
        try:
            return Answer(200, XML, self.encoder.response(result))
        except errors.MsgdError as e:
            return _fault(e)

    # -- calls ------------------------------------------------------------------

    def signature(self, fn) -> typehints.Signature:
        sig = self._signatures.get(fn)
        if sig is None:
            sig = self._signatures[fn] = typehints.signature(fn)
        return sig

    def coercions(self, fn) -> tuple:
        """(position, parameter) of the parameters whose values must be
        turned into what the hint asks for; most functions have none."""
        found = self._coercions.get(fn)
        if found is None:
            found = self._coercions[fn] = tuple(
                (i, p) for i, p in enumerate(self.signature(fn).params) if typehints.needs_coercion(p.type))
        return found

    def call(self, req, method: str, params: list):
        """The result, or a Deferred when the work goes on; raises a
        MsgdError for what fails at once (``dispatcher.run``)."""
        if method.startswith("system."):
            return self.system(req, method, params)
        try:
            coercions = self.coercions(self.services.apps.resolve(method))
        except errors.NotFound:
            coercions = ()    # the dispatcher answers NotFound (and counts it)
        for i, p in coercions:
            if i < len(params):
                params[i] = typehints.coerce(params[i], p.type, p.name)
        return self.services.dispatcher.run(req, method, params)

    def system(self, req, method: str, params: list):
        apps = self.services.apps
        if method == "system.multicall":
            return self.multicall(req, params)
        access = self.services.access      # listings show, and help describes, only what the caller may call
        if method == "system.listMethods":
            return [t for t in apps.targets() if access.allows(req, t)] + sorted(SYSTEM_HELP)
        if method in ("system.methodHelp", "system.methodSignature"):
            if len(params) != 1 or not isinstance(params[0], str):
                raise errors.InvalidParams(f"{method} takes one method name")
            name = params[0]
            if name in SYSTEM_HELP:
                return SYSTEM_HELP[name] if method == "system.methodHelp" else SYSTEM_SIGNATURES[name]
            access.authorize(req, name)
            sig = self.signature(apps.resolve(name))
            return sig.doc if method == "system.methodHelp" else signatures(sig)
        raise errors.NotFound(f"method not found: {method}")

    def multicall(self, req, params: list):
        if len(params) != 1 or not isinstance(params[0], list):
            raise errors.InvalidParams("system.multicall takes one array of {methodName, params} structs")
        calls = params[0]
        if len(calls) > self.max_calls:
            raise errors.TooLarge(f"more than {self.max_calls} calls in one system.multicall")
        return self._multicall(req, calls)

    @defer.inlineCallbacks
    def _multicall(self, req, calls):
        """Calls run one after another (a later call may depend on an earlier
        one) within the deadline of the whole multicall; each result is
        encoded on its own so one unsendable result faults only its entry."""
        out = []
        for i, c in enumerate(calls):
            try:
                if not isinstance(c, dict) or not isinstance(c.get("methodName"), str) \
                        or not isinstance(c.get("params", []), list):
                    raise errors.InvalidRequest(f"multicall entry {i} is not a {{methodName, params}} struct")
                if c["methodName"] == "system.multicall":
                    raise errors.InvalidRequest("system.multicall cannot be nested")
                result = yield self.call(req.child(), c["methodName"], c.get("params", []))
                out.append(_Raw(self.encoder.value([result])))
            except errors.MsgdError as e:
                out.append(fault_struct(e))
        return out
