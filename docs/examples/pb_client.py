"""A plain Twisted PB client of an msgd node (see docs/pb.rst).

Run it against the node of etc/node.ini (PB on 127.0.0.1:8789)::

    python docs/examples/pb_client.py [HOST PORT USER PASSWORD]

It logs in, calls ``util.add`` and ``util.whoami``, publishes on a channel,
sends an async message twice with the same id (the second is a duplicate),
and shows how an error comes back.  It needs only Twisted; ``msgd`` is
imported, when installed, just to rebuild errors as exception classes.
"""

import json
import sys
import uuid

from twisted.cred.credentials import UsernamePassword
from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.spread import pb


def error_of(e: Exception) -> dict:
    """A remote msgd error as ``{"code", "name", "message", "data"}``.

    PB raises :class:`pb.RemoteError` whose ``remoteType`` is
    ``msgd.interfaces.pb.PBError`` and whose text is that JSON object.
    (With msgd installed, ``msgd.interfaces.pb.rebuild(e)`` gives the
    matching ``msgd.core.errors`` exception instead.)"""
    if isinstance(e, pb.RemoteError) and e.remoteType == b"msgd.interfaces.pb.PBError":
        return json.loads(e.args[0])
    raise e


async def main(reactor, host="127.0.0.1", port="8789", user="peer", password="change-me"):
    factory = pb.PBClientFactory()
    await TCP4ClientEndpoint(reactor, host, int(port)).connect(factory)
    try:
        node = await factory.login(UsernamePassword(user.encode(), password.encode()))

        # call(target, args, kwargs, deadline in seconds): the node cancels
        # the call, and answers a timeout error, when the deadline passes
        print("util.add(2, 3) =", await node.callRemote("call", "util.add", [2, 3], {}, 5.0))
        print("util.whoami() =", await node.callRemote("call", "util.whoami", [], {}))

        # publish(channel, data) -> offset of the event
        print("published at offset", await node.callRemote("publish", "demo.pb", {"hello": "from PB"}))

        # send(target, args, kwargs, message_id, expires): handled once per id
        message_id = uuid.uuid4().hex
        for _ in range(2):
            answer = await node.callRemote("send", "util.echo", ["async"], {}, message_id, None)
            print("send ->", answer)

        try:
            await node.callRemote("call", "util.nothing", [], {})
        except Exception as e:
            print("error:", error_of(e))
    finally:
        factory.disconnect()


if __name__ == "__main__":
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, *sys.argv[1:])))
