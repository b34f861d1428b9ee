// Load generator for the WebSocket benchmarks (Node.js + the npm packages "ws" and
// "socket.io-client", installed by bench/common.py into .cache/bench-node).  Runs in
// its own process, pinned to another core than the server; prints one JSON line.
//
//   node loadgen.js fanout URL SUBSCRIBERS EVENTS WINDOW PAYLOAD [PUBLISHERS [PUBLISHER_URL]]
//                                          (JSON-RPC: msgd, raw Autobahn, Node.js ws; WINDOW events
//                                           in flight in all, published in turn by PUBLISHERS connections,
//                                           to another node when PUBLISHER_URL is given)
//   node loadgen.js rpc    URL CONNECTIONS INFLIGHT SECONDS
//   node loadgen.js idle   URL CONNECTIONS HOLD_SECONDS
//   node loadgen.js connect URL SECONDS CONCURRENCY                   (new sessions per second)
//   the same modes prefixed "sio-" (socket.io) and "wamp-" (WAMP JSON, Crossbar),
//   and "wamp-callee URL" (registers util.echo for routed RPC)
"use strict";
const WebSocket = require("ws");
const net = require("net");
const crypto = require("crypto");
const { performance } = require("perf_hooks");

const [mode, url, ...args] = process.argv.slice(2);

// With LOADGEN_PHASES set (bench/common.py), a workload prints {"ready": true} once its
// connections are set up, and its result when done, and each time waits for a line on stdin:
// the caller reads both sides' CPU time at those points, so set-up is not counted.
const stdinLines = [];
let stdinWaiter = null;
if (process.env.LOADGEN_PHASES) {
  process.stdin.on("data", (chunk) => {
    for (const ch of chunk.toString()) if (ch === "\n") { if (stdinWaiter) { const w = stdinWaiter; stdinWaiter = null; w(); } else stdinLines.push(1); }
  });
}
async function phase(obj) {
  console.log(JSON.stringify(obj));
  if (!process.env.LOADGEN_PHASES) return;
  if (stdinLines.length) { stdinLines.pop(); return; }
  await new Promise((r) => { stdinWaiter = r; });
}

function pct(sorted, p) { return sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * p))] : 0; }

// Events are most of a fan-out's traffic: so that the one-core generator can keep a server
// saturated, a JSON-RPC event is not parsed whole; its "n" (and "t" when sampled) are read
// from the bytes, and one event in 1,024 is parsed whole to check them.
const EVENT = Buffer.from('"rpc.event"');
const isEvent = (raw) => { const at = raw.indexOf(EVENT); return at >= 0 && at < 48; };
function numberAfter(raw, key) {
  let i = raw.indexOf(key) + key.length, j;
  while (raw[i] === 0x20) i++;
  for (j = i; j < raw.length && raw[j] !== 0x2c && raw[j] !== 0x7d; j++);
  return +raw.toString("latin1", i, j);
}
// the k-th event a subscriber receives (a channel's events reach every subscriber in one order)
function countedEvent(raw, k) {
  if ((k & 1023) === 0 && !(JSON.parse(raw).params.data.n > 0)) throw new Error("event misread");
  return { n: k, get t() { return numberAfter(raw, '"t":'); } };
}
function lazyEvent(raw) {
  const n = numberAfter(raw, '"n":');
  if ((n & 1023) === 0 && JSON.parse(raw).params.data.n !== n) throw new Error("event misread");
  return { n, get t() { return numberAfter(raw, '"t":'); } };
}

// A subscriber that only listens, on a plain socket: the WebSocket handshake by hand and
// server frames counted as they come (headers read, payloads not copied), so that receiving
// a delivery costs the generator much less than sending it costs a server.
function rawListener() {
  return new Promise((resolve, reject) => {
    const u = new URL(url);
    const sock = net.connect(+u.port, u.hostname);
    sock.setNoDelay(true);
    let pending = null, open = false, count = 0, onEvent = () => {}, answered = null;
    sock.on("error", reject);
    sock.on("connect", () => sock.write(`GET ${u.pathname} HTTP/1.1\r\nHost: ${u.host}\r\nUpgrade: websocket\r\n` +
      `Connection: Upgrade\r\nSec-WebSocket-Key: ${crypto.randomBytes(16).toString("base64")}\r\n` +
      "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: jsonrpc\r\n\r\n"));
    const client = {
      subscribe: (ch) => new Promise((r) => {
        answered = r;
        const body = Buffer.from(JSON.stringify({ jsonrpc: "2.0", id: 1, method: "rpc.subscribe", params: { channel: ch } }));
        sock.write(Buffer.concat([Buffer.from([0x81, 0x80 | body.length, 0, 0, 0, 0]), body]));   // masked, key 0
      }),
      onEvent: (cb) => { onEvent = cb; },
      close: () => sock.destroy(),
    };
    sock.on("data", (chunk) => {
      let buf = pending ? Buffer.concat([pending, chunk]) : chunk, pos = 0;
      if (!open) {
        const end = buf.indexOf("\r\n\r\n");
        if (end < 0) { pending = buf; return; }
        if (!buf.toString("latin1", 0, 12).includes("101")) { reject(new Error(buf.toString("latin1", 0, end))); return; }
        open = true; pos = end + 4; resolve(client);
      }
      while (buf.length - pos >= 2) {
        let len = buf[pos + 1] & 0x7f, hdr = 2;
        if (len === 126) { if (buf.length - pos < 4) break; len = buf.readUInt16BE(pos + 2); hdr = 4; }
        else if (len === 127) { if (buf.length - pos < 10) break; len = Number(buf.readBigUInt64BE(pos + 2)); hdr = 10; }
        if (buf.length - pos < hdr + len) break;
        const payload = buf.subarray(pos + hdr, pos + hdr + len);
        if ((buf[pos] & 0x0f) === 1) {
          if (answered && !isEvent(payload)) { answered(JSON.parse(payload).result); answered = null; }
          else onEvent(countedEvent(payload, ++count));
        }
        pos += hdr + len;
      }
      pending = pos < buf.length ? Buffer.from(buf.subarray(pos)) : null;
    });
  });
}

// -- a common shape for the three protocols ------------------------------------------
// Each protocol gives: connect() -> client with subscribe(ch), publish(ch, data), call(v, cb),
// onEvent(cb(data)), close().

const PROTOCOLS = {
  jsonrpc: () => ({
    async connect(target) {
      const ws = await new Promise((resolve, reject) => {
        const w = new WebSocket(target || url, ["jsonrpc"], { perMessageDeflate: false });
        w.on("open", () => resolve(w)); w.on("error", reject);
      });
      const acks = new Map(); let id = 0; let onEvent = () => {};
      ws.on("message", (raw) => {
        if (isEvent(raw)) { onEvent(lazyEvent(raw)); return; }
        const m = JSON.parse(raw);
        if (m.method === "rpc.event") onEvent(m.params.data);
        else {
          const cb = acks.get(m.id); acks.delete(m.id);
          if (cb) m.method ? cb(m.params[0]) : cb(m.result, m.error);    // a call echoed back: a raw echo server
        }
      });
      const req = (method, params, cb) => {
        const my = ++id; if (cb) acks.set(my, cb);
        ws.send(JSON.stringify(cb ? { jsonrpc: "2.0", id: my, method, params } : { jsonrpc: "2.0", method, params }));
      };
      return {
        subscribe: (ch) => new Promise((r) => req("rpc.subscribe", { channel: ch }, r)),
        publish: (ch, data) => req("rpc.publish", { channel: ch, data }),
        call: (v, cb) => req("util.echo", [v], cb),
        onEvent: (cb) => { onEvent = cb; },
        close: () => ws.terminate(),
      };
    },
    listen: rawListener,
  }),
  sio: () => ({
    async connect() {
      const { io } = require("socket.io-client");
      const s = io(url, { transports: ["websocket"], reconnection: false, forceNew: true });
      await new Promise((resolve, reject) => { s.on("connect", resolve); s.on("connect_error", reject); });
      let onEvent = () => {};
      s.on("event", (d) => onEvent(d));
      return {
        subscribe: (ch) => new Promise((r) => s.emit("subscribe", ch, r)),
        publish: (ch, data) => s.emit("publish", { channel: ch, data }),
        call: (v, cb) => s.emit("call", v, (r) => cb(r)),
        onEvent: (cb) => { onEvent = cb; },
        close: () => s.disconnect(),
      };
    },
  }),
  wamp: () => ({
    async connect() {
      const ws = await new Promise((resolve, reject) => {
        const w = new WebSocket(url, ["wamp.2.json"], { perMessageDeflate: false });
        w.on("open", () => resolve(w)); w.on("error", reject);
      });
      const pending = new Map(); let id = 0; let onEvent = () => {}; let welcome;
      const welcomed = new Promise((r) => { welcome = r; });
      const invocations = new Map();
      ws.on("message", (raw) => {
        const m = JSON.parse(raw);
        switch (m[0]) {
          case 2: welcome(); break;                                           // WELCOME
          case 36: onEvent(m[4][0]); break;                                   // EVENT
          case 33: case 65: case 50: {                                        // SUBSCRIBED, REGISTERED, RESULT
            const cb = pending.get(m[1]); pending.delete(m[1]); if (cb) cb(m[0] === 50 ? m[3][0] : m[2]); break; }
          case 68: ws.send(JSON.stringify([70, m[1], {}, m[4]])); break;      // INVOCATION -> YIELD
          case 8: { const cb = pending.get(m[2]); pending.delete(m[2]); if (cb) cb(undefined, m[4]); break; }
        }
      });
      ws.send(JSON.stringify([1, "bench", { roles: { subscriber: {}, publisher: {}, caller: {}, callee: {} } }]));
      await welcomed;
      const req = (msg, cb) => { const my = ++id; pending.set(my, cb); msg[1] = my; ws.send(JSON.stringify(msg)); };
      return {
        subscribe: (ch) => new Promise((r) => req([32, 0, {}, ch], r)),
        publish: (ch, data) => ws.send(JSON.stringify([16, ++id, {}, ch, [data]])),
        call: (v, cb) => req([48, 0, {}, "util.echo", [v]], cb),
        register: (proc) => new Promise((r) => req([64, 0, {}, proc], r)),
        onEvent: (cb) => { onEvent = cb; },
        close: () => ws.terminate(),
      };
    },
  }),
};

async function openMany(proto, n, connect = () => proto.connect()) {
  const out = [];
  for (let i = 0; i < n; i += 250) {
    out.push(...await Promise.all(Array.from({ length: Math.min(250, n - i) }, connect)));
  }
  return out;
}

async function genericFanout(proto, subscribers, events, window, payload, publishers = 1, publisherUrl = "") {
  subscribers = +subscribers; events = +events; window = +window; payload = +payload; publishers = +publishers;
  const pad = "x".repeat(Math.max(0, payload - 40));
  const subs = await openMany(proto, subscribers, proto.listen || (() => proto.connect()));
  let delivered = 0, lastSeen = 0, sent = 0, finish, publishNext;
  const perEvent = new Int32Array(events + 1);
  const latencies = [];
  subs.forEach((c, i) => c.onEvent((d) => {
    delivered++;
    if (i % 10 === 0) latencies.push(performance.now() - d.t);
    if (++perEvent[d.n] === subscribers) { lastSeen++; publishNext(); }
  }));
  await Promise.all(subs.map((c) => c.subscribe("bench")));
  const pubs = publisherUrl
    ? await Promise.all(Array.from({ length: publishers }, () => proto.connect(publisherUrl)))
    : await openMany(proto, publishers);
  const finished = new Promise((r) => { finish = r; });
  publishNext = () => {
    while (sent < events && sent - lastSeen < window) { sent++; pubs[sent % publishers].publish("bench", { n: sent, t: performance.now(), p: pad }); }
    if (lastSeen === events) finish();
  };
  await phase({ ready: true });
  const t0 = performance.now();
  publishNext();
  await finished;
  const secs = (performance.now() - t0) / 1000;
  latencies.sort((a, b) => a - b);
  await phase({ deliveries: delivered, seconds: secs, per_second: delivered / secs,
    p50_ms: pct(latencies, 0.5), p99_ms: pct(latencies, 0.99) });
  for (const c of subs) c.close();
  for (const c of pubs) c.close();
}

async function genericRpc(proto, connections, inflight, seconds) {
  connections = +connections; inflight = +inflight; seconds = +seconds;
  const clients = await openMany(proto, connections);
  let calls = 0, errors = 0, stop = false;
  const latencies = [];
  const one = (c) => {
    const t = performance.now();
    c.call("hello, world", (r, err) => {
      calls++; if (err || r !== "hello, world") errors++;
      if (calls % 10 === 0) latencies.push(performance.now() - t);
      if (!stop) one(c);
    });
  };
  await phase({ ready: true });
  const t0 = performance.now();
  for (const c of clients) for (let k = 0; k < inflight; k++) one(c);
  await new Promise((r) => setTimeout(r, seconds * 1000));
  stop = true;
  const secs = (performance.now() - t0) / 1000;
  latencies.sort((a, b) => a - b);
  await phase({ calls, errors, seconds: secs, per_second: calls / secs,
    p50_ms: pct(latencies, 0.5), p99_ms: pct(latencies, 0.99) });
  for (const c of clients) c.close();
}

async function genericIdle(proto, connections, hold) {
  const clients = await openMany(proto, +connections);
  await Promise.all(clients.map((c) => c.subscribe("idle")));
  console.log(JSON.stringify({ open: clients.length }));
  await new Promise((r) => setTimeout(r, +hold * 1000));
  for (const c of clients) c.close();
}

async function genericConnect(proto, seconds, concurrency) {
  seconds = +seconds; concurrency = +concurrency;
  let made = 0, failed = 0, stop = false;
  await phase({ ready: true });
  const t0 = performance.now();
  async function worker() {
    while (!stop) {
      try { const c = await proto.connect(); await c.subscribe("connect"); made++; c.close(); }
      catch (e) { failed++; }
    }
  }
  const workers = Array.from({ length: concurrency }, worker);
  await new Promise((r) => setTimeout(r, seconds * 1000));
  stop = true;
  await Promise.all(workers);
  const secs = (performance.now() - t0) / 1000;
  await phase({ sessions: made, failed, seconds: secs, per_second: made / secs });
}

async function wampCallee() {
  const c = await PROTOCOLS.wamp().connect();
  await c.register("util.echo");
  console.log(JSON.stringify({ registered: true }));
  await new Promise(() => {});
}

const modes = { "wamp-callee": wampCallee };
for (const [name, make] of Object.entries(PROTOCOLS)) {
  const prefix = name === "jsonrpc" ? "" : name + "-";
  modes[prefix + "fanout"] = (...a) => genericFanout(make(), ...a);
  modes[prefix + "rpc"] = (...a) => genericRpc(make(), ...a);
  modes[prefix + "idle"] = (...a) => genericIdle(make(), ...a);
  modes[prefix + "connect"] = (...a) => genericConnect(make(), ...a);
}

modes[mode](...args).then(() => process.exit(0), (e) => { console.error(e); process.exit(1); });
