"""``python -m bench all`` (``make bench``): the suite — msgd side by side
with its peers in one table (bench/suite.py).  ``python -m bench every``
runs every benchmark module one after the other; ``python -m bench NAME
[args]`` runs one (``ws_fanout``, ``ws_rpc``, ``xmlrpc``, ``adapters``,
``ingest``, ``stomp``, ``pb``, ``fuzz``, ...).  ``python -m bench faults``
(counts of broken promises under faults, no timings) is not among
``every``'s."""

import importlib
import pkgutil
import sys

import bench

SKIP = {"common", "refserver", "__main__", "peers", "suite", "faults"}


def names():
    return sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if m.name not in SKIP)


def main(argv):
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("available:", ", ".join(names()))
        return 0
    if argv[0] == "all":
        return importlib.import_module("bench.suite").main(argv[1:]) or 0
    if argv[0] == "every":
        failed = []
        for name in names():
            print(f"\n=== {name} ===", flush=True)
            try:
                importlib.import_module(f"bench.{name}").main([])
            except SystemExit as e:
                if e.code:
                    failed.append(name)
            except Exception as e:   # one broken benchmark must not hide the others' figures
                print(f"{name} failed: {e!r}")
                failed.append(name)
        return 1 if failed else 0
    return importlib.import_module(f"bench.{argv[0]}").main(argv[1:]) or 0


sys.exit(main(sys.argv[1:]))
