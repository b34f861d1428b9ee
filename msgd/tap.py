"""``twistd msgd -c etc/node.ini``: options and service construction.

This is the only module that touches the global reactor.  A bad config, a
missing handler target or an app directory that cannot be read stops start-up
here with one line naming the file, section and key, before anything listens.

Process-level wiring lives here too:

- **signals**: SIGTERM/SIGINT drain and exit 0; SIGHUP reloads node.ini
  (:meth:`NodeService.reload`);
- **systemd**: :class:`msgd.systemd.Notifier` sends READY=1 when the node is
  ready, RELOADING=1/READY=1 around a reload, STOPPING=1 when draining starts,
  and watchdog pings;
- **logs**: twistd reads its log observer from the application's
  ``ILogObserver`` component *after* makeService; :class:`Root` sets that
  component when twistd parents it to the application, so ``[node]
  log_format`` and ``log_levels`` apply to every line, twistd's own
  included, while ``--logfile`` still chooses where the lines go.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys

from twisted.application.service import MultiService
from twisted.logger import ILogObserver
from twisted.python import usage
from twisted.python.components import Componentized

from msgd.config import ConfigError, load
from msgd.interfaces.base import StartupError


class Options(usage.Options):
    synopsis = "[-c CONFIG]"
    longdesc = "Run an msgd node described by an ini file (see docs/configuration.rst)."
    optParameters = [
        ["config", "c", "etc/node.ini", "the node's ini file"],
    ]


class Root(MultiService):
    """What twistd runs: the node, plus the log observer it installs as the
    application's ``ILogObserver`` when it is parented to the application."""

    def __init__(self, node, logs):
        super().__init__()
        self.node = node
        self.logs = logs
        node.setServiceParent(self)

    def setServiceParent(self, parent):
        super().setServiceParent(parent)
        if isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.logs.observer)

    def privilegedStartService(self):
        # A port in use (or another part that cannot start before the reactor
        # runs) is one log line naming the section, and exit status 1.  The
        # exception still goes through twistd, which removes its pid file and
        # tells a daemon's waiting parent (it does so for an Exception only:
        # a SystemExit would leave that parent waiting for ever); only the
        # traceback Python would print for it at the end is left out.
        try:
            super().privilegedStartService()
        except StartupError as e:
            self.node.log.critical("{error}", error=str(e), **e.fields)
            _without_traceback(e)
            raise


_exit_status: int | None = None      # set by a node that could not start; _leave ends the process with it
_leave_registered = False


def _exit_status_after_twistd(status: int) -> None:
    """End the process with ``status`` once twistd is done (it has stopped
    the services and removed its pid file by then).  twistd itself always
    exits 0 after its reactor stops; a node that could not start must not
    look like a clean stop to systemd (Restart=on-failure) or a supervisor.
    :func:`_leave` (registered by makeService) does it."""
    global _exit_status
    _exit_status = status


def _leave() -> None:
    """The atexit handler makeService registers: with an exit status set,
    flush stdout/stderr and ``os._exit`` with it.  atexit runs handlers last
    registered first, and ``os._exit`` skips those not run yet, so this one
    is registered as early as a twistd plugin can: at makeService, before
    the apps, the node's parts and their libraries register theirs.  Only
    handlers registered before the plugin loaded are skipped (the standard
    ``logging.shutdown``: msgd logs through ``twisted.logger``, whose lines
    are in the streams flushed here).  Without a status it does nothing."""
    if _exit_status is None:
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(_exit_status)


def _register_leave() -> None:
    global _leave_registered
    if not _leave_registered:
        atexit.register(_leave)
        _leave_registered = True


def _without_traceback(error: BaseException) -> None:
    """Print nothing when ``error`` ends the process uncaught."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        if value is not error:
            previous(kind, value, tb)
    sys.excepthook = hook


def log_stream(options):
    """The file twistd itself would log to, from its ``--logfile`` and
    ``--nodaemon`` options (``-``, or nodaemon without a file: stdout)."""
    twistd = getattr(options, "parent", None) or {}
    name = twistd.get("logfile") or ""
    if name == "-" or (not name and twistd.get("nodaemon")) or not twistd:
        return sys.stdout
    from twisted.python.logfile import LogFile
    return LogFile.fromFullPath(name or "twistd.log")


def makeService(options):
    _register_leave()      # first, so that it runs last (see _leave)
    from twisted.internet import reactor

    from msgd.logging import LogSetup
    from msgd.node import NodeService
    from msgd.systemd import Notifier

    try:
        config = load(options["config"])
        node = NodeService(config, reactor)
        node.load_apps()
    except ConfigError as e:
        raise SystemExit(f"msgd: {e}") from None

    logs = LogSetup(log_stream(options), config.node.log_format, config.node.log_level, config.node.log_levels)
    node.logs = logs
    notifier = Notifier(reactor)
    node.reconfigured.append(lambda new: logs.apply(new.node))

    def reload():
        notifier.reloading()
        d = node.reload()
        d.addErrback(lambda f: None)   # logged by the node; the old config stays in force
        d.addBoth(lambda _: notifier.ready(node.status_line()))

    def hangup(signum, frame):
        node.log.info("signal SIGHUP received: reloading {path}", path=config.path)
        reactor.callFromThread(reload)

    def graceful(signum, frame):
        # twistd would re-kill the process with the signal after the reactor
        # stops, so the exit status would say "killed"; a drained stop is a
        # clean exit, status 0.
        name = signal.Signals(signum).name
        if stopping:
            node.log.info("signal {signal} received: already shutting down", signal=name)
            return
        stopping.append(name)
        node.log.info("signal {signal} received: shutting down", signal=name)
        reactor.callFromThread(reactor.stop)

    stopping: list = []

    def install_signals():
        signal.signal(signal.SIGTERM, graceful)
        signal.signal(signal.SIGINT, graceful)
        signal.signal(signal.SIGHUP, hangup)

    reactor.callWhenRunning(install_signals)
    # registered before twistd's own trigger that stops the services, so
    # systemd hears STOPPING=1 before the drain begins
    reactor.addSystemEventTrigger("before", "shutdown", notifier.stopping)
    reactor.addSystemEventTrigger("after", "shutdown", notifier.stop)
    reactor.callWhenRunning(notifier.watch, node)

    def not_ready(failure):
        node.log.critical("node {node} could not start: {error}", node=config.node.name,
                          error=failure.value)
        _exit_status_after_twistd(1)
        reactor.stop()
    reactor.callWhenRunning(lambda: node.ready().addErrback(not_ready))
    return Root(node, logs)


class CheckOptions(Options):
    """``msgd check``'s options: the node's, with the command's own name
    (set as ``synopsis`` per call), description and version."""
    longdesc = "Validate a node's ini file and load its apps, without starting a node."

    def opt_version(self):
        """Display msgd's version and exit."""
        from msgd import __version__
        print(f"msgd {__version__}")
        sys.exit(0)


USAGE = """\
usage: {prog} check [-c CONFIG]                  validate a node's ini file without starting a node
       {prog} passwd FILE USER [--roles R,R]     set a password in a password file
       {prog} --version | --help

A node runs under twistd: twistd msgd -c etc/node.ini (see twistd msgd --help)."""


def command() -> int:
    """The ``msgd`` console command (setup.py's entry point)."""
    return main(prog="msgd")


def main(argv=None, prog: str = "python -m msgd") -> int:
    """``msgd check -c FILE``: validate a config without starting;
    ``msgd passwd FILE USER [--roles R,R]``: set a password in a password
    file (see docs/security.rst); ``--version``, ``--help``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help", "help"):
        print(USAGE.format(prog=prog))
        return 0
    if argv and argv[0] in ("-V", "--version"):
        from msgd import __version__
        print(f"msgd {__version__}")
        return 0
    if argv and argv[0] == "passwd":
        from msgd.security.credentials import passwd_main
        return passwd_main(argv[1:], prog=prog)
    if not argv or argv[0] != "check":
        print(USAGE.format(prog=prog), file=sys.stderr)
        return 2
    opts = CheckOptions()
    opts.synopsis = f"usage: {prog} check [-c CONFIG]"
    try:
        opts.parseOptions(argv[1:])
    except usage.UsageError as e:
        print(f"{prog} check: {e}", file=sys.stderr)
        print(opts.synopsis, file=sys.stderr)
        return 2
    from twisted.internet.task import Clock

    from msgd.node import NodeService
    try:
        config = load(opts["config"])
        NodeService(config, Clock()).load_apps()
    except ConfigError as e:
        print(f"msgd: {e}", file=sys.stderr)
        return 1
    print(f"{opts['config']}: OK")
    return 0
