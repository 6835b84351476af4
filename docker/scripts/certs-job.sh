#!/bin/sh
# One-shot certificate job: create (or reuse) the federation's CA and the SuperLink's server certificate
# in /pki, then hand out only what each side needs:
#   /certs  ca.crt, server.pem, server.key   (the SuperLink's TLS files; mounted read-only there)
#   /ca     ca.crt                           (SuperNodes and `flwr` clients; optional mount)
# The CA key never leaves /pki. SANs: FEDTUNE_CERT_SANS (comma-separated), e.g.
# "superlink,localhost,127.0.0.1,superlink.example.org". A valid certificate covering them is reused,
# so restarts keep the CA that SuperNodes already trust.
set -eu
PKI=${FEDTUNE_PKI_DIR:-/pki}
fedtune-certs --out "$PKI"
umask 077
cp "$PKI/server.key" /certs/server.key.tmp && mv /certs/server.key.tmp /certs/server.key
umask 022
for f in ca.crt server.pem; do cp "$PKI/$f" "/certs/$f.tmp" && mv "/certs/$f.tmp" "/certs/$f"; done
if [ -d /ca ] && [ -w /ca ]; then
  cp "$PKI/ca.crt" /ca/ca.crt.tmp && mv /ca/ca.crt.tmp /ca/ca.crt
fi
echo "certs-job: /certs and /ca ready"
