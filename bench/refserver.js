// The Node.js reference server of the fan-out benchmark (npm "ws", installed by
// bench/common.py into .cache/bench-node): the same JSON-RPC messages as
// bench/refserver.py, so one load generator drives msgd, raw Autobahn and this.
//
//   node refserver.js PORT
//
// rpc.subscribe adds the connection to the one broadcast set; rpc.publish encodes
// the event once and ws.send()s it to every subscriber, each subscriber's socket
// corked from its first write of a tick until process.nextTick (one writev per
// socket per tick, as Node.js servers tuned for fan-out do); any other call is
// parsed and echoed.  Every message is parsed (JSON.parse), as msgd does.
"use strict";
const { WebSocketServer } = require("ws");

const port = +process.argv[2];
const subscribers = new Set();
const corked = [];
const TEXT = { binary: false };
let seq = 0;

function uncorkAll() {
  for (const s of corked) { s.msgdCorked = false; s.uncork(); }
  corked.length = 0;
}

function send(ws, data) {
  const s = ws._socket;
  if (!s.msgdCorked) {
    s.msgdCorked = true;
    s.cork();
    if (corked.push(s) === 1) process.nextTick(uncorkAll);
  }
  ws.send(data, TEXT);
}

const wss = new WebSocketServer({
  host: "127.0.0.1", port, backlog: 4096, perMessageDeflate: false, clientTracking: false,
  handleProtocols: (protocols) => (protocols.has("jsonrpc") ? "jsonrpc" : false),
});
wss.on("connection", (ws) => {
  ws._socket.setNoDelay(true);
  ws.on("message", (raw) => {
    const msg = JSON.parse(raw);
    if (msg.method === "rpc.subscribe") {
      subscribers.add(ws);
      send(ws, JSON.stringify({ jsonrpc: "2.0", result: { offset: seq }, id: msg.id }));
    } else if (msg.method === "rpc.publish") {
      seq++;
      const event = Buffer.from(JSON.stringify({ jsonrpc: "2.0", method: "rpc.event",
        params: { channel: msg.params.channel, offset: seq, data: msg.params.data } }));
      for (const sub of subscribers) send(sub, event);
    } else {
      send(ws, JSON.stringify({ jsonrpc: "2.0", result: msg.params[0], id: msg.id }));
    }
  });
  ws.on("close", () => subscribers.delete(ws));
  ws.on("error", () => {});
});
