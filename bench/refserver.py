"""The raw Autobahn reference servers the WebSocket benchmarks compare with.

``python -m bench.refserver PORT`` serves, on one Autobahn
``WebSocketServerFactory`` with nothing else around it:

- ``rpc.subscribe`` — add the connection to the one broadcast set;
- ``rpc.publish`` — prepare the event once (``prepareMessage``) and
  ``sendPreparedMessage`` it to every subscriber: the broadcast ceiling;
- any other call — parse it and answer ``{"result": params[0]}``: the echo
  ceiling for JSON-RPC calls.

Messages use the same JSON as msgd's, so one load generator drives both.

``python -m bench.refserver PORT --echo`` only echoes: every message goes
back as it came, unparsed (the load generator takes an echoed call as the
answer ``params[0]``): the ceiling of Autobahn itself, frames in and out.
"""

import json
import sys

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import reactor


class Ref(WebSocketServerProtocol):
    def onConnect(self, request):
        return "jsonrpc" if "jsonrpc" in request.protocols else None

    def onMessage(self, payload, isBinary):
        msg = json.loads(payload)
        method = msg.get("method")
        if method == "rpc.subscribe":
            self.factory.subscribers.add(self)
            self.sendMessage(json.dumps({"jsonrpc": "2.0", "result": {"offset": 0}, "id": msg["id"]}).encode())
        elif method == "rpc.publish":
            self.factory.seq += 1
            event = {"jsonrpc": "2.0", "method": "rpc.event",
                     "params": {"channel": msg["params"]["channel"], "offset": self.factory.seq,
                                "data": msg["params"]["data"]}}
            prepared = self.factory.prepareMessage(json.dumps(event).encode())
            for sub in self.factory.subscribers:
                sub.sendPreparedMessage(prepared)
        else:
            self.sendMessage(json.dumps({"jsonrpc": "2.0", "result": msg["params"][0], "id": msg["id"]}).encode())

    def onClose(self, wasClean, code, reason):
        self.factory.subscribers.discard(self)


class Echo(WebSocketServerProtocol):
    def onConnect(self, request):
        return "jsonrpc" if "jsonrpc" in request.protocols else None

    def onMessage(self, payload, isBinary):
        self.sendMessage(payload, isBinary)


def main():
    port = int(sys.argv[1])
    factory = WebSocketServerFactory()
    factory.protocol = Echo if "--echo" in sys.argv[2:] else Ref
    factory.subscribers = set()
    factory.seq = 0
    factory.setProtocolOptions(autoPingInterval=0, tcpNoDelay=True)
    reactor.listenTCP(port, factory, interface="127.0.0.1", backlog=4096)
    reactor.run()


if __name__ == "__main__":
    main()
