-- envelope.check(): one row per check.  Details hold paths and counts that vary, so
-- statuses are shown, and details only where they are stable.
\set VERBOSITY default
\set SHOW_CONTEXT never
SELECT name, status FROM envelope.check();
SELECT detail FROM envelope.check() WHERE name IN ('preload', 'kms_provider', 'log_statement');

-- Settings that log plaintext literals are warnings.
SET log_statement = 'all';
SET log_min_duration_statement = 0;
SET log_min_error_statement = panic;
SELECT name, status, hint FROM envelope.check() WHERE name LIKE 'log%' ORDER BY 1;
RESET log_statement;
RESET log_min_duration_statement;
RESET log_min_error_statement;
LOAD 'auto_explain';
SELECT name, status FROM envelope.check() WHERE name = 'auto_explain';

-- A registration whose tenant column is gone is an error; uncounted columns a warning.
CREATE TABLE hc_t (t text, v bytea, w bytea);
SELECT envelope.register_column('hc_t', 'v', 't');
SELECT name, status, detail FROM envelope.check() WHERE name = 'values_under_retired_versions';
CALL envelope.count_key_usage();
ALTER TABLE hc_t DROP COLUMN t;
SELECT name, status, detail FROM envelope.check() WHERE name = 'registered_columns';
DROP TABLE hc_t;

-- Values under a retired version, per the last count.
SELECT envelope.create_tenant('hc');
CREATE TABLE hc_v (t text, v bytea);
INSERT INTO hc_v VALUES ('hc', envelope.encrypt('hc', 'a')), ('hc', envelope.encrypt('hc', 'b'));
SELECT envelope.register_column('hc_v', 'v', 't');
SELECT envelope.rotate_tenant_key('hc');
CALL envelope.count_key_usage();
SELECT envelope.retire_key_version('hc', 1, force => true);
SELECT name, status, detail FROM envelope.check() WHERE name = 'values_under_retired_versions';
DROP TABLE hc_v;
CALL envelope.count_key_usage();

-- A bad key file: the KMS call fails, and the file check says why.
SET envelope.local_master_key_file = '/nonexistent/master.key';
SELECT name, status FROM envelope.check() WHERE name IN ('kms_reachable', 'local_master_key_file');
RESET envelope.local_master_key_file;

-- Only envelope_admin may run it, and gets every row without superuser.
CREATE ROLE regress_hc_admin IN ROLE envelope_admin;
SET ROLE regress_hc_admin;
SELECT name, status FROM envelope.check() WHERE status <> 'ok' OR name LIKE 'kms%';
RESET ROLE;
DROP ROLE regress_hc_admin;
CREATE ROLE regress_hc_nobody;
SET ROLE regress_hc_nobody;
SELECT * FROM envelope.check();
\echo :LAST_ERROR_SQLSTATE
RESET ROLE;
DROP ROLE regress_hc_nobody;

-- The KMS request rate limit and the re-checks of master keys have a row each; the
-- local provider sends no requests, so the limit does not apply to it.
SELECT name, status, detail ~ '^envelope\.kms_max_requests_per_second = 0 \(no limit\); one shared bucket; .*The local provider sends no requests: the limit does not apply to it\.$' AS detail_ok
  FROM envelope.check() WHERE name = 'kms_rate_limit';
SELECT name, status, detail ~ '^envelope\.kms_recheck_interval = \d+ s; \d+ of at most 128 master keys tracked; ' AS detail_ok
  FROM envelope.check() WHERE name = 'kms_recheck';
