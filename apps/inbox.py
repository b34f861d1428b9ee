"""Inbox: the handlers of the example ``dirwatch`` and ``pop3`` inputs
(see ``etc/node.ini`` and ``docs/ingest.rst``).

``take_file`` reads order files dropped into a directory, JSON holding one
order ``{"item": "book", "qty": 2}`` or a list of them, and places each
through ``orders.place``.  ``take_mail`` keeps a short summary of each mail
for ``inbox.recent``.

Both inputs are at-least-once: after a crash the same file or mail can come
again.  So both handlers are idempotent: they remember a key of what they
took (the file's name, size and mtime; the mail's Message-ID) and do nothing
the second time.  A real app keeps that key in its database, written in the
same transaction as the effect; this example keeps it in memory.
"""

from __future__ import annotations

import json
from collections import OrderedDict

from msgd import api

__all__ = ["take_file", "take_mail", "recent"]

REMEMBER = 10000        # keys kept for spotting duplicates
RECENT = 100            # mail summaries kept

_seen: OrderedDict = OrderedDict()
_mails: list[dict] = []


def __reload__(previous):
    global _seen, _mails
    _seen, _mails = previous._seen, previous._mails


def _remember(key) -> None:
    """Called only after the effect happened, so a failed try is not
    mistaken for a duplicate when the file or mail comes again."""
    _seen[key] = True
    if len(_seen) > REMEMBER:
        _seen.popitem(last=False)


async def take_file(item: dict) -> dict:
    """Place the orders of one dropped JSON file; returns the ids placed.
    A file that is not valid orders fails (it goes to ``failed/`` with the
    reason) before any order is placed."""
    if item["content"] is None:
        raise api.AppError(f"{item['name']}: order files larger than the inline limit are not accepted")
    try:
        orders = json.loads(item["content"])
    except ValueError as e:
        raise api.AppError(f"{item['name']}: not JSON ({e})") from None
    if isinstance(orders, dict):
        orders = [orders]
    if not isinstance(orders, list) or not all(_is_order(o) for o in orders):
        raise api.AppError(f"{item['name']}: expected an order {{\"item\": str, \"qty\": int}} or a list of them")
    key = ("file", item["name"], item["size"], item["mtime"])
    if key in _seen:
        return {"duplicate": True, "placed": []}
    placed = []
    for o in orders:
        order = await api.call("orders.place", o["item"], o.get("qty", 1))
        placed.append(order["id"])
    _remember(key)
    return {"duplicate": False, "placed": placed}


def _is_order(o) -> bool:
    return (isinstance(o, dict) and isinstance(o.get("item"), str) and o["item"].strip() != ""
            and type(o.get("qty", 1)) is int and 1 <= o.get("qty", 1) <= 1000)


def take_mail(mail: dict) -> dict:
    """Remember a summary of one mail (sender, subject, text, attachment
    names)."""
    msg = mail["message"]
    key = ("mail", msg.get("message-id") or mail["uid"])
    if key in _seen:
        return {"duplicate": True}
    body = msg.get_body(preferencelist=("plain", "html"))
    summary = {
        "uid": mail["uid"],
        "from": str(msg.get("from", "")),
        "subject": str(msg.get("subject", "")),
        "text": body.get_content() if body is not None else "",
        "attachments": [p.get_filename() for p in msg.iter_attachments()],
    }
    _mails.append(summary)
    del _mails[:-RECENT]
    _remember(key)
    return {"duplicate": False}


def recent(n: int = 10) -> list:
    """The last ``n`` mails taken, newest last."""
    return _mails[-n:] if n > 0 else []
