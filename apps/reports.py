"""Periodic reports, started by the clock: the example of ``type = schedule``
(see ``etc/node.ini`` and ``docs/more-interfaces.rst``).

``orders_summary`` runs every minute: it asks ``orders.summary`` for the
totals of open orders and publishes them on the channel ``reports.orders``,
so dashboards subscribed to it (over /ws, /sse or a unix socket) see fresh
figures without polling.  Unchanged figures are not published again.
"""

from __future__ import annotations

import time

from msgd import api

__all__ = ["orders_summary"]

CHANNEL = "reports.orders"
_last: dict = {}


def __reload__(previous):
    _last.update(previous._last)


async def orders_summary(always: bool = False) -> dict:
    """Publish the open orders' totals on ``reports.orders`` when they
    changed (or ``always``); returns what was published, or ``{}``."""
    summary = await api.call("orders.summary")
    if summary == _last.get("summary") and not always:
        return {}
    _last["summary"] = summary
    report = dict(summary, at=round(time.time(), 3))
    await api.publish(CHANNEL, report)
    return report
