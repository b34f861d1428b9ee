"""The bounded writer every push transport uses (msgd.interfaces.writer),
without a transport."""

from twisted.trial import unittest

from msgd.interfaces.writer import BoundedWriter


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
