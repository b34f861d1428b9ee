"""The cron expression parser and its next-firing-time search."""

import datetime as dt
from zoneinfo import ZoneInfo

from twisted.trial import unittest

from msgd.core.cron import Cron, CronError

UTC = dt.timezone.utc


def ts(*args, tz=UTC) -> float:
    return dt.datetime(*args, tzinfo=tz).timestamp()


def nexts(expr: str, start: tuple, n: int, tz=UTC) -> list[str]:
    cron = Cron.parse(expr)
    t = ts(*start, tz=tz)
    out = []
    for _ in range(n):
        t = cron.next(t, tz)
        out.append(dt.datetime.fromtimestamp(t, tz).strftime("%a %Y-%m-%d %H:%M"))
    return out


class ParseTests(unittest.TestCase):
    def test_fields(self):
        c = Cron.parse("*/15 9-17 1,15 jan-mar,Dec mon-fri")
        self.assertEqual(c.minutes, {0, 15, 30, 45})
        self.assertEqual(c.hours, set(range(9, 18)))
        self.assertEqual(c.days, {1, 15})
        self.assertEqual(c.months, {1, 2, 3, 12})
        self.assertEqual(c.weekdays, {1, 2, 3, 4, 5})
        self.assertTrue(c.day_or)

    def test_steps_ranges_lists(self):
        self.assertEqual(Cron.parse("10-30/10 * * * *").minutes, {10, 20, 30})
        self.assertEqual(Cron.parse("50/5 * * * *").minutes, {50, 55})
        self.assertEqual(Cron.parse("1,2,5-6 * * * *").minutes, {1, 2, 5, 6})
        self.assertEqual(Cron.parse("0 0 * * 7").weekdays, {0})       # 7 is Sunday too
        self.assertEqual(Cron.parse("0 0 * * SUN,sat").weekdays, {0, 6})
        self.assertFalse(Cron.parse("0 0 * * 1").day_or)

    def test_shorthands(self):
        self.assertEqual(Cron.parse("@hourly").minutes, {0})
        self.assertEqual(Cron.parse("@daily").hours, {0})
        self.assertEqual(Cron.parse("@weekly").weekdays, {0})
        self.assertEqual(Cron.parse("@yearly").months, {1})

    def test_errors(self):
        for bad, why in [("* * * *", "4 fields"), ("60 * * * *", "outside 0-59"), ("* 24 * * *", "outside"),
                         ("* * 0 * *", "outside 1-31"), ("* * * 13 *", "outside"), ("* * * * 8", "outside"),
                         ("*/0 * * * *", "positive"), ("5-1 * * * *", "backwards"), ("a * * * *", "not a number"),
                         ("* * * foo *", "or a name"), ("1,,2 * * * *", "empty"), ("0 0 30 feb *", "never"),
                         ("0 0 31 apr,jun *", "never"), ("@often", "1 fields")]:
            with self.assertRaises(CronError, msg=bad) as e:
                Cron.parse(bad)
            self.assertIn(why, str(e.exception))

    def test_feb_29_is_possible(self):
        self.assertEqual(nexts("0 12 29 2 *", (2025, 3, 1), 2), ["Tue 2028-02-29 12:00", "Sun 2032-02-29 12:00"])


class NextTests(unittest.TestCase):
    def test_every_minute_is_strictly_after(self):
        self.assertEqual(nexts("* * * * *", (2026, 1, 1, 10, 0, 0), 2), ["Thu 2026-01-01 10:01",
                                                                          "Thu 2026-01-01 10:02"])
        self.assertEqual(nexts("* * * * *", (2026, 1, 1, 10, 0, 30), 1), ["Thu 2026-01-01 10:01"])

    def test_steps_cross_hours_and_days(self):
        self.assertEqual(nexts("*/20 23 * * *", (2026, 1, 1, 23, 30), 3),
                         ["Thu 2026-01-01 23:40", "Fri 2026-01-02 23:00", "Fri 2026-01-02 23:20"])

    def test_month_and_year_rollover(self):
        self.assertEqual(nexts("0 0 1 * *", (2026, 12, 15), 2), ["Fri 2027-01-01 00:00", "Mon 2027-02-01 00:00"])
        self.assertEqual(nexts("30 6 31 * *", (2026, 1, 31, 7), 2), ["Tue 2026-03-31 06:30",
                                                                      "Sun 2026-05-31 06:30"])

    def test_weekdays(self):
        self.assertEqual(nexts("0 9 * * mon-fri", (2026, 11, 20, 10), 3),   # a Friday
                         ["Mon 2026-11-23 09:00", "Tue 2026-11-24 09:00", "Wed 2026-11-25 09:00"])

    def test_day_of_month_or_week(self):
        # the 1st and every Monday
        self.assertEqual(nexts("0 0 1 * mon", (2026, 11, 20), 3),
                         ["Mon 2026-11-23 00:00", "Mon 2026-11-30 00:00", "Tue 2026-12-01 00:00"])

    def test_time_zone_and_dst(self):
        paris = ZoneInfo("Europe/Paris")
        self.assertEqual(nexts("0 9 * * *", (2026, 6, 1, 12), 1, tz=paris), ["Tue 2026-06-02 09:00"])
        # 02:30 does not exist on 2026-03-29 in Paris: it fires an hour later, once
        self.assertEqual(nexts("30 2 * * *", (2026, 3, 28, 12), 2, tz=paris),
                         ["Sun 2026-03-29 03:30", "Mon 2026-03-30 02:30"])
        # 02:30 happens twice on 2026-10-25: it fires once
        self.assertEqual(nexts("30 2 * * *", (2026, 10, 24, 12), 2, tz=paris),
                         ["Sun 2026-10-25 02:30", "Mon 2026-10-26 02:30"])
