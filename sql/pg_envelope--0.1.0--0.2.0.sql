-- pg_envelope 0.1.0 -> 0.2.0.
-- The full 0.2.0 script is built from pg_envelope--0.1.0.sql followed by this file
-- (see the Makefile), so a fresh install and an updated one run the same statements.
-- This script never changes once released.

\echo Use "ALTER EXTENSION pg_envelope UPDATE TO '0.2.0'" to load this file. \quit

-- ---------------------------------------------------------------------------
-- Inventory of encrypted columns and key usage.

-- ---------------------------------------------------------------------------
-- Audit trail and guards.

-- ---------------------------------------------------------------------------
-- Fleet procedures: rotate_keys, reencrypt_all, rewrap_keys, rotation progress.

-- ---------------------------------------------------------------------------
-- Health check.

-- ---------------------------------------------------------------------------
-- Key-store triggers fire in logical-replication apply workers too.

-- ---------------------------------------------------------------------------
-- Key cache statistics.
-- New columns at the end: tenant states held in shared memory, keys unwrapped again
-- within envelope.cache_ttl of being evicted to make room (the working set is larger
-- than envelope.cache_size), and a hint that says so.

DROP VIEW envelope.cache_stats;
DROP FUNCTION envelope.cache_stats();
CREATE FUNCTION envelope.cache_stats(
    OUT capacity bigint, OUT entries bigint, OUT hits bigint, OUT misses bigint,
    OUT evictions bigint, OUT kms_generate_calls bigint, OUT kms_decrypt_calls bigint,
    OUT kms_reencrypt_calls bigint, OUT kms_errors bigint,
    OUT kms_mean_latency_ms double precision, OUT kms_max_latency_ms double precision,
    OUT shared boolean, OUT tenant_entries bigint, OUT evicted_reloads bigint,
    OUT hint text)
    RETURNS record
    AS 'MODULE_PATHNAME', 'envelope_cache_stats_v2'
    LANGUAGE C VOLATILE PARALLEL SAFE;

CREATE VIEW envelope.cache_stats AS SELECT * FROM envelope.cache_stats();

REVOKE ALL ON FUNCTION envelope.cache_stats() FROM PUBLIC;
REVOKE ALL ON envelope.cache_stats FROM PUBLIC;
GRANT EXECUTE ON FUNCTION envelope.cache_stats() TO envelope_admin;
GRANT SELECT ON envelope.cache_stats TO envelope_admin;
