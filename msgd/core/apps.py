"""Application modules: loaded by name from the apps directory, reloaded when
their files change, never taken down by a bad edit.

* ``NAME.py`` or a package ``NAME/__init__.py`` is the module ``NAME``;
  names starting with ``_`` or ``.``, ``test_*`` and ``tests`` are not apps.
* Exports are the module's ``__all__``, else its public functions (defined in
  the module itself, not imported into it).
* The directory is checked every ``interval`` seconds: a changed file is
  re-executed into a *new* module object; only when that succeeds does the new
  version replace the old one.  A failure (syntax error, exception at import)
  is logged with file and line and the last good version keeps serving.
* A module may define ``__reload__(previous)``; it is called on the new module
  with the old one before the swap, to carry state across.  If it raises, the
  reload fails like an import error.
* A file that disappears stops being callable.

Modules live in ``sys.modules`` under ``<package>.NAME`` where ``package`` is
a synthetic package whose ``__path__`` is the apps directory, so packages may
use relative imports among their own submodules.
"""

from __future__ import annotations

import inspect
import itertools
import linecache
import os
import sys
import traceback
import types
from dataclasses import dataclass
from typing import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from msgd.core.errors import NotFound

_instances = itertools.count()


@dataclass(frozen=True)
class LoadError:
    module: str
    file: str
    line: int | None
    message: str
    at: float

    def to_dict(self) -> dict:
        return {"file": self.file, "line": self.line, "error": self.message, "at": self.at}


@dataclass
class AppModule:
    name: str
    path: str                       # the .py file (the __init__.py of a package)
    module: types.ModuleType
    exports: dict                   # function name -> callable
    fingerprint: tuple
    loaded_at: float
    error: LoadError | None = None  # the last failed attempt since this version loaded
    static_dir: str | None = None   # a package's static/ directory, if any
    version: int = 1


def _is_app_name(name: str) -> bool:
    return name.isidentifier() and not name.startswith("_") and not name.startswith("test") and name != "tests"


def _fingerprint(path: str, package: bool) -> tuple:
    """What changes when a module's code changes: (path, mtime_ns, size,
    inode) of its .py files."""
    files: list[str] = []
    if package:
        for root, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__pycache__")) and d != "static")
            files.extend(os.path.join(root, n) for n in sorted(names) if n.endswith(".py"))
    else:
        files.append(path)
    out = []
    for f in files:
        try:
            st = os.stat(f)
        except FileNotFoundError:
            continue
        out.append((f, st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


def exported_functions(module: types.ModuleType) -> dict:
    """``__all__`` (callables only), else public functions defined in the
    module itself."""
    names = getattr(module, "__all__", None)
    if names is not None:
        out = {}
        for n in names:
            obj = getattr(module, n, None)
            if not callable(obj) or inspect.isclass(obj):
                raise TypeError(f"__all__ names {n!r}, which is not a function")
            out[n] = obj
        return out
    return {
        n: obj for n, obj in vars(module).items()
        if not n.startswith("_") and inspect.isfunction(obj)
        and getattr(obj, "__module__", None) == module.__name__
    }


class AppRegistry:
    """The loaded app modules of one node.

    ``scan()`` brings the registry in line with the directory; the node
    calls it at start and every ``interval`` seconds (``start``/``stop``).
    Listeners registered with ``on_change`` are called as
    ``listener(name, event)`` with event ``loaded``, ``reloaded``, ``removed``
    or ``failed``.
    """

    log = Logger()

    def __init__(self, directory: str, clock: IReactorTime, interval: float = 1.0,
                 metrics=None, package: str | None = None):
        self.directory = os.path.abspath(directory)
        self.clock = clock
        self.interval = interval
        self.modules: dict[str, AppModule] = {}
        self.failures: dict[str, LoadError] = {}    # modules with no good version at all
        self._listeners: list[Callable] = []
        self._failed_fp: dict[str, tuple] = {}      # files of the last failed attempt, per module
        self._loop: LoopingCall | None = None
        n = next(_instances)
        self.package = package or ("msgd_apps" if n == 0 else f"msgd_apps_{n}")
        pkg = types.ModuleType(self.package)
        pkg.__path__ = [self.directory]
        pkg.__package__ = self.package
        sys.modules[self.package] = pkg
        self._reloads = self._failures_metric = None
        if metrics is not None:
            self._reloads = metrics.counter("msgd_app_reloads_total", "App modules (re)loaded", ["module"])
            self._failures_metric = metrics.counter(
                "msgd_app_load_failures_total", "Failed attempts to load an app module", ["module"])

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        self.scan()
        if self.interval and self.interval > 0:
            self._loop = LoopingCall(self.scan)
            self._loop.clock = self.clock
            self._loop.start(self.interval, now=False).addErrback(
                lambda f: self.log.failure("app reload loop died", f))

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def on_change(self, listener: Callable[[str, str], None]) -> None:
        self._listeners.append(listener)

    # -- lookup --------------------------------------------------------------

    def resolve(self, target: str):
        """The function for ``module.function``; NotFound otherwise."""
        modname, _, fname = target.partition(".")
        app = self.modules.get(modname)
        fn = app.exports.get(fname) if app is not None else None
        if fn is None:
            raise NotFound(f"method not found: {target}")
        return fn

    def exists(self, target: str) -> bool:
        try:
            self.resolve(target)
        except NotFound:
            return False
        return True

    def targets(self) -> list[str]:
        return sorted(f"{m}.{f}" for m, app in self.modules.items() for f in app.exports)

    def errors(self) -> dict[str, dict]:
        """Modules whose last load attempt failed (serving an older version or
        nothing)."""
        out = {name: err.to_dict() for name, err in self.failures.items()}
        for name, app in self.modules.items():
            if app.error is not None:
                out[name] = dict(app.error.to_dict(), serving="previous version")
        return out

    # -- scanning ------------------------------------------------------------

    def _discover(self) -> dict[str, tuple[str, bool]]:
        found: dict[str, tuple[str, bool]] = {}
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return found
        for entry in entries:
            if entry.is_file() and entry.name.endswith(".py"):
                name = entry.name[:-3]
                if _is_app_name(name):
                    found.setdefault(name, (entry.path, False))
            elif entry.is_dir() and _is_app_name(entry.name):
                init = os.path.join(entry.path, "__init__.py")
                if os.path.isfile(init):
                    found[entry.name] = (entry.path, True)   # a package wins over a same-named file
        return found

    def scan(self) -> list[tuple[str, str]]:
        """Load new modules, reload changed ones, drop removed ones.  Returns
        the (name, event) pairs that happened."""
        events = []
        found = self._discover()
        for name in sorted(set(self.modules) | set(self.failures)):
            if name not in found:
                self.modules.pop(name, None)
                self.failures.pop(name, None)
                sys.modules.pop(f"{self.package}.{name}", None)
                self.log.info("app module {module} removed", module=name)
                events.append((name, "removed"))
        for name, (where, package) in sorted(found.items()):
            fp = _fingerprint(where, package)
            current = self.modules.get(name)
            if current is not None and current.fingerprint == fp:
                continue
            failed = self.failures.get(name) or (current.error if current else None)
            if failed is not None and self._failed_fp.get(name) == fp:
                continue   # same broken files as last time: don't log again every second
            events.append((name, self._load(name, where, package, fp)))
        for name, event in events:
            for listener in list(self._listeners):
                try:
                    listener(name, event)
                except Exception:
                    self.log.failure("app change listener failed for {module}", module=name)
        return events

    def _load(self, name: str, where: str, package: bool, fp: tuple) -> str:
        qualname = f"{self.package}.{name}"
        path = os.path.join(where, "__init__.py") if package else where
        previous = self.modules.get(name)
        saved = {k: v for k, v in sys.modules.items() if k == qualname or k.startswith(qualname + ".")}
        for k in saved:
            del sys.modules[k]
        module = types.ModuleType(qualname)
        module.__file__ = path
        module.__package__ = qualname if package else self.package
        if package:
            module.__path__ = [where]
        module.__spec__ = None
        sys.modules[qualname] = module
        try:
            linecache.checkcache(path)
            with open(path, "rb") as f:
                source = f.read()
            code = compile(source, path, "exec", dont_inherit=True)
            exec(code, module.__dict__)
            exports = exported_functions(module)
            hook = module.__dict__.get("__reload__")
            if previous is not None and callable(hook):
                hook(previous.module)
        except BaseException as e:   # an app may raise anything at import, even SystemExit
            if isinstance(e, KeyboardInterrupt):
                raise
            for k in [k for k in sys.modules if k == qualname or k.startswith(qualname + ".")]:
                del sys.modules[k]
            sys.modules.update(saved)
            err = self._describe_failure(name, path, e)
            self._failed_fp[name] = fp
            if previous is not None:
                previous.error = err
                self.log.error(
                    "app module {module} failed to load at {file}:{line}: {error}; the previous version keeps serving",
                    module=name, file=err.file, line=err.line, error=err.message)
            else:
                self.failures[name] = err
                self.log.error("app module {module} failed to load at {file}:{line}: {error}",
                               module=name, file=err.file, line=err.line, error=err.message)
            if self._failures_metric is not None:
                self._failures_metric.labels(name).inc()
            return "failed"
        static = os.path.join(where, "static") if package else None
        app = AppModule(name=name, path=path, module=module, exports=exports, fingerprint=fp,
                        loaded_at=self.clock.seconds(),
                        static_dir=static if static and os.path.isdir(static) else None,
                        version=(previous.version + 1) if previous else 1)
        self.modules[name] = app
        self.failures.pop(name, None)
        self._failed_fp.pop(name, None)
        if self._reloads is not None:
            self._reloads.labels(name).inc()
        event = "reloaded" if previous is not None else "loaded"
        self.log.info("app module {module} {event} from {file} (exports: {exports})",
                      module=name, event=event, file=path, exports=", ".join(sorted(exports)))
        return event

    def _describe_failure(self, name: str, path: str, e: BaseException) -> LoadError:
        if isinstance(e, SyntaxError):
            file, line = e.filename or path, e.lineno
            message = f"SyntaxError: {e.msg}"
        else:
            file, line = path, None
            frames = traceback.extract_tb(e.__traceback__)
            inside = [fr for fr in frames if os.path.abspath(fr.filename).startswith(self.directory + os.sep)]
            if inside:
                file, line = inside[-1].filename, inside[-1].lineno
            message = f"{type(e).__name__}: {e}"
        return LoadError(module=name, file=file, line=line, message=message, at=self.clock.seconds())
