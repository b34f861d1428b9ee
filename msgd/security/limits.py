"""Limits that keep one client from taking the node: connections per
interface and per client address, a request rate per principal (a token
bucket) and login throttling.  All take the node's clock; all bound their
own memory."""

from __future__ import annotations

from collections import OrderedDict, deque

from msgd.core import errors

MAX_KEYS = 100_000     # most addresses/principals remembered by one limiter


class ConnectionLimits:
    """``admit(address)`` → None when a connection may open, else the
    name of the limit it hits; ``release(address)`` when it closes.  A
    connection of no known address (None) counts only towards the total."""

    def __init__(self, max_total: int = 0, max_per_address: int = 0):
        self.max_total = max_total
        self.max_per_address = max_per_address
        self.total = 0
        self.by_address: dict[str, int] = {}

    def admit(self, address: str | None) -> str | None:
        if self.max_total and self.total >= self.max_total:
            return "connections"
        if address is None:
            self.total += 1
            return None
        n = self.by_address.get(address, 0)
        if self.max_per_address and n >= self.max_per_address:
            return "connections_per_address"
        self.total += 1
        self.by_address[address] = n + 1
        return None

    def release(self, address: str | None) -> None:
        self.total -= 1
        if address is None:
            return
        n = self.by_address.get(address, 0) - 1
        if n > 0:
            self.by_address[address] = n
        else:
            self.by_address.pop(address, None)


class RateLimit:
    """A token bucket per key: ``rate`` per second, up to ``burst`` at once."""

    def __init__(self, clock, rate: float, burst: int):
        self.clock = clock
        self.rate = rate
        self.burst = max(1, burst)
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str) -> bool:
        if not self.rate:
            return True
        now = self.clock.seconds()
        tokens, last = self.buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        ok = tokens >= 1
        self.buckets[key] = (tokens - 1 if ok else tokens, now)
        if len(self.buckets) > MAX_KEYS:
            self.buckets.popitem(last=False)
        return ok


class LoginThrottle:
    """After ``attempts`` failed logins within ``window`` seconds for a key
    (a client address, a user name), further logins for that key are
    refused until the window has passed."""

    def __init__(self, clock, attempts: int, window: float):
        self.clock = clock
        self.attempts = attempts
        self.window = window
        self.failures: OrderedDict[str, deque] = OrderedDict()

    def _recent(self, key: str) -> deque | None:
        q = self.failures.get(key)
        if q is None:
            return None
        limit = self.clock.seconds() - self.window
        while q and q[0] <= limit:
            q.popleft()
        if not q:
            del self.failures[key]
            return None
        return q

    def check(self, *keys: str) -> None:
        """Raise Overloaded when any key is locked out."""
        if not self.attempts:
            return
        for key in keys:
            q = self._recent(key)
            if q is not None and len(q) >= self.attempts:
                raise errors.Overloaded("too many failed logins; try again later",
                                        data={"retry_after": round(q[0] + self.window - self.clock.seconds(), 1)})

    def failed(self, *keys: str) -> None:
        if not self.attempts:
            return
        now = self.clock.seconds()
        for key in keys:
            q = self._recent(key) or deque(maxlen=self.attempts)
            q.append(now)
            self.failures[key] = q
            self.failures.move_to_end(key)
        while len(self.failures) > MAX_KEYS:
            self.failures.popitem(last=False)
