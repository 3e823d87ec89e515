#!/usr/bin/env bash
# Makes a throwaway certificate authority and, signed by it, a server certificate for localhost
# and 127.0.0.1 and a client certificate (for mTLS), to try TLS locally and for the end-to-end
# tests. Not for production: the keys are unencrypted and the CA is not protected.
#
#   scripts/make_test_certs.sh DIR [NAME]
#
# writes DIR/ca.pem, ca.key, server.pem, server.key, client.pem, client.key (EC P-256, valid for
# 30 days). NAME (default anchorserve) goes into the common names, so two runs with different
# names make two unrelated CAs.
set -euo pipefail
dir=${1:?usage: make_test_certs.sh DIR [NAME]}
name=${2:-anchorserve}
mkdir -p "$dir"
cd "$dir"
umask 077
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

key ca.key
openssl req -x509 -new -key ca.key -out ca.pem -days 30 -subj "/CN=$name test CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"

sign() {  # sign NAME CN EXTENSIONS
  key "$1.key"
  openssl req -new -key "$1.key" -out "$1.csr" -subj "/CN=$2"
  printf '%s\n' "$3" >"$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -set_serial "0x$(openssl rand -hex 8)" \
    -days 30 -out "$1.pem" -extfile "$1.ext" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}
sign server "$name server" "subjectAltName=DNS:localhost,IP:127.0.0.1
extendedKeyUsage=serverAuth"
sign client "$name client" "extendedKeyUsage=clientAuth"
chmod 644 ca.pem server.pem client.pem
echo "make_test_certs: wrote $(pwd)/{ca,server,client}.{pem,key}"
