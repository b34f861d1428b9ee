"""TLS helpers: a throwaway certificate authority for tests and examples,
the ``mtls:`` server endpoint (TLS that requires a client certificate signed
by given CAs) and the common name of a peer's certificate.

Plain TLS needs nothing from here: Twisted's ``ssl:`` endpoint strings
(``ssl:8443:privateKey=key.pem:certKey=cert.pem``) work on every listener.
``mtls:`` takes the same keys plus ``caCerts=ca.pem`` (a PEM file of the CAs
whose client certificates are accepted); the handshake fails for a client
without such a certificate::

    endpoint = mtls:8443:interface=0.0.0.0:privateKey=node.key:certKey=node.pem:caCerts=ca.pem

docs/examples/make-test-ca.sh does with openssl what :func:`make_ca` and
:func:`make_cert` do here.
"""

from __future__ import annotations

import datetime
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _write(path: str, data: bytes, private: bool = False) -> None:
    with open(path, "wb") as f:
        f.write(data)
    if private:
        os.chmod(path, 0o600)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(directory: str, name: str = "ca", cn: str = "msgd test CA") -> dict:
    """A self-signed CA: ``NAME.pem`` and ``NAME.key`` in ``directory``."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .sign(key, hashes.SHA256()))
    paths = {"cert": os.path.join(directory, f"{name}.pem"), "key": os.path.join(directory, f"{name}.key")}
    _write(paths["cert"], cert.public_bytes(serialization.Encoding.PEM))
    _write(paths["key"], _key_pem(key), private=True)
    return dict(paths, certificate=cert, private_key=key)


def make_cert(ca: dict, directory: str, name: str, cn: str, hosts=("127.0.0.1", "localhost")) -> dict:
    """A certificate for ``cn`` signed by ``ca`` (from :func:`make_ca`),
    usable by a server (for ``hosts``) and as a client certificate:
    ``NAME.pem``, ``NAME.key``."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    alt: list[x509.GeneralName] = []
    for h in hosts:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            alt.append(x509.DNSName(h))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca["certificate"].subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            # key identifiers: Python 3.13's default TLS context (VERIFY_X509_STRICT) requires them
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca["private_key"].public_key()),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca["private_key"], hashes.SHA256()))
    paths = {"cert": os.path.join(directory, f"{name}.pem"), "key": os.path.join(directory, f"{name}.key")}
    _write(paths["cert"], cert.public_bytes(serialization.Encoding.PEM))
    _write(paths["key"], _key_pem(key), private=True)
    return paths


def load_certificates(path: str) -> list:
    """Every certificate of a PEM file (a CA bundle may hold several), as
    ``twisted.internet.ssl.Certificate``; read once, so a missing file stops
    start-up rather than the first connection."""
    from twisted.internet import ssl
    with open(path, "rb") as f:
        data = f.read()
    certs = [ssl.Certificate.loadPEM(p + b"-----END CERTIFICATE-----\n")
             for p in data.split(b"-----END CERTIFICATE-----") if b"BEGIN CERTIFICATE" in p]
    if not certs:
        raise ValueError(f"{path}: no PEM certificate in it")
    return certs


def trust_root(ca_file: str | None):
    """What client TLS verifies servers against: the CAs of ``ca_file``, or
    None (the system's roots)."""
    from twisted.internet import ssl
    return ssl.trustRootFromCertificates(load_certificates(ca_file)) if ca_file else None


def client_tls(hostname: str, trust=None, verify: bool = True):
    """Client TLS options for a connection to ``hostname``: its certificate
    must match the name and chain to ``trust`` (see :func:`trust_root`);
    with ``verify`` off, any certificate is taken (tests, private networks)."""
    from twisted.internet import ssl
    if not verify:
        return ssl.CertificateOptions()
    return ssl.optionsForClientTLS(hostname, trustRoot=trust)


def mtls_endpoint(reactor, port, privateKey, certKey=None, caCerts=None, interface="", backlog=50):
    """The ``mtls:`` endpoint (see the module docstring)."""
    from twisted.internet import ssl
    from twisted.internet.endpoints import SSL4ServerEndpoint
    if not caCerts:
        raise ValueError("mtls: needs caCerts=FILE (PEM of the CAs whose client certificates are accepted)")
    with open(certKey or privateKey, "rb") as f:
        cert_pem = f.read()
    with open(privateKey, "rb") as f:
        key_pem = f.read()
    cas = load_certificates(caCerts)
    me = ssl.PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)
    options = ssl.CertificateOptions(privateKey=me.privateKey.original, certificate=me.original, verify=True,
                                     caCerts=[c.original for c in cas], requireCertificate=True)
    return SSL4ServerEndpoint(reactor, int(port), options, int(backlog), interface)


def peer_common_name(transport) -> str | None:
    """CN of the verified certificate the other side of a TLS ``transport``
    presented, or None (no TLS, no certificate)."""
    get = getattr(transport, "getPeerCertificate", None)
    cert = get() if get is not None else None
    if cert is None:
        return None
    names = cert.to_cryptography().subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        return None
    value = names[0].value
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
