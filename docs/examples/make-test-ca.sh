#!/bin/sh
# A throwaway certificate authority and certificates for trying TLS with msgd
# (HTTPS, WSS, STOMP+TLS, PB+TLS, mutual TLS between nodes).  NOT for
# production.  msgd.security.tls.make_ca()/make_cert() do the same in Python.
#
#   docs/examples/make-test-ca.sh DIR [NAME...]
#
# DIR/ca.pem, DIR/ca.key: the CA; for each NAME (default: node-a node-b):
# DIR/NAME.pem, DIR/NAME.key, a certificate with CN=NAME valid for
# 127.0.0.1 and localhost, usable by a server and as a client certificate.
#
#   endpoint = ssl:8443:interface=127.0.0.1:privateKey=DIR/node-a.key:certKey=DIR/node-a.pem
#   endpoint = mtls:8443:interface=127.0.0.1:privateKey=DIR/node-a.key:certKey=DIR/node-a.pem:caCerts=DIR/ca.pem
set -eu
dir=${1:?usage: make-test-ca.sh DIR [NAME...]}
shift
[ $# -gt 0 ] || set -- node-a node-b
mkdir -p "$dir"
umask 077
openssl ecparam -name prime256v1 -genkey -noout -out "$dir/ca.key"
openssl req -x509 -new -key "$dir/ca.key" -sha256 -days 30 -subj "/CN=msgd test CA" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" -out "$dir/ca.pem"
for name in "$@"; do
    openssl ecparam -name prime256v1 -genkey -noout -out "$dir/$name.key"
    openssl req -new -key "$dir/$name.key" -subj "/CN=$name" -out "$dir/$name.csr"
    printf '%s\n' "basicConstraints=critical,CA:FALSE" \
        "subjectAltName=IP:127.0.0.1,DNS:localhost" \
        "extendedKeyUsage=serverAuth,clientAuth" > "$dir/$name.ext"
    openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial \
        -days 30 -sha256 -extfile "$dir/$name.ext" -out "$dir/$name.pem"
    rm -f "$dir/$name.csr" "$dir/$name.ext"
done
rm -f "$dir/ca.srl"
chmod 644 "$dir"/*.pem
echo "made $dir/ca.pem and: $*"
