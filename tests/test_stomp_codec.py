"""The STOMP codec: round-trips, escaping, content-length bodies, bounds,
heart-beat and version negotiation; and that arbitrary bytes never raise
anything but ProtocolError."""

from hypothesis import given, settings, strategies as st
from twisted.trial import unittest

from msgd.stomp.codec import (Decoder, Frame, Limits, ProtocolError, encode, negotiate_heartbeat, negotiate_version,
                              parse_heartbeat, unescape)
from tests.helpers import stomp_frames

COMMANDS = st.sampled_from(["SEND", "MESSAGE", "SUBSCRIBE", "ACK", "RECEIPT", "ERROR", "CONNECT", "CONNECTED"])
ANY_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=30)
PLAIN_TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\r\n:"), max_size=30)
BODIES = st.binary(max_size=300)


@st.composite
def frames(draw, version):
    command = draw(COMMANDS)
    raw = version == "1.0" or command in ("CONNECT", "CONNECTED")
    key = PLAIN_TEXT if raw else (ANY_TEXT if version == "1.2" else ANY_TEXT.filter(lambda t: "\r" not in t))
    value = PLAIN_TEXT if raw else key
    headers = draw(st.lists(st.tuples(key.filter(lambda k: k != "content-length"), value), max_size=8))
    return Frame(command, headers, draw(BODIES))




def without_length(frame: Frame) -> list:
    return [h for h in frame.headers if h[0] != "content-length"]


class RoundTrip(unittest.TestCase):
    def check(self, frame, version, chunk):
        data = encode(frame, version)
        got = stomp_frames(data + b"\n" + data, version, chunk)
        self.assertEqual(len(got), 2)
        for g in got:
            self.assertEqual((g.command, without_length(g), g.body), (frame.command, frame.headers, frame.body))

    @settings(max_examples=200, deadline=None)
    @given(frames("1.2"), st.integers(0, 17))
    def test_round_trip_12(self, frame, chunk):
        self.check(frame, "1.2", chunk)

    @settings(max_examples=100, deadline=None)
    @given(frames("1.1"), st.integers(0, 17))
    def test_round_trip_11(self, frame, chunk):
        self.check(frame, "1.1", chunk)

    @settings(max_examples=100, deadline=None)
    @given(frames("1.0"), st.integers(0, 17))
    def test_round_trip_10(self, frame, chunk):
        self.check(frame, "1.0", chunk)

    def test_headers_with_and_without_escapes(self):
        # nothing to escape: the header block in one piece; else header by header, as before
        self.assertEqual(encode(Frame("MESSAGE", [("a", "1"), ("b", "x y")], b"hi")),
                         b"MESSAGE\na:1\nb:x y\ncontent-length:2\n\nhi\0")
        self.assertEqual(encode(Frame("MESSAGE", [("content-length", "2"), ("a", "1")], b"hi")),
                         b"MESSAGE\ncontent-length:2\na:1\n\nhi\0")
        self.assertEqual(encode(Frame("MESSAGE", [("a", "1"), ("content-length", "2")], b"hi")),
                         b"MESSAGE\na:1\ncontent-length:2\n\nhi\0")
        self.assertEqual(encode(Frame("MESSAGE", [("a:b", "x\\y"), ("c", "1\r\n2")])),
                         b"MESSAGE\na\\cb:x\\\\y\nc:1\\r\\n2\n\n\0")
        self.assertEqual(encode(Frame("MESSAGE", [("a", "x:y")]), "1.1"), b"MESSAGE\na:x\\cy\n\n\0")
        self.assertEqual(encode(Frame("RECEIPT")), b"RECEIPT\n\n\0")

    def test_unencodable_headers(self):
        self.assertRaises(ProtocolError, encode, Frame("SEND", [("a", "x\ny")]), "1.0")
        self.assertRaises(ProtocolError, encode, Frame("SEND", [("a", "x\ry")]), "1.1")
        self.assertRaises(ProtocolError, encode, Frame("CONNECT", [("a", "x\ny")]), "1.2")


class Arbitrary(unittest.TestCase):
    @settings(max_examples=400, deadline=None)
    @given(st.binary(max_size=400), st.sampled_from(["1.0", "1.1", "1.2"]))
    def test_garbage_only_protocol_errors(self, data, version):
        d = Decoder(Limits(max_frame=200, max_headers=4, max_header_length=50, max_body=100), version)
        try:
            d.feed(data)
            while d.pending() and d.feed(b""):
                pass
        except ProtocolError:
            pass

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.sampled_from([b"SEND\n", b"a:b\n", b"\n", b"\0", b"content-length:", b"3", b"\\", b"\\c",
                                     b"\r\n", b"x", b"CONNECT\n", b"\xff"]), max_size=30))
    def test_structured_garbage(self, parts):
        d = Decoder(Limits(max_frame=100, max_headers=3, max_header_length=20, max_body=10))
        try:
            d.feed(b"".join(parts))
        except ProtocolError:
            pass


class Details(unittest.TestCase):
    def test_crlf_and_heartbeats(self):
        got = Decoder().feed(b"\r\n\n\r\nSEND\r\ndestination:/topic/a\r\n\r\nhi\0\n\n")
        self.assertEqual((got[0].command, got[0].get("destination"), got[0].body), ("SEND", "/topic/a", b"hi"))

    def test_first_repeated_header_wins(self):
        f = Decoder().feed(b"MESSAGE\nfoo:1\nfoo:2\n\n\0")[0]
        self.assertEqual(f.get("foo"), "1")

    def test_bad_escape(self):
        self.assertRaises(ProtocolError, Decoder().feed, b"SEND\na:\\t\n\n\0")
        self.assertEqual(unescape("a\\cb", "1.0"), "a\\cb")

    def test_connect_is_never_unescaped(self):
        f = Decoder().feed(b"CONNECT\nlogin:a\\cb\n\n\0")[0]
        self.assertEqual(f.get("login"), "a\\cb")

    def test_content_length_body_with_nuls(self):
        f = Decoder().feed(b"SEND\ncontent-length:3\n\n\0\0\0\0")[0]
        self.assertEqual(f.body, b"\0\0\0")
        self.assertRaises(ProtocolError, Decoder().feed, b"SEND\ncontent-length:2\n\nabc\0")
        self.assertRaises(ProtocolError, Decoder().feed, b"SEND\ncontent-length:-1\n\n\0")

    def test_bounds(self):
        lim = Limits(max_frame=100, max_headers=2, max_header_length=20, max_body=10)
        self.assertRaises(ProtocolError, Decoder(lim).feed, b"SEND\na:1\nb:2\nc:3\n\n\0")
        self.assertRaises(ProtocolError, Decoder(lim).feed, b"SEND\na:" + b"x" * 30 + b"\n\n\0")
        self.assertRaises(ProtocolError, Decoder(lim).feed, b"SEND\n\n" + b"x" * 11)        # no NUL yet
        self.assertRaises(ProtocolError, Decoder(lim).feed, b"SEND\ncontent-length:11\n\n")
        self.assertRaises(ProtocolError, Decoder(lim).feed, b"SEND\n" + b"a:b\n" * 40)    # endless head
        self.assertRaises(ProtocolError, Decoder(lim).feed, b"send\n\n\0")
        self.assertRaises(ProtocolError, Decoder(lim).feed, b"X" * 100)

    def test_versions(self):
        self.assertEqual(negotiate_version("1.0,1.1,1.2"), "1.2")
        self.assertEqual(negotiate_version("1.1"), "1.1")
        self.assertEqual(negotiate_version(None), "1.0")
        self.assertEqual(negotiate_version(None, "1.2"), "1.2")
        self.assertRaises(ProtocolError, negotiate_version, "2.0")

    def test_heartbeats(self):
        self.assertEqual(parse_heartbeat("100,200"), (100, 200))
        self.assertRaises(ProtocolError, parse_heartbeat, "x,1")
        self.assertEqual(negotiate_heartbeat((100, 5000), (1000, 1000)), (5000, 1000))
        self.assertEqual(negotiate_heartbeat((0, 0), (1000, 1000)), (0, 0))
        self.assertEqual(negotiate_heartbeat((100, 0), (1000, 0)), (0, 0))
