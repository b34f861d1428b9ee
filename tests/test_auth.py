"""Units of msgd.security: the bcrypt password file, tokens (forged,
expired, tampered), rules matching, limits on a fake clock, the ``msgd
passwd`` command and the config of rules and interface keys."""

from __future__ import annotations

import io
import os

import bcrypt

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from msgd.config import AccessConfig, ConfigError, parse_text
from msgd.core import errors
from msgd.security import Access, Guard, SecurityOptions
from msgd.security.credentials import (LDAPChecker, PasswordFileChecker, passwd_main, read_password_file,
                                       set_password)
from msgd.security.limits import ConnectionLimits, LoginThrottle, RateLimit
from msgd.security.principal import Principal
from msgd.security.rules import Rules, covers
from msgd.security.tokens import Tokens, _b64
from msgd.testing import AppHarness
from tests.helpers import QueuedPool, run_now


class PasswordFileTests(unittest.TestCase):
    def setUp(self):
        self.path = os.path.join(os.path.abspath(self.mktemp()))
        set_password(self.path, "alice", "s3cret", ["ops", "dev"], rounds=4)
        set_password(self.path, "bob", "pw", rounds=4)
        self.checker = PasswordFileChecker(self.path, run_now)

    def test_file_format_and_mode(self):
        users = read_password_file(self.path)
        self.assertEqual(users["alice"][1], frozenset({"ops", "dev"}))
        self.assertTrue(users["alice"][0].startswith(b"$2b$04$"))
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o600)

    @defer.inlineCallbacks
    def test_right_password(self):
        p = yield self.checker.requestAvatarId(UsernamePassword(b"alice", b"s3cret"))
        self.assertEqual(p, Principal("alice", frozenset({"ops", "dev"}), "password"))

    @defer.inlineCallbacks
    def test_wrong_password_and_unknown_user(self):
        for user, pw in ((b"alice", b"nope"), (b"mallory", b"s3cret"), (b"alice", b"")):
            with self.assertRaises(UnauthorizedLogin):
                yield self.checker.requestAvatarId(UsernamePassword(user, pw))

    @defer.inlineCallbacks
    def test_password_over_72_bytes_refused(self):
        """bcrypt 5 raises for a password bcrypt cannot hash (over 72 bytes);
        the login is refused like a wrong password, for a known user (even one
        whose hash an older bcrypt made from the first 72 bytes) or not."""
        long = "é" * 40                                  # 80 bytes
        with open(self.path, "a") as f:
            f.write(f"carol:{bcrypt.hashpw(long.encode()[:72], bcrypt.gensalt(4)).decode()}\n")
        for user in (b"alice", b"carol", b"mallory"):
            with self.assertRaises(UnauthorizedLogin):
                yield self.checker.requestAvatarId(UsernamePassword(user, long.encode()))

    @defer.inlineCallbacks
    def test_change_password_keeps_roles_and_is_seen_without_restart(self):
        set_password(self.path, "alice", "new", rounds=4)
        os.utime(self.path, ns=(1, 2))    # a different stamp even within one clock tick
        p = yield self.checker.requestAvatarId(UsernamePassword(b"alice", b"new"))
        self.assertEqual(p.roles, frozenset({"ops", "dev"}))
        with self.assertRaises(UnauthorizedLogin):
            yield self.checker.requestAvatarId(UsernamePassword(b"alice", b"s3cret"))

    def test_the_file_is_read_off_the_reactor_thread(self):
        """A login touches the file only in run_blocking: the stat, the
        re-read after a change and bcrypt run together in the pool."""
        pool = QueuedPool()
        checker = PasswordFileChecker(self.path, pool)
        os.remove(self.path)
        d = checker.requestAvatarId(UsernamePassword(b"alice", b"s3cret"))
        self.assertNoResult(d)                          # no stat on the calling thread
        set_password(self.path, "alice", "s3cret", ["new"], rounds=4)    # back before the pool got to it
        self.assertEqual(pool.run(), 1)
        self.assertEqual(self.successResultOf(d), Principal("alice", frozenset({"new"}), "password"))
        os.remove(self.path)
        d = checker.requestAvatarId(UsernamePassword(b"alice", b"s3cret"))
        self.assertNoResult(d)
        pool.run()
        self.assertIn("password file unusable", self.failureResultOf(d, UnauthorizedLogin).getErrorMessage())

    def test_bad_lines_refused(self):
        with open(self.path, "a") as f:
            f.write("carol:plaintext\n")
        with self.assertRaises(ValueError) as cm:
            read_password_file(self.path)
        self.assertIn(":3:", str(cm.exception))

    def test_bad_names(self):
        for user in ("", "a:b", " x"):
            with self.assertRaises(ValueError):
                set_password(self.path, user, "pw", rounds=4)
        with self.assertRaises(ValueError) as cm:
            set_password(self.path, "carol", "x" * 73, rounds=4)
        self.assertIn("at most 72 bytes", str(cm.exception))

    def test_passwd_command(self):
        err = io.StringIO()
        self.assertEqual(passwd_main([self.path, "carol", "--roles", "a,b"], io.StringIO("pw\n"), err), 0)
        self.assertEqual(read_password_file(self.path)["carol"][1], frozenset({"a", "b"}))
        err = io.StringIO()
        self.assertEqual(passwd_main([self.path], io.StringIO("pw\n"), err, prog="msgd"), 2)
        self.assertEqual(err.getvalue(), "usage: msgd passwd FILE USER [--roles ROLE,ROLE]\n")
        self.assertEqual(passwd_main([self.path, "dave"], io.StringIO("\n"), err), 1)


class Directory:
    """Stands in for an ``[adapter:NAME] type = ldap``: ``authenticate``
    answers the entry with its roles, or None (unknown user, wrong password)."""

    def __init__(self, users: dict):
        self.users = users          # user -> (password, roles)
        self.asked: list = []

    def authenticate(self, user, password):
        self.asked.append(user)
        entry = self.users.get(user)
        return defer.succeed({"roles": entry[1]} if entry and entry[0] == password else None)


class GuardOnAHarnessTests(unittest.TestCase):
    """The credential checkers as an interface's Guard builds them, on an
    AppHarness (no node, no slapd): LDAP through the services' ``adapter``
    lookup, the password file through their ``run_blocking``."""

    def setUp(self):
        apps = os.path.abspath(self.mktemp())
        os.makedirs(apps)
        self.harness = AppHarness(apps)

    def guard(self, **options) -> Guard:
        class Interface:
            name = "web"
            services = self.harness
        Interface.options = SecurityOptions(**options)
        return Guard(Interface())

    def test_ldap_logins_through_the_adapter_lookup(self):
        self.harness.adapters["dir"] = Directory({"ann": ("pw", ["staff", "admins"])})
        guard = self.guard(auth="ldap", auth_adapter="dir")
        self.assertIsInstance(guard.checker, LDAPChecker)
        self.assertEqual(self.successResultOf(guard.login("ann", "pw")),
                         Principal("ann", frozenset({"staff", "admins"}), "ldap"))
        self.failureResultOf(guard.login("ann", "nope"), errors.Unauthorized)
        self.failureResultOf(guard.login("bob", "pw"), errors.Unauthorized)

    def test_the_ldap_adapter_is_looked_up_at_each_login(self):
        """A reload that restarts ``[adapter:dir]`` replaces it: the next
        login asks the new one (and while there is none, it is not found)."""
        checker = LDAPChecker(self.harness.adapter, "dir")
        self.failureResultOf(checker.requestAvatarId(UsernamePassword(b"ann", b"pw")), errors.NotFound)
        old = self.harness.adapters["dir"] = Directory({"ann": ("pw", [])})
        self.successResultOf(checker.requestAvatarId(UsernamePassword(b"ann", b"pw")))
        new = self.harness.adapters["dir"] = Directory({"ann": ("pw2", ["staff"])})
        p = self.successResultOf(checker.requestAvatarId(UsernamePassword(b"ann", b"pw2")))
        self.assertEqual((p.roles, old.asked, new.asked), (frozenset({"staff"}), ["ann"], ["ann"]))

    def test_password_file_logins_run_in_the_services_run_blocking(self):
        """The stat, the re-read after a change and bcrypt of a login all go
        through ``services.run_blocking``: nothing on the calling thread."""
        path = os.path.abspath(self.mktemp())
        set_password(path, "alice", "s3cret", ["ops"], rounds=4)
        pool = self.harness.run_blocking = QueuedPool()
        guard = self.guard(auth="password", auth_file=path)
        d = guard.login("alice", "s3cret")
        self.assertNoResult(d)
        self.assertEqual([fn.__name__ for fn, *_ in pool.queue], ["_check"])
        self.assertEqual(pool.run(), 1)
        self.assertEqual(self.successResultOf(d).roles, frozenset({"ops"}))
        set_password(path, "alice", "new", ["dev"], rounds=4)
        os.utime(path, ns=(1, 2))                           # a different stamp even within one clock tick
        d = guard.login("alice", "new")
        self.assertNoResult(d)                              # the changed file is not re-read here
        self.assertEqual(pool.run(), 1)
        self.assertEqual(self.successResultOf(d).roles, frozenset({"dev"}))

    def test_access_refuses_anonymous_through_the_guard(self):
        """A call with no principal on an interface without ``anonymous``
        (a stream before ``rpc.login``) is refused by the guard's
        ``anonymous()``: counted and logged once, as at a handshake."""
        guard = self.guard(anonymous=False)
        access = Access(self.harness.metrics, guard_of={"web": guard}.get)
        events: list = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        with self.assertRaises(errors.Unauthorized):
            access.authorize(self.harness.request(interface="web"), "orders.place")
        self.assertIn('msgd_auth_denied_total{interface="web",reason="anonymous"} 1.0',
                      self.harness.metrics.render().decode())
        self.assertEqual([(e["interface"], e["reason"]) for e in events if e.get("reason") == "anonymous"],
                         [("web", "anonymous")])
        access.authorize(self.harness.request(interface="web", principal=Principal("ann", frozenset(), "test")),
                         "orders.place")


class TokenTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.tokens = Tokens(b"k" * 32, self.clock, 60)

    def test_round_trip(self):
        token, exp = self.tokens.issue("alice", ["ops"])
        self.assertEqual(exp, 1_000_060)
        self.assertEqual(self.tokens.verify(token), Principal("alice", frozenset({"ops"}), "token"))

    def test_expired(self):
        token, _ = self.tokens.issue("alice")
        self.clock.advance(60)
        with self.assertRaises(errors.Unauthorized) as cm:
            self.tokens.verify(token)
        self.assertEqual(cm.exception.message, "token expired")

    def test_forged_with_another_key(self):
        token, _ = Tokens(b"x" * 32, self.clock, 60).issue("alice")
        with self.assertRaises(errors.Unauthorized):
            self.tokens.verify(token)

    def test_tampered_payload(self):
        token, _ = self.tokens.issue("bob")
        v, payload, sig = token.split(".")
        evil = _b64(b'{"sub":"admin","roles":["ops"],"iat":0,"exp":9e99}')
        for bad in (f"{v}.{evil}.{sig}", f"v2.{payload}.{sig}", f"{v}.{payload}", "", "a.b.c", "v1..",
                    "v1.\u00e9.x", "x" * 5000):
            with self.assertRaises(errors.Unauthorized):
                self.tokens.verify(bad)

    def test_signed_garbage_payload(self):
        payload = _b64(b"[1,2]")
        with self.assertRaises(errors.Unauthorized):
            self.tokens.verify(f"v1.{payload}.{self.tokens._sign(payload)}")

    def test_short_secret_refused(self):
        with self.assertRaises(ValueError):
            Tokens(b"short", self.clock, 60)


def rule(**kw):
    return AccessConfig(**kw)


class RuleTests(unittest.TestCase):
    alice = Principal("alice", frozenset({"ops"}))
    bob = Principal("bob")

    def test_no_rules_allow_everything(self):
        self.assertTrue(Rules().allows("web", None, "call", "anything.at_all"))

    def test_matching(self):
        rules = Rules([
            ("ops", rule(principals=("@ops",), call=("orders.*",), publish=("orders.*",))),
            ("bob", rule(principals=("bob",), interfaces=("internal",), call=("reports.run",))),
            ("all", rule(principals=("@authenticated",), call=("orders.status",))),
            ("anon", rule(principals=("*",), interfaces=("web",), call=("catalog.*",), subscribe=("news.*",))),
        ])
        a = rules.allows
        self.assertTrue(a("web", self.alice, "call", "orders.place"))
        self.assertFalse(a("web", self.bob, "call", "orders.place"))
        self.assertTrue(a("web", self.bob, "call", "orders.status"))
        self.assertFalse(a("web", None, "call", "orders.status"))
        self.assertTrue(a("web", None, "call", "catalog.list"))
        self.assertFalse(a("other", None, "call", "catalog.list"))
        self.assertTrue(a("internal", self.bob, "call", "reports.run"))
        self.assertFalse(a("web", self.bob, "call", "reports.run"))
        self.assertTrue(a("web", self.alice, "publish", "orders.new"))
        self.assertFalse(a("web", self.alice, "subscribe", "orders.new"))
        self.assertTrue(a("web", None, "subscribe", "news.today"))

    def test_pattern_subscriptions_stay_inside(self):
        self.assertTrue(covers("news.*", "news.*"))
        self.assertTrue(covers("news.*", "news.sport.*"))
        self.assertTrue(covers("*", "anything*"))
        self.assertFalse(covers("news.*", "*"))
        self.assertFalse(covers("news.*", "new*"))
        self.assertFalse(covers("a?", "a*"))
        self.assertFalse(covers("news.?", "news.*"))
        self.assertTrue(covers("news.?", "news.x"))

    def test_config_sections(self):
        cfg = parse_text("[access:ops]\nprincipals = @ops alice\ncall = orders.*\n"
                         "[access:pub]\nsubscribe = news.*\n")
        self.assertEqual(cfg.access[0], ("ops", rule(principals=("@ops", "alice"), call=("orders.*",))))
        self.assertEqual(cfg.access[1][1].principals, ("*",))
        with self.assertRaises(ConfigError) as cm:
            parse_text("[access:x]\ncal = a.*\n")
        self.assertIn("did you mean 'call'", str(cm.exception))

    def test_interface_keys_checked(self):
        with self.assertRaises(ConfigError) as cm:
            parse_text("[interface:web]\ntype = http\nendpoint = tcp:0\nauth = password\n")
        self.assertIn("auth_file", str(cm.exception))
        with self.assertRaises(ConfigError) as cm:
            parse_text("[interface:web]\ntype = http\nendpoint = tcp:0\ntoken_secret = short\n")
        self.assertIn("token_secret", str(cm.exception))
        with self.assertRaises(ConfigError):
            parse_text("[interface:web]\ntype = http\nendpoint = tcp:0\nauth = kerberos\n")


class LimitTests(unittest.TestCase):
    def test_connections(self):
        c = ConnectionLimits(max_total=3, max_per_address=2)
        self.assertIsNone(c.admit("a"))
        self.assertIsNone(c.admit("a"))
        self.assertEqual(c.admit("a"), "connections_per_address")
        self.assertIsNone(c.admit("b"))
        self.assertEqual(c.admit("c"), "connections")
        c.release("a")
        self.assertIsNone(c.admit("c"))
        for addr in ("a", "b", "c"):
            c.release(addr)
        self.assertEqual((c.total, c.by_address), (0, {}))

    def test_rate(self):
        clock = Clock()
        r = RateLimit(clock, rate=2, burst=3)
        self.assertEqual([r.take("p") for _ in range(4)], [True, True, True, False])
        self.assertTrue(r.take("q"))       # per key
        clock.advance(0.5)
        self.assertEqual([r.take("p"), r.take("p")], [True, False])
        self.assertTrue(RateLimit(clock, rate=0, burst=0).take("p"))

    def test_login_throttle(self):
        clock = Clock()
        t = LoginThrottle(clock, attempts=2, window=60)
        t.check("address:a", "user:x")
        t.failed("address:a", "user:x")
        t.failed("address:a", "user:x")
        with self.assertRaises(errors.Overloaded):
            t.check("address:b", "user:x")     # the user is locked, from anywhere
        with self.assertRaises(errors.Overloaded):
            t.check("address:a", "user:y")     # and so is the address
        clock.advance(60)
        t.check("address:a", "user:x")
        self.assertEqual(t.failures, {})


class DocsTests(unittest.TestCase):
    def test_keys_documented(self):
        from msgd import config
        from msgd.security import SecurityOptions
        from tests.helpers import ROOT
        with open(os.path.join(ROOT, "docs", "configuration.rst")) as f:
            doc = f.read()
        for marker, cls in (("[access:NAME]\n", AccessConfig), ("Security keys of listeners", SecurityOptions)):
            start = doc.index(marker)
            for key, _default, _doc in config.describe(cls):
                self.assertIn(f"``{key}``", doc[start:], f"{marker}: {key} is not documented")
