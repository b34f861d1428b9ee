"""The benchmark suite: msgd side by side with its peers, one table.

``python -m bench all`` (or ``make bench``) installs the peers into
``.cache/peers/`` (python-socketio on aiohttp, Crossbar.io; nothing is
committed), then runs every workload against each server in the same run:

- pub/sub fan-out to 100 and 1,000 subscribers (deliveries/s, p50/p99,
  server CPU per delivery), 1,000 events in flight published by two
  connections, so that the server rather than the window is the limit,
- RPC calls/s from 10 connections x 10 calls in flight,
- memory per idle subscribed WebSocket at 10,000 connections,
- connect rate (new WebSocket sessions per second),

and then XML-RPC and PB against their raw Twisted baselines
(``bench/xmlrpc.py``, ``bench/pb.py``).  Servers run pinned to CPU 0, the
Node.js load generator to CPU 1; each row says which side was the
bottleneck (CPU time of each, counted while the workload runs, not while
connections are set up).  ``--quick`` runs smaller workloads.

References besides the peers: raw Autobahn (``bench/refserver.py``: its own
broadcast, and an echo that parses each call), a raw Autobahn echo that does
not parse (``--echo``: Autobahn's own ceiling), and for fan-out a Node.js
``ws`` server that corks each subscriber's socket until the next tick
(``bench/refserver.js``).  RPC is also measured on a node running the
shipped ``etc/node.ini`` as it is (every interface, reloading, logging).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from bench import common

PEERS = os.path.join(common.ROOT, ".cache", "peers")
REQUIREMENTS = {"sio": ["python-socketio>=5", "aiohttp>=3.9"], "crossbar": ["crossbar"]}


def peer_python(name: str) -> str | None:
    """The peer's virtual environment, created on first use; None when it
    cannot be installed here (the table then says so)."""
    venv = os.path.join(PEERS, name)
    py = os.path.join(venv, "bin", "python")
    marker = os.path.join(venv, ".installed")
    if not os.path.exists(marker):
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        r = subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", *REQUIREMENTS[name]],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=900)
        if r.returncode != 0:
            print(f"  ({name} could not be installed: {r.stderr.strip()[-300:]})")
            return None
        open(marker, "w").close()
    return py


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Crossbar runs its router in a child)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


class Target:
    """A server under test: ``proto`` is the load generator's mode prefix."""

    def __init__(self, name, proto, argv, port, url, cwd=None, settle=0.0, extra=None, env=None):
        common.raise_fd_limit()
        self.name, self.proto, self.port, self.url = name, proto, port, url
        self.proc = subprocess.Popen(common.pinned(common.SERVER_CPU, argv), cwd=cwd, env=env or common.checkout_env(),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        common.wait_port(port, timeout=60)
        time.sleep(settle)
        self.extra = [subprocess.Popen(common.pinned(common.SERVER_CPU, e), stdout=subprocess.PIPE, text=True,
                                       env=dict(os.environ, NODE_PATH=common.ensure_ws_package()))
                      for e in (extra or [])]
        for e in self.extra:
            e.stdout.readline()     # the WAMP callee says when it registered

    def pids(self) -> list[int]:
        return tree(self.proc.pid) + [e.pid for e in self.extra]

    def cpu(self) -> float:
        total = 0.0
        for p in self.pids():
            try:
                total += common.cpu_seconds(p)
            except OSError:
                pass
        return total

    def rss(self) -> int:
        total = 0
        for p in tree(self.proc.pid):
            try:
                total += common.rss_kib(p)
            except OSError:
                pass
        return total

    def stop(self):
        for e in self.extra:
            e.kill()
            e.wait()
        for p in reversed(self.pids()):
            try:
                os.kill(p, 15)
            except OSError:
                pass
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            for p in self.pids():
                try:
                    os.kill(p, 9)
                except OSError:
                    pass


def start(name: str, rpc_callee: bool = False) -> Target | None:
    port = common.free_port()
    ws = f"ws://127.0.0.1:{port}/ws"
    if name == "msgd":
        argv, base = common.msgd_argv(port)
        return Target(name, "", argv, port, ws, cwd=base)
    if name == SHIPPED:
        argv, base = common.shipped_argv(port)
        return Target(name, "", argv, port, ws, cwd=base)
    if name == "raw autobahn":
        return Target(name, "", [sys.executable, "-m", "bench.refserver", str(port)], port, ws, cwd=common.ROOT)
    if name == RAW_ECHO:
        return Target(name, "", [sys.executable, "-m", "bench.refserver", str(port), "--echo"], port, ws,
                      cwd=common.ROOT)
    if name == NODE_WS:
        return Target(name, "", ["node", os.path.join(common.ROOT, "bench", "refserver.js"), str(port)], port, ws,
                      env=dict(os.environ, NODE_PATH=common.ensure_ws_package()))
    if name == "python-socketio":
        py = peer_python("sio")
        if py is None:
            return None
        return Target(name, "sio-", [py, os.path.join(common.ROOT, "bench", "peers", "sio_server.py"), str(port)],
                      port, f"http://127.0.0.1:{port}")
    if name == "crossbar":
        py = peer_python("crossbar")
        if py is None:
            return None
        cbdir = tempfile.mkdtemp(prefix="msgd-crossbar-")
        with open(os.path.join(common.ROOT, "bench", "peers", "crossbar.json")) as f:
            config = f.read().replace("PORT", str(port))
        with open(os.path.join(cbdir, "config.json"), "w") as f:
            f.write(config)
        crossbar = os.path.join(os.path.dirname(py), "crossbar")
        callee = [["node", os.path.join(common.ROOT, "bench", "loadgen.js"), "wamp-callee", f"ws://127.0.0.1:{port}/"]]
        return Target(name, "wamp-", [crossbar, "start", "--cbdir", cbdir, "--loglevel", "warn"], port,
                      f"ws://127.0.0.1:{port}/", settle=1.0, extra=callee if rpc_callee else None)
    raise ValueError(name)


SHIPPED, RAW_ECHO, NODE_WS = "msgd etc/node.ini", "raw echo", "node ws corked"
SERVERS = ["msgd", SHIPPED, "raw autobahn", RAW_ECHO, NODE_WS, "crossbar", "python-socketio"]
# fan-out again with the server held to CAP of its core (common.cpu_cap): the one-core load
# generator cannot saturate msgd or the corked Node.js server otherwise, and a server with idle
# time batches less per turn; saturated, the CPU per delivery of the two compare like for like
CAP = 0.4
CAPPED = {"msgd", NODE_WS}
WORKLOADS = {SHIPPED: {"rpc"}, RAW_ECHO: {"rpc"},
             NODE_WS: {"fanout 100", "fanout 1000", "fanout 100 capped", "fanout 1000 capped"}}   # others: all


def run_workload(target: Target, kind: str, args: list, cap: float = 1.0) -> dict:
    with common.cpu_cap(target.pids(), cap) if cap < 1.0 else contextlib.nullcontext(True) as capped:
        if not capped:
            raise RuntimeError("no CPU controller to cap the server with (cgroup cpu, as root)")
        result, client_cpu = common.loadgen(target.proto + kind, target.url, *args, cpu=target.cpu)
    result["client_cpu"] = client_cpu
    result["cap"] = cap
    return result


def idle_kib(target: Target, n: int, hold: float = 12.0) -> float:
    before = target.rss()
    env = dict(os.environ, NODE_PATH=common.ensure_ws_package())
    gen = subprocess.Popen(common.pinned(common.CLIENT_CPU, ["node", os.path.join(common.ROOT, "bench", "loadgen.js"),
                                                            target.proto + "idle", target.url, str(n), str(hold)]),
                           env=env, stdout=subprocess.PIPE, text=True)
    gen.stdout.readline()
    time.sleep(3)
    during = target.rss()
    gen.wait(hold + 120)
    return (during - before) / n


def row(label, unit, results: dict, key="per_second", fmt="{:,.0f}", higher_better=True) -> list[str]:
    base = results.get("msgd")
    lines = [f"{label} ({unit})"]
    for name, r in results.items():
        if r is None:
            lines.append(f"    {name:16s} {'n/a':>12s}")
            continue
        value = r[key] if isinstance(r, dict) else r
        ratio = ""
        if name != "msgd" and base is not None and value:
            b = base[key] if isinstance(base, dict) else base
            ratio = f"   msgd = {b / value:.2f}x" if higher_better else f"   msgd = {b / value:.2f}x of it"
        note = ""
        if isinstance(r, dict) and "server_cpu" in r:
            ops = r.get("deliveries") or r.get("calls") or r.get("sessions") or 0
            per_op = f"   server {r['server_cpu'] / ops * 1e6:.2f} us/op" if ops else ""
            if ops and name != "msgd" and isinstance(base, dict) and base.get("server_cpu") and r["server_cpu"]:
                mine = base["server_cpu"] / (base.get("deliveries") or base.get("calls") or base.get("sessions"))
                per_op += f" (msgd's = {mine / (r['server_cpu'] / ops):.2f}x of it)"
            note = per_op + "   " + common.bottleneck(r["server_cpu"], r["client_cpu"], r["seconds"],
                                                          r.get("cap", 1.0))
            if "p50_ms" in r:
                note = f"   p50 {r['p50_ms']:.1f} ms p99 {r['p99_ms']:.1f} ms" + note
        lines.append(f"    {name:16s} {fmt.format(value):>12s}{ratio}{note}")
    return lines


def per_op(r) -> float | None:
    if not isinstance(r, dict) or not r.get("server_cpu"):
        return None
    return r["server_cpu"] / (r.get("deliveries") or r.get("calls") or r.get("sessions"))


def targets(table: dict) -> list[str]:
    """The figures the targets are stated in (docs/performance.rst)."""
    lines = []
    for key in ("fanout 100", "fanout 1000", "fanout 100 capped", "fanout 1000 capped"):
        mine, ref = per_op(table.get("msgd", {}).get(key)), per_op(table.get(NODE_WS, {}).get(key))
        if mine and ref:
            if key.endswith("capped"):
                how = f" (both held to {CAP} of a core: saturated; target <= 1x)"
            elif per_op(table.get("msgd", {}).get(key + " capped")):
                how = " (as the load generator could drive them: for reference, the target is the saturated line)"
            else:
                how = " (target <= 1x)"
            lines.append(f"{key.removesuffix(' capped')}: msgd's server CPU per delivery = {mine / ref:.2f}x the "
                         f"corked Node.js ws server's{how}")
    shipped, echo = table.get(SHIPPED, {}).get("rpc"), table.get(RAW_ECHO, {}).get("rpc")
    if shipped and echo:
        lines.append(f"rpc: msgd on etc/node.ini = {shipped['per_second'] / echo['per_second']:.2f}x the raw echo's "
                     f"calls/s, {per_op(echo) / per_op(shipped):.2f}x by server CPU per call (target >= 0.8x)")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description="msgd side by side with its peers")
    p.add_argument("--quick", action="store_true", help="smaller workloads (a few minutes)")
    p.add_argument("--servers", nargs="+", default=SERVERS)
    a = p.parse_args(argv)
    idle_n = 2000 if a.quick else 10000
    fan = {100: 4000 if a.quick else 20000, 1000: 400 if a.quick else 2000}
    rpc_seconds = 3 if a.quick else 5
    print(common.machine())
    print("servers pinned to CPU", common.SERVER_CPU, "- load generator (Node.js) to CPU", common.CLIENT_CPU)
    table: dict[str, dict] = {}
    for name in a.servers:
        print(f"  measuring {name} ...", flush=True)
        results = table.setdefault(name, {})
        only = WORKLOADS.get(name)
        for kind, args, key in (("fanout", [100, fan[100], 1000, 100, 2], "fanout 100"),
                                ("fanout", [1000, fan[1000], 1000, 100, 2], "fanout 1000"),
                                ("fanout", [100, fan[100] // 2, 1000, 100, 2], "fanout 100 capped"),
                                ("fanout", [1000, fan[1000] // 2, 1000, 100, 2], "fanout 1000 capped"),
                                ("rpc", [10, 10, rpc_seconds], "rpc"),
                                ("connect", [rpc_seconds, 20], "connect")):
            if (only is not None and key not in only) or (key.endswith("capped") and name not in CAPPED):
                continue
            target = start(name, rpc_callee=(kind == "rpc"))
            if target is None:
                results[key] = None
                continue
            try:
                if kind == "fanout":   # warm-up
                    run_workload(target, kind, [args[0], max(10, args[1] // 10), *args[2:]])
                results[key] = run_workload(target, kind, args, CAP if key.endswith("capped") else 1.0)
            except Exception as e:
                print(f"    {name} {key} failed: {e}")
                results[key] = None
            finally:
                target.stop()
        if only is not None:
            continue
        target = start(name)
        if target is None:
            results["idle"] = None
        else:
            try:
                results["idle"] = idle_kib(target, idle_n)
            except Exception as e:
                print(f"    {name} idle failed: {e}")
                results["idle"] = None
            finally:
                target.stop()
    print()
    print("=" * 100)
    capped = f", the server held to {CAP} of its core"
    for key, label, unit in (("fanout 100", "pub/sub fan-out to 100 subscribers, 1,000 in flight", "deliveries/s"),
                             ("fanout 1000", "pub/sub fan-out to 1,000 subscribers, 1,000 in flight", "deliveries/s"),
                             ("fanout 100 capped", "pub/sub fan-out to 100 subscribers" + capped, "deliveries/s"),
                             ("fanout 1000 capped", "pub/sub fan-out to 1,000 subscribers" + capped, "deliveries/s"),
                             ("rpc", "RPC, 10 connections x 10 in flight", "calls/s"),
                             ("connect", "connect rate", "new sessions/s")):
        for line in row(label, unit, {n: table[n].get(key) for n in table if key in table[n]}):
            print(line)
    for line in row(f"memory per idle subscribed connection at {idle_n:,}", "KiB",
                    {n: table[n].get("idle") for n in table if "idle" in table[n]}, fmt="{:.1f}",
                    higher_better=False):
        print(line)
    print("=" * 100)
    for line in targets(table):
        print(line)
    for mod in ("xmlrpc", "pb"):
        print(f"\n--- bench.{mod} (against its raw Twisted baseline) ---", flush=True)
        subprocess.run([sys.executable, "-m", f"bench.{mod}"], cwd=common.ROOT, timeout=600)
    with open(os.path.join(common.ROOT, ".cache", "bench-last.json"), "w") as f:
        json.dump(table, f, indent=1)


if __name__ == "__main__":
    main()
