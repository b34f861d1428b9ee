"""Instructions per operation, counted by callgrind: figures that do not move
with the load of a shared machine.

``python -m bench.instructions [--servers msgd ...] [--seconds 8]``

Each server runs under ``valgrind --tool=callgrind --instr-atstart=no``
(about 50 times slower, not pinned); instrumentation is switched on only
while the workload runs (the load generator's phases, ``callgrind_control
-i on/off``), so start-up and setting up connections are not counted.
Workloads: RPC (10 connections x 10 calls in flight, for ``--seconds``),
fan-out to 100 and to 1,000 subscribers (one publisher, 1,000 events in
flight, 300,000 deliveries).  Servers: ``msgd`` (the benchmark ini),
``msgd etc/node.ini`` (the shipped one), ``raw echo`` (Autobahn echoing
unparsed), ``raw autobahn`` (parse and echo; its own broadcast).  A slow
server batches more per reactor turn than a fast one does, so compare
figures of one run and one workload, not across workloads.
"""

from __future__ import annotations

import argparse
import glob
import shutil
import subprocess
import sys
import tempfile
import time

from bench import common

SERVERS = ["msgd", "msgd etc/node.ini", "raw echo", "raw autobahn"]
FANOUT = {"fan-out to 100": (100, 3000), "fan-out to 1,000": (1000, 300)}   # subscribers, events


def argv_for(name: str, port: int) -> tuple[list, str]:
    if name == "msgd":
        return common.msgd_argv(port)
    if name == "msgd etc/node.ini":
        return common.shipped_argv(port)
    ref = [sys.executable, "-m", "bench.refserver", str(port)]
    return (ref + ["--echo"] if name == "raw echo" else ref), common.ROOT


def measure(name: str, workload: str, seconds: float, outdir: str) -> float:
    """Instructions per call (RPC) or per delivery (fan-out)."""
    port = common.free_port()
    argv, cwd = argv_for(name, port)
    proc = subprocess.Popen(["valgrind", "--tool=callgrind", "--instr-atstart=no",
                             f"--callgrind-out-file={outdir}/%p.out", *argv],
                            cwd=cwd, env=common.checkout_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    switches = iter(("on", "off"))

    def toggle():
        state = next(switches)
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        subprocess.run(["callgrind_control", "-i", state, str(proc.pid)], **quiet)
        if state == "off":
            subprocess.run(["callgrind_control", "-d", str(proc.pid)], **quiet)
        return 0.0

    try:
        common.wait_port(port, timeout=300)
        url = f"ws://127.0.0.1:{port}/ws"
        if workload == "rpc":
            common.loadgen("rpc", url, 10, 10, 2)       # warm-up, not counted
            r, _ = common.loadgen("rpc", url, 10, 10, seconds, cpu=toggle)
            ops = r["calls"]
        else:
            subscribers, events = FANOUT[workload]
            common.loadgen("fanout", url, subscribers, 200, 1000, 100)
            r, _ = common.loadgen("fanout", url, subscribers, events, 1000, 100, cpu=toggle)
            ops = r["deliveries"]
        total = 0
        deadline = time.monotonic() + 60
        while not total and time.monotonic() < deadline:    # the dump is written when the server next runs
            time.sleep(0.5)
            for path in glob.glob(f"{outdir}/{proc.pid}.out.*"):
                with open(path) as f:
                    for line in f:
                        if line.startswith(("summary:", "totals:")):
                            total = max(total, int(line.split()[1]))
    finally:
        proc.terminate()
        proc.wait(60)
    if not total:
        raise RuntimeError(f"{name}, {workload}: callgrind wrote no totals within 60 s")
    return total / ops


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--servers", nargs="+", default=SERVERS)
    p.add_argument("--seconds", type=float, default=8.0, help="length of the RPC workload")
    a = p.parse_args(argv)
    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        print("valgrind (callgrind) is not installed: nothing measured")
        return 1
    print(common.machine(), "- instructions counted by callgrind")
    outdir = tempfile.mkdtemp(prefix="msgd-callgrind-")
    for workload in ("rpc", *FANOUT):
        unit = "call" if workload == "rpc" else "delivery"
        print(f"{'RPC, 10 connections x 10 in flight' if workload == 'rpc' else workload + ' subscribers'}:")
        for name in a.servers:
            if workload != "rpc" and name == "raw echo":
                continue
            print(f"  {name:18s} {measure(name, workload, a.seconds, outdir):>10,.0f} instructions per {unit}",
                  flush=True)
    shutil.rmtree(outdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
