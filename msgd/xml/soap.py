"""One app module seen as a SOAP service: its WSDL, generated from the
exported functions' type hints, and the codec between its XML elements and
Python values.

Document/literal wrapped: operation ``f`` takes one element ``tns:f`` whose
children are the parameters (in order) and answers ``tns:fResponse`` holding
``result``.  The target namespace is ``urn:msgd:MODULE``.

=========================  ========================================================
hint                       XML Schema
=========================  ========================================================
``str``                    ``xsd:string``
``int``                    ``xsd:long``
``float``                  ``xsd:double``
``bool``                   ``xsd:boolean``
``bytes``                  ``xsd:base64Binary``
``datetime``               ``xsd:dateTime``
``date``                   ``xsd:date``
``Decimal``                ``xsd:decimal``
``list[T]``                the element repeated (``maxOccurs="unbounded"``);
                           a list of lists repeats an ``item`` element inside;
                           no element is an empty list
``T | None``               ``minOccurs="0" nillable="true"``
a parameter with default   ``minOccurs="0"``
dataclass / TypedDict      a named ``xsd:complexType`` (a sequence of its fields)
anything else              ``xsd:string`` holding JSON
=========================  ========================================================

A Service is built for one version of a module (``AppModule.version``);
the resource builds a new one when the module reloads.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import json

from lxml import etree

from msgd.core import errors
from msgd.core import typehints
from msgd.core.typehints import Type

XSD = "http://www.w3.org/2001/XMLSchema"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
WSDL = "http://schemas.xmlsoap.org/wsdl/"
WSDL_SOAP11 = "http://schemas.xmlsoap.org/wsdl/soap/"
WSDL_SOAP12 = "http://schemas.xmlsoap.org/wsdl/soap12/"
HTTP_TRANSPORT = "http://schemas.xmlsoap.org/soap/http"
XSI_NIL = f"{{{XSI}}}nil"

XSD_TYPES = {
    "str": "string", "int": "long", "float": "double", "bool": "boolean", "bytes": "base64Binary",
    "datetime": "dateTime", "date": "date", "decimal": "decimal", "any": "string",
}


def namespace(module: str) -> str:
    return f"urn:msgd:{module}"


# -- values --------------------------------------------------------------------

def _bool(text: str) -> bool:
    t = text.strip()
    if t in ("true", "1"):
        return True
    if t in ("false", "0"):
        return False
    raise ValueError(f"{text!r} is not a boolean")


def _datetime(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.strip())


_DECODE = {
    "str": lambda t: t, "int": lambda t: int(t.strip()), "float": lambda t: float(t.strip()),
    "bool": _bool, "bytes": lambda t: base64.b64decode("".join(t.split()), validate=True),
    "datetime": _datetime, "date": lambda t: datetime.date.fromisoformat(t.strip()),
    "decimal": lambda t: decimal.Decimal(t.strip()), "any": json.loads,
}


def _decimal_text(v) -> str:
    if isinstance(v, decimal.Decimal):
        if not v.is_finite():
            raise ValueError(f"{v} is not a finite decimal")
        return format(v, "f")
    return format(decimal.Decimal(str(v)), "f")


def _float_text(v) -> str:
    v = float(v)
    if v != v:
        return "NaN"
    if v in (float("inf"), float("-inf")):
        return "INF" if v > 0 else "-INF"
    return repr(v)


def _check(v, types_: tuple, kind: str):
    if not isinstance(v, types_) or (isinstance(v, bool) and bool not in types_):
        raise TypeError(f"expected {kind}, got {type(v).__name__}")
    return v


def _long_text(v: int) -> str:
    if not -2 ** 63 <= v < 2 ** 63:
        raise ValueError(f"{v} does not fit in xsd:long")
    return str(v)


def _date_text(v) -> str:
    if isinstance(v, datetime.datetime):
        v = v.date()
    return _check(v, (datetime.date,), "date").isoformat()


_ENCODE = {
    "str": lambda v: _check(v, (str,), "str"),
    "int": lambda v: _long_text(_check(v, (int,), "int")),
    "float": lambda v: _float_text(_check(v, (int, float, decimal.Decimal), "float")),
    "bool": lambda v: "true" if _check(v, (bool,), "bool") else "false",
    "bytes": lambda v: base64.b64encode(_check(v, (bytes, bytearray), "bytes")).decode("ascii"),
    "datetime": lambda v: _check(v, (datetime.datetime,), "datetime").isoformat(),
    "date": _date_text,
    "decimal": lambda v: _decimal_text(_check(v, (decimal.Decimal, int, float), "decimal")),
    "any": lambda v: json.dumps(v, default=_json_default),
}


def _json_default(v):
    if isinstance(v, (datetime.date, datetime.datetime)):
        return v.isoformat()
    if isinstance(v, decimal.Decimal):
        return str(v)
    if isinstance(v, (bytes, bytearray)):
        return base64.b64encode(v).decode("ascii")
    members = typehints.members(v)
    if isinstance(members, dict):
        return members
    raise TypeError(f"{type(v).__name__} is not JSON serialisable")


def _absent_lists(fields, values: dict) -> dict:
    """An absent repeated element is an empty list: a list is declared
    ``minOccurs="0"``, and SOAP stacks (zeep, suds) send nothing for ``[]``."""
    for f in fields:
        if f.name not in values and f.type.kind == "list" and not f.type.optional:
            values[f.name] = []
    return values


def _local(tag) -> str:
    return tag.rpartition("}")[2] if isinstance(tag, str) else ""


# -- the service -----------------------------------------------------------------

class Service:
    """The SOAP view of one version of an app module."""

    def __init__(self, name: str, app):
        self.name = name
        self.version = app.version
        self.tns = namespace(name)
        self.doc = (app.module.__doc__ or "").strip()
        self.operations: dict[str, typehints.Signature] = {
            fname: typehints.signature(fn) for fname, fn in sorted(app.exports.items())}
        self._wsdl: dict[str, bytes] = {}
        self._type_names: dict[type, str] = {}

    # -- decoding ----------------------------------------------------------------

    def decode_call(self, op_el) -> tuple[str, dict]:
        """(function name, kwargs) of the body's operation element."""
        op = _local(op_el.tag)
        sig = self.operations.get(op)
        if sig is None or etree.QName(op_el).namespace not in (self.tns, None):
            raise errors.NotFound(f"method not found: {self.name}.{op} "
                                  f"(element {{{etree.QName(op_el).namespace or ''}}}{op})")
        children = self._children(op_el)
        known = {p.name for p in sig.params}
        unknown = sorted(set(children) - known)
        if unknown:
            raise errors.InvalidParams(f"{self.name}.{op}: unknown parameter(s) {', '.join(unknown)}")
        kwargs = {p.name: self._decode_field(children[p.name], p, p.name) for p in sig.params if p.name in children}
        return op, _absent_lists(sig.params, kwargs)

    @staticmethod
    def _children(el) -> dict[str, list]:
        out: dict[str, list] = {}
        for child in el:
            if isinstance(child.tag, str):
                out.setdefault(_local(child.tag), []).append(child)
        return out

    def _decode_field(self, els: list, f: typehints.Field, where: str):
        t = f.type
        if t.kind == "list":
            item = t.item
            assert item is not None   # a list type always has its item type
            return [self._decode(e, item, f"{where}[{i}]") for i, e in enumerate(els)]
        if len(els) > 1:
            raise errors.InvalidParams(f"{where} given {len(els)} times")
        return self._decode(els[0], t, where)

    def _decode(self, el, t: Type, where: str):
        if el.get(XSI_NIL) in ("true", "1"):
            return None
        try:
            if t.kind == "list":
                item = t.item
                assert item is not None
                return [self._decode(e, item, f"{where}[{i}]") for i, e in enumerate(el) if _local(e.tag) == "item"]
            if t.kind == "struct":
                children = self._children(el)
                unknown = set(children) - {f.name for f in t.fields}
                values = {f.name: self._decode_field(children[f.name], f, f"{where}.{f.name}")
                          for f in t.fields if f.name in children}
                return typehints.build_struct(t, _absent_lists(t.fields, values), where, unknown)
            if len(el):
                raise ValueError("expected text, got elements")
            return _DECODE.get(t.kind, _DECODE["any"])(el.text or "")
        except (ValueError, ArithmeticError, TypeError) as e:
            kind = "JSON text" if t.kind == "any" else XSD_TYPES.get(t.kind, t.kind)   # any: xsd:string of JSON
            raise errors.InvalidParams(f"{where}: not a valid {kind}: {e}") from None

    # -- encoding ----------------------------------------------------------------

    def encode_result(self, body, op: str, value) -> None:
        """Append ``tns:opResponse`` holding ``value`` to the SOAP Body."""
        sig = self.operations[op]
        wrapper = etree.SubElement(body, f"{{{self.tns}}}{op}Response")
        if sig.result.kind == "none":
            return
        try:
            self._encode_field(wrapper, "result", sig.result, value)
        except (TypeError, ValueError) as e:
            raise errors.InternalError(f"result of {self.name}.{op} cannot be sent as its hint "
                                       f"{XSD_TYPES.get(sig.result.kind, sig.result.name)} says: {e}") from None

    def _encode_field(self, parent, name: str, t: Type, value) -> None:
        if t.kind == "list":
            if value is None:
                return
            assert t.item is not None
            for v in value:
                self._encode(parent, name, t.item, v)
        else:
            self._encode(parent, name, t, value)

    def _encode(self, parent, name: str, t: Type, value) -> None:
        el = etree.SubElement(parent, f"{{{self.tns}}}{name}")
        if value is None:
            el.set(XSI_NIL, "true")
            return
        if t.kind == "list":
            assert t.item is not None
            for v in value:
                self._encode(el, "item", t.item, v)
        elif t.kind == "struct":
            members = typehints.members(value)
            if not isinstance(members, dict):
                raise TypeError(f"expected {t.name}, got {type(value).__name__}")
            for f in t.fields:
                v = members.get(f.name)
                if v is None and not f.type.optional and f.type.kind != "any":
                    if f.required and f.type.kind != "list":
                        raise TypeError(f"{t.name}.{f.name} is missing")
                    continue
                self._encode_field(el, f.name, f.type, v)
        else:
            el.text = _ENCODE[t.kind](value)

    # -- WSDL --------------------------------------------------------------------

    def wsdl(self, address: str) -> bytes:
        doc = self._wsdl.get(address)
        if doc is None:
            if len(self._wsdl) > 16:    # addresses come from Host headers: keep a few
                self._wsdl.clear()
            doc = self._wsdl[address] = self._build_wsdl(address)
        return doc

    def _type_name(self, cls: type) -> str:
        name = self._type_names.get(cls)
        if name is None:
            taken = set(self._type_names.values())
            name, n = cls.__name__, 2
            while name in taken:
                name, n = f"{cls.__name__}{n}", n + 1
            self._type_names[cls] = name
        return name

    def _build_wsdl(self, address: str) -> bytes:
        W, S = f"{{{WSDL}}}", f"{{{XSD}}}"
        tns = self.tns
        nsmap = {"wsdl": WSDL, "xsd": XSD, "soap": WSDL_SOAP11, "soap12": WSDL_SOAP12, "tns": tns}
        root = etree.Element(W + "definitions", nsmap=nsmap, name=self.name, targetNamespace=tns)
        if self.doc:
            etree.SubElement(root, W + "documentation").text = self.doc
        schema = etree.SubElement(etree.SubElement(root, W + "types"), S + "schema",
                                  targetNamespace=tns, elementFormDefault="qualified")
        structs: dict[type, Type] = {}

        def element(parent, name: str, t: Type, required: bool):
            el = etree.SubElement(parent, S + "element", name=name)
            if t.kind == "list":
                el.set("minOccurs", "0")
                el.set("maxOccurs", "unbounded")
                assert t.item is not None
                t = t.item
            elif not required or t.optional:
                el.set("minOccurs", "0")
            if t.optional:
                el.set("nillable", "true")
            if t.kind == "list":     # a list inside a list: an element holding repeated <item>
                element(etree.SubElement(etree.SubElement(el, S + "complexType"), S + "sequence"),
                        "item", t, True)
            elif t.kind == "struct":
                assert t.cls is not None   # a struct type always has its class
                structs.setdefault(t.cls, t)
                el.set("type", "tns:" + self._type_name(t.cls))
            else:
                el.set("type", "xsd:" + XSD_TYPES[t.kind])
            return el

        for op, sig in self.operations.items():
            seq = etree.SubElement(etree.SubElement(etree.SubElement(schema, S + "element", name=op),
                                                    S + "complexType"), S + "sequence")
            for p in sig.params:
                element(seq, p.name, p.type, p.required)
            seq = etree.SubElement(etree.SubElement(etree.SubElement(schema, S + "element", name=op + "Response"),
                                                    S + "complexType"), S + "sequence")
            if sig.result.kind != "none":
                element(seq, "result", sig.result, False)
        done: set = set()
        while len(done) < len(structs):      # nested structs are found while writing their parents
            for cls, t in list(structs.items()):
                if cls in done:
                    continue
                done.add(cls)
                ct = etree.SubElement(schema, S + "complexType", name=self._type_name(cls))
                seq = etree.SubElement(ct, S + "sequence")
                for f in t.fields:
                    element(seq, f.name, f.type, f.required)

        for op in self.operations:
            for suffix, el in (("Request", op), ("Response", op + "Response")):
                m = etree.SubElement(root, W + "message", name=op + suffix)
                etree.SubElement(m, W + "part", name="parameters", element="tns:" + el)
        port_type = etree.SubElement(root, W + "portType", name=self.name + "PortType")
        for op, sig in self.operations.items():
            o = etree.SubElement(port_type, W + "operation", name=op)
            if sig.doc:
                etree.SubElement(o, W + "documentation").text = sig.doc
            etree.SubElement(o, W + "input", message=f"tns:{op}Request")
            etree.SubElement(o, W + "output", message=f"tns:{op}Response")
        service = etree.Element(W + "service", name=self.name)
        for label, ns in (("Soap11", WSDL_SOAP11), ("Soap12", WSDL_SOAP12)):
            binding = etree.SubElement(root, W + "binding", name=self.name + label,
                                       type=f"tns:{self.name}PortType")
            etree.SubElement(binding, f"{{{ns}}}binding", style="document", transport=HTTP_TRANSPORT)
            for op in self.operations:
                o = etree.SubElement(binding, W + "operation", name=op)
                etree.SubElement(o, f"{{{ns}}}operation", soapAction=f"{tns}#{op}", style="document")
                for direction in ("input", "output"):
                    etree.SubElement(etree.SubElement(o, W + direction), f"{{{ns}}}body", use="literal")
            port = etree.SubElement(service, W + "port", name=self.name + label, binding=f"tns:{self.name}{label}")
            etree.SubElement(port, f"{{{ns}}}address", location=address)
        root.append(service)
        return etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=True)
