// Load generator for the WebSocket benchmarks (Node.js + the npm packages "ws" and
// "socket.io-client", installed by bench/common.py into .cache/bench-node).  Runs in
// its own process, pinned to another core than the server; prints one JSON line.
//
//   node loadgen.js fanout URL SUBSCRIBERS EVENTS WINDOW PAYLOAD [PUBLISHER_URL]
//                                                                    (JSON-RPC: msgd, raw Autobahn; the
//                                                                    publisher on another node when given)
//   node loadgen.js rpc    URL CONNECTIONS INFLIGHT SECONDS
//   node loadgen.js idle   URL CONNECTIONS HOLD_SECONDS
//   node loadgen.js connect URL SECONDS CONCURRENCY                   (new sessions per second)
//   the same modes prefixed "sio-" (socket.io) and "wamp-" (WAMP JSON, Crossbar),
//   and "wamp-callee URL" (registers util.echo for routed RPC)
"use strict";
const WebSocket = require("ws");
const { performance } = require("perf_hooks");

const [mode, url, ...args] = process.argv.slice(2);

function pct(sorted, p) { return sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * p))] : 0; }

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
        const m = JSON.parse(raw);
        if (m.method === "rpc.event") onEvent(m.params.data);
        else { const cb = acks.get(m.id); acks.delete(m.id); if (cb) cb(m.result, m.error); }
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

async function openMany(proto, n) {
  const out = [];
  for (let i = 0; i < n; i += 250) {
    out.push(...await Promise.all(Array.from({ length: Math.min(250, n - i) }, () => proto.connect())));
  }
  return out;
}

async function genericFanout(proto, subscribers, events, window, payload, publisherUrl) {
  subscribers = +subscribers; events = +events; window = +window; payload = +payload;
  const pad = "x".repeat(Math.max(0, payload - 40));
  const subs = await openMany(proto, subscribers);
  let delivered = 0, lastSeen = 0, sent = 0, finish, publishNext;
  const perEvent = new Int32Array(events + 1);
  const latencies = [];
  subs.forEach((c, i) => c.onEvent((d) => {
    delivered++;
    if (i % 10 === 0) latencies.push(performance.now() - d.t);
    if (++perEvent[d.n] === subscribers) { lastSeen++; publishNext(); }
  }));
  await Promise.all(subs.map((c) => c.subscribe("bench")));
  const pub = publisherUrl ? await proto.connect(publisherUrl) : (await openMany(proto, 1))[0];
  const finished = new Promise((r) => { finish = r; });
  publishNext = () => {
    while (sent < events && sent - lastSeen < window) { sent++; pub.publish("bench", { n: sent, t: performance.now(), p: pad }); }
    if (lastSeen === events) finish();
  };
  const t0 = performance.now();
  publishNext();
  await finished;
  const secs = (performance.now() - t0) / 1000;
  latencies.sort((a, b) => a - b);
  console.log(JSON.stringify({ deliveries: delivered, seconds: secs, per_second: delivered / secs,
    p50_ms: pct(latencies, 0.5), p99_ms: pct(latencies, 0.99) }));
  for (const c of subs) c.close();
  pub.close();
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
  const t0 = performance.now();
  for (const c of clients) for (let k = 0; k < inflight; k++) one(c);
  await new Promise((r) => setTimeout(r, seconds * 1000));
  stop = true;
  const secs = (performance.now() - t0) / 1000;
  latencies.sort((a, b) => a - b);
  console.log(JSON.stringify({ calls, errors, seconds: secs, per_second: calls / secs,
    p50_ms: pct(latencies, 0.5), p99_ms: pct(latencies, 0.99) }));
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
  console.log(JSON.stringify({ sessions: made, failed, seconds: secs, per_second: made / secs }));
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
