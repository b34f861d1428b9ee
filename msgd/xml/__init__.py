"""The XML msgd reads from clients and writes to them, without a transport:
the hardened parser every body goes through (:mod:`.safe`), XML-RPC values
(:mod:`.xmlrpc`) and an app module seen as a SOAP service, its WSDL and
values (:mod:`.soap`).  The HTTP mounts ``/RPC2`` and ``/soap/``
(``msgd.interfaces.xmlrpc``, ``msgd.interfaces.soap``) use them; like the
core, nothing here imports an interface."""
