#!/bin/bash
# pg_envelope benchmark: every figure against a baseline measured in the same run.
#
#   bash test/bench/run.sh
#
# Builds and installs the extension, starts its own preloaded cluster (local provider
# for the row-path data, the aws provider against moto behind test/kms/fault_proxy.py
# for the KMS figures) and measures, in one run:
#
#   1. the raw AES-256-GCM floor: test/bench/cipher_floor.c over src/cipher.c (fixed
#      key, cached contexts; also 1,000 keys in turn), µs per 32 B and 1 KB value;
#   2. µs per row in one warmed session, net of the scan floor octet_length(col):
#      md5(), envelope.encrypt / decrypt_text (rows cycling through 1,000 tenants, and
#      sorted by tenant: the difference is the cost of switching tenant per row),
#      pgcrypto encrypt()/decrypt(), pgp_sym_encrypt/decrypt, on ~32-byte and ~1 KB
#      values; envelope.encrypt_deterministic and envelope.blind_index when the
#      installed extension has them (a loud NOT MEASURED line otherwise);
#   3. pgbench, 2 clients: point lookup by primary key with and without decrypt (TPS);
#   4. 2 clients each decrypting a full scan against 1 client (scaling);
#   5. backend memory over repeated 1M-row decrypts (pg_backend_memory_contexts in the
#      session, pg_log_backend_memory_contexts during one long scan);
#   6. key creation against moto (keys/s) against boto3's GenerateDataKey rate on the
#      same moto, and the cost of one rotate_tenant_key;
#   7. KMS economy: cache flushed, 8 backends decrypting rows of 1,000 aws tenants
#      together: KMS Decrypt calls counted by the proxy, and wall time (through the
#      proxy, and again straight to moto, counted by envelope.cache_stats);
#   8. envelope.rewrap (KMS ReEncrypt) against boto3's ReEncrypt rate on the same moto,
#      and envelope.reencrypt's rows/s against one UPDATE doing the same;
#   9. shared memory per cached key (pg_shmem_allocations);
#  10. the tenant sweep, test/bench/tenant_sweep.sh (also runs alone): µs per row of
#      decrypt_text and encrypt as rows cycle through 1,000 to 100,000 tenants,
#      backend memory, KMS calls of two scans over 20,000 tenants with the default
#      cache size, and reencrypt over interleaved tenants (BENCH_SWEEP=0 skips it).
#
# Prints one line per figure with its ratio to its baseline and writes
# test/bench/out/results.json.  Figures are reported, never asserted.  The defaults take
# about 6.5 minutes on a 2-vCPU machine, plus about 2 for the tenant sweep; test/bench/RESULTS.md keeps the latest results.
#
# Knobs (environment):
#   BENCH_ROWS=1000000        rows of ~32-byte values
#   BENCH_KB_ROWS=1000000     rows of ~1 KB values
#   BENCH_RUNS=3              runs of every timed query (min and median reported)
#   BENCH_PGP_ROWS=10000      rows for pgp_sym_encrypt / pgp_sym_decrypt
#   BENCH_FLOOR_COUNT=1000000 values per run of the C floor
#   BENCH_PGBENCH_SECONDS=10  per pgbench run; BENCH_PGBENCH_ROUNDS=5 rounds of plain + decrypt
#   BENCH_CREATE_TENANTS=10000 tenants created against moto (at least BENCH_KMS_TENANTS)
#   BENCH_BOTO_CALLS=2000     boto3 GenerateDataKey calls for moto's own rate
#   BENCH_KMS_TENANTS=1000    tenants touched in the cold phase
#   BENCH_KMS_BACKENDS=8      backends in the cold phase
#   BENCH_ROTATIONS=100       rotate_tenant_key calls timed
#   BENCH_REWRAP_TENANTS=1000 tenants moved to another master key by envelope.rewrap
#   BENCH_REENCRYPT_ROWS=200000 rows re-encrypted by envelope.reencrypt (and by one UPDATE)
#   BENCH_CACHE_SIZE=16384    envelope.cache_size of the cluster
#   BENCH_PORT=54339          ENVELOPE_PYTHON: interpreter with moto and boto3
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
ROWS="${BENCH_ROWS:-1000000}"
KB_ROWS="${BENCH_KB_ROWS:-1000000}"
RUNS="${BENCH_RUNS:-3}"
PGP_ROWS="${BENCH_PGP_ROWS:-10000}"
FLOOR_COUNT="${BENCH_FLOOR_COUNT:-1000000}"
PGB_SECONDS="${BENCH_PGBENCH_SECONDS:-10}"
KMS_TENANTS="${BENCH_KMS_TENANTS:-1000}"
KMS_BACKENDS="${BENCH_KMS_BACKENDS:-8}"
CREATE_TENANTS="${BENCH_CREATE_TENANTS:-10000}"
BOTO_CALLS="${BENCH_BOTO_CALLS:-2000}"
ROTATIONS="${BENCH_ROTATIONS:-100}"
REWRAP_TENANTS="${BENCH_REWRAP_TENANTS:-1000}"
REENC_ROWS="${BENCH_REENCRYPT_ROWS:-200000}"
CACHE_SIZE="${BENCH_CACHE_SIZE:-16384}"
PORT="${BENCH_PORT:-54339}"
[ "$CREATE_TENANTS" -ge "$KMS_TENANTS" ] || CREATE_TENANTS="$KMS_TENANTS"
[ "$ROTATIONS" -le "$CREATE_TENANTS" ] || ROTATIONS="$CREATE_TENANTS"
[ "$PGP_ROWS" -le "$ROWS" ] || PGP_ROWS="$ROWS"
[ "$REWRAP_TENANTS" -le "$CREATE_TENANTS" ] || REWRAP_TENANTS="$CREATE_TENANTS"
[ "$REENC_ROWS" -le "$ROWS" ] || REENC_ROWS="$ROWS"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
START_S=$(date +%s)

bash "$ROOT/test/install_deps.sh"
PY="${ENVELOPE_PYTHON:-$(python3 -c 'import sys; print(sys.executable)')}"
"$PY" -c 'import moto.server, boto3' || { echo "$PY cannot import moto and boto3 (set ENVELOPE_PYTHON)" >&2; exit 1; }

# Build and install (the tree may be mid-change: retry a few times).
for attempt in 1 2 3 4; do
    if make -C "$ROOT" -s -j2 >/dev/null && $SUDO make -C "$ROOT" -s install >/dev/null; then break; fi
    [ "$attempt" -lt 4 ] || { echo "build failed" >&2; exit 1; }
    echo "build failed; retrying in 60 s" >&2
    sleep 60
done
PG_BINDIR="$(pg_config --bindir)"
OUT="$ROOT/test/bench/out"
mkdir -p "$OUT"

# The C floor, with the flags of `make unit`.
UNIT_CFLAGS="$(make -C "$ROOT" -s --no-print-directory \
    --eval='bench-unit-cflags: ; @echo $(UNIT_CFLAGS)' bench-unit-cflags)"
(cd "$ROOT" && ${CC:-cc} $UNIT_CFLAGS -o "$OUT/cipher_floor" test/bench/cipher_floor.c src/cipher.c src/gcm_dispatch.c -lssl -lcrypto)

DIR="$(mktemp -d /tmp/pg_envelope_bench.XXXXXX)"
chmod 755 "$DIR"
if [ "$(id -u)" -eq 0 ]; then chown postgres: "$DIR"; AS_PG=(runuser -u postgres --); else AS_PG=(); fi
# The server user's commands start in the working directory: one it can enter.
cd "$DIR"
# The server's environment: credentials for moto (which accepts any while its
# authentication is off), nothing from the caller's AWS settings.
pg() {
    "${AS_PG[@]}" env -u AWS_PROFILE -u AWS_SESSION_TOKEN -u AWS_CONFIG_FILE \
        -u AWS_SHARED_CREDENTIALS_FILE PATH="$PG_BINDIR:$PATH" \
        AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_EC2_METADATA_DISABLED=true "$@"
}
MOTO_PID=""; PROXY_PID=""
stop() {
    pg pg_ctl -D "$DIR/data" -m fast stop >/dev/null 2>&1 || true
    pg pg_ctl -D "$DIR/probe" -m fast stop >/dev/null 2>&1 || true
    [ -z "$PROXY_PID" ] || kill "$PROXY_PID" 2>/dev/null || true
    [ -z "$MOTO_PID" ] || kill "$MOTO_PID" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$DIR"
}
trap stop EXIT
ms_now() { echo $(( $(date +%s%N) / 1000000 )); }
# /proc/stat's cpu line before and after a phase: the share of steal time (the VM's
# vCPUs running something else) tells a noisy phase from a slow one.
cpu_snapshot() { head -n 1 /proc/stat > "$DIR/cpu_$1"; }
phase() { echo "== [$(( $(date +%s) - START_S )) s] $*"; }

# ---------------------------------------------------------------------------
phase "raw AES-256-GCM floor (C, $FLOOR_COUNT values x $RUNS runs)"
"$OUT/cipher_floor" "$FLOOR_COUNT" "$RUNS" > "$DIR/floor.jsonl"

# ---------------------------------------------------------------------------
phase "moto and the fault proxy"
MOTO_PORT="$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
"$PY" "$ROOT/test/kms/moto_server.py" --port "$MOTO_PORT" --parent-pid $$ --lifetime 3600 \
    > "$DIR/moto.log" 2>&1 &
MOTO_PID=$!
MOTO_URL="http://127.0.0.1:$MOTO_PORT"
for i in $(seq 1 150); do
    curl -s -o /dev/null "$MOTO_URL/moto-api/" && break
    [ "$i" -lt 150 ] || { echo "moto did not start" >&2; cat "$DIR/moto.log" >&2; exit 1; }
    sleep 0.2
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
KMS_KEY="$("$PY" "$ROOT/test/kms/kms_admin.py" --endpoint "$MOTO_URL" create-key \
    | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["Arn"])')"
KMS_KEY2="$("$PY" "$ROOT/test/kms/kms_admin.py" --endpoint "$MOTO_URL" create-key \
    | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["Arn"])')"
proxy_counts() { curl -s "$PROXY_URL/_counts"; }
proxy_reset() { curl -s -X POST -d '{}' "$PROXY_URL/_reset" >/dev/null; }

# ---------------------------------------------------------------------------
phase "cluster"
pg initdb -D "$DIR/data" -A trust >/dev/null
pg bash -c "umask 077; openssl rand -hex 32 > '$DIR/master.key'"
cat >> "$DIR/data/postgresql.conf" <<CONF
port = $PORT
listen_addresses = ''
unix_socket_directories = '$DIR'
shared_preload_libraries = 'pg_envelope'
envelope.local_master_key_file = '$DIR/master.key'
envelope.cache_size = $CACHE_SIZE
envelope.aws_region = 'us-east-1'
envelope.aws_endpoint = '$PROXY_URL'
shared_buffers = 3GB
max_parallel_workers_per_gather = 0
jit = off
log_line_prefix = '%m [%p] '
CONF
pg pg_ctl -D "$DIR/data" -l "$DIR/server.log" -w start >/dev/null
PSQL=(psql -h "$DIR" -p "$PORT" -d postgres -X -q -v ON_ERROR_STOP=1)
q() { pg "${PSQL[@]}" -At -c "$1"; }

PGC_KEY="'\\x000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f'::bytea"
echo "loading $ROWS rows of ~32 B and $KB_ROWS rows of ~1 KB across 1000 tenants..."
t0=$(ms_now)
pg "${PSQL[@]}" >/dev/null <<SQL
CREATE EXTENSION pg_envelope;
CREATE EXTENSION pgcrypto;
SELECT count(envelope.create_tenant('tenant' || i)) FROM generate_series(1, 1000) i;
-- row i belongs to tenant i % 1000 + 1: every row changes tenant (the worst case)
CREATE TABLE plain AS
SELECT i AS id, 'tenant' || (i % 1000 + 1) AS tenant, md5(i::text) AS v          -- 32 bytes
  FROM generate_series(1, $ROWS) i;
CREATE TABLE plain_kb AS
SELECT i AS id, 'tenant' || (i % 1000 + 1) AS tenant, repeat(md5(i::text), 32) AS v  -- 1024 bytes, stored inline
  FROM generate_series(1, $KB_ROWS) i;
CREATE TABLE sealed AS SELECT id, tenant, envelope.encrypt(tenant, v) AS c FROM plain;
ALTER TABLE sealed ADD PRIMARY KEY (id);
CREATE TABLE sealed_sorted AS SELECT * FROM sealed ORDER BY tenant, id;
CREATE TABLE plain_sorted AS SELECT * FROM plain ORDER BY tenant, id;
CREATE TABLE sealed_kb AS SELECT id, tenant, envelope.encrypt(tenant, v) AS c FROM plain_kb;
CREATE TABLE pgc AS SELECT id, encrypt(convert_to(v, 'UTF8'), $PGC_KEY, 'aes') AS c FROM plain;
CREATE TABLE pgp_plain AS SELECT * FROM plain WHERE id <= $PGP_ROWS;
CREATE TABLE pgp_sealed AS SELECT id, pgp_sym_encrypt(v, 'passphrase') AS c FROM pgp_plain;
VACUUM ANALYZE;
SQL
LOAD_MS=$(( $(ms_now) - t0 ))

# Deterministic encryption and blind index: measured only when present and working.
DET_STATUS="absent"; BLIND_STATUS="absent"
if [ "$(q "SELECT count(*) FROM pg_proc WHERE pronamespace = 'envelope'::regnamespace AND proname = 'encrypt_deterministic'")" != 0 ]; then
    if q "SELECT envelope.encrypt_deterministic('tenant1', 'probe') IS NOT NULL" >/dev/null 2>"$DIR/det.err"; then
        DET_STATUS="measured"
    else
        DET_STATUS="present but failed: $(head -n 1 "$DIR/det.err")"
    fi
fi
if [ "$(q "SELECT count(*) FROM pg_proc WHERE pronamespace = 'envelope'::regnamespace AND proname = 'blind_index'")" != 0 ]; then
    if q "SELECT envelope.blind_index('tenant1', 'probe') IS NOT NULL" >/dev/null 2>"$DIR/blind.err"; then
        BLIND_STATUS="measured"
    else
        BLIND_STATUS="present but failed: $(head -n 1 "$DIR/blind.err")"
    fi
fi
for f in "encrypt_deterministic:$DET_STATUS" "blind_index:$BLIND_STATUS"; do
    [ "${f#*:}" = measured ] || echo "!!!!! envelope.${f%%:*} NOT MEASURED: ${f#*:} !!!!!"
done

# ---------------------------------------------------------------------------
# One session runs every query RUNS times (after a warm-up read of every table and a
# decrypt of every key) and prints "BENCH label" before each timing.
phase "cost per row ($RUNS runs)"
QUERIES=(
  "floor|SELECT count(octet_length(v)) FROM plain"
  "md5|SELECT count(md5(v)) FROM plain"
  "encrypt|SELECT count(envelope.encrypt(tenant, v)) FROM plain"
  "psorted_floor|SELECT count(octet_length(v)) FROM plain_sorted"
  "encrypt_sorted|SELECT count(envelope.encrypt(tenant, v)) FROM plain_sorted"
  "decrypt_floor|SELECT count(octet_length(c)) FROM sealed"
  "decrypt|SELECT count(envelope.decrypt_text(tenant, c)) FROM sealed"
  "sorted_floor|SELECT count(octet_length(c)) FROM sealed_sorted"
  "decrypt_sorted|SELECT count(envelope.decrypt_text(tenant, c)) FROM sealed_sorted"
  "pgcrypto_encrypt|SELECT count(encrypt(convert_to(v, 'UTF8'), $PGC_KEY, 'aes')) FROM plain"
  "pgc_floor|SELECT count(octet_length(c)) FROM pgc"
  "pgcrypto_decrypt|SELECT count(convert_from(decrypt(c, $PGC_KEY, 'aes'), 'UTF8')) FROM pgc"
  "pgp_floor|SELECT count(octet_length(v)) FROM pgp_plain"
  "pgp_sym_encrypt|SELECT count(pgp_sym_encrypt(v, 'passphrase')) FROM pgp_plain"
  "pgp_dec_floor|SELECT count(octet_length(c)) FROM pgp_sealed"
  "pgp_sym_decrypt|SELECT count(pgp_sym_decrypt(c, 'passphrase')) FROM pgp_sealed"
  "kb_floor|SELECT count(octet_length(v)) FROM plain_kb"
  "kb_md5|SELECT count(md5(v)) FROM plain_kb"
  "kb_encrypt|SELECT count(envelope.encrypt(tenant, v)) FROM plain_kb"
  "kb_decrypt_floor|SELECT count(octet_length(c)) FROM sealed_kb"
  "kb_decrypt|SELECT count(envelope.decrypt_text(tenant, c)) FROM sealed_kb"
  "kb_pgcrypto_encrypt|SELECT count(encrypt(convert_to(v, 'UTF8'), $PGC_KEY, 'aes')) FROM plain_kb"
)
[ "$DET_STATUS" != measured ] || QUERIES+=(
  "deterministic|SELECT count(envelope.encrypt_deterministic(tenant, v)) FROM plain"
  "kb_deterministic|SELECT count(envelope.encrypt_deterministic(tenant, v)) FROM plain_kb")
[ "$BLIND_STATUS" != measured ] || QUERIES+=(
  "blind_index|SELECT count(envelope.blind_index(tenant, v)) FROM plain")
{
  echo '\timing on'
  for t in plain plain_sorted plain_kb sealed sealed_sorted sealed_kb pgc pgp_plain pgp_sealed; do
    echo "SELECT count(*) FROM $t;"
  done
  echo "SELECT count(envelope.decrypt_text(tenant, c)) FROM sealed;"   # every key, warm
  for r in $(seq 1 "$RUNS"); do
    for qq in "${QUERIES[@]}"; do
      echo "\\echo BENCH ${qq%%|*}"
      echo "${qq#*|};"
    done
  done
} > "$DIR/bench.sql"
chmod 644 "$DIR/bench.sql"
pg "${PSQL[@]}" -f "$DIR/bench.sql" > "$DIR/bench.out"

# ---------------------------------------------------------------------------
phase "pgbench, 2 clients, point lookups (${PGB_SECONDS} s per run)"
printf '\\set id random(1, %d)\nSELECT tenant, c FROM sealed WHERE id = :id;\n' "$ROWS" > "$DIR/lookup_plain.sql"
printf '\\set id random(1, %d)\nSELECT envelope.decrypt_text(tenant, c) FROM sealed WHERE id = :id;\n' "$ROWS" > "$DIR/lookup_decrypt.sql"
chmod 644 "$DIR"/lookup_*.sql
: > "$DIR/pgbench.out"
cpu_snapshot pgbench_0
for round in $(seq 1 "${BENCH_PGBENCH_ROUNDS:-5}"); do
    for kind in plain decrypt; do
        tps="$(pg pgbench -h "$DIR" -p "$PORT" -n -M prepared -c 2 -j 2 -T "$PGB_SECONDS" \
            -f "$DIR/lookup_$kind.sql" postgres 2>/dev/null \
            | sed -n 's/^tps = \([0-9.]*\) (without initial connection time)/\1/p')"
        echo "$kind $tps" >> "$DIR/pgbench.out"
    done
done
cpu_snapshot pgbench_1

# ---------------------------------------------------------------------------
phase "2 clients decrypting full scans together vs 1"
# Each client is a fresh session that first reads the table (first-touch page faults of
# shared buffers are per process) and loads every tenant's key into its L1, then waits
# for a common start time; the timed scan is measured by the session itself, and the
# pair's time is the slower of the two.
SCAN_RUNS=$(( RUNS > 5 ? RUNS : 5 ))
scan_client() {   # $1: start time (epoch seconds), $2: per-row expression; prints the scan's ms
    pg "${PSQL[@]}" <<SQL | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p'
SELECT count(*) FROM sealed;
SELECT count(envelope.decrypt_text(tenant, c)) FROM sealed WHERE id <= 2000;
SELECT pg_sleep(greatest(0, $1 - extract(epoch FROM clock_timestamp())));
\\timing on
SELECT count($2) FROM sealed;
SQL
}
# The same with md5(c) as a control: how far any CPU-bound per-row function scales on
# this machine (2 vCPUs), whatever pg_envelope does.
scaling_once() {   # $1: expression, $2: prefix of the output files
    local start p1 p2
    scan_client "$(( $(date +%s) + 2 ))" "$1" >> "$DIR/$2_single"
    start=$(( $(date +%s) + 2 ))
    scan_client "$start" "$1" > "$DIR/pair_a" & p1=$!
    scan_client "$start" "$1" > "$DIR/pair_b" & p2=$!
    wait $p1 $p2
    cat "$DIR/pair_a" "$DIR/pair_b" | sort -g | tail -n 1 >> "$DIR/$2_pair"
}
# decrypt and control interleaved, so that both see the same machine
: > "$DIR/scan_single"; : > "$DIR/scan_pair"; : > "$DIR/md5scan_single"; : > "$DIR/md5scan_pair"
cpu_snapshot scaling_0
for r in $(seq 1 "$SCAN_RUNS"); do
    scaling_once "envelope.decrypt_text(tenant, c)" scan
    scaling_once "md5(c)" md5scan
done
cpu_snapshot scaling_1
single=($(cat "$DIR/scan_single")); pair=($(cat "$DIR/scan_pair"))

# ---------------------------------------------------------------------------
phase "backend memory over repeated decrypts"
memq="SELECT 'MEM', sum(total_bytes), sum(used_bytes), (SELECT total_bytes FROM pg_backend_memory_contexts WHERE name = 'pg_envelope key cache') FROM pg_backend_memory_contexts"
{
  echo "SELECT count(envelope.decrypt_text(tenant, c)) FROM sealed;"
  echo "$memq;"
  for i in 1 2 3; do
    echo "SELECT count(envelope.decrypt_text(tenant, c)) FROM sealed;"
    echo "$memq;"
  done
  echo "SELECT count(envelope.encrypt(tenant, v)) FROM plain;"
  echo "$memq;"
  echo "SELECT count(envelope.encrypt(tenant, v)) FROM plain;"
  echo "$memq;"
} > "$DIR/mem.sql"
chmod 644 "$DIR/mem.sql"
pg "${PSQL[@]}" -At -F ' ' -f "$DIR/mem.sql" | grep '^MEM' > "$DIR/mem_session.out"

# During one long scan: another session asks the scanning backend to log its memory
# contexts (pg_log_backend_memory_contexts) several times; the "Grand total" lines of
# that backend in the server log show whether memory grows with rows.
REPEAT=$(( (4000000 + ROWS - 1) / ROWS ))
long="SELECT count(envelope.decrypt_text(s.tenant, s.c)) FROM sealed s CROSS JOIN generate_series(1, $REPEAT) g"
LOG_LINES_BEFORE=$(wc -l < "$DIR/server.log")
t_start=$(ms_now)
pg "${PSQL[@]}" -c "$long" >/dev/null &
long_pid=$!
scan_pid=""
for i in $(seq 1 100); do
    scan_pid="$(q "SELECT pid FROM pg_stat_activity WHERE query LIKE '%CROSS JOIN generate_series%' AND pid <> pg_backend_pid() LIMIT 1")"
    [ -z "$scan_pid" ] || break
    sleep 0.05
done
: > "$DIR/mem_probe_times"
if [ -n "$scan_pid" ]; then
    for k in 1 2 3 4 5; do
        sleep 0.3
        kill -0 "$long_pid" 2>/dev/null || break
        q "SELECT pg_log_backend_memory_contexts($scan_pid)" >/dev/null 2>&1 || true
        echo "$(( $(ms_now) - t_start ))" >> "$DIR/mem_probe_times"
    done
fi
wait "$long_pid"
LONG_MS=$(( $(ms_now) - t_start ))
sleep 0.5
tail -n +"$((LOG_LINES_BEFORE + 1))" "$DIR/server.log" | grep -F "[$scan_pid]" | grep 'Grand total' > "$DIR/mem_probe.out" || true

# ---------------------------------------------------------------------------
phase "key creation: $CREATE_TENANTS tenants against moto; boto3: $BOTO_CALLS calls"
# Key creation and rotation talk to moto directly (envelope.aws_endpoint is set per
# session): the fault proxy adds ~45 ms to every request (see RESULTS.md), which would
# measure the proxy, not pg_envelope.  Calls are counted by envelope.cache_stats.
AWS_DIRECT="SET envelope.kms_provider = 'aws'; SET envelope.kms_key = '$KMS_KEY'; SET envelope.aws_endpoint = '$MOTO_URL';"
stats() { q "SELECT row_to_json(s) FROM envelope.cache_stats s"; }
stats > "$DIR/create_stats0.json"
t0=$(ms_now)
q "$AWS_DIRECT SELECT count(envelope.create_tenant('k' || i)) FROM generate_series(1, $CREATE_TENANTS) i" >/dev/null
CREATE_MS=$(( $(ms_now) - t0 ))
stats > "$DIR/create_stats1.json"
"$PY" "$ROOT/test/bench/kms_rate.py" --endpoint "$MOTO_URL" --key "$KMS_KEY" --count "$BOTO_CALLS" \
    --dest-key "$KMS_KEY2" > "$DIR/boto_direct.json"
"$PY" "$ROOT/test/bench/kms_rate.py" --endpoint "$PROXY_URL" --key "$KMS_KEY" --count 50 > "$DIR/boto_proxy.json"

# ---------------------------------------------------------------------------
phase "rotate_tenant_key x $ROTATIONS"
{
  echo "$AWS_DIRECT"
  echo '\timing on'
  for i in $(seq 1 "$ROTATIONS"); do echo "SELECT envelope.rotate_tenant_key('k$i');"; done
} > "$DIR/rotate.sql"
chmod 644 "$DIR/rotate.sql"
stats > "$DIR/rotate_stats0.json"
pg "${PSQL[@]}" -f "$DIR/rotate.sql" | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' > "$DIR/rotate.out"
stats > "$DIR/rotate_stats1.json"

# ---------------------------------------------------------------------------
phase "KMS economy: cache flushed, $KMS_BACKENDS backends over $KMS_TENANTS aws tenants"
# Tenants k1..k$KMS_TENANTS; the first $ROTATIONS of them have a version 2, the rows
# use the active version (one DEK per tenant).
q "$AWS_DIRECT CREATE TABLE kms_rows AS SELECT g AS id, 'k' || (g % $KMS_TENANTS + 1) AS tenant,
          envelope.encrypt('k' || (g % $KMS_TENANTS + 1), md5(g::text)) AS c
     FROM generate_series(1, $((KMS_TENANTS * 10))) g" >/dev/null
q "VACUUM ANALYZE kms_rows" >/dev/null
kms_scan="SELECT count(envelope.decrypt_text(tenant, c)) FROM kms_rows"
# All backends start together and scan in the same order: they miss the same key at
# the same moment, which is what single-flight must absorb.
kms_phase() {
    local pids=() t0 t1
    t0=$(ms_now)
    for b in $(seq 1 "$KMS_BACKENDS"); do pg env PGOPTIONS="$1" "${PSQL[@]}" -c "$kms_scan" >/dev/null & pids+=($!); done
    wait "${pids[@]}"
    t1=$(ms_now)
    echo $(( t1 - t0 ))
}
# through the proxy, which counts the calls
q "SELECT envelope.cache_flush()" >/dev/null
proxy_reset
stats > "$DIR/cold_stats0.json"
COLD_MS="$(kms_phase "")"
proxy_counts > "$DIR/cold_counts.json"
stats > "$DIR/cold_stats1.json"
proxy_reset
WARM_MS="$(kms_phase "")"
proxy_counts > "$DIR/warm_counts.json"
# the same straight to moto, counted by envelope.cache_stats
q "SELECT envelope.cache_flush()" >/dev/null
stats > "$DIR/direct_stats0.json"
DIRECT_MS="$(kms_phase "-c envelope.aws_endpoint=$MOTO_URL")"
stats > "$DIR/direct_stats1.json"

# ---------------------------------------------------------------------------
phase "rewrap: $REWRAP_TENANTS aws tenants to another master key"
stats > "$DIR/rewrap_stats0.json"
t0=$(ms_now)
REWRAPPED="$(q "$AWS_DIRECT SELECT sum(envelope.rewrap('$KMS_KEY2', 'k' || i)) FROM generate_series(1, $REWRAP_TENANTS) i" | tail -n 1)"
REWRAP_MS=$(( $(ms_now) - t0 ))
stats > "$DIR/rewrap_stats1.json"

# ---------------------------------------------------------------------------
phase "re-encryption of $REENC_ROWS rows after rotating 1000 tenants (local provider)"
# envelope.reencrypt (committed batches of 10,000 rows) against one UPDATE doing the
# same decrypt + encrypt of every row, both on a fresh copy of the same rows.
q "CREATE TABLE reenc_a AS SELECT * FROM sealed WHERE id <= $REENC_ROWS" >/dev/null
q "CREATE TABLE reenc_b AS SELECT * FROM sealed WHERE id <= $REENC_ROWS" >/dev/null
q "VACUUM ANALYZE reenc_a" >/dev/null; q "VACUUM ANALYZE reenc_b" >/dev/null
q "SELECT count(*) FROM reenc_a; SELECT count(*) FROM reenc_b" >/dev/null
q "SELECT count(envelope.rotate_tenant_key('tenant' || i)) FROM generate_series(1, 1000) i" >/dev/null
t0=$(ms_now)
pg "${PSQL[@]}" -c "CALL envelope.reencrypt('reenc_a', 'c', 'tenant', 10000)" >/dev/null 2>&1
REENC_MS=$(( $(ms_now) - t0 ))
REENC_LEFT="$(q "SELECT count(*) FROM reenc_a WHERE envelope.key_version(c) <> envelope.active_key_version(tenant)")"
t0=$(ms_now)
q "UPDATE reenc_b SET c = envelope.encrypt(tenant, envelope.decrypt(tenant, c))" >/dev/null
UPDATE_MS=$(( $(ms_now) - t0 ))

# ---------------------------------------------------------------------------
phase "shared memory per cached key"
q "SELECT coalesce(name, '<anonymous>') || '|' || allocated_size FROM pg_shmem_allocations WHERE name LIKE 'pg_envelope%'" > "$DIR/shmem_named.out"
# The shared hash's entries are carved out at start-up as unnamed allocations: the
# marginal cost of one cache slot is the slope of the whole segment's allocations
# between two otherwise identical clusters with different envelope.cache_size.
pg initdb -D "$DIR/probe" -A trust >/dev/null
PROBE_PORT=$((PORT + 1))
: > "$DIR/shmem_slope.out"
for size in 1024 $CACHE_SIZE; do
    cat > "$DIR/probe/postgresql.auto.conf" <<CONF
port = $PROBE_PORT
listen_addresses = ''
unix_socket_directories = '$DIR'
shared_preload_libraries = 'pg_envelope'
envelope.local_master_key_file = '$DIR/master.key'
envelope.cache_size = $size
CONF
    pg pg_ctl -D "$DIR/probe" -l "$DIR/probe.log" -w start >/dev/null
    echo "$size $(pg psql -h "$DIR" -p "$PROBE_PORT" -d postgres -X -At -c "SELECT sum(allocated_size) FROM pg_shmem_allocations") $(pg psql -h "$DIR" -p "$PROBE_PORT" -d postgres -X -At -c "SELECT sum(allocated_size) FROM pg_shmem_allocations WHERE name LIKE 'pg_envelope key cache%'")" >> "$DIR/shmem_slope.out"
    pg pg_ctl -D "$DIR/probe" -m fast stop >/dev/null
done

# ---------------------------------------------------------------------------
PGVER="$(q "SELECT version()")"
COMMIT="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
[ -z "$(git -C "$ROOT" status --porcelain -- src sql Makefile 2>/dev/null)" ] || COMMIT="$COMMIT+uncommitted changes in src/sql"
TOTAL_S=$(( $(date +%s) - START_S ))
"$PY" "$ROOT/test/bench/report.py" \
    --dir "$DIR" --dest "$OUT/results.json" \
    --rows "$ROWS" --kb-rows "$KB_ROWS" --pgp-rows "$PGP_ROWS" --runs "$RUNS" \
    --single "${single[*]}" --pair "${pair[*]}" \
    --create-tenants "$CREATE_TENANTS" --create-ms "$CREATE_MS" \
    --kms-tenants "$KMS_TENANTS" --kms-backends "$KMS_BACKENDS" --cold-ms "$COLD_MS" --warm-ms "$WARM_MS" --direct-ms "$DIRECT_MS" --rotations "$ROTATIONS" \
    --rewrap-tenants "$REWRAP_TENANTS" --rewrapped "${REWRAPPED:-0}" --rewrap-ms "$REWRAP_MS" \
    --reenc-rows "$REENC_ROWS" --reenc-ms "$REENC_MS" --reenc-left "${REENC_LEFT:-0}" --update-ms "$UPDATE_MS" \
    --cache-size "$CACHE_SIZE" --long-ms "$LONG_MS" --long-rows $(( ROWS * REPEAT )) \
    --det-status "$DET_STATUS" --blind-status "$BLIND_STATUS" \
    --pg-version "$PGVER" --commit "$COMMIT" --load-ms "$LOAD_MS" --total-s "$TOTAL_S" --pgbench-seconds "$PGB_SECONDS"

# ---------------------------------------------------------------------------
if [ "${BENCH_SWEEP:-1}" != 0 ]; then
    phase "tenant sweep (test/bench/tenant_sweep.sh)"
    ENVELOPE_PYTHON="$PY" bash "$ROOT/test/bench/tenant_sweep.sh"
fi
