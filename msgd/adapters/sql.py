"""``type = sql``: SQL databases through :mod:`twisted.enterprise.adbapi`.

::

    db = api.adapter("db")
    rows = await db.query("SELECT id, name FROM users WHERE name = ?", ("ann",))   # [{"id": 1, "name": "ann"}]
    n = await db.execute("UPDATE users SET seen = ? WHERE id = ?", (now, 1))      # rows changed
    await db.executemany("INSERT INTO t (a) VALUES (?)", [(1,), (2,)])
    new_id = await db.interaction(lambda cur: cur.execute("INSERT …", (…,)) or cur.lastrowid)

``driver = sqlite`` (the embedded default: a file, WAL journal, one writer at
a time) or ``postgres`` (psycopg2).  Parameters are always bound by the
driver, never formatted into the SQL: every method takes the SQL text and a
separate tuple/list (or dict, for named parameters) and refuses anything
else.  Placeholders are the driver's own: ``?`` / ``:name`` for sqlite,
``%s`` / ``%(name)s`` for PostgreSQL.

Rows come back as dicts.  ``query`` is for reads and is retried when the
database could not be reached; ``execute``, ``executemany`` and
``interaction`` (a function run in one transaction: committed when it
returns, rolled back when it raises) are never repeated once sent.

Every statement runs in adbapi's threads (``pool_size`` of them), never on
the reactor.  A statement still running at its caller's deadline keeps its
slot until the database returns; PostgreSQL sessions get
``statement_timeout`` = ``timeout`` so none runs much longer.
"""

from __future__ import annotations

import importlib.util
import os
import sqlite3
from dataclasses import dataclass

from twisted.enterprise import adbapi
from twisted.internet import defer

from msgd.adapters.base import Adapter, AdapterOptions, AdapterRejected, AdapterUnavailable
from msgd.config import Invalid, choice, duration, option, optional_path, string
from msgd.services import Services


def _dict_row(cursor, row):
    return {col[0]: value for col, value in zip(cursor.description, row)}


class SQLAdapter(Adapter):
    @dataclass(frozen=True, kw_only=True)
    class Options(AdapterOptions):
        driver: str = option("sqlite", parse=choice("sqlite", "postgres"), doc="sqlite (embedded) or postgres")
        path: str | None = option(None, parse=optional_path,
                                  doc="sqlite database file (default: [node] state_dir/NAME.sqlite)")
        dsn: str = option("", parse=string, doc="PostgreSQL connection string (libpq DSN) when driver=postgres")
        busy_timeout: float = option(5.0, parse=duration,
                                     doc="sqlite: how long a statement waits for a lock held by another process")

        def check(self):
            if self.driver == "postgres" and not self.dsn.strip():
                raise Invalid("driver = postgres needs dsn (e.g. host=127.0.0.1 dbname=app user=app)", "dsn")

    def __init__(self, name, options, services: Services):
        super().__init__(name, options, services)
        self.sqlite = options.driver == "sqlite"
        self.path = None
        if self.sqlite:
            self.path = options.path or os.path.join(services.settings.state_dir, f"{name}.sqlite")
        if not self.sqlite and importlib.util.find_spec("psycopg2") is None:
            # checked here so that start-up fails with one clear line
            raise RuntimeError(f"[adapter:{name}] driver = postgres needs psycopg2: pip install 'msgd[postgres]'")
        self.dbpool: adbapi.ConnectionPool | None = None
        self._writer = defer.DeferredLock()   # sqlite: one writer at a time

    # -- service -------------------------------------------------------------

    def startService(self):
        o = self.options
        common = dict(cp_min=1, cp_max=o.pool_size, cp_reactor=self.reactor, cp_noisy=False,
                      cp_openfun=self._opened)
        if self.sqlite:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self.dbpool = adbapi.ConnectionPool("sqlite3", self.path, timeout=o.busy_timeout,
                                                check_same_thread=False, **common)
        else:
            import psycopg2
            self.dbpool = adbapi.ConnectionPool("psycopg2", o.dsn, cp_reconnect=True,
                                                connect_timeout=max(2, int(o.timeout)), **common)
            self._pg_errors = (psycopg2.OperationalError, psycopg2.InterfaceError)
            self._pg_error = psycopg2.Error
        super().startService()

    def stopService(self):
        super().stopService()
        if self.dbpool is not None:
            self.dbpool.close()   # joins its threads; statements are bounded by the timeouts set above
            self.dbpool = None

    def _opened(self, conn):
        if self.sqlite:
            conn.row_factory = _dict_row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA busy_timeout={int(self.options.busy_timeout * 1000)}")
            conn.execute("PRAGMA foreign_keys=ON")
        else:
            import psycopg2.extras
            conn.cursor_factory = psycopg2.extras.RealDictCursor
            with conn.cursor() as cur:
                cur.execute("SET statement_timeout = %s", (int(self.options.timeout * 1000),))
            conn.commit()

    def classify(self, e):
        if self.sqlite and isinstance(e, sqlite3.OperationalError) and ("locked" in str(e) or "busy" in str(e)):
            return AdapterUnavailable(self.name, f"database busy: {e}", retryable=True)
        if not self.sqlite and isinstance(e, self._pg_errors):
            return AdapterUnavailable(self.name, f"database: {str(e).strip()}", retryable=True)
        if isinstance(e, sqlite3.Error) or (not self.sqlite and isinstance(e, self._pg_error)):
            return AdapterRejected(self.name, f"{type(e).__name__}: {str(e).strip()}")
        return super().classify(e)

    # -- API -----------------------------------------------------------------

    def query(self, sql: str, params=()) -> defer.Deferred:
        """Rows (dicts) of a read; retried when safe."""
        _check(sql, params)
        return self.call("query", lambda lease: self.hold(lease, self._pool().runQuery(sql, params)),
                         safe=True, lease_fn=True).addCallback(lambda rows: [dict(r) for r in rows])

    def execute(self, sql: str, params=()) -> defer.Deferred:
        """Run one statement in its own transaction; fires with the number
        of rows it changed."""
        _check(sql, params)
        return self.interaction(_execute, "execute", sql, params, op="execute")

    def executemany(self, sql: str, seq_of_params) -> defer.Deferred:
        """Run one statement for each parameter set, in one transaction."""
        seq = list(seq_of_params)
        for params in seq:
            _check(sql, params)
        return self.interaction(_execute, "executemany", sql, seq, op="executemany")

    def interaction(self, fn, *args, op: str = "interaction", **kwargs) -> defer.Deferred:
        """Run blocking ``fn(cursor, *args, **kwargs)`` in a thread, inside
        one transaction; fires with what it returns."""
        async def run(lease):
            if self.sqlite:
                await self._writer.acquire()
            try:
                inner = self._pool().runInteraction(fn, *args, **kwargs)
            except BaseException:
                self._release_writer()
                raise
            if self.sqlite:
                inner.addBoth(self._release_writer)
            return await self.hold(lease, inner)
        return self.call(op, lambda lease: defer.Deferred.fromCoroutine(run(lease)), lease_fn=True)

    def _release_writer(self, result=None):
        if self.sqlite:
            self._writer.release()
        return result

    def _pool(self) -> adbapi.ConnectionPool:
        if self.dbpool is None:
            raise AdapterUnavailable(self.name, "adapter not running", sent=False)
        return self.dbpool


def _check(sql, params) -> None:
    if not isinstance(sql, str):
        raise TypeError("sql must be a str")
    if not isinstance(params, (tuple, list, dict)):
        raise TypeError("params must be a tuple, list or dict; values are bound, never formatted into the SQL")


def _execute(cur, method: str, sql: str, params) -> int:
    getattr(cur, method)(sql, params)
    return cur.rowcount
