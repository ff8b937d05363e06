#!/bin/bash
# KMS rates of the kmip provider against PyKMIP, next to the aws provider against moto,
# measured in the same run on the same cluster.
#
#   bash test/bench/kmip_rate.sh
#
# Builds and installs the extension, starts moto and a PyKMIP server (certificates
# made here, TLS 1.2 with client authentication) on loopback, a preloaded cluster, and
# creates BENCH_KMIP_TENANTS tenants under each provider.  Then, for each provider:
#
#   1. key creation: create_tenant per second (aws: GenerateDataKey; kmip: getrandom
#      plus one KMIP Encrypt, with the key state asked in the same message);
#   2. cold-cache unwrap, one backend: cache flushed, one scan decrypting one row per
#      tenant, DEKs unwrapped per second (one KMS Decrypt each, in sequence, over the
#      backend's one kept connection);
#   3. cold-cache unwrap, BENCH_KMIP_BACKENDS backends scanning together (single-flight:
#      still one Decrypt per DEK, counted by envelope.cache_stats).
#
# Prints one line per figure with the kmip/aws ratio.  Both stand-ins are single Python
# processes, so the figures compare the providers' client paths under the same kind of
# server, not the products.  Reported, never asserted; test/bench/RESULTS.md keeps them.
#
# Knobs: BENCH_KMIP_TENANTS=500, BENCH_KMIP_BACKENDS=4, BENCH_KMIP_PORT=54349,
# ENVELOPE_PYTHON (moto, boto3), ENVELOPE_KMIP_PYTHON (PyKMIP; /usr/bin/python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
N="${BENCH_KMIP_TENANTS:-500}"
BACKENDS="${BENCH_KMIP_BACKENDS:-4}"
PORT="${BENCH_KMIP_PORT:-54349}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

bash "$ROOT/test/install_deps.sh"
PY="${ENVELOPE_PYTHON:-$(python3 -c 'import sys; print(sys.executable)')}"
KPY="${ENVELOPE_KMIP_PYTHON:-/usr/bin/python3}"
"$PY" -c 'import moto.server, boto3' || { echo "$PY cannot import moto and boto3 (set ENVELOPE_PYTHON)" >&2; exit 1; }
"$KPY" -c 'import kmip.pie.client' || { echo "$KPY cannot import PyKMIP (set ENVELOPE_KMIP_PYTHON)" >&2; exit 1; }
command -v pykmip-server >/dev/null || { echo "pykmip-server is not installed" >&2; exit 1; }

make -C "$ROOT" -s -j2 >/dev/null
$SUDO make -C "$ROOT" -s install >/dev/null
PG_BINDIR="$(pg_config --bindir)"

DIR="$(mktemp -d /tmp/pg_envelope_kmip_bench.XXXXXX)"
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
wait_port() {
    for i in $(seq 1 300); do
        "$PY" -c "import socket,sys; socket.create_connection(('127.0.0.1', $1), 1)" 2>/dev/null && return 0
        sleep 0.2
    done
    echo "nothing listens on port $1" >&2; return 1
}

echo "== moto"
MOTO_PORT="$(free_port)"
"$PY" "$ROOT/test/kms/moto_server.py" --port "$MOTO_PORT" --parent-pid $$ --lifetime 3600 > "$DIR/moto.log" 2>&1 &
PIDS+=($!)
wait_port "$MOTO_PORT"
MOTO_URL="http://127.0.0.1:$MOTO_PORT"
AWS_KEY="$("$PY" "$ROOT/test/kms/kms_admin.py" --endpoint "$MOTO_URL" create-key \
    | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["Arn"])')"

echo "== PyKMIP (certificates, server, one master key)"
pki() {
    local name="$1" cn="$2" ca="$3" ext="$4"
    printf '%b\n' "$ext" > "$DIR/$name.ext"
    pg openssl req -new -newkey rsa:2048 -nodes -keyout "$DIR/$name.key" -subj "/CN=$cn" \
        -out "$DIR/$name.csr" 2>/dev/null
    if [ -n "$ca" ]; then
        pg openssl x509 -req -in "$DIR/$name.csr" -CA "$DIR/$ca.crt" -CAkey "$DIR/$ca.key" \
            -CAcreateserial -days 2 -sha256 -extfile "$DIR/$name.ext" -out "$DIR/$name.crt" 2>/dev/null
    else
        pg openssl x509 -req -in "$DIR/$name.csr" -signkey "$DIR/$name.key" -days 2 -sha256 \
            -extfile "$DIR/$name.ext" -out "$DIR/$name.crt" 2>/dev/null
    fi
    pg chmod 600 "$DIR/$name.key"
}
pki ca "bench CA" "" "basicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign"
pki server localhost ca "subjectAltName = IP:127.0.0.1,DNS:localhost\nextendedKeyUsage = serverAuth"
pki client pg_envelope ca "extendedKeyUsage = clientAuth"
KMIP_PORT="$(free_port)"
pg mkdir -p "$DIR/policies"
pg tee "$DIR/pykmip.conf" >/dev/null <<CONF
[server]
hostname=127.0.0.1
port=$KMIP_PORT
certificate_path=$DIR/server.crt
key_path=$DIR/server.key
ca_path=$DIR/ca.crt
auth_suite=TLS1.2
policy_path=$DIR/policies
enable_tls_client_auth=True
logging_level=WARNING
database_path=$DIR/pykmip.db
CONF
pg timeout 3600 pykmip-server -f "$DIR/pykmip.conf" -l "$DIR/pykmip.log" > "$DIR/pykmip.out" 2>&1 &
PIDS+=($!)
wait_port "$KMIP_PORT"
KMIP_KEY="$(pg "$KPY" "$ROOT/test/kms/kmip_admin.py" --host 127.0.0.1 --port "$KMIP_PORT" \
    --ca "$DIR/ca.crt" --cert "$DIR/client.crt" --key "$DIR/client.key" create \
    | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["uid"])')"

echo "== cluster"
pg initdb -D "$DIR/data" -A trust >/dev/null
cat >> "$DIR/data/postgresql.conf" <<CONF
port = $PORT
listen_addresses = ''
unix_socket_directories = '$DIR'
shared_preload_libraries = 'pg_envelope'
envelope.cache_size = $(( 4 * N + 64 ))
envelope.kms_timeout = '30s'
envelope.aws_region = 'us-east-1'
envelope.aws_endpoint = '$MOTO_URL'
envelope.kmip_host = '127.0.0.1'
envelope.kmip_port = $KMIP_PORT
envelope.kmip_ca_file = '$DIR/ca.crt'
envelope.kmip_cert_file = '$DIR/client.crt'
envelope.kmip_key_file = '$DIR/client.key'
CONF
pg pg_ctl -D "$DIR/data" -l "$DIR/server.log" -w start >/dev/null
PSQL=(psql -X -q -A -t -h "$DIR" -p "$PORT" -d postgres -v ON_ERROR_STOP=1)
q() { pg "${PSQL[@]}" -c "$1"; }
q "CREATE EXTENSION pg_envelope" >/dev/null
stat_decrypts() { q "SELECT kms_decrypt_calls FROM envelope.cache_stats"; }

declare -A CREATE_RATE COLD1_RATE COLDN_RATE COLDN_CALLS
for prov in aws kmip; do
    if [ "$prov" = aws ]; then key="$AWS_KEY"; else key="$KMIP_KEY"; fi
    echo "== $prov: $N tenants"
    t0=$(ms_now)
    q "SET envelope.kms_provider = '$prov'; SELECT count(envelope.create_tenant('${prov}_' || i, '$key')) FROM generate_series(1, $N) i" >/dev/null
    ms=$(( $(ms_now) - t0 ))
    CREATE_RATE[$prov]="$(awk -v n="$N" -v ms="$ms" 'BEGIN { printf "%.1f", n * 1000 / ms }')"
    q "CREATE TABLE rows_$prov AS SELECT '${prov}_' || i AS tenant, envelope.encrypt('${prov}_' || i, 'v' || i) AS c FROM generate_series(1, $N) i" >/dev/null

    scan="SELECT count(envelope.decrypt_text(tenant, c)) FROM rows_$prov"
    q "SELECT envelope.cache_flush()" >/dev/null
    t0=$(ms_now)
    q "$scan" >/dev/null
    ms=$(( $(ms_now) - t0 ))
    COLD1_RATE[$prov]="$(awk -v n="$N" -v ms="$ms" 'BEGIN { printf "%.1f", n * 1000 / ms }')"

    q "SELECT envelope.cache_flush()" >/dev/null
    before="$(stat_decrypts)"
    pids=()
    t0=$(ms_now)
    for b in $(seq 1 "$BACKENDS"); do pg "${PSQL[@]}" -c "$scan" >/dev/null & pids+=($!); done
    wait "${pids[@]}"
    ms=$(( $(ms_now) - t0 ))
    COLDN_CALLS[$prov]=$(( $(stat_decrypts) - before ))
    COLDN_RATE[$prov]="$(awk -v n="$N" -v ms="$ms" 'BEGIN { printf "%.1f", n * 1000 / ms }')"
done

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
echo
echo "kmip (PyKMIP) against aws (moto), $N tenants each:"
printf '  key creation (create_tenant/s):           kmip %8s   aws %8s   kmip/aws %s\n' \
    "${CREATE_RATE[kmip]}" "${CREATE_RATE[aws]}" "$(ratio "${CREATE_RATE[kmip]}" "${CREATE_RATE[aws]}")"
printf '  cold-cache unwrap, 1 backend (DEKs/s):    kmip %8s   aws %8s   kmip/aws %s\n' \
    "${COLD1_RATE[kmip]}" "${COLD1_RATE[aws]}" "$(ratio "${COLD1_RATE[kmip]}" "${COLD1_RATE[aws]}")"
printf '  cold-cache unwrap, %d backends (DEKs/s):   kmip %8s   aws %8s   kmip/aws %s\n' "$BACKENDS" \
    "${COLDN_RATE[kmip]}" "${COLDN_RATE[aws]}" "$(ratio "${COLDN_RATE[kmip]}" "${COLDN_RATE[aws]}")"
printf '  KMS Decrypt calls in the %d-backend scan:   kmip %8s   aws %8s   (target: %d each, single-flight)\n' "$BACKENDS" \
    "${COLDN_CALLS[kmip]}" "${COLDN_CALLS[aws]}" "$N"
