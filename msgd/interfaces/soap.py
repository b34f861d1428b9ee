"""SOAP 1.1 and 1.2 under ``/soap/`` on the HTTP Site (key ``soap`` of
``type = http``): every app module is a service.

Wire protocol::

    GET  /soap/                   a page listing the services and their WSDLs
    GET  /soap/MODULE?wsdl        WSDL 1.1, document/literal wrapped, with a SOAP 1.1
                                  and a SOAP 1.2 binding (see :mod:`.service`)
    POST /soap/MODULE             Content-Type text/xml (1.1, SOAPAction ignored) or
                                  application/soap+xml (1.2); the Body holds tns:FUNCTION

Answers use the envelope version of the request.  Errors are SOAP Faults
(HTTP 500; 400 for a 1.2 ``env:Sender`` fault) whose detail carries the
taxonomy's code and name::

    <detail><m:error xmlns:m="urn:msgd"><m:code>-32602</m:code>
      <m:name>invalid_params</m:name></m:error></detail>

The client is at fault (``Client``/``Sender``) for parse_error,
invalid_request, not_found, invalid_params, unauthorized and too_large; the
server (``Server``/``Receiver``) otherwise.  Headers marked mustUnderstand
get a ``MustUnderstand`` fault: msgd understands none.

The WSDL of a module is rebuilt when the module reloads (its version
changes), so a changed signature shows on the next fetch.  The address in it
is ``soap_address`` + MODULE when configured, else taken from the request.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass

from lxml import etree
from twisted.python.failure import Failure
from twisted.web import pages

from msgd.core import errors
from msgd.xml import safe as xmlsafe
from msgd.interfaces.responder import Answer, CallResource
from msgd.xml.soap import Service
from msgd.options import boolean, option

SOAP11 = "http://schemas.xmlsoap.org/soap/envelope/"
SOAP12 = "http://www.w3.org/2003/05/soap-envelope"
FAULT_NS = "urn:msgd"
CONTENT_TYPES = {SOAP11: b"text/xml; charset=utf-8", SOAP12: b"application/soap+xml; charset=utf-8"}
CLIENT_ERRORS = (errors.ParseError, errors.InvalidRequest, errors.NotFound, errors.InvalidParams,
                 errors.Unauthorized, errors.TooLarge)
_HOST = re.compile(rb"^[A-Za-z0-9.\-]+(:\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](:\d{1,5})?$")


@dataclass(frozen=True, kw_only=True)
class SOAPOptions:
    """``/soap/``: SOAP (switch ``soap``)"""

    soap: bool = option(True, parse=boolean, doc="serve SOAP 1.1/1.2 at /soap/MODULE (WSDL at ?wsdl)")
    soap_address: str = option("", doc="base URL of /soap/ put in WSDLs (default: from each request)")


class MustUnderstand(errors.InvalidRequest):
    """A header the client marked mustUnderstand (msgd understands none)."""


def fault(version: str, e: errors.MsgdError) -> tuple[int, bytes]:
    """(HTTP status, envelope) of a SOAP Fault for ``e``."""
    env = etree.Element(f"{{{version}}}Envelope", nsmap={"soap": version})
    f = etree.SubElement(etree.SubElement(env, f"{{{version}}}Body"), f"{{{version}}}Fault")
    client = isinstance(e, CLIENT_ERRORS)
    if version == SOAP11:
        code = "MustUnderstand" if isinstance(e, MustUnderstand) else ("Client" if client else "Server")
        etree.SubElement(f, "faultcode").text = f"soap:{code}"
        etree.SubElement(f, "faultstring").text = e.message
        detail = etree.SubElement(f, "detail")
        status = 500
    else:
        code = "MustUnderstand" if isinstance(e, MustUnderstand) else ("Sender" if client else "Receiver")
        etree.SubElement(etree.SubElement(f, f"{{{version}}}Code"), f"{{{version}}}Value").text = f"soap:{code}"
        text = etree.SubElement(etree.SubElement(f, f"{{{version}}}Reason"), f"{{{version}}}Text")
        text.text = e.message
        text.set("{http://www.w3.org/XML/1998/namespace}lang", "en")
        detail = etree.SubElement(f, f"{{{version}}}Detail")
        status = 400 if client and not isinstance(e, MustUnderstand) else 500
    error = etree.SubElement(detail, f"{{{FAULT_NS}}}error", nsmap={"m": FAULT_NS})
    etree.SubElement(error, f"{{{FAULT_NS}}}code").text = str(e.code)
    etree.SubElement(error, f"{{{FAULT_NS}}}name").text = e.name
    return status, etree.tostring(env, xml_declaration=True, encoding="UTF-8")


def _answer(version: str, status_body: tuple[int, bytes]) -> Answer:
    status, body = status_body
    return Answer(status, CONTENT_TYPES[version], body)


def refuse(request, error: errors.MsgdError):
    """A SOAP body above ``max_body`` still gets a Fault (it is refused
    before it is read: see ``http.Mount.refuse``).  SOAP 1.2 is told by its
    content type, SOAP 1.1 by its SOAPAction header."""
    ctype = (request.getHeader(b"content-type") or b"").lower()
    if ctype.startswith(b"application/soap+xml"):
        version = SOAP12
    elif ctype.startswith(b"text/xml") and request.getHeader(b"soapaction") is not None:
        version = SOAP11
    else:
        return None
    status, body = fault(version, error)
    return (b"400 Bad Request" if status == 400 else b"500 Internal Server Error"), CONTENT_TYPES[version], body


def _true(value) -> bool:
    return value in ("1", "true")


class SOAPResource(CallResource):
    """``/soap/``: the services, their WSDLs and their calls (answered
    through :func:`~msgd.interfaces.responder.respond`)."""

    def __init__(self, interface):
        super().__init__(interface)
        opts = interface.options
        self.limits = xmlsafe.Limits(max_size=opts.max_body, max_depth=opts.xml_max_depth)
        self.base_address = opts.soap_address
        self._services: dict[str, Service] = {}

    def service(self, name: str) -> Service:
        """The Service of the current version of module ``name``."""
        app = self.services.apps.modules.get(name)
        if app is None:
            self._services.pop(name, None)
            raise errors.NotFound(f"no app module {name!r}")
        svc = self._services.get(name)
        if svc is None or svc.version != app.version:
            svc = self._services[name] = Service(name, app)
        return svc

    def address(self, request, name: str) -> str:
        if self.base_address:
            return self.base_address.rstrip("/") + "/" + name
        host = request.getHeader(b"host")
        if host and _HOST.match(host):
            host = host.decode("ascii")
        else:    # no Host, or one that could inject markup or another address
            h = request.getHost()
            host = f"{h.host}:{h.port}"
        scheme = "https" if request.isSecure() else "http"
        return f"{scheme}://{host}/soap/{name}"

    @staticmethod
    def _path(request) -> list[str]:
        return [p.decode("utf-8", "replace") for p in request.postpath if p]

    # -- GET: index and WSDL -------------------------------------------------------

    def render_GET(self, request):
        path = self._path(request)
        if not path:
            return self._index(request)
        name = path[0]
        try:
            if len(path) > 1:
                raise errors.NotFound("no such SOAP resource")
            svc = self.service(name)
        except errors.NotFound as e:
            return pages.notFound("No such service", e.message).render(request)
        query = request.uri.partition(b"?")[2].lower()
        if query.split(b"&")[0] != b"wsdl":
            request.setResponseCode(400)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return f"POST SOAP requests here; the WSDL is at /soap/{name}?wsdl\n".encode()
        request.setHeader(b"content-type", b"text/xml; charset=utf-8")
        return svc.wsdl(self.address(request, name))

    def _index(self, request):
        rows = "".join(f'<li><a href="{html.escape(n)}?wsdl">{html.escape(n)}</a></li>'
                       for n in sorted(self.services.apps.modules))
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return (f"<!doctype html><meta charset=utf-8><title>SOAP services</title>"
                f"<h1>SOAP services</h1><ul>{rows}</ul>").encode()

    # -- POST: calls -----------------------------------------------------------------

    def render_POST(self, request):
        ctype = (request.getHeader(b"content-type") or b"").lower()
        version = SOAP12 if ctype.startswith(b"application/soap+xml") else SOAP11
        svc = op = req = None
        try:
            version, svc, op, kwargs = self._decode(request)
            req = self.new_request(request)
            outcome = self.services.dispatcher.run(req, f"{svc.name}.{op}", (), kwargs)
        except errors.MsgdError as e:
            version = getattr(e, "soap_version", version)
            outcome = Failure()
        return self.respond(request, outcome, lambda result: _answer(version, self.response(version, svc, op, result)),
                            lambda e: _answer(version, fault(version, e)), "SOAP call {module}.{op} failed",
                            request_id=req.id if req is not None else None,
                            module=svc.name if svc is not None else None, op=op)

    @staticmethod
    def response(version: str, svc: Service, op: str, result) -> tuple[int, bytes]:
        """(HTTP status, envelope) answering ``op`` with ``result``."""
        env = etree.Element(f"{{{version}}}Envelope", nsmap={"soap": version})
        try:
            svc.encode_result(etree.SubElement(env, f"{{{version}}}Body"), op, result)
        except errors.MsgdError as e:
            return fault(version, e)
        return 200, etree.tostring(env, xml_declaration=True, encoding="UTF-8")

    def _decode(self, request):
        """(envelope version, Service, function, kwargs) of a call; errors
        found after the envelope is known carry its version."""
        path = self._path(request)
        if len(path) != 1:
            raise errors.NotFound("POST to /soap/MODULE")
        name = path[0]
        root = xmlsafe.parse(request.content.read(), self.limits)
        ns = etree.QName(root).namespace
        if etree.QName(root).localname != "Envelope" or ns not in (SOAP11, SOAP12):
            raise errors.InvalidRequest("not a SOAP 1.1 or 1.2 Envelope")
        try:
            header = root.find(f"{{{ns}}}Header")
            for h in (header if header is not None else ()):
                if isinstance(h.tag, str) and _true(h.get(f"{{{ns}}}mustUnderstand")):
                    raise MustUnderstand(f"header {h.tag} is not understood")
            body = root.find(f"{{{ns}}}Body")
            ops = [c for c in body if isinstance(c.tag, str)] if body is not None else []
            if len(ops) != 1:
                raise errors.InvalidRequest("the SOAP Body must hold exactly one element")
            self.services.access.check_visible(self.interface.name, getattr(request, "principal", None),
                                               f"{name}.{etree.QName(ops[0]).localname}")
            svc = self.service(name)
            op, kwargs = svc.decode_call(ops[0])
        except errors.MsgdError as e:
            e.soap_version = ns
            raise
        return ns, svc, op, kwargs
