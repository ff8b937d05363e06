#!/bin/bash
# pg_envelope benchmark: two builds of the extension compared on the tenant sweep's
# scans, in one sitting, on one cluster.
#
#   bash test/bench/tenant_sweep_ab.sh A.so B.so [C.so ...]
#
# Each argument is a built pg_envelope.so (copy `pg_envelope.so` aside after `make` at
# each tree, naming the files after the trees).  Starts one preloaded cluster with the
# local provider and envelope.cache_size = 131072, creates 100,000 tenants and, for each
# tenant count T, tables of AB_ROWS rows whose tenants cycle (row i -> tenant i mod T),
# as test/bench/tenant_sweep.sh does.  Then AB_ROUNDS times, for each build in turn: the
# build is copied over the installed library, the cluster restarted, and one session
# per T, warmed by one scan of each kind, times AB_RUNS runs of the scans of
# tenant_sweep.sh.  Figures: backend CPU time (/proc/self/schedstat) per row, net of the
# scan floor, min of the runs, and the ratio to the first T.  The builds alternate, so
# the machine's other load weighs on each alike; compare a build's rounds with each
# other to see the noise.  The installed library is put back at the end.
#
# Knobs: AB_TENANTS="1000 50000 100000"  AB_ROWS=200000  AB_RUNS=3  AB_ROUNDS=2
#        AB_PORT=54360  AB_HUGE_PAGES=0 (1: huge_pages = on, huge pages reserved by
#        hand first; 0: huge_pages = off)
# Writes test/bench/out/sweep_ab.txt (one line per build and round).
set -euo pipefail

[ "$#" -ge 2 ] || { echo "usage: $0 A.so B.so [C.so ...]" >&2; exit 2; }
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
read -r -a TENANTS <<< "${AB_TENANTS:-1000 50000 100000}"
ROWS="${AB_ROWS:-200000}"
RUNS="${AB_RUNS:-3}"
ROUNDS="${AB_ROUNDS:-2}"
PORT="${AB_PORT:-54360}"
MAX_T=0
for t in "${TENANTS[@]}"; do [ "$t" -le "$MAX_T" ] || MAX_T=$t; done
BUILDS=()
for so in "$@"; do BUILDS+=("$(readlink -f "$so")"); done

source "$ROOT/test/bench/ab_cluster.sh"
ab_cluster_init sweep_ab "$PORT" "${BUILDS[@]}"
cat >> "$DIR/data/postgresql.conf" <<CONF
envelope.cache_size = 131072
shared_buffers = 1GB
max_parallel_workers_per_gather = 0
jit = off
autovacuum = off
CONF
# Huge pages for the shared segment (AB_HUGE_PAGES=1), see huge_pages.sh; counted with
# the first build in place, as the server will start with it.
ab_cluster_install "${BUILDS[0]}"
source "$ROOT/test/bench/huge_pages.sh"
huge_pages_conf AB_HUGE_PAGES "${AB_HUGE_PAGES:-0}" "$DIR/data"
ab_cluster_use "${BUILDS[0]}"
q "CREATE EXTENSION pg_envelope" >/dev/null
for ((s = 0; s < MAX_T; s += 5000)); do
    q "SELECT count(envelope.create_tenant('t' || i)) FROM generate_series($s + 1, least($s + 5000, $MAX_T)) i" >/dev/null
done
for T in "${TENANTS[@]}"; do
    pg "${PSQL[@]}" >/dev/null <<SQL
CREATE TABLE plain_$T AS
SELECT i AS id, 't' || (i % $T + 1) AS tenant, md5(i::text) AS v FROM generate_series(1, $ROWS) i;
CREATE TABLE sealed_$T AS SELECT id, tenant, envelope.encrypt(tenant, v) AS c FROM plain_$T;
SQL
done
q "VACUUM ANALYZE" >/dev/null

cpuq="SELECT 'CPU', split_part(pg_read_file('/proc/self/schedstat'), ' ', 1)"
for T in "${TENANTS[@]}"; do
  {
    echo "SELECT count(*) FROM plain_$T; SELECT count(*) FROM sealed_$T;"
    echo "SELECT count(envelope.decrypt_text(tenant, c)) FROM sealed_$T;"
    echo "SELECT count(envelope.encrypt(tenant, v)) FROM plain_$T;"
    for r in $(seq 1 "$RUNS"); do
      for step in "floor:SELECT count(octet_length(v)) FROM plain_$T" \
                  "encrypt:SELECT count(envelope.encrypt(tenant, v)) FROM plain_$T" \
                  "decrypt_floor:SELECT count(octet_length(c)) FROM sealed_$T" \
                  "decrypt:SELECT count(envelope.decrypt_text(tenant, c)) FROM sealed_$T"; do
        echo "$cpuq;"
        echo "\\echo BENCH $T ${step%%:*}"
        echo "${step#*:};"
        echo "$cpuq;"
      done
    done
  } > "$DIR/scans_$T.sql"
  chmod 644 "$DIR/scans_$T.sql"
done

: > "$OUT/sweep_ab.txt"
for round in $(seq 1 "$ROUNDS"); do
  for so in "${BUILDS[@]}"; do
    ab_cluster_use "$so"
    : > "$DIR/scans.out"
    for T in "${TENANTS[@]}"; do
      pg "${PSQL[@]}" -At -f "$DIR/scans_$T.sql" >> "$DIR/scans.out"
    done
    PYTHONPATH="$ROOT/test/bench" python3 - "$DIR/scans.out" "$ROWS" "$(basename "$so") round $round" "$(cut -d' ' -f1-3 /proc/loadavg)" <<'PY' | tee -a "$OUT/sweep_ab.txt"
import sys
from ab_cpu import step_cpu_ms
path, rows, label, load = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
# steps are "T kind": the tenant count and the scan
cpu = {(int(k.split()[0]), k.split()[1]): v for k, v in step_cpu_ms(path).items()}
base = None
out = "%s (load %s):" % (label, load)
for t in sorted({k[0] for k in cpu}):
    enc = (min(cpu[(t, "encrypt")]) - min(cpu[(t, "floor")])) * 1000 / rows
    dec = (min(cpu[(t, "decrypt")]) - min(cpu[(t, "decrypt_floor")])) * 1000 / rows
    if base is None:
        base = (dec, enc)
    out += "  T=%d decrypt_text %.3f us (%.2fx) encrypt %.3f us (%.2fx)" % (
        t, dec, dec / base[0], enc, enc / base[1])
print(out)
PY
  done
done
