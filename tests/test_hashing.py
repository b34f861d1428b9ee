"""msgd.cluster.hashing: the rendezvous hash that spreads channels over
standalone Redis shards is stable, order-free, even and consistent."""

from __future__ import annotations

from collections import Counter

from twisted.trial import unittest

from msgd.cluster.hashing import Rendezvous

SHARDS = ["10.0.0.1:6379", "10.0.0.2:6379", "10.0.0.3:6379", "10.0.0.4:6379"]
CHANNELS = [f"chat.room{i}" for i in range(20_000)]


class RendezvousTests(unittest.TestCase):
    def test_pinned_assignments(self):
        # the same on every machine and Python: a change here moves users' channels
        r = Rendezvous(SHARDS)
        self.assertEqual([r.name(c) for c in ("chat.lobby", "news", "orders.42", "x")], PINNED)

    def test_order_does_not_matter(self):
        a, b = Rendezvous(SHARDS), Rendezvous(list(reversed(SHARDS)))
        self.assertTrue(all(a.name(c) == b.name(c) for c in CHANNELS[:2000]))

    def test_spread_is_even(self):
        r = Rendezvous(SHARDS)
        counts = Counter(r.name(c) for c in CHANNELS)
        expected = len(CHANNELS) / len(SHARDS)
        for name in SHARDS:
            self.assertLess(abs(counts[name] - expected), expected * 0.05, counts)

    def test_adding_a_shard_moves_only_what_goes_to_it(self):
        before, after = Rendezvous(SHARDS), Rendezvous(SHARDS + ["10.0.0.5:6379"])
        moved = [c for c in CHANNELS if before.name(c) != after.name(c)]
        self.assertTrue(all(after.name(c) == "10.0.0.5:6379" for c in moved))
        self.assertLess(abs(len(moved) / len(CHANNELS) - 1 / 5), 0.02)

    def test_removing_a_shard_moves_only_its_channels(self):
        before, after = Rendezvous(SHARDS), Rendezvous(SHARDS[1:])
        for c in CHANNELS[:5000]:
            if before.name(c) != SHARDS[0]:
                self.assertEqual(after.name(c), before.name(c))
        spread = Counter(after.name(c) for c in CHANNELS if before.name(c) == SHARDS[0])
        self.assertEqual(set(spread), set(SHARDS[1:]))

    def test_cache_is_bounded(self):
        r = Rendezvous(SHARDS)
        r.CACHE = 10
        names = [r.name(c) for c in CHANNELS[:25]]
        self.assertLessEqual(len(r._cache), 10)
        self.assertEqual(names, [Rendezvous(SHARDS).name(c) for c in CHANNELS[:25]])

    def test_one_shard_and_bad_input(self):
        self.assertEqual(Rendezvous(["only"]).index("anything"), 0)
        self.assertRaises(ValueError, Rendezvous, [])
        self.assertRaises(ValueError, Rendezvous, ["a", "a"])


# checked by hand with coreutils: printf '10.0.0.4:6379\0chat.lobby' | b2sum -l 64 scores highest
PINNED = ["10.0.0.4:6379", "10.0.0.4:6379", "10.0.0.3:6379", "10.0.0.2:6379"]
