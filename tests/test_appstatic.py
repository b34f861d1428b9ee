"""``/apps/NAME/``: an app package's static files over real HTTP."""

import os

from twisted.internet import defer
from twisted.trial import unittest

from tests.helpers import http, http_port, make_node, write

INI = """
[node]
name = static-test
reload_interval = 0

[interface:web]
type = http
endpoint = tcp:0:interface=127.0.0.1
"""

APPS = {
    "shop/__init__.py": "def hello():\n    return 'hi'\n",
    "shop/static/index.html": "<!doctype html><title>shop</title>",
    "shop/static/js/app.js": "console.log('v1');\n",
    "shop/static/style.css": "body { color: red }\n",
    "shop/static/.secret": "hidden\n",
    "plain.py": "def f():\n    return 1\n",
}


class AppStaticTests(unittest.TestCase):
    def setUp(self):
        self.node = make_node(self, INI, APPS)
        self.url = f"http://127.0.0.1:{http_port(self.node)}/apps"
        self.apps_dir = self.node.config.node.apps

    def get(self, path, headers=None):
        return http("GET", self.url + path, headers=headers)

    @defer.inlineCallbacks
    def test_files_and_types(self):
        code, headers, body = yield self.get("/shop/")
        self.assertEqual((code, body), (200, b"<!doctype html><title>shop</title>"))
        self.assertEqual(headers.getRawHeaders("content-type"), ["text/html; charset=utf-8"])
        code, headers, body = yield self.get("/shop/js/app.js")
        self.assertEqual(code, 200)
        self.assertEqual(headers.getRawHeaders("content-type"), ["text/javascript; charset=utf-8"])
        self.assertEqual(headers.getRawHeaders("x-content-type-options"), ["nosniff"])
        code, headers, _ = yield self.get("/shop/style.css")
        self.assertEqual(headers.getRawHeaders("content-type"), ["text/css; charset=utf-8"])
        code, headers, _ = yield self.get("/shop")
        self.assertEqual((code, headers.getRawHeaders("location")), (302, ["/apps/shop/"]))

    @defer.inlineCallbacks
    def test_caching_headers(self):
        code, headers, _ = yield self.get("/shop/js/app.js")
        etag = headers.getRawHeaders("etag")[0]
        modified = headers.getRawHeaders("last-modified")[0]
        self.assertEqual(headers.getRawHeaders("cache-control"), ["no-cache"])
        code, _, body = yield self.get("/shop/js/app.js", {"if-none-match": etag})
        self.assertEqual((code, body), (304, b""))
        code, _, body = yield self.get("/shop/js/app.js", {"if-modified-since": modified})
        self.assertEqual((code, body), (304, b""))

    @defer.inlineCallbacks
    def test_changes_without_restart(self):
        code, headers, body = yield self.get("/shop/js/app.js")
        etag = headers.getRawHeaders("etag")[0]
        write(os.path.join(self.apps_dir, "shop/static/js/app.js"), "console.log('version 2');\n")
        code, headers, body = yield self.get("/shop/js/app.js", {"if-none-match": etag})
        self.assertEqual((code, body), (200, b"console.log('version 2');\n"))
        self.assertNotEqual(headers.getRawHeaders("etag")[0], etag)
        write(os.path.join(self.apps_dir, "shop/static/new.txt"), "new\n")
        code, _, body = yield self.get("/shop/new.txt")
        self.assertEqual((code, body), (200, b"new\n"))

    @defer.inlineCallbacks
    def test_refused_paths(self):
        outside = os.path.join(os.path.dirname(self.apps_dir), "outside.txt")
        write(outside, "secret\n")
        static = os.path.join(self.apps_dir, "shop", "static")
        os.symlink(outside, os.path.join(static, "link.txt"))
        os.symlink(os.path.dirname(self.apps_dir), os.path.join(static, "up"))
        os.symlink(os.path.join(static, "style.css"), os.path.join(static, "inside.css"))
        for path in ["/shop/../shop/__init__.py", "/shop/%2e%2e/__init__.py", "/shop/js/..%2f..%2f__init__.py",
                     "/shop/link.txt", "/shop/up/outside.txt", "/shop/.secret", "/shop/js/", "/shop/js",
                     "/shop/nope.js", "/shop/%00", "/plain/", "/nothing/", "/", "/shop/%ff"]:
            code, _, body = yield self.get(path)
            self.assertEqual(code, 404, path)
            self.assertNotIn(b"secret", body)
            self.assertNotIn(b"hello", body)
        code, _, body = yield self.get("/shop/inside.css")   # a symlink that stays inside is fine
        self.assertEqual((code, body), (200, b"body { color: red }\n"))
