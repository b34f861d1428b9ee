"""The status page (/status) and its feed: access rules, the snapshot, and
the page itself in headless Chromium showing live figures."""

import json
import os
import struct

from twisted.internet import defer, task
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from msgd.interfaces.admin import CHANNEL, _quantile
from tests.browser import chromium, wait_for
from tests.helpers import http, http_port, make_node, rpc
from tests.wsclient import WS

APP = """
def ping():
    return "pong"
"""

INI = """
[interface:web]
type = http
endpoint = tcp:0:interface=127.0.0.1
status = yes
status_interval = 0.2s
admin = yes
"""


class QuantileTests(unittest.TestCase):
    def test_linear_within_the_bucket(self):
        buckets = [(0.1, 0.0), (0.2, 10.0), (0.4, 20.0), (float("inf"), 20.0)]
        self.assertAlmostEqual(_quantile(buckets, 0.5), 0.2)
        self.assertAlmostEqual(_quantile(buckets, 0.75), 0.3)
        self.assertIsNone(_quantile([(0.1, 0.0), (float("inf"), 0.0)], 0.5))


class AccessTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_off_by_default(self):
        node = make_node(self, "[interface:web]\ntype = http\nendpoint = tcp:0:interface=127.0.0.1\n")
        yield node.ready()
        for path in ("/status", "/admin/log-level"):
            code, _, _ = yield http("GET", f"http://127.0.0.1:{http_port(node)}{path}")
            self.assertEqual(code, 404, path)

    @defer.inlineCallbacks
    def test_address_not_allowed(self):
        node = make_node(self, INI + "admin_allow = 10.0.0.0/8\n")
        yield node.ready()
        code, _, body = yield http("GET", f"http://127.0.0.1:{http_port(node)}/status")
        self.assertEqual((code, json.loads(body)), (403, {"error": "not allowed from this address"}))
        code, _, _ = yield http("GET", f"http://127.0.0.1:{http_port(node)}/status/ws")
        self.assertEqual(code, 403)

    @defer.inlineCallbacks
    def test_token(self):
        node = make_node(self, INI + "admin_token = s3cret\n")
        yield node.ready()
        base = f"http://127.0.0.1:{http_port(node)}"
        code, headers, _ = yield http("GET", base + "/status")
        self.assertEqual(code, 401)
        self.assertEqual(headers.getRawHeaders(b"www-authenticate"), [b'Bearer realm="msgd"'])
        code, _, body = yield http("GET", base + "/status?token=s3cret")
        self.assertEqual(code, 200)
        self.assertIn(b"msgd status", body)
        code, _, _ = yield http("GET", base + "/status/", headers={"authorization": "Bearer s3cret"})
        self.assertEqual(code, 200)
        code, _, _ = yield http("GET", base + "/status?token=wrong")
        self.assertEqual(code, 401)


class FeedTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_snapshots_while_watched_and_only_on_the_status_socket(self):
        node = make_node(self, INI, {"m.py": APP})
        yield node.ready()
        port = http_port(node)
        for params in ([], [], ["unexpected"]):
            yield rpc(port, {"jsonrpc": "2.0", "id": 1, "method": "m.ping", "params": params})
        ws = yield WS.connect(port, path="/status/ws")
        self.addCleanup(ws.close)
        snap = (yield ws.call("rpc.status"))["result"]
        self.assertEqual(snap["node"], "test")
        self.assertEqual(snap["requests"]["total"], 3)
        self.assertEqual(snap["requests"]["errors"], 1)
        self.assertEqual(snap["by_interface"]["web"], {"total": 3, "errors": 1})
        self.assertEqual(snap["modules"]["m"]["version"], 1)
        self.assertTrue(snap["interfaces"]["web"]["listening"].startswith("127.0.0.1:"))

        self.assertIn("result", (yield ws.call("rpc.subscribe", {"channel": CHANNEL})))
        yield rpc(port, {"jsonrpc": "2.0", "id": 1, "method": "m.ping"})
        for _ in range(20):            # bounded: a few intervals
            ev = yield ws.next_event()
            if ev["params"]["data"]["requests"]["total"] == 4:
                break
        self.assertEqual(ev["method"], "rpc.event")
        self.assertEqual(ev["params"]["channel"], CHANNEL)
        self.assertEqual(ev["params"]["data"]["requests"]["total"], 4)
        self.assertIsNotNone(ev["params"]["data"]["requests"]["rate"])

        # nothing else is offered on the status socket; the public /ws cannot see the channel
        self.assertEqual((yield ws.call("m.ping"))["error"]["code"], -32601)
        self.assertEqual((yield ws.call("rpc.subscribe", {"channel": "chat"}))["error"]["code"], -32602)
        self.assertEqual((yield ws.call("rpc.publish", {"channel": CHANNEL, "data": 1}))["error"]["code"], -32601)
        self.assertEqual(node.pubsub.presence(CHANNEL)["count"], 0)


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


class BrowserTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_live_figures_in_headless_chromium(self):
        node = make_node(self, INI, {"m.py": APP})
        yield node.ready()
        port = http_port(node)
        for params in ([],) * 5 + (["unexpected"],):     # the last one fails: -32602
            yield rpc(port, {"jsonrpc": "2.0", "id": 1, "method": "m.ping", "params": params})
        driver = yield deferToThread(chromium, self)
        yield deferToThread(driver.get, f"http://127.0.0.1:{port}/status")
        ready = yield deferToThread(wait_for, driver, "document.getElementById('node').textContent === 'test' "
                                                      "&& Number(document.body.dataset.updates) >= 2")
        self.assertTrue(ready)
        self.assertEqual((yield deferToThread(driver.execute_script,
                                              "return document.getElementById('link').textContent")), "open")

        # steady traffic while the page watches: its figures follow
        traffic = task.LoopingCall(rpc, port, {"jsonrpc": "2.0", "id": 1, "method": "m.ping"})
        traffic_done = traffic.start(0.02)      # fires once stopped and the call in flight is answered

        def stop_traffic():
            if traffic.running:
                traffic.stop()
            return traffic_done
        self.addCleanup(stop_traffic)
        live = yield deferToThread(wait_for, driver, "Number(document.getElementById('total').textContent) > 20 "
                                                     "&& document.getElementById('p95').textContent.endsWith(' ms')")
        self.assertTrue(live)

        shot = os.path.abspath(self.mktemp()) + ".png"
        self.assertTrue((yield deferToThread(driver.save_screenshot, shot)))
        with open(shot, "rb") as f:
            width, height = _png_size(f.read())
        self.assertGreater(width * height, 100_000)

        page = yield deferToThread(driver.execute_script, """
            const t = (id) => document.getElementById(id).textContent;
            const cells = (id) => [...document.getElementById(id).tBodies[0].rows].map(
                r => [...r.cells].map(c => c.textContent));
            const canvas = document.getElementById('chart-rate');
            const px = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
            let inked = 0;
            for (let i = 3; i < px.length; i += 4) if (px[i]) inked++;
            return {node: t('node'), status: t('status'), total: t('total'), errors: t('errors'),
                    p95: t('p95'), rate: t('rate'), interfaces: cells('interfaces'), modules: cells('modules'),
                    adapters: cells('adapters'), inked: inked, text: document.body.innerText};
        """)
        yield stop_traffic()
        self.assertEqual(page["node"], "test")
        self.assertEqual(page["status"], "ok")
        self.assertGreater(int(page["total"]), 20)
        self.assertEqual(page["errors"], "1")
        self.assertTrue(page["p95"].endswith(" ms"), page["p95"])
        self.assertGreater(float(page["rate"]), 0)
        web = page["interfaces"][0]
        self.assertEqual(web[:3], ["web", "http", f"127.0.0.1:{port}"])
        self.assertGreaterEqual(int(web[3]), 1)           # the page's own connections
        self.assertEqual(web[4:], [page["total"], "1"])
        self.assertEqual([r[:2] for r in page["modules"]], [["m", "1"]])
        self.assertEqual(page["adapters"], [["none"]])
        self.assertGreater(page["inked"], 50)              # the chart was drawn
        self.assertIn("calls/s", page["text"])
