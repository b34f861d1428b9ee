// Load generator for the WebSocket benchmarks (Node.js + the npm "ws" package,
// installed by bench/common.py into .cache/bench-node).  Runs in its own process,
// pinned to another core than the server; prints one JSON line of results.
//
//   node loadgen.js fanout URL SUBSCRIBERS EVENTS WINDOW PAYLOAD
//   node loadgen.js rpc    URL CONNECTIONS INFLIGHT SECONDS
//   node loadgen.js idle   URL CONNECTIONS HOLD_SECONDS
"use strict";
const WebSocket = require("ws");
const { performance } = require("perf_hooks");

const [mode, url, ...args] = process.argv.slice(2);

function open(n, onMessage) {
  return Promise.all(Array.from({ length: n }, (_, i) => new Promise((resolve, reject) => {
    const ws = new WebSocket(url, ["jsonrpc"], { perMessageDeflate: false });
    ws.on("open", () => resolve(ws));
    ws.on("error", reject);
    if (onMessage) ws.on("message", (data) => onMessage(ws, i, data));
  })));
}

function pct(sorted, p) { return sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * p))] : 0; }

async function fanout(subscribers, events, window, payload) {
  subscribers = +subscribers; events = +events; window = +window; payload = +payload;
  const pad = "x".repeat(Math.max(0, payload - 40));
  let delivered = 0, subscribed = 0, lastSeen = 0;
  const perEvent = new Int32Array(events + 1);
  const latencies = [];
  let resolveDone, publishNext;
  const done = new Promise((r) => { resolveDone = r; });
  const subs = await open(subscribers, (ws, i, data) => {
    const msg = JSON.parse(data);
    if (msg.id === "s") { subscribed++; if (subscribed === subscribers) resolveDone(); return; }
    if (msg.method !== "rpc.event") return;
    const d = msg.params.data;
    delivered++;
    if (i % 10 === 0) latencies.push(performance.now() - d.t);
    if (++perEvent[d.n] === subscribers) { lastSeen++; publishNext(); }
  });
  const sub = JSON.stringify({ jsonrpc: "2.0", id: "s", method: "rpc.subscribe", params: { channel: "bench" } });
  for (const ws of subs) ws.send(sub);
  await done;
  const [pub] = await open(1, () => {});
  let sent = 0;
  const finished = new Promise((r) => { resolveDone = r; });
  publishNext = () => {
    while (sent < events && sent - lastSeen < window) {
      sent++;
      pub.send(JSON.stringify({ jsonrpc: "2.0", method: "rpc.publish",
                                params: { channel: "bench", data: { n: sent, t: performance.now(), p: pad } } }));
    }
    if (lastSeen === events) resolveDone();
  };
  const t0 = performance.now();
  publishNext();
  await finished;
  const secs = (performance.now() - t0) / 1000;
  latencies.sort((a, b) => a - b);
  console.log(JSON.stringify({ deliveries: delivered, seconds: secs, per_second: delivered / secs,
    p50_ms: pct(latencies, 0.5), p99_ms: pct(latencies, 0.99) }));
  for (const ws of subs) ws.terminate();
  pub.terminate();
}

async function rpc(connections, inflight, seconds) {
  connections = +connections; inflight = +inflight; seconds = +seconds;
  let calls = 0, stop = false, errors = 0;
  const latencies = [];
  const starts = new Map();
  let id = 0;
  function send(ws) {
    const my = ++id;
    starts.set(my, performance.now());
    ws.send(JSON.stringify({ jsonrpc: "2.0", id: my, method: "util.echo", params: ["hello, world"] }));
  }
  const socks = await open(connections, (ws, i, data) => {
    const msg = JSON.parse(data);
    if (msg.error) errors++;
    calls++;
    const t = starts.get(msg.id);
    starts.delete(msg.id);
    if (calls % 10 === 0) latencies.push(performance.now() - t);
    if (!stop) send(ws);
  });
  const t0 = performance.now();
  for (const ws of socks) for (let k = 0; k < inflight; k++) send(ws);
  await new Promise((r) => setTimeout(r, seconds * 1000));
  stop = true;
  const secs = (performance.now() - t0) / 1000;
  latencies.sort((a, b) => a - b);
  console.log(JSON.stringify({ calls, errors, seconds: secs, per_second: calls / secs,
    p50_ms: pct(latencies, 0.5), p99_ms: pct(latencies, 0.99) }));
  for (const ws of socks) ws.terminate();
}

async function idle(connections, hold) {
  connections = +connections; hold = +hold;
  const socks = [];
  for (let i = 0; i < connections; i += 500) {   // in slices: a connect storm is another benchmark
    socks.push(...await open(Math.min(500, connections - i), () => {}));
  }
  const sub = JSON.stringify({ jsonrpc: "2.0", id: "s", method: "rpc.subscribe", params: { channel: "idle" } });
  for (const ws of socks) ws.send(sub);
  console.log(JSON.stringify({ open: socks.length }));
  await new Promise((r) => setTimeout(r, hold * 1000));
  for (const ws of socks) ws.terminate();
}

({ fanout, rpc, idle })[mode](...args).then(() => process.exit(0), (e) => { console.error(e); process.exit(1); });
