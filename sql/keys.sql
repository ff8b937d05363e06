-- Key lifecycle: rotate, retire, disable/enable, destroy; the cache and its counters.
\set VERBOSITY default
\set SHOW_CONTEXT never
SELECT envelope.create_tenant('lifecycle');
CREATE TEMP TABLE old AS SELECT envelope.encrypt('lifecycle', 'written under v1') AS v;

-- Rotation: new values use version 2, old ones still decrypt.
SELECT envelope.rotate_tenant_key('lifecycle');
SELECT envelope.key_version(envelope.encrypt('lifecycle', 'new')) AS new_values_use;
SELECT envelope.key_version(v) AS old_value_uses, envelope.decrypt_text('lifecycle', v) FROM old;
SELECT version, state FROM envelope.tenant_keys WHERE tenant = 'lifecycle' ORDER BY version;

-- A rotation that rolls back changes nothing.
BEGIN;
SELECT envelope.rotate_tenant_key('lifecycle');
ROLLBACK;
SELECT envelope.key_version(envelope.encrypt('lifecycle', 'new')) AS still_version;

-- The active version cannot be retired; an old one can, and then no longer decrypts.
SELECT envelope.retire_key_version('lifecycle', 2);
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.retire_key_version('lifecycle', 7);
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.retire_key_version('lifecycle', 1);
SELECT envelope.decrypt_text('lifecycle', v) FROM old;
\echo :LAST_ERROR_SQLSTATE
SELECT version, state FROM envelope.tenant_keys WHERE tenant = 'lifecycle' ORDER BY version;

-- Disable: every use fails at once; a disable that rolls back changes nothing.
CREATE TEMP TABLE cur AS SELECT envelope.encrypt('lifecycle', 'written under v2') AS v;
BEGIN;
SELECT envelope.disable_tenant('lifecycle');
ROLLBACK;
SELECT envelope.decrypt_text('lifecycle', v) AS after_rolled_back_disable FROM cur;
SELECT envelope.disable_tenant('lifecycle');
SELECT envelope.decrypt_text('lifecycle', v) FROM cur;
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.encrypt('lifecycle', 'x');
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.rotate_tenant_key('lifecycle');
\echo :LAST_ERROR_SQLSTATE
SELECT DISTINCT state FROM envelope.tenant_keys WHERE tenant = 'lifecycle';
SELECT envelope.enable_tenant('lifecycle');
SELECT envelope.decrypt_text('lifecycle', v) AS after_enable FROM cur;

-- Destroy: the wrapped keys are erased; nothing decrypts again.
SELECT envelope.destroy_tenant('lifecycle', 'lifecycle');
SELECT envelope.decrypt_text('lifecycle', v) FROM cur;
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.enable_tenant('lifecycle');
\echo :LAST_ERROR_SQLSTATE
SELECT version, state, wrapped_dek IS NULL AS erased FROM envelope.data_key
 WHERE tenant = 'lifecycle' ORDER BY version;
SELECT envelope.disable_tenant('nobody');
\echo :LAST_ERROR_SQLSTATE

-- The cache: after a flush the next decrypt asks the provider once, then hits.
CREATE TABLE acme_rows AS
SELECT envelope.encrypt('acme', 'row ' || i) AS v FROM generate_series(1, 100) i;
SELECT envelope.cache_flush();
SELECT kms_decrypt_calls AS before, hits AS hits_before, misses AS misses_before
  FROM envelope.cache_stats \gset
SELECT count(*) FROM acme_rows WHERE envelope.decrypt_text('acme', v) LIKE 'row %';
SELECT kms_decrypt_calls - :before AS kms_decrypts, misses - :misses_before AS misses,
       entries >= 1 AS cached, kms_errors, kms_max_latency_ms >= 0 AS latency_recorded
  FROM envelope.cache_stats;
-- A new backend finds the key in shared memory: no KMS call.
\c
SELECT kms_decrypt_calls AS before, hits AS hits_before FROM envelope.cache_stats \gset
SELECT count(*) FROM acme_rows WHERE envelope.decrypt_text('acme', v) LIKE 'row %';
SELECT kms_decrypt_calls - :before AS kms_decrypts, hits > :hits_before AS shared_hit
  FROM envelope.cache_stats;
DROP TABLE acme_rows;

-- Rewrap with the local provider: it holds one master key, so moving to it again moves
-- nothing (each wrapped DEK gets a fresh nonce), and any other key is unknown to it.
SELECT envelope.rewrap('local', 'acme') AS moved;
SELECT envelope.decrypt_text('acme', envelope.encrypt('acme', 'after rewrap'));
\set VERBOSITY terse
SELECT envelope.rewrap('local:0000000000000000', 'acme');
\set VERBOSITY default
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.rewrap('', 'acme');
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.rewrap('local', 'nobody');
\echo :LAST_ERROR_SQLSTATE
SELECT kms_reencrypt_calls > 0 AS reencrypt_counted FROM envelope.cache_stats;

-- Online re-encryption: values move to each tenant's active version in committed
-- batches; deterministic values stay; a second run has nothing left to do.
SELECT envelope.create_tenant('re-a'), envelope.create_tenant('re-b');
CREATE TABLE reenc (id int, tenant text, secret bytea, lookup bytea)
    WITH (autovacuum_enabled = false);  -- batch notices depend on reltuples
INSERT INTO reenc SELECT i, CASE WHEN i % 2 = 0 THEN 're-a' ELSE 're-b' END, NULL, NULL
  FROM generate_series(1, 300) i;
UPDATE reenc SET secret = envelope.encrypt(tenant, 'secret ' || id, 'reenc.secret'),
                 lookup = envelope.encrypt_deterministic(tenant, 'lookup ' || id);
UPDATE reenc SET secret = NULL WHERE id = 7;
SELECT envelope.rotate_tenant_key('re-a'), envelope.rotate_tenant_key('re-b'), envelope.rotate_tenant_key('re-b');
SELECT tenant, envelope.key_version(secret) AS version, count(*) FROM reenc
 GROUP BY 1, 2 ORDER BY 1, 2;
CALL envelope.reencrypt('reenc', 'secret', 'tenant', 100, 'reenc.secret');
SELECT tenant, envelope.key_version(secret) AS version, count(*) FROM reenc
 GROUP BY 1, 2 ORDER BY 1, 2;
SELECT count(*) FILTER (WHERE envelope.decrypt_text(tenant, secret, 'reenc.secret') = 'secret ' || id) AS secrets_ok,
       count(*) FILTER (WHERE envelope.key_version(lookup) = 1
                          AND envelope.decrypt_text(tenant, lookup) = 'lookup ' || id) AS lookups_untouched
  FROM reenc;
CALL envelope.reencrypt('reenc', 'secret', 'tenant', 100, 'reenc.secret');
-- The old versions can now be retired without losing a value.
SELECT envelope.retire_key_version('re-a', 1), envelope.retire_key_version('re-b', 2);
SELECT count(envelope.decrypt_text(tenant, secret, 'reenc.secret')) AS still_readable FROM reenc;
-- Bad arguments.
CALL envelope.reencrypt('reenc', 'secret', 'tenant', 0);
\echo :LAST_ERROR_SQLSTATE
CALL envelope.reencrypt('reenc', 'no_such_column', 'tenant');
\echo :LAST_ERROR_SQLSTATE
DROP TABLE reenc;

-- A prepared transaction cannot carry a key store change (its revocation would take
-- effect in no backend); the session goes on normally.
BEGIN;
SELECT envelope.disable_tenant('acme');
PREPARE TRANSACTION 'envelope_2pc';
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.decrypt_text('acme', envelope.encrypt('acme', 'after a refused prepare'));
BEGIN;
SELECT envelope.encrypt('acme', 'x') IS NOT NULL AS unrelated_prepare_works;
PREPARE TRANSACTION 'envelope_2pc_ok';
COMMIT PREPARED 'envelope_2pc_ok';

-- Parallel plans: workers and leader decrypt, also from a cold cache.
CREATE TABLE par AS SELECT i, envelope.encrypt('acme', 'p' || i) AS v FROM generate_series(1, 5000) i;
ANALYZE par;
SET max_parallel_workers_per_gather = 2;
SET parallel_setup_cost = 0;
SET parallel_tuple_cost = 0;
SET min_parallel_table_scan_size = 0;
EXPLAIN (COSTS OFF) SELECT count(*) FROM par WHERE envelope.decrypt_text('acme', v) = 'p' || i;
SELECT envelope.cache_flush();
SELECT count(*) FROM par WHERE envelope.decrypt_text('acme', v) = 'p' || i;
RESET max_parallel_workers_per_gather;
RESET parallel_setup_cost;
RESET parallel_tuple_cost;
RESET min_parallel_table_scan_size;
DROP TABLE par;

-- reencrypt leaves disabled tenants' values alone and refuses partitioned tables.
CREATE TABLE reenc2 (tenant text, secret bytea) WITH (autovacuum_enabled = false);
INSERT INTO reenc2 VALUES ('acme', envelope.encrypt('acme', 'a')), ('globex', envelope.encrypt('globex', 'g'));
SELECT envelope.rotate_tenant_key('acme'), envelope.rotate_tenant_key('globex');
SELECT envelope.disable_tenant('globex');
SELECT envelope.active_key_version('globex') IS NULL AS disabled_has_no_active_version;
CALL envelope.reencrypt('reenc2', 'secret', 'tenant');
SELECT envelope.enable_tenant('globex');
SELECT tenant, envelope.key_version(secret) FROM reenc2 ORDER BY 1;
CREATE TABLE reenc_part (tenant text, secret bytea) PARTITION BY LIST (tenant);
CALL envelope.reencrypt('reenc_part', 'secret', 'tenant');
\echo :LAST_ERROR_SQLSTATE
DROP TABLE reenc2, reenc_part;

-- A tenant looked up without being required active (active_key_version) must not
-- then pass as active for encrypt.
SELECT envelope.disable_tenant('globex');
SELECT envelope.active_key_version('globex') IS NULL AS disabled;
SELECT envelope.encrypt('globex', 'must fail');
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.enable_tenant('globex');

-- The key cache reads the key store through the tables' own indexes, found by their key
-- columns, and the columns by name: without the data_key index it scans the table, and
-- columns added or dropped elsewhere change nothing.
BEGIN;
ALTER TABLE envelope.data_key DROP CONSTRAINT data_key_pkey;
ALTER TABLE envelope.tenant ADD COLUMN regress_extra integer;
ALTER TABLE envelope.tenant DROP COLUMN created_at;
SELECT envelope.rotate_tenant_key('acme') AS rotated_to \gset
SELECT seq_scan AS data_key_scans FROM pg_stat_xact_user_tables
 WHERE relid = 'envelope.data_key'::regclass \gset
SELECT envelope.active_key_version('acme') = :rotated_to AS reads_new_version;
SELECT seq_scan - :data_key_scans AS data_key_heap_scans FROM pg_stat_xact_user_tables
 WHERE relid = 'envelope.data_key'::regclass;
SELECT envelope.key_version(envelope.encrypt('acme', 'x')) = :rotated_to AS encrypts_under_it;
SELECT envelope.decrypt_text('acme', envelope.encrypt('acme', 'still readable'));
SELECT envelope.disable_tenant('acme');
SELECT envelope.encrypt('acme', 'must fail');
\echo :LAST_ERROR_SQLSTATE
ROLLBACK;
