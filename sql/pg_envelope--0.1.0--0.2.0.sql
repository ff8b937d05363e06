-- pg_envelope 0.1.0 -> 0.2.0.
-- The full 0.2.0 script is built from pg_envelope--0.1.0.sql followed by this file
-- (see the Makefile), so a fresh install and an updated one run the same statements.
-- This script never changes once released.

\echo Use "ALTER EXTENSION pg_envelope UPDATE TO '0.2.0'" to load this file. \quit

-- ---------------------------------------------------------------------------
-- Inventory of encrypted columns and key usage.

-- A registration is a security label of provider pg_envelope on the column (see
-- src/inventory.c): it follows renames, pg_dump writes it, and it goes with the column.
CREATE FUNCTION envelope.register_column(rel regclass, "column" name, tenant_column name,
                                         context text DEFAULT NULL)
    RETURNS void
    AS 'MODULE_PATHNAME', 'envelope_register_column'
    LANGUAGE C VOLATILE PARALLEL UNSAFE CALLED ON NULL INPUT;

CREATE FUNCTION envelope.unregister_column(rel regclass, "column" name)
    RETURNS void
    AS 'MODULE_PATHNAME', 'envelope_unregister_column'
    LANGUAGE C VOLATILE PARALLEL UNSAFE CALLED ON NULL INPUT;

-- The last usage count, per registered column.  Derived data: not dumped (the oids
-- would not survive a restore anyway); run count_key_usage() again after a restore.
CREATE TABLE envelope.counted_column (
    relid       oid NOT NULL,
    attnum      smallint NOT NULL,
    counted_at  timestamptz NOT NULL,
    PRIMARY KEY (relid, attnum)
);

-- format: 1 randomized, 2 deterministic, 0 a value that is not a pg_envelope ciphertext
-- (version 0).  Values whose tenant is NULL are not counted.
CREATE TABLE envelope.column_usage (
    relid       oid NOT NULL,
    attnum      smallint NOT NULL,
    tenant      text NOT NULL,
    version     integer NOT NULL,
    format      smallint NOT NULL,
    value_count bigint NOT NULL,
    PRIMARY KEY (relid, attnum, tenant, version, format)
);

-- Partial counts of runs in progress, per backend so that concurrent runs never mix;
-- a column's rows move to column_usage when its scan is complete, so an interrupted
-- run never leaves half a count visible.  Rows of backends that are gone are left by
-- interrupted runs and cleared by the next run.
CREATE TABLE envelope.column_usage_scan (
    pid         integer NOT NULL,
    relid       oid NOT NULL,
    attnum      smallint NOT NULL,
    tenant      text NOT NULL,
    version     integer NOT NULL,
    format      smallint NOT NULL,
    value_count bigint NOT NULL,
    PRIMARY KEY (pid, relid, attnum, tenant, version, format)
);

COMMENT ON TABLE envelope.column_usage IS
    'pg_envelope: stored values per registered column, tenant, DEK version and format, as of the last envelope.count_key_usage()';

CREATE VIEW envelope.encrypted_columns AS
    SELECT l.objoid::pg_catalog.regclass AS relation,
           a.attname AS column_name,
           ta.attname AS tenant_column,
           (l.label::pg_catalog.jsonb OPERATOR(pg_catalog.->>) 'context') AS context,
           CASE WHEN cc.relid IS NULL THEN 'unknown'
                WHEN k.randomized AND k.deterministic THEN 'both'
                WHEN k.randomized THEN 'randomized'
                WHEN k.deterministic THEN 'deterministic'
                ELSE 'none' END AS value_kind,
           cc.counted_at
      FROM pg_catalog.pg_seclabel l
      JOIN pg_catalog.pg_attribute a
        ON a.attrelid = l.objoid AND a.attnum = l.objsubid AND NOT a.attisdropped
      LEFT JOIN pg_catalog.pg_seclabel tl
        ON tl.provider = l.provider AND tl.classoid = l.classoid AND tl.objoid = l.objoid
       AND tl.objsubid > 0
       AND (tl.label::pg_catalog.jsonb OPERATOR(pg_catalog.->>) 'role') = 'tenant'
       AND (tl.label::pg_catalog.jsonb OPERATOR(pg_catalog.->>) 'tag')
           = (l.label::pg_catalog.jsonb OPERATOR(pg_catalog.->>) 'tenant')
      LEFT JOIN pg_catalog.pg_attribute ta
        ON ta.attrelid = tl.objoid AND ta.attnum = tl.objsubid AND NOT ta.attisdropped
      LEFT JOIN envelope.counted_column cc
        ON cc.relid = l.objoid AND cc.attnum = l.objsubid
      LEFT JOIN LATERAL (
            SELECT pg_catalog.bool_or(u.format = 1) AS randomized,
                   pg_catalog.bool_or(u.format = 2) AS deterministic
              FROM envelope.column_usage u
             WHERE u.relid = l.objoid AND u.attnum = l.objsubid AND u.value_count > 0) k
        ON true
     WHERE l.provider = 'pg_envelope'
       AND l.classoid = 'pg_catalog.pg_class'::pg_catalog.regclass
       AND l.objsubid > 0
       AND (l.label::pg_catalog.jsonb OPERATOR(pg_catalog.->>) 'role') = 'encrypted';

-- Per registered column: how many stored values use each (tenant, DEK version).
CREATE VIEW envelope.column_key_usage AS
    SELECT e.relation, e.column_name, u.tenant, u.version,
           CASE u.format WHEN 1 THEN 'randomized' WHEN 2 THEN 'deterministic'
                ELSE 'not encrypted' END AS value_kind,
           u.value_count, e.counted_at
      FROM envelope.encrypted_columns e
      JOIN pg_catalog.pg_attribute a
        ON a.attrelid = e.relation AND a.attname = e.column_name
      JOIN envelope.column_usage u ON u.relid = e.relation AND u.attnum = a.attnum;

-- Per (tenant, DEK version) of the key store: stored values in every registered column,
-- as of counted_at (the oldest count among the columns; NULL while a registered
-- column has never been counted).  A version with value_count 0 is safe to retire.
CREATE VIEW envelope.key_usage AS
    SELECT d.tenant, d.version,
           COALESCE(s.value_count, 0)::bigint AS value_count,
           (SELECT CASE WHEN pg_catalog.bool_or(e.counted_at IS NULL) THEN NULL
                        ELSE pg_catalog.min(e.counted_at) END
              FROM envelope.encrypted_columns e) AS counted_at
      FROM envelope.data_key d
      LEFT JOIN (SELECT cu.tenant, cu.version, pg_catalog.sum(cu.value_count) AS value_count
                   FROM envelope.column_key_usage cu
                  GROUP BY cu.tenant, cu.version) s
        ON s.tenant = d.tenant AND s.version = d.version;

-- Values of one column per (tenant, DEK version, format) in a block range (the whole
-- table when the range is NULL), read from the header of each value: nothing is
-- decrypted.  Runs as the caller, who needs SELECT on both columns.
CREATE FUNCTION envelope.scan_key_usage(rel regclass, "column" name, tenant_column name,
                                        first_block bigint DEFAULT NULL,
                                        nblocks bigint DEFAULT NULL,
                                        OUT tenant text, OUT version integer,
                                        OUT format smallint, OUT value_count bigint)
    RETURNS SETOF record
    AS 'MODULE_PATHNAME', 'envelope_scan_key_usage'
    LANGUAGE C VOLATILE PARALLEL UNSAFE CALLED ON NULL INPUT;

-- Count stored values per (tenant, DEK version) in every registered column.  Like
-- reencrypt, each table (each partition of a partitioned one) is read in block ranges
-- of about batch_size rows, one transaction per range, so no snapshot is held for the
-- whole scan (a million rows take about a tenth of a second).  CALL it outside a
-- transaction block.
CREATE PROCEDURE envelope.count_key_usage(batch_size integer DEFAULT 1000000)
LANGUAGE plpgsql
AS $count_key_usage$
DECLARE
    col record;
    part regclass;
    total_blocks bigint;
    rows_per_block numeric;
    step bigint;
    first_block bigint;
    columns_done integer := 0;
BEGIN
    IF batch_size IS NULL OR batch_size < 1 THEN
        RAISE EXCEPTION 'batch_size must be at least 1' USING ERRCODE = '22023';
    END IF;
    DELETE FROM envelope.column_usage_scan s
     WHERE s.pid = pg_catalog.pg_backend_pid()
        OR NOT EXISTS (SELECT FROM pg_catalog.pg_stat_get_activity(s.pid));
    COMMIT;
    FOR col IN
        SELECT e.relation, e.column_name, e.tenant_column, a.attnum
          FROM envelope.encrypted_columns e
          JOIN pg_catalog.pg_attribute a ON a.attrelid = e.relation AND a.attname = e.column_name
         WHERE e.tenant_column IS NOT NULL
         ORDER BY e.relation::pg_catalog.oid, a.attnum
    LOOP
        FOR part IN
            -- The table itself, or the leaves of a partitioned one (an empty tree).
            SELECT p.relid FROM (SELECT col.relation AS relid
                                 UNION SELECT t.relid
                                   FROM pg_catalog.pg_partition_tree(col.relation) t
                                  WHERE t.isleaf) p
              JOIN pg_catalog.pg_class c ON c.oid = p.relid
             WHERE c.relkind = 'r'
             ORDER BY p.relid::pg_catalog.oid
        LOOP
            total_blocks := pg_catalog.pg_relation_size(part)
                            / pg_catalog.current_setting('block_size')::bigint;
            SELECT CASE WHEN c.relpages > 0 AND c.reltuples > 0 THEN c.reltuples / c.relpages ELSE 50 END
              INTO rows_per_block FROM pg_catalog.pg_class c WHERE c.oid = part;
            step := GREATEST(1, pg_catalog.ceil(batch_size / rows_per_block))::bigint;
            first_block := 0;
            WHILE first_block < total_blocks LOOP
                INSERT INTO envelope.column_usage_scan AS s
                    SELECT pg_catalog.pg_backend_pid(), col.relation, col.attnum,
                           u.tenant, u.version, u.format, u.value_count
                      FROM envelope.scan_key_usage(part, col.column_name, col.tenant_column,
                                                   first_block, step) u
                    ON CONFLICT (pid, relid, attnum, tenant, version, format)
                    DO UPDATE SET value_count = s.value_count + excluded.value_count;
                first_block := first_block + step;
                COMMIT;
            END LOOP;
        END LOOP;
        -- The column's count is complete: publish it in one transaction (a concurrent
        -- run publishing the same column waits, then replaces it).
        LOCK TABLE envelope.column_usage IN SHARE ROW EXCLUSIVE MODE;
        DELETE FROM envelope.column_usage WHERE relid = col.relation AND attnum = col.attnum;
        INSERT INTO envelope.column_usage
            SELECT s.relid, s.attnum, s.tenant, s.version, s.format, s.value_count
              FROM envelope.column_usage_scan s
             WHERE s.pid = pg_catalog.pg_backend_pid()
               AND s.relid = col.relation AND s.attnum = col.attnum;
        DELETE FROM envelope.column_usage_scan s
         WHERE s.pid = pg_catalog.pg_backend_pid()
           AND s.relid = col.relation AND s.attnum = col.attnum;
        INSERT INTO envelope.counted_column VALUES (col.relation, col.attnum, pg_catalog.now())
            ON CONFLICT (relid, attnum) DO UPDATE SET counted_at = excluded.counted_at;
        COMMIT;
        columns_done := columns_done + 1;
        RAISE NOTICE 'counted %.%', col.relation, pg_catalog.quote_ident(col.column_name);
    END LOOP;
    -- Forget counts of columns no longer registered.
    DELETE FROM envelope.column_usage u
     WHERE NOT EXISTS (SELECT FROM envelope.encrypted_columns e
                         JOIN pg_catalog.pg_attribute a
                           ON a.attrelid = e.relation AND a.attname = e.column_name
                        WHERE e.relation::pg_catalog.oid = u.relid AND a.attnum = u.attnum);
    DELETE FROM envelope.counted_column c
     WHERE NOT EXISTS (SELECT FROM envelope.encrypted_columns e
                         JOIN pg_catalog.pg_attribute a
                           ON a.attrelid = e.relation AND a.attname = e.column_name
                        WHERE e.relation::pg_catalog.oid = c.relid AND a.attnum = c.attnum);
    RAISE NOTICE 'counted % registered columns', columns_done;
END
$count_key_usage$;

REVOKE ALL ON envelope.counted_column, envelope.column_usage, envelope.column_usage_scan,
    envelope.encrypted_columns, envelope.column_key_usage, envelope.key_usage FROM PUBLIC;
REVOKE ALL ON FUNCTION envelope.register_column(regclass, name, name, text),
    envelope.unregister_column(regclass, name) FROM PUBLIC;
REVOKE ALL ON PROCEDURE envelope.count_key_usage(integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION envelope.scan_key_usage(regclass, name, name, bigint, bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION envelope.scan_key_usage(regclass, name, name, bigint, bigint)
    TO envelope_admin;
GRANT EXECUTE ON FUNCTION envelope.register_column(regclass, name, name, text),
    envelope.unregister_column(regclass, name) TO envelope_admin;
GRANT EXECUTE ON PROCEDURE envelope.count_key_usage(integer) TO envelope_admin;
GRANT SELECT ON envelope.encrypted_columns, envelope.column_key_usage, envelope.key_usage
    TO envelope_admin;
-- count_key_usage runs as its caller (it reads the caller's tables) and writes the counts.
GRANT SELECT, INSERT, UPDATE, DELETE
    ON envelope.counted_column, envelope.column_usage, envelope.column_usage_scan
    TO envelope_admin;

-- ---------------------------------------------------------------------------
-- Audit trail and guards.

-- One row per key action, written in the action's transaction (a rolled-back action
-- leaves none) by the extension's C code as the table owner, recording the caller.
CREATE TABLE envelope.audit_log (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    logged_at      timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    "session_user" name NOT NULL,
    "current_user" name NOT NULL,
    action         text NOT NULL,
    tenant         text,
    versions       integer[],
    kms_key        text,
    detail         jsonb,
    xid            xid8 NOT NULL DEFAULT pg_catalog.pg_current_xact_id()
);

COMMENT ON TABLE envelope.audit_log IS
    'pg_envelope: who did what to which key, append-only';

REVOKE ALL ON envelope.audit_log FROM PUBLIC;
GRANT SELECT ON envelope.audit_log TO envelope_admin;

-- pg_dump keeps the trail, and the sequence so restored ids continue.
SELECT pg_catalog.pg_extension_config_dump('envelope.audit_log', '');
SELECT pg_catalog.pg_extension_config_dump('envelope.audit_log_id_seq', '');

-- Append-only, even for the table's owner: rows can be added, never changed or removed
-- (privileges alone would not stop the owner).  A superuser who must prune old rows
-- disables the triggers for that, which is itself visible in the server log.
CREATE FUNCTION envelope.audit_log_append_only() RETURNS trigger
LANGUAGE plpgsql
AS $append_only$
BEGIN
    RAISE EXCEPTION 'envelope.audit_log is append-only'
        USING ERRCODE = '42501',
              DETAIL = pg_catalog.format('%s of audit rows is not allowed.', TG_OP);
END
$append_only$;
REVOKE ALL ON FUNCTION envelope.audit_log_append_only() FROM PUBLIC;

CREATE TRIGGER audit_log_append_only
    BEFORE UPDATE OR DELETE ON envelope.audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION envelope.audit_log_append_only();
CREATE TRIGGER audit_log_append_only_truncate
    BEFORE TRUNCATE ON envelope.audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION envelope.audit_log_append_only();

-- For procedures and operators: add a row attributed to the caller (current_user).
CREATE FUNCTION envelope.audit_record(action text, tenant text DEFAULT NULL,
                                      versions integer[] DEFAULT NULL,
                                      kms_key text DEFAULT NULL, detail jsonb DEFAULT NULL)
    RETURNS void
    AS 'MODULE_PATHNAME', 'envelope_audit_record'
    LANGUAGE C VOLATILE PARALLEL UNSAFE CALLED ON NULL INPUT;
REVOKE ALL ON FUNCTION envelope.audit_record(text, text, integer[], text, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION envelope.audit_record(text, text, integer[], text, jsonb)
    TO envelope_admin;

-- Guards.  retire_key_version gains force (a new signature, so the old one goes: a
-- call with two arguments would be ambiguous); destroy_tenant needs the tenant's name
-- twice.  0.1.0's C symbols stay in the library for databases not yet updated.
DROP FUNCTION envelope.retire_key_version(text, integer);
CREATE FUNCTION envelope.retire_key_version(tenant text, version integer,
                                            force boolean DEFAULT false)
    RETURNS void
    AS 'MODULE_PATHNAME', 'envelope_retire_key_version_guarded'
    LANGUAGE C VOLATILE PARALLEL UNSAFE CALLED ON NULL INPUT;

CREATE FUNCTION envelope.reactivate_key_version(tenant text, version integer)
    RETURNS void
    AS 'MODULE_PATHNAME', 'envelope_reactivate_key_version'
    LANGUAGE C VOLATILE PARALLEL UNSAFE CALLED ON NULL INPUT;

DROP FUNCTION envelope.destroy_tenant(text);
CREATE FUNCTION envelope.destroy_tenant(tenant text, confirm text)
    RETURNS void
    AS 'MODULE_PATHNAME', 'envelope_destroy_tenant_confirmed'
    LANGUAGE C VOLATILE PARALLEL UNSAFE CALLED ON NULL INPUT;

REVOKE ALL ON FUNCTION envelope.retire_key_version(text, integer, boolean),
    envelope.reactivate_key_version(text, integer),
    envelope.destroy_tenant(text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION envelope.retire_key_version(text, integer, boolean),
    envelope.reactivate_key_version(text, integer),
    envelope.destroy_tenant(text, text) TO envelope_admin;

-- ---------------------------------------------------------------------------
-- Fleet procedures: rotate_keys, reencrypt_all, rewrap_keys, rotation progress.

-- ---------------------------------------------------------------------------
-- Health check.

-- One row per check: preload, provider and KMS (one cheap request), credentials or
-- key file, cache, inventory, values under retired versions, settings that log
-- plaintext.  VOLATILE and PARALLEL UNSAFE: it calls the KMS.
CREATE FUNCTION envelope.check(OUT name text, OUT status text, OUT detail text, OUT hint text)
    RETURNS SETOF record
    AS 'MODULE_PATHNAME', 'envelope_check'
    LANGUAGE C VOLATILE PARALLEL UNSAFE;
REVOKE ALL ON FUNCTION envelope.check() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION envelope.check() TO envelope_admin;

-- ---------------------------------------------------------------------------
-- Key-store triggers fire in logical-replication apply workers too.
--
-- A logical-replication apply worker runs with session_replication_role = replica, so
-- it fires only triggers enabled ALWAYS or REPLICA, and of those only row-level ones
-- (statement triggers fire for replicated TRUNCATEs and the initial table copy).  The
-- statement triggers fire ALWAYS; row triggers, enabled for replica sessions only so
-- that an ordinary session's key-store change still costs one trigger call per
-- statement, carry a replicated disable, retire, rotate or destroy to the subscriber's
-- sessions when the apply worker commits it.
ALTER TABLE envelope.tenant ENABLE ALWAYS TRIGGER key_store_changed;
ALTER TABLE envelope.tenant ENABLE ALWAYS TRIGGER key_store_changed_truncate;
ALTER TABLE envelope.data_key ENABLE ALWAYS TRIGGER key_store_changed;
ALTER TABLE envelope.data_key ENABLE ALWAYS TRIGGER key_store_changed_truncate;

CREATE TRIGGER key_store_changed_replicated
    AFTER INSERT OR UPDATE OR DELETE ON envelope.tenant
    FOR EACH ROW EXECUTE FUNCTION envelope.key_store_changed();
CREATE TRIGGER key_store_changed_replicated
    AFTER INSERT OR UPDATE OR DELETE ON envelope.data_key
    FOR EACH ROW EXECUTE FUNCTION envelope.key_store_changed();
ALTER TABLE envelope.tenant ENABLE REPLICA TRIGGER key_store_changed_replicated;
ALTER TABLE envelope.data_key ENABLE REPLICA TRIGGER key_store_changed_replicated;
