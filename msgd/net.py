"""Socket-level helpers shared by the interfaces and the cluster layer."""

from __future__ import annotations

from twisted.internet import tcp


def write_now(transport, data: bytes) -> None:
    """``transport.write(data)``, but when Twisted holds nothing unsent for
    this plain TCP (or Unix) socket, send at once, as a Node.js socket does
    when it is uncorked: a write through Twisted costs a turn of the reactor,
    two epoll_ctl calls (start and stop watching for writability) and its
    write machinery, per socket and turn.  What the socket does not take
    goes through ``transport.write`` (which also pauses the producer, as usual)."""
    if (isinstance(transport, tcp.Connection) and not transport.TLS and transport.connected
            and not transport.disconnecting and not transport.dataBuffer and not transport._tempDataBuffer):
        sent = transport.writeSomeData(data)        # the socket's send(); an exception object when lost
        if isinstance(sent, int) and sent:          # (then the transport's own write finds out)
            if sent < len(data):
                # the rest of a write the socket has begun: where Twisted keeps such bytes (not
                # in its queue of whole writes, which discard_unsent may drop)
                transport.dataBuffer, transport.offset = data[sent:], 0
                transport.startWriting()
                transport._maybePauseProducer()
            return
    transport.write(data)
