"""The bounded writer every push transport uses (msgd.interfaces.writer),
without a transport."""

from twisted.internet.task import Clock
from twisted.trial import unittest

from msgd.interfaces.writer import TURN_BYTES, BoundedWriter, Turn


class BoundedWriterTests(unittest.TestCase):
    def setUp(self):
        self.out, self.overflows, self.discards = [], [], []
        self.w = BoundedWriter(self.out.append, 10, self.overflow, lambda: self.discards.append(True))

    def overflow(self, limit):
        self.overflows.append(limit)
        self.w.last(b"bye")

    def test_writes_through_while_not_paused(self):
        self.w.write(b"abc")
        self.w.write(b"def")
        self.assertEqual(self.out, [b"abc", b"def"])
        self.assertIsNone(self.w.queue)

    def test_paused_writes_queue_and_go_in_one_write_on_resume(self):
        self.w.pause()
        self.w.write(b"abc")
        self.w.write(b"def")
        self.assertEqual((self.out, self.w.queued), ([], 6))
        self.w.resume()
        self.assertEqual(self.out, [b"abcdef"])
        self.w.write(b"g")
        self.assertEqual(self.out, [b"abcdef", b"g"])

    def test_past_the_limit_the_queue_and_unsent_bytes_are_dropped_and_the_reason_goes_next(self):
        self.w.pause()
        self.w.write(b"0123456789")      # at the limit: kept
        self.assertEqual(self.overflows, [])
        self.w.write(b"x")               # past it
        self.assertEqual((self.overflows, self.discards, self.out), ([10], [True], [b"bye"]))
        self.assertEqual(self.w.queued, 0)
        self.w.write(b"more")            # nothing after the last message
        self.w.resume()
        self.assertEqual(self.out, [b"bye"])

    def test_last_goes_after_what_is_queued_even_when_paused(self):
        self.w.pause()
        self.w.write(b"a")
        self.w.last(b"z")
        self.assertEqual(self.out, [b"a", b"z"])

    def test_closed_writes_nothing(self):
        self.w.pause()
        self.w.write(b"a")
        self.w.close()
        self.w.write(b"b")
        self.w.resume()
        self.assertEqual(self.out, [])


class TurnTests(unittest.TestCase):
    """With a Turn, what a writer is given during a reactor turn goes out in
    one write at the end of it."""

    def setUp(self):
        self.clock = Clock()
        self.turn = Turn(self.clock)
        self.out, self.overflows = [], []
        self.w = BoundedWriter(self.out.append, 10, self.overflows.append, None, self.turn)

    def test_one_write_at_the_end_of_the_turn(self):
        self.w.write(b"abc")
        self.w.write(b"def")
        self.assertEqual(self.out, [])
        self.clock.advance(0)
        self.assertEqual(self.out, [b"abcdef"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_paused_before_the_turn_ends_waits_and_counts(self):
        self.w.write(b"0123456")
        self.w.pause()
        self.clock.advance(0)
        self.assertEqual(self.out, [])
        self.w.write(b"7890")                   # 11 bytes waiting: past the limit
        self.assertEqual(self.overflows, [10])

    def test_a_burst_goes_at_once(self):
        w = BoundedWriter(self.out.append, 10 ** 6, self.overflows.append, None, self.turn)
        chunk = b"x" * 1024
        for _ in range(TURN_BYTES // 1024):
            w.write(chunk)
        self.assertEqual([len(b) for b in self.out], [TURN_BYTES])
        self.clock.advance(0)
        self.assertEqual(len(self.out), 1)

    def test_close_writes_what_the_turn_gave_first(self):
        self.w.write(b"last")
        self.w.close()
        self.w.write(b"more")
        self.clock.advance(0)
        self.assertEqual(self.out, [b"last"])

    def test_run_early_leaves_no_call(self):
        self.w.write(b"a")
        self.turn.run()
        self.assertEqual((self.out, self.clock.getDelayedCalls()), ([b"a"], []))
