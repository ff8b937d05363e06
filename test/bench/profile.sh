#!/bin/bash
# Where the row path's time goes: instruction counts (callgrind) and CPU samples (perf).
#
#   bash test/bench/profile.sh        PROFILE_ROWS=20000 (callgrind), PERF_ROWS=1000000
#
# Starts its own preloaded cluster (local provider, 1,000 tenants, rows cycling through
# them so every row switches tenant, as in run.sh), then:
#
#   callgrind: a single-user backend under valgrind, collecting only inside
#     envelope_encrypt_text / envelope_decrypt_text (--toggle-collect), after a warm-up
#     scan; the second run minus the first (warm-up only) gives instructions per row of
#     each function and its callees, split into key lookup, nonce, cipher layer (GCM
#     work vs OpenSSL EVP/provider dispatch), palloc, UTF-8 check and the rest.  32 B and
#     1 KB values.  Written to test/bench/out/callgrind_*.txt (raw files callgrind.*).
#   perf: `perf record -e cpu-clock -g` on a backend scanning PERF_ROWS rows (encrypt,
#     decrypt_text, and encrypt_deterministic and blind_index when installed)
#     (hardware counters are not available on this VM; cpu-clock sampling is), with
#     the share of each symbol written to test/bench/out/perf_*.txt.
#
# Expects the extension built and installed (run.sh does that).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
ROWS="${PROFILE_ROWS:-20000}"
PERF_ROWS="${PERF_ROWS:-1000000}"
PORT="${BENCH_PORT:-54349}"
PG_BINDIR="$(pg_config --bindir)"
OUT="$ROOT/test/bench/out"
mkdir -p "$OUT"

DIR="$(mktemp -d /tmp/pg_envelope_profile.XXXXXX)"
chmod 755 "$DIR"
if [ "$(id -u)" -eq 0 ]; then chown postgres: "$DIR"; AS_PG=(runuser -u postgres --); else AS_PG=(); fi
# The server user's commands start in the working directory: one it can enter.
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
shared_buffers = 512MB
max_parallel_workers_per_gather = 0
jit = off
CONF
pg pg_ctl -D "$DIR/data" -l "$DIR/server.log" -w start >/dev/null
PSQL=(psql -h "$DIR" -p "$PORT" -d postgres -X -q -v ON_ERROR_STOP=1)
NROWS=$(( ROWS > PERF_ROWS ? ROWS : PERF_ROWS ))
pg "${PSQL[@]}" >/dev/null <<SQL
CREATE EXTENSION pg_envelope;
SELECT count(envelope.create_tenant('tenant' || i)) FROM generate_series(1, 1000) i;
CREATE TABLE plain AS
SELECT i AS id, 'tenant' || (i % 1000 + 1) AS tenant, md5(i::text) AS v FROM generate_series(1, $NROWS) i;
CREATE TABLE sealed AS SELECT id, tenant, envelope.encrypt(tenant, v) AS c FROM plain;
CREATE TABLE plain_kb AS
SELECT i AS id, 'tenant' || (i % 1000 + 1) AS tenant, repeat(md5(i::text), 32) AS v FROM generate_series(1, $ROWS) i;
CREATE TABLE sealed_kb AS SELECT id, tenant, envelope.encrypt(tenant, v) AS c FROM plain_kb;
VACUUM ANALYZE;
SQL

# --- perf -------------------------------------------------------------------
if command -v perf >/dev/null && perf record -e cpu-clock -o "$DIR/probe.data" true >/dev/null 2>&1; then
    whats="encrypt decrypt"
    have() { [ "$(pg "${PSQL[@]}" -At -c "SELECT count(*) FROM pg_proc WHERE pronamespace = 'envelope'::regnamespace AND proname = '$1'")" != 0 ]; }
    have encrypt_deterministic && whats="$whats deterministic"
    have blind_index && whats="$whats blind_index"
    for what in $whats; do
        case $what in
            encrypt) scan="SELECT count(envelope.encrypt(tenant, v)) FROM plain" ;;
            decrypt) scan="SELECT count(envelope.decrypt_text(tenant, c)) FROM sealed" ;;
            deterministic) scan="SELECT count(envelope.encrypt_deterministic(tenant, v)) FROM plain" ;;
            blind_index) scan="SELECT count(envelope.blind_index(tenant, v)) FROM plain" ;;
        esac
        # one session: warm up, report its pid, wait for perf, scan 3 times
        {
            echo "$scan;"
            echo "SELECT pg_backend_pid();"
            echo "SELECT pg_sleep(1);"
            echo "$scan; $scan; $scan;"
        } > "$DIR/perf_$what.sql"
        chmod 644 "$DIR/perf_$what.sql"
        pg "${PSQL[@]}" -At -f "$DIR/perf_$what.sql" > "$DIR/perf_$what.out" &
        sess=$!
        pid=""
        for i in $(seq 1 200); do
            pid="$(sed -n 2p "$DIR/perf_$what.out" 2>/dev/null || true)"
            [[ "$pid" =~ ^[0-9]+$ ]] && break
            sleep 0.05
        done
        perf record -q -e cpu-clock -F 4999 -g -p "$pid" -o "$DIR/perf_$what.data" >/dev/null 2>&1 &
        perf_pid=$!
        wait "$sess"
        kill -INT "$perf_pid" 2>/dev/null || true
        wait "$perf_pid" 2>/dev/null || true
        perf report -i "$DIR/perf_$what.data" --no-children --sort dso,symbol --stdio 2>/dev/null \
            | grep -v '^$' | grep -E '^ +[0-9.]+%' | head -40 > "$OUT/perf_$what.txt" || true
        echo "perf $what: test/bench/out/perf_$what.txt"
    done
else
    echo "perf sampling not available: skipped"
fi

# --- callgrind ----------------------------------------------------------------
pg pg_ctl -D "$DIR/data" -m fast stop >/dev/null
if command -v valgrind >/dev/null; then
    for what in encrypt decrypt kb_encrypt kb_decrypt; do
        case $what in
            encrypt) fn=envelope_encrypt_text; scan="SELECT count(envelope.encrypt(tenant, v)) FROM plain WHERE id <= $ROWS" ;;
            decrypt) fn=envelope_decrypt_text; scan="SELECT count(envelope.decrypt_text(tenant, c)) FROM sealed WHERE id <= $ROWS" ;;
            kb_encrypt) fn=envelope_encrypt_text; scan="SELECT count(envelope.encrypt(tenant, v)) FROM plain_kb" ;;
            kb_decrypt) fn=envelope_decrypt_text; scan="SELECT count(envelope.decrypt_text(tenant, c)) FROM sealed_kb" ;;
        esac
        for n in 1 2; do
            sql=""
            for i in $(seq 1 "$n"); do sql="$sql$scan;"$'\n'; done
            printf '%s' "$sql" > "$DIR/cg.sql"
            chmod 644 "$DIR/cg.sql"
            pg valgrind -q --tool=callgrind --toggle-collect="$fn" \
                --callgrind-out-file="$DIR/cg_${what}_$n.out" \
                postgres --single -D "$DIR/data" -c max_parallel_workers_per_gather=0 postgres \
                < "$DIR/cg.sql" > "$DIR/cg_${what}_$n.log" 2>&1 || { cat "$DIR/cg_${what}_$n.log" >&2; exit 1; }
            cp "$DIR/cg_${what}_$n.out" "$OUT/callgrind.$what.$n.out"
        done
        python3 "$ROOT/test/bench/callgrind_split.py" "$DIR/cg_${what}_1.out" "$DIR/cg_${what}_2.out" \
            "$ROWS" "$fn" > "$OUT/callgrind_$what.txt"
        echo "callgrind $what: test/bench/out/callgrind_$what.txt"
    done
else
    echo "valgrind not available: skipped"
fi
