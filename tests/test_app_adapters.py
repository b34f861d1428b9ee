"""The example apps that use adapters (apps/counter.py, apps/directory.py),
tested as app authors would: msgd.testing.AppHarness with stub adapters."""

import fnmatch
import os
from types import SimpleNamespace

from twisted.internet import defer
from twisted.trial import unittest

from msgd.adapters.base import AdapterUnavailable
from msgd.adapters.ldap import ldap_filter
from msgd.core import errors
from msgd.testing import AppHarness

from tests.helpers import ROOT


class StubRedis:
    """The few Redis calls counter.py makes, on a dict."""

    def __init__(self):
        self.data, self.rank = {}, {}
        self.down = False

    def _check(self):
        if self.down:
            raise AdapterUnavailable("cache", "connection refused", retryable=True, sent=False)

    def incrby(self, key, by):
        self.data[key] = int(self.data.get(key, 0)) + by
        return self.data[key]

    def zincrby(self, key, by, member):
        self.rank[member] = self.rank.get(member, 0) + by
        return float(self.rank[member])

    def get(self, key):
        if self.down:
            return defer.fail(AdapterUnavailable("cache", "connection refused", retryable=True, sent=False))
        return defer.succeed(self.data.get(key))

    def delete(self, key):
        return int(self.data.pop(key, None) is not None)

    def zrem(self, key, member):
        return int(self.rank.pop(member, None) is not None)

    def _queued(self):
        """What build functions queue commands on: plain results."""
        return SimpleNamespace(get=self.data.get, delete=self.delete, zrem=self.zrem, incrby=self.incrby,
                               zincrby=self.zincrby)

    def pipeline(self, build):
        self._check()
        return defer.succeed(build(self._queued()))

    def multi(self, build):
        self._check()
        return defer.succeed(build(self._queued()))

    def execute(self, *command):
        assert command[0] == "ZREVRANGE" and command[-1] == "WITHSCORES"
        top = sorted(self.rank.items(), key=lambda kv: -kv[1])[command[2]:command[3] + 1]
        return defer.succeed([x for name, n in top for x in (name, str(float(n)))])


class StubLDAP:
    """Answers searches from a list of entries; checks that app values
    arrive escaped, as the real adapter would put them in the filter."""

    def __init__(self, people, groups):
        self.people, self.groups = people, groups
        self.filters = []

    def search(self, template, *values, attributes=None, size_limit=0):
        flt = ldap_filter(template, *values)
        self.filters.append(flt)
        if "(uid=" in flt:
            uid = flt.split("(uid=")[1].split(")")[0]
            found = [p for p in self.people if p["attributes"]["uid"] == [uid]]
        else:
            pattern = flt.split("(cn=")[1].split(")")[0]
            found = [p for p in self.people if fnmatch.fnmatchcase(p["attributes"]["cn"][0], pattern)]
        return defer.succeed(found[:size_limit or None])

    def roles(self, dn, user=""):
        return defer.succeed(sorted(g for g, members in self.groups.items() if dn in members))


def person(uid, cn, mail=None):
    attrs = {"uid": [uid], "cn": [cn]}
    if mail:
        attrs["mail"] = [mail]
    return {"dn": f"uid={uid},ou=people,dc=example,dc=org", "attributes": attrs}


class CounterTests(unittest.TestCase):
    def setUp(self):
        self.apps = AppHarness(os.path.join(ROOT, "apps"))
        self.redis = self.apps.adapters["cache"] = StubRedis()

    def test_hit_get_top_reset(self):
        self.assertEqual(self.apps.result("counter.hit", "home"), 1)
        self.assertEqual(self.apps.result("counter.hit", "home", 2), 3)
        self.apps.result("counter.hit", "about")
        self.assertEqual(self.apps.result("counter.get", "home"), 3)
        self.assertEqual(self.apps.result("counter.top", 5), [["home", 3], ["about", 1]])
        self.assertEqual(self.apps.result("counter.reset", "home"), 3)
        self.assertEqual(self.apps.result("counter.get", "home"), 0)

    def test_bad_input_and_outage(self):
        self.assertRaises(errors.InvalidParams, self.apps.result, "counter.hit", "")
        self.assertRaises(errors.InvalidParams, self.apps.result, "counter.top", 0)
        self.redis.down = True
        e = self.assertRaises(errors.Unavailable, self.apps.result, "counter.get", "home")
        self.assertEqual(e.data, {"adapter": "cache", "retryable": True})


class DirectoryTests(unittest.TestCase):
    def setUp(self):
        self.apps = AppHarness(os.path.join(ROOT, "apps"))
        ann, bob = person("ann", "Ann Smith", "ann@example.org"), person("bob", "Bob Jones")
        self.ldap = self.apps.adapters["directory"] = StubLDAP(
            [ann, bob], {"admins": [ann["dn"]], "staff": [ann["dn"], bob["dn"]]})

    def test_person_find_groups(self):
        p = self.apps.result("directory.person", "ann")
        self.assertEqual((p["cn"], p["mail"], p["telephoneNumber"]), ("Ann Smith", "ann@example.org", None))
        self.assertEqual([x["uid"] for x in self.apps.result("directory.find", "Jox")], [])
        self.assertEqual([x["uid"] for x in self.apps.result("directory.find", "Jones")], ["bob"])
        self.assertEqual(self.apps.result("directory.groups", "ann"), ["admins", "staff"])

    def test_values_escaped_and_checked(self):
        e = self.assertRaises(errors.ApplicationError, self.apps.result, "directory.person", "*)(uid=*")
        self.assertEqual(e.code, -32020)
        self.assertIn(r"(uid=\2a\29\28uid=\2a)", self.ldap.filters[-1])
        self.assertRaises(errors.InvalidParams, self.apps.result, "directory.find", "a")
