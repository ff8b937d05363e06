#!/bin/bash
# Instructions per row of a re-encryption batch's UPDATE, split by function (callgrind).
#
#   bash test/bench/profile_reencrypt.sh        PROFILE_ROWS=20000, BENCH_PORT=54348
#
# Starts its own preloaded cluster (local provider, 1,000 tenants, rows cycling through
# them as in fleet.sh), rotates every tenant, and runs in one single-user backend under
# callgrind, after a warm-up that loads every old and new key into the backend's cache:
#   1. UPDATE u SET c = c                                       (fleet.sh's baseline)
#   2. UPDATE t SET c = envelope.reencrypt_value(tenant, c, NULL)
#        WHERE envelope.needs_reencryption(c, tenant)           (a batch's statement)
# Each statement is dumped on its own (--dump-after=standard_ExecutorRun), so the
# figures are one statement's instructions divided by its rows: what a batch costs per
# row once the keys are cached, without the run's fixed costs (first key-store reads,
# key set-up, commits).  Prints the totals and the inclusive cost per row of the
# functions named below; the raw files go to test/bench/out/callgrind_reencrypt.*.
#
# PROFILE_WHOLE_RUN=1: the whole of one `CALL envelope.reencrypt_all(10000)` instead,
# fixed costs included, as fleet.sh's second round meets it: the cluster is set up
# like fleet.sh's (table fleet_a registered, rotated and re-encrypted once, a plain
# copy fleet_b), every tenant rotated again, the server stopped, and then
#   a. CALL envelope.reencrypt_all(10000)      (a fresh single-user backend)
#   b. UPDATE fleet_b SET c = c                 (another one)
# each collected whole.  A fresh backend (and a fresh shared cache: single-user mode
# creates its own) pays every first touch of every tenant once: key store reads, DEK
# unwraps, context set-up.  Then, from a copy of the cluster taken before that
# rotation, as fleet.sh has it (the rotation's new DEKs in the shared cache):
#   c. CALL envelope.rotate_keys(older_than => '0'), then CALL envelope.reencrypt_all(10000)
#   d. the rotation alone
# in one single-user backend each; c - d is the re-encryption after a rotation in the
# same cluster.  Prints instructions per row of a, b and c - d, and the calls and
# inclusive instructions of the functions that do the first-touch work in a and c;
# PROFILE_ROWS defaults to 200,000 in this mode.  Raw files:
# test/bench/out/callgrind_whole.{reencrypt_all,plain_update,rotate_reencrypt,rotate}.out.
#
# Expects the extension built and installed (fleet.sh or run.sh does that).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
WHOLE_RUN="${PROFILE_WHOLE_RUN:-0}"
if [ "$WHOLE_RUN" = 1 ]; then ROWS="${PROFILE_ROWS:-200000}"; else ROWS="${PROFILE_ROWS:-20000}"; fi
PORT="${BENCH_PORT:-54348}"
PG_BINDIR="$(pg_config --bindir)"
OUT="$ROOT/test/bench/out"
mkdir -p "$OUT"
command -v valgrind >/dev/null || { echo "valgrind not installed: cannot profile" >&2; exit 1; }

DIR="$(mktemp -d /tmp/pg_envelope_profile_reencrypt.XXXXXX)"
chmod 755 "$DIR"
if [ "$(id -u)" -eq 0 ]; then chown postgres: "$DIR"; AS_PG=(runuser -u postgres --); else AS_PG=(); fi
cd "$DIR"
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
envelope.cache_size = 4096
shared_buffers = 256MB
max_parallel_workers_per_gather = 0
jit = off
autovacuum = off
CONF
pg pg_ctl -D "$DIR/data" -l "$DIR/server.log" -w start >/dev/null

# Calls of FUNCTION (summed over its callers) and its inclusive cost, from a callgrind
# output file (name compression "(id) name" resolved).
calls_and_cost() {
    python3 - "$1" "$2" <<'PY'
import re, subprocess, sys
path, want = sys.argv[1], sys.argv[2]
names, calls, cfn = {}, 0, None
for line in open(path):
    m = re.match(r"^c?fn=\((\d+)\)(?: (.*))?$", line.rstrip("\n"))
    if m:
        if m.group(2):
            names[m.group(1)] = m.group(2)
        if line.startswith("cfn="):
            cfn = names.get(m.group(1))
        continue
    if line.startswith("calls=") and cfn == want:
        calls += int(line.split()[0][6:])
out = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--auto=no", "--threshold=100", path],
                     capture_output=True, text=True).stdout
cost = 0
for l in out.splitlines():
    m = re.match(r"^\s*([\d,]+) \(\s*[\d.]+%\)\s+(?:\S*:)?(\S+)", l)
    if m and m.group(2) == want:
        cost = max(cost, int(m.group(1).replace(",", "")))
print("%d calls, %d instructions" % (calls, cost))
PY
}

if [ "$WHOLE_RUN" = 1 ]; then
    pg psql -X -q -h "$DIR" -p "$PORT" -d postgres -v ON_ERROR_STOP=1 >/dev/null <<SQL
CREATE EXTENSION pg_envelope;
SELECT count(envelope.create_tenant('tenant' || i)) FROM generate_series(1, 1000) i;
CREATE TABLE fleet_a (id integer, tenant text, c bytea);
INSERT INTO fleet_a SELECT i, 'tenant' || (i % 1000 + 1),
       envelope.encrypt('tenant' || (i % 1000 + 1), md5(i::text)) FROM generate_series(1, $ROWS) i;
CREATE TABLE fleet_b AS SELECT * FROM fleet_a;
SELECT envelope.register_column('fleet_a', 'c', 'tenant');
SET client_min_messages = warning;
CALL envelope.rotate_keys(older_than => '0');
CALL envelope.reencrypt_all(10000);
UPDATE fleet_b SET c = c;
VACUUM ANALYZE;
CHECKPOINT;
SQL
    pg pg_ctl -D "$DIR/data" -m fast stop >/dev/null
    pg cp -a "$DIR/data" "$DIR/data_c"
    pg cp -a "$DIR/data" "$DIR/data_d"
    pg pg_ctl -D "$DIR/data" -l "$DIR/server.log" -w start >/dev/null
    pg psql -X -q -h "$DIR" -p "$PORT" -d postgres -v ON_ERROR_STOP=1 >/dev/null <<SQL
SET client_min_messages = warning;
CALL envelope.rotate_keys(older_than => '0');
VACUUM ANALYZE;
CHECKPOINT;
SQL
    pg pg_ctl -D "$DIR/data" -m fast stop >/dev/null
    echo "CALL envelope.reencrypt_all(10000)" > "$DIR/a.sql"
    echo "UPDATE fleet_b SET c = c" > "$DIR/b.sql"
    printf "CALL envelope.rotate_keys(older_than => '0')\nCALL envelope.reencrypt_all(10000)\n" > "$DIR/c.sql"
    echo "CALL envelope.rotate_keys(older_than => '0')" > "$DIR/d.sql"
    chmod 644 "$DIR"/*.sql
    for f in a b c d; do
        data="$DIR/data"; [ "$f" = c ] && data="$DIR/data_c"; [ "$f" = d ] && data="$DIR/data_d"
        pg valgrind -q --tool=callgrind --dump-instr=no --callgrind-out-file="$DIR/cg.$f" \
            postgres --single -D "$data" postgres < "$DIR/$f.sql" > "$DIR/$f.log" 2>&1 \
            || { cat "$DIR/$f.log" >&2; exit 1; }
    done
    cp "$DIR/cg.a" "$OUT/callgrind_whole.reencrypt_all.out"
    cp "$DIR/cg.b" "$OUT/callgrind_whole.plain_update.out"
    cp "$DIR/cg.c" "$OUT/callgrind_whole.rotate_reencrypt.out"
    cp "$DIR/cg.d" "$OUT/callgrind_whole.rotate.out"
    total() { awk '/^(totals|summary):/ { print $2; exit }' "$1"; }
    per_row() { awk -v r="$ROWS" -v t="$(total "$1")" 'BEGIN { printf "%.0f", t / r }'; }
    echo "instructions per row, whole statement in a fresh single-user backend, $ROWS rows of 1,000 tenants:"
    echo "  a. CALL envelope.reencrypt_all(10000): $(per_row "$DIR/cg.a")"
    echo "  b. UPDATE fleet_b SET c = c: $(per_row "$DIR/cg.b")"
    awk -v r="$ROWS" -v c="$(total "$DIR/cg.c")" -v d="$(total "$DIR/cg.d")" \
        'BEGIN { printf "  c - d. reencrypt_all after rotate_keys in the same backend: %.0f\n", (c - d) / r }'
    for f in a c; do
        echo "first-touch work in $f (calls, inclusive instructions):"
        for fn in read_key_store keystore_read_tenant_key l1_fill l2_load_key l2_publish_tenant; do
            printf "  %-26s %s\n" "$fn" "$(calls_and_cost "$DIR/cg.$f" "$fn")"
        done
    done
    exit 0
fi
pg psql -X -q -h "$DIR" -p "$PORT" -d postgres -v ON_ERROR_STOP=1 >/dev/null <<SQL
CREATE EXTENSION pg_envelope;
SELECT count(envelope.create_tenant('tenant' || i)) FROM generate_series(1, 1000) i;
CREATE TABLE t (id integer, tenant text, c bytea);
INSERT INTO t SELECT i, 'tenant' || (i % 1000 + 1),
       envelope.encrypt('tenant' || (i % 1000 + 1), md5(i::text)) FROM generate_series(1, $ROWS) i;
CREATE TABLE u AS SELECT * FROM t;
SET client_min_messages = warning;
CALL envelope.rotate_keys(older_than => '0');
VACUUM ANALYZE;
CHECKPOINT;
SQL
pg pg_ctl -D "$DIR/data" -m fast stop >/dev/null

# Single-user mode: one statement per line.  The two SELECTs warm the cache (every
# tenant's old key for decryption, new key for encryption) and are dumped too (1, 2).
cat > "$DIR/cg.sql" <<SQL
SELECT count(*) FROM t WHERE envelope.needs_reencryption(c, tenant) AND length(envelope.decrypt(tenant, c)) > 0
SELECT count(envelope.encrypt(tenant, 'x')) FROM (SELECT DISTINCT tenant FROM t) d
UPDATE u SET c = c
UPDATE t SET c = envelope.reencrypt_value(tenant, c, NULL) WHERE envelope.needs_reencryption(c, tenant)
SQL
chmod 644 "$DIR/cg.sql"
pg valgrind -q --tool=callgrind --toggle-collect=standard_ExecutorRun \
    --dump-after=standard_ExecutorRun --dump-instr=no \
    --callgrind-out-file="$DIR/cg.out" \
    postgres --single -D "$DIR/data" postgres < "$DIR/cg.sql" > "$DIR/cg.log" 2>&1 \
    || { cat "$DIR/cg.log" >&2; exit 1; }
cp "$DIR/cg.out.3" "$OUT/callgrind_reencrypt.plain_update.out"
cp "$DIR/cg.out.4" "$OUT/callgrind_reencrypt.batch_update.out"

per_row() { awk -v r="$ROWS" '/^totals:/ { printf "%.0f", $2 / r }' "$1"; }
echo "instructions per row, $ROWS rows of 1,000 tenants, keys cached:"
echo "  UPDATE u SET c = c: $(per_row "$DIR/cg.out.3")"
echo "  the batch's re-encrypting UPDATE: $(per_row "$DIR/cg.out.4")"
echo "inclusive per row in the re-encrypting UPDATE:"
callgrind_annotate --inclusive=yes --threshold=100 --auto=no "$DIR/cg.out.4" 2>/dev/null |
    awk -v r="$ROWS" '
    /^ *[0-9,]+ +\(/ {
        n = $1; gsub(",", "", n); name = $0; sub(/^[^)]*\) +/, "", name); sub(/ \[.*/, "", name)
        sub(/.*:/, "", name)
        if (name ~ /^(heap_update|XLogInsert|ExecScan|envelope_needs_reencryption|envelope_reencrypt_value|decrypt_into|cipher_decrypt|cipher_encrypt|encryption_counted_key|keycache_active_version|keycache_key_for_decrypt|keycache_key_for_encrypt|l1_tenant_entry|EVP_CipherInit_ex|EVP_CIPHER_CTX_get_iv_length|gcm_tag_param|gcm_start|gcm_seal_body|gcm_open_body|gcm_dispatch_aad|gcm_dispatch_update|gcm_dispatch_seal_final|gcm_dispatch_open|check_tag|feed_envelope_aad|EVP_EncryptUpdate|EVP_DecryptUpdate|EVP_EncryptFinal_ex|EVP_DecryptFinal_ex|OSSL_PARAM_locate|__strcmp_avx2|MemoryContextReset)$/ && !seen[name]++)
            printf "  %-32s %7.0f\n", name, n / r
    }'
