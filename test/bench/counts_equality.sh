#!/bin/bash
# Cost of the encryption counts, and of the equality functions, against baselines
# measured in the same run:
#
#   bash test/bench/counts_equality.sh
#
#   1. envelope.encrypt with the per-key encryption count (src/encryption_count.c)
#      against encrypt without it, in one library built with -DENVELOPE_BENCH_TOGGLE
#      (which adds the setting envelope.bench_count_encryptions and nothing else), the
#      two taking turns query by query so both see the same machine: PAIRS pairs of
#      timed scans, µs per row net of the scan floor, ~32-byte values, rows cycling
#      through 1,000 tenants.  Timed as the backend's CPU time (/proc/self/schedstat), so
#      that waiting for a CPU other processes hold does not count: on a shared
#      machine wall time varied by 2x between runs of one query.  Two ways: in one
#      warm session (steady state: every
#      backend holds large blocks), and each scan in a new session (every key's
#      blocks reserved from the smallest up, the worst case for one scan).  Reported:
#      the median of the pairs' differences, and the min of each side.
#   2. envelope.encrypt_deterministic against envelope.encrypt (target <= 2x), and
#      envelope.blind_index_all with two live equality versions against
#      envelope.blind_index (target <= 2x), in the same library.
#
# The server is a preloaded cluster of its own with the local provider; the normal
# library is installed again at the end.  Prints one line per figure and writes
# test/bench/out/counts_equality.txt.  About 5 minutes with the defaults.
# Knobs: BENCH_ROWS=1000000, BENCH_PAIRS=8, BENCH_RUNS=3 (runs of each equality
# query), BENCH_PARTS="counts equality" (either alone), BENCH_PORT=54341.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
ROWS="${BENCH_ROWS:-1000000}"
PAIRS="${BENCH_PAIRS:-8}"
PARTS="${BENCH_PARTS:-counts equality}"
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
# A library is replaced by a rename, never written over: a running server (this
# script's, or a test run's using the same installation) has the old file mapped.
put_library() {
    $SUDO cp "$1" "$PKGLIBDIR/.pg_envelope.so.bench" && $SUDO mv -f "$PKGLIBDIR/.pg_envelope.so.bench" "$PKGLIBDIR/pg_envelope.so"
}
cleanup() {
    stop_server
    # Leave the normal library installed, whatever happened.
    [ ! -f "$DIR/normal.so" ] || put_library "$DIR/normal.so"
    rm -rf "$DIR"
}
trap cleanup EXIT

# ---- The library with the benchmark toggle, built in a copy of the tree.
echo "building the library with the count toggle..."
make -C "$ROOT" -s -j2 >/dev/null
$SUDO make -C "$ROOT" -s install >/dev/null
cp "$PKGLIBDIR/pg_envelope.so" "$DIR/normal.so"
mkdir "$DIR/tree"
(cd "$ROOT" && cp -r Makefile pg_envelope.control src sql "$DIR/tree/")
rm -f "$DIR"/tree/src/*.o
make -C "$DIR/tree" -s -j2 COPT=-DENVELOPE_BENCH_TOGGLE pg_envelope.so >/dev/null
put_library "$DIR/tree/pg_envelope.so"

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
PSQL=(psql -h "$DIR" -p "$PORT" -d postgres -X -q -At -v ON_ERROR_STOP=1)
pg pg_ctl -D "$DIR/data" -l "$DIR/server.log" -w start >/dev/null
echo "loading $ROWS rows across 1000 tenants..."
pg "${PSQL[@]}" >/dev/null <<SQL
CREATE EXTENSION pg_envelope;
SELECT count(envelope.create_tenant('tenant' || i)) FROM generate_series(1, 1000) i;
CREATE TABLE plain AS
SELECT i AS id, 'tenant' || (i % 1000 + 1) AS tenant, md5(i::text) AS v
  FROM generate_series(1, $ROWS) i;
VACUUM ANALYZE;
-- CPU time of this backend in ms (/proc/self/schedstat: nanoseconds on a CPU, behind
-- by at most one scheduler tick): what a query costs, without the time it waits for a
-- CPU the other processes of the machine hold.
CREATE FUNCTION bench_cpu_ms() RETURNS numeric LANGUAGE sql AS \$\$
    SELECT split_part(pg_read_file('/proc/self/schedstat'), ' ', 1)::numeric / 1000000
\$\$;
SQL
# Lines that run one query and print "CPU label ms" (this backend's CPU time).
timed() {   # $1: label, $2: query
    printf 'SELECT bench_cpu_ms() AS c0 \\gset\n%s;\nSELECT '"'"'CPU %s '"'"' || (bench_cpu_ms() - :c0);\n' "$2" "$1"
}

# One session: warm every table and key, then RUNS runs of each query.
run_queries() {   # $1: output file; then "label|query" pairs
    local out="$1"; shift
    {
        echo "SELECT count(*) FROM plain;"
        echo "SELECT count(envelope.encrypt(tenant, v)) FROM plain WHERE id <= 5000;"
        for r in $(seq 1 "$RUNS"); do
            for qq in "$@"; do
                timed "${qq%%|*}" "${qq#*|}"
            done
        done
    } > "$DIR/q.sql"
    chmod 644 "$DIR/q.sql"
    pg "${PSQL[@]}" -f "$DIR/q.sql" >> "$out"
}

# ---- 1. With and without the count, taking turns.
: > "$DIR/warm.out"; : > "$DIR/fresh.out"; : > "$DIR/equality.out"
if [[ " $PARTS " == *" counts "* ]]; then
[ "$(pg "${PSQL[@]}" -At -c "SHOW envelope.bench_count_encryptions")" = on ] \
    || { echo "the toggle library is not loaded" >&2; exit 1; }
ENC="SELECT count(envelope.encrypt(tenant, v)) FROM plain"
FLOOR="SELECT count(octet_length(v)) FROM plain"
# 1a. one warm session
{
    echo "SELECT count(*) FROM plain;"
    echo "$ENC;"                     # every key's contexts, and blocks
    for p in $(seq 1 "$PAIRS"); do
        timed floor "$FLOOR"
        for arm in on off; do
            echo "SET envelope.bench_count_encryptions = $arm;"
            timed "warm_$arm" "$ENC"
        done
    done
} > "$DIR/warm.sql"
chmod 644 "$DIR/warm.sql"
echo "warm session: $PAIRS pairs"
pg "${PSQL[@]}" -f "$DIR/warm.sql" > "$DIR/warm.out"
# 1b. a new session per scan (keys' contexts made again, blocks from the smallest)
echo "new sessions: $PAIRS pairs"
for p in $(seq 1 "$PAIRS"); do
    for arm in on off; do
        { echo "SET envelope.bench_count_encryptions = $arm;"; timed "fresh_$arm" "$ENC"; } > "$DIR/fresh.sql"
        chmod 644 "$DIR/fresh.sql"
        pg "${PSQL[@]}" -f "$DIR/fresh.sql" >> "$DIR/fresh.out"
    done
done
fi

# ---- 2. The equality functions: a second live equality version for every tenant.
if [[ " $PARTS " == *" equality "* ]]; then
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
run_queries "$DIR/equality.out" "${EQ_QUERIES[@]}"
fi

# ---- Report.
python3 - "$DIR" "$ROWS" <<'PY' | tee "$OUT/counts_equality.txt"
import re, sys
d, rows = sys.argv[1], int(sys.argv[2])

def series(path):
    out = {}
    for line in open(path):
        m = re.match(r"CPU (\S+) ([0-9.]+)$", line.strip())
        if m:
            out.setdefault(m.group(1), []).append(float(m.group(2)))
    return out

def mins(path):
    return {k: min(v) for k, v in series(path).items()}

def per_row(b, label, floor):
    return (b[label] - b[floor]) * 1000.0 / rows

def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2

w = series(f"{d}/warm.out")
f = series(f"{d}/fresh.out")
for name, s in (("one warm session", w), ("a new session per scan", f)) if w else ():
    floor = min(w["floor"])
    on = [(t - floor) * 1000.0 / rows for t in s[name.startswith("one") and "warm_on" or "fresh_on"]]
    off = [(t - floor) * 1000.0 / rows for t in s[name.startswith("one") and "warm_off" or "fresh_off"]]
    diffs = [100.0 * (a - b) / b for a, b in zip(on, off)]
    print(f"encrypt, {name}: counted {min(on):.3f} us/row of CPU (min of {len(on)}), uncounted {min(off):.3f}; "
          f"count costs {100.0 * (min(on) - min(off)) / min(off):+.1f} % (mins), "
          f"{median(diffs):+.1f} % (median of pairs; target <= 3 %)")
e = mins(f"{d}/equality.out")
if not e:
    sys.exit(0)
enc = per_row(e, "encrypt", "floor")
det = per_row(e, "deterministic", "floor")
bi = per_row(e, "blind_index", "floor")
bia = per_row(e, "blind_index_all", "floor")
print(f"encrypt {enc:.3f} us/row; encrypt_deterministic {det:.3f} us/row: {det / enc:.2f}x encrypt (target <= 2x)")
print(f"blind_index {bi:.3f} us/row; blind_index_all, two live versions, {bia:.3f} us/row: "
      f"{bia / bi:.2f}x blind_index (target <= 2x)")
PY
