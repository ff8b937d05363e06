-- Inventory of encrypted columns: registration, renames, drops, usage counts, errors.
\set VERBOSITY default
\set SHOW_CONTEXT never
SELECT envelope.create_tenant('inv-a');
SELECT envelope.create_tenant('inv-b');
CREATE TABLE inv_orders (id int PRIMARY KEY, org text, card bytea, email bytea, note text);
INSERT INTO inv_orders
    SELECT g, CASE WHEN g % 3 = 0 THEN 'inv-b' ELSE 'inv-a' END,
           envelope.encrypt(CASE WHEN g % 3 = 0 THEN 'inv-b' ELSE 'inv-a' END, 'card ' || g, 'card'),
           envelope.encrypt_deterministic(CASE WHEN g % 3 = 0 THEN 'inv-b' ELSE 'inv-a' END, 'e' || g)
      FROM generate_series(1, 300) g;

-- Registration: nothing is known about the values until they are counted.
SELECT envelope.register_column('inv_orders', 'card', 'org', 'card');
SELECT envelope.register_column('inv_orders', 'email', 'org');
SELECT * FROM envelope.encrypted_columns ORDER BY column_name;
-- The labels behind it, as pg_dump will write them.
SELECT objname, label FROM pg_seclabels WHERE provider = 'pg_envelope' ORDER BY objname;

-- Renames of the table, the encrypted column and the tenant column keep it.
ALTER TABLE inv_orders RENAME TO inv_orders2;
ALTER TABLE inv_orders2 RENAME card TO card_ct;
ALTER TABLE inv_orders2 RENAME org TO tenant_name;
SELECT relation, column_name, tenant_column, context FROM envelope.encrypted_columns ORDER BY column_name;

-- Counting: per tenant, version and format.
CALL envelope.count_key_usage(batch_size => 40);
SELECT relation, column_name, value_kind, counted_at IS NOT NULL AS counted
  FROM envelope.encrypted_columns ORDER BY column_name;
SELECT relation, column_name, tenant, version, value_kind, value_count
  FROM envelope.column_key_usage ORDER BY column_name, tenant;
SELECT tenant, version, value_count, counted_at IS NOT NULL AS counted
  FROM envelope.key_usage WHERE tenant LIKE 'inv-%' ORDER BY 1, 2;

-- After a rotation and a few new values, a new count sees both versions.
SELECT envelope.rotate_tenant_key('inv-a');
UPDATE inv_orders2 SET card_ct = envelope.encrypt(tenant_name, 'new', 'card') WHERE id <= 10;
-- A value that is not a ciphertext is counted as such.
UPDATE inv_orders2 SET card_ct = '\x0102' WHERE id = 11;
CALL envelope.count_key_usage();
SELECT tenant, version, value_kind, value_count
  FROM envelope.column_key_usage WHERE column_name = 'card_ct' ORDER BY 1, 2, 3;
SELECT tenant, version, value_count FROM envelope.key_usage WHERE tenant LIKE 'inv-%' ORDER BY 1, 2;

-- Partial counts left by an interrupted run (of a backend now gone) never show, and
-- the next run clears them.
INSERT INTO envelope.column_usage_scan VALUES (0, 'inv_orders2'::regclass, 3, 'inv-a', 1, 1, 1000000);
SELECT sum(value_count) FROM envelope.key_usage WHERE tenant = 'inv-a';
CALL envelope.count_key_usage();
SELECT count(*) AS partial_rows FROM envelope.column_usage_scan;

-- Registering again replaces the context; the tenant column may be another one.
ALTER TABLE inv_orders2 ADD COLUMN other_tenant varchar(50);
SELECT envelope.register_column('inv_orders2', 'email', 'other_tenant', 'mail');
SELECT column_name, tenant_column, context FROM envelope.encrypted_columns ORDER BY column_name;
SELECT envelope.register_column('inv_orders2', 'email', 'tenant_name');

-- Unregister, and the column is gone from the inventory (and from the counts).
SELECT envelope.unregister_column('inv_orders2', 'email');
SELECT column_name FROM envelope.encrypted_columns;
SELECT objname, label FROM pg_seclabels WHERE provider = 'pg_envelope' ORDER BY objname;
SELECT envelope.register_column('inv_orders2', 'email', 'tenant_name');

-- Dropping the encrypted column or the table removes its registration.
ALTER TABLE inv_orders2 DROP COLUMN email;
SELECT column_name FROM envelope.encrypted_columns;
CREATE TABLE inv_dropme (t text, v bytea);
SELECT envelope.register_column('inv_dropme', 'v', 't');
DROP TABLE inv_dropme;
SELECT relation, column_name FROM envelope.encrypted_columns ORDER BY 1, 2;

-- Dropping the tenant column leaves a registration without a tenant column.
CREATE TABLE inv_broken (t text, v bytea);
SELECT envelope.register_column('inv_broken', 'v', 't');
ALTER TABLE inv_broken DROP COLUMN t;
SELECT relation, column_name, tenant_column FROM envelope.encrypted_columns WHERE relation = 'inv_broken'::regclass;
SELECT envelope.unregister_column('inv_broken', 'v');

-- Errors.
SELECT envelope.register_column('inv_orders2', 'nope', 'tenant_name');
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.register_column('inv_orders2', 'card_ct', 'nope');
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.register_column('inv_orders2', 'note', 'tenant_name');
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.register_column('inv_orders2', 'card_ct', 'id');
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.register_column('inv_orders2', 'card_ct', 'card_ct');
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.register_column('inv_orders2', 'ctid', 'tenant_name');
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.register_column('inv_orders2', 'tenant_name', 'other_tenant');
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.register_column(NULL, 'card_ct', 'tenant_name');
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.register_column('inv_orders2', 'card_ct', NULL);
\echo :LAST_ERROR_SQLSTATE
CREATE VIEW inv_view AS SELECT * FROM inv_orders2;
SELECT envelope.register_column('inv_view', 'card_ct', 'tenant_name');
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.unregister_column('inv_orders2', 'id');
\echo :LAST_ERROR_SQLSTATE
CALL envelope.count_key_usage(0);
\echo :LAST_ERROR_SQLSTATE
-- count_key_usage commits per batch: not inside a transaction block.
BEGIN;
CALL envelope.count_key_usage();
\echo :LAST_ERROR_SQLSTATE
ROLLBACK;

-- Hand-written labels are checked.
SECURITY LABEL FOR pg_envelope ON COLUMN inv_orders2.note IS 'secret';
\echo :LAST_ERROR_SQLSTATE
SECURITY LABEL FOR pg_envelope ON COLUMN inv_orders2.note IS '{"role": "encrypted"}';
\echo :LAST_ERROR_SQLSTATE
SECURITY LABEL FOR pg_envelope ON COLUMN inv_orders2.note IS '{"role": "encrypted", "tenant": "t", "context": 1}';
\echo :LAST_ERROR_SQLSTATE
SECURITY LABEL FOR pg_envelope ON TABLE inv_orders2 IS '{"role": "tenant", "tag": "x"}';
\echo :LAST_ERROR_SQLSTATE
SECURITY LABEL FOR pg_envelope ON COLUMN inv_view.note IS '{"role": "tenant", "tag": "x"}';
\echo :LAST_ERROR_SQLSTATE

-- Privileges: envelope_admin registers (with SELECT on the table) and counts; others cannot.
CREATE ROLE regress_inv_admin IN ROLE envelope_admin;
CREATE ROLE regress_inv_nobody;
CREATE TABLE inv_admin_t (t text, v bytea);
SET ROLE regress_inv_admin;
SELECT envelope.register_column('inv_admin_t', 'v', 't');
\echo :LAST_ERROR_SQLSTATE
RESET ROLE;
GRANT SELECT ON inv_admin_t TO regress_inv_admin;
SET ROLE regress_inv_admin;
SELECT envelope.register_column('inv_admin_t', 'v', 't');
SELECT relation, column_name FROM envelope.encrypted_columns ORDER BY 1, 2;
RESET ROLE;
SET ROLE regress_inv_nobody;
SELECT envelope.register_column('inv_admin_t', 'v', 't');
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM envelope.encrypted_columns;
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM envelope.key_usage;
\echo :LAST_ERROR_SQLSTATE
RESET ROLE;
SELECT envelope.unregister_column('inv_admin_t', 'v');
DROP TABLE inv_admin_t;
DROP VIEW inv_view;
DROP ROLE regress_inv_admin, regress_inv_nobody;

-- A partitioned table is counted partition by partition.  Values that are not
-- ciphertexts (too short for their format, empty) count as such, never as a version.
CREATE TABLE inv_parts (id int, t text, v bytea) PARTITION BY RANGE (id);
CREATE TABLE inv_parts_1 PARTITION OF inv_parts FOR VALUES FROM (0) TO (100);
CREATE TABLE inv_parts_2 PARTITION OF inv_parts FOR VALUES FROM (100) TO (200);
INSERT INTO inv_parts SELECT g, 'inv-b', envelope.encrypt('inv-b', 'p' || g) FROM generate_series(1, 150) g;
INSERT INTO inv_parts VALUES (199, 'inv-b', '\x0100000001'), (198, 'inv-b', ''),
    (197, 'inv-b', '\x02000000010000'), (196, NULL, '\x01'), (195, 'inv-b', NULL);
SELECT envelope.register_column('inv_parts', 'v', 't');
CALL envelope.count_key_usage(batch_size => 30);
SELECT tenant, version, value_kind, value_count
  FROM envelope.column_key_usage WHERE relation = 'inv_parts'::regclass ORDER BY 1, 2, 3;
SELECT * FROM envelope.scan_key_usage('inv_parts_2', 'v', 't') ORDER BY 1, 2, 3;
SELECT * FROM envelope.scan_key_usage('inv_parts_2', 'v', 't', 0, 0);
SELECT * FROM envelope.scan_key_usage('inv_parts_2', 'v', 't', 1000, 10);
-- The retire guard reads the partitions too.
SELECT envelope.rotate_tenant_key('inv-b');
SELECT envelope.retire_key_version('inv-b', 1);
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM envelope.scan_key_usage('inv_parts', 'v', 't');
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM envelope.scan_key_usage('inv_parts_1', 'v', 'nope');
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM envelope.scan_key_usage('inv_parts_1', 'v', 't', -1, 10);
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM envelope.scan_key_usage('inv_parts_1', NULL, 't');
\echo :LAST_ERROR_SQLSTATE
-- Row-level security that applies to the caller is not bypassed: the scan is refused.
CREATE ROLE regress_inv_rls IN ROLE envelope_admin;
GRANT SELECT ON inv_parts_1 TO regress_inv_rls;
ALTER TABLE inv_parts_1 ENABLE ROW LEVEL SECURITY;
SET ROLE regress_inv_rls;
SELECT * FROM envelope.scan_key_usage('inv_parts_1', 'v', 't');
\echo :LAST_ERROR_SQLSTATE
RESET ROLE;
DROP OWNED BY regress_inv_rls;
DROP ROLE regress_inv_rls;
DROP TABLE inv_parts;
DROP TABLE inv_orders2;
SELECT count(*) AS registered FROM envelope.encrypted_columns;
