#!/usr/bin/env bash
# Key pairs for Flower's SuperNode authentication (make_compose.py --tls --auth).
#
#   deploy/gen_supernode_keys.sh N [-o DIR] [-f]
#
#   N          number of SuperNodes: writes supernode-1 .. supernode-N (private keys, OpenSSH
#              format, ECDSA P-384) and supernode-i.pub (the public keys to register)
#   -o DIR     output folder (default: deploy/keys next to this script, git-ignored)
#   -f         overwrite existing keys (a new key is a new node: register it again)
#
# Register each public key with the SuperLink (started with --enable-supernode-auth) before
# its SuperNode starts:  flwr supernode register deploy/keys/supernode-1.pub <connection>
# Each private key stays with its silo; the SuperLink needs only the .pub files' contents.
set -euo pipefail

out="$(cd "$(dirname "$0")" && pwd)/keys"
force=0
n=""
while [ $# -gt 0 ]; do
  case "$1" in
    -o) out="$2"; shift 2 ;;
    -f) force=1; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    [0-9]*) n="$1"; shift ;;
    *) echo "gen_supernode_keys.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[ -n "$n" ] && [ "$n" -ge 1 ] || { echo "gen_supernode_keys.sh: give the number of SuperNodes (see --help)" >&2; exit 2; }
command -v ssh-keygen >/dev/null || { echo "gen_supernode_keys.sh: ssh-keygen not found (openssh-client)" >&2; exit 2; }
mkdir -p "$out"
for i in $(seq 1 "$n"); do
  key="$out/supernode-$i"
  if [ -e "$key" ] && [ "$force" -ne 1 ]; then
    echo "gen_supernode_keys.sh: $key exists; use -f to replace it (and register the new key)" >&2
    exit 1
  fi
  rm -f "$key" "$key.pub"
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "adadpigu-supernode-$i" -f "$key"
done
echo "gen_supernode_keys.sh: wrote $out/supernode-{1..$n}{,.pub}"
