#!/bin/bash
# Fleet procedures benchmark: envelope.reencrypt_all against one plain UPDATE of the
# same rows, measured in the same run on the same cluster.
#
#   bash test/bench/fleet.sh
#
# Starts its own preloaded cluster (local provider), loads BENCH_FLEET_ROWS rows of
# ~32-byte values across 1,000 tenants into two identical tables, and for each of
# BENCH_FLEET_RUNS rounds:
#   - rotates every tenant (envelope.rotate_keys, timed: tenants/s) and runs
#     CALL envelope.reencrypt_all(10000) on table a (registered), timed;
#   - runs one UPDATE b SET c = c (the same rows, one statement, no crypto), timed;
#   - (diagnostic) runs one UPDATE c SET c = encrypt(decrypt(c)) of the rows not under
#     the active version (table c rotated with a): the same crypto as reencrypt_all in
#     one statement, so that the engine's own cost shows.
# Each table is VACUUMed and CHECKPOINTed before its timed step.  Prints the median
# rate of each and the ratio; the target is reencrypt_all >= 50 % of the UPDATE's rows/s.
# Figures are reported, never asserted; test/bench/RESULTS.md keeps the latest.
#
# Knobs: BENCH_FLEET_ROWS=200000, BENCH_FLEET_RUNS=3, BENCH_PORT=54341.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
ROWS="${BENCH_FLEET_ROWS:-200000}"
RUNS="${BENCH_FLEET_RUNS:-3}"
PORT="${BENCH_PORT:-54341}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

make -C "$ROOT" -s -j2 >/dev/null
$SUDO make -C "$ROOT" -s install >/dev/null
PG_BINDIR="$(pg_config --bindir)"

DIR="$(mktemp -d /tmp/pg_envelope_fleet_bench.XXXXXX)"
chmod 755 "$DIR"
if [ "$(id -u)" -eq 0 ]; then chown postgres: "$DIR"; AS_PG=(runuser -u postgres --); else AS_PG=(); fi
pg() { "${AS_PG[@]}" env PATH="$PG_BINDIR:$PATH" "$@"; }
stop() { pg pg_ctl -D "$DIR/data" -m fast stop >/dev/null 2>&1 || true; rm -rf "$DIR"; }
trap stop EXIT
ms_now() { echo $(( $(date +%s%N) / 1000000 )); }

pg sh -c "umask 077; openssl rand -hex 32 > '$DIR/master.key'"
pg initdb -D "$DIR/data" -A trust >/dev/null
cat >> "$DIR/data/postgresql.conf" <<CONF
port = $PORT
listen_addresses = ''
unix_socket_directories = '$DIR'
shared_preload_libraries = 'pg_envelope'
envelope.local_master_key_file = '$DIR/master.key'
shared_buffers = 256MB
# two DEK versions per tenant are in use while values move: room for both
envelope.cache_size = 4096
max_wal_size = 4GB
checkpoint_timeout = 30min
autovacuum = off
CONF
pg pg_ctl -D "$DIR/data" -l "$DIR/log" -w start >/dev/null
q() { pg psql -X -q -At -h "$DIR" -p "$PORT" -d postgres -v ON_ERROR_STOP=1 -c "$1"; }

q "CREATE EXTENSION pg_envelope"
q "SELECT count(envelope.create_tenant('tenant' || i)) FROM generate_series(1, 1000) i" >/dev/null
for t in a b c; do
    q "CREATE TABLE fleet_$t (id integer, tenant text, c bytea)"
done
q "INSERT INTO fleet_a SELECT i, 'tenant' || (i % 1000 + 1),
          envelope.encrypt('tenant' || (i % 1000 + 1), md5(i::text)) FROM generate_series(1, $ROWS) i"
q "INSERT INTO fleet_b SELECT * FROM fleet_a"
q "INSERT INTO fleet_c SELECT * FROM fleet_a"
q "SELECT envelope.register_column('fleet_a', 'c', 'tenant')"

median() { sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
: > "$DIR/reenc_ms"; : > "$DIR/update_ms"; : > "$DIR/rotate_ms"; : > "$DIR/crypto_ms"
for run in $(seq 1 "$RUNS"); do
    t0=$(ms_now)
    q "CALL envelope.rotate_keys(older_than => '0')" 2>/dev/null
    echo $(( $(ms_now) - t0 )) >> "$DIR/rotate_ms"

    q "VACUUM ANALYZE fleet_a"; q "CHECKPOINT"
    t0=$(ms_now)
    q "CALL envelope.reencrypt_all(10000)" 2>/dev/null
    echo $(( $(ms_now) - t0 )) >> "$DIR/reenc_ms"
    left="$(q "SELECT count(*) FROM fleet_a WHERE envelope.key_version(c) <> envelope.active_key_version(tenant)")"
    [ "$left" = 0 ] || { echo "reencrypt_all left $left values behind" >&2; exit 1; }

    q "VACUUM ANALYZE fleet_b"; q "CHECKPOINT"
    t0=$(ms_now)
    q "UPDATE fleet_b SET c = c"
    echo $(( $(ms_now) - t0 )) >> "$DIR/update_ms"
    q "VACUUM ANALYZE fleet_c"; q "CHECKPOINT"
    t0=$(ms_now)
    q "UPDATE fleet_c SET c = envelope.encrypt(tenant, envelope.decrypt(tenant, c, NULL), NULL)
        WHERE envelope.needs_reencryption(c, tenant)"
    echo $(( $(ms_now) - t0 )) >> "$DIR/crypto_ms"
    echo "run $run: rotate_keys $(tail -n1 "$DIR/rotate_ms") ms, reencrypt_all $(tail -n1 "$DIR/reenc_ms") ms, UPDATE $(tail -n1 "$DIR/update_ms") ms, one re-encrypting UPDATE $(tail -n1 "$DIR/crypto_ms") ms"
done

REENC_MS="$(median < "$DIR/reenc_ms")"
UPDATE_MS="$(median < "$DIR/update_ms")"
ROTATE_MS="$(median < "$DIR/rotate_ms")"
CRYPTO_MS="$(median < "$DIR/crypto_ms")"
awk -v rows="$ROWS" -v r="$REENC_MS" -v u="$UPDATE_MS" -v rot="$ROTATE_MS" -v c="$CRYPTO_MS" 'BEGIN {
    rr = rows / (r / 1000); ur = rows / (u / 1000);
    printf "reencrypt_all: %d rows in %d ms = %.0f rows/s (median of runs)\n", rows, r, rr;
    printf "UPDATE ... SET c = c: %d rows in %d ms = %.0f rows/s\n", rows, u, ur;
    printf "reencrypt_all / UPDATE = %.1f %% (target >= 50 %%)\n", 100 * rr / ur;
    printf "rotate_keys: 1000 tenants in %d ms = %.0f tenants/s\n", rot, 1000 / (rot / 1000);
    printf "(diagnostic) one UPDATE re-encrypting the same rows: %d ms = %.0f rows/s = %.1f %% of the plain UPDATE; reencrypt_all = %.1f %% of it\n", c, rows / (c / 1000), 100 * u / c, 100 * c / r;
}'
