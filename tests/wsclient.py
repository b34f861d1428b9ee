"""A real WebSocket client (the ``websocket-client`` library) driven from
trial tests: each blocking operation runs in a thread, so the node keeps
serving on the reactor meanwhile."""

from __future__ import annotations

import json

import websocket
from twisted.internet import defer
from twisted.internet.threads import deferToThread


class WS:
    def __init__(self, ws: websocket.WebSocket):
        self.ws = ws
        self.ids = 0

    @classmethod
    @defer.inlineCallbacks
    def connect(cls, port: int, subprotocols=("jsonrpc",), path="/ws", origin=None, **kw):
        def go():
            return websocket.create_connection(f"ws://127.0.0.1:{port}{path}", timeout=10,
                                               subprotocols=list(subprotocols) if subprotocols else None,
                                               origin=origin, **kw)
        ws = yield deferToThread(go)
        return cls(ws)

    def send(self, obj) -> defer.Deferred:
        data = obj if isinstance(obj, (str, bytes)) else json.dumps(obj)
        return deferToThread(self.ws.send, data)

    @defer.inlineCallbacks
    def recv(self):
        data = yield deferToThread(self.ws.recv)
        return json.loads(data)

    @defer.inlineCallbacks
    def call(self, method, params=None):
        """Send a call and return its answer, collecting events that arrive
        before it in ``self.events``."""
        self.ids += 1
        my = self.ids
        msg = {"jsonrpc": "2.0", "id": my, "method": method}
        if params is not None:
            msg["params"] = params
        yield self.send(msg)
        while True:
            m = yield self.recv()
            if isinstance(m, dict) and m.get("id") == my:
                return m
            self.pending().append(m)

    def pending(self) -> list:
        if not hasattr(self, "_pending"):
            self._pending = []
        return self._pending

    @defer.inlineCallbacks
    def next_event(self):
        if self.pending():
            return self.pending().pop(0)
        m = yield self.recv()
        return m

    def close(self):
        return deferToThread(self.ws.close)
