-- Audit trail: a row per key action, with the caller; append-only; rolled back with
-- its action.
\set VERBOSITY default
\set SHOW_CONTEXT never
CREATE ROLE regress_audit_admin IN ROLE envelope_admin;
CREATE ROLE regress_audit_user IN ROLE envelope_user;
CREATE TEMP TABLE mark AS SELECT coalesce(max(id), 0) AS last FROM envelope.audit_log;

SET ROLE regress_audit_admin;
SELECT envelope.create_tenant('aud');
SELECT envelope.rotate_tenant_key('aud');
SELECT envelope.retire_key_version('aud', 1);
SELECT envelope.reactivate_key_version('aud', 1);
SELECT envelope.disable_tenant('aud');
SELECT envelope.enable_tenant('aud');
SELECT envelope.rewrap('', 'aud');
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.audit_record('reencrypt_all', 'aud', ARRAY[1, 2], NULL, '{"values_moved": 12}');
-- A rolled-back action leaves no row.
BEGIN;
SELECT envelope.rotate_tenant_key('aud');
ROLLBACK;
SELECT envelope.create_tenant('aud-gone');
SELECT envelope.destroy_tenant('aud-gone', 'aud-gone');
RESET ROLE;

SELECT a.id - m.last AS n, a."session_user" = session_user AS session_user_ok,
       a."current_user", a.action, a.tenant, a.versions,
       a.kms_key ~ '^local:[0-9a-f]{16}$' AS kms_key_is_local_id, a.detail,
       a.xid IS NOT NULL AS has_xid
  FROM envelope.audit_log a, mark m WHERE a.id > m.last ORDER BY a.id;
-- One transaction id per action, none for the rolled-back rotation.
SELECT count(DISTINCT xid) AS transactions FROM envelope.audit_log a, mark m WHERE a.id > m.last;

-- envelope_admin reads the trail; nobody changes it, not even its owner.
SET ROLE regress_audit_admin;
SELECT count(*) > 0 AS admin_can_read FROM envelope.audit_log;
UPDATE envelope.audit_log SET action = 'nothing happened';
\echo :LAST_ERROR_SQLSTATE
DELETE FROM envelope.audit_log;
\echo :LAST_ERROR_SQLSTATE
TRUNCATE envelope.audit_log;
\echo :LAST_ERROR_SQLSTATE
INSERT INTO envelope.audit_log ("session_user", "current_user", action) VALUES ('x', 'y', 'forged');
\echo :LAST_ERROR_SQLSTATE
RESET ROLE;
UPDATE envelope.audit_log SET action = 'nothing happened';
\echo :LAST_ERROR_SQLSTATE
DELETE FROM envelope.audit_log;
\echo :LAST_ERROR_SQLSTATE
TRUNCATE envelope.audit_log;
\echo :LAST_ERROR_SQLSTATE

-- Application roles cannot read or add rows.
SET ROLE regress_audit_user;
SELECT count(*) FROM envelope.audit_log;
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.audit_record('forged');
\echo :LAST_ERROR_SQLSTATE
RESET ROLE;

-- audit_record errors.
SELECT envelope.audit_record(NULL);
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.audit_record('');
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.audit_record('x', versions => ARRAY[1, NULL]);
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.audit_record('x', versions => ARRAY[[1], [2]]);
\echo :LAST_ERROR_SQLSTATE

DROP ROLE regress_audit_admin, regress_audit_user;
