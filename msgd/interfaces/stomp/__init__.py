"""STOMP 1.0/1.1/1.2: a transport-free codec (:mod:`.codec`), the server
session shared by the TCP listener and the WebSocket subprotocols
(:mod:`.session`, :mod:`.listener`), and a client connection (:mod:`.client`)
shared by the broker consumer (:mod:`.consumer`) and the STOMP adapter
(:mod:`msgd.adapters.stomp`).  See docs/stomp.rst."""
