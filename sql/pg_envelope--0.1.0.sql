-- pg_envelope 0.1.0: per-tenant envelope encryption with KMS-wrapped data keys.
-- This script never changes once released; later versions add pg_envelope--A--B.sql.

\echo Use "CREATE EXTENSION pg_envelope" to load this file. \quit

-- Roles are cluster-wide: a second database that installs the extension reuses them.
DO $roles$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'envelope_user') THEN
        CREATE ROLE envelope_user NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'envelope_admin') THEN
        CREATE ROLE envelope_admin NOLOGIN;
    END IF;
END
$roles$;
GRANT envelope_user TO envelope_admin;

REVOKE ALL ON SCHEMA envelope FROM PUBLIC;
GRANT USAGE ON SCHEMA envelope TO envelope_user;

-- ---------------------------------------------------------------------------
-- Key store.  Only wrapped data keys are stored; nobody but the extension's own
-- functions reads these tables (they switch to the table owner to do so).

CREATE TABLE envelope.tenant (
    tenant_id      integer GENERATED ALWAYS AS IDENTITY UNIQUE,
    tenant         text PRIMARY KEY,
    state          text NOT NULL DEFAULT 'active'
                   CHECK (state IN ('active', 'disabled', 'destroyed')),
    active_version integer NOT NULL CHECK (active_version >= 1),
    kms_provider   text NOT NULL,
    kms_key        text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT pg_catalog.now()
);

COMMENT ON TABLE envelope.tenant IS
    'pg_envelope tenants: state, the DEK version new values use, and the master key new DEKs go under';

CREATE TABLE envelope.data_key (
    tenant        text NOT NULL REFERENCES envelope.tenant (tenant),
    version       integer NOT NULL CHECK (version >= 1),
    kms_provider  text NOT NULL,
    kms_key       text NOT NULL,
    wrapped_dek   bytea,              -- NULL once the version is destroyed
    state         text NOT NULL DEFAULT 'active'
                  CHECK (state IN ('active', 'retired', 'destroyed')),
    created_at    timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (tenant, version),
    CHECK ((state = 'destroyed') = (wrapped_dek IS NULL))
);

COMMENT ON TABLE envelope.data_key IS
    'pg_envelope data keys (DEKs), each wrapped by a KMS master key; never plaintext';

REVOKE ALL ON envelope.tenant, envelope.data_key FROM PUBLIC;

-- pg_dump keeps the rows, so a restored database decrypts wherever the KMS is reachable.
SELECT pg_catalog.pg_extension_config_dump('envelope.tenant', '');
SELECT pg_catalog.pg_extension_config_dump('envelope.data_key', '');
SELECT pg_catalog.pg_extension_config_dump('envelope.tenant_tenant_id_seq', '');

-- Any change to the key store, by our functions or by hand, invalidates every
-- backend's cached keys and states when its transaction commits.
CREATE FUNCTION envelope.key_store_changed() RETURNS trigger
    AS 'MODULE_PATHNAME', 'envelope_key_store_changed' LANGUAGE C;
REVOKE ALL ON FUNCTION envelope.key_store_changed() FROM PUBLIC;

CREATE TRIGGER key_store_changed
    AFTER INSERT OR UPDATE OR DELETE ON envelope.tenant
    FOR EACH STATEMENT EXECUTE FUNCTION envelope.key_store_changed();
CREATE TRIGGER key_store_changed_truncate
    AFTER TRUNCATE ON envelope.tenant
    FOR EACH STATEMENT EXECUTE FUNCTION envelope.key_store_changed();
CREATE TRIGGER key_store_changed
    AFTER INSERT OR UPDATE OR DELETE ON envelope.data_key
    FOR EACH STATEMENT EXECUTE FUNCTION envelope.key_store_changed();
CREATE TRIGGER key_store_changed_truncate
    AFTER TRUNCATE ON envelope.data_key
    FOR EACH STATEMENT EXECUTE FUNCTION envelope.key_store_changed();

-- ---------------------------------------------------------------------------
-- Data functions (envelope_user).  NULL tenant or value gives NULL; a NULL context
-- means "no context", which is distinct from the empty string.

CREATE FUNCTION envelope.encrypt(tenant text, plaintext text, context text DEFAULT NULL)
    RETURNS bytea
    AS 'MODULE_PATHNAME', 'envelope_encrypt_text'
    LANGUAGE C VOLATILE PARALLEL SAFE CALLED ON NULL INPUT;

CREATE FUNCTION envelope.encrypt(tenant text, plaintext bytea, context text DEFAULT NULL)
    RETURNS bytea
    AS 'MODULE_PATHNAME', 'envelope_encrypt_bytea'
    LANGUAGE C VOLATILE PARALLEL SAFE CALLED ON NULL INPUT;

-- STABLE, never IMMUTABLE: an immutable decrypt could be folded into plans, index
-- expressions and statistics, writing plaintext where it must never be.
CREATE FUNCTION envelope.decrypt(tenant text, ciphertext bytea, context text DEFAULT NULL)
    RETURNS bytea
    AS 'MODULE_PATHNAME', 'envelope_decrypt'
    LANGUAGE C STABLE PARALLEL SAFE CALLED ON NULL INPUT;

CREATE FUNCTION envelope.decrypt_text(tenant text, ciphertext bytea, context text DEFAULT NULL)
    RETURNS text
    AS 'MODULE_PATHNAME', 'envelope_decrypt_text'
    LANGUAGE C STABLE PARALLEL SAFE CALLED ON NULL INPUT;

-- Deterministic encryption (AES-256-SIV): equal plaintexts give equal ciphertexts, for
-- equality lookups and unique indexes, at the price of revealing which values are
-- equal.  decrypt/decrypt_text read these values too.  STABLE: the result depends on
-- the key store.
CREATE FUNCTION envelope.encrypt_deterministic(tenant text, plaintext text, context text DEFAULT NULL)
    RETURNS bytea
    AS 'MODULE_PATHNAME', 'envelope_encrypt_deterministic_text'
    LANGUAGE C STABLE PARALLEL SAFE CALLED ON NULL INPUT;

CREATE FUNCTION envelope.encrypt_deterministic(tenant text, plaintext bytea, context text DEFAULT NULL)
    RETURNS bytea
    AS 'MODULE_PATHNAME', 'envelope_encrypt_deterministic_bytea'
    LANGUAGE C STABLE PARALLEL SAFE CALLED ON NULL INPUT;

-- A keyed hash (HMAC-SHA256) of a value, per tenant: index it, look it up, never read it.
CREATE FUNCTION envelope.blind_index(tenant text, value text)
    RETURNS bytea
    AS 'MODULE_PATHNAME', 'envelope_blind_index'
    LANGUAGE C STABLE PARALLEL SAFE CALLED ON NULL INPUT;

CREATE FUNCTION envelope.key_version(ciphertext bytea)
    RETURNS integer
    AS 'MODULE_PATHNAME', 'envelope_key_version'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

-- ---------------------------------------------------------------------------
-- Key management (envelope_admin).  These talk to the KMS, so they are
-- PARALLEL UNSAFE and VOLATILE.

CREATE FUNCTION envelope.create_tenant(tenant text, kms_key text DEFAULT NULL)
    RETURNS integer
    AS 'MODULE_PATHNAME', 'envelope_create_tenant'
    LANGUAGE C VOLATILE PARALLEL UNSAFE CALLED ON NULL INPUT;

CREATE FUNCTION envelope.rotate_tenant_key(tenant text)
    RETURNS integer
    AS 'MODULE_PATHNAME', 'envelope_rotate_tenant_key'
    LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;

CREATE FUNCTION envelope.disable_tenant(tenant text)
    RETURNS void
    AS 'MODULE_PATHNAME', 'envelope_disable_tenant'
    LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;

CREATE FUNCTION envelope.enable_tenant(tenant text)
    RETURNS void
    AS 'MODULE_PATHNAME', 'envelope_enable_tenant'
    LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;

CREATE FUNCTION envelope.retire_key_version(tenant text, version integer)
    RETURNS void
    AS 'MODULE_PATHNAME', 'envelope_retire_key_version'
    LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;

CREATE FUNCTION envelope.destroy_tenant(tenant text)
    RETURNS void
    AS 'MODULE_PATHNAME', 'envelope_destroy_tenant'
    LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;

CREATE FUNCTION envelope.rewrap(new_kms_key text, tenant text DEFAULT NULL)
    RETURNS bigint
    AS 'MODULE_PATHNAME', 'envelope_rewrap'
    LANGUAGE C VOLATILE PARALLEL UNSAFE CALLED ON NULL INPUT;

-- The DEK version new values of a tenant use; NULL while the tenant is disabled or
-- destroyed, an error if it does not exist.
CREATE FUNCTION envelope.active_key_version(tenant text)
    RETURNS integer
    AS 'MODULE_PATHNAME', 'envelope_active_key_version'
    LANGUAGE C STABLE STRICT PARALLEL SAFE;

-- Re-encrypt stored values under each tenant's active DEK version, online: the table
-- is walked in block ranges, each batch is its own transaction (so row locks are held
-- briefly and an interrupted run loses at most one batch), and running it again picks
-- up what is left.  Deterministic values stay under version 1 and are left alone, and
-- so are the values of disabled and destroyed tenants.
-- CALL it outside an explicit transaction block so that the batches can commit.
CREATE PROCEDURE envelope.reencrypt(rel regclass, ciphertext_column name, tenant_column name,
                                    batch_size integer DEFAULT 1000, context text DEFAULT NULL)
LANGUAGE plpgsql
AS $reencrypt$
DECLARE
    total_blocks bigint;
    rows_per_block numeric;
    step bigint;
    first_block bigint := 0;
    done bigint := 0;
    n bigint;
BEGIN
    IF batch_size IS NULL OR batch_size < 1 THEN
        RAISE EXCEPTION 'batch_size must be at least 1' USING ERRCODE = '22023';
    END IF;
    IF (SELECT c.relkind FROM pg_catalog.pg_class c WHERE c.oid = rel) = 'p' THEN
        RAISE EXCEPTION 'cannot re-encrypt partitioned table %', rel
            USING ERRCODE = '42809',
                  HINT = 'Call envelope.reencrypt() for each partition.';
    END IF;
    total_blocks := pg_catalog.pg_relation_size(rel)
                    / pg_catalog.current_setting('block_size')::bigint;
    SELECT CASE WHEN c.relpages > 0 AND c.reltuples > 0 THEN c.reltuples / c.relpages ELSE 50 END
      INTO rows_per_block FROM pg_catalog.pg_class c WHERE c.oid = rel;
    step := GREATEST(1, pg_catalog.ceil(batch_size / rows_per_block))::bigint;

    WHILE first_block < total_blocks LOOP
        EXECUTE pg_catalog.format(
            'UPDATE %s SET %I = envelope.encrypt(%I, envelope.decrypt(%I, %I, $1), $1)'
            ' WHERE ctid >= pg_catalog.format(''(%%s,0)'', $2::bigint)::pg_catalog.tid'
            '   AND ctid < pg_catalog.format(''(%%s,0)'', $3::bigint)::pg_catalog.tid'
            '   AND %I IS NOT NULL AND %I IS NOT NULL'
            '   AND pg_catalog.get_byte(%I, 0) = 1'
            '   AND envelope.key_version(%I) OPERATOR(pg_catalog.<>) envelope.active_key_version(%I)',
            rel, ciphertext_column, tenant_column, tenant_column, ciphertext_column,
            ciphertext_column, tenant_column, ciphertext_column, ciphertext_column, tenant_column)
          USING context, first_block, first_block + step;
        GET DIAGNOSTICS n = ROW_COUNT;
        done := done + n;
        first_block := first_block + step;
        COMMIT;
        RAISE NOTICE 're-encrypted % values; % of % blocks done', done,
            LEAST(first_block, total_blocks), total_blocks;
    END LOOP;
END
$reencrypt$;

CREATE FUNCTION envelope.cache_flush()
    RETURNS void
    AS 'MODULE_PATHNAME', 'envelope_cache_flush'
    LANGUAGE C VOLATILE PARALLEL UNSAFE;

CREATE FUNCTION envelope.cache_stats(
    OUT capacity bigint, OUT entries bigint, OUT hits bigint, OUT misses bigint,
    OUT evictions bigint, OUT kms_generate_calls bigint, OUT kms_decrypt_calls bigint,
    OUT kms_reencrypt_calls bigint, OUT kms_errors bigint,
    OUT kms_mean_latency_ms double precision, OUT kms_max_latency_ms double precision,
    OUT shared boolean)
    RETURNS record
    AS 'MODULE_PATHNAME', 'envelope_cache_stats'
    LANGUAGE C VOLATILE PARALLEL SAFE;

CREATE VIEW envelope.cache_stats AS SELECT * FROM envelope.cache_stats();

-- Never key bytes: states and names only.
CREATE VIEW envelope.tenant_keys AS
    SELECT d.tenant, d.version,
           CASE WHEN t.state <> 'active' THEN t.state
                WHEN d.version = t.active_version THEN 'active'
                WHEN d.state = 'active' THEN 'decrypt-only'
                ELSE d.state END AS state,
           d.kms_provider, d.kms_key, d.created_at
      FROM envelope.data_key d JOIN envelope.tenant t USING (tenant);

-- ---------------------------------------------------------------------------
-- Privileges: PUBLIC gets nothing.

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA envelope FROM PUBLIC;
REVOKE ALL ON envelope.tenant_keys, envelope.cache_stats FROM PUBLIC;

GRANT EXECUTE ON FUNCTION
    envelope.encrypt(text, text, text),
    envelope.encrypt(text, bytea, text),
    envelope.decrypt(text, bytea, text),
    envelope.decrypt_text(text, bytea, text),
    envelope.encrypt_deterministic(text, text, text),
    envelope.encrypt_deterministic(text, bytea, text),
    envelope.blind_index(text, text),
    envelope.key_version(bytea),
    envelope.active_key_version(text)
    TO envelope_user;

REVOKE ALL ON PROCEDURE envelope.reencrypt(regclass, name, name, integer, text) FROM PUBLIC;
GRANT EXECUTE ON PROCEDURE envelope.reencrypt(regclass, name, name, integer, text) TO envelope_admin;

GRANT EXECUTE ON FUNCTION
    envelope.create_tenant(text, text),
    envelope.rotate_tenant_key(text),
    envelope.disable_tenant(text),
    envelope.enable_tenant(text),
    envelope.retire_key_version(text, integer),
    envelope.destroy_tenant(text),
    envelope.rewrap(text, text),
    envelope.cache_flush(),
    envelope.cache_stats()
    TO envelope_admin;

GRANT SELECT ON envelope.tenant_keys, envelope.cache_stats TO envelope_admin;
