#!/bin/bash
# The cluster of the A/B benchmarks (fleet_ab.sh, tenant_sweep_ab.sh): one preloaded
# cluster with the local provider, whose library is swapped between builds of
# pg_envelope.so.  Sourced, not run.
#
#   source "$ROOT/test/bench/ab_cluster.sh"
#   ab_cluster_init NAME PORT BUILD...   # then append to "$DIR/data/postgresql.conf"
#   ab_cluster_use BUILD                 # (re)start the cluster on BUILD
#   ab_cluster_install BUILD             # only put BUILD in place
#
# ab_cluster_init makes the directory /tmp/pg_envelope_NAME.XXXXXX ($DIR), keeps the
# installed library aside and puts it back at exit, initialises the cluster (port,
# socket directory, preload and master key file in its configuration) and defines
# pg (run as the cluster's owner), PSQL (psql's command line) and q (one statement,
# unaligned).  Sets PG_BINDIR, LIB (the installed library), OUT (test/bench/out).

ab_cluster_init() {
    local name="$1" port="$2"
    shift 2
    PG_BINDIR="$(pg_config --bindir)"
    LIB="$(pg_config --pkglibdir)/pg_envelope.so"
    OUT="$ROOT/test/bench/out"
    mkdir -p "$OUT"
    DIR="$(mktemp -d "/tmp/pg_envelope_$name.XXXXXX")"
    trap ab_cluster_stop EXIT
    chmod 755 "$DIR"
    cp "$LIB" "$DIR/installed.so"
    chmod 644 "$@" 2>/dev/null || true
    if [ "$(id -u)" -eq 0 ]; then chown postgres: "$DIR"; AS_PG=(runuser -u postgres --); else AS_PG=(); fi
    PSQL=(psql -h "$DIR" -p "$port" -d postgres -X -q -v ON_ERROR_STOP=1)
    pg initdb -D "$DIR/data" -A trust >/dev/null
    pg bash -c "umask 077; openssl rand -hex 32 > '$DIR/master.key'"
    cat >> "$DIR/data/postgresql.conf" <<CONF
port = $port
listen_addresses = ''
unix_socket_directories = '$DIR'
shared_preload_libraries = 'pg_envelope'
envelope.local_master_key_file = '$DIR/master.key'
CONF
}

pg() { (cd "$DIR" && "${AS_PG[@]}" env PATH="$PG_BINDIR:$PATH" "$@"); }
q() { pg "${PSQL[@]}" -At -c "$1"; }

# Put a library in place by rename: a server that still maps the old file keeps it.
ab_cluster_install() {
    cp "$1" "$LIB.new" && mv -f "$LIB.new" "$LIB"
}

# Stop the cluster if it runs (a failed stop stops the benchmark), install BUILD, start.
ab_cluster_use() {
    if pg pg_ctl -D "$DIR/data" status >/dev/null 2>&1; then
        pg pg_ctl -D "$DIR/data" -m fast stop >/dev/null
    fi
    ab_cluster_install "$1"
    pg pg_ctl -D "$DIR/data" -l "$DIR/server.log" -w start >/dev/null
}

ab_cluster_stop() {
    pg pg_ctl -D "$DIR/data" -m fast stop >/dev/null 2>&1 || true
    [ -f "$DIR/installed.so" ] && ab_cluster_install "$DIR/installed.so"
    rm -rf "$DIR"
}
