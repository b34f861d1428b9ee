"""STOMP 1.0/1.1/1.2 interfaces: the server session shared by the TCP
listener and the WebSocket subprotocols (:mod:`.session`, :mod:`.listener`)
and the broker consumer (:mod:`.consumer`).  The codec and the client
connection they share with the STOMP adapter are in :mod:`msgd.stomp`.
See docs/stomp.rst."""
