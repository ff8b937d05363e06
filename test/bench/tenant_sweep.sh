#!/bin/bash
# pg_envelope benchmark, tenant sweep: the cost per row as the number of tenants a scan
# cycles through grows past what one backend's first-level cache holds.
#
#   bash test/bench/tenant_sweep.sh            (also run at the end of test/bench/run.sh)
#
# Uses the installed extension (run.sh builds and installs it first; run alone, this
# script installs nothing).  Starts its own preloaded cluster with the local provider
# and measures, in one warmed session:
#
#   1. envelope.decrypt_text and envelope.encrypt, µs per row net of the scan floor
#      octet_length(col), over SWEEP_ROWS rows whose tenants cycle (row i -> tenant
#      i mod T) for T = SWEEP_TENANTS (default 1,000 8,000 20,000 50,000 100,000),
#      with every key already in the shared cache (envelope.cache_size =
#      SWEEP_CACHE_SIZE); the ratio of each T to the first one is the figure.  Each
#      figure is given twice: from the wall-clock time of the query, and from the CPU
#      time the backend spent in it (/proc/self/schedstat), which other processes on a
#      shared machine disturb much less;
#   2. the backend's memory after the scans of each T: pg_backend_memory_contexts (all
#      contexts, and the key cache's own) and the private anonymous memory of the
#      process (/proc/PID/smaps_rollup), which also counts OpenSSL's malloc'd contexts;
#   3. KMS calls for two full decrypt scans over 20,000 tenants with the default
#      envelope.cache_size, cache flushed first (one per key is the target, 20,000);
#   4. envelope.reencrypt over rows of SWEEP_REENC_TENANTS interleaved tenants against
#      the same over the first T (when SWEEP_REENC_ROWS > 0).
#
# Autovacuum is off in this cluster: an ANALYZE of the key tables sends a relcache
# invalidation, which makes every backend re-read tenant states, and would land in
# the middle of some scans but not others.  Writes test/bench/out/sweep.json and prints
# one line per figure.  About 3 minutes with the defaults on a 2-vCPU machine.
#
# Knobs: SWEEP_ROWS=200000  SWEEP_RUNS=3  SWEEP_TENANTS="1000 8000 20000 50000 100000"
#        SWEEP_CACHE_SIZE=131072  SWEEP_KMS_TENANTS=20000  SWEEP_REENC_ROWS=1000000
#        SWEEP_REENC_TENANTS=50000  SWEEP_KMS=1 (0 skips 3.)  SWEEP_PORT=54359
#        SWEEP_HUGE_PAGES=0 (1: huge_pages = on for the shared segment; reserve them
#        first, as root: the script says how many and stops when too few are free;
#        0: huge_pages = off)  ENVELOPE_PYTHON
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
ROWS="${SWEEP_ROWS:-200000}"
RUNS="${SWEEP_RUNS:-3}"
read -r -a TENANTS <<< "${SWEEP_TENANTS:-1000 8000 20000 50000 100000}"
CACHE_SIZE="${SWEEP_CACHE_SIZE:-131072}"
KMS_TENANTS="${SWEEP_KMS_TENANTS:-20000}"
REENC_ROWS="${SWEEP_REENC_ROWS:-1000000}"
REENC_TENANTS="${SWEEP_REENC_TENANTS:-50000}"
PORT="${SWEEP_PORT:-54359}"
PY="${ENVELOPE_PYTHON:-python3}"
MAX_T=0
for t in "${TENANTS[@]}" "$KMS_TENANTS" "$REENC_TENANTS"; do [ "$t" -le "$MAX_T" ] || MAX_T=$t; done
START_S=$(date +%s)

PG_BINDIR="$(pg_config --bindir)"
OUT="$ROOT/test/bench/out"
mkdir -p "$OUT"
DIR="$(mktemp -d /tmp/pg_envelope_sweep.XXXXXX)"
chmod 755 "$DIR"
if [ "$(id -u)" -eq 0 ]; then chown postgres: "$DIR"; AS_PG=(runuser -u postgres --); else AS_PG=(); fi
pg() { (cd "$DIR" && "${AS_PG[@]}" env PATH="$PG_BINDIR:$PATH" "$@"); }
stop() {
    pg pg_ctl -D "$DIR/data" -m fast stop >/dev/null 2>&1 || true
    rm -rf "$DIR"
}
trap stop EXIT
phase() { echo "== [sweep, $(( $(date +%s) - START_S )) s] $*"; }
PSQL=(psql -h "$DIR" -p "$PORT" -d postgres -X -q -v ON_ERROR_STOP=1)
q() { pg "${PSQL[@]}" -At -c "$1"; }

phase "cluster, $MAX_T tenants (local provider), envelope.cache_size = $CACHE_SIZE"
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
autovacuum = off
log_line_prefix = '%m [%p] '
CONF
echo "envelope.cache_size = $CACHE_SIZE" > "$DIR/data/sweep.conf"
echo "include_if_exists = 'sweep.conf'" >> "$DIR/data/postgresql.conf"
# Huge pages for the shared segment (SWEEP_HUGE_PAGES=1), see huge_pages.sh.
source "$ROOT/test/bench/huge_pages.sh"
huge_pages_conf SWEEP_HUGE_PAGES "${SWEEP_HUGE_PAGES:-0}" "$DIR/data"
pg pg_ctl -D "$DIR/data" -l "$DIR/server.log" -w start >/dev/null
cat /proc/loadavg > "$DIR/load_start"
head -n 1 /proc/stat > "$DIR/cpu_start"

t0=$(date +%s%N)
q "CREATE EXTENSION pg_envelope" >/dev/null
# In batches: each create_tenant takes a lock on its tenant until the transaction ends.
for ((s = 0; s < MAX_T; s += 5000)); do
    q "SELECT count(envelope.create_tenant('t' || i)) FROM generate_series($s + 1, least($s + 5000, $MAX_T)) i" >/dev/null
done
CREATE_MS=$(( ($(date +%s%N) - t0) / 1000000 ))

phase "tables: $ROWS rows per tenant count"
for T in "${TENANTS[@]}"; do
    pg "${PSQL[@]}" >/dev/null <<SQL
CREATE TABLE plain_$T AS
SELECT i AS id, 't' || (i % $T + 1) AS tenant, md5(i::text) AS v FROM generate_series(1, $ROWS) i;
CREATE TABLE sealed_$T AS SELECT id, tenant, envelope.encrypt(tenant, v) AS c FROM plain_$T;
SQL
done
if ! printf '%s\n' "${TENANTS[@]}" | grep -qx "$KMS_TENANTS"; then
    q "CREATE TABLE sealed_$KMS_TENANTS AS SELECT i AS id, 't' || (i % $KMS_TENANTS + 1) AS tenant,
         envelope.encrypt('t' || (i % $KMS_TENANTS + 1), md5(i::text)) AS c FROM generate_series(1, $ROWS) i" >/dev/null
fi
q "VACUUM ANALYZE" >/dev/null

phase "scans: $RUNS runs of each, one warmed session per tenant count"
# A session per tenant count, warmed by one scan of each kind (every key in shared
# memory, and in the backend's first level as far as it holds them), so that what one
# count leaves in the backend does not weigh on the next.
# OpenSSL's contexts are malloc'd, outside PostgreSQL's memory contexts: the backend's
# private anonymous memory (smaps_rollup) counts them too.
cpuq="SELECT 'CPU', split_part(pg_read_file('/proc/self/schedstat'), ' ', 1)"
memq="SELECT 'MEM', (SELECT sum(total_bytes) FROM pg_backend_memory_contexts), (SELECT coalesce(sum(total_bytes), 0) FROM pg_backend_memory_contexts WHERE name = 'pg_envelope key cache'), substring(pg_read_file('/proc/' || pg_backend_pid() || '/smaps_rollup') from 'Anonymous: *([0-9]+) kB')"
: > "$DIR/sweep.out"
for T in "${TENANTS[@]}"; do
  {
    echo '\timing on'
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
      echo "\\echo MEMAT $T"
      echo "$memq;"
    done
  } > "$DIR/sweep_$T.sql"
  chmod 644 "$DIR/sweep_$T.sql"
  pg "${PSQL[@]}" -At -f "$DIR/sweep_$T.sql" >> "$DIR/sweep.out"
done
cp "$DIR/sweep.out" "$OUT/sweep_scans.out"

# ---------------------------------------------------------------------------
K0=0; K1=0; KMS_MS=0; KMS_STATS='{}'; DEFAULT_SIZE=skipped
if [ "${SWEEP_KMS:-1}" != 0 ]; then
phase "KMS calls: two full scans over $KMS_TENANTS tenants with the default envelope.cache_size"
: > "$DIR/data/sweep.conf"
pg pg_ctl -D "$DIR/data" -l "$DIR/server.log" -w restart >/dev/null
DEFAULT_SIZE="$(q "SHOW envelope.cache_size")"
q "SELECT envelope.cache_flush()" >/dev/null
K0="$(q "SELECT kms_decrypt_calls FROM envelope.cache_stats")"
t0=$(date +%s%N)
q "SELECT count(envelope.decrypt_text(tenant, c)) FROM sealed_$KMS_TENANTS; SELECT count(envelope.decrypt_text(tenant, c)) FROM sealed_$KMS_TENANTS" >/dev/null
KMS_MS=$(( ($(date +%s%N) - t0) / 1000000 ))
K1="$(q "SELECT kms_decrypt_calls FROM envelope.cache_stats")"
KMS_STATS="$(q "SELECT row_to_json(s) FROM envelope.cache_stats s")"
fi

# ---------------------------------------------------------------------------
REENC_OUT=""
if [ "$REENC_ROWS" -gt 0 ] && q "SELECT 1 FROM pg_proc WHERE proname = 'reencrypt'" | grep -q 1; then
    phase "envelope.reencrypt: $REENC_ROWS rows over ${TENANTS[0]} and over $REENC_TENANTS interleaved tenants"
    # Back to the sweep's cache size (the KMS phase ran with the default), so that both
    # versions of every tenant re-encrypted stay cached: the tables' encryption loads
    # the old ones, rotation puts the new ones in.  Both runs then start warm.
    echo "envelope.cache_size = $CACHE_SIZE" > "$DIR/data/sweep.conf"
    pg pg_ctl -D "$DIR/data" -l "$DIR/server.log" -w restart >/dev/null
    for T in "${TENANTS[0]}" "$REENC_TENANTS"; do
        q "CREATE TABLE reenc_$T AS SELECT i AS id, 't' || (i % $T + 1) AS tenant,
             envelope.encrypt('t' || (i % $T + 1), md5(i::text)) AS c FROM generate_series(1, $REENC_ROWS) i" >/dev/null
        q "VACUUM ANALYZE reenc_$T" >/dev/null
    done
    q "SELECT count(envelope.rotate_tenant_key('t' || i)) FROM generate_series(1, $REENC_TENANTS) i" >/dev/null
    for T in "${TENANTS[0]}" "$REENC_TENANTS"; do
        q "SELECT count(*) FROM reenc_$T" >/dev/null
        t0=$(date +%s%N)
        cpu="$(pg env PGOPTIONS="-c client_min_messages=warning" "${PSQL[@]}" -At \
            -c "$cpuq" -c "CALL envelope.reencrypt('reenc_$T', 'c', 'tenant', 10000)" -c "$cpuq" |
            awk -F'|' '/^CPU/ { v[n++] = $2 } END { printf "%d", (v[1] - v[0]) / 1000000 }')"
        REENC_OUT="$REENC_OUT $T:$(( ($(date +%s%N) - t0) / 1000000 )):$cpu"
    done
    q "SELECT row_to_json(s) FROM envelope.cache_stats s" > "$DIR/reenc_stats"
fi

cat /proc/loadavg > "$DIR/load_end"
head -n 1 /proc/stat > "$DIR/cpu_end"
TOTAL_S=$(( $(date +%s) - START_S ))
COMMIT="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
"$PY" - "$DIR" "$OUT/sweep.json" "$ROWS" "$COMMIT" "$CREATE_MS" "$MAX_T" "$KMS_TENANTS" "$DEFAULT_SIZE" \
    "$(( K1 - K0 ))" "$KMS_MS" "$TOTAL_S" "$REENC_ROWS" "$REENC_OUT" "$KMS_STATS" <<'PY'
import json, re, sys
d, dest, rows, commit, create_ms, max_t, kms_t, default_size, kms_calls, kms_ms, total_s, reenc_rows, reenc, kms_stats = sys.argv[1:15]
rows = int(rows)
times, cpu, mem, label, cpu_label, cpu0 = {}, {}, {}, None, None, None
for line in open(f"{d}/sweep.out"):
    m = re.match(r"CPU\|(\d+)", line)
    if m:
        if cpu0 is None:
            cpu0 = int(m.group(1))
        else:
            if cpu_label is not None:
                cpu.setdefault(cpu_label, []).append((int(m.group(1)) - cpu0) / 1e6)
            cpu0, cpu_label = None, None
        continue
    m = re.match(r"BENCH (\d+) (\w+)", line)
    if m:
        label = cpu_label = (int(m.group(1)), m.group(2)); continue
    m = re.match(r"Time: ([0-9.]+) ms", line)
    if m and label and label[0] != "mem":
        times.setdefault(label, []).append(float(m.group(1))); label = None; continue
    m = re.match(r"MEMAT (\d+)", line)
    if m:
        label = ("mem", int(m.group(1))); continue
    if line.startswith("MEM|") and label and label[0] == "mem":
        _, total, cache, anon = line.strip().split("|")
        mem[label[1]] = {"backend_bytes": int(total), "key_cache_bytes": int(cache),
                         "anonymous_bytes": int(anon or 0) * 1024}; label = None
def load(name):
    a = open(f"{d}/{name}").read().split()
    return a
cs, ce = [int(x) for x in load("cpu_start")[1:]], [int(x) for x in load("cpu_end")[1:]]
delta = [b - a for a, b in zip(cs, ce)]
steal = 100.0 * delta[7] / max(1, sum(delta)) if len(delta) > 7 else 0.0
res = {"commit": commit, "rows": rows, "create_tenants": int(max_t), "create_ms": int(create_ms),
       "load_start": " ".join(load("load_start")[:3]), "load_end": " ".join(load("load_end")[:3]),
       "steal_pct": round(steal, 2), "total_s": int(total_s), "tenants": []}
base = cbase = None
def net_us(src, t):
    f, e = min(src[(t, "floor")]), min(src[(t, "encrypt")])
    df, dd = min(src[(t, "decrypt_floor")]), min(src[(t, "decrypt")])
    return (e - f) * 1000.0 / rows, (dd - df) * 1000.0 / rows
for t in sorted({k[0] for k in times}):
    enc_us, dec_us = net_us(times, t)
    cenc_us, cdec_us = net_us(cpu, t) if (t, "decrypt") in cpu else (float("nan"), float("nan"))
    if base is None: base, cbase = (enc_us, dec_us), (cenc_us, cdec_us)
    r = {"tenants": t, "encrypt_us": round(enc_us, 3), "decrypt_text_us": round(dec_us, 3),
         "encrypt_ratio": round(enc_us / base[0], 2), "decrypt_text_ratio": round(dec_us / base[1], 2),
         "cpu_encrypt_us": round(cenc_us, 3), "cpu_decrypt_text_us": round(cdec_us, 3),
         "cpu_encrypt_ratio": round(cenc_us / cbase[0], 2), "cpu_decrypt_text_ratio": round(cdec_us / cbase[1], 2),
         "runs_ms": {k[1]: v for k, v in times.items() if k[0] == t},
         "cpu_runs_ms": {k[1]: v for k, v in cpu.items() if k[0] == t}}
    r.update(mem.get(t, {}))
    res["tenants"].append(r)
    print("tenants %6d: decrypt_text %8.3f us/row (%6.2fx T=%d), encrypt %8.3f us/row (%6.2fx); backend memory contexts %.1f MB (key cache %.1f MB), private anonymous memory %.1f MB"
          % (t, dec_us, dec_us / base[1], res["tenants"][0]["tenants"], enc_us, enc_us / base[0],
             r.get("backend_bytes", 0) / 1048576.0, r.get("key_cache_bytes", 0) / 1048576.0,
             r.get("anonymous_bytes", 0) / 1048576.0))
    print("               CPU time: decrypt_text %8.3f us/row (%6.2fx), encrypt %8.3f us/row (%6.2fx)"
          % (cdec_us, cdec_us / cbase[1], cenc_us, cenc_us / cbase[0]))
if default_size != "skipped":
    res["kms"] = {"tenants": int(kms_t), "default_cache_size": default_size, "scans": 2,
                  "rows_per_scan": rows, "decrypt_calls": int(kms_calls), "ms": int(kms_ms),
                  "cache_stats": json.loads(kms_stats)}
    print("KMS Decrypt calls, two full scans over %s tenants, default cache_size %s: %s (target %s), %.1f s"
          % (kms_t, default_size, kms_calls, kms_t, int(kms_ms) / 1000.0))
if reenc.strip():
    pairs = [p.split(":") for p in reenc.split()]
    res["reencrypt"] = {"rows": int(reenc_rows), "ms_by_tenants": {a: int(b) for a, b, c in pairs},
                        "cpu_ms_by_tenants": {a: int(c) for a, b, c in pairs},
                        "cache_stats_after": json.loads(open(f"{d}/reenc_stats").read())}
    (t0, m0, c0), (t1, m1, c1) = pairs[0], pairs[1]
    print("envelope.reencrypt of %s rows: %s tenants %.0f rows/s, %s interleaved tenants %.0f rows/s (%.2fx the time; backend CPU time %.2fx)"
          % (reenc_rows, t0, int(reenc_rows) * 1000.0 / int(m0), t1, int(reenc_rows) * 1000.0 / int(m1),
             int(m1) / int(m0), int(c1) / max(1, int(c0))))
print("load average %s -> %s, steal %.1f %%, %s tenants created in %.1f s, sweep took %s s"
      % (res["load_start"], res["load_end"], steal, max_t, int(create_ms) / 1000.0, total_s))
json.dump(res, open(dest, "w"), indent=1)
PY
