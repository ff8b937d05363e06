#!/bin/bash
# The cost of per-tenant access on the row path: encrypt and decrypt_text per row over
# tenants that have grants against the same over tenants that have none, in one run.
#
#   bash test/bench/tenant_access.sh
#
# Builds and installs the extension, starts its own preloaded cluster (local provider)
# and fills a table of BENCH_ACCESS_ROWS rows (~32-byte values) over
# BENCH_ACCESS_TENANTS tenants, and a copy sorted by tenant.  In one session, as a role
# that is an envelope_user (not a superuser, so the check really runs), the same queries
# over the same rows and tenant names run alternately with no grant on any tenant
# (open) and with every tenant granted (envelope.grant_tenant) to a group role the
# session's role belongs to (granted): after a warm-up of each state, BENCH_RUNS timed
# runs of each, so that drift of the machine falls on both alike.  Same names matter:
# names are hashed into the key cache's front array per row, and two sets of names
# collide differently there.
#   - decrypt_text and encrypt with rows cycling through the tenants (each row switches
#     tenant: the key cache's per-tenant lookup), and with rows sorted by tenant (the
#     same tenant as the previous row: the hottest path);
#   - the scan floor, count(octet_length(v)), subtracted from each.
# Prints µs per row (min of runs, net of the floor) for both and the ratio granted/open
# (target <= 1.03).  On a shared, loaded machine the timings of one query vary by tens
# of per cent from run to run, more than the cost measured here; so the same scans are
# also counted in instructions per row (callgrind: a single-user backend that alternates
# the two states, collecting only inside envelope_decrypt_text / envelope_encrypt_text,
# one profile per statement, steady scans of BENCH_ACCESS_CG_ROWS rows), which does not
# depend on the load.  Writes
# test/bench/out/tenant_access.json (and the single timings, tenant_access_runs.txt).
# Figures are reported, never asserted; test/bench/RESULTS.md keeps the latest.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
ROWS="${BENCH_ACCESS_ROWS:-1000000}"
TENANTS="${BENCH_ACCESS_TENANTS:-1000}"
RUNS="${BENCH_RUNS:-15}"
CG_ROWS="${BENCH_ACCESS_CG_ROWS:-20000}"
PORT="${BENCH_PORT:-54343}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

make -C "$ROOT" -s -j2 >/dev/null
$SUDO make -C "$ROOT" -s install >/dev/null
PG_BINDIR="$(pg_config --bindir)"
OUT="$ROOT/test/bench/out"
mkdir -p "$OUT"

DIR="$(mktemp -d /tmp/pg_envelope_access.XXXXXX)"
chmod 755 "$DIR"
if [ "$(id -u)" -eq 0 ]; then chown postgres: "$DIR"; AS_PG=(runuser -u postgres --); else AS_PG=(); fi
pg() { "${AS_PG[@]}" env PATH="$PG_BINDIR:$PATH" "$@"; }
stop() { pg pg_ctl -D "$DIR/data" -m fast stop >/dev/null 2>&1 || true; rm -rf "$DIR"; }
trap stop EXIT
cd "$DIR"

pg sh -c "umask 077; openssl rand -hex 32 > '$DIR/master.key'"
pg initdb -D "$DIR/data" -A trust >/dev/null
cat >> "$DIR/data/postgresql.conf" <<CONF
port = $PORT
listen_addresses = ''
unix_socket_directories = '$DIR'
shared_preload_libraries = 'pg_envelope'
envelope.local_master_key_file = '$DIR/master.key'
shared_buffers = 512MB
max_parallel_workers_per_gather = 0
CONF
pg pg_ctl -D "$DIR/data" -l "$DIR/log" -w start >/dev/null
psql_q() { pg psql -X -q -At -h "$DIR" -p "$PORT" -d postgres -v ON_ERROR_STOP=1 "$@"; }

echo "== loading $ROWS rows over $TENANTS tenants"
# Tenant names of equal length in both sets: the name is hashed, compared and bound
# into every value, so a longer name alone would cost time.
psql_q >/dev/null <<SQL
CREATE EXTENSION pg_envelope;
CREATE EXTENSION pg_prewarm;
CREATE ROLE bench_group;
CREATE ROLE bench_app IN ROLE envelope_user, bench_group;
SELECT count(envelope.create_tenant('t' || i)) FROM generate_series(1, $TENANTS) i;
CREATE TABLE bench_rows (id int, tenant text, p text, v bytea);
INSERT INTO bench_rows
    SELECT g, 't' || (g % $TENANTS + 1), 'value number ' || g || ' of the bench',
           envelope.encrypt('t' || (g % $TENANTS + 1), 'value number ' || g || ' of the bench')
      FROM generate_series(1, $ROWS) g;
CREATE TABLE bench_sorted AS SELECT * FROM bench_rows ORDER BY tenant, id;
VACUUM ANALYZE bench_rows, bench_sorted;
SELECT pg_prewarm('bench_rows'), pg_prewarm('bench_sorted');
GRANT SELECT ON bench_rows, bench_sorted TO bench_app;
-- Milliseconds of one statement, timed inside the server.
CREATE FUNCTION bench_ms(q text) RETURNS double precision LANGUAGE plpgsql AS \$\$
DECLARE t0 timestamptz;
BEGIN
    t0 := clock_timestamp();
    EXECUTE q;
    RETURN 1000 * extract(epoch FROM clock_timestamp() - t0);
END \$\$;
SQL

# One session: per query shape and layout, RUNS rounds of (open: warm-up, timed run;
# granted: warm-up, timed run); prints "shape layout state ms" per timed run.
GRANT_ALL="RESET ROLE; SELECT count(envelope.grant_tenant('t' || i, 'bench_group')) FROM generate_series(1, $TENANTS) i; SET ROLE bench_app;"
REVOKE_ALL="RESET ROLE; SET client_min_messages = error; SELECT count(envelope.revoke_tenant('t' || i, 'bench_group')) FROM generate_series(1, $TENANTS) i; RESET client_min_messages; SET ROLE bench_app;"
{
    echo "SET ROLE bench_app;"
    for shape in floor decrypt encrypt; do
        case "$shape" in
            floor) expr='octet_length(v)' ;;
            decrypt) expr='envelope.decrypt_text(tenant, v)' ;;
            encrypt) expr='envelope.encrypt(tenant, p)' ;;
        esac
        for layout in rows sorted; do
            for _ in $(seq 1 "$RUNS"); do
                for state in open granted; do
                    [ "$state" = open ] && echo "$REVOKE_ALL" || echo "$GRANT_ALL"
                    echo "SELECT count($expr) FROM bench_$layout;"
                    echo "SELECT '$shape $layout $state', bench_ms('SELECT count($expr) FROM bench_$layout');"
                done
            done
        done
    done
} > "$DIR/queries.sql"
chmod 644 "$DIR/queries.sql"
psql_q -F ' ' -f "$DIR/queries.sql" | grep -E '^(floor|decrypt|encrypt) ' > "$DIR/times.txt"
cp "$DIR/times.txt" "$OUT/tenant_access_runs.txt"

# min over runs of one (shape, layout, table)
min_ms() { awk -v k="$1 $2 $3" '$1" "$2" "$3 == k {if (m == "" || $4 < m) m = $4} END {print m}' "$DIR/times.txt"; }
net_us() { awk -v a="$1" -v f="$2" -v n="$ROWS" 'BEGIN {printf "%.4f", 1000 * (a - f) / n}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.4f", a / b}'; }

json="{\"rows\": $ROWS, \"tenants\": $TENANTS, \"runs\": $RUNS"
printf '%-40s %12s %12s %10s\n' "per row, net of the scan floor" "open µs" "granted µs" "ratio"
for layout in rows sorted; do
    f_open="$(min_ms floor "$layout" open)"
    f_granted="$(min_ms floor "$layout" granted)"
    for shape in decrypt encrypt; do
        o="$(net_us "$(min_ms "$shape" "$layout" open)" "$f_open")"
        g="$(net_us "$(min_ms "$shape" "$layout" granted)" "$f_granted")"
        r="$(ratio "$g" "$o")"
        label="$shape, $([ "$layout" = rows ] && echo 'tenant switches every row' || echo 'rows sorted by tenant')"
        printf '%-40s %12s %12s %10s  (target <= 1.03)\n' "$label" "$o" "$g" "$r"
        json="$json, \"${shape}_${layout}\": {\"open_us\": $o, \"granted_us\": $g, \"ratio\": $r}"
    done
done

# --- instructions per row (callgrind) ----------------------------------------------
# One single-user backend per query shape: twice (grant every tenant, warm-up scan,
# steady scan, revoke every tenant, warm-up scan, steady scan), with a profile part
# dumped before each statement (--dump-before=PortalRun) and collection only inside the
# SQL function; the steady scans' parts give instructions per row of each state, in
# one process, with the same caches warm.
pg pg_ctl -D "$DIR/data" -m fast stop >/dev/null
if command -v valgrind >/dev/null; then
    GRANT_CG="SELECT count(envelope.grant_tenant('t' || i, 'bench_group')) FROM generate_series(1, $TENANTS) i;"
    REVOKE_CG="SET client_min_messages = error; SELECT count(envelope.revoke_tenant('t' || i, 'bench_group')) FROM generate_series(1, $TENANTS) i; RESET client_min_messages;"
    printf '%-40s %12s %12s %10s\n' "instructions per row (callgrind)" "open" "granted" "ratio"
    for layout in rows sorted; do
        for shape in decrypt encrypt; do
            case "$shape" in
                decrypt) fn=envelope_decrypt_text; expr='envelope.decrypt_text(tenant, v)' ;;
                encrypt) fn=envelope_encrypt_text; expr='envelope.encrypt(tenant, p)' ;;
            esac
            scan="SELECT count($expr) FROM bench_$layout WHERE id <= $CG_ROWS;"
            {
                for _ in 1 2; do
                    echo "$GRANT_CG"; echo "SET ROLE bench_app;"; echo "$scan"; echo "$scan"; echo "RESET ROLE;"
                    echo "$REVOKE_CG"; echo "SET ROLE bench_app;"; echo "$scan"; echo "$scan"; echo "RESET ROLE;"
                done
            } > "$DIR/cg.sql"
            chmod 644 "$DIR/cg.sql"
            rm -f "$DIR"/cg.out*
            pg valgrind -q --tool=callgrind --toggle-collect="$fn" --dump-before=PortalRun \
                --callgrind-out-file="$DIR/cg.out" \
                postgres --single -D "$DIR/data" -c max_parallel_workers_per_gather=0 -c jit=off postgres \
                < "$DIR/cg.sql" > "$DIR/cg.log" 2>&1 || { cat "$DIR/cg.log" >&2; exit 1; }
            if grep -q "ERROR" "$DIR/cg.log"; then cat "$DIR/cg.log" >&2; exit 1; fi
            # The parts in statement order (the last one has no suffix); only the scans
            # collected anything: granted warm, granted steady, open warm, open steady, x2.
            mapfile -t irs < <(for f in $(cd "$DIR" && ls cg.out.* | sort -t. -k3 -n) cg.out; do
                sed -n 's/^summary: *//p' "$DIR/$f"; done | awk '$1 > 0')
            if [ "${#irs[@]}" -ne 8 ]; then
                echo "NOT MEASURED: callgrind gave ${#irs[@]} scan profiles for $shape $layout, not 8" >&2
                continue
            fi
            g="$(awk -v a="${irs[1]}" -v b="${irs[5]}" -v n="$CG_ROWS" 'BEGIN {printf "%.1f", (a < b ? a : b) / n}')"
            o="$(awk -v a="${irs[3]}" -v b="${irs[7]}" -v n="$CG_ROWS" 'BEGIN {printf "%.1f", (a < b ? a : b) / n}')"
            r="$(ratio "$g" "$o")"
            label="$shape, $([ "$layout" = rows ] && echo 'tenant switches every row' || echo 'rows sorted by tenant')"
            printf '%-40s %12s %12s %10s  (target <= 1.03)\n' "$label" "$o" "$g" "$r"
            json="$json, \"${shape}_${layout}_instructions\": {\"open\": $o, \"granted\": $g, \"ratio\": $r}"
        done
    done
else
    echo "NOT MEASURED: instructions per row (valgrind is not installed)"
fi
echo "$json}" > "$OUT/tenant_access.json"
