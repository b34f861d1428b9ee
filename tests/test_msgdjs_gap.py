"""msgd.js on an ``rpc.gap`` notification (docs/websocket.rst): run in
Node.js with a fake WebSocket (msgd.js takes the class as an option), so
the test drives every message the client receives."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

from twisted.trial import unittest

from tests.helpers import ROOT
from tests.servers import unavailable

SCRIPT = r"""
const path = process.argv[1];
globalThis.window = globalThis;
require(path);
const sockets = [];
class FakeSocket {
  constructor(url) { this.readyState = 0; this.sent = []; sockets.push(this); setTimeout(() => this.open(), 0); }
  open() { this.readyState = 1; this.onopen(); }
  send(m) { this.sent.push(JSON.parse(m)); }
  close() {}
  recv(m) { this.onmessage({ data: JSON.stringify(m) }); }
}
const out = [];
const client = msgd.connect("ws://test/ws", { WebSocket: FakeSocket });
client.on("gap", (name, info) => out.push(["gap", name, info]));
const answer = (id, result) => sockets[0].recv({ jsonrpc: "2.0", id, result });
setTimeout(async () => {
  const ws = sockets[0];
  const a = client.subscribe("c.x", (data, ev) => out.push(["event", "c.x", ev.offset, data]));
  const b = client.subscribe("c.*", (data, ev) => out.push(["event", "c.*", ev.offset, data]));
  answer(ws.sent[0].id, { channel: "c.x", epoch: "E1", offset: 3, recovered: true });
  answer(ws.sent[1].id, { channel: "c.*", pattern: true, recovered: true });
  await a; await b;
  const ev = (offset, epoch, data) => ws.recv({ jsonrpc: "2.0", method: "rpc.event",
                                                params: { channel: "c.x", offset, epoch, data } });
  ev(4, "E1", "four");
  ws.recv({ jsonrpc: "2.0", method: "rpc.gap", params: { channel: "c.x", offset: 9, epoch: "E2" } });
  ev(9, "E2", "already counted");       // at or before the gap's position: not delivered
  ev(10, "E2", "ten");
  ws.recv({ jsonrpc: "2.0", method: "rpc.gap", params: { channel: "c.*", pattern: true } });
  ws.sent.length = 0;
  ws.onclose({ code: 1006 });           // reconnect: resumes from the gap's position
  setTimeout(() => {
    out.push(["resubscribe", sockets[1].sent.map((m) => m.params)]);
    console.log(JSON.stringify(out));
    process.exit(0);
  }, 600);
}, 20);
"""


class MsgdJsGapTests(unittest.TestCase):
    def test_gap_raises_gap_and_moves_the_position_on(self):
        node = shutil.which("node")
        if node is None:
            unavailable("Node.js is not installed")
        run = subprocess.run([node, "-e", SCRIPT, os.path.join(ROOT, "msgd", "web", "msgd.js")],
                             capture_output=True, text=True, timeout=30)
        self.assertEqual(run.returncode, 0, run.stderr)
        got = json.loads(run.stdout.strip().splitlines()[-1])
        gap = {"channel": "c.x", "offset": 9, "epoch": "E2"}
        self.assertEqual(got, [
            ["event", "c.x", 4, "four"], ["event", "c.*", 4, "four"],
            ["gap", "c.x", gap], ["gap", "c.*", gap],
            ["event", "c.x", 10, "ten"], ["event", "c.*", 10, "ten"],
            ["gap", "c.*", {"channel": "c.*", "pattern": True}],
            # the pattern resumes with the positions held (h2's pattern resume): c.x's from the gap on
            ["resubscribe", [{"channel": "c.x", "since": 10, "epoch": "E2"},
                             {"channel": "c.*", "since": {"c.x": 10}, "epoch": {"c.x": "E2"}}]],
        ])
