#!/bin/bash
# The first full scan after a restart, with and without envelope.cache_prewarm.
#
#   bash test/bench/prewarm.sh
#
# Builds and installs the extension, starts moto (test/kms/moto_server.py) and a
# preloaded cluster with the aws provider, creates BENCH_PREWARM_TENANTS tenants and a
# table of BENCH_PREWARM_ROWS rows spread over them.  Then, in the same run:
#
#   1. restart with cache_prewarm = off: the first full scan decrypting every row
#      (each tenant's first row waits for a KMS Decrypt), then the same scan warm;
#   2. restart with cache_prewarm = active (rate BENCH_PREWARM_RATE): the time until
#      cache_stats says done, then the first full scan.
#
# Prints one line per figure, with the KMS Decrypt calls each scan made (cache_stats)
# and the ratios to the warm scan of the same run.  moto answers a Decrypt in a few
# ms on loopback; a regional AWS KMS endpoint takes longer, so the cold scan's penalty
# here is a lower bound.  Reported, never asserted; test/bench/RESULTS.md keeps them.
#
# Knobs: BENCH_PREWARM_TENANTS=1000, BENCH_PREWARM_ROWS=200000, BENCH_PREWARM_RATE=100,
# BENCH_PREWARM_RUNS=3 (restarts per mode; the median is reported), ENVELOPE_PYTHON
# (moto, boto3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
N="${BENCH_PREWARM_TENANTS:-1000}"
ROWS="${BENCH_PREWARM_ROWS:-200000}"
RATE="${BENCH_PREWARM_RATE:-100}"
RUNS="${BENCH_PREWARM_RUNS:-3}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

bash "$ROOT/test/install_deps.sh"
PY="${ENVELOPE_PYTHON:-$(python3 -c 'import sys; print(sys.executable)')}"
"$PY" -c 'import moto.server, boto3' || { echo "$PY cannot import moto and boto3 (set ENVELOPE_PYTHON)" >&2; exit 1; }

make -C "$ROOT" -s -j2 >/dev/null
$SUDO make -C "$ROOT" -s install >/dev/null
PG_BINDIR="$(pg_config --bindir)"

DIR="$(mktemp -d /tmp/pg_envelope_prewarm_bench.XXXXXX)"
chmod 755 "$DIR"
if [ "$(id -u)" -eq 0 ]; then chown postgres: "$DIR"; AS_PG=(runuser -u postgres --); else AS_PG=(); fi
pg() {
    "${AS_PG[@]}" env -u AWS_PROFILE -u AWS_SESSION_TOKEN -u AWS_CONFIG_FILE \
        -u AWS_SHARED_CREDENTIALS_FILE PATH="$PG_BINDIR:$PATH" \
        AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_EC2_METADATA_DISABLED=true "$@"
}
PIDS=()
stop() {
    pg pg_ctl -D "$DIR/data" -m fast stop >/dev/null 2>&1 || true
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$DIR"
}
trap stop EXIT
ms_now() { echo $(( $(date +%s%N) / 1000000 )); }
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

echo "== moto"
MOTO_PORT="$(free_port)"
"$PY" "$ROOT/test/kms/moto_server.py" --port "$MOTO_PORT" --parent-pid $$ --lifetime 3600 > "$DIR/moto.log" 2>&1 &
PIDS+=($!)
for i in $(seq 1 150); do
    curl -s -o /dev/null "http://127.0.0.1:$MOTO_PORT/moto-api/" && break
    [ "$i" -lt 150 ] || { echo "moto did not start" >&2; exit 1; }
    sleep 0.2
done
MOTO_URL="http://127.0.0.1:$MOTO_PORT"
AWS_KEY="$("$PY" "$ROOT/test/kms/kms_admin.py" --endpoint "$MOTO_URL" create-key \
    | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["Arn"])')"

echo "== cluster: $N tenants, $ROWS rows"
PGPORT="$(free_port)"
pg initdb -D "$DIR/data" -A trust >/dev/null
cat >> "$DIR/data/postgresql.conf" <<EOF
port = $PGPORT
unix_socket_directories = '$DIR'
shared_preload_libraries = 'pg_envelope'
envelope.kms_provider = 'aws'
envelope.aws_region = 'us-east-1'
envelope.aws_endpoint = '$MOTO_URL'
envelope.kms_key = '$AWS_KEY'
envelope.cache_prewarm_rate = $RATE
EOF
pg pg_ctl -D "$DIR/data" -l "$DIR/server.log" -w start >/dev/null
psql_() { pg psql -X -q -A -t -h "$DIR" -p "$PGPORT" -d postgres -v ON_ERROR_STOP=1 "$@"; }
psql_ -c "CREATE EXTENSION pg_envelope" \
      -c "SELECT count(envelope.create_tenant('t' || i)) FROM generate_series(1, $N) i" >/dev/null
psql_ -c "CREATE TABLE data AS SELECT 't' || (1 + g % $N) AS tenant,
                 envelope.encrypt('t' || (1 + g % $N), 'value ' || g) AS c
            FROM generate_series(1, $ROWS) g" \
      -c "VACUUM ANALYZE data" >/dev/null

SCAN="SELECT count(envelope.decrypt_text(tenant, c)) FROM data"
stat() { psql_ -c "SELECT $1 FROM envelope.cache_stats"; }

restart() {
    pg pg_ctl -D "$DIR/data" -m fast -w stop >/dev/null
    sed -i "/^envelope.cache_prewarm = /d" "$DIR/data/postgresql.conf"
    echo "envelope.cache_prewarm = '$1'" >> "$DIR/data/postgresql.conf"
    pg pg_ctl -D "$DIR/data" -l "$DIR/server.log" -w start >/dev/null
}

# One timed scan: "ms decrypt_calls"
timed_scan() {
    local before t0 t1
    before="$(stat kms_decrypt_calls)"
    t0="$(ms_now)"
    psql_ -c "$SCAN" >/dev/null
    t1="$(ms_now)"
    echo "$((t1 - t0)) $(( $(stat kms_decrypt_calls) - before ))"
}

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

declare -a cold cold_calls warm pre pre_calls pre_wait
for r in $(seq 1 "$RUNS"); do
    echo "== run $r: prewarm off"
    restart off
    read -r ms calls < <(timed_scan); cold+=("$ms"); cold_calls+=("$calls")
    read -r ms calls < <(timed_scan); warm+=("$ms")
    echo "== run $r: prewarm active"
    restart active
    t0="$(ms_now)"
    until [ "$(stat prewarm_state)" = done ]; do
        [ "$(stat prewarm_state)" = failed ] && { echo "prewarm failed" >&2; exit 1; }
        sleep 0.1
    done
    pre_wait+=($(( $(ms_now) - t0 )))
    read -r ms calls < <(timed_scan); pre+=("$ms"); pre_calls+=("$calls")
    echo "   cold ${cold[-1]} ms (${cold_calls[-1]} Decrypt), warm ${warm[-1]} ms, prewarm done after ${pre_wait[-1]} ms, then ${pre[-1]} ms (${pre_calls[-1]} Decrypt)"
done

COLD="$(printf '%s\n' "${cold[@]}" | median)"
WARM="$(printf '%s\n' "${warm[@]}" | median)"
PRE="$(printf '%s\n' "${pre[@]}" | median)"
WAIT="$(printf '%s\n' "${pre_wait[@]}" | median)"
echo
echo "== results: $N tenants, $ROWS rows, moto on loopback, median of $RUNS restarts"
echo "first full scan after a restart, prewarm off:    $COLD ms, ${cold_calls[-1]} KMS Decrypt calls; $(awk "BEGIN{printf \"%.2f\", $COLD/$WARM}")x the warm scan"
echo "first full scan after a restart, prewarm active: $PRE ms, ${pre_calls[-1]} KMS Decrypt calls; $(awk "BEGIN{printf \"%.2f\", $PRE/$WARM}")x the warm scan"
echo "warm scan (baseline, same run):                  $WARM ms"
echo "prewarm of $N keys at envelope.cache_prewarm_rate = $RATE: done $WAIT ms after the start ($(awk "BEGIN{printf \"%.0f\", $N*1000/$WAIT}") keys/s)"
