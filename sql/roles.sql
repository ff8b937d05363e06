-- Roles: envelope_user encrypts and decrypts without any privilege on the key store;
-- envelope_admin manages keys; everyone else gets nothing.
\set VERBOSITY default
\set SHOW_CONTEXT never
CREATE ROLE regress_alice LOGIN IN ROLE envelope_user;
CREATE ROLE regress_carol LOGIN IN ROLE envelope_admin;
CREATE ROLE regress_mallory LOGIN;
CREATE SCHEMA regress_alice_schema AUTHORIZATION regress_alice;
SELECT envelope.create_tenant('roles-tenant');
SELECT envelope.cache_flush();

SET ROLE regress_alice;
-- A user with a hostile search_path: an "=" operator of her own, first in the path,
-- must never run inside the key store's queries (they run as the table owner).
CREATE FUNCTION regress_alice_schema.spy_eq(text, text) RETURNS boolean
    LANGUAGE plpgsql AS $$ BEGIN RAISE NOTICE 'spy_eq ran as %', current_user; RETURN $1 OPERATOR(pg_catalog.=) $2; END $$;
CREATE OPERATOR regress_alice_schema.= (LEFTARG = text, RIGHTARG = text, FUNCTION = regress_alice_schema.spy_eq);
SET search_path = regress_alice_schema, pg_catalog;
SELECT envelope.decrypt_text('roles-tenant', envelope.encrypt('roles-tenant', 'alice was here'));
RESET search_path;
SELECT * FROM envelope.data_key;
SELECT * FROM envelope.tenant;
SELECT * FROM envelope.tenant_keys;
SELECT envelope.create_tenant('alice-tenant');
SELECT envelope.cache_flush();
SET envelope.local_master_key_file = '/tmp/elsewhere.key';
\echo :LAST_ERROR_SQLSTATE
SHOW envelope.local_master_key_file;
SHOW envelope.aws_endpoint;
SET envelope.kms_provider = 'local';
\echo :LAST_ERROR_SQLSTATE
RESET ROLE;

SET ROLE regress_carol;
SELECT envelope.create_tenant('carol-tenant');
SELECT tenant, version, state FROM envelope.tenant_keys WHERE tenant = 'carol-tenant';
SELECT envelope.decrypt_text('carol-tenant', envelope.encrypt('carol-tenant', 'admins are users too'));
SELECT count(*) FROM envelope.data_key;
SELECT entries >= 0 AS can_read_stats FROM envelope.cache_stats;
RESET ROLE;

SET ROLE regress_mallory;
SELECT envelope.encrypt('acme', 'x');
SELECT envelope.decrypt('acme', '\x00');
SELECT * FROM envelope.cache_stats;
RESET ROLE;

DROP SCHEMA regress_alice_schema CASCADE;
DROP ROLE regress_alice, regress_carol, regress_mallory;
