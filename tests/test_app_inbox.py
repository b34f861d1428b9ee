"""apps/inbox.py, the example handlers of the dirwatch and pop3 inputs."""

import email
import email.policy
import json
import os
from email.message import EmailMessage

from twisted.trial import unittest

from msgd.core import errors
from msgd.testing import AppHarness

from tests.helpers import ROOT


def item(name, content, size=None, mtime=1.0):
    return {"name": name, "path": "/x/processing/" + name, "size": len(content) if size is None else size,
            "mtime": mtime, "content": content, "file": None}


class InboxTests(unittest.TestCase):
    def setUp(self):
        self.apps = AppHarness(os.path.join(ROOT, "apps"))
        self.inbox = self.apps.apps.modules["inbox"].module
        self.inbox._seen.clear()
        self.inbox._mails.clear()
        self.orders = self.apps.apps.modules["orders"].module
        self.orders._orders.clear()

    def test_take_file_places_orders_once(self):
        body = json.dumps([{"item": "book", "qty": 2}, {"item": "pen"}]).encode()
        out = self.apps.result("inbox.take_file", item("a.json", body))
        self.assertEqual((out["duplicate"], len(out["placed"])), (False, 2))
        self.assertEqual(sorted(o["item"] for o in self.orders._orders.values()), ["book", "pen"])
        again = self.apps.result("inbox.take_file", item("a.json", body))   # handed again after a crash
        self.assertEqual(again, {"duplicate": True, "placed": []})
        self.assertEqual(len(self.orders._orders), 2)

    def test_bad_files_fail_before_any_effect(self):
        for content in (b"{", b"[1, 2]", json.dumps({"item": "book", "qty": 0}).encode()):
            self.assertRaises(errors.ApplicationError, self.apps.result, "inbox.take_file", item("b.json", content))
        large = dict(item("c.json", b""), content=None, size=10 ** 9)
        self.assertRaises(errors.ApplicationError, self.apps.result, "inbox.take_file", large)
        self.assertEqual(self.orders._orders, {})
        fixed = json.dumps({"item": "book", "qty": 1}).encode()   # a failed try is not a duplicate
        self.assertEqual(len(self.apps.result("inbox.take_file", item("b.json", fixed))["placed"]), 1)

    def test_take_mail_and_recent(self):
        m = EmailMessage()
        m["From"] = "bob@example.org"
        m["Subject"] = "Grüße"
        m["Message-ID"] = "<1@example.org>"
        m.set_content("hallo")
        m.add_attachment(b"\x00\x01", maintype="application", subtype="octet-stream", filename="a.bin")
        msg = email.message_from_bytes(bytes(m), policy=email.policy.default)
        mail = {"uid": "u1", "size": 100, "message": msg, "raw": bytes(m), "mailbox": "alice@host"}
        self.assertEqual(self.apps.result("inbox.take_mail", mail), {"duplicate": False})
        self.assertEqual(self.apps.result("inbox.take_mail", dict(mail, uid="u2")), {"duplicate": True})
        (summary,) = self.apps.result("inbox.recent")
        self.assertEqual(summary, {"uid": "u1", "from": "bob@example.org", "subject": "Grüße",
                                   "text": "hallo\n", "attachments": ["a.bin"]})
        self.assertEqual(self.apps.result("inbox.recent", 0), [])
