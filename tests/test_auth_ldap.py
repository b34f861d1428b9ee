"""LDAP logins (``auth = ldap``) against a real slapd with users and groups:
search-then-bind through the node's LDAP adapter, groups become roles, and
the roles decide what ``[access:*]`` rules allow — over HTTP JSON-RPC (Basic)
and WebSocket (a token got with ``rpc.token`` after an LDAP login)."""

from __future__ import annotations

import json

from twisted.internet import defer
from twisted.trial import unittest

from tests import servers
from tests.helpers import http, http_port, make_node
from tests.test_security_matrix import basic
from tests.wsclient import WS

BASE, LDIF = servers.PEOPLE_BASE, servers.PEOPLE_LDIF

APPS = {"admin.py": '''
from msgd import api

def whoami() -> dict:
    p = api.request().principal
    return {"name": p.name, "roles": sorted(p.roles), "via": p.via}

def purge() -> str:
    return "purged"
'''}


class LDAPLoginTests(unittest.TestCase):
    def setUp(self):
        srv = servers.slapd(suffix=BASE, ldif=LDIF)
        self.addCleanup(srv.cleanup)
        ini = f"""
        [adapter:dir]
        type = ldap
        url = ldap://127.0.0.1:{srv.port}
        bind_dn = {srv.extra['bind_dn']}
        password = {srv.extra['password']}
        base = {BASE}
        timeout = 5s

        [interface:web]
        type = http
        endpoint = tcp:0:interface=127.0.0.1
        auth = ldap
        auth_adapter = dir
        anonymous = no
        login_attempts = 0

        [access:staff]
        principals = @staff
        call = admin.whoami

        [access:admins]
        principals = @admins
        call = admin.*
        """
        self.node = make_node(self, ini, APPS)
        self.port = http_port(self.node)

    @defer.inlineCallbacks
    def call(self, auth, method):
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method}).encode()
        code, _, data = yield http("POST", f"http://127.0.0.1:{self.port}/rpc", body,
                                   {"authorization": auth} if auth else {})
        return code, json.loads(data)

    @defer.inlineCallbacks
    def test_groups_become_roles(self):
        code, answer = yield self.call(basic("ann", "annpw"), "admin.whoami")
        self.assertEqual(answer["result"], {"name": "ann", "roles": ["admins", "staff"], "via": "ldap"})
        code, answer = yield self.call(basic("bob", "bobpw"), "admin.whoami")
        self.assertEqual(answer["result"]["roles"], ["staff"])

    @defer.inlineCallbacks
    def test_roles_decide_rules(self):
        _, answer = yield self.call(basic("ann", "annpw"), "admin.purge")
        self.assertEqual(answer["result"], "purged")
        _, answer = yield self.call(basic("bob", "bobpw"), "admin.purge")
        self.assertEqual(answer["error"]["code"], -32001)

    @defer.inlineCallbacks
    def test_wrong_password_unknown_user_empty_password(self):
        for auth in (basic("ann", "nope"), basic("zed", "annpw"), basic("ann", ""), basic("*", "annpw"), None):
            code, answer = yield self.call(auth, "admin.whoami")
            self.assertEqual((code, answer["error"]["code"]), (401, -32001), auth)

    @defer.inlineCallbacks
    def test_token_after_ldap_login_opens_websocket(self):
        _, answer = yield self.call(basic("bob", "bobpw"), "rpc.token")
        c = yield WS.connect(self.port, path="/ws?token=" + answer["result"]["token"])
        self.addCleanup(c.close)
        r = yield c.call("admin.whoami")
        self.assertEqual(r["result"], {"name": "bob", "roles": ["staff"], "via": "token"})
        r = yield c.call("admin.purge")
        self.assertEqual(r["error"]["code"], -32001)
