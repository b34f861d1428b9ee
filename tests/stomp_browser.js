// A browser-side STOMP client (@stomp/stompjs over the `ws` package) against
// a node's /ws: run by tests/test_stomp_ws.py as `node stomp_browser.js URL`.
// Prints one JSON line of what it saw, then exits (non-zero on a failure).
const { Client } = require("@stomp/stompjs");
const WebSocket = require("ws");

const url = process.argv[2];
const seen = { connected: null, topic: null, reply: null, receipt: false, error: null };
const fail = (why) => { console.log(JSON.stringify({ failed: why, seen })); process.exit(1); };
setTimeout(() => fail("timeout"), 20000).unref();

let phase = 0;
const client = new Client({
  webSocketFactory: () => new WebSocket(url, ["v12.stomp", "v11.stomp", "v10.stomp"]),
  reconnectDelay: 0,
  debug: () => {},
});
client.onConnect = (frame) => {
  seen.connected = frame.headers.version;
  client.subscribe("/topic/browser", (m) => {
    seen.topic = JSON.parse(m.body);
    client.watchForReceipt("call-1", () => { seen.receipt = true; maybeDone(); });
    client.publish({ destination: "/app/calc.add", body: "[20, 22]",
                     headers: { "content-type": "application/json", "reply-to": "/temp-queue/r",
                                receipt: "call-1" } });
  });
  client.subscribe("/temp-queue/r", (m) => { seen.reply = JSON.parse(m.body); maybeDone(); });
  client.publish({ destination: "/topic/browser", body: JSON.stringify({ from: "browser" }),
                   headers: { "content-type": "application/json" } });
};
function maybeDone() {
  if (seen.reply === null || !seen.receipt || phase) return;
  phase = 1;
  client.publish({ destination: "/app/calc.fail", body: "" });
}
client.onStompError = (frame) => {
  seen.error = { message: frame.headers.message, code: frame.headers["msgd-code"] };
  if (!phase) fail("unexpected ERROR");
  console.log(JSON.stringify(seen));
  client.deactivate().then(() => process.exit(0));
};
client.onWebSocketError = (e) => fail("websocket error " + (e && e.message));
client.activate();
