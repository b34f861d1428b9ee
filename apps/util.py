"""Small utilities, useful for trying a node and in tests."""

from msgd import api


def echo(value=None):
    """Return ``value`` unchanged."""
    return value


def add(a: float, b: float) -> float:
    """a + b"""
    return a + b


async def wait(seconds: float) -> float:
    """Wait ``seconds`` without blocking the node (cancelled at the
    deadline), then return how long was waited."""
    await api.sleep(seconds)
    return seconds


def whoami() -> dict:
    """The request as the app sees it."""
    req = api.request()
    return {"request": req.id, "interface": req.interface, "principal": req.principal,
            "remaining": req.remaining()}
