"""One JSON-RPC client, without a transport.

WebSocket (``/ws``), the plain stream (``type = jsonrpc-stream``) and
long-poll (``/poll``, ``/sse?session=``) are byte adapters around a
:class:`Connection`: they turn what arrives into :meth:`Connection.answer`
calls and write what it gives back (answers through ``reply``, events
through the ``deliver`` the adapter passed in).  The connection owns the
rest, written once:

- the **principal** (from the adapter's handshake, or ``rpc.login``);
- the pub/sub :class:`~msgd.core.pubsub.Session` (subscriptions end with the
  connection; channel access is the Session's, so the node's ``[access:*]``
  rules decide it in one place: :meth:`msgd.security.Access.authorize_channel`);
- the ``rpc.*`` builtins, in one table (:data:`BUILTINS`): a new ``rpc.*``
  method goes there;
- request creation (the interface's name and deadline, the principal) and
  answering (:class:`msgd.core.jsonrpc.JSONRPC`).

What the connections of one interface share (the JSONRPC decoder, the
guard, the bounds) is a :class:`Clients`, built once per interface.  JSON-RPC
over plain HTTP (``/rpc``) has no connection: it gets the methods of the same
table that need none (:meth:`Clients.stateless`).
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from msgd.core import errors
from msgd.core.jsonrpc import JSONRPC, dumps, param
from msgd.core.pubsub import Session

log = Logger()

CONNECTED = ("rpc.subscribe", "rpc.unsubscribe", "rpc.publish", "rpc.presence")
STATELESS = ("rpc.publish", "rpc.presence", "rpc.token")     # what JSON-RPC over plain HTTP offers


def closing(reason: str) -> bytes:
    """The last message of a JSON-RPC client the node ends (plain stream,
    SSE): an ``rpc.closing`` notification saying why."""
    return dumps({"jsonrpc": "2.0", "method": "rpc.closing", "params": {"reason": reason}})


class Clients:
    """The JSON-RPC clients of one interface: what their connections share.
    ``methods`` are the ``rpc.*`` builtins they offer, names of
    :data:`BUILTINS`; ``broker`` and ``authorize`` (the channel check) are
    the node's pub/sub and access rules unless a special socket (the status
    page's) gives its own; so are the ``dispatcher`` of app functions and
    the builtins; ``extra`` adds builtins of its own (name -> function of
    connection, request, params)."""

    def __init__(self, interface, max_batch: int, max_subscriptions: int, methods=CONNECTED, *,
                 dispatcher=None, broker=None, authorize=None, extra: dict | None = None):
        self.interface = interface
        s = interface.services
        self.guard = getattr(interface, "guard", None)
        self.jsonrpc = JSONRPC(dispatcher if dispatcher is not None else s.dispatcher, max_batch=max_batch)
        self.max_subscriptions = max_subscriptions
        self.broker = broker if broker is not None else s.pubsub
        self.authorize = authorize if authorize is not None else s.access.authorize_channel
        self.table = {m: BUILTINS[m] for m in methods}    # method -> function(connection, request, params)
        self.table.update(extra or {})

    def connect(self, deliver: Callable, principal=None, address: str = "") -> Connection:
        """A new client; ``deliver(event)`` writes a pub/sub event to it."""
        return Connection(self, deliver, principal, address)

    def stateless(self) -> dict:
        """The builtins of a client without a connection (HTTP ``/rpc``),
        bound to a connection that never subscribes."""
        c = Connection(self, None)
        return {m: c.get(m) for m in self.table if self.broker is not None or m == "rpc.token"}


class Connection:
    """See the module's docstring.  Slots only: an idle WebSocket carries one."""

    __slots__ = ("address", "clients", "deliver", "principal", "session")

    def __init__(self, clients: Clients, deliver, principal=None, address: str = ""):
        self.clients = clients
        self.principal = principal
        self.deliver = deliver          # the broker calls subscriber.deliver(event): the adapter's, directly
        self.address = address          # the client's (behind trusted proxies, the real one): rpc.login's throttle
        self.session = Session(clients.broker, self, max_subscriptions=clients.max_subscriptions,
                               authorize=clients.authorize)

    # -- requests ----------------------------------------------------------------------

    def new_request(self):
        return self.clients.interface.new_request(self.principal)

    def answer(self, payload: bytes, reply: Callable[[bytes], object]) -> None:
        """Answer one JSON-RPC message (call, notification, batch):
        ``reply(bytes)`` gets the answer, at once or when it is ready (not
        called for notifications)."""
        answer = self.clients.jsonrpc.answer(payload, self.new_request, self)
        if isinstance(answer, Deferred):
            answer.addCallback(lambda data: reply(data) if data is not None else None)
            answer.addErrback(lambda f: log.failure("JSON-RPC message failed on {interface}", f,
                                                    interface=self.clients.interface.name))
        elif answer is not None:
            reply(answer)

    def get(self, method: str, default=None):
        """The builtins table (:class:`msgd.core.jsonrpc.JSONRPC` looks
        methods up here), without a per-connection dict."""
        fn = self.clients.table.get(method)
        return fn.__get__(self) if fn is not None else default

    def close(self) -> None:
        """The client is gone: its subscriptions end."""
        self.session.close()

    # -- the rpc.* builtins --------------------------------------------------------------

    def rpc_subscribe(self, request, params):
        return self.session.rpc_subscribe(request, params)

    def rpc_unsubscribe(self, request, params):
        return self.session.rpc_unsubscribe(request, params)

    def rpc_publish(self, request, params):
        return self.session.rpc_publish(request, params)

    def rpc_presence(self, request, params):
        return self.session.rpc_presence(request, params)

    def rpc_login(self, request, params):
        """``{"user", "password"}`` or ``{"token"}``: the principal for the
        rest of the connection."""
        token = param(params, "token", 0, str, required=False) if isinstance(params, dict) else None
        if token is None:
            user = param(params, "user", 0, str)
            password = param(params, "password", 1, str)
        else:
            user, password = "", token        # the guard takes a token in place of a password
        return self.clients.guard.login(user, password, self.address).addCallback(self._logged_in)

    def _logged_in(self, principal):
        self.principal = principal
        return {"name": principal.name, "roles": sorted(principal.roles), "via": principal.via}

    def rpc_token(self, request, params):
        p = request.principal
        if p is None or getattr(p, "via", "") == "token":
            self.clients.guard.denied("token_request", p, "", "rpc.token needs a password login")
            raise errors.Unauthorized("log in with a password to get a token")
        return self.clients.guard.issue_token(p.name, p.roles)


# The rpc.* builtins: a new one is a Connection method and a line here.
BUILTINS = {
    "rpc.subscribe": Connection.rpc_subscribe,
    "rpc.unsubscribe": Connection.rpc_unsubscribe,
    "rpc.publish": Connection.rpc_publish,
    "rpc.presence": Connection.rpc_presence,
    "rpc.login": Connection.rpc_login,      # where the transport has no handshake (the plain stream)
    "rpc.token": Connection.rpc_token,      # HTTP: a token for a principal that logged in with a password
}
