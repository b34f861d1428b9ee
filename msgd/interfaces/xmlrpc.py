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

Values are read and written by :mod:`msgd.xml.xmlrpc`, bodies parsed by
:mod:`msgd.xml.safe` (no DTD, no entities, bounded size and depth).  A
client that disconnects cancels its call.
"""

from __future__ import annotations

import dataclasses
import weakref

from twisted.internet import defer
from twisted.python.failure import Failure

from msgd.core import errors
from msgd.core import typehints
from msgd.interfaces.responder import Answer, CallResource
from msgd.options import boolean, option
from msgd.xml import safe as xmlsafe
from msgd.xml.xmlrpc import Encoder, Raw, fault, fault_struct, load_call, signatures


@dataclasses.dataclass(frozen=True, kw_only=True)
class XMLRPCOptions:
    """``/RPC2``: XML-RPC (switch ``xmlrpc``)"""

    xmlrpc: bool = option(True, parse=boolean, doc="serve XML-RPC at /RPC2")
    xmlrpc_allow_none: bool = option(False, parse=boolean, doc="send None as the XML-RPC <nil/> extension")
    xmlrpc_i8: bool = option(False, parse=boolean, doc="send integers past 32 bits as the XML-RPC <i8> extension")


XML = b"text/xml; charset=utf-8"


def _fault(e: errors.MsgdError) -> Answer:
    return Answer(200, XML, fault(e))


def refuse(request, error: errors.MsgdError):
    """An XML-RPC body above ``max_body`` still gets a fault (it is refused
    before it is read: see ``http.Mount.refuse``).  SOAP 1.1 also posts
    text/xml, but with a SOAPAction header."""
    ctype = (request.getHeader(b"content-type") or b"").lower()
    if ctype.startswith((b"text/xml", b"application/xml")) and request.getHeader(b"soapaction") is None:
        return b"200 OK", XML, fault(error)
    return None



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
                out.append(Raw(self.encoder.value([result])))
            except errors.MsgdError as e:
                out.append(fault_struct(e))
        return out

