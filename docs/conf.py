"""Sphinx configuration: ``make docs`` builds these pages into
docs/_build/html with warnings as errors and every cross-reference checked
(``-W -n``)."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "docs", "_ext"))

import msgd  # noqa: E402

project = "msgd"
author = "the msgd authors"
copyright = "2026, the msgd authors"
release = version = msgd.__version__

extensions = ["sphinx.ext.autodoc", "msgd_options"]
exclude_patterns = ["_build", "examples"]
root_doc = "index"
nitpicky = True
# Twisted, the standard library and other dependencies have no inventory here
# (no network while building): references into them are not checked.
nitpick_ignore_regex = [
    (r"py:.*", r"(twisted|zope|autobahn|txredisapi|ldap3|lxml|treq|prometheus_client|cryptography|OpenSSL)(\..*)?"),
    (r"py:.*", r"(typing|collections|dataclasses|datetime|decimal|enum|ipaddress|weakref|contextvars)(\..*)?"),
    (r"py:class", r"(bool|bytes|dict|float|int|list|object|set|str|tuple|type|None|Exception|BaseException)"),
]
autodoc_member_order = "bysource"
autodoc_typehints = "none"
html_theme = "alabaster"
html_static_path: list = []
