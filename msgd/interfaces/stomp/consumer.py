"""``[interface:NAME] type = stomp-consumer``: take messages from a broker's
queues and hand each to an app function, at least once.

One connection, kept by a :class:`ClientService` (reconnects with
exponential back-off).  After each connect it subscribes to every
``destinations`` entry with ``ack: client-individual`` and a prefetch
(``prefetch-count`` for RabbitMQ, ``activemq.prefetchSize`` for ActiveMQ),
each confirmed by a receipt.  Each MESSAGE becomes one call of ``handler``
with a dict::

    {"destination": "/queue/orders", "message_id": "...", "redelivered": False,
     "headers": {...}, "body": b"...", "data": <the body parsed, when it is JSON>}

An ACK is sent only after the handler succeeded; a failure (or the deadline)
sends NACK (``requeue`` decides whether the broker redelivers it or
dead-letters it).  If the node dies or the connection drops before the ACK,
the broker redelivers the message (``redelivered: True``): nothing is lost,
and a handler must tolerate seeing a message twice.  At most ``prefetch``
handler calls run at once even if a broker ignores the prefetch header.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer
from twisted.internet.endpoints import clientFromString

from msgd.config import (boolean, client_endpoint, duration, integer, nonempty_words, option, optional_duration,
                         string, target)
from msgd.core.jsonrpc import loads
from msgd.interfaces.base import Interface
from msgd.options import pairs
from msgd.stomp.client import StompClientFactory


@dataclass(frozen=True)
class Options:
    endpoint: str = option(parse=client_endpoint, doc="the broker, e.g. tcp:host=127.0.0.1:port=61613")
    destinations: tuple = option(parse=nonempty_words, doc="queues to consume, e.g. /queue/orders /queue/refunds")
    handler: str = option(parse=target, doc="app target called as handler(message) for each message")
    login: str = option("", parse=string, doc="broker login")
    passcode: str = option("", parse=string, doc="broker passcode")
    vhost: str = option("/", parse=string, doc="virtual host (the CONNECT host header)")
    prefetch: int = option(10, parse=integer(1, 10000),
                           doc="most unacknowledged messages at once (and handler calls running)")
    requeue: bool = option(True, parse=boolean,
                           doc="on handler failure NACK with requeue (redeliver); no: the broker dead-letters "
                               "or drops it")
    subscribe_headers: tuple = option((), parse=pairs(),
                                      doc="extra SUBSCRIBE headers, e.g. x-queue-type:quorum durable:true")
    heartbeat: float = option(10.0, parse=duration, doc="heart-beat interval both ways (0: none)")
    max_backoff: float = option(30.0, parse=duration, doc="longest wait between reconnection attempts")
    request_timeout: float | None = option(None, parse=optional_duration,
                                           doc="deadline of each handler call (default: [node] request_timeout)")


class StompConsumer(Interface):
    Options = Options

    def __init__(self, name, options, services):
        super().__init__(name, options, services)
        o = options
        factory = StompClientFactory(services.reactor, login=o.login, passcode=o.passcode, vhost=o.vhost,
                                     heartbeat=o.heartbeat)
        self.client = ClientService(clientFromString(services.reactor, o.endpoint), factory,
                                    retryPolicy=backoffPolicy(initialDelay=0.5, maxDelay=o.max_backoff),
                                    clock=services.reactor, prepareConnection=self._subscribe)
        self.slots = defer.DeferredSemaphore(o.prefetch)
        self.accepting = False
        self.conn = None
        m = services.metrics
        self.m_messages = m.counter("msgd_stomp_consumer_messages_total", "Broker messages handled, by outcome",
                                    ["interface", "outcome"])
        self.m_connects = m.counter("msgd_stomp_consumer_connects_total", "Connections made to the broker",
                                    ["interface"]).labels(name)

    def startService(self):
        super().startService()
        self.accepting = True
        self.client.startService()
        if not self.ready.called:     # work arrives once the broker is reached; start-up does not wait for it
            self.ready.callback(self)

    def stop_accepting(self):
        self.accepting = False
        return defer.succeed(None)

    @defer.inlineCallbacks
    def stopService(self):
        super().stopService()
        self.accepting = False
        # graceful: DISCONNECT so the broker requeues what we did not ack
        if self.conn is not None and self.conn.up:
            yield self.conn.disconnect().addErrback(lambda f: None)
        yield self.client.stopService()

    def describe(self) -> dict:
        return dict(super().describe(), endpoint=self.options.endpoint, destinations=list(self.options.destinations),
                    in_flight=self.options.prefetch - self.slots.tokens)

    @defer.inlineCallbacks
    def _subscribe(self, conn):
        """Run by ClientService on every new connection before it counts as
        connected: CONNECT, then SUBSCRIBE each destination (with receipts)."""
        yield conn.handshake
        self.conn = conn
        self.m_connects.inc()
        for dest in self.options.destinations:
            n = str(self.options.prefetch)
            yield conn.subscribe(dest, lambda frame, conn=conn: self._message(conn, frame),
                                 headers=[("prefetch-count", n), ("activemq.prefetchSize", n),
                                          *self.options.subscribe_headers])
        self.log.info("consumer {interface}: subscribed to {destinations}", interface=self.name,
                      destinations=", ".join(self.options.destinations))

    def _message(self, conn, frame):
        if not self.accepting:
            return     # not acked: redelivered after we disconnect
        self.slots.run(self._handle, conn, frame).addErrback(
            lambda f: self.log.failure("consumer {interface}: message handling failed", f, interface=self.name))

    @defer.inlineCallbacks
    def _handle(self, conn, frame):
        headers = dict(reversed(frame.headers))    # the first of repeated headers counts
        message = {"destination": headers.get("destination"), "message_id": headers.get("message-id"),
                   "redelivered": headers.get("redelivered") == "true", "headers": headers, "body": frame.body}
        ctype = headers.get("content-type", "")
        if ctype.split(";")[0].strip() == "application/json":
            try:
                message["data"] = loads(frame.body)
            except Exception as e:
                message["data_error"] = str(e)
        request = self.new_request()
        try:
            yield self.services.dispatcher.call(request, self.options.handler, (message,))
        except Exception as e:
            self.m_messages.labels(self.name, "failed").inc()
            self.log.warn("consumer {interface}: handler failed for {message_id} from {destination} "
                          "(request {request_id}): {error}; NACK", interface=self.name,
                          message_id=message["message_id"], destination=message["destination"],
                          request_id=request.id, error=getattr(e, "message", e))
            conn.nack(frame, [("requeue", "true" if self.options.requeue else "false")])
            return
        if conn.ack(frame):
            self.m_messages.labels(self.name, "acked").inc()
        else:
            self.m_messages.labels(self.name, "unacked").inc()    # the broker redelivers it
