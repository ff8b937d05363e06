#!/bin/bash
# pg_envelope benchmark: cost per row against baselines measured in the same run.
#
#   bash test/bench/run.sh            1,000,000 rows (BENCH_ROWS to change), 3 runs each
#
# Starts its own preloaded cluster (local provider), loads ~32-byte text values across
# 1,000 tenants, and times full scans in one warmed session: the scan floor
# (octet_length), md5(), envelope.encrypt / decrypt_text with a warm cache, pgcrypto
# encrypt() and pgp_sym_encrypt(); then 2 clients decrypting full scans together
# against 1.  Prints one line per figure with its ratio to its baseline and writes
# test/bench/out/results.json.  Figures are reported, never asserted.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
ROWS="${BENCH_ROWS:-1000000}"
RUNS="${BENCH_RUNS:-3}"
PGP_ROWS="${BENCH_PGP_ROWS:-10000}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

bash "$ROOT/test/install_deps.sh"
make -C "$ROOT" -s -j2 >/dev/null
$SUDO make -C "$ROOT" -s install >/dev/null
PG_BINDIR="$(pg_config --bindir)"

DIR="$(mktemp -d /tmp/pg_envelope_bench.XXXXXX)"
PORT="${BENCH_PORT:-54339}"
if [ "$(id -u)" -eq 0 ]; then chown postgres: "$DIR"; AS_PG=(runuser -u postgres --); else AS_PG=(); fi
pg() { "${AS_PG[@]}" env PATH="$PG_BINDIR:$PATH" "$@"; }
stop() { pg pg_ctl -D "$DIR/data" -m fast stop >/dev/null 2>&1 || true; rm -rf "$DIR"; }
trap stop EXIT

pg initdb -D "$DIR/data" -A trust >/dev/null
pg bash -c "umask 077; openssl rand -hex 32 > '$DIR/master.key'"
cat >> "$DIR/data/postgresql.conf" <<CONF
port = $PORT
listen_addresses = ''
unix_socket_directories = '$DIR'
shared_preload_libraries = 'pg_envelope'
envelope.local_master_key_file = '$DIR/master.key'
shared_buffers = 1GB
max_parallel_workers_per_gather = 0
jit = off
CONF
pg pg_ctl -D "$DIR/data" -l "$DIR/server.log" -w start >/dev/null
PSQL=(psql -h "$DIR" -p "$PORT" -d postgres -X -q -v ON_ERROR_STOP=1)

echo "loading $ROWS rows across 1000 tenants..."
pg "${PSQL[@]}" >/dev/null <<SQL
CREATE EXTENSION pg_envelope;
CREATE EXTENSION pgcrypto;
SELECT count(envelope.create_tenant('tenant' || i)) FROM generate_series(1, 1000) i;
CREATE TABLE plain AS
SELECT i AS id, 'tenant' || (i % 1000 + 1) AS tenant, md5(i::text) AS v   -- 32 bytes
  FROM generate_series(1, $ROWS) i;
CREATE TABLE sealed AS SELECT id, tenant, envelope.encrypt(tenant, v) AS c FROM plain;
VACUUM ANALYZE plain, sealed;
SQL

# One session runs every query RUNS times (after a warm-up read of each table) and
# prints "label ms" lines.
QUERIES=(
  "floor|SELECT count(octet_length(v)) FROM plain"
  "md5|SELECT count(md5(v)) FROM plain"
  "encrypt|SELECT count(envelope.encrypt(tenant, v)) FROM plain"
  "decrypt_floor|SELECT count(octet_length(c)) FROM sealed"
  "decrypt|SELECT count(envelope.decrypt_text(tenant, c)) FROM sealed"
  "pgcrypto_encrypt|SELECT count(encrypt(convert_to(v, 'UTF8'), '\\x000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f'::bytea, 'aes')) FROM plain"
  "pgp_sym_encrypt|SELECT count(pgp_sym_encrypt(v, 'passphrase')) FROM plain WHERE id <= $PGP_ROWS"
)
script="$DIR/bench.sql"
{
  echo '\timing on'
  echo 'SELECT count(*) FROM plain; SELECT count(*) FROM sealed;'
  echo "SELECT count(envelope.decrypt_text(tenant, c)) FROM sealed;"   # warm every key
  for r in $(seq 1 "$RUNS"); do
    for q in "${QUERIES[@]}"; do
      echo "\\echo BENCH ${q%%|*}"
      echo "${q#*|};"
    done
  done
} > "$script"
chmod 644 "$script"
pg "${PSQL[@]}" -f "$script" > "$DIR/bench.out"

# 2 clients decrypting full scans together vs 1 alone (wall time of the pair).
scan="SELECT count(envelope.decrypt_text(tenant, c)) FROM sealed"
one_client() { pg "${PSQL[@]}" -c "$scan" >/dev/null; }
declare -a single pair
for r in $(seq 1 "$RUNS"); do
  t0=$(date +%s%N); one_client; t1=$(date +%s%N)
  single+=($(( (t1 - t0) / 1000000 )))
  t0=$(date +%s%N); one_client & one_client & wait; t1=$(date +%s%N)
  pair+=($(( (t1 - t0) / 1000000 )))
done

mkdir -p "$ROOT/test/bench/out"
python3 - "$DIR/bench.out" "$ROWS" "$PGP_ROWS" "${single[*]}" "${pair[*]}" "$ROOT/test/bench/out/results.json" <<'PY'
import json, re, statistics, sys, platform, os
out, rows, pgp_rows, single, pair, dest = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]
times, label = {}, None
for line in open(out):
    m = re.match(r'BENCH (\S+)', line)
    if m:
        label = m.group(1); continue
    m = re.match(r'Time: ([\d.]+) ms', line)
    if m and label:
        times.setdefault(label, []).append(float(m.group(1))); label = None
def per_row(lbl, n=rows):
    return min(times[lbl]) * 1000 / n, statistics.median(times[lbl]) * 1000 / n
res = {k: {"min_us_per_row": per_row(k, pgp_rows if k == 'pgp_sym_encrypt' else rows)[0],
           "median_us_per_row": per_row(k, pgp_rows if k == 'pgp_sym_encrypt' else rows)[1]} for k in times}
floor = res['floor']['min_us_per_row']; dfloor = res['decrypt_floor']['min_us_per_row']
net = lambda k, f: res[k]['min_us_per_row'] - f
enc, dec = net('encrypt', floor), net('decrypt', dfloor)
md5n = net('md5', floor)
single = [int(x) for x in single.split()]; pair = [int(x) for x in pair.split()]
scaling = 2 * min(single) / min(pair)
lines = [
  f"rows: {rows}; runs: {len(times['floor'])}; µs per row are min of runs, net of the scan floor",
  f"encrypt            {enc:7.3f} µs/row   {enc / md5n:5.2f}x md5() ({md5n:.3f})",
  f"decrypt_text       {dec:7.3f} µs/row   {dec / md5n:5.2f}x md5()",
  f"pgcrypto encrypt() {net('pgcrypto_encrypt', floor):7.3f} µs/row   envelope.encrypt is {net('pgcrypto_encrypt', floor) / enc:5.2f}x faster (target >= 2)",
  f"pgp_sym_encrypt    {res['pgp_sym_encrypt']['min_us_per_row'] - floor:7.1f} µs/row   envelope.encrypt is {(res['pgp_sym_encrypt']['min_us_per_row'] - floor) / enc:7.1f}x faster (target >= 20)",
  f"2 clients full-scan decrypt: {scaling:4.2f}x the throughput of 1 (target >= 1.8; 1 client {min(single)} ms, pair {min(pair)} ms)",
]
print("\n".join(lines))
json.dump({"machine": {"nproc": os.cpu_count(), "platform": platform.platform()},
           "rows": rows, "per_row": res, "net_us_per_row": {"encrypt": enc, "decrypt": dec, "md5": md5n},
           "scaling_2_clients": scaling, "single_ms": single, "pair_ms": pair}, open(dest, "w"), indent=2)
PY
