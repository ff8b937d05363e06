-- Fleet procedures: rotate_keys, reencrypt_all, rewrap_keys, rotation progress, and
-- the batch engine they share with reencrypt.
\set VERBOSITY default
\set SHOW_CONTEXT never
-- run ids in the NOTICEs below count from 1 whatever the earlier tests ran
TRUNCATE envelope.rotation_run CASCADE;
ALTER TABLE envelope.rotation_run ALTER COLUMN run_id RESTART;
SELECT envelope.create_tenant('fleet-' || i) FROM generate_series(1, 3) i;

CREATE TABLE fleet_person (id integer PRIMARY KEY, tenant text NOT NULL, plain text,
                           secret bytea, email bytea) WITH (autovacuum_enabled = false);
INSERT INTO fleet_person
SELECT i, 'fleet-' || (i % 3 + 1), 'secret ' || i,
       envelope.encrypt('fleet-' || (i % 3 + 1), 'secret ' || i, 'person.secret'),
       envelope.encrypt_deterministic('fleet-' || (i % 3 + 1), 'mail' || i || '@example.com')
  FROM generate_series(1, 600) i;
-- a partitioned table: reencrypt_all works through its partitions
CREATE TABLE fleet_event (tenant text NOT NULL, payload bytea) PARTITION BY LIST (tenant);
CREATE TABLE fleet_event_1 PARTITION OF fleet_event FOR VALUES IN ('fleet-1')
    WITH (autovacuum_enabled = false);
CREATE TABLE fleet_event_rest PARTITION OF fleet_event DEFAULT WITH (autovacuum_enabled = false);
INSERT INTO fleet_event SELECT 'fleet-' || (i % 3 + 1), envelope.encrypt('fleet-' || (i % 3 + 1), 'event ' || i)
  FROM generate_series(1, 90) i;
SELECT envelope.register_column('fleet_person', 'secret', 'tenant', 'person.secret');
SELECT envelope.register_column('fleet_person', 'email', 'tenant');
SELECT envelope.register_column('fleet_event', 'payload', 'tenant');

-- Bad arguments.
CALL envelope.rotate_keys();
\echo :LAST_ERROR_SQLSTATE
CALL envelope.rotate_keys(older_than => '-1 day');
\echo :LAST_ERROR_SQLSTATE
CALL envelope.rotate_keys(tenants => ARRAY['fleet-1', 'nobody']);
\echo :LAST_ERROR_SQLSTATE
CALL envelope.rotate_keys(tenants => ARRAY['fleet-1', NULL]);
\echo :LAST_ERROR_SQLSTATE
CALL envelope.reencrypt_all(0);
\echo :LAST_ERROR_SQLSTATE
CALL envelope.reencrypt_all(100, 0);
\echo :LAST_ERROR_SQLSTATE
CALL envelope.rewrap_keys('');
\echo :LAST_ERROR_SQLSTATE
CALL envelope.rewrap_keys(NULL);
\echo :LAST_ERROR_SQLSTATE
CALL envelope.rewrap_keys('local', ARRAY['nobody']);
\echo :LAST_ERROR_SQLSTATE
CALL envelope.reencrypt('fleet_person', 'plain', 'tenant');
\echo :LAST_ERROR_SQLSTATE
CALL envelope.reencrypt('fleet_person', 'secret', 'no_tenant');
\echo :LAST_ERROR_SQLSTATE
-- The batches commit, so the procedures refuse to run inside a transaction block
-- (and leave nothing behind).
BEGIN;
CALL envelope.rotate_keys(tenants => ARRAY['fleet-1']);
ROLLBACK;
\echo :LAST_ERROR_SQLSTATE
SELECT count(*) AS runs_left_behind FROM envelope.rotation_run WHERE procedure = 'rotate_keys';

-- Rotation: nothing is older than a day; the listed tenants are rotated once, even
-- when the call repeats (their active version is newer than the run).
CALL envelope.rotate_keys(older_than => '1 day');
CALL envelope.rotate_keys(tenants => ARRAY['fleet-1', 'fleet-2']);
SELECT tenant, version FROM envelope.tenant_keys
 WHERE tenant LIKE 'fleet-%' AND state = 'active' ORDER BY 1;
CALL envelope.rotate_keys(older_than => '0', tenants => ARRAY['fleet-3']);
SELECT tenant, version FROM envelope.tenant_keys
 WHERE tenant LIKE 'fleet-%' AND state = 'active' ORDER BY 1;

-- Re-encryption of every registered column; deterministic values stay as they are.
CREATE TEMP TABLE email_before AS SELECT id, email FROM fleet_person;
CALL envelope.reencrypt_all(150);
SELECT tenant, envelope.key_version(secret) AS version, count(*),
       count(*) FILTER (WHERE envelope.decrypt_text(tenant, secret, 'person.secret') = plain) AS decrypting
  FROM fleet_person GROUP BY 1, 2 ORDER BY 1, 2;
SELECT count(*) AS deterministic_unchanged
  FROM fleet_person p JOIN email_before b USING (id) WHERE p.email = b.email;
SELECT tableoid::regclass AS partition, tenant, envelope.key_version(payload) AS version, count(*)
  FROM fleet_event GROUP BY 1, 2, 3 ORDER BY 1, 2, 3;
SELECT procedure, relation, column_name, unit, done = total AS complete, values_moved, state
  FROM envelope.rotation_progress ORDER BY run_id, relation::text, column_name;
SELECT action, detail -> 'moved' AS moved, detail -> 'arguments' AS arguments
  FROM envelope.audit_log WHERE action IN ('rotate_keys', 'reencrypt_all') AND detail ? 'run_id' ORDER BY id;
-- A second run finds nothing to move.
CALL envelope.reencrypt_all(1000);

-- Resumption: a run that fails half-way keeps its committed batches, and the next
-- call carries on from the block where it stopped.
-- (Here a value stored under the wrong context, in the table's last block, stops it.)
INSERT INTO fleet_person
VALUES (601, 'fleet-1', 'secret 601', envelope.encrypt('fleet-1', 'secret 601', 'wrong.context'));
CALL envelope.rotate_keys(tenants => ARRAY['fleet-1', 'fleet-2', 'fleet-3']);
CREATE TEMP TABLE secret_before AS SELECT id, secret FROM fleet_person;
SET client_min_messages = warning;
CALL envelope.reencrypt_all(150);
\echo :LAST_ERROR_SQLSTATE
SELECT relation, column_name, done > 0 AND done < total AS part_done, values_moved > 0 AS some_moved, state
  FROM envelope.rotation_progress WHERE procedure = 'reencrypt_all' AND state <> 'done';
CREATE TEMP TABLE secret_at_failure AS SELECT id, secret FROM fleet_person;
UPDATE fleet_person SET secret = envelope.encrypt(tenant, plain, 'person.secret') WHERE id = 601;
CALL envelope.reencrypt_all(150);
RESET client_min_messages;
SELECT run_id, resumed_at IS NOT NULL AS resumed, outcome FROM envelope.rotation_run
 WHERE procedure = 'reencrypt_all' ORDER BY run_id;
-- the values moved before the failure were not re-encrypted again
SELECT count(*) > 0 AS some_moved_before_failure,
       count(*) FILTER (WHERE p.secret <> f.secret) AS touched_again
  FROM secret_before b JOIN secret_at_failure f USING (id) JOIN fleet_person p USING (id)
 WHERE b.secret <> f.secret;
SELECT envelope.key_version(secret) AS version, count(*),
       count(*) FILTER (WHERE envelope.decrypt_text(tenant, secret, 'person.secret') = plain) AS decrypting
  FROM fleet_person GROUP BY 1 ORDER BY 1;
SELECT count(*) AS interrupted_runs FROM envelope.rotation_progress WHERE state = 'interrupted';

-- An interrupted run is not resumed once keys have been rotated since it started (the
-- blocks it did would keep values under the older version): the next call starts over.
INSERT INTO fleet_person
VALUES (602, 'fleet-1', 'secret 602', envelope.encrypt('fleet-1', 'secret 602', 'wrong.context'));
CALL envelope.rotate_keys(tenants => ARRAY['fleet-1']);
SET client_min_messages = warning;
CALL envelope.reencrypt_all(150);
RESET client_min_messages;
UPDATE fleet_person SET secret = envelope.encrypt(tenant, plain, 'person.secret') WHERE id = 602;
CALL envelope.rotate_keys(tenants => ARRAY['fleet-1']);
SET client_min_messages = warning;
CALL envelope.reencrypt_all(100000);
RESET client_min_messages;
SELECT run_id, outcome FROM envelope.rotation_run WHERE procedure = 'reencrypt_all' ORDER BY run_id;
SELECT count(*) FILTER (WHERE envelope.key_version(secret) = envelope.active_key_version(tenant)) AS on_active,
       count(*) FILTER (WHERE envelope.decrypt_text(tenant, secret, 'person.secret') = plain) AS decrypting
  FROM fleet_person;

-- reencrypt (one column) uses the same engine and records its run too.
CALL envelope.rotate_keys(tenants => ARRAY['fleet-2']);
SET client_min_messages = warning;
CALL envelope.reencrypt('fleet_person', 'secret', 'tenant', 300, 'person.secret');
RESET client_min_messages;
SELECT procedure, relation, column_name, values_moved, state FROM envelope.rotation_progress
 WHERE procedure = 'reencrypt';

-- Master-key rotation for a list of tenants (the local provider has one master key,
-- so the DEKs stay where they are), then for nobody left.
CALL envelope.rewrap_keys('local', ARRAY['fleet-1', 'fleet-2']);
CALL envelope.rewrap_keys('local', ARRAY['fleet-1', 'fleet-2']);
SELECT procedure, unit, done, total, state FROM envelope.rotation_progress
 WHERE procedure = 'rewrap_keys' ORDER BY run_id;

-- Nothing the procedures run resolves an operator through the caller's search_path:
-- with a schema of operators that fail for every type involved ahead of pg_catalog,
-- every procedure still completes.
CREATE SCHEMA shadow;
DO $shadow$
DECLARE
    typ text;
    op text;
BEGIN
    FOREACH typ IN ARRAY ARRAY['smallint', 'integer', 'bigint', 'numeric', 'double precision',
                               'text', 'name', 'bytea', 'tid', 'oid', '"char"', 'boolean',
                               'timestamptz', 'interval', 'jsonb', 'regclass', 'regtype']
    LOOP
        EXECUTE format('CREATE FUNCTION shadow.%s(a %s, b %s) RETURNS boolean LANGUAGE plpgsql AS '
                       '$$BEGIN RAISE EXCEPTION ''shadow operator on %s called''; END$$',
                       quote_ident('boom_' || regexp_replace(typ, '\W', '', 'g')), typ, typ, typ);
        FOREACH op IN ARRAY ARRAY['=', '<>', '<', '>', '<=', '>=', '+', '-', '*', '/']
        LOOP
            EXECUTE format('CREATE OPERATOR shadow.%s (LEFTARG = %s, RIGHTARG = %s, FUNCTION = shadow.%s)',
                           op, typ, typ, quote_ident('boom_' || regexp_replace(typ, '\W', '', 'g')));
        END LOOP;
    END LOOP;
END
$shadow$;
SET search_path = shadow, pg_catalog, public;
SELECT 1::integer = 1::integer;
SET client_min_messages = warning;
CALL envelope.rotate_keys(tenants => ARRAY['fleet-1', 'fleet-3']);
CALL envelope.reencrypt('fleet_person', 'secret', 'tenant', 300, 'person.secret');
CALL envelope.rotate_keys(older_than => '0', tenants => ARRAY['fleet-2']);
CALL envelope.reencrypt_all(250, 1000000);
CALL envelope.rewrap_keys('local', ARRAY['fleet-3']);
SELECT count(*) AS rows_with_progress FROM envelope.rotation_progress;
RESET search_path;
DROP SCHEMA shadow CASCADE;
RESET client_min_messages;
SELECT tenant, envelope.key_version(secret) = envelope.active_key_version(tenant) AS on_active, count(*),
       count(*) FILTER (WHERE envelope.decrypt_text(tenant, secret, 'person.secret') = plain) AS decrypting
  FROM fleet_person GROUP BY 1, 2 ORDER BY 1, 2;

-- The engine's SET clause: decrypt and encrypt again in one call.
SELECT envelope.key_version(envelope.reencrypt_value('fleet-1', envelope.encrypt('fleet-1', 'x', 'c'), 'c'))
       = envelope.active_key_version('fleet-1') AS under_active,
       envelope.decrypt_text('fleet-1',
           envelope.reencrypt_value('fleet-1', envelope.encrypt('fleet-1', 'x', 'c'), 'c'), 'c') AS same_plaintext,
       envelope.reencrypt_value(NULL, '\x01'::bytea) IS NULL AS null_tenant,
       envelope.reencrypt_value('fleet-1', NULL) IS NULL AS null_value;
-- Empty, short and long values: the plaintext is kept on the stack up to 1 KB and in
-- the heap beyond, both lengths must come back whole.
SELECT n, envelope.decrypt_text('fleet-1',
              envelope.reencrypt_value('fleet-1', envelope.encrypt('fleet-1', repeat('v', n), 'c'), 'c'),
              'c') = repeat('v', n) AS same_plaintext
  FROM unnest(ARRAY[0, 1023, 1024, 1025, 5000]) n;
SELECT envelope.reencrypt_value('fleet-1', envelope.encrypt('fleet-1', 'x', 'c'), 'other');
\echo :LAST_ERROR_SQLSTATE
-- A deterministic value moves onto the equality key version: already there, same bytes.
SELECT envelope.reencrypt_value('fleet-1', envelope.encrypt_deterministic('fleet-1', 'x'))
       = envelope.encrypt_deterministic('fleet-1', 'x') AS deterministic_unchanged;
SELECT envelope.reencrypt_value('fleet-1', '\x0102'::bytea);
\echo :LAST_ERROR_SQLSTATE

-- The progress is for envelope_admin; PUBLIC sees nothing.
SELECT has_table_privilege('envelope_admin', 'envelope.rotation_progress', 'SELECT') AS admin_reads,
       has_table_privilege('public', 'envelope.rotation_progress', 'SELECT') AS public_reads,
       has_function_privilege('envelope_admin', 'envelope.reencrypt_all(integer, integer)', 'EXECUTE') AS admin_calls,
       has_function_privilege('public', 'envelope.rotate_keys(interval, text[])', 'EXECUTE') AS public_calls,
       has_function_privilege('envelope_user', 'envelope.reencrypt_value(text, bytea, text)', 'EXECUTE') AS user_reencrypts;

SELECT envelope.unregister_column('fleet_person', 'secret'), envelope.unregister_column('fleet_person', 'email'),
       envelope.unregister_column('fleet_event', 'payload');
DROP TABLE fleet_person, fleet_event;

-- rewrap_tenants, the batch step of rewrap_keys: a NULL or empty master key is refused.
SELECT envelope.rewrap_tenants(NULL, ARRAY['re-a']);
SELECT envelope.rewrap_tenants('', ARRAY['re-a']);
