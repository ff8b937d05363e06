#!/bin/bash
# envelope.count_key_usage() against count(*) of the same table, in one run.
#
#   bash test/bench/usage.sh
#
# Builds and installs the extension, starts its own preloaded cluster (local provider),
# fills one table of BENCH_USAGE_ROWS rows (~32-byte values, BENCH_USAGE_TENANTS
# tenants, a tenant text column and a randomized ciphertext column, interleaved
# tenants: the worst case for the per-tenant shortcut), registers the column, and times
# BENCH_RUNS runs each, warm (the table in shared buffers) of:
#   - SELECT count(*) serial (max_parallel_workers_per_gather = 0): the baseline;
#   - SELECT count(*) parallel (the server's default), for reference;
#   - CALL envelope.count_key_usage() with its default batch (one transaction per
#     ~1,000,000 rows), with batches of 100,000 rows, and with one batch for the table;
#   - the same count written as SQL (GROUP BY tenant, key_version, format), for reference.
# Prints min and median per figure and the throughput ratio count(*) / count_key_usage
# (target >= 50 %), and writes test/bench/out/usage.json.  Figures are reported, never
# asserted; test/bench/RESULTS.md keeps the latest.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
ROWS="${BENCH_USAGE_ROWS:-1000000}"
TENANTS="${BENCH_USAGE_TENANTS:-1000}"
RUNS="${BENCH_RUNS:-5}"
PORT="${BENCH_PORT:-54341}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

make -C "$ROOT" -s -j2 >/dev/null
$SUDO make -C "$ROOT" -s install >/dev/null
PG_BINDIR="$(pg_config --bindir)"
OUT="$ROOT/test/bench/out"
mkdir -p "$OUT"

DIR="$(mktemp -d /tmp/pg_envelope_usage.XXXXXX)"
chmod 755 "$DIR"
if [ "$(id -u)" -eq 0 ]; then chown postgres: "$DIR"; AS_PG=(runuser -u postgres --); else AS_PG=(); fi
pg() { "${AS_PG[@]}" env PATH="$PG_BINDIR:$PATH" "$@"; }
stop() { pg pg_ctl -D "$DIR/data" -m fast stop >/dev/null 2>&1 || true; rm -rf "$DIR"; }
trap stop EXIT

pg sh -c "umask 077; openssl rand -hex 32 > '$DIR/master.key'"
pg initdb -D "$DIR/data" -A trust >/dev/null
cat >> "$DIR/data/postgresql.conf" <<CONF
port = $PORT
listen_addresses = ''
unix_socket_directories = '$DIR'
shared_preload_libraries = 'pg_envelope'
envelope.local_master_key_file = '$DIR/master.key'
shared_buffers = 512MB
CONF
pg pg_ctl -D "$DIR/data" -l "$DIR/log" -w start >/dev/null
psql_q() { pg psql -X -q -At -h "$DIR" -p "$PORT" -d postgres -v ON_ERROR_STOP=1 "$@"; }

echo "== loading $ROWS rows of $TENANTS tenants"
psql_q <<SQL
CREATE EXTENSION pg_envelope;
CREATE EXTENSION pg_prewarm;
SELECT count(envelope.create_tenant('t' || i)) FROM generate_series(1, $TENANTS) i;
CREATE TABLE usage_bench (id int, tenant text, v bytea);
INSERT INTO usage_bench
    SELECT g, 't' || (g % $TENANTS + 1), envelope.encrypt('t' || (g % $TENANTS + 1), 'value number ' || g)
      FROM generate_series(1, $ROWS) g;
VACUUM ANALYZE usage_bench;
SELECT envelope.register_column('usage_bench', 'v', 'tenant');
SELECT pg_prewarm('usage_bench');
SQL

# Time one statement RUNS times in one session (after one warm-up run); prints ms per run.
time_runs() {
    local setup="$1" stmt="$2"
    psql_q -c "$setup" -c "$stmt" >/dev/null
    for _ in $(seq 1 "$RUNS"); do
        psql_q -c "$setup" -c '\timing on' -c "$stmt" 2>&1 | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p'
    done
}
stats() { sort -n | awk '{a[NR]=$1} END {printf "%.1f %.1f\n", a[1], a[int((NR+1)/2)]}'; }

SERIAL='SET max_parallel_workers_per_gather = 0; SET client_min_messages = warning'
DEFAULT='RESET max_parallel_workers_per_gather'
read -r c_min c_med < <(time_runs "$SERIAL" 'SELECT count(*) FROM usage_bench' | stats)
read -r p_min p_med < <(time_runs "$DEFAULT" 'SELECT count(*) FROM usage_bench' | stats)
read -r u_min u_med < <(time_runs "$SERIAL" 'CALL envelope.count_key_usage()' | stats)
read -r o_min o_med < <(time_runs "$SERIAL" 'CALL envelope.count_key_usage(100000000)' | stats)
read -r b_min b_med < <(time_runs "$SERIAL" 'CALL envelope.count_key_usage(100000)' | stats)
read -r s_min s_med < <(time_runs "$SERIAL" \
    'SELECT tenant, envelope.key_version(v), get_byte(v, 0), count(*) FROM usage_bench GROUP BY 1, 2, 3' | stats)
total="$(psql_q -c 'SELECT sum(value_count) FROM envelope.key_usage')"
[ "$total" = "$ROWS" ] || { echo "count_key_usage counted $total values, not $ROWS" >&2; exit 1; }

ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.0f", 100 * a / b}'; }
echo "count(*) serial                         min $c_min ms  median $c_med ms  (baseline)"
echo "count(*) parallel (default workers)     min $p_min ms  median $p_med ms"
echo "count_key_usage() default batches       min $u_min ms  median $u_med ms  $(ratio "$c_min" "$u_min") % of serial count(*) throughput (target >= 50 %)"
echo "count_key_usage() one batch             min $o_min ms  median $o_med ms  $(ratio "$c_min" "$o_min") %"
echo "count_key_usage() 100,000-row batches   min $b_min ms  median $b_med ms  $(ratio "$c_min" "$b_min") %"
echo "the same count as SQL GROUP BY          min $s_min ms  median $s_med ms  $(ratio "$c_min" "$s_min") %"
cat > "$OUT/usage.json" <<JSON
{"rows": $ROWS, "tenants": $TENANTS, "runs": $RUNS,
 "count_serial_ms": [$c_min, $c_med], "count_parallel_ms": [$p_min, $p_med],
 "count_key_usage_ms": [$u_min, $u_med], "count_key_usage_one_batch_ms": [$o_min, $o_med],
 "count_key_usage_100k_batches_ms": [$b_min, $b_med],
 "sql_group_by_ms": [$s_min, $s_med],
 "ratio_pct": $(ratio "$c_min" "$u_min")}
JSON
