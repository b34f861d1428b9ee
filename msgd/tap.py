"""``twistd msgd -c etc/node.ini``: options and service construction.

This is the only module that touches the global reactor.  A bad config, a
missing handler target or an app directory that cannot be read stops start-up
here with one line naming the file, section and key, before anything listens.
"""

from __future__ import annotations

import signal
import sys

from twisted.python import usage

from msgd.config import ConfigError, load


class Options(usage.Options):
    synopsis = "[-c CONFIG]"
    longdesc = "Run an msgd node described by an ini file (see docs/configuration.rst)."
    optParameters = [
        ["config", "c", "etc/node.ini", "the node's ini file"],
    ]


def makeService(options):
    from twisted.internet import reactor

    from msgd.node import NodeService

    try:
        config = load(options["config"])
        node = NodeService(config, reactor)
        node.load_apps()
    except ConfigError as e:
        raise SystemExit(f"msgd: {e}") from None

    def graceful(signum, frame):
        # twistd would re-kill the process with the signal after the reactor
        # stops, so the exit status would say "killed"; a drained stop is a
        # clean exit, status 0.
        node.log.info("signal {signal} received: shutting down", signal=signal.Signals(signum).name)
        reactor.callFromThread(reactor.stop)

    def install_signals():
        signal.signal(signal.SIGTERM, graceful)
        signal.signal(signal.SIGINT, graceful)

    reactor.callWhenRunning(install_signals)

    def not_ready(failure):
        node.log.critical("node {node} could not start: {error}", node=config.node.name,
                          error=failure.value)
        node.exit_code = 1
        reactor.stop()
    reactor.callWhenRunning(lambda: node.ready().addErrback(not_ready))
    return node


def main(argv=None) -> int:
    """``python -m msgd check -c FILE``: validate a config without starting."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "check":
        print("usage: python -m msgd check [-c CONFIG]", file=sys.stderr)
        return 2
    opts = Options()
    try:
        opts.parseOptions(argv[1:])
    except usage.UsageError as e:
        print(f"msgd: {e}", file=sys.stderr)
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
