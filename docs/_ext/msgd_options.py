"""``.. msgd-options::`` renders the keys of every section's option
dataclass as tables (:func:`msgd.config.describe`: key, default and the
``doc=`` of its ``option()``), so the generated key reference cannot drift
from the code: [node], [pubsub], [channel:NAME], [peer:NAME],
[access:NAME], the listeners' security keys, and each interface and adapter
type in msgd.registry.

Every key is shown once: a listener's table leaves out the security keys
(their own table), and a section assembled from parts that declare no key of
its own (``type = http``: the Site and each mount) gets a table per part,
titled by the first line of the part's docstring."""

from __future__ import annotations


def _default(value, parse) -> str:
    """A default as it would be written in node.ini."""
    from msgd import config
    if value == "(required)":
        return "(required)"
    if value is None or value == "" or value == ():
        return "(none)"
    if isinstance(value, bool):
        return "``yes``" if value else "``no``"
    if parse in (config.duration, config.optional_duration):
        value = f"{value:g}s"
    elif parse is config.size and value and value % 1024 == 0:
        value = f"{value // 1048576}MiB" if value % 1048576 == 0 else f"{value // 1024}KiB"
    elif isinstance(value, (tuple, list, frozenset)):
        value = " ".join(str(v) for v in value)
    return f"``{value}``"


def _text(doc: str) -> str:
    """A plain-text ``doc=`` as reST: its markup characters escaped."""
    for ch in ("\\", "*", "`", "|", "_"):
        doc = doc.replace(ch, "\\" + ch)
    return doc


def _table(cls, skip=frozenset()) -> list[str]:
    import dataclasses

    from msgd.config import NodeConfig, describe
    parsers = {f.name: f.metadata.get("parse") for f in dataclasses.fields(cls)}
    lines = [".. list-table::", "   :header-rows: 1", "   :widths: 22 18 60", "",
             "   * - key", "     - default", "     - meaning"]
    for key, default, doc in describe(cls):
        if key in skip:
            continue
        shown = "(host name)" if cls is NodeConfig and key == "name" else _default(default, parsers[key])
        lines += [f"   * - ``{key}``", f"     - {shown}", f"     - {_text(doc)}"]
    return lines


def sections():
    """(title, class) of every section kind, in the order of docs/configuration.rst."""
    from msgd import config, registry
    from msgd.security import SecurityOptions
    from msgd.config import AccessConfig
    out = [("[node]", config.NodeConfig), ("[pubsub]", config.PubSubConfig),
           ("[channel:NAME]", config.ChannelConfig), ("[peer:NAME]", config.PeerConfig),
           ("[access:NAME]", AccessConfig), ("Security keys of listeners", SecurityOptions)]
    for kind, table in (("interface", registry.INTERFACES), ("adapter", registry.ADAPTERS)):
        for typ in table:
            out.append((f"[{kind}:NAME] type = {typ}", registry.load(table, typ).Options))
    return out


def parts(title: str, cls) -> list[tuple[str, object, frozenset]]:
    """(title, class, keys to leave out) of the tables of one section."""
    import dataclasses

    from msgd.security import SecurityOptions
    if cls is SecurityOptions or not issubclass(cls, SecurityOptions):
        return [(title, cls, frozenset())]
    security = frozenset(f.name for f in dataclasses.fields(SecurityOptions))
    if vars(cls).get("__annotations__"):
        return [(title + " (and the security keys of listeners)", cls, security)]
    own = [c for c in reversed(cls.__mro__[1:]) if vars(c).get("__annotations__") and c is not SecurityOptions]
    return [(f"{title}: {(c.__doc__ or c.__name__).splitlines()[0]}" + (" (and the security keys of listeners)"
                                                                         if c is own[0] else ""), c, frozenset())
            for c in own]


def lines() -> list[str]:
    """The reference as reST: a rubric and a table per part of each section."""
    out: list[str] = []
    for section, whole in sections():
        for title, cls, skip in parts(section, whole):
            out += [".. rubric:: " + title, ""] + _table(cls, skip) + [""]
    return out


def setup(app):
    # docutils only here: the tests read parts() and lines() without the docs' packages
    from docutils import nodes
    from docutils.parsers.rst import Directive
    from docutils.statemachine import StringList

    class OptionsDirective(Directive):
        def run(self):
            container = nodes.container()
            self.state.nested_parse(StringList(lines(), source="msgd-options"), self.content_offset, container)
            return list(container.children)

    app.add_directive("msgd-options", OptionsDirective)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
