-- The key cache's miss path reads the key store through the tables' indexes
-- (src/keystore_read.c) and leaves to the SQL path every table shape it was not
-- written for.  Either way the answers are the same.
\set VERBOSITY default
\set SHOW_CONTEXT never

-- The same answers through the indexes and through SQL, for every kind of key store
-- row: each case is asked once as the direct reader answers it, then again with
-- row security forced on the key tables (a permissive policy: the rows are the same),
-- which sends every read to SQL.
CREATE ROLE regress_kr_one IN ROLE envelope_user;
CREATE ROLE regress_kr_two IN ROLE envelope_user;
CREATE ROLE regress_kr_none IN ROLE envelope_user;
SELECT envelope.create_tenant('kr-live');
CREATE TABLE kr_v AS SELECT 1 AS version, envelope.encrypt('kr-live', 'one') AS v;
SELECT envelope.rotate_tenant_key('kr-live');
INSERT INTO kr_v SELECT 2, envelope.encrypt('kr-live', 'two');
SELECT envelope.rotate_tenant_key('kr-live');
INSERT INTO kr_v SELECT 3, envelope.encrypt('kr-live', 'three');
-- version 9 was never created
INSERT INTO kr_v SELECT 9, overlay(v placing '\x00000009'::bytea from 2 for 4) FROM kr_v WHERE version = 3;
SELECT envelope.retire_key_version('kr-live', 1);
SELECT envelope.create_tenant('kr-off');
INSERT INTO kr_v SELECT 10, envelope.encrypt('kr-off', 'off');
SELECT envelope.disable_tenant('kr-off');
SELECT envelope.create_tenant('kr-gone');
INSERT INTO kr_v SELECT 20, envelope.encrypt('kr-gone', 'gone');
SELECT envelope.destroy_tenant('kr-gone', 'kr-gone');
-- Six versions, more than shared memory holds with a tenant: 1 retired, 2 destroyed
-- (by hand, as a standby may see it), 3 to 6 active.  One read answers them all.
SELECT envelope.create_tenant('kr-many');
INSERT INTO kr_v SELECT 31, envelope.encrypt('kr-many', 'many 1');
SELECT envelope.rotate_tenant_key('kr-many');
INSERT INTO kr_v SELECT 32, envelope.encrypt('kr-many', 'many 2');
SELECT envelope.rotate_tenant_key('kr-many');
INSERT INTO kr_v SELECT 33, envelope.encrypt('kr-many', 'many 3');
SELECT envelope.rotate_tenant_key('kr-many');
INSERT INTO kr_v SELECT 34, envelope.encrypt('kr-many', 'many 4');
SELECT envelope.rotate_tenant_key('kr-many');
INSERT INTO kr_v SELECT 35, envelope.encrypt('kr-many', 'many 5');
SELECT envelope.rotate_tenant_key('kr-many');
INSERT INTO kr_v SELECT 36, envelope.encrypt('kr-many', 'many 6');
SELECT envelope.retire_key_version('kr-many', 1);
UPDATE envelope.data_key SET state = 'destroyed', wrapped_dek = NULL
 WHERE tenant = 'kr-many' AND version = 2;
SELECT envelope.create_tenant('kr-granted');
SELECT envelope.grant_tenant('kr-granted', 'regress_kr_one') AS granted;
SELECT envelope.grant_tenant('kr-granted', 'regress_kr_two') AS granted;
GRANT SELECT ON kr_v TO PUBLIC;

-- One case: its answer, or its error's SQLSTATE and message.
CREATE FUNCTION kr_try(as_role text, query text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    answer text;
BEGIN
    IF as_role IS NOT NULL THEN
        EXECUTE format('SET ROLE %I', as_role);
    END IF;
    BEGIN
        EXECUTE query INTO answer;
    EXCEPTION WHEN OTHERS THEN
        answer := 'ERROR ' || SQLSTATE || ': ' || SQLERRM;
    END;
    RESET ROLE;
    RETURN answer;
END $$;
CREATE TABLE kr_case (n int, as_role text, query text);
INSERT INTO kr_case VALUES
  (1, NULL, $q$SELECT envelope.active_key_version('kr-live')$q$),
  (2, NULL, $q$SELECT envelope.key_version(envelope.encrypt('kr-live', 'x'))$q$),
  (3, NULL, $q$SELECT envelope.decrypt_text('kr-live', v) FROM kr_v WHERE version = 1$q$),
  (4, NULL, $q$SELECT envelope.decrypt_text('kr-live', v) FROM kr_v WHERE version = 2$q$),
  (5, NULL, $q$SELECT envelope.decrypt_text('kr-live', v) FROM kr_v WHERE version = 3$q$),
  (6, NULL, $q$SELECT envelope.decrypt_text('kr-live', v) FROM kr_v WHERE version = 9$q$),
  (7, NULL, $q$SELECT envelope.decrypt_text('kr-off', v) FROM kr_v WHERE version = 10$q$),
  (8, NULL, $q$SELECT envelope.key_version(envelope.encrypt('kr-off', 'x'))$q$),
  (9, NULL, $q$SELECT envelope.decrypt_text('kr-gone', v) FROM kr_v WHERE version = 20$q$),
  (10, NULL, $q$SELECT envelope.key_version(envelope.encrypt('kr-gone', 'x'))$q$),
  (11, NULL, $q$SELECT envelope.key_version(envelope.encrypt('kr-nobody', 'x'))$q$),
  (12, 'regress_kr_one', $q$SELECT envelope.key_version(envelope.encrypt('kr-granted', 'x'))$q$),
  (13, 'regress_kr_two', $q$SELECT envelope.key_version(envelope.encrypt('kr-granted', 'x'))$q$),
  (14, 'regress_kr_none', $q$SELECT envelope.key_version(envelope.encrypt('kr-granted', 'x'))$q$),
  (15, 'regress_kr_none', $q$SELECT envelope.key_version(envelope.encrypt('kr-live', 'x'))$q$),
  (16, NULL, $q$SELECT envelope.active_key_version('kr-many')$q$),
  (17, NULL, $q$SELECT envelope.decrypt_text('kr-many', v) FROM kr_v WHERE version = 31$q$),
  (18, NULL, $q$SELECT envelope.decrypt_text('kr-many', v) FROM kr_v WHERE version = 32$q$),
  (19, NULL, $q$SELECT envelope.decrypt_text('kr-many', v) FROM kr_v WHERE version = 33$q$),
  (20, NULL, $q$SELECT envelope.decrypt_text('kr-many', v) FROM kr_v WHERE version = 34$q$),
  (21, NULL, $q$SELECT envelope.decrypt_text('kr-many', v) FROM kr_v WHERE version = 35$q$),
  (22, NULL, $q$SELECT envelope.decrypt_text('kr-many', v) FROM kr_v WHERE version = 36$q$),
  (23, NULL, $q$SELECT envelope.key_version(envelope.encrypt('kr-many', 'x'))$q$);

-- Through the indexes (a key store change first: every tenant is read again).
UPDATE envelope.tenant SET state = state WHERE false;
CREATE TABLE kr_direct AS SELECT n, kr_try(as_role, query) AS answer FROM kr_case;
SELECT * FROM kr_direct ORDER BY n;

-- A new session finds what those reads published in shared memory (no key store
-- change since): the same answers.
\c
\set VERBOSITY default
\set SHOW_CONTEXT never
CREATE TABLE kr_shared AS SELECT n, kr_try(as_role, query) AS answer FROM kr_case;
SELECT n, d.answer AS direct, s.answer AS from_shared_memory
  FROM kr_direct d FULL JOIN kr_shared s USING (n)
 WHERE d.answer IS DISTINCT FROM s.answer ORDER BY n;

-- Through SQL.
ALTER TABLE envelope.tenant ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
ALTER TABLE envelope.data_key ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
ALTER TABLE envelope.tenant_grant ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY kr_all ON envelope.tenant USING (true);
CREATE POLICY kr_all ON envelope.data_key USING (true);
CREATE POLICY kr_all ON envelope.tenant_grant USING (true);
UPDATE envelope.tenant SET state = state WHERE false;
CREATE TABLE kr_sql AS SELECT n, kr_try(as_role, query) AS answer FROM kr_case;
SELECT n, d.answer AS direct, s.answer AS through_sql
  FROM kr_direct d FULL JOIN kr_sql s USING (n)
 WHERE d.answer IS DISTINCT FROM s.answer ORDER BY n;
DROP POLICY kr_all ON envelope.tenant;
DROP POLICY kr_all ON envelope.data_key;
DROP POLICY kr_all ON envelope.tenant_grant;
ALTER TABLE envelope.tenant NO FORCE ROW LEVEL SECURITY, DISABLE ROW LEVEL SECURITY;
ALTER TABLE envelope.data_key NO FORCE ROW LEVEL SECURITY, DISABLE ROW LEVEL SECURITY;
ALTER TABLE envelope.tenant_grant NO FORCE ROW LEVEL SECURITY, DISABLE ROW LEVEL SECURITY;
SELECT envelope.revoke_tenant('kr-granted', 'regress_kr_one') AS revoked;
SELECT envelope.revoke_tenant('kr-granted', 'regress_kr_two') AS revoked;
DROP FUNCTION kr_try(text, text);
DROP TABLE kr_case, kr_direct, kr_shared, kr_sql, kr_v;
DROP ROLE regress_kr_one, regress_kr_two, regress_kr_none;

-- An index on envelope.tenant that compares names otherwise than text does (bpchar_ops
-- makes 'kr-pad' and 'kr-pad ' equal) is not used: both tenants are found.
SELECT envelope.create_tenant('kr-pad');
SELECT envelope.create_tenant('kr-pad ');
SELECT envelope.rotate_tenant_key('kr-pad ');
SELECT conrelid::regclass, conname FROM pg_constraint
 WHERE confrelid = 'envelope.tenant'::regclass OR conname = 'tenant_pkey' ORDER BY 2;
ALTER TABLE envelope.tenant DROP CONSTRAINT tenant_pkey CASCADE;
CREATE INDEX kr_tenant_bpchar ON envelope.tenant (tenant bpchar_ops);
UPDATE envelope.tenant SET state = state WHERE false;
SELECT envelope.active_key_version('kr-pad ') AS padded, envelope.active_key_version('kr-pad') AS plain;
DROP INDEX envelope.kr_tenant_bpchar;
ALTER TABLE envelope.tenant ADD CONSTRAINT tenant_pkey PRIMARY KEY (tenant);
ALTER TABLE envelope.data_key ADD CONSTRAINT data_key_tenant_fkey
    FOREIGN KEY (tenant) REFERENCES envelope.tenant (tenant);
ALTER TABLE envelope.tenant_grant ADD CONSTRAINT tenant_grant_tenant_fkey
    FOREIGN KEY (tenant) REFERENCES envelope.tenant (tenant);
SELECT conrelid::regclass, conname FROM pg_constraint
 WHERE confrelid = 'envelope.tenant'::regclass OR conname = 'tenant_pkey' ORDER BY 2;

-- A tenant stored in an inheritance child of envelope.tenant is a row of the key
-- store for every query on the table, so for the key cache too.  (Last: the table
-- keeps relhassubclass until a VACUUM, which sends every later read to SQL.)
SELECT envelope.create_tenant('kr-child');
CREATE TEMP TABLE kr_child_value AS SELECT envelope.encrypt('kr-child', 'in a child') AS v;
CREATE TABLE kr_tenant_child () INHERITS (envelope.tenant);
SET session_replication_role = replica;
INSERT INTO kr_tenant_child SELECT * FROM ONLY envelope.tenant WHERE tenant = 'kr-child';
DELETE FROM ONLY envelope.tenant WHERE tenant = 'kr-child';
RESET session_replication_role;
SELECT envelope.decrypt_text('kr-child', v) AS from_child FROM kr_child_value;
SELECT envelope.active_key_version('kr-child') AS child_version;
SET session_replication_role = replica;
INSERT INTO envelope.tenant OVERRIDING SYSTEM VALUE SELECT * FROM kr_tenant_child;
RESET session_replication_role;
DELETE FROM ONLY kr_tenant_child;
DROP TABLE kr_tenant_child;
SELECT envelope.destroy_tenant('kr-child', 'kr-child');
