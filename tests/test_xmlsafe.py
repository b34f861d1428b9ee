"""Hostile XML: refused by the parser, answered with a fault by both XML
interfaces, with the node unaffected."""

import os
import xmlrpc.client

from lxml import etree
from twisted.internet import defer
from twisted.trial import unittest

from msgd.core import errors
from msgd.xml import safe as xmlsafe
from msgd.interfaces.soap import SOAP11, SOAP12

from tests.helpers import http, http_port, make_node

LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<methodCall><methodName>m.echo</methodName><params><param><value>&lol9;</value></param></params></methodCall>
"""


def xxe(path):
    return (f'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file://{path}">]>'
            f'<methodCall><methodName>m.echo</methodName><params><param><value>&x;</value></param>'
            f'</params></methodCall>').encode()


def deep(n, inner=b"<a>"):
    return inner * n + inner.replace(b"<", b"</") * n


class ParserTests(unittest.TestCase):
    def setUp(self):
        self.secret = os.path.abspath(self.mktemp())
        with open(self.secret, "w") as f:
            f.write("TOP-SECRET")

    def test_billion_laughs(self):
        self.assertRaises(errors.ParseError, xmlsafe.parse, LAUGHS)

    def test_external_entity(self):
        e = self.assertRaises(errors.ParseError, xmlsafe.parse, xxe(self.secret))
        self.assertNotIn("TOP-SECRET", e.message)

    def test_dtd_in_utf16_is_refused_after_parsing(self):
        doc = '<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE r [<!ENTITY x "y">]><r>&x;</r>'
        self.assertRaises(errors.ParseError, xmlsafe.parse, doc.encode("utf-16"))

    def test_parser_never_resolves_even_if_asked_to_parse_a_dtd(self):
        root = etree.fromstring(xxe(self.secret), xmlsafe.make_parser())
        self.assertNotIn("TOP-SECRET", etree.tostring(root).decode())

    def test_size_bound(self):
        e = self.assertRaises(errors.TooLarge, xmlsafe.parse, b"<a>" + b"x" * 2000 + b"</a>",
                              xmlsafe.Limits(max_size=1000))
        self.assertIn("larger than 1000", e.message)

    def test_depth_bound(self):
        limits = xmlsafe.Limits(max_depth=10)
        xmlsafe.parse(deep(10), limits)
        e = self.assertRaises(errors.TooLarge, xmlsafe.parse, deep(11), limits)
        self.assertIn("deeper than 10", e.message)
        # past libxml2's own limit too
        self.assertRaises(errors.TooLarge, xmlsafe.parse, deep(100000), limits)

    def test_depth_bound_without_the_walk(self):
        """Documents with few "<" skip the depth walk; the bound still holds
        at its edge (a self-closed innermost element has no end tag) and in
        other encodings (where the count is not trusted)."""
        limits = xmlsafe.Limits(max_depth=10)
        edge = b"<a>" * 10 + b"<a/>" + b"</a>" * 10        # 11 levels, 21 "<"
        self.assertRaises(errors.TooLarge, xmlsafe.parse, edge, limits)
        xmlsafe.parse(b"<a>" * 9 + b"<a/>" + b"</a>" * 9, limits)
        utf16 = ('<?xml version="1.0" encoding="UTF-16"?>' + "<a>" * 11 + "</a>" * 11).encode("utf-16")
        self.assertRaises(errors.TooLarge, xmlsafe.parse, utf16, limits)
        padded = b"<!-- " + b"</x>" * 30 + b" -->" + deep(11)   # end tags in a comment do not help
        self.assertRaises(errors.TooLarge, xmlsafe.parse, padded, limits)

    def test_malformed_and_empty(self):
        for bad in [b"", b"   ", b"<a>", b"<a></b>", b"\x00\x01"]:
            self.assertRaises(errors.ParseError, xmlsafe.parse, bad)


INI = """
[node]
name = xmlsafe-test
request_timeout = 5s

[interface:web]
type = http
endpoint = tcp:0:interface=127.0.0.1
max_body = 64KiB
xml_max_depth = 32
"""

APPS = {"m.py": "def echo(value):\n    return value\n"}


class HostileRequestTests(unittest.TestCase):
    """Each hostile body gets a fault in the protocol's form; a good call
    right after still works."""

    def setUp(self):
        self.node = make_node(self, INI, APPS)
        self.url = f"http://127.0.0.1:{http_port(self.node)}"
        self.secret = os.path.abspath(self.mktemp())
        with open(self.secret, "w") as f:
            f.write("TOP-SECRET")

    def hostile(self):
        return {
            "billion laughs": (LAUGHS, -32700),
            "external entity": (xxe(self.secret), -32700),
            "deep nesting": (deep(1000, b"<value><array><data>"), -32004),
            "huge body": (b"<methodCall>" + b" " * (200 * 1024) + b"</methodCall>", -32004),
        }

    @defer.inlineCallbacks
    def test_xmlrpc(self):
        for name, (body, code) in self.hostile().items():
            status, _, data = yield http("POST", self.url + "/RPC2", body, {"content-type": "text/xml"})
            self.assertEqual(status, 200, name)
            self.assertNotIn(b"TOP-SECRET", data)
            e = self.assertRaises(xmlrpc.client.Fault, xmlrpc.client.loads, data.decode())
            self.assertEqual(e.faultCode, code, f"{name}: {e.faultString}")
        good = xmlrpc.client.dumps(("still fine",), "m.echo").encode()
        status, _, data = yield http("POST", self.url + "/RPC2", good)
        self.assertEqual(xmlrpc.client.loads(data.decode())[0][0], "still fine")

    @defer.inlineCallbacks
    def test_soap(self):
        for version, headers in ((SOAP11, {"content-type": "text/xml", "soapaction": '"urn:msgd:m#echo"'}),
                                 (SOAP12, {"content-type": "application/soap+xml"})):
            for name, (body, code) in self.hostile().items():
                if name == "deep nesting":
                    body = (f'<e:Envelope xmlns:e="{version}"><e:Body>'.encode() + deep(1000)
                            + b"</e:Body></e:Envelope>")
                status, _, data = yield http("POST", self.url + "/soap/m", body, headers)
                self.assertEqual(status, 500 if version == SOAP11 else 400, name)
                self.assertNotIn(b"TOP-SECRET", data)
                root = etree.fromstring(data)
                self.assertEqual(etree.QName(root).namespace, version, name)
                self.assertEqual(root.findtext(".//{urn:msgd}error/{urn:msgd}code"), str(code), name)
        ok = (f'<e:Envelope xmlns:e="{SOAP11}"><e:Body><m:echo xmlns:m="urn:msgd:m">'
              f'<m:value>"fine"</m:value></m:echo></e:Body></e:Envelope>').encode()
        status, _, data = yield http("POST", self.url + "/soap/m", ok, {"content-type": "text/xml"})
        self.assertEqual(status, 200)
        self.assertEqual(etree.fromstring(data).findtext(".//{urn:msgd:m}result"), '"fine"')
