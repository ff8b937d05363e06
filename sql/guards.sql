-- Guards: retire_key_version refuses while registered columns still hold values under
-- the version; force retires anyway; reactivate undoes it; destroy needs a confirmation.
\set VERBOSITY default
\set SHOW_CONTEXT never
SELECT envelope.create_tenant('grd');
SELECT envelope.create_tenant('grd-other');
CREATE TABLE grd_t (id int, tenant text, v bytea, d bytea);
INSERT INTO grd_t SELECT g, 'grd', envelope.encrypt('grd', 'x' || g), NULL FROM generate_series(1, 5) g;
INSERT INTO grd_t SELECT 100 + g, 'grd-other', envelope.encrypt('grd-other', 'y'), NULL FROM generate_series(1, 3) g;
SELECT envelope.register_column('grd_t', 'v', 'tenant');
SELECT envelope.register_column('grd_t', 'd', 'tenant');
SELECT envelope.rotate_tenant_key('grd');

-- Five values under version 1 of grd (grd-other's version 1 is another key).
SELECT envelope.retire_key_version('grd', 1);
\echo :LAST_ERROR_SQLSTATE
SELECT version, state FROM envelope.tenant_keys WHERE tenant = 'grd' ORDER BY 1;
-- The check is made now, not from a count: move two values, still refused; all, allowed.
UPDATE grd_t SET v = envelope.encrypt(tenant, envelope.decrypt_text(tenant, v)) WHERE id <= 2;
SELECT envelope.retire_key_version('grd', 1);
\echo :LAST_ERROR_SQLSTATE
-- Deterministic values under version 1 count too.
UPDATE grd_t SET v = envelope.encrypt(tenant, envelope.decrypt_text(tenant, v)) WHERE tenant = 'grd';
UPDATE grd_t SET d = envelope.encrypt_deterministic(tenant, 'z') WHERE id = 5;
SELECT envelope.retire_key_version('grd', 1);
\echo :LAST_ERROR_SQLSTATE
UPDATE grd_t SET d = NULL;
SELECT envelope.retire_key_version('grd', 1);
SELECT version, state FROM envelope.tenant_keys WHERE tenant = 'grd' ORDER BY 1;

-- force: retired with values under it, with a warning and an audit row saying so.
SELECT envelope.rotate_tenant_key('grd');
SELECT envelope.retire_key_version('grd', 2);
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.retire_key_version('grd', 2, force => true);
SELECT envelope.decrypt_text(tenant, v) FROM grd_t WHERE id = 1;
\echo :LAST_ERROR_SQLSTATE
SELECT action, tenant, versions, detail FROM envelope.audit_log
 WHERE tenant = 'grd' AND action = 'retire' ORDER BY id;

-- Reactivation undoes the retirement: the values decrypt again.
SELECT envelope.reactivate_key_version('grd', 2);
SELECT envelope.decrypt_text(tenant, v) FROM grd_t WHERE id = 1;
SELECT version, state FROM envelope.tenant_keys WHERE tenant = 'grd' ORDER BY 1;
SELECT envelope.reactivate_key_version('grd', 2);
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.reactivate_key_version('grd', 3);
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.reactivate_key_version('grd', 9);
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.reactivate_key_version('nobody', 1);
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.reactivate_key_version('grd', NULL);
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.retire_key_version('grd', 1, NULL);
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.retire_key_version(NULL, 1);
\echo :LAST_ERROR_SQLSTATE

-- The check runs as the caller: a role that cannot read a registered table cannot
-- prove it free of the version, and is told so.
CREATE ROLE regress_grd_admin IN ROLE envelope_admin;
SELECT envelope.rotate_tenant_key('grd');
SET ROLE regress_grd_admin;
SELECT envelope.retire_key_version('grd', 2);
\echo :LAST_ERROR_SQLSTATE
RESET ROLE;
GRANT SELECT ON grd_t TO regress_grd_admin;
SET ROLE regress_grd_admin;
SELECT envelope.retire_key_version('grd', 2);
\echo :LAST_ERROR_SQLSTATE
RESET ROLE;
DROP OWNED BY regress_grd_admin;
DROP ROLE regress_grd_admin;

-- destroy_tenant: the one-argument form is gone; the confirmation must repeat the name.
SELECT envelope.destroy_tenant('grd-other');
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.destroy_tenant('grd-other', 'grd_other');
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.destroy_tenant('grd-other', NULL);
\echo :LAST_ERROR_SQLSTATE
SELECT state FROM envelope.tenant_keys WHERE tenant = 'grd-other';
SELECT envelope.destroy_tenant('grd-other', 'grd-other');
SELECT state FROM envelope.tenant_keys WHERE tenant = 'grd-other';
-- A destroyed version cannot come back.
SELECT envelope.reactivate_key_version('grd-other', 1);
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.destroy_tenant('grd-other', 'grd-other');
\echo :LAST_ERROR_SQLSTATE
DROP TABLE grd_t;
