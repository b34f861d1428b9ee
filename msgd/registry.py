"""Which class implements each ``type=`` of ``[interface:…]`` and
``[adapter:…]`` sections.  Classes are imported only when a config uses them,
so a node that needs no LDAP never imports ldap3.

Each class has an ``Options`` frozen dataclass declaring its keys with
:func:`msgd.config.option`, and is built as ``cls(name, options, services)``
(``services``: the node's :class:`msgd.services.Services`).
"""

import importlib

INTERFACES = {
    "http": "msgd.interfaces.http:HTTPInterface",
    "dirwatch": "msgd.interfaces.dirwatch:DirWatch",
    "pop3": "msgd.interfaces.pop3:POP3Poller",
    "stomp": "msgd.interfaces.stomp.listener:StompInterface",
    "stomp-consumer": "msgd.interfaces.stomp.consumer:StompConsumer",
    "pb": "msgd.interfaces.pb:PBInterface",
    "jsonrpc-stream": "msgd.interfaces.stream:StreamInterface",
    "schedule": "msgd.interfaces.schedule:Schedule",
}

ADAPTERS: dict = {
    "redis": "msgd.adapters.redis:RedisAdapter",
    "ldap": "msgd.adapters.ldap:LDAPAdapter",
    "sql": "msgd.adapters.sql:SQLAdapter",
    "smtp": "msgd.adapters.smtp:SMTPAdapter",
    "http": "msgd.adapters.http:HTTPAdapter",
    "stomp": "msgd.adapters.stomp:StompAdapter",
}


def load(table: dict, typ: str):
    modname, _, attr = table[typ].partition(":")
    return getattr(importlib.import_module(modname), attr)
