"""Chat rooms: the demo.  An app package with both halves: these server
functions, and the page that calls them in ``static/index.html`` (served at
``/apps/chat/``; ``/`` leads there).

Messages go out on the pub/sub channel ``chat.ROOM``; browsers subscribe to
it with msgd.js and see who is there with ``rpc.presence``.  Sending goes
through this module (not a raw ``rpc.publish``) so that messages are checked
and stamped on the server, and so any interface — HTTP, XML-RPC, STOMP — can
post into a room.
"""

from __future__ import annotations

import re
import time

from msgd import api

__all__ = ["send", "rooms"]

ROOMS = ("lobby", "random", "help")
MAX_TEXT = 500
_NAME = re.compile(r"^[\w .-]{1,32}$")


def rooms() -> list:
    """The rooms one can join."""
    return list(ROOMS)


def send(room: str, name: str, text: str):
    """Post ``text`` as ``name`` to ``room``; fires with the message's offset."""
    if room not in ROOMS:
        raise api.AppError(f"no room {room!r}", code=-32020, data={"rooms": list(ROOMS)})
    if not _NAME.match(name):
        raise api.InvalidParams("name: 1 to 32 letters, digits, spaces, . _ -")
    text = text.strip()
    if not text:
        raise api.InvalidParams("text must not be empty")
    if len(text) > MAX_TEXT:
        raise api.AppError(f"text longer than {MAX_TEXT} characters", code=-32021)
    return api.publish(f"chat.{room}", {"name": name, "text": text, "at": round(time.time(), 3)})
