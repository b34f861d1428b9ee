"""A browser-side STOMP library (@stomp/stompjs from the npm registry, with
the ``ws`` package standing in for the browser's WebSocket) against the
node's /ws with subprotocol v12.stomp.  The packages are installed once into
.cache/npm-stomp (gitignored); without node/npm the test skips, or fails
under MSGD_REQUIRE_SERVERS=1."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from tests.helpers import ROOT, http_port, make_node
from tests.servers import unavailable
from tests.test_stomp_listener import APPS

CACHE = os.path.join(ROOT, ".cache", "npm-stomp")
SCRIPT = os.path.join(ROOT, "tests", "stomp_browser.js")
PACKAGES = ["@stomp/stompjs@7", "ws@8"]


def install() -> str:
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        unavailable("node and npm are needed for the browser STOMP client test")
    if not os.path.isdir(os.path.join(CACHE, "node_modules", "@stomp", "stompjs")):
        os.makedirs(CACHE, exist_ok=True)
        with open(os.path.join(CACHE, "package.json"), "w") as f:
            f.write('{"name": "msgd-stomp-test", "private": true}\n')
        r = subprocess.run([npm, "install", "--no-audit", "--no-fund", *PACKAGES], cwd=CACHE,
                           capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            unavailable(f"npm install {' '.join(PACKAGES)} failed: {r.stderr[-500:]}")
    return node


class BrowserStompTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_stompjs_over_websocket(self):
        node_bin = install()
        node = make_node(self, """
            [interface:web]
            type = http
            endpoint = tcp:0:interface=127.0.0.1
            """, APPS)
        url = f"ws://127.0.0.1:{http_port(node)}/ws"
        r = yield deferToThread(subprocess.run, [node_bin, SCRIPT, url], capture_output=True, text=True,
                                timeout=60, env=dict(os.environ, NODE_PATH=os.path.join(CACHE, "node_modules")))
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        seen = json.loads(r.stdout.strip().splitlines()[-1])
        self.assertEqual(seen, {"connected": "1.2", "topic": {"from": "browser"}, "reply": 42, "receipt": True,
                                "error": {"message": "calc says no", "code": "-32010"}})
