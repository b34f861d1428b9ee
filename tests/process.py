"""Run real node processes (``twistd -n msgd``) for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request

import websocket

from tests.helpers import ROOT
from tests.servers import free_port

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def post(port: int, payload, timeout: float = 10.0):
    data = json.dumps(payload).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/rpc", data=data,
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        body = r.read()
    return json.loads(body) if body else None


def call(port: int, method: str, *params, timeout: float = 10.0):
    return post(port, {"jsonrpc": "2.0", "id": 1, "method": method, "params": list(params)}, timeout)


class NodeProcess:
    """A node in its own process, with its own dir holding node.ini, apps/
    and the log."""

    def __init__(self, base: str, ini: str, apps: dict[str, str] | None = None, port: int | None = None):
        self.base = os.path.abspath(base)
        os.makedirs(os.path.join(self.base, "apps"), exist_ok=True)
        self.port = port or free_port()
        self.ini = os.path.join(self.base, "node.ini")
        with open(self.ini, "w") as f:
            f.write(textwrap.dedent(ini).replace("{port}", str(self.port)))
        for name, src in (apps or {}).items():
            self.write_app(name, src)
        self.log = os.path.join(self.base, "node.log")
        self.proc: subprocess.Popen | None = None

    def write_app(self, name: str, source: str) -> None:
        from tests.helpers import write
        write(os.path.join(self.base, "apps", name), source)

    def start(self, wait: bool = True, timeout: float = 20.0) -> "NodeProcess":
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(
            [TWISTD, "--nodaemon", "--pidfile=", f"--logfile={self.log}", "msgd", "-c", self.ini],
            cwd=self.base, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}: {self.output()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"node not ready after {timeout}s: {self.output()}")

    def output(self) -> str:
        text = ""
        if os.path.exists(self.log):
            with open(self.log, errors="replace") as f:
                text = f.read()[-3000:]
        return text

    def signal(self, sig=signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc is not None:
            for s in (self.proc.stdout, self.proc.stderr):
                if s:
                    s.close()


def wait_for(condition, timeout=30.0, what="condition"):
    """Poll ``condition()`` (blocking; runs in a test thread) until true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached within {timeout}s")


def health(node: NodeProcess) -> dict:
    """The node's ``/health`` answer."""
    with urllib.request.urlopen(f"http://127.0.0.1:{node.port}/health", timeout=5) as r:
        return json.loads(r.read())


def pubsub_connected(*nodes: NodeProcess, timeout: float = 30.0, what: str = "pub/sub connected") -> None:
    """Until every node's ``/health`` says its pub/sub backend is connected."""
    for node in nodes:
        wait_for(lambda: health(node)["pubsub"]["connected"], timeout, f"{node.base}: {what}")


def publish(node: NodeProcess, channel: str, data):
    """``rpc.publish`` on the node; the event's offset."""
    r = call(node.port, "rpc.publish", channel, data)
    assert "result" in r, r
    return r["result"]["offset"]


class Client:
    """A blocking websocket-client connection speaking the JSON-RPC protocol."""

    def __init__(self, node: NodeProcess):
        self.ws = websocket.create_connection(f"ws://127.0.0.1:{node.port}/ws", timeout=10,
                                              subprotocols=["jsonrpc"])
        self.events: list = []
        self.ids = 0

    def call(self, method, params):
        self.ids += 1
        self.ws.send(json.dumps({"jsonrpc": "2.0", "id": self.ids, "method": method, "params": params}))
        while True:
            m = json.loads(self.ws.recv())
            if m.get("id") == self.ids:
                return m
            self.events.append(self._params(m))

    @staticmethod
    def _params(m):
        """An event's params; a gap notification's with ``"gap": True``."""
        return dict(m["params"], gap=True) if m["method"] == "rpc.gap" else m["params"]

    def event(self):
        if self.events:
            return self.events.pop(0)
        return self._params(json.loads(self.ws.recv()))

    def close(self):
        self.ws.close()
