#!/bin/bash
# pg_envelope benchmark: two (or more) builds of the extension compared on the
# re-encryption row, in one sitting, on one cluster, by backend CPU time.
#
#   bash test/bench/fleet_ab.sh A.so B.so [C.so ...]
#
# Each argument is a built pg_envelope.so (copy `pg_envelope.so` aside after `make` at
# each tree).  Starts one preloaded cluster (local provider, envelope.cache_size =
# 4096, as test/bench/fleet.sh) with 1,000 tenants and three tables of FLEET_AB_ROWS
# ~32-byte values: `inter` (row i of tenant i mod 1,000, so every row switches
# tenant), `clust` (each tenant's rows together) and `reg` (interleaved, registered for
# reencrypt_all).  Then FLEET_AB_ROUNDS times, for each build in turn (the order
# reversed every other round, so a drift of the machine's load weighs on each alike):
# the build is copied over the installed library, the cluster restarted, and one
# session, after one untimed warm-up round, runs FLEET_AB_RUNS times
#   CALL envelope.rotate_keys(older_than => '0'); VACUUM; CHECKPOINT;
#   SELECT count(envelope.reencrypt_value(tenant, c, NULL)) FROM inter
#    WHERE envelope.needs_reencryption(c, tenant);              -- step "scan_inter"
#   the same on clust                                          -- step "scan_clust"
#   (both twice: the row path alone, without heap updates or WAL)
#   UPDATE inter SET c = envelope.reencrypt_value(tenant, c, NULL)
#    WHERE envelope.needs_reencryption(c, tenant);              -- step "inter"
#   the same on clust                                          -- step "clust"
#   CALL envelope.reencrypt_all(10000) (on reg)                -- step "call"
# timing each step by the session's CPU time (/proc/self/schedstat, ns; the CALL's
# batches run in the same backend).  Prints per build and round the median of the
# runs (ms) per step, then per build the median over rounds; the figure to compare is
# the ratio of those medians (and, since other load only adds, that of the minima).
# A step repeated within a run is also summed up without its first time in each run
# (which sets up the keys of the run's rotation): "steady".  The installed library is
# put back at the end.
#
# Knobs: FLEET_AB_ROWS=200000  FLEET_AB_RUNS=3  FLEET_AB_ROUNDS=3  BENCH_PORT=54366
#        FLEET_AB_STEPS="scan_inter scan_clust scan_inter scan_clust inter clust call"
#        (the steps of each run, in order; a step may come more than once)
# Writes test/bench/out/fleet_ab.txt.
set -euo pipefail

[ "$#" -ge 2 ] || { echo "usage: $0 A.so B.so [C.so ...]" >&2; exit 2; }
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
ROWS="${FLEET_AB_ROWS:-200000}"
RUNS="${FLEET_AB_RUNS:-3}"
ROUNDS="${FLEET_AB_ROUNDS:-3}"
PORT="${BENCH_PORT:-54366}"
STEPS="${FLEET_AB_STEPS:-scan_inter scan_clust scan_inter scan_clust inter clust call}"
BUILDS=()
for so in "$@"; do BUILDS+=("$(readlink -f "$so")"); done

source "$ROOT/test/bench/ab_cluster.sh"
ab_cluster_init fleet_ab "$PORT" "${BUILDS[@]}"
cat >> "$DIR/data/postgresql.conf" <<CONF
shared_buffers = 256MB
envelope.cache_size = 4096
max_wal_size = 4GB
checkpoint_timeout = 30min
autovacuum = off
jit = off
max_parallel_workers_per_gather = 0
client_min_messages = warning
CONF
ab_cluster_use "${BUILDS[0]}"
q "CREATE EXTENSION pg_envelope"
q "SELECT count(envelope.create_tenant('tenant' || i)) FROM generate_series(1, 1000) i" >/dev/null
pg "${PSQL[@]}" >/dev/null <<SQL
CREATE TABLE inter (id integer, tenant text, c bytea);
INSERT INTO inter SELECT i, 'tenant' || (i % 1000 + 1),
       envelope.encrypt('tenant' || (i % 1000 + 1), md5(i::text))
  FROM generate_series(1, $ROWS) i ORDER BY i;
CREATE TABLE clust AS SELECT * FROM inter ORDER BY id % 1000, id;
CREATE TABLE reg AS SELECT * FROM inter ORDER BY id;
SELECT envelope.register_column('reg', 'c', 'tenant');
SQL

cpuq="SELECT 'CPU', split_part(pg_read_file('/proc/self/schedstat'), ' ', 1)"
reenc() { echo "UPDATE $1 SET c = envelope.reencrypt_value(tenant, c, NULL) WHERE envelope.needs_reencryption(c, tenant);"; }
scan() { echo "SELECT count(envelope.reencrypt_value(tenant, c, NULL)) FROM $1 WHERE envelope.needs_reencryption(c, tenant);"; }
{
    echo "CALL envelope.rotate_keys(older_than => '0');"
    reenc inter; reenc clust; echo "CALL envelope.reencrypt_all(10000);"
    for r in $(seq 1 "$RUNS"); do
        echo "CALL envelope.rotate_keys(older_than => '0');"
        echo "VACUUM inter; VACUUM clust; VACUUM reg; CHECKPOINT;"
        for step in $STEPS; do
            echo "$cpuq;"
            echo "\\echo BENCH $step"
            case "$step" in
                call) echo "CALL envelope.reencrypt_all(10000);" ;;
                scan_*) scan "${step#scan_}" ;;
                *) reenc "$step" ;;
            esac
            echo "$cpuq;"
        done
    done
} > "$DIR/round.sql"
chmod 644 "$DIR/round.sql"

: > "$OUT/fleet_ab.txt"
for round in $(seq 1 "$ROUNDS"); do
    order=("${BUILDS[@]}")
    if [ $((round % 2)) -eq 0 ]; then
        order=(); for ((i = ${#BUILDS[@]} - 1; i >= 0; i--)); do order+=("${BUILDS[$i]}"); done
    fi
    for so in "${order[@]}"; do
        ab_cluster_use "$so"
        pg "${PSQL[@]}" -At -f "$DIR/round.sql" > "$DIR/round.out"
        PYTHONPATH="$ROOT/test/bench" python3 - "$DIR/round.out" "$(basename "$so")" "$round" "$(cut -d' ' -f1-3 /proc/loadavg)" <<'PY' | tee -a "$OUT/fleet_ab.txt"
import statistics, sys
from ab_cpu import step_cpu_ms
path, label, rnd, load = sys.argv[1:5]
cpu = step_cpu_ms(path)
print("%s round %s (load %s): %s" % (label, rnd, load, "  ".join(
    "%s %.1f ms [%s]" % (s, statistics.median(v), " ".join("%.1f" % x for x in v))
    for s, v in cpu.items())))
PY
    done
done
python3 - "$OUT/fleet_ab.txt" "$STEPS" <<'PY'
import re, statistics, sys
# A step that comes k > 1 times in a run: its first time sets up the keys of the run's
# rotation, the others are the steady state ("steady": their median and minimum).
repeats = {}
for step in sys.argv[2].split():
    repeats[step] = repeats.get(step, 0) + 1
per, runs = {}, {}
for line in open(sys.argv[1]):
    label = line.split(" round ")[0]
    for step, ms, each in re.findall(r"(\w+) ([\d.]+) ms \[([\d. ]+)\]", line):
        per.setdefault(label, {}).setdefault(step, []).append(float(ms))
        runs.setdefault(label, {}).setdefault(step, []).extend(float(x) for x in each.split())
first = None
for label, steps in per.items():
    meds = {s: statistics.median(v) for s, v in steps.items()}
    mins = {s: min(v) for s, v in runs[label].items()}
    steady = {}
    for s, v in runs[label].items():
        k = repeats.get(s, 1)
        if k > 1:
            steady[s] = [x for i, x in enumerate(v) if i % k != 0]
    if first is None:
        first = (meds, mins, steady)
    print("%s: %s" % (label, "  ".join(
        "%s median of rounds %.1f ms (%.3f), min of runs %.1f ms (%.3f)%s"
        % (s, meds[s], meds[s] / first[0][s], mins[s], mins[s] / first[1][s],
           "" if s not in steady else ", steady median %.1f ms (%.3f) min %.1f ms" % (
               statistics.median(steady[s]),
               statistics.median(steady[s]) / statistics.median(first[2][s]), min(steady[s])))
        for s in meds)))
PY
