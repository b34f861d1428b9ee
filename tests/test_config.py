import os

from twisted.trial import unittest

from msgd import config
from msgd.config import ConfigError, parse_text

from tests.helpers import ROOT

GOOD = """
[node]
name = n1
apps = apps
state_dir = var
request_timeout = 2.5s
threads = 4

[interface:web]
type = http
endpoint = tcp:0:interface=127.0.0.1
max_body = 64KiB

[pubsub]
history_size = 50
history_age = 10m

[channel:news.*]
history_size = 5

[peer:other]
endpoints = tcp:host=127.0.0.1:port=9999 tcp:host=127.0.0.1:port=9998
username = a
password = b
"""


class ParseTests(unittest.TestCase):
    def parse(self, text):
        return parse_text(text, "/etc/msgd/n.ini")

    def error(self, text) -> ConfigError:
        return self.assertRaises(ConfigError, self.parse, text)

    def test_good(self):
        c = self.parse(GOOD)
        self.assertEqual(c.node.name, "n1")
        self.assertEqual(c.node.apps, "/etc/msgd/apps")     # relative to the file
        self.assertEqual(c.node.request_timeout, 2.5)
        self.assertEqual(c.node.threads, 4)
        web = c.interface("web")
        self.assertEqual(web.type, "http")
        self.assertEqual(web.options.max_body, 64 * 1024)
        self.assertEqual(c.pubsub.history_size, 50)
        self.assertEqual(c.pubsub.history_age, 600)
        self.assertEqual(c.channels[0][0], "news.*")
        self.assertEqual(c.channels[0][1].history_size, 5)
        self.assertEqual(c.peers[0][1].endpoints[1], "tcp:host=127.0.0.1:port=9998")

    def test_frozen(self):
        c = self.parse(GOOD)
        self.assertRaises(Exception, setattr, c.node, "name", "x")

    def test_equal_sections_compare_equal(self):
        self.assertEqual(self.parse(GOOD).interface("web"), self.parse(GOOD).interface("web"))

    def test_defaults(self):
        c = self.parse("")
        self.assertEqual(c.node.request_timeout, 30.0)
        self.assertEqual(c.interfaces, ())

    def test_unknown_key_did_you_mean(self):
        e = self.error("[interface:web]\ntype = http\nendpont = tcp:0\n")
        self.assertEqual(str(e), "/etc/msgd/n.ini: [interface:web] endpont: unknown key (did you mean 'endpoint'?)")

    def test_missing_key(self):
        e = self.error("[interface:web]\ntype = http\n")
        self.assertEqual((e.section, e.key), ("interface:web", "endpoint"))
        self.assertIn("missing required key", str(e))

    def test_missing_type(self):
        e = self.error("[interface:web]\nendpoint = tcp:0\n")
        self.assertEqual(e.key, "type")

    def test_unknown_type(self):
        e = self.error("[interface:web]\ntype = htp\nendpoint = tcp:0\n")
        self.assertEqual(e.key, "type")
        self.assertIn("did you mean 'http'", str(e))

    def test_bad_endpoint(self):
        e = self.error("[interface:web]\ntype = http\nendpoint = tcpp:80\n")
        self.assertEqual(e.key, "endpoint")
        self.assertIn("not a server endpoint string", str(e))

    def test_bad_peer_endpoint(self):
        e = self.error("[peer:x]\nendpoints = nonsense:1\n")
        self.assertEqual((e.section, e.key), ("peer:x", "endpoints"))

    def test_bad_values(self):
        for key, value in [("request_timeout", "soon"), ("threads", "many"), ("threads", "0")]:
            e = self.error(f"[node]\n{key} = {value}\n")
            self.assertEqual((e.section, e.key), ("node", key))

    def test_bad_size_and_bool(self):
        e = self.error("[interface:web]\ntype = http\nendpoint = tcp:0\nmax_body = lots\n")
        self.assertEqual(e.key, "max_body")
        e = self.error("[interface:web]\ntype = http\nendpoint = tcp:0\njsonrpc = maybe\n")
        self.assertEqual(e.key, "jsonrpc")

    def test_unknown_section(self):
        e = self.error("[interfaces:web]\ntype = http\n")
        self.assertIn("unknown section", str(e))
        e = self.error("[nod]\nname = x\n")
        self.assertIn("did you mean 'node'", str(e))

    def test_duplicates(self):
        e = self.error("[node]\nname = a\nname = b\n")
        self.assertEqual((e.section, e.key), ("node", "name"))
        e = self.error("[node]\n[node]\n")
        self.assertEqual(e.section, "node")

    def test_garbage(self):
        e = self.error("name = x\n")
        self.assertIn("before the first [section]", str(e))

    def test_error_is_one_line(self):
        for text in ["[interface:web]\ntype = http\nendpoint = tcpp:80\n", "junk", "[x]"]:
            e = self.error(text)
            self.assertNotIn("\n", str(e))

    def test_missing_file(self):
        e = self.assertRaises(ConfigError, config.load, "/nonexistent/node.ini")
        self.assertIn("cannot read", str(e))

    def test_check_targets(self):
        c = self.parse(GOOD)
        # a parsed target is remembered with its section and key
        c = config.Config(path=c.path, node=c.node, pubsub=c.pubsub,
                          targets=(("interface:drop", "handler", "files.take"),))
        e = self.assertRaises(ConfigError, c.check_targets, lambda t: False)
        self.assertEqual(str(e), "/etc/msgd/n.ini: [interface:drop] handler: no app exports 'files.take'")
        c.check_targets(lambda t: True)

    def test_durations_and_sizes(self):
        ctx = config.Context("x", "/")
        self.assertEqual(config.duration("250ms", ctx), 0.25)
        self.assertEqual(config.duration("2h", ctx), 7200)
        self.assertEqual(config.size("1MiB", ctx), 1048576)
        self.assertEqual(config.size("10kb", ctx), 10000)
        self.assertRaises(config.Invalid, config.size, "-1", ctx)

    def test_shipped_config_is_valid(self):
        c = config.load(os.path.join(ROOT, "etc", "node.ini"))
        self.assertTrue(c.interfaces)


class DocsTests(unittest.TestCase):
    """docs/configuration.rst names every key of every section and type."""

    def test_every_key_documented(self):
        from msgd import registry
        with open(os.path.join(ROOT, "docs", "configuration.rst")) as f:
            doc = f.read()
        sections = [("[node]", config.NodeConfig), ("[pubsub]", config.PubSubConfig),
                    ("[channel:", config.ChannelConfig), ("[peer:", config.PeerConfig)]
        for table in (registry.INTERFACES, registry.ADAPTERS):
            for typ in table:
                sections.append((f"type = {typ}", registry.load(table, typ).Options))
        for marker, cls in sections:
            self.assertIn(marker, doc, f"docs/configuration.rst lacks {marker}")
            start = doc.index(marker)
            for key, _default, _doc in config.describe(cls):
                self.assertIn(f"``{key}``", doc[start:], f"{marker}: key {key} is not documented")


class PubSubRedisTests(unittest.TestCase):
    """[pubsub] redis takes several endpoints (shards) or a Redis Cluster's seeds."""

    def pubsub(self, text):
        return parse_text("[pubsub]\nbackend = redis\n" + text).pubsub

    def test_one_or_several_endpoints(self):
        self.assertEqual(self.pubsub("").redis, ("tcp:host=127.0.0.1:port=6379",))
        self.assertEqual(self.pubsub("redis = tcp:host=a:port=1, tcp:host=b:port=2\n  tcp:host=c:port=3\n").redis,
                         ("tcp:host=a:port=1", "tcp:host=b:port=2", "tcp:host=c:port=3"))
        self.assertTrue(self.pubsub("cluster = yes\n").cluster)

    def test_mistakes(self):
        for text, key, words in (
                ("redis = tcp:host=a:port=1 tcp:port=1:host=a\n", "redis", "the same Redis (a:1)"),
                ("redis = unix:path=/r.sock unix:/r.sock\n", "redis", "the same Redis (unix:/r.sock)"),
                ("redis = tcp:host=a:port=1, bogus\n", "redis", "not a client endpoint"),
                ("redis = ,\n", "redis", "at least one"),
                ("prefix = app{1}\n", "prefix", "must not contain {"),
                ("cluster = yes\nredis_db = 3\n", "redis_db", "only database 0")):
            with self.assertRaises(ConfigError) as cm:
                self.pubsub(text)
            self.assertEqual((cm.exception.section, cm.exception.key), ("pubsub", key), text)
            self.assertIn(words, str(cm.exception))
