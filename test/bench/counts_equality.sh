#!/bin/bash
# Cost of the encryption counts, and of the equality functions, against baselines
# measured in the same run:
#
#   bash test/bench/counts_equality.sh
#
#   1. envelope.encrypt with the per-key encryption count (src/encryption_count.c)
#      against the same library built with -DENVELOPE_BENCH_UNCOUNTED, which skips the
#      count and nothing else.  The two libraries take turns in one cluster (installed
#      and the server restarted for each turn), ROUNDS turns each, so both see the same
#      machine; µs per row net of the scan floor, min over the turns.  Rows cycling
#      through 1,000 tenants and rows sorted by tenant, ~32-byte values.
#   2. envelope.encrypt_deterministic against envelope.encrypt (target <= 2x), and
#      envelope.blind_index_all with two live equality versions against
#      envelope.blind_index (target <= 2x), in the counted build.
#
# The server runs a preloaded cluster of its own with the local provider.  Prints one
# line per figure and writes test/bench/out/counts_equality.txt.  About 4 minutes with
# the defaults.  Knobs: BENCH_ROWS=1000000, BENCH_ROUNDS=4 (turns of each library),
# BENCH_RUNS=3 (timed runs of every query per turn), BENCH_PORT=54341.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
ROWS="${BENCH_ROWS:-1000000}"
ROUNDS="${BENCH_ROUNDS:-4}"
RUNS="${BENCH_RUNS:-3}"
PORT="${BENCH_PORT:-54341}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

PKGLIBDIR="$(pg_config --pkglibdir)"
PG_BINDIR="$(pg_config --bindir)"
OUT="$ROOT/test/bench/out"
mkdir -p "$OUT"
DIR="$(mktemp -d /tmp/pg_envelope_bench_counts.XXXXXX)"
chmod 755 "$DIR"
if [ "$(id -u)" -eq 0 ]; then chown postgres: "$DIR"; AS_PG=(runuser -u postgres --); else AS_PG=(); fi
cd "$DIR"
pg() { "${AS_PG[@]}" env PATH="$PG_BINDIR:$PATH" "$@"; }
stop_server() { pg pg_ctl -D "$DIR/data" -m fast -w stop >/dev/null 2>&1 || true; }
cleanup() {
    stop_server
    # Leave the counted library installed, whatever happened.
    [ ! -f "$DIR/counted.so" ] || $SUDO cp "$DIR/counted.so" "$PKGLIBDIR/pg_envelope.so"
    rm -rf "$DIR"
}
trap cleanup EXIT

# ---- The two libraries: the tree as it is, and a copy built without the count.
echo "building the counted and the uncounted library..."
make -C "$ROOT" -s -j2 >/dev/null
$SUDO make -C "$ROOT" -s install >/dev/null
cp "$PKGLIBDIR/pg_envelope.so" "$DIR/counted.so"
mkdir "$DIR/tree"
(cd "$ROOT" && cp -r Makefile pg_envelope.control src sql "$DIR/tree/")
rm -f "$DIR"/tree/src/*.o
make -C "$DIR/tree" -s -j2 COPT=-DENVELOPE_BENCH_UNCOUNTED pg_envelope.so >/dev/null
cp "$DIR/tree/pg_envelope.so" "$DIR/uncounted.so"

# ---- The cluster.
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
PSQL=(psql -h "$DIR" -p "$PORT" -d postgres -X -q -v ON_ERROR_STOP=1)
start_with() {   # $1: counted | uncounted
    stop_server
    $SUDO cp "$DIR/$1.so" "$PKGLIBDIR/pg_envelope.so"
    pg pg_ctl -D "$DIR/data" -l "$DIR/server.log" -w start >/dev/null
}
start_with counted
echo "loading $ROWS rows across 1000 tenants..."
pg "${PSQL[@]}" >/dev/null <<SQL
CREATE EXTENSION pg_envelope;
SELECT count(envelope.create_tenant('tenant' || i)) FROM generate_series(1, 1000) i;
CREATE TABLE plain AS
SELECT i AS id, 'tenant' || (i % 1000 + 1) AS tenant, md5(i::text) AS v
  FROM generate_series(1, $ROWS) i;
CREATE TABLE plain_sorted AS SELECT * FROM plain ORDER BY tenant, id;
VACUUM ANALYZE;
SQL

# One session: warm every table and key, then RUNS timed runs of each query.
run_queries() {   # $1: output file; then "label|query" pairs
    local out="$1"; shift
    {
        echo "SELECT count(*) FROM plain; SELECT count(*) FROM plain_sorted;"
        echo "SELECT count(envelope.encrypt(tenant, v)) FROM plain WHERE id <= 5000;"
        echo '\timing on'
        for r in $(seq 1 "$RUNS"); do
            for qq in "$@"; do
                echo "\\echo BENCH ${qq%%|*}"
                echo "${qq#*|};"
            done
        done
    } > "$DIR/q.sql"
    chmod 644 "$DIR/q.sql"
    pg "${PSQL[@]}" -f "$DIR/q.sql" >> "$out"
}

# ---- 1. Counted against uncounted, taking turns.
ROW_QUERIES=(
  "floor|SELECT count(octet_length(v)) FROM plain"
  "encrypt|SELECT count(envelope.encrypt(tenant, v)) FROM plain"
  "sorted_floor|SELECT count(octet_length(v)) FROM plain_sorted"
  "encrypt_sorted|SELECT count(envelope.encrypt(tenant, v)) FROM plain_sorted"
)
: > "$DIR/counted.out"; : > "$DIR/uncounted.out"
for round in $(seq 1 "$ROUNDS"); do
    for lib in counted uncounted; do
        echo "turn $round: $lib"
        start_with "$lib"
        run_queries "$DIR/$lib.out" "${ROW_QUERIES[@]}"
    done
done
start_with counted

# ---- 2. The equality functions: a second live equality version for every tenant.
EQ_QUERIES=(
  "floor|SELECT count(octet_length(v)) FROM plain"
  "encrypt|SELECT count(envelope.encrypt(tenant, v)) FROM plain"
  "deterministic|SELECT count(envelope.encrypt_deterministic(tenant, v)) FROM plain"
  "blind_index|SELECT count(envelope.blind_index(tenant, v)) FROM plain"
  "blind_index_all|SELECT count(envelope.blind_index_all(tenant, v)) FROM plain"
)
pg "${PSQL[@]}" -c "SELECT count(envelope.rotate_equality_key('tenant' || i)) FROM generate_series(1, 1000) i" >/dev/null
[ "$(pg "${PSQL[@]}" -At -c "SELECT cardinality(envelope.blind_index_all('tenant1', 'x'))")" = 2 ] \
    || { echo "blind_index_all does not return two versions" >&2; exit 1; }
: > "$DIR/equality.out"
run_queries "$DIR/equality.out" "${EQ_QUERIES[@]}"

# ---- Report.
python3 - "$DIR" "$ROWS" <<'PY' | tee "$OUT/counts_equality.txt"
import re, sys
d, rows = sys.argv[1], int(sys.argv[2])

def mins(path):
    best, label = {}, None
    for line in open(path):
        m = re.match(r"BENCH (\S+)", line)
        if m:
            label = m.group(1)
            continue
        m = re.match(r"Time: ([0-9.]+) ms", line)
        if m and label:
            best[label] = min(best.get(label, float("inf")), float(m.group(1)))
            label = None
    return best

def per_row(b, label, floor):
    return (b[label] - b[floor]) * 1000.0 / rows

c, u, e = mins(f"{d}/counted.out"), mins(f"{d}/uncounted.out"), mins(f"{d}/equality.out")
for label, floor in (("encrypt", "floor"), ("encrypt_sorted", "sorted_floor")):
    pc, pu = per_row(c, label, floor), per_row(u, label, floor)
    print(f"{label:16s} counted {pc:.3f} us/row, uncounted {pu:.3f} us/row: "
          f"count costs {100.0 * (pc - pu) / pu:+.1f} % (target <= 3 %)")
enc = per_row(e, "encrypt", "floor")
det = per_row(e, "deterministic", "floor")
bi = per_row(e, "blind_index", "floor")
bia = per_row(e, "blind_index_all", "floor")
print(f"encrypt {enc:.3f} us/row; encrypt_deterministic {det:.3f} us/row: {det / enc:.2f}x encrypt (target <= 2x)")
print(f"blind_index {bi:.3f} us/row; blind_index_all, two live versions, {bia:.3f} us/row: "
      f"{bia / bi:.2f}x blind_index (target <= 2x)")
PY
