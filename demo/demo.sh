#!/bin/bash
# pg_envelope in two minutes: a throwaway PostgreSQL with the extension preloaded and
# the `local` provider, two tenants, a table of encrypted rows, and what each tenant
# can and cannot read.  Leaves nothing running.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

bash "$ROOT/test/install_deps.sh"
echo "== building and installing pg_envelope"
make -C "$ROOT" -s -j2 >/dev/null
$SUDO make -C "$ROOT" -s install >/dev/null
PG_BINDIR="$(pg_config --bindir)"

DEMO="$(mktemp -d /tmp/pg_envelope_demo.XXXXXX)"
PORT="${DEMO_PORT:-54329}"
if [ "$(id -u)" -eq 0 ]; then
    chown postgres: "$DEMO"
    AS_PG=(runuser -u postgres --)
else
    AS_PG=()
fi
# The postgres user's commands start in the working directory, which must be one it can
# enter (a clone under /root or in a mktemp -d directory is not).
cd "$DEMO"
pg() { "${AS_PG[@]}" env PATH="$PG_BINDIR:$PATH" "$@"; }

stop() {
    pg pg_ctl -D "$DEMO/data" -m fast stop >/dev/null 2>&1 || true
    rm -rf "$DEMO"
}
trap stop EXIT

echo "== a throwaway cluster in $DEMO, with a local master key file outside its data directory"
pg initdb -D "$DEMO/data" -A trust >/dev/null
pg bash -c "umask 077; openssl rand -hex 32 > '$DEMO/master.key'"
cat >> "$DEMO/data/postgresql.conf" <<CONF
port = $PORT
listen_addresses = ''
unix_socket_directories = '$DEMO'
shared_preload_libraries = 'pg_envelope'
envelope.kms_provider = 'local'
envelope.local_master_key_file = '$DEMO/master.key'
CONF
pg pg_ctl -D "$DEMO/data" -l "$DEMO/server.log" -w start >/dev/null

psql_demo() { pg psql -h "$DEMO" -p "$PORT" -d postgres -X -v ON_ERROR_STOP=1 --echo-queries "$@"; }

psql_demo <<'SQL'
CREATE EXTENSION pg_envelope;

-- Two tenants; each gets a data key (DEK) made and wrapped by the provider.
SELECT envelope.create_tenant('acme');
SELECT envelope.create_tenant('globex');
SELECT tenant, version, state, kms_provider FROM envelope.tenant_keys ORDER BY tenant;

-- A table whose secret column holds only ciphertext, bound to tenant and column.
CREATE TABLE customer (
    id     int PRIMARY KEY,
    tenant text NOT NULL,
    email  bytea NOT NULL
);
INSERT INTO customer VALUES
    (1, 'acme',   envelope.encrypt('acme',   'alice@acme.example',   'customer.email')),
    (2, 'acme',   envelope.encrypt('acme',   'bob@acme.example',     'customer.email')),
    (3, 'globex', envelope.encrypt('globex', 'carol@globex.example', 'customer.email'));

-- What is stored (and what a backup or a dump holds):
SELECT id, tenant, encode(substr(email, 1, 24), 'hex') || '…' AS stored, octet_length(email) AS bytes
  FROM customer ORDER BY id;

-- What each tenant's key reads:
SELECT id, tenant, envelope.decrypt_text(tenant, email, 'customer.email') AS email
  FROM customer ORDER BY id;

SQL
echo
echo "== tenant globex tries to read acme's row 1 (must fail):"
if psql_demo -c "SELECT envelope.decrypt_text('globex', email, 'customer.email') FROM customer WHERE id = 1" 2>&1; then
    echo "demo failed: globex read acme's data" >&2
    exit 1
fi
echo
echo "== acme's row read under another column's context (must fail):"
if psql_demo -c "SELECT envelope.decrypt_text('acme', email, 'customer.phone') FROM customer WHERE id = 1" 2>&1; then
    echo "demo failed: a value moved to another column decrypted" >&2
    exit 1
fi

psql_demo <<'SQL'
-- Lookups without decrypting: a blind index beside the randomized column.
ALTER TABLE customer ADD COLUMN email_index bytea;
UPDATE customer SET email_index = envelope.blind_index(tenant, envelope.decrypt_text(tenant, email, 'customer.email'));
SELECT id FROM customer
 WHERE tenant = 'acme' AND email_index = envelope.blind_index('acme', 'bob@acme.example');

-- Rotation a DBA can prove finished.  Register the encrypted column, so that
-- pg_envelope knows where ciphertext lives (it survives renames, dumps and restores).
SELECT envelope.register_column('customer', 'email', 'tenant', 'customer.email');
SELECT relation, column_name, tenant_column, context FROM envelope.encrypted_columns;

-- Rotate acme's key (a fleet would pass older_than => '1 year' instead of a list):
-- new values use version 2, old ones still decrypt.
CALL envelope.rotate_keys(tenants => ARRAY['acme']);
SELECT envelope.key_version(envelope.encrypt('acme', 'new value')) AS new_values_use_version;

-- Retiring version 1 now would strand acme's stored values: the guard refuses.
DO $$
BEGIN
    PERFORM envelope.retire_key_version('acme', 1);
EXCEPTION WHEN dependent_objects_still_exist THEN
    RAISE NOTICE 'refused: %', SQLERRM;
END $$;

-- Re-encrypt every registered column online (committed batches, resumable), then count
-- what each key version still protects: the proof that the rotation is finished.
CALL envelope.reencrypt_all();
CALL envelope.count_key_usage();
SELECT tenant, version, value_count FROM envelope.key_usage ORDER BY tenant, version;
SELECT envelope.retire_key_version('acme', 1);
SELECT tenant, version, state FROM envelope.tenant_keys ORDER BY tenant, version;

-- Every key action is in the audit trail, with who did it.
SELECT action, tenant, versions, session_user FROM envelope.audit_log ORDER BY id;

-- The cache: one unwrap per key, then every row is a hit.
SELECT capacity, entries, kms_generate_calls, kms_decrypt_calls FROM envelope.cache_stats;
SQL

echo
echo "== disabling acme takes effect at commit, for every session:"
psql_demo -c "SELECT envelope.disable_tenant('acme')"
if psql_demo -c "SELECT envelope.decrypt_text('acme', email, 'customer.email') FROM customer WHERE id = 1" 2>&1; then
    echo "demo failed: a disabled tenant still decrypts" >&2
    exit 1
fi
echo
echo "== demo finished: the cluster is stopped and removed"
