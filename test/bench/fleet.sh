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
# On a shared machine the wall times of one step vary by up to 2x from round to round,
# so the ratio of record is the median of the rounds' own ratios (reencrypt_all and
# UPDATE measured back to back), and the CPU time of each step's backend (utime +
# stime from /proc/self/stat, 10 ms ticks), which other processes' load hardly moves,
# is reported beside it.
# Figures are reported, never asserted; test/bench/RESULTS.md keeps the latest.
#
# Row order: by default row i belongs to tenant i mod 1,000, so every row switches
# tenant (the worst case for the key cache: each row needs another tenant's two keys).
# BENCH_FLEET_LAYOUT=clustered stores each tenant's rows together instead, as a table
# clustered on its tenant column (or loaded tenant by tenant) has them.
#
# Knobs: BENCH_FLEET_ROWS=200000, BENCH_FLEET_RUNS=5, BENCH_PORT=54341,
# BENCH_FLEET_LAYOUT=interleaved|clustered.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
ROWS="${BENCH_FLEET_ROWS:-200000}"
RUNS="${BENCH_FLEET_RUNS:-5}"
PORT="${BENCH_PORT:-54341}"
LAYOUT="${BENCH_FLEET_LAYOUT:-interleaved}"
case "$LAYOUT" in
    interleaved) ORDER="i" ;;
    clustered) ORDER="i % 1000, i" ;;
    *) echo "BENCH_FLEET_LAYOUT must be interleaved or clustered, not $LAYOUT" >&2; exit 1 ;;
esac
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
# Run $1 in a session of its own; prints "wall_ms cpu_ms" (the backend's CPU time).
CPU_SQL="SELECT 10 * (split_part(s, ' ', 14)::bigint + split_part(s, ' ', 15)::bigint) FROM pg_read_file('/proc/self/stat') s"
timed() {
    local t0 out
    t0=$(ms_now)
    out="$(pg psql -X -q -At -h "$DIR" -p "$PORT" -d postgres -v ON_ERROR_STOP=1 \
           -c "$CPU_SQL" -c "SET client_min_messages = warning" -c "$1" -c "$CPU_SQL")"
    echo "$(( $(ms_now) - t0 )) $(( $(echo "$out" | tail -n1) - $(echo "$out" | head -n1) ))"
}

q "CREATE EXTENSION pg_envelope"
q "SELECT count(envelope.create_tenant('tenant' || i)) FROM generate_series(1, 1000) i" >/dev/null
for t in a b c; do
    q "CREATE TABLE fleet_$t (id integer, tenant text, c bytea)"
done
q "INSERT INTO fleet_a SELECT i, 'tenant' || (i % 1000 + 1),
          envelope.encrypt('tenant' || (i % 1000 + 1), md5(i::text)) FROM generate_series(1, $ROWS) i
          ORDER BY $ORDER"
q "INSERT INTO fleet_b SELECT * FROM fleet_a"
q "INSERT INTO fleet_c SELECT * FROM fleet_a"
q "SELECT envelope.register_column('fleet_a', 'c', 'tenant')"

median() { sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
: > "$DIR/reenc"; : > "$DIR/update"; : > "$DIR/rotate_ms"; : > "$DIR/crypto"; : > "$DIR/ratio"
for run in $(seq 1 "$RUNS"); do
    t0=$(ms_now)
    q "CALL envelope.rotate_keys(older_than => '0')" 2>/dev/null
    echo $(( $(ms_now) - t0 )) >> "$DIR/rotate_ms"

    q "VACUUM ANALYZE fleet_a"; q "CHECKPOINT"
    read -r rw rc <<< "$(timed "CALL envelope.reencrypt_all(10000)")"
    echo "$rw $rc" >> "$DIR/reenc"
    left="$(q "SELECT count(*) FROM fleet_a WHERE envelope.key_version(c) <> envelope.active_key_version(tenant)")"
    [ "$left" = 0 ] || { echo "reencrypt_all left $left values behind" >&2; exit 1; }

    q "VACUUM ANALYZE fleet_b"; q "CHECKPOINT"
    read -r uw uc <<< "$(timed "UPDATE fleet_b SET c = c")"
    echo "$uw $uc" >> "$DIR/update"
    awk -v r="$rw" -v u="$uw" 'BEGIN { printf "%.4f\n", u / r }' >> "$DIR/ratio"
    q "VACUUM ANALYZE fleet_c"; q "CHECKPOINT"
    read -r cw cc <<< "$(timed "UPDATE fleet_c SET c = envelope.encrypt(tenant, envelope.decrypt(tenant, c, NULL), NULL)
        WHERE envelope.needs_reencryption(c, tenant)")"
    echo "$cw $cc" >> "$DIR/crypto"
    echo "run $run: rotate_keys $(tail -n1 "$DIR/rotate_ms") ms, reencrypt_all $rw ms (cpu $rc), UPDATE $uw ms (cpu $uc), one re-encrypting UPDATE $cw ms (cpu $cc)"
done

REENC_MS="$(cut -d' ' -f1 "$DIR/reenc" | median)"
REENC_CPU="$(cut -d' ' -f2 "$DIR/reenc" | median)"
UPDATE_MS="$(cut -d' ' -f1 "$DIR/update" | median)"
UPDATE_CPU="$(cut -d' ' -f2 "$DIR/update" | median)"
ROTATE_MS="$(median < "$DIR/rotate_ms")"
CRYPTO_MS="$(cut -d' ' -f1 "$DIR/crypto" | median)"
RATIO="$(median < "$DIR/ratio")"
echo "row layout: $LAYOUT (BENCH_FLEET_LAYOUT)"
awk -v rows="$ROWS" -v r="$REENC_MS" -v u="$UPDATE_MS" -v rot="$ROTATE_MS" -v c="$CRYPTO_MS" \
    -v rc="$REENC_CPU" -v uc="$UPDATE_CPU" -v ratio="$RATIO" 'BEGIN {
    rr = rows / (r / 1000); ur = rows / (u / 1000);
    printf "reencrypt_all: %d rows in %d ms = %.0f rows/s (median of runs); backend CPU %d ms\n", rows, r, rr, rc;
    printf "UPDATE ... SET c = c: %d rows in %d ms = %.0f rows/s; backend CPU %d ms\n", rows, u, ur, uc;
    printf "reencrypt_all / UPDATE = %.1f %% (median of the rounds\x27 ratios; target >= 50 %%); of the medians %.1f %%; CPU %.1f %%\n", 100 * ratio, 100 * rr / ur, 100 * uc / rc;
    printf "rotate_keys: 1000 tenants in %d ms = %.0f tenants/s\n", rot, 1000 / (rot / 1000);
    printf "(diagnostic) one UPDATE re-encrypting the same rows: %d ms = %.0f rows/s = %.1f %% of the plain UPDATE; reencrypt_all = %.1f %% of it\n", c, rows / (c / 1000), 100 * u / c, 100 * c / r;
}'
