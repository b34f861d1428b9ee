"""``/apps/NAME/…`` on an HTTP interface: the browser side of an app package.

An app may be a package (``apps/chat/__init__.py``) with a ``static/``
directory beside its code; its files are served under ``/apps/chat/``
(``/apps/chat/`` itself is ``static/index.html``), so a page and the server
functions it calls live and change together.

* Files are read from disk on every request: an edited or added file is
  served at once, without a restart (a new app package appears when the node
  sees its code, within ``[node] reload_interval``).
* Caching: ``ETag`` (from mtime and size) and ``Last-Modified``, answered
  with 304 on ``If-None-Match`` / ``If-Modified-Since``; ``Cache-Control:
  no-cache`` (revalidate every time) unless ``apps_static_max_age`` is set.
* Safety: no directory listings; path segments ``..``, ``.``, hidden names
  (``.git``) and NUL bytes are refused, and the resolved path (symlinks
  followed) must stay inside the app's ``static/`` directory, so a symlink
  pointing elsewhere is refused too.  Refusals are plain 404s.

msgd's own files (the landing page, msgd.js, the status page) are a
:class:`WebFile` each.
"""

from __future__ import annotations

import importlib.resources
import os
from dataclasses import dataclass

from twisted.web import http, pages, resource, static
from twisted.web.util import Redirect

from msgd.options import boolean, duration, option


@dataclass(frozen=True, kw_only=True)
class AppStaticOptions:
    """``/apps/``: app packages' static files (switch ``apps_static``)"""

    apps_static: bool = option(True, parse=boolean, doc="serve app packages' static/ files at /apps/NAME/")
    apps_static_max_age: float = option(0.0, parse=duration,
                                        doc="Cache-Control max-age of /apps/ files (0: no-cache, revalidate)")


CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8", ".htm": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8", ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8", ".json": "application/json", ".map": "application/json",
    ".txt": "text/plain; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png",
    ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif", ".webp": "image/webp",
    ".ico": "image/x-icon", ".woff2": "font/woff2", ".woff": "font/woff", ".wasm": "application/wasm",
}


class StaticFile(static.File):
    """One file: twisted.web's File (Range, Last-Modified, 304) plus an ETag."""

    contentTypes = dict(static.File.contentTypes, **CONTENT_TYPES)
    defaultType = "application/octet-stream"

    def __init__(self, path: str, cache_control: bytes):
        super().__init__(path)
        self.cache_control = cache_control

    def render_GET(self, request):
        st = os.stat(self.path)
        etag = b'"%x-%x"' % (st.st_mtime_ns, st.st_size)
        request.setHeader(b"cache-control", self.cache_control)
        request.setHeader(b"x-content-type-options", b"nosniff")
        if request.setETag(etag) is http.CACHED:   # If-None-Match matched: 304 set, no body
            return b""
        return super().render_GET(request)


class AppStaticResource(resource.Resource):
    """``/apps``: resolves ``NAME/PATH`` against the app's static directory."""

    isLeaf = True

    def __init__(self, interface):
        super().__init__()
        self.apps = interface.services.apps
        age = int(interface.options.apps_static_max_age)
        self.cache_control = b"public, max-age=%d" % age if age else b"no-cache"

    def static_dir(self, name: str) -> str | None:
        m = self.apps.modules.get(name)
        if m is None:
            return None
        if m.static_dir:
            return m.static_dir
        if os.path.basename(m.path) == "__init__.py":   # static/ made after the code was loaded
            d = os.path.join(os.path.dirname(m.path), "static")
            return d if os.path.isdir(d) else None
        return None

    def render_GET(self, request):
        found = self.locate(request)
        if isinstance(found, resource.Resource):
            return found.render(request)
        return StaticFile(found, self.cache_control).render(request)

    render_HEAD = render_GET

    def locate(self, request):
        """The real path of the requested file, or a Resource to answer with."""
        path = request.postpath
        not_found = pages.notFound(message="no such file")
        if not path or not path[0]:
            return not_found
        try:
            name, *segments = [p.decode("utf-8") for p in path]
        except UnicodeDecodeError:
            return not_found
        base = self.static_dir(name)
        if base is None:
            return not_found
        if not segments:    # /apps/chat → /apps/chat/ so relative links in the page work
            return Redirect(request.uri.split(b"?")[0] + b"/")
        if segments[-1] == "":
            segments[-1] = "index.html"
        if any(s in ("", ".", "..") or s.startswith(".") or "\x00" in s or "/" in s or "\\" in s
               for s in segments):
            return not_found
        root = os.path.realpath(base)
        real = os.path.realpath(os.path.join(root, *segments))
        if not real.startswith(root + os.sep):
            return not_found
        if os.path.isdir(real):
            real = os.path.join(real, "index.html")
        if not os.path.isfile(real):
            return not_found
        return real


class Folder(resource.Resource):
    """Children by name, ``index`` at ``/`` and for the folder itself
    (when given), 404 for any other name."""

    def __init__(self, index: resource.Resource | None = None):
        super().__init__()
        self.index = index
        if index is not None:
            self.putChild(b"", index)

    def getChild(self, path, request):
        return pages.notFound()

    def render(self, request):
        return super().render(request) if self.index is None else self.index.render(request)


class WebFile(resource.Resource):
    """A file shipped in msgd/web, read once; its content type is its
    extension's (``CONTENT_TYPES``)."""

    isLeaf = True

    def __init__(self, name: str):
        super().__init__()
        self.body = importlib.resources.files("msgd.web").joinpath(name).read_bytes()
        self.content_type = CONTENT_TYPES[os.path.splitext(name)[1]].encode()

    def render_GET(self, request):
        if request.postpath not in ([], [b""]):
            return pages.notFound().render(request)
        request.setHeader(b"content-type", self.content_type)
        request.setHeader(b"cache-control", b"no-cache")
        return self.body
