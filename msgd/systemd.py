"""Telling systemd how the node is doing (``Type=notify`` services).

systemd passes ``NOTIFY_SOCKET`` (a datagram socket; ``@name`` is in the
abstract namespace) and, with ``WatchdogSec=``, ``WATCHDOG_USEC`` (and
``WATCHDOG_PID``).  The node sends:

- ``READY=1`` once :meth:`NodeService.ready` fired: every listener listens
  and every adapter started.  Until then ``systemctl start`` waits, and units
  ordered after msgd do not start against a port that is not open yet;
- ``RELOADING=1`` while a reload (SIGHUP) runs, then ``READY=1`` again;
- ``STOPPING=1`` as soon as the node starts draining;
- ``STATUS=…`` one human line, shown by ``systemctl status``;
- ``WATCHDOG=1`` every half of ``WATCHDOG_USEC``: the pings come from a
  reactor timer, so a reactor stuck in blocking code misses them and systemd
  restarts the node.

Without ``NOTIFY_SOCKET`` every method is a no-op, so the same code runs
under a terminal, tests and systemd.
"""

from __future__ import annotations

import os
import socket
import time

from twisted.internet.task import LoopingCall
from twisted.logger import Logger


class Notifier:
    """``reactor`` is passed in; ``environ`` defaults to ``os.environ``."""

    log = Logger()

    def __init__(self, reactor, environ=None):
        env = os.environ if environ is None else environ
        self.reactor = reactor
        self.address = env.get("NOTIFY_SOCKET") or None
        if self.address and self.address.startswith("@"):
            self.address = "\0" + self.address[1:]
        self.watchdog_interval = self._watchdog_interval(env)
        self._socket = None
        self._pinger = None

    @staticmethod
    def _watchdog_interval(env) -> float | None:
        """Half of WATCHDOG_USEC in seconds, when the watchdog is meant for
        this process (``sd_watchdog_enabled`` semantics)."""
        try:
            usec = int(env.get("WATCHDOG_USEC", ""))
        except ValueError:
            return None
        pid = env.get("WATCHDOG_PID")
        if usec <= 0 or (pid and pid != str(os.getpid())):
            return None
        return usec / 2e6

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields) -> None:
        """Send ``KEY=value`` lines, e.g. ``notify(READY=1, STATUS="ok")``."""
        if not self.enabled:
            return
        text = "".join(f"{k}={v}\n" for k, v in fields.items())
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._socket.setblocking(False)
            self._socket.sendto(text.encode(), self.address)
        except OSError as e:
            self.log.warn("cannot notify systemd at {address}: {error}", address=self.address, error=e)

    # -- the states --------------------------------------------------------------

    def ready(self, status: str) -> None:
        self.notify(READY=1, STATUS=status)

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd ≥ 253 (Type=notify-reload) match this to the reload
        self.notify(RELOADING=1, MONOTONIC_USEC=int(time.monotonic() * 1e6), STATUS="reloading configuration")

    def stopping(self, status: str = "draining") -> None:
        self.notify(STOPPING=1, STATUS=status)

    def status(self, status: str) -> None:
        self.notify(STATUS=status)

    # -- watchdog ----------------------------------------------------------------

    def start_watchdog(self) -> None:
        if not self.enabled or self.watchdog_interval is None or self._pinger is not None:
            return
        self._pinger = LoopingCall(self.notify, WATCHDOG=1)
        self._pinger.clock = self.reactor
        self._pinger.start(self.watchdog_interval, now=True)

    def stop(self) -> None:
        if self._pinger is not None and self._pinger.running:
            self._pinger.stop()
        self._pinger = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def watch(self, node) -> None:
        """Wire the notifier to ``node``: pings from now, READY=1 when the node
        is ready, STATUS when it cannot start."""
        self.start_watchdog()

        def ready(_):
            self.ready(node.status_line())

        def failed(f):
            self.status(f"failed to start: {f.getErrorMessage()}")   # tap logs it and stops
        node.ready().addCallbacks(ready, failed)
