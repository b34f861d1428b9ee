"""Bridging a message broker and browsers over STOMP.

* ``take(message)`` is the handler of a ``stomp-consumer`` interface: each
  broker message (a queue's order events, say) is announced to browsers on
  the pub/sub channel ``broker.messages``, where STOMP clients
  (``SUBSCRIBE /topic/broker.messages``) and WebSocket clients alike see
  it.  It fails on a message it cannot use, so the consumer NACKs it and
  the broker redelivers or dead-letters it.
* ``forward(destination, data)`` sends to a broker queue through the
  ``[adapter:broker] type=stomp`` adapter and answers once the broker
  confirmed: browsers call it as ``SEND /app/stomp_demo.forward`` with a
  receipt, or as JSON-RPC.
"""

from msgd import api

__all__ = ["take", "forward"]

CHANNEL = "broker.messages"


def take(message: dict):
    if "data" in message:
        data = message["data"]
    else:
        try:
            data = message["body"].decode("utf-8")
        except UnicodeDecodeError:
            raise api.AppError("the message is neither JSON nor UTF-8 text", code=-32020) from None
    return api.publish(CHANNEL, {"destination": message["destination"], "data": data,
                                 "redelivered": message["redelivered"]})


async def forward(destination: str, data=None):
    if not destination.startswith(("/queue/", "/topic/", "/exchange/", "/amq/queue/")):
        raise api.InvalidParams("destination must be a /queue/, /topic/, /exchange/ or /amq/queue/ name")
    await api.adapter("broker").send(destination, data)
    return {"sent": destination}
