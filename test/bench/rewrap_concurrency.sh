#!/bin/bash
# rewrap_keys with several ReEncrypt requests in flight, against one at a time.
#
#   bash test/bench/rewrap_concurrency.sh
#
# Starts its own preloaded cluster (aws provider) in front of moto and
# test/kms/fault_proxy.py, which adds BENCH_REWRAP_LATENCY_MS to every ReEncrypt (a
# KMS round trip: moto itself answers in a few ms, a real KMS in 10-30 ms, more across
# regions) and records how many requests were in flight at once.  BENCH_REWRAP_TENANTS
# tenants with one DEK each are moved from key A to key B and back, with
# envelope.kms_max_concurrent_requests = 1 and then = BENCH_REWRAP_CONCURRENCY, each
# BENCH_REWRAP_RUNS times.  Prints DEKs/s of each, the speed-up, and the round trips a
# DEK took (wall time x concurrency / DEKs / latency: 1.0 when the requests overlap
# perfectly).  Figures are reported, never asserted; RESULTS.md keeps the latest.
#
# Knobs: BENCH_REWRAP_TENANTS=256, BENCH_REWRAP_LATENCY_MS=50, BENCH_REWRAP_CONCURRENCY=8,
# BENCH_REWRAP_RUNS=2, BENCH_PORT=54343, ENVELOPE_PYTHON (with moto and boto3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TENANTS="${BENCH_REWRAP_TENANTS:-256}"
LATENCY_MS="${BENCH_REWRAP_LATENCY_MS:-50}"
CONCURRENCY="${BENCH_REWRAP_CONCURRENCY:-8}"
RUNS="${BENCH_REWRAP_RUNS:-2}"
PORT="${BENCH_PORT:-54343}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

PY="${ENVELOPE_PYTHON:-$(python3 -c 'import sys; print(sys.executable)')}"
"$PY" -c 'import moto.server, boto3' || { echo "$PY cannot import moto and boto3 (set ENVELOPE_PYTHON)" >&2; exit 1; }
make -C "$ROOT" -s -j2 >/dev/null
$SUDO make -C "$ROOT" -s install >/dev/null
PG_BINDIR="$(pg_config --bindir)"

DIR="$(mktemp -d /tmp/pg_envelope_rewrap_bench.XXXXXX)"
chmod 755 "$DIR"
if [ "$(id -u)" -eq 0 ]; then chown postgres: "$DIR"; AS_PG=(runuser -u postgres --); else AS_PG=(); fi
cd "$DIR"
pg() {
    "${AS_PG[@]}" env -u AWS_PROFILE -u AWS_SESSION_TOKEN -u AWS_CONFIG_FILE \
        -u AWS_SHARED_CREDENTIALS_FILE PATH="$PG_BINDIR:$PATH" \
        AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_EC2_METADATA_DISABLED=true "$@"
}
MOTO_PID=""; PROXY_PID=""
stop() {
    pg pg_ctl -D "$DIR/data" -m fast stop >/dev/null 2>&1 || true
    [ -z "$PROXY_PID" ] || kill "$PROXY_PID" 2>/dev/null || true
    [ -z "$MOTO_PID" ] || kill "$MOTO_PID" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$DIR"
}
trap stop EXIT
ms_now() { echo $(( $(date +%s%N) / 1000000 )); }

MOTO_PORT="$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
"$PY" "$ROOT/test/kms/moto_server.py" --port "$MOTO_PORT" --parent-pid $$ --lifetime 3600 \
    > "$DIR/moto.log" 2>&1 &
MOTO_PID=$!
MOTO_URL="http://127.0.0.1:$MOTO_PORT"
for i in $(seq 1 150); do
    curl -s -o /dev/null "$MOTO_URL/moto-api/" && break
    [ "$i" -lt 150 ] || { echo "moto did not start" >&2; exit 1; }
    sleep 0.1
done
"$PY" "$ROOT/test/kms/fault_proxy.py" --upstream "$MOTO_URL" --parent-pid $$ --lifetime 3600 \
    > "$DIR/proxy.out" 2> "$DIR/proxy.log" &
PROXY_PID=$!
for i in $(seq 1 150); do
    PROXY_PORT="$(head -n 1 "$DIR/proxy.out" 2>/dev/null || true)"
    [[ "$PROXY_PORT" =~ ^[0-9]+$ ]] && break
    [ "$i" -lt 150 ] || { echo "fault proxy did not start" >&2; exit 1; }
    sleep 0.1
done
PROXY_URL="http://127.0.0.1:$PROXY_PORT"
new_key() {
    "$PY" "$ROOT/test/kms/kms_admin.py" --endpoint "$MOTO_URL" create-key \
        | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["Arn"])'
}
KEY_A="$(new_key)"
KEY_B="$(new_key)"
proxy() { curl -s -X "$1" -d "${3:-{\}}" "$PROXY_URL$2"; }

pg initdb -D "$DIR/data" -A trust >/dev/null
cat >> "$DIR/data/postgresql.conf" <<CONF
port = $PORT
listen_addresses = ''
unix_socket_directories = '$DIR'
shared_preload_libraries = 'pg_envelope'
envelope.kms_provider = 'aws'
envelope.aws_region = 'us-east-1'
envelope.aws_endpoint = '$PROXY_URL'
envelope.kms_key = '$KEY_A'
envelope.kms_timeout = 30000
CONF
pg pg_ctl -D "$DIR/data" -l "$DIR/log" -w start >/dev/null
q() { pg psql -X -q -At -h "$DIR" -p "$PORT" -d postgres -v ON_ERROR_STOP=1 "$@"; }
q -c "CREATE EXTENSION pg_envelope"
# tenants made straight against moto: the proxy's latency is for the measured step
q -c "SET envelope.aws_endpoint = '$MOTO_URL'" \
  -c "SELECT count(envelope.create_tenant('t' || i)) FROM generate_series(1, $TENANTS) i" >/dev/null

target="$KEY_B"
: > "$DIR/results"
for run in $(seq 1 "$RUNS"); do
    for c in 1 "$CONCURRENCY"; do
        proxy POST /_reset >/dev/null
        proxy POST /_fault "{\"op\": \"ReEncrypt\", \"mode\": \"delay\", \"seconds\": $(awk -v m="$LATENCY_MS" 'BEGIN { print m / 1000 }'), \"count\": -1}" >/dev/null
        t0=$(ms_now)
        q -c "SET envelope.kms_max_concurrent_requests = $c" -c "SET client_min_messages = warning" \
          -c "CALL envelope.rewrap_keys('$target')"
        ms=$(( $(ms_now) - t0 ))
        counts="$(proxy GET /_counts)"
        reqs="$(echo "$counts" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["ops"]["ReEncrypt"]["requests"])')"
        most="$(echo "$counts" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["ops"]["ReEncrypt"]["max_in_flight"])')"
        left="$(q -c "SELECT count(*) FROM envelope.tenant_keys WHERE kms_key <> '$target'")"
        [ "$left" = 0 ] || { echo "rewrap_keys left $left DEKs behind" >&2; exit 1; }
        echo "$c $ms $reqs $most" >> "$DIR/results"
        echo "run $run, concurrency $c: $TENANTS DEKs in $ms ms, $reqs ReEncrypt requests, at most $most in flight"
        [ "$target" = "$KEY_B" ] && target="$KEY_A" || target="$KEY_B"
    done
done

awk -v n="$TENANTS" -v lat="$LATENCY_MS" -v conc="$CONCURRENCY" '
    { ms[$1] = (ms[$1] == "" || $2 < ms[$1]) ? $2 : ms[$1] }
    END {
        s = ms[1]; p = ms[conc];
        printf "one at a time: %d DEKs in %d ms = %.0f DEKs/s (best of runs; %.2f round trips of %d ms per DEK)\n", n, s, n / (s / 1000), s / n / lat, lat;
        printf "%d in flight: %d DEKs in %d ms = %.0f DEKs/s = %.2fx; %.2f round trips per %d DEKs (1.0 = perfect overlap)\n", conc, n, p, n / (p / 1000), s / p, p * conc / n / lat, conc;
    }' "$DIR/results"
