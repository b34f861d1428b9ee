"""Orders: a small, real example of an app module.

Call it over any interface, e.g. JSON-RPC over HTTP::

    curl -s -d '{"jsonrpc":"2.0","id":1,"method":"orders.place","params":["book",2]}' \\
         http://127.0.0.1:8080/rpc

State lives in the module and is carried across reloads by ``__reload__``,
so editing this file while the node runs keeps the orders placed so far.
"""

from __future__ import annotations

import itertools

from msgd import api

__all__ = ["place", "get", "cancel", "summary", "list_open"]

MAX_QTY = 1000

_orders: dict[int, dict] = {}
_ids = itertools.count(1)


def __reload__(previous):
    """Keep the orders (and the id sequence) of the version being replaced."""
    global _orders, _ids
    _orders = previous._orders
    _ids = previous._ids


def place(item: str, qty: int = 1) -> dict:
    """Place an order for ``qty`` of ``item``; returns the order."""
    if not item.strip():
        raise api.InvalidParams("item must not be empty")
    if not 1 <= qty <= MAX_QTY:
        raise api.AppError(f"qty must be between 1 and {MAX_QTY}", code=-32010, data={"qty": qty})
    order = {"id": next(_ids), "item": item.strip(), "qty": qty, "status": "open",
             "by": _who()}
    _orders[order["id"]] = order
    return order


def get(order_id: int) -> dict:
    """The order with this id."""
    try:
        return _orders[order_id]
    except KeyError:
        raise api.AppError(f"no order {order_id}", code=-32011) from None


def cancel(order_id: int) -> dict:
    """Cancel an open order."""
    order = get(order_id)
    if order["status"] != "open":
        raise api.AppError(f"order {order_id} is {order['status']}", code=-32012)
    order["status"] = "cancelled"
    return order


def list_open() -> list:
    """Open orders, oldest first."""
    return [o for o in _orders.values() if o["status"] == "open"]


@api.blocking
def summary() -> dict:
    """Quantities per item over open orders (runs in the thread pool: a real
    version would read a database here)."""
    totals: dict[str, int] = {}
    for o in list(_orders.values()):
        if o["status"] == "open":
            totals[o["item"]] = totals.get(o["item"], 0) + o["qty"]
    return {"items": totals, "orders": sum(1 for o in _orders.values() if o["status"] == "open")}


def _who() -> str | None:
    principal = api.request().principal
    return getattr(principal, "name", principal)
