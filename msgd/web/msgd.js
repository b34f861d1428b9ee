/* msgd.js — the browser client of msgd (no build step).
 *
 * As a plain script:  <script src="/msgd.js"></script>   → window.msgd
 * As an ES module:    import { connect } from "/msgd.mjs";
 *
 *   const client = msgd.connect();                 // ws(s)://<this host>/ws
 *   client.on("state", (s) => console.log(s));     // connecting | open | reconnecting | closed | refused
 *   const order = await client.call("orders.place", ["book", 2], { timeout: 5000 });
 *   await client.subscribe("chat.lobby", (data, ev) => show(data));
 *   client.on("gap", (channel, info) => reload(channel));   // events may be missing: reload
 *   client.on("presence", (channel, change) => show(change));  // {action: "join"|"leave", principal, count}
 *   await client.publish("chat.lobby", { text: "hi" });
 *
 * Reconnects with exponential back-off and jitter, re-subscribes, and resumes
 * each channel from the last offset it delivered (a pattern: every matched
 * channel, from the positions it holds), so no event is missed or delivered
 * twice while the node's history covers the gap ("gap" otherwise).
 * Calls made while disconnected wait for the connection (or their timeout).
 * A close code 4000–4099 (authentication refused) stops the retries.
 * When a WebSocket cannot be opened (or with { transport: "sse" | "poll" }),
 * the same API runs over /poll and /sse (Server-Sent Events) instead.
 * See docs/browser-client.rst and docs/more-interfaces.rst.
 */
(function (root) {
  "use strict";

  class RpcError extends Error {
    constructor(error) {
      super(error.message);
      this.name = "RpcError";
      this.code = error.code;
      this.data = error.data;
    }
  }

  /* A WebSocket look-alike over HTTP: a long-poll session (/poll) for
   * sending, and for receiving either /sse (EventSource) or repeated
   * GET /poll.  Any failure closes it (code 1006) and the Client reconnects
   * and resumes as after a WebSocket drop.  Every request carries the
   * client's affinity key, which load balancers hash so that all of a
   * session's requests reach the node that holds it (docs/cluster.rst). */
  class PollSocket {
    constructor(base, useSSE, fetchFn, token, affinity) {
      this.base = base;
      this.affinity = "affinity=" + encodeURIComponent(affinity);
      this.useSSE = useSSE;
      this.fetch = fetchFn;
      this.readyState = 0;
      this.outbox = [];
      this.sending = false;
      this.abort = new AbortController();
      // credentials go with the opening only (a token, else the msgd_token cookie):
      // after that the session id speaks for the session
      const headers = token ? { authorization: "Bearer " + token } : {};
      this.fetch(base + "/poll?" + this.affinity, { method: "POST", headers, signal: this.abort.signal })
        .then((r) => {
          if (r.status === 401 || r.status === 403) {
            // refused credentials: like a refused WebSocket login, the Client stops retrying
            this._lost("unauthorized", 4001);
            return null;
          }
          if (r.status !== 201) throw new Error("HTTP " + r.status);
          return r.json();
        })
        .then((info) => {
          if (!info || this.readyState !== 0) return;
          this.sid = info.session;
          this.wait = info.wait;
          this.readyState = 1;
          if (this.onopen) this.onopen();
          if (this.useSSE) this._stream(); else this._poll();
        })
        .catch((e) => this._lost(e.message || "cannot open a long-poll session"));
    }

    _url(path, sid) {
      return this.base + (path || "/poll") + "?session=" + encodeURIComponent(sid || this.sid) + "&" + this.affinity;
    }

    send(text) {
      if (this.readyState !== 1) throw new Error("not open");
      this.outbox.push(text);
      this._flush();
    }

    _flush() {
      if (this.sending || !this.outbox.length || this.readyState !== 1) return;
      // one POST at a time keeps the order; what waits meanwhile goes as one batch
      const items = this.outbox.splice(0, 50);
      const body = items.length === 1 ? items[0] : "[" + items.join(",") + "]";
      this.sending = true;
      this.fetch(this._url(), { method: "POST", body, headers: { "content-type": "application/json" },
                                signal: this.abort.signal })
        .then((r) => {
          if (r.status !== 202) throw new Error("HTTP " + r.status);
          this.sending = false;
          this._flush();
        })
        .catch((e) => this._lost(e.message || "send failed"));
    }

    _poll() {
      if (this.readyState !== 1) return;
      this.fetch(this._url() + "&wait=" + this.wait, { signal: this.abort.signal, cache: "no-store" })
        .then((r) => { if (r.status !== 200) throw new Error("HTTP " + r.status); return r.json(); })
        .then((messages) => {
          for (const m of messages) if (this.onmessage && this.readyState === 1) this.onmessage({ data: m });
          this._poll();
        })
        .catch((e) => this._lost(e.message || "poll failed"));
    }

    _stream() {
      const es = this.es = new root.EventSource(this._url("/sse"));
      es.onmessage = (e) => { if (this.onmessage && this.readyState === 1) this.onmessage({ data: e.data }); };
      es.onerror = () => this._lost("event stream lost");
    }

    _end() {
      this.readyState = 3;
      this.abort.abort();
      if (this.es) this.es.close();
    }

    _lost(reason, code) {
      if (this.readyState === 3) return;
      this._end();
      if (this.onclose) this.onclose({ code: code || 1006, reason });
    }

    close(code) {
      if (this.readyState === 3) return;
      const sid = this.sid;
      this._end();
      if (sid) this.fetch(this._url("/poll", sid), { method: "DELETE", keepalive: true })
        .catch(() => {});
      setTimeout(() => { if (this.onclose) this.onclose({ code: code || 1000, reason: "" }); }, 0);
    }
  }

  function randomKey() {
    const bytes = new Uint8Array(8);
    if (root.crypto && root.crypto.getRandomValues) root.crypto.getRandomValues(bytes);
    else for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(Math.random() * 256);
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function defaultUrl() {
    const loc = root.location;
    return (loc.protocol === "https:" ? "wss://" : "ws://") + loc.host + "/ws";
  }

  class Client {
    constructor(url, options) {
      this.url = url || defaultUrl();
      this.options = Object.assign({
        timeout: 30000,        // default call timeout (ms)
        minDelay: 250,         // first reconnect delay (ms)
        maxDelay: 30000,       // longest reconnect delay (ms)
        protocols: ["jsonrpc", "msgd.refusal"],   // msgd.refusal: a refused login closes with 4001
        WebSocket: root.WebSocket,
        transport: "auto",     // auto (WebSocket, else SSE/poll) | websocket | sse | poll
        httpUrl: null,         // base of /poll and /sse (default: from url)
        token: null,           // a bearer token, or a function returning one (read at each connect)
        affinity: null,        // key sent with every /poll and /sse request, for load balancers (default: random)
        fetch: root.fetch ? root.fetch.bind(root) : null,
      }, options || {});
      this.affinity = this.options.affinity || randomKey();
      this.fallback = this.options.transport === "sse" || this.options.transport === "poll"
        || (this.options.transport === "auto" && !this.options.WebSocket);
      this.state = "connecting";
      this.ws = null;
      this.nextId = 1;
      this.pending = new Map();     // id -> {resolve, reject, timer, message}
      this.queue = [];              // [id, message] waiting for the connection
      this.channels = new Map();    // name -> {handlers:Set, epoch, offset, pattern}
      this.listeners = { state: new Set(), gap: new Set(), error: new Set(), presence: new Set() };
      this.attempt = 0;
      this.closedByUser = false;
      this._open();
    }

    on(what, fn) { this.listeners[what].add(fn); return () => this.listeners[what].delete(fn); }

    _emit(what, ...args) {
      for (const fn of this.listeners[what]) {
        try { fn(...args); } catch (e) { console.error("msgd listener failed", e); }
      }
    }

    _setState(s, detail) {
      if (this.state === s) return;
      this.state = s;
      this._emit("state", s, detail);
    }

    _open() {
      this._setState(this.attempt ? "reconnecting" : "connecting");
      let ws;
      try {
        const token = typeof this.options.token === "function" ? this.options.token() : this.options.token;
        ws = this.fallback ? this._fallbackSocket(token)
          : new this.options.WebSocket(this.url, token ? this.options.protocols.concat(["bearer." + token])
            : this.options.protocols);
      } catch (e) {
        if (this.options.transport === "auto") this.fallback = !this.fallback;
        this._scheduleReconnect();
        return;
      }
      this.ws = ws;
      this.transport = this.fallback ? ws.useSSE ? "sse" : "poll" : "websocket";
      ws.opened = false;
      ws.onopen = () => { ws.opened = true; this._onOpen(); };
      ws.onmessage = (m) => this._onMessage(m.data);
      ws.onclose = (e) => this._onClose(e);
      ws.onerror = () => {};   // onclose follows
    }

    _fallbackSocket(token) {
      const o = this.options;
      const base = o.httpUrl || this.url.replace(/^ws/, "http").replace(/\/ws\/?$/, "");
      const useSSE = o.transport !== "poll" && !!root.EventSource;
      return new PollSocket(base, useSSE, o.fetch, token, this.affinity);
    }

    _onOpen() {
      this.attempt = 0;
      this._setState("open");
      // re-subscribe first, resuming where each channel left off (those whose
      // first subscribe is still queued go out with the queue)
      for (const [name, ch] of this.channels) if (!ch.inflight) this._sendSubscribe(name, ch);
      const queued = this.queue;
      this.queue = [];
      for (const [id, msg] of queued) {
        const p = this.pending.get(id);
        if (!p) continue;           // timed out while waiting: not sent at all
        p.sent = true;
        this.ws.send(msg);
      }
    }

    _onClose(e) {
      // auto: a transport that never opened makes the next attempt try the other one
      if (this.ws && !this.ws.opened && this.options.transport === "auto") this.fallback = !this.fallback;
      this.ws = null;
      // calls in flight on the lost socket cannot be answered any more
      for (const [id, p] of this.pending) {
        if (p.sent) {
          clearTimeout(p.timer);
          this.pending.delete(id);
          p.reject(new RpcError({ code: -32003, message: "connection lost before the answer" }));
        }
      }
      if (this.closedByUser) { this._setState("closed"); return; }
      if (e && e.code >= 4000 && e.code < 4100) {
        this._setState("refused", { code: e.code, reason: e.reason });
        this._failQueued({ code: -32001, message: e.reason || "refused" });
        return;
      }
      this._scheduleReconnect();
    }

    _scheduleReconnect() {
      this._setState("reconnecting");
      const o = this.options;
      const ceiling = Math.min(o.maxDelay, o.minDelay * Math.pow(2, this.attempt));
      const delay = ceiling / 2 + Math.random() * ceiling / 2;    // jitter
      this.attempt += 1;
      this._timer = setTimeout(() => this._open(), delay);
    }

    _failQueued(error) {
      for (const [id, p] of this.pending) {
        clearTimeout(p.timer);
        p.reject(new RpcError(error));
      }
      this.pending.clear();
      this.queue = [];
    }

    _onMessage(text) {
      let msg = text;     // long-poll hands over parsed messages
      if (typeof text === "string") {
        try { msg = JSON.parse(text); } catch (e) { this._emit("error", e); return; }
      }
      const items = Array.isArray(msg) ? msg : [msg];
      for (const m of items) {
        if (m.method === "rpc.event") this._onEvent(m.params);
        else if (m.method === "rpc.gap") this._onGap(m.params);
        else if (m.method === "rpc.join" || m.method === "rpc.leave") {
          // presence_events channels: subscriptions that came or went, on any node
          this._emit("presence", m.params.channel, { action: m.method.slice(4), principal: m.params.principal,
                                                     count: m.params.count });
        }
        else if (m.id !== undefined && m.id !== null) this._onAnswer(m);
        else if (m.error) this._emit("error", new RpcError(m.error));
      }
    }

    _onAnswer(m) {
      const p = this.pending.get(m.id);
      if (!p) return;
      this.pending.delete(m.id);
      clearTimeout(p.timer);
      if (m.error) p.reject(new RpcError(m.error));
      else p.resolve(m.result);
    }

    _onEvent(ev) {
      const direct = this.channels.get(ev.channel);
      const targets = [];
      if (direct) targets.push(direct);
      for (const [name, ch] of this.channels) {
        if (ch.pattern && ch.regex.test(ev.channel)) targets.push(ch);
      }
      // de-duplicate: one position per channel (kept on the direct subscription,
      // or on a per-channel record for pattern subscriptions)
      const pos = direct || this._patternPosition(ev.channel);
      if (pos.epoch === ev.epoch && ev.offset <= pos.offset) return;   // already delivered
      pos.epoch = ev.epoch;
      pos.offset = ev.offset;
      for (const ch of targets) {
        for (const fn of ch.handlers) {
          try { fn(ev.data, ev); } catch (e) { console.error("msgd event handler failed", e); }
        }
      }
    }

    /* The node says events may be missing here (docs/websocket.rst): the
     * channel's position moves on, and "gap" is raised for each subscription
     * concerned (the channel, or the patterns matching it). */
    _onGap(g) {
      const direct = g.pattern ? null : this.channels.get(g.channel);
      if (!g.pattern) {
        const pos = direct || this._patternPosition(g.channel);
        pos.epoch = g.epoch;
        pos.offset = g.offset;
      }
      for (const [name, ch] of this.channels) {
        if (ch === direct || (g.pattern ? name === g.channel : ch.pattern && ch.regex.test(g.channel))) {
          this._emit("gap", name, g);
        }
      }
    }

    _patternPosition(channel) {
      if (!this._positions) this._positions = new Map();
      let p = this._positions.get(channel);
      if (!p) { p = { epoch: null, offset: 0 }; this._positions.set(channel, p); }
      return p;
    }

    _send(method, params, timeout) {
      const id = this.nextId++;
      const message = JSON.stringify({ jsonrpc: "2.0", id, method, params });
      return new Promise((resolve, reject) => {
        const ms = timeout === undefined ? this.options.timeout : timeout;
        const p = { resolve, reject, sent: false };
        p.timer = setTimeout(() => {
          this.pending.delete(id);
          reject(new RpcError({ code: -32002, message: "timed out waiting for the answer" }));
        }, ms);
        this.pending.set(id, p);
        if (this.ws && this.ws.readyState === 1) {
          p.sent = true;
          this.ws.send(message);
        } else {
          this.queue.push([id, message]);   // sent on open; only a loss after that rejects it
        }
      });
    }

    call(method, params, options) {
      return this._send(method, params === undefined ? [] : params, options && options.timeout);
    }

    _sendSubscribe(name, ch) {
      const params = { channel: name };
      if (ch.pattern) {
        if (ch.subscribed) Object.assign(params, this._held(ch));    // resume every channel it matched
      } else if (ch.epoch !== null) { params.since = ch.offset; params.epoch = ch.epoch; }
      ch.inflight = true;
      return this._send("rpc.subscribe", params).then((info) => {
        ch.inflight = false;
        if (params.since !== undefined && !info.recovered) {
          this._emit("gap", name, info);
        }
        if (!ch.pattern) {
          // replayed events arrived before this answer and moved ch.offset on
          if (ch.epoch !== info.epoch || !info.recovered) { ch.epoch = info.epoch; ch.offset = info.offset; }
        } else {
          ch.subscribed = true;
          // where each matched channel stands: the positions a later resume starts from
          for (const c of Object.keys(info.offset || {})) {
            if (this._direct(c)) continue;           // its own subscription keeps its position
            const pos = this._patternPosition(c);
            if (pos.epoch !== info.epoch[c] || pos.offset < info.offset[c]) {
              pos.epoch = info.epoch[c];
              pos.offset = info.offset[c];
            }
          }
        }
        return info;
      }, (err) => { ch.inflight = false; throw err; });
    }

    _direct(channel) {
      const ch = this.channels.get(channel);
      return ch && !ch.pattern ? ch : null;
    }

    _held(pattern) {
      // {since: {channel: offset}, epoch: {channel: epoch}} of the channels the pattern matches
      const since = {}, epoch = {};
      const names = new Set([...this.channels.keys(), ...(this._positions ? this._positions.keys() : [])]);
      for (const c of names) {
        if (!pattern.regex.test(c)) continue;
        const direct = this._direct(c);
        const pos = direct && direct.epoch !== null ? direct : this._positions && this._positions.get(c);
        if (pos && pos.epoch !== null) { since[c] = pos.offset; epoch[c] = pos.epoch; }
      }
      return { since, epoch };
    }

    subscribe(name, handler) {
      let ch = this.channels.get(name);
      if (ch) { ch.handlers.add(handler); return Promise.resolve({ channel: name, already: true }); }
      const pattern = /[*?[]/.test(name);
      ch = { handlers: new Set([handler]), epoch: null, offset: 0, pattern };
      if (pattern) {
        const re = name.replace(/[.+^${}()|\\]/g, "\\$&").replace(/\*/g, ".*").replace(/\?/g, ".");
        ch.regex = new RegExp("^" + re + "$");
      }
      this.channels.set(name, ch);
      return this._sendSubscribe(name, ch);
    }

    unsubscribe(name, handler) {
      const ch = this.channels.get(name);
      if (!ch) return Promise.resolve(false);
      if (handler) ch.handlers.delete(handler);
      if (handler && ch.handlers.size) return Promise.resolve(true);
      this.channels.delete(name);
      return this.call("rpc.unsubscribe", { channel: name });
    }

    publish(channel, data) { return this.call("rpc.publish", { channel, data }); }

    presence(channel) { return this.call("rpc.presence", { channel }); }

    close() {
      this.closedByUser = true;
      clearTimeout(this._timer);
      if (this.ws) this.ws.close(1000);
      else this._setState("closed");
    }
  }

  function connect(url, options) { return new Client(url, options); }

  root.msgd = { connect, Client, RpcError };
})(typeof globalThis !== "undefined" ? globalThis : this);
