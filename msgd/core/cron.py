"""Cron expressions: five fields, the classic Vixie-cron meaning.

::

    minute  hour  day-of-month  month  day-of-week
    0-59    0-23  1-31          1-12   0-7 (0 and 7 are Sunday)

Each field is ``*``, a number, a range ``a-b``, a step ``*/n``, ``a-b/n`` or
``a/n`` (from a to the end), or a comma-separated list of those.  Months and
days of the week may be named (``jan``–``dec``, ``sun``–``sat``, any case).
Shorthands: ``@yearly`` (``@annually``), ``@monthly``, ``@weekly``,
``@daily`` (``@midnight``), ``@hourly``.

As in cron, when both day-of-month and day-of-week are restricted (neither is
``*``), a day matches when *either* does: ``0 0 1 * mon`` is midnight on the
1st of the month and on every Monday.

Times are wall-clock times in a time zone (``zoneinfo`` name, or ``None`` for
the machine's local zone).  A wall time skipped by a daylight-saving change
fires at the instant the zone maps it to (an hour later); a wall time that
occurs twice fires once.

A small parser rather than a dependency: the whole grammar fits here and is
tested in ``tests/test_cron.py``.
"""

from __future__ import annotations

import calendar
import datetime as dt
from dataclasses import dataclass

MONTHS = {m.lower(): i for i, m in enumerate(calendar.month_abbr) if m}
DAYS = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}
SHORTHANDS = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *",
}
# name, lowest, highest, names
FIELDS: tuple[tuple[str, int, int, dict[str, int]], ...] = (
    ("minute", 0, 59, {}), ("hour", 0, 23, {}), ("day of month", 1, 31, {}),
    ("month", 1, 12, MONTHS), ("day of week", 0, 7, DAYS))
MAX_STEPS = 100_000   # bounds the search; far more than any satisfiable expression needs


class CronError(ValueError):
    """An expression that cannot be parsed, or that never matches."""


def _number(text: str, lo: int, hi: int, names: dict, field: str) -> int:
    value = names.get(text.lower()) if names else None
    if value is None:
        if not text.isdigit():
            raise CronError(f"{field}: {text!r} is not a number" + (" or a name" if names else ""))
        value = int(text)
    if not lo <= value <= hi:
        raise CronError(f"{field}: {value} is outside {lo}-{hi}")
    return value


def _field(text: str, lo: int, hi: int, names: dict, field: str) -> frozenset:
    values: set[int] = set()
    for part in text.split(","):
        body, slash, step_text = part.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) == 0:
                raise CronError(f"{field}: step {step_text!r} must be a positive number")
            step = int(step_text)
        if body == "*":
            first, last = lo, hi
        elif "-" in body:
            a, _, b = body.partition("-")
            first, last = _number(a, lo, hi, names, field), _number(b, lo, hi, names, field)
            if first > last:
                raise CronError(f"{field}: range {body!r} goes backwards")
        elif body:
            first = _number(body, lo, hi, names, field)
            last = hi if slash else first
        else:
            raise CronError(f"{field}: empty item in {text!r}")
        values.update(range(first, last + 1, step))
    return frozenset(values)


@dataclass(frozen=True)
class Cron:
    expression: str
    minutes: frozenset
    hours: frozenset
    days: frozenset        # of the month
    months: frozenset
    weekdays: frozenset    # 0 = Sunday
    day_or: bool           # both day fields restricted: either one matches

    @classmethod
    def parse(cls, expression: str) -> "Cron":
        text = SHORTHANDS.get(expression.strip().lower(), expression)
        parts = text.split()
        if len(parts) != 5:
            raise CronError(f"{expression!r} has {len(parts)} fields; cron needs 5 "
                            "(minute hour day-of-month month day-of-week) or a shorthand like @daily")
        sets = [_field(p, lo, hi, names, name) for p, (name, lo, hi, names) in zip(parts, FIELDS)]
        weekdays = frozenset(d % 7 for d in sets[4])
        day_or = parts[2] != "*" and parts[4] != "*"
        cron = cls(expression.strip(), sets[0], sets[1], sets[2], sets[3], weekdays, day_or)
        if not day_or and parts[4] == "*" and not any(
                d <= calendar.monthrange(2024, m)[1] for m in cron.months for d in cron.days):
            raise CronError(f"{expression!r} never matches: no chosen month has such a day")
        return cron

    def _day_matches(self, day: dt.date) -> bool:
        in_month = day.day in self.days
        in_week = (day.weekday() + 1) % 7 in self.weekdays
        return (in_month or in_week) if self.day_or else (in_month and in_week)

    def next_wall(self, after: dt.datetime) -> dt.datetime:
        """The first matching wall-clock minute strictly after ``after`` (naive)."""
        t = after.replace(second=0, microsecond=0) + dt.timedelta(minutes=1)
        for _ in range(MAX_STEPS):
            if t.month not in self.months:
                t = (t.replace(day=1, hour=0, minute=0) + dt.timedelta(days=32)).replace(day=1)
            elif not self._day_matches(t):
                t = t.replace(hour=0, minute=0) + dt.timedelta(days=1)
            elif t.hour not in self.hours:
                t = t.replace(minute=0) + dt.timedelta(hours=1)
            elif t.minute not in self.minutes:
                t += dt.timedelta(minutes=1)
            else:
                return t
        raise CronError(f"{self.expression!r} does not match within the search bound")

    def next(self, after: float, tz: dt.tzinfo | None = None) -> float:
        """The first firing time (epoch seconds) strictly after ``after``, in
        time zone ``tz`` (None: the machine's local zone)."""
        wall = dt.datetime.fromtimestamp(after, tz).replace(tzinfo=None)
        for _ in range(MAX_STEPS):
            wall = self.next_wall(wall)
            t = wall.replace(tzinfo=tz).timestamp()
            if t > after:   # a repeated wall hour (DST ends) maps back before ``after``: skip it
                return t
        raise CronError(f"{self.expression!r} does not match within the search bound")
