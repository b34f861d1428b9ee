"""STOMP messages per second, publish → subscriber: msgd's STOMP listener
next to RabbitMQ's STOMP plugin, with the same client (stomp.py).

    .venv/bin/python -m bench.stomp [--messages 5000] [--size 100] [--subscribers 1]

The node runs in its own process (``python -m bench.stomp serve PORT``).
``--subscribers`` stomp.py connections subscribe to a topic (``/topic/bench``:
a pub/sub channel on msgd, the ``amq.topic`` exchange on RabbitMQ), another
publishes ``--messages`` JSON bodies of about ``--size`` bytes as fast as it
can; the time runs from the first SEND to the last MESSAGE received.  For
msgd the server's CPU time over the same span is read from /proc and given
per delivered message (messages x subscribers).  RabbitMQ is the machine's
(tests/servers.py ``stomp_broker``); without it only msgd is measured.

``--raw`` leaves stomp.py (whose parsing in Python threads bounds the rate
long before the server does) for plain sockets: the publisher writes its
SEND frames ``--window`` at a time, each subscriber only counts the NULs
that end frames.  The server then gets bursts, and the figure is the
server's own cost per delivery, writes included.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import stomp


def serve(port: int) -> None:
    from twisted.internet import reactor

    from bench.common import node_in_process
    node_in_process(reactor, f"[interface:stomp]\ntype = stomp\nendpoint = tcp:{port}:interface=127.0.0.1\n"
                             f"max_pending = 64MiB\n")
    reactor.run()


class Counter(stomp.ConnectionListener):
    def __init__(self, n: int):
        self.n, self.got, self.done = n, 0, threading.Event()
        self.receipt = threading.Event()

    def on_receipt(self, frame):
        self.receipt.set()

    def on_message(self, frame):
        self.got += 1
        if self.got >= self.n:
            self.done.set()


def run(host: str, port: int, destination: str, n: int, size: int, creds: dict, subscribers: int = 1,
        cpu=None) -> tuple[float, float | None]:
    """Messages per second through the server at host:port (each to every
    subscriber), and the server's CPU seconds meanwhile (``cpu()``: its
    CPU seconds so far; None without it)."""
    subs, counters = [], []
    for i in range(subscribers):
        sub = stomp.Connection12([(host, port)], **({"vhost": creds["vhost"]} if creds else {}))
        counter = Counter(n)
        sub.set_listener("count", counter)
        sub.connect(creds.get("login"), creds.get("passcode"), wait=True)
        sub.subscribe(destination, id=f"bench{i}", ack="auto", receipt="subscribed")
        if not counter.receipt.wait(10):
            raise RuntimeError("no receipt for SUBSCRIBE")
        subs.append(sub)
        counters.append(counter)
    pub = stomp.Connection12([(host, port)], **({"vhost": creds["vhost"]} if creds else {}))
    pub.connect(creds.get("login"), creds.get("passcode"), wait=True)
    body = json.dumps({"payload": "x" * max(0, size - 16)})
    cpu_before = cpu() if cpu is not None else None
    started = time.perf_counter()
    for _ in range(n):
        pub.send(destination, body, content_type="application/json")
    for counter in counters:
        if not counter.done.wait(120):
            raise RuntimeError(f"only {counter.got} of {n} messages arrived")
    elapsed = time.perf_counter() - started
    server_cpu = cpu() - cpu_before if cpu is not None else None
    pub.disconnect()
    for sub in subs:
        sub.disconnect()
    return n / elapsed, server_cpu


def _frame(command: str, headers: dict, body: bytes = b"") -> bytes:
    head = "".join(f"{k}:{v}\n" for k, v in headers.items())
    return f"{command}\n{head}\n".encode() + body + b"\0"


def _connect(host: str, port: int, creds: dict) -> socket.socket:
    s = socket.create_connection((host, port))
    headers = {"accept-version": "1.2", "heart-beat": "0,0", "host": creds.get("vhost", "/")}
    if creds:
        headers.update(login=creds["login"], passcode=creds["passcode"])
    s.sendall(_frame("CONNECT", headers))
    _read_frames(s, 1)
    return s


def _read_frames(s: socket.socket, n: int, counted: list | None = None) -> None:
    """Read until ``n`` frames (NULs) have arrived; ``counted[0]`` keeps the count."""
    got = 0
    while got < n:
        data = s.recv(1 << 20)
        if not data:
            raise RuntimeError(f"connection closed after {got} of {n} frames")
        got += data.count(b"\0")
        if counted is not None:
            counted[0] = got


def run_raw(host: str, port: int, destination: str, n: int, size: int, creds: dict, subscribers: int = 1,
            cpu=None, window: int = 100) -> tuple[float, float | None]:
    """As :func:`run`, on plain sockets (see the module's docstring)."""
    subs = []
    for i in range(subscribers):
        s = _connect(host, port, creds)
        s.sendall(_frame("SUBSCRIBE", {"destination": destination, "id": f"bench{i}", "ack": "auto",
                                       "receipt": "subscribed"}))
        _read_frames(s, 1)
        subs.append(s)
    pub = _connect(host, port, creds)
    body = json.dumps({"payload": "x" * max(0, size - 16)}).encode()
    send = _frame("SEND", {"destination": destination, "content-type": "application/json",
                           "content-length": str(len(body))}, body)
    counts = [[0] for _ in subs]
    readers = [threading.Thread(target=_read_frames, args=(s, n, c), daemon=True) for s, c in zip(subs, counts)]
    cpu_before = cpu() if cpu is not None else None
    started = time.perf_counter()
    for r in readers:
        r.start()
    left = n
    while left:
        k = min(window, left)
        pub.sendall(send * k)
        left -= k
    for r, c in zip(readers, counts):
        r.join(120)
        if r.is_alive():
            raise RuntimeError(f"only {c[0]} of {n} messages arrived")
    elapsed = time.perf_counter() - started
    server_cpu = cpu() - cpu_before if cpu is not None else None
    for s in (pub, *subs):
        s.close()
    return n / elapsed, server_cpu


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=5000)
    p.add_argument("--size", type=int, default=100)
    p.add_argument("--subscribers", type=int, default=1)
    p.add_argument("--raw", action="store_true", help="plain-socket clients, SENDs written --window at a time")
    p.add_argument("--window", type=int, default=100)
    p.add_argument("args", nargs="*")
    a = p.parse_args(argv)
    if a.args and a.args[0] == "serve":
        serve(int(a.args[1]))
        return
    from bench.common import cpu_seconds
    from tests.servers import free_port, port_open, wait_port
    port = free_port()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-m", "bench.stomp", "serve", str(port)], cwd=root)
    try:
        wait_port("127.0.0.1", port, timeout=20, proc=proc)
        if a.raw:
            rate, server_cpu = run_raw("127.0.0.1", port, "/topic/bench", a.messages, a.size, {}, a.subscribers,
                                       lambda: cpu_seconds(proc.pid), a.window)
        else:
            rate, server_cpu = run("127.0.0.1", port, "/topic/bench", a.messages, a.size, {}, a.subscribers,
                                   lambda: cpu_seconds(proc.pid))
        per = server_cpu * 1e6 / (a.messages * a.subscribers)
        print(f"msgd STOMP listener:   {rate:8.0f} messages/s  ({a.messages} x {a.size} B, publish -> "
              f"{a.subscribers} subscriber(s){', raw sockets' if a.raw else ''}); "
              f"server CPU {per:.1f} us per delivered message")
    finally:
        proc.terminate()
        proc.wait(10)
    if port_open("127.0.0.1", 61613):
        creds = {"login": "guest", "passcode": "guest", "vhost": "/"}
        rate, _ = (run_raw if a.raw else run)("127.0.0.1", 61613, f"/topic/msgd-bench-{uuid.uuid4().hex[:8]}",
                                              a.messages, a.size, creds, a.subscribers)
        print(f"RabbitMQ STOMP plugin: {rate:8.0f} messages/s  (same client, same messages)")
    else:
        print("RabbitMQ STOMP plugin: not measured (nothing listens on 127.0.0.1:61613)")


if __name__ == "__main__":
    main()
