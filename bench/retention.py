"""Memory an event kept in a channel's history costs, against its encoded size.

``python -m bench.retention [--events 1000] [--channels 10] [--payload 100 1000 10000]``

In one process, a :class:`msgd.core.pubsub.Broker` on a ``task.Clock`` with
one WebSocket-like subscriber per channel (it frames each event once, as the
WebSocket layer does); events are published the way a client's
``rpc.publish`` arrives (the message decoded by ``loads``).  Prints, per
payload size:

- retained bytes per history event (tracemalloc: what emptying the full
  histories frees, divided by the events), the encoded notification's length
  and their ratio (target: at most 2x); the same for events received from a
  shared backend (decoded as the Redis bridge decodes them, each with its own
  channel and epoch strings, and taken by ``Broker.receive``);
- the RSS the histories added (``/proc``; coarser: the allocator keeps pages);
- the CPU time per published event (encode, deliver to the one subscriber,
  keep) and, for comparison, what ``orjson.dumps`` of the notification and a
  right-sized copy of it (``jsonrpc.kept``) cost alone.

Speed figures are in-process and indicative; the retained bytes are exact.
"""

from __future__ import annotations

import argparse
import gc
import time
import tracemalloc

from twisted.internet.task import Clock

from bench import common
from msgd.core.jsonrpc import dumps, kept, loads
from msgd.cluster.redis_pubsub import _event, _loads
from msgd.core.pubsub import Broker
from msgd.interfaces.websocket import frame


class Framer:
    """Frames each event once, as MsgdWebSocket.deliver does."""
    principal = None

    def deliver(self, event):
        if event.cache.get("ws") is None:
            event.cache["ws"] = frame(event.notification())


def messages(channels: int, events: int, payload: int) -> list[bytes]:
    pad = "x" * max(0, payload - 40)
    return [dumps({"jsonrpc": "2.0", "method": "rpc.publish",
                   "params": {"channel": f"bench.{i % channels}",
                              "data": {"n": i + 1000, "t": 1000.0 + i / 7, "p": pad}}})
            for i in range(channels * events)]


def publish_all(broker: Broker, msgs: list[bytes]) -> float:
    t0 = time.process_time()
    for m in msgs:
        params = loads(m)["params"]
        broker.publish(params["channel"], params["data"])
    return time.process_time() - t0


def receive_all(broker: Broker, msgs: list[bytes]) -> float:
    """Events as the Redis bridge hands them over: decoded from its wire form."""
    t0 = time.process_time()
    for m in msgs:
        broker.receive(_event(_loads(m)))
    return time.process_time() - t0


def received(broker: Broker, channels: int, events: int, payload: int) -> list[bytes]:
    """The Redis bridge's wire form of the events (channels' epochs are the broker's)."""
    pad = "x" * max(0, payload - 40)
    epochs = [broker.channel(f"bench.{c}").epoch for c in range(channels)]
    return [dumps({"c": f"bench.{i % channels}", "o": i // channels + 1, "e": epochs[i % channels],
                   "d": {"n": i + 1000, "t": 1000.0 + i / 7, "p": pad}, "t": 1000.0})
            for i in range(channels * events)]


def retained(channels: int, events: int, payload: int, shared: bool = False) -> dict:
    msgs = [] if shared else messages(channels, events, payload)
    out = {}
    for traced in (False, True):      # speed and RSS untraced; then exact bytes with tracemalloc
        broker = Broker(Clock(), history_size=events, gc_interval=0)
        for c in range(channels):
            broker.subscribe(f"bench.{c}", Framer())
        if shared:
            msgs = received(broker, channels, events, payload)
        gc.collect()
        rss0 = common.rss_kib_self()
        if traced:
            tracemalloc.start()
        cpu = (receive_all if shared else publish_all)(broker, msgs)
        gc.collect()
        histories = [ch.history for ch in broker.channels.values()]
        if not traced:
            out["rss_kib"], out["cpu_us"] = common.rss_kib_self() - rss0, cpu / len(msgs) * 1e6
            continue
        full = tracemalloc.get_traced_memory()[0]
        encoded = sum(len(ev.notification()) for h in histories for ev in h)
        out["counted"] = getattr(broker, "history_bytes", 0) / len(msgs)
        for h in histories:
            h.clear()
        gc.collect()
        out["per_event"] = (full - tracemalloc.get_traced_memory()[0]) / len(msgs)
        out["encoded"] = encoded / len(msgs)
        tracemalloc.stop()
    return out


def encode_costs(payload: int, rounds: int = 20000) -> dict:
    pad = "x" * max(0, payload - 40)
    note = {"jsonrpc": "2.0", "method": "rpc.event",
            "params": {"channel": "bench.0", "offset": 1234, "epoch": "0123456789ab",
                       "data": {"n": 1, "t": 1000.5, "p": pad}}}
    out = {}
    b = dumps(note)
    for name, fn in (("dumps", lambda: dumps(note)), ("kept", lambda: kept(b))):
        best = None
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(rounds):
                fn()
            t = (time.perf_counter() - t0) / rounds * 1e6
            best = t if best is None else min(best, t)
        out[name] = best
    tracemalloc.start()
    held = [dumps(note) for _ in range(1000)]
    out["dumps_held"] = tracemalloc.get_traced_memory()[0] / len(held)
    tracemalloc.stop()
    out["len"] = len(b)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=1000, help="history_size: events kept per channel")
    p.add_argument("--channels", type=int, default=10)
    p.add_argument("--payload", type=int, nargs="+", default=[100, 1000, 10000])
    a = p.parse_args(argv)
    import orjson
    print(common.machine(), f"orjson {orjson.__version__}")
    print(f"{a.channels} channels x {a.events} events kept, one subscriber each")
    for size in a.payload:
        r = retained(a.channels, a.events, size)
        c = encode_costs(size)
        print(f"  {size:>6}-byte data: {r['per_event']:>8,.0f} bytes retained per event, notification "
              f"{r['encoded']:,.0f} bytes -> {r['per_event'] / r['encoded']:.2f}x (target <= 2x); "
              f"counted {r['counted']:,.0f}; RSS +{r['rss_kib'] / 1024:.1f} MiB")
        s = retained(a.channels, a.events, size, shared=True)
        print(f"  {'':>6}  received from Redis: {s['per_event']:>8,.0f} bytes retained per event -> "
              f"{s['per_event'] / s['encoded']:.2f}x; counted {s['counted']:,.0f}")
        print(f"  {'':>6}  publish+keep {r['cpu_us']:.2f} us/event; orjson.dumps of it {c['dumps']:.2f} us "
              f"holding {c['dumps_held']:,.0f} bytes; right-sized copy (kept) {c['kept']:.2f} us")


if __name__ == "__main__":
    main()
