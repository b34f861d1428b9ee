"""STOMP 1.0/1.1/1.2 on the wire, shared by both sides: a transport-free
codec (:mod:`msgd.stomp.codec`) used by the server session
(``msgd.interfaces.stomp.session``) and the client, and a client
connection to a broker (:mod:`msgd.stomp.client`) used by the broker
consumer (``msgd.interfaces.stomp.consumer``) and the STOMP adapter
(``msgd.adapters.stomp``).  It imports neither interfaces nor adapters,
so both may import it.  See docs/stomp.rst."""
