-- The key cache's miss path reads the key store through the tables' indexes
-- (src/keystore_read.c) and leaves to the SQL path every table shape it was not
-- written for.  Either way the answers are the same.
\set VERBOSITY default
\set SHOW_CONTEXT never

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
