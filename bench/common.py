"""What the benchmarks share: servers in their own processes pinned to a
core, the Node.js load generator pinned to another, CPU time and RSS of each
read from /proc, so that every figure says whether the server or the load
generator was the bottleneck."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, ".cache", "bench-node")
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
CPUS = os.cpu_count() or 1
SERVER_CPU, CLIENT_CPU = "0", ("1" if CPUS > 1 else "0")


def raise_fd_limit(n: int = 65536) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(n, hard if hard > 0 else n)), max(hard, n)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def checkout_env(**extra: str) -> dict:
    """The environment of a server process: this checkout's code first on
    its path, not whichever msgd the virtualenv has installed (a worktree
    shares its virtualenv with the main checkout)."""
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, **extra)


def pinned(cpu: str, argv: list) -> list:
    return (["taskset", "-c", cpu] + argv) if shutil.which("taskset") and CPUS > 1 else argv


def ensure_ws_package() -> str:
    """Install the npm ``ws`` package for the load generator (once)."""
    if not os.path.isdir(os.path.join(CACHE, "node_modules", "socket.io-client")):
        os.makedirs(CACHE, exist_ok=True)
        subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund", "--prefix", CACHE, "ws@8", "socket.io-client@4"],
                       check=True, stdout=subprocess.DEVNULL, timeout=300)
    return os.path.join(CACHE, "node_modules")


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss_kib_self() -> int:
    return rss_kib(os.getpid())


def wait_port(port: int, timeout: float = 20) -> None:
    import socket
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


class Server:
    """A server process (msgd node or reference) pinned to ``cpu`` (SERVER_CPU)."""

    def __init__(self, argv: list, port: int, cwd: str | None = None, cpu: str = SERVER_CPU):
        raise_fd_limit()
        self.port = port
        self.proc = subprocess.Popen(pinned(cpu, argv), cwd=cwd, env=checkout_env(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        wait_port(port)
        self.pid = self._real_pid()

    def _real_pid(self) -> int:
        return self.proc.pid   # taskset execs the program in place

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def rss(self) -> int:
        return rss_kib(self.pid)

    def peak_rss(self) -> int:
        return rss_kib(self.pid, "VmHWM")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()


def node_in_process(reactor, ini: str, apps: dict | None = None, base: str | None = None):
    """A started msgd NodeService in this process: ``ini`` after a ``[node]``
    section (apps and state in ``base``, a new temp dir by default; no
    reloading), the ``apps`` modules ({file name: source}) written first.
    It stops when the reactor shuts down, unless stopped before."""
    from msgd.config import parse_text
    from msgd.node import NodeService
    base = base or tempfile.mkdtemp(prefix="msgd-bench-")
    os.makedirs(os.path.join(base, "apps"), exist_ok=True)
    for name, source in (apps or {}).items():
        with open(os.path.join(base, "apps", name), "w") as f:
            f.write(source)
    config = parse_text("[node]\nname = bench\napps = apps\nstate_dir = state\nreload_interval = 0\n" + ini,
                        os.path.join(base, "node.ini"))
    node = NodeService(config, reactor)
    node.privilegedStartService()
    node.startService()
    reactor.addSystemEventTrigger("before", "shutdown", lambda: node.stopService() if node.running else None)
    return node


def msgd_argv(port: int, extra_ini: str = "", pubsub: str = "") -> tuple[list, str]:
    """The command line of a benchmark node on ``port`` and its directory
    (``pubsub``: more lines of its ``[pubsub]`` section)."""
    base = tempfile.mkdtemp(prefix="msgd-bench-")
    ini = textwrap.dedent(f"""
        [node]
        name = bench
        apps = {os.path.join(ROOT, 'apps')}
        state_dir = {base}/state
        reload_interval = 0

        [pubsub]
        history_size = 100
        @PUBSUB@

        [interface:web]
        type = http
        endpoint = tcp:{port}:interface=127.0.0.1:backlog=4096
        ws_max_pending = 64MiB
        ws_ping_interval = 0
        """).replace("@PUBSUB@", textwrap.dedent(pubsub).strip()) + extra_ini
    with open(os.path.join(base, "node.ini"), "w") as f:
        f.write(ini)
    return [TWISTD, "--nodaemon", "--pidfile=", f"--logfile={base}/node.log", "msgd", "-c", f"{base}/node.ini"], base


def shipped_argv(port: int) -> tuple[list, str]:
    """The command line of a node on the shipped ``etc/node.ini`` as it is
    (every interface, reloading, logging), its web interface on ``port``, its
    other listeners on free ports and its files in a temp dir."""
    base = tempfile.mkdtemp(prefix="msgd-shipped-")
    with open(os.path.join(ROOT, "etc", "node.ini")) as f:
        ini = f.read()
    for old, new in ((":8080:", f":{port}:"), (":61623:", f":{free_port()}:"), (":8789:", f":{free_port()}:"),
                     ("= ../apps", f"= {ROOT}/apps"), ("../var/", f"{base}/")):
        assert old in ini, old
        ini = ini.replace(old, new)
    with open(os.path.join(base, "node.ini"), "w") as f:
        f.write(ini)
    return [TWISTD, "--nodaemon", "--pidfile=", f"--logfile={base}/node.log", "msgd", "-c", f"{base}/node.ini"], base


def msgd_server(extra_ini: str = "", pubsub: str = "", cpu: str = SERVER_CPU,
                shipped: bool = False) -> tuple[Server, str]:
    port = free_port()
    argv, base = shipped_argv(port) if shipped else msgd_argv(port, extra_ini, pubsub)
    return Server(argv, port, cwd=base, cpu=cpu), base


def ref_server(*options: str) -> Server:
    port = free_port()
    return Server([sys.executable, "-m", "bench.refserver", str(port), *options], port, cwd=ROOT)


def loadgen(*args, cpu=None) -> tuple[dict, float]:
    """Run the Node.js load generator; returns (its JSON result, its CPU seconds).
    With ``cpu`` (a function: the server's CPU seconds so far), only the
    measured phase counts, not setting up connections: the result then has
    ``server_cpu`` and the CPU seconds returned are the generator's in that
    phase."""
    if cpu is not None:
        return _loadgen_phases(args, cpu)
    env = dict(os.environ, NODE_PATH=ensure_ws_package())
    t = os.times()
    before = t.children_user + t.children_system
    out = subprocess.run(pinned(CLIENT_CPU, ["node", os.path.join(ROOT, "bench", "loadgen.js"), *map(str, args)]),
                         env=env, capture_output=True, text=True, timeout=900)
    t = os.times()
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed: {out.stderr.strip()[-800:]}")
    return json.loads(out.stdout.strip().splitlines()[-1]), (t.children_user + t.children_system) - before


def _loadgen_phases(args, cpu) -> tuple[dict, float]:
    env = dict(os.environ, NODE_PATH=ensure_ws_package(), LOADGEN_PHASES="1")
    gen = subprocess.Popen(pinned(CLIENT_CPU, ["node", os.path.join(ROOT, "bench", "loadgen.js"), *map(str, args)]),
                           env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    marks = []     # (server CPU, generator CPU) when ready and when done
    result = None
    watchdog = threading.Timer(900, gen.kill)     # every run is bounded
    watchdog.start()
    try:
        for line in gen.stdout:
            msg = json.loads(line)
            marks.append((cpu(), cpu_seconds(gen.pid)))
            gen.stdin.write("\n")
            gen.stdin.flush()
            if not msg.get("ready"):
                result = msg
                break
        gen.stdin.close()
        gen.wait(120)
    finally:
        watchdog.cancel()
        if gen.poll() is None:
            gen.kill()
            gen.wait()
    if result is None or len(marks) != 2 or gen.returncode != 0:
        raise RuntimeError(f"load generator failed: {gen.stderr.read().strip()[-800:]}")
    gen.stderr.close()
    result["server_cpu"] = marks[1][0] - marks[0][0]
    return result, marks[1][1] - marks[0][1]


def machine() -> str:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{platform.node()}: {CPUS} CPUs ({model}), Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}"


def bottleneck(server_cpu: float, client_cpu: float, seconds: float, server_limit: float = 1.0) -> str:
    """Which side bounded a run: the one nearer its CPU limit (the
    server's is ``server_limit`` cores when capped, see :func:`cpu_cap`)."""
    s, c = server_cpu / seconds, client_cpu / seconds
    who = "server" if s / server_limit >= c else "load generator"
    cap = f" (capped at {server_limit:.2f})" if server_limit < 1.0 else ""
    return f"server {s:.2f} cores{cap}, load generator {c:.2f} cores -> {who}-bound"


CGROUP_PERIOD_US = 10_000      # a short period: a capped server is stopped for a few ms at most


@contextlib.contextmanager
def cpu_cap(pids: list[int], cores: float):
    """Hold ``pids`` (every thread of them) to ``cores`` of CPU time while
    the block runs — the Linux CPU controller's quota, cgroup v1 or v2 —
    so that a server the one-core load generator cannot saturate is
    saturated all the same, and its CPU per operation is measured with
    work always waiting.  Yields False (nothing capped) where the
    controller is not there or not writable (not root)."""
    made = _cap(pids, cores)
    try:
        yield made is not None
    finally:
        if made is not None:
            _uncap(*made)


def _cap(pids: list[int], cores: float) -> tuple[str, str] | None:
    """A new group holding ``pids`` to ``cores``: (its folder, the root's), or None."""
    name, quota = f"msgd-bench-{os.getpid()}", str(int(cores * CGROUP_PERIOD_US))
    if os.path.exists("/sys/fs/cgroup/cpu/cgroup.procs"):                  # cgroup v1
        root = "/sys/fs/cgroup/cpu"
        settings = {"cpu.cfs_period_us": str(CGROUP_PERIOD_US), "cpu.cfs_quota_us": quota}
    elif "cpu" in _read("/sys/fs/cgroup/cgroup.controllers").split():      # cgroup v2
        root = "/sys/fs/cgroup"
        settings = {"cpu.max": f"{quota} {CGROUP_PERIOD_US}"}
    else:
        return None
    made = os.path.join(root, name)
    try:
        os.makedirs(made, exist_ok=True)
        for key, value in settings.items():
            _write(os.path.join(made, key), value)
        for pid in pids:
            _write(os.path.join(made, "cgroup.procs"), str(pid))
    except OSError:
        _uncap(made, root)
        return None
    return made, root


def _uncap(made: str, root: str) -> None:
    try:
        for pid in _read(os.path.join(made, "cgroup.procs")).split():
            try:
                _write(os.path.join(root, "cgroup.procs"), pid)
            except OSError:
                pass            # gone meanwhile
        os.rmdir(made)
    except OSError:
        pass


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
