"""The ``mtls:`` server endpoint string: TLS requiring a client certificate
signed by ``caCerts`` (see msgd/security/tls.py)."""

from twisted.internet.interfaces import IStreamServerEndpointStringParser
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IPlugin, IStreamServerEndpointStringParser)
class MutualTLSParser:
    prefix = "mtls"

    def parseStreamServer(self, reactor, *args, **kwargs):
        from msgd.security.tls import mtls_endpoint
        return mtls_endpoint(reactor, *args, **kwargs)


mtls = MutualTLSParser()
