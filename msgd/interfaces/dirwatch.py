"""Directory watcher: ``[interface:NAME] type=dirwatch``.

Every complete file dropped into ``directory`` is handed, once, to the
``handler`` app target, and afterwards moved to ``done/`` (or deleted) on
success, or to ``failed/`` beside a ``NAME.error`` file on failure::

    directory/            files arrive here (written in place, or moved in)
    directory/processing/ claimed files, being handled
    directory/done/       handled files (on_success = move)
    directory/failed/     failed files, each with FILE.error holding the reason

The life of a file, and why it is crash-safe:

1. *Complete*: with inotify, a file is complete when it was closed after
   writing (IN_CLOSE_WRITE) or moved in (IN_MOVED_TO), and not reopened for
   writing since.  Files nobody saw being closed (found at start-up, after an
   inotify queue overflow, or in polling mode) are complete once unmodified
   for ``settle`` seconds.  In done-marker mode, ``FILE`` is complete when
   ``FILE<done_marker>`` exists.  Hidden names, ``ignore`` globs and names
   not matching ``pattern`` are never taken.
2. *Claimed*: one atomic rename into ``processing/``.  From then on the file
   is this node's; a crash leaves it there and start-up hands it to the
   handler again (at-least-once).
3. *Handled*: ``handler(item)`` with one dict (see :func:`read_item`).
4. *Finished*: renamed to ``done/`` (or unlinked), or to ``failed/`` after
   its ``.error`` file was written.  A name already taken there gets a
   ``.1``, ``.2``... suffix; nothing is overwritten.

One node owns a directory: start-up recovers everything in ``processing/``.
All file system work runs in the node's thread pool, never on the reactor.
"""

from __future__ import annotations

import fnmatch
import heapq
import os
import time
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger

from msgd.config import (Invalid, choice, duration, integer, nonempty, option, optional_duration, path, size,
                         string, target, words)
from msgd.interfaces.ingest import Input, atomic_write
from msgd.services import Services

SUBDIRS = ("processing", "done", "failed")


@dataclass(frozen=True)
class Options:
    directory: str = option(parse=path, doc="the directory watched; processing/, done/ and failed/ are made in it")
    handler: str = option(parse=target, doc="app target called as handler(item) for each file")
    pattern: str = option("*", parse=nonempty, doc="glob of the file names taken")
    ignore: tuple = option(("*.tmp", "*.part", "*~"), parse=words,
                           doc="globs of names never taken (names starting with a dot never are)")
    done_marker: str = option("", parse=string,
                              doc="when set (e.g. .ready), FILE is taken only once FILE plus this suffix exists")
    settle: float = option(2.0, parse=duration,
                           doc="a file not seen being closed is complete once unmodified this long")
    poll_interval: float = option(5.0, parse=duration, doc="how often the directory is rescanned")
    watch: str = option("auto", parse=choice("auto", "inotify", "poll"),
                        doc="inotify, poll, or auto (inotify when the platform has it)")
    concurrency: int = option(4, parse=integer(1, 1024), doc="most files handled at once")
    order: str = option("name", parse=choice("name", "mtime"), doc="which waiting file is taken first")
    max_inline: int = option(1024 * 1024, parse=size,
                             doc="files up to this size are handed as bytes, larger ones as an open file")
    on_success: str = option("move", parse=choice("move", "delete"),
                             doc="move handled files to done/, or delete them")
    request_timeout: float | None = option(None, parse=optional_duration,
                                           doc="deadline of each handler call (default: [node] request_timeout)")

    def check(self):
        if self.done_marker and (os.sep in self.done_marker or not self.done_marker.strip()):
            raise Invalid("must be a file name suffix such as .ready", "done_marker")
        if self.poll_interval <= 0:
            raise Invalid("must be positive", "poll_interval")


# -- blocking helpers (run in the node's thread pool) ---------------------------

def wanted(name: str, pattern: str, ignore: tuple, marker: str) -> bool:
    """Whether a file of this name may be taken (its marker aside)."""
    return not (name.startswith(".") or (marker and name.endswith(marker))
                or not fnmatch.fnmatchcase(name, pattern) or any(fnmatch.fnmatchcase(name, g) for g in ignore))


def list_candidates(directory: str, pattern: str, ignore: tuple, marker: str) -> list[tuple[str, float, float]]:
    """(name, mtime, age) of the regular files that may be taken."""
    now = time.time()
    entries = {}
    with os.scandir(directory) as it:
        for e in it:
            if not e.name.startswith(".") and e.is_file(follow_symlinks=False):
                entries[e.name] = e
    out = []
    for name, e in entries.items():
        if not wanted(name, pattern, ignore, marker) or (marker and name + marker not in entries):
            continue
        try:
            mtime = e.stat(follow_symlinks=False).st_mtime
        except FileNotFoundError:
            continue
        out.append((name, mtime, now - mtime))
    return out


def claim(src: str, dst: str, marker_path: str | None, max_inline: int) -> dict | None:
    """Move ``src`` into processing/ and read it (:func:`read_item`); None
    when it has gone meanwhile."""
    try:
        os.rename(src, dst)
    except FileNotFoundError:
        return None
    if marker_path:
        _unlink(marker_path)
    return read_item(dst, os.path.basename(src), max_inline)


def read_item(path: str, name: str, max_inline: int) -> dict:
    """The handler's one argument::

        {"name": "order-17.json",        # the name it arrived with
         "path": ".../processing/order-17.json",
         "size": 1234, "mtime": 1700000000.0,
         "content": b"...",              # the bytes, when size <= max_inline, else None
         "file": None}                   # else an open binary file (closed after the call)
    """
    st = os.stat(path)
    item = {"name": name, "path": path, "size": st.st_size, "mtime": st.st_mtime, "content": None, "file": None}
    if st.st_size <= max_inline:
        with open(path, "rb") as f:
            item["content"] = f.read()
    else:
        item["file"] = open(path, "rb")
    item["lag"] = max(0.0, time.time() - st.st_mtime)
    return item


def free_name(directory: str, name: str) -> str:
    """``directory/name``, or with the first free ``.N`` suffix."""
    p = os.path.join(directory, name)
    n = 0
    while os.path.lexists(p) or os.path.lexists(p + ".error"):
        n += 1
        p = os.path.join(directory, f"{name}.{n}")
    return p


def finish_ok(path: str, done_dir: str | None) -> None:
    if done_dir is None:
        os.unlink(path)
    else:
        os.rename(path, free_name(done_dir, os.path.basename(path)))


def finish_failed(path: str, failed_dir: str, why: str) -> str:
    dst = free_name(failed_dir, os.path.basename(path))
    atomic_write(dst + ".error", (why + "\n").encode())   # the reason first: a crash here only retries
    os.rename(path, dst)
    return dst


def _unlink(p: str) -> None:
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass


# -- the interface ------------------------------------------------------------------

class DirWatch(Input):
    Options = Options
    log = Logger()

    def __init__(self, name: str, options, services: Services):
        super().__init__(name, options, services)
        self.dirs = {d: os.path.join(options.directory, d) for d in SUBDIRS}
        self.mode = None             # "inotify" or "poll" once started
        self._notifier: Any = None    # an INotify when watching with inotify
        self._loop = None
        self._active: set[str] = set()      # names in processing/ (claimed by us)
        self._recovered: list[str] = []     # left in processing/ by a previous run
        self._pending: dict[str, float] = {}   # complete, waiting for a slot: name -> mtime
        self._queue: list[tuple] = []       # heap of (order key, name); stale entries skipped
        self._writing: set[str] = set()     # inotify: being written
        self._closed: set[str] = set()      # inotify: closed after writing, or moved in
        self._blocked: set[str] = set()     # waiting because a file of the same name is in processing/
        self._busy = 0                      # files being claimed or handled now
        self._scanning = False
        self._rescan = False
        self._tasks: set[defer.Deferred] = set()

    # -- start / stop -------------------------------------------------------------

    def startService(self):
        super().startService()
        try:
            for d in self.dirs.values():
                os.makedirs(d, exist_ok=True)
            self._recovered = sorted(n for n in os.listdir(self.dirs["processing"]) if not n.startswith("."))
            self.mode = self._start_watching()
        except Exception as e:
            self.cannot_start(f"watch {self.options.directory}", e)
            return
        self._active.update(self._recovered)
        if self._recovered:
            self.log.warn("interface {interface}: {n} file(s) left in processing/ by a previous run are handled again",
                          interface=self.name, n=len(self._recovered))
        self.accepting = True
        self._loop = task.LoopingCall(self.scan)
        self._loop.clock = self.services.reactor
        self._loop.start(self.options.poll_interval, now=True).addErrback(
            lambda f: self.log.failure("interface {interface}: scan loop stopped", f, interface=self.name))
        self.log.info("interface {interface} (dirwatch) watching {directory} with {mode}",
                      interface=self.name, directory=self.options.directory, mode=self.mode)
        self._pump()
        self.ready.callback(self)

    def _start_watching(self) -> str:
        if self.options.watch == "poll":
            return "poll"
        try:
            from twisted.internet import inotify
            from twisted.python.filepath import FilePath
            notifier = inotify.INotify(reactor=self.services.reactor)
            notifier.startReading()
            mask = (inotify.IN_CREATE | inotify.IN_MODIFY | inotify.IN_CLOSE_WRITE | inotify.IN_MOVED_TO
                    | inotify.IN_MOVED_FROM | inotify.IN_DELETE)
            notifier.watch(FilePath(self.options.directory), mask=mask, callbacks=[self._event])
        except Exception as e:
            if self.options.watch == "inotify":
                raise
            self.log.warn("interface {interface}: inotify unavailable ({error}); polling every {interval}s",
                          interface=self.name, error=e, interval=self.options.poll_interval)
            return "poll"
        self._notifier = notifier
        return "inotify"

    def stop_accepting(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._notifier is not None:
            self._notifier.loseConnection()
            self._notifier = None
        return super().stop_accepting()

    def unfinished(self):
        """Files being moved to done/ or failed/; whatever is still
        unfinished at the stop stays in processing/."""
        return list(self._tasks)

    def describe(self) -> dict:
        return dict(super().describe(), directory=self.options.directory, mode=self.mode,
                    in_flight=self._busy, waiting=len(self._pending))

    # -- noticing files -------------------------------------------------------------

    def _event(self, _watch, filepath, mask):
        from twisted.internet import inotify
        if mask & inotify.IN_Q_OVERFLOW:
            # events were lost: forget what they told us; settle decides instead
            self._writing.clear()
            self._closed.clear()
            self.scan()
            return
        if mask & inotify.IN_ISDIR:
            return
        name = os.fsdecode(filepath.basename())
        if mask & (inotify.IN_CREATE | inotify.IN_MODIFY):
            self._writing.add(name)
            self._closed.discard(name)
            self._pending.pop(name, None)
        elif mask & (inotify.IN_CLOSE_WRITE | inotify.IN_MOVED_TO):
            # complete now: queue it without listing the directory
            self._writing.discard(name)
            o = self.options
            if o.done_marker and name.endswith(o.done_marker):
                name = name[:-len(o.done_marker)]
            elif o.done_marker:
                return
            if not wanted(name, o.pattern, o.ignore, o.done_marker):
                return
            if name in self._active:
                self._blocked.add(name)
            else:
                self._closed.add(name)
                self._wait(name, time.time())
                self._pump()
        elif mask & (inotify.IN_MOVED_FROM | inotify.IN_DELETE):
            self._writing.discard(name)
            self._closed.discard(name)
            self._pending.pop(name, None)

    def scan(self) -> None:
        """List the directory (in the thread pool) and queue the complete
        files.  Calls during a scan are merged into one more scan after it."""
        if not self.accepting:
            return
        if self._scanning:
            self._rescan = True
            return
        self._scanning = True
        o = self.options
        d = self.services.run_blocking(list_candidates, o.directory, o.pattern, o.ignore, o.done_marker)
        d.addCallback(self._scanned)
        d.addErrback(self._scan_failed)
        d.addBoth(self._scan_done)

    def _scanned(self, entries):
        marker = bool(self.options.done_marker)
        for name, mtime, age in entries:
            if name in self._active:
                self._blocked.add(name)
            elif marker or (name not in self._writing and (name in self._closed or age >= self.options.settle)):
                self._wait(name, mtime)
        self._pump()

    def _scan_failed(self, f):
        self.metrics.errors.inc()
        self.log.error("interface {interface}: cannot scan {directory}: {error}", interface=self.name,
                       directory=self.options.directory, error=f.getErrorMessage())

    def _scan_done(self, _):
        self._scanning = False
        if self._rescan:
            self._rescan = False
            self.scan()

    # -- taking files ---------------------------------------------------------------------

    def _key(self, name: str, mtime: float):
        return name if self.options.order == "name" else (mtime, name)

    def _wait(self, name: str, mtime: float) -> None:
        """Queue a complete file for a free slot."""
        if self._pending.get(name) == mtime:
            return
        self._pending[name] = mtime
        heapq.heappush(self._queue, (self._key(name, mtime), name))
        if len(self._queue) > 2 * len(self._pending) + 1000:   # drop stale entries
            self._queue = [(self._key(n, t), n) for n, t in self._pending.items()]
            heapq.heapify(self._queue)

    def _pump(self) -> None:
        """Start handling files while there are free slots: recovered ones
        first, then waiting ones by name or mtime."""
        if not self.accepting:
            return
        while self._recovered and self._busy < self.options.concurrency:
            self._start(self._handle(self._recovered.pop(0), claimed=True))
        while self._queue and self._busy < self.options.concurrency:
            key, name = heapq.heappop(self._queue)
            if name not in self._pending or self._key(name, self._pending[name]) != key:
                continue       # taken, gone, or queued again with another key
            del self._pending[name]
            self._active.add(name)
            self._start(self._handle(name, claimed=False))

    def _start(self, d: defer.Deferred) -> None:
        self._tasks.add(d)
        d.addBoth(lambda _: self._tasks.discard(d))

    @defer.inlineCallbacks
    def _handle(self, name: str, claimed: bool):
        self._busy += 1
        proc = os.path.join(self.dirs["processing"], name)
        done = False
        try:
            if not claimed:
                marker = os.path.join(self.options.directory, name + self.options.done_marker) \
                    if self.options.done_marker else None
                try:
                    item = yield self.services.run_blocking(claim, os.path.join(self.options.directory, name),
                                                            proc, marker, self.options.max_inline)
                finally:
                    self._closed.discard(name)
                if item is None:      # gone meanwhile (deleted, or taken by someone else)
                    done = True
                    return
            else:
                item = yield self.services.run_blocking(read_item, proc, name, self.options.max_inline)
            yield self._call(name, proc, item)
            done = True
        except Exception as e:
            # the file system failed us, not the handler: a file still in
            # processing/ keeps its name reserved and is handled again at
            # the next start; one never claimed is seen again by a scan
            done = not os.path.lexists(proc)
            self.metrics.errors.inc()
            self.log.error("interface {interface}: {name}: {error}", interface=self.name, name=name, error=e)
        finally:
            self._busy -= 1
            if done:
                self._active.discard(name)
            if name in self._blocked:
                self._blocked.discard(name)
                self.scan()
            self._pump()

    @defer.inlineCallbacks
    def _call(self, name: str, proc: str, item: dict):
        services = self.services
        try:
            failed = yield self.call_handler(item, item.pop("lag"))
        finally:
            if item["file"] is not None:
                item["file"].close()
        if failed is not None:
            why, request_id = failed
            dst = yield services.run_blocking(finish_failed, proc, self.dirs["failed"], why)
            self.log.warn("interface {interface}: {name} failed, moved to {dst}: {reason}", interface=self.name,
                          name=name, dst=dst, reason=why, request_id=request_id)
        else:
            yield services.run_blocking(finish_ok, proc,
                                        self.dirs["done"] if self.options.on_success == "move" else None)
