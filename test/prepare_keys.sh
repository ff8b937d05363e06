#!/bin/bash
# Make the key files and server settings the pg_regress and isolation suites use:
#   DIR/master.key      the local provider's master key (0600)
#   DIR/other.key       another valid master key (0600), for "wrong master key" tests
#   DIR/open.key        a valid key with mode 0644, which must be refused
#   DIR/short.key       16 bytes, which must be refused
#   DIR/regress.conf    the --temp-config: preload and key file
set -euo pipefail
DIR="$1"
mkdir -p "$DIR"
umask 077
[ -f "$DIR/master.key" ] || openssl rand -hex 32 > "$DIR/master.key"
[ -f "$DIR/other.key" ] || openssl rand 32 > "$DIR/other.key"
openssl rand -hex 32 > "$DIR/open.key"; chmod 0644 "$DIR/open.key"
openssl rand 16 > "$DIR/short.key"
cat > "$DIR/regress.conf" <<CONF
shared_preload_libraries = 'pg_envelope'
envelope.local_master_key_file = '$DIR/master.key'
max_prepared_transactions = 4
CONF
