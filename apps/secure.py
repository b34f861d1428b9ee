"""Checking who calls, in app code: the node's ``[access:*]`` rules decide
which targets a principal may call at all; a function can look further at
``api.request().principal`` (None when anonymous; else ``.name``, ``.roles``
and ``.via``) and refuse with ``api.Unauthorized``.  It can also hand a
browser a signed token for its WebSocket (``api.issue_token``)."""

from msgd import api


def whoami() -> dict:
    """Who the node thinks is calling."""
    p = api.request().principal
    if p is None:
        return {"name": None, "roles": [], "via": "anonymous"}
    return {"name": p.name, "roles": sorted(p.roles), "via": p.via}


def refund(order_id: str, amount: float) -> dict:
    """Only principals with the ``ops`` role may refund, and nobody more than
    1000 at once: a rule the ini file cannot express."""
    p = api.request().principal
    if p is None or "ops" not in p.roles:
        raise api.Unauthorized("refunds need the ops role")
    if amount > 1000:
        raise api.Unauthorized("refunds above 1000 need a second person")
    return {"order_id": order_id, "refunded": amount, "by": p.name}


def browser_token() -> dict:
    """A token for the caller's browser to open /ws with (``?token=``)."""
    return api.issue_token(ttl=600)
