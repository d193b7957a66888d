#!/usr/bin/env bash
# Self-signed CA and SuperLink server certificate for TLS (docker-compose.tls.yml, remote silos).
#
#   deploy/gen_certs.sh [-o DIR] [-f] [--san DNS:name|IP:addr]...
#
#   -o DIR     output folder (default: deploy/certs next to this script)
#   -f         overwrite existing files (a new CA invalidates the ca.crt every silo holds)
#   --san X    extra subjectAltName for the SuperLink, e.g. --san DNS:fl.example.org --san IP:10.0.0.5
#              (always included: DNS:superlink, DNS:localhost, IP:127.0.0.1, IP:::1)
#   env ADADPIGU_CERT_DAYS (default 365), ADADPIGU_CERT_BITS (RSA key size, default 4096)
#
# Writes ca.crt (give it to every silo and to the flwr CLI), ca.key (keep it offline),
# server.pem and server.key (for the SuperLink only).
set -euo pipefail

out="$(cd "$(dirname "$0")" && pwd)/certs"
force=0
sans="DNS:superlink,DNS:localhost,IP:127.0.0.1,IP:::1"
while [ $# -gt 0 ]; do
  case "$1" in
    -o) out="$2"; shift 2 ;;
    -f) force=1; shift ;;
    --san) sans="$sans,$2"; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "gen_certs.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
days="${ADADPIGU_CERT_DAYS:-365}"
bits="${ADADPIGU_CERT_BITS:-4096}"
command -v openssl >/dev/null || { echo "gen_certs.sh: openssl not found" >&2; exit 2; }

mkdir -p "$out"
if [ "$force" -ne 1 ] && [ -e "$out/ca.crt" ]; then
  echo "gen_certs.sh: $out/ca.crt exists; use -f to replace the CA and all certificates" >&2
  exit 1
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
umask 077

# Certificate authority
openssl genrsa -out "$tmp/ca.key" "$bits" 2>/dev/null
openssl req -x509 -new -key "$tmp/ca.key" -sha256 -days "$days" -subj "/CN=adadpigu-fl CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -out "$tmp/ca.crt"

# SuperLink server certificate, signed by the CA
openssl genrsa -out "$tmp/server.key" "$bits" 2>/dev/null
openssl req -new -key "$tmp/server.key" -subj "/CN=superlink" -out "$tmp/server.csr"
cat >"$tmp/server.ext" <<EXT
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$sans
EXT
openssl x509 -req -in "$tmp/server.csr" -CA "$tmp/ca.crt" -CAkey "$tmp/ca.key" -CAcreateserial \
  -days "$days" -sha256 -extfile "$tmp/server.ext" -out "$tmp/server.pem" 2>/dev/null
openssl verify -CAfile "$tmp/ca.crt" "$tmp/server.pem" >/dev/null

for f in ca.crt ca.key server.pem server.key; do
  mv -f "$tmp/$f" "$out/$f"
done
chmod 644 "$out/ca.crt" "$out/server.pem"
chmod 600 "$out/ca.key" "$out/server.key"
echo "gen_certs.sh: wrote $out/{ca.crt,ca.key,server.pem,server.key} (SAN: $sans; valid $days days)"
