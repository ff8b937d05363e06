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

-- Under Citus (see "Citus: key tables as reference tables") the count tables are
-- reference tables, and Citus evaluates a function with column arguments in a DELETE
-- of one on each node's copy separately: the helpers below decide what to delete here,
-- on the coordinator, and pass it as a parameter.

-- Partial counts left by runs whose backend is gone, and this backend's own.
CREATE FUNCTION envelope.count_key_usage_clear_stale()
    RETURNS void
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    stale integer[];
BEGIN
    SELECT array_agg(DISTINCT s.pid) INTO stale FROM envelope.column_usage_scan s
     WHERE s.pid = pg_backend_pid()
        OR NOT EXISTS (SELECT FROM pg_stat_get_activity(s.pid));
    DELETE FROM envelope.column_usage_scan s WHERE s.pid = ANY (stale);
END
$$;

-- Forget counts of columns no longer registered.
CREATE FUNCTION envelope.count_key_usage_forget_unregistered()
    RETURNS void
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    registered text[];
BEGIN
    SELECT array_agg(e.relation::oid || '/' || a.attnum) INTO registered
      FROM envelope.encrypted_columns e
      JOIN pg_attribute a ON a.attrelid = e.relation AND a.attname = e.column_name;
    registered := COALESCE(registered, '{}');
    DELETE FROM envelope.column_usage u WHERE NOT (u.relid || '/' || u.attnum = ANY (registered));
    DELETE FROM envelope.counted_column c WHERE NOT (c.relid || '/' || c.attnum = ANY (registered));
END
$$;

-- Count one column of a Citus table shard by shard, each shard read in one transaction
-- on the node of its first copy, and add the counts to this backend's partial counts;
-- return true.  A distributed table is empty on the coordinator, so its blocks cannot
-- be read from here.  Return false for a table Citus does not manage.
CREATE FUNCTION envelope.count_key_usage_shards(part regclass, column_name name,
                                                tenant_column name, counted_relid oid,
                                                counted_attnum smallint)
    RETURNS boolean
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    shards bigint[];
    nodes text[];
    ports integer[];
    commands text[];
    me integer := pg_backend_pid();
BEGIN
    SELECT array_agg(s.shard_id ORDER BY s.shard_id), array_agg(s.node_name ORDER BY s.shard_id),
           array_agg(s.node_port ORDER BY s.shard_id),
           array_agg(format('SELECT COALESCE(pg_catalog.jsonb_agg(u), ''[]'')'
                            '  FROM envelope.scan_key_usage(%L::pg_catalog.regclass, %L, %L) u',
                            s.shard_name, column_name, tenant_column) ORDER BY s.shard_id)
      INTO shards, nodes, ports, commands
      FROM envelope.citus_shards(part) s;
    IF shards IS NULL THEN
        RETURN false;
    END IF;
    INSERT INTO envelope.column_usage_scan AS s
    SELECT me, counted_relid, counted_attnum, u.tenant, u.version, u.format, sum(u.value_count)
      FROM envelope.citus_run_on_shards('count_key_usage', shards, nodes, ports, commands) r,
           jsonb_to_recordset(r::jsonb) AS u(tenant text, version integer, format smallint,
                                             value_count bigint)
     GROUP BY u.tenant, u.version, u.format
    ON CONFLICT ON CONSTRAINT column_usage_scan_pkey
    DO UPDATE SET value_count = s.value_count + excluded.value_count;
    RETURN true;
END
$$;

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
    PERFORM envelope.count_key_usage_clear_stale();
    COMMIT;
    -- relid: the table's oid as an oid, which Citus sends to the other copies of the
    -- count tables as a number (a regclass would go as a name, and mean nothing there)
    FOR col IN
        SELECT e.relation, e.relation::pg_catalog.oid AS relid, e.column_name, e.tenant_column, a.attnum
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
            -- a Citus table: counted shard by shard, where the shards are
            CONTINUE WHEN envelope.count_key_usage_shards(part, col.column_name, col.tenant_column,
                                                          col.relation, col.attnum);
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
        DELETE FROM envelope.column_usage WHERE relid = col.relid AND attnum = col.attnum;
        INSERT INTO envelope.column_usage
            SELECT s.relid, s.attnum, s.tenant, s.version, s.format, s.value_count
              FROM envelope.column_usage_scan s
             WHERE s.pid = pg_catalog.pg_backend_pid()
               AND s.relid = col.relid AND s.attnum = col.attnum;
        DELETE FROM envelope.column_usage_scan s
         WHERE s.pid = pg_catalog.pg_backend_pid()
           AND s.relid = col.relid AND s.attnum = col.attnum;
        INSERT INTO envelope.counted_column VALUES (col.relid, col.attnum, pg_catalog.now())
            ON CONFLICT (relid, attnum) DO UPDATE SET counted_at = excluded.counted_at;
        COMMIT;
        columns_done := columns_done + 1;
        RAISE NOTICE 'counted %.%', col.relation, pg_catalog.quote_ident(col.column_name);
    END LOOP;
    PERFORM envelope.count_key_usage_forget_unregistered();
    RAISE NOTICE 'counted % registered columns', columns_done;
END
$count_key_usage$;

REVOKE ALL ON envelope.counted_column, envelope.column_usage, envelope.column_usage_scan,
    envelope.encrypted_columns, envelope.column_key_usage, envelope.key_usage FROM PUBLIC;
REVOKE ALL ON FUNCTION envelope.register_column(regclass, name, name, text),
    envelope.unregister_column(regclass, name) FROM PUBLIC;
REVOKE ALL ON PROCEDURE envelope.count_key_usage(integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION envelope.count_key_usage_clear_stale(),
    envelope.count_key_usage_forget_unregistered(),
    envelope.count_key_usage_shards(regclass, name, name, oid, smallint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION envelope.count_key_usage_clear_stale(),
    envelope.count_key_usage_forget_unregistered(),
    envelope.count_key_usage_shards(regclass, name, name, oid, smallint) TO envelope_admin;
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
--
-- Every procedure here commits as it goes, so none of them can pin search_path with
-- SET.  They therefore do almost nothing themselves: each transaction's work is one
-- call of a helper function that does pin search_path, and the procedures' own
-- expressions contain no operator and only schema-qualified functions.  The helpers
-- schema-qualify operators (OPERATOR(pg_catalog.=)) in the SQL they generate as well.
--
-- A run is a row of envelope.rotation_run with one row per unit of work in
-- envelope.rotation_task (a column of a table, or the tenants / DEKs of the key
-- procedures).  Each batch advances its task in the same transaction as its work, so
-- after a cancel, a timeout, a terminated session or a crash the task rows say exactly
-- what was committed, and calling the same procedure again resumes the run.

-- True for a randomized value under a DEK version other than the tenant's active one,
-- and for a deterministic value under an equality key version other than its current
-- one (see "Equality key versions" below); false for the values of a disabled or
-- destroyed tenant and for anything that is not a pg_envelope value.
CREATE FUNCTION envelope.needs_reencryption(ciphertext bytea, tenant text)
    RETURNS boolean
    AS 'MODULE_PATHNAME', 'envelope_needs_reencryption'
    LANGUAGE C STABLE STRICT PARALLEL SAFE;

-- A value decrypted and encrypted again in one call (the plaintext never becomes a
-- Datum): randomized values under the tenant's active DEK version, deterministic ones
-- under its equality key version.  The batch engine's SET clause.
CREATE FUNCTION envelope.reencrypt_value(tenant text, ciphertext bytea, context text DEFAULT NULL)
    RETURNS bytea
    AS 'MODULE_PATHNAME', 'envelope_reencrypt_value'
    LANGUAGE C VOLATILE PARALLEL SAFE CALLED ON NULL INPUT;

CREATE TABLE envelope.rotation_run (
    run_id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    procedure     text NOT NULL
                  CHECK (procedure IN ('reencrypt', 'reencrypt_all', 'rotate_keys', 'rewrap_keys')),
    arguments     jsonb NOT NULL,         -- what the run does: a rerun with these resumes it
    backend_pid   integer NOT NULL,       -- the session working on it (now or last)
    backend_start timestamptz,
    started_at    timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    resumed_at    timestamptz,
    finished_at   timestamptz,
    outcome       text CHECK (outcome IN ('done', 'abandoned'))
);

COMMENT ON TABLE envelope.rotation_run IS
    'pg_envelope fleet procedure runs (rotate_keys, reencrypt_all, rewrap_keys, reencrypt), for progress and resumption';

CREATE TABLE envelope.rotation_task (
    run_id         bigint NOT NULL REFERENCES envelope.rotation_run ON DELETE CASCADE,
    task           integer NOT NULL,
    relation       oid NOT NULL,          -- the table re-encrypted, or the key table
    column_attnum  smallint,              -- re-encryption: the ciphertext column
    tenant_attnum  smallint,              -- re-encryption: the tenant column
    source_attnum  smallint,              -- a blind-index column: the column it is made from
    context        text,
    unit           text NOT NULL CHECK (unit IN ('blocks', 'tenants', 'keys')),
    done           bigint NOT NULL DEFAULT 0,
    total          bigint NOT NULL,
    tail_added     boolean NOT NULL DEFAULT false,  -- re-encryption: total grew once
    values_moved   bigint NOT NULL DEFAULT 0,
    started_at     timestamptz,
    updated_at     timestamptz,
    finished_at    timestamptz,
    -- where the session now working on the task took it up, for its rate
    active_since   timestamptz,
    done_at_start  bigint NOT NULL DEFAULT 0,
    moved_at_start bigint NOT NULL DEFAULT 0,
    shard_id       bigint,                -- Citus: the shard of `relation` re-encrypted
    PRIMARY KEY (run_id, task)
);

COMMENT ON TABLE envelope.rotation_task IS
    'pg_envelope fleet procedure progress: one row per column or key set of a run, advanced by each committed batch';

REVOKE ALL ON envelope.rotation_run, envelope.rotation_task FROM PUBLIC;

-- Is the session that last worked on a run still working on it?  Another session's
-- backend_start and state are visible to the same role or pg_read_all_stats; when
-- they are hidden, a live process with that pid counts as running.
CREATE FUNCTION envelope.rotation_run_is_live(run_pid integer, run_backend_start timestamptz)
    RETURNS boolean
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT run_pid <> pg_backend_pid()
       AND EXISTS (SELECT FROM pg_stat_activity a
                    WHERE a.pid = run_pid
                      AND (a.backend_start IS NULL OR a.backend_start = run_backend_start)
                      AND (a.state IS NULL OR a.state = 'active'))
$$;

CREATE VIEW envelope.rotation_progress AS
    SELECT r.run_id, r.procedure,
           t.relation::regclass AS relation,
           a.attname AS column_name,
           t.unit, t.done, t.total, t.values_moved,
           round((t.values_moved - t.moved_at_start)
                 / NULLIF(extract(epoch FROM t.updated_at - t.active_since), 0), 1) AS rate,
           COALESCE(t.started_at, r.started_at) AS started_at,
           t.updated_at,
           t.finished_at,
           CASE WHEN t.finished_at IS NOT NULL THEN t.finished_at
                WHEN t.done > t.done_at_start AND r.finished_at IS NULL
                THEN t.updated_at + (t.updated_at - t.active_since)
                                    * ((t.total - t.done)::double precision
                                       / (t.done - t.done_at_start))
           END AS estimated_finish,
           CASE WHEN r.finished_at IS NOT NULL THEN r.outcome
                WHEN t.finished_at IS NOT NULL THEN 'done'
                WHEN envelope.rotation_run_is_live(r.backend_pid, r.backend_start) THEN 'running'
                ELSE 'interrupted'
           END AS state,
           t.shard_id
      FROM envelope.rotation_run r
      JOIN envelope.rotation_task t USING (run_id)
      LEFT JOIN pg_catalog.pg_attribute a
             ON a.attrelid = t.relation AND a.attnum = t.column_attnum AND NOT a.attisdropped;

COMMENT ON VIEW envelope.rotation_progress IS
    'pg_envelope fleet procedures: progress of each run per column (blocks) or key set (tenants, keys), updated by every committed batch';

-- Claim the run that `arguments` describe: resume an interrupted one, or start one.
-- One run per procedure at a time (per column for reencrypt); starts are serialised.
CREATE FUNCTION envelope.rotation_run_begin(procedure text, arguments jsonb)
    RETURNS bigint
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    same_work boolean;
    r envelope.rotation_run;
    my_start timestamptz;
    now_ts timestamptz;     -- a variable: Citus refuses clock_timestamp() in an UPDATE
BEGIN
    PERFORM pg_advisory_xact_lock(pg_catalog.hashtext('envelope.rotation_run'));
    SELECT a.backend_start INTO my_start FROM pg_stat_activity a WHERE a.pid = pg_backend_pid();

    FOR r IN SELECT * FROM envelope.rotation_run x
              WHERE x.procedure = rotation_run_begin.procedure AND x.finished_at IS NULL
              ORDER BY x.run_id FOR UPDATE
    LOOP
        same_work := r.arguments = rotation_run_begin.arguments;
        IF NOT same_work AND procedure = 'reencrypt' THEN
            CONTINUE;       -- another column: runs of different columns are independent
        END IF;
        IF envelope.rotation_run_is_live(r.backend_pid, r.backend_start) THEN
            RAISE EXCEPTION 'envelope.% is already running', procedure
                USING ERRCODE = '55006',
                      DETAIL = format('Process %s has been working on run %s since %s.',
                                      r.backend_pid, r.run_id, COALESCE(r.resumed_at, r.started_at)),
                      HINT = 'Wait for it (see envelope.rotation_progress) or cancel it; calling the procedure again resumes the run.';
        END IF;
        -- A re-encryption run covers the keys of its start: after a rotation, the
        -- blocks it has done hold values under the previous version again.
        IF same_work AND procedure IN ('reencrypt', 'reencrypt_all')
           AND EXISTS (SELECT FROM envelope.tenant_keys k WHERE k.created_at > r.started_at) THEN
            RAISE NOTICE 'envelope.%: starting over instead of resuming run %', procedure, r.run_id
                USING DETAIL = 'Keys were rotated since that run started.',
                      HINT = 'Values already under the active version are skipped, not re-encrypted.';
            same_work := false;
        END IF;
        now_ts := clock_timestamp();
        IF same_work THEN
            UPDATE envelope.rotation_run x
               SET backend_pid = pg_backend_pid(), backend_start = my_start,
                   resumed_at = now_ts
             WHERE x.run_id = r.run_id;
            UPDATE envelope.rotation_task t
               SET active_since = NULL, done_at_start = t.done, moved_at_start = t.values_moved
             WHERE t.run_id = r.run_id;
            RAISE NOTICE 'envelope.%: resuming run %', procedure, r.run_id
                USING DETAIL = format('The run started at %s.', r.started_at);
            RETURN r.run_id;
        END IF;
        -- an interrupted run of other work: a new run replaces it
        UPDATE envelope.rotation_run x SET finished_at = now_ts, outcome = 'abandoned'
         WHERE x.run_id = r.run_id;
    END LOOP;

    INSERT INTO envelope.rotation_run (procedure, arguments, backend_pid, backend_start)
         VALUES (procedure, arguments, pg_backend_pid(), my_start)
      RETURNING run_id INTO r.run_id;
    RETURN r.run_id;
END
$$;

-- The run is complete: close it and put its counts in the audit trail.
CREATE FUNCTION envelope.rotation_run_end(run bigint)
    RETURNS void
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r envelope.rotation_run;
    counts jsonb;
    moved bigint;
    now_ts timestamptz := clock_timestamp();
BEGIN
    UPDATE envelope.rotation_run x SET finished_at = now_ts, outcome = 'done'
     WHERE x.run_id = run RETURNING * INTO r;
    SELECT jsonb_agg(jsonb_build_object('relation', t.relation::regclass::text,
                                        'column', a.attname, 'unit', t.unit,
                                        'done', t.done, 'total', t.total,
                                        'values_moved', t.values_moved) ORDER BY t.task),
           COALESCE(sum(t.values_moved), 0)
      INTO counts, moved
      FROM envelope.rotation_task t
      LEFT JOIN pg_attribute a ON a.attrelid = t.relation AND a.attnum = t.column_attnum
     WHERE t.run_id = run;
    RAISE NOTICE 'envelope.%: run % finished: % %', r.procedure, run, moved,
        CASE r.procedure WHEN 'rotate_keys' THEN 'tenants rotated'
                         WHEN 'rewrap_keys' THEN 'data keys rewrapped'
                         ELSE 'values re-encrypted' END;
    PERFORM envelope.audit_record(r.procedure, NULL, NULL, r.arguments ->> 'new_kms_key',
        jsonb_build_object('run_id', run, 'arguments', r.arguments, 'started_at', r.started_at,
                           'resumed_at', r.resumed_at, 'moved', moved,
                           'tasks', COALESCE(counts, '[]')));
END
$$;

-- Seconds to sleep after a batch that moved `moved` values since `batch_start`, so
-- that the run stays under max_rows_per_second.
CREATE FUNCTION envelope.rotation_throttle(moved bigint, batch_start timestamptz,
                                           max_rows_per_second integer)
    RETURNS double precision
    LANGUAGE sql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN max_rows_per_second IS NULL OR moved IS NULL THEN 0
                ELSE greatest(0, moved::double precision / max_rows_per_second
                                 - extract(epoch FROM clock_timestamp() - batch_start)::double precision)
           END
$$;

-- ---- re-encryption: the batch engine shared by reencrypt and reencrypt_all

-- Add a re-encryption task for column `column_name` of `rel` (a plain table) unless
-- the run has one; the run scans the blocks the table has now, and then once more the
-- blocks added while it ran (where concurrent updates of other columns put rows it
-- had not reached yet).  A row such an update moves into free space behind the scan
-- keeps its old version until the next run.
CREATE FUNCTION envelope.reencrypt_add_task(run bigint, rel regclass, column_name name,
                                            tenant_column name, context text)
    RETURNS void
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    col_num smallint;
    col_type oid;
    tenant_num smallint;
BEGIN
    SELECT a.attnum, a.atttypid INTO col_num, col_type FROM pg_attribute a
     WHERE a.attrelid = rel AND a.attname = column_name AND a.attnum > 0 AND NOT a.attisdropped;
    IF col_num IS NULL THEN
        RAISE EXCEPTION 'column "%" of relation % does not exist', column_name, rel
            USING ERRCODE = '42703';
    END IF;
    IF col_type <> 'bytea'::regtype
       AND (SELECT y.typbasetype FROM pg_type y WHERE y.oid = col_type) <> 'bytea'::regtype THEN
        RAISE EXCEPTION 'column "%" of relation % is of type %, not bytea', column_name, rel,
                        format_type(col_type, NULL)
            USING ERRCODE = '42804';
    END IF;
    SELECT a.attnum INTO tenant_num FROM pg_attribute a
     WHERE a.attrelid = rel AND a.attname = tenant_column AND a.attnum > 0 AND NOT a.attisdropped;
    IF tenant_num IS NULL THEN
        RAISE EXCEPTION 'column "%" of relation % does not exist', tenant_column, rel
            USING ERRCODE = '42703';
    END IF;
    IF EXISTS (SELECT FROM envelope.rotation_task t
                WHERE t.run_id = run AND t.relation = rel AND t.column_attnum = col_num) THEN
        RETURN;
    END IF;
    IF envelope.citus_shard_tasks(run, rel, col_num, tenant_num, context) THEN
        RETURN;         -- a Citus table: a task per shard (see "Citus" below)
    END IF;
    INSERT INTO envelope.rotation_task (run_id, task, relation, column_attnum, tenant_attnum,
                                        context, unit, total)
    SELECT run, COALESCE(max(t.task), 0) + 1, rel, col_num, tenant_num,
           reencrypt_add_task.context, 'blocks',
           pg_relation_size(rel) / current_setting('block_size')::bigint
      FROM envelope.rotation_task t WHERE t.run_id = run;
END
$$;

-- Add a task that recomputes the blind indexes of column `column_name` of `rel` from
-- the encrypted column `source_column` (see "Stored blind indexes" below).
CREATE FUNCTION envelope.reencrypt_add_blind_index_task(run bigint, rel regclass,
                                                        column_name name, source_column name,
                                                        tenant_column name, context text)
    RETURNS void
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    col_num smallint;
    source_num smallint;
    rel_oid oid := rel;     -- Citus sends a regclass parameter by name, an oid as a number
BEGIN
    SELECT a.attnum INTO source_num FROM pg_attribute a
     WHERE a.attrelid = rel AND a.attname = source_column AND a.attnum > 0 AND NOT a.attisdropped;
    IF source_num IS NULL THEN
        RAISE EXCEPTION 'column "%" of relation % does not exist', source_column, rel
            USING ERRCODE = '42703';
    END IF;
    PERFORM envelope.reencrypt_add_task(run, rel, column_name, tenant_column, context);
    SELECT a.attnum INTO col_num FROM pg_attribute a
     WHERE a.attrelid = rel AND a.attname = column_name AND a.attnum > 0 AND NOT a.attisdropped;
    UPDATE envelope.rotation_task t SET source_attnum = source_num
     WHERE t.run_id = run AND t.relation = rel_oid AND t.column_attnum = col_num;
END
$$;

-- The first unfinished task of a run, or NULL.
CREATE FUNCTION envelope.rotation_next_task(run bigint)
    RETURNS integer
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT min(t.task) FROM envelope.rotation_task t
     WHERE t.run_id = run AND t.finished_at IS NULL
$$;

-- The UPDATE of one batch, shared by reencrypt_step and (under Citus) the shards'
-- reencrypt_relation_batch: blocks [first_block, end_block) of `rel`, re-encrypting the
-- values of `col` that need it or, when `source_col` is given (a blind-index column),
-- recomputing the stale blind indexes from it.  Returns how many rows changed.  A row a
-- concurrent update changed is re-checked (EvalPlanQual) and handled from its new
-- version: a new value already under the active version, or a new source, is seen.
CREATE FUNCTION envelope.reencrypt_blocks(rel regclass, col name, tenant_col name,
                                          source_col name, context text,
                                          first_block bigint, end_block bigint)
    RETURNS bigint
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    moved bigint;
BEGIN
    IF source_col IS NULL THEN
        EXECUTE format(
            'UPDATE %s SET %I = envelope.reencrypt_value(%I::pg_catalog.text, %I, $1)'
            ' WHERE ctid OPERATOR(pg_catalog.>=) pg_catalog.format(''(%%s,0)'', $2)::pg_catalog.tid'
            '   AND ctid OPERATOR(pg_catalog.<) pg_catalog.format(''(%%s,0)'', $3)::pg_catalog.tid'
            '   AND envelope.needs_reencryption(%I, %I::pg_catalog.text)',
            rel, col, tenant_col, col, col, tenant_col)
          USING context, first_block, end_block;
    ELSE
        EXECUTE format(
            'UPDATE %s SET %I = envelope.blind_index_recompute(%I::pg_catalog.text, %I, $1)'
            ' WHERE ctid OPERATOR(pg_catalog.>=) pg_catalog.format(''(%%s,0)'', $2)::pg_catalog.tid'
            '   AND ctid OPERATOR(pg_catalog.<) pg_catalog.format(''(%%s,0)'', $3)::pg_catalog.tid'
            '   AND %I IS NOT NULL'
            '   AND envelope.blind_index_needs_recompute(%I, %I::pg_catalog.text)',
            rel, col, tenant_col, source_col, source_col, col, tenant_col)
          USING context, first_block, end_block;
    END IF;
    GET DIAGNOSTICS moved = ROW_COUNT;
    RETURN moved;
END
$$;

-- One batch of a re-encryption task: a single UPDATE of the next block range, which
-- re-encrypts the randomized values not under their tenant's active version and the
-- deterministic values not under its equality key version, or, for a blind-index
-- column, recomputes from its source column the blind indexes not under the equality
-- key version.  Returns
-- how many values moved, or NULL once the task is finished.  Concurrent writers are
-- safe: the UPDATE locks each row, and a row changed meanwhile is re-checked
-- (EvalPlanQual) and re-encrypted from its new value, or skipped when its new value is
-- already under the active version.
CREATE FUNCTION envelope.reencrypt_step(run bigint, task_no integer, batch_size integer)
    RETURNS bigint
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t envelope.rotation_task;
    proc text;
    rel_schema name;
    rel_name name;
    col name;
    tenant_col name;
    source_col name;
    rows_per_block double precision;
    block_end bigint;
    moved bigint;
    batch_start timestamptz := clock_timestamp();
BEGIN
    IF envelope.citus_fleet() THEN
        -- before any lock: the batch may run on another node (see "Citus" below)
        RETURN envelope.citus_reencrypt_step(run, task_no, batch_size);
    END IF;
    SELECT * INTO t FROM envelope.rotation_task x
     WHERE x.run_id = run AND x.task = task_no FOR UPDATE;
    IF t.finished_at IS NOT NULL THEN
        RETURN NULL;
    END IF;
    SELECT r.procedure INTO proc FROM envelope.rotation_run r WHERE r.run_id = run;
    SELECT n.nspname, c.relname,
           CASE WHEN c.relpages > 0 AND c.reltuples > 0 THEN c.reltuples / c.relpages ELSE 50 END
      INTO rel_schema, rel_name, rows_per_block
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = t.relation;
    SELECT a.attname INTO col FROM pg_attribute a
     WHERE a.attrelid = t.relation AND a.attnum = t.column_attnum AND NOT a.attisdropped;
    SELECT a.attname INTO tenant_col FROM pg_attribute a
     WHERE a.attrelid = t.relation AND a.attnum = t.tenant_attnum AND NOT a.attisdropped;
    SELECT a.attname INTO source_col FROM pg_attribute a
     WHERE a.attrelid = t.relation AND a.attnum = t.source_attnum AND NOT a.attisdropped;

    IF rel_name IS NOT NULL AND t.done >= t.total AND NOT t.tail_added THEN
        UPDATE envelope.rotation_task x
           SET total = greatest(x.total, pg_relation_size(t.relation) / current_setting('block_size')::bigint),
               tail_added = true
         WHERE x.run_id = run AND x.task = task_no
        RETURNING * INTO t;
    END IF;
    IF rel_name IS NULL OR col IS NULL OR tenant_col IS NULL
       OR (t.source_attnum IS NOT NULL AND source_col IS NULL) OR t.done >= t.total THEN
        IF rel_name IS NULL OR col IS NULL OR tenant_col IS NULL
           OR (t.source_attnum IS NOT NULL AND source_col IS NULL) THEN
            RAISE NOTICE 'envelope.%: skipping relation %: it or its columns no longer exist',
                proc, t.relation;
        END IF;
        UPDATE envelope.rotation_task x SET finished_at = clock_timestamp(),
               updated_at = clock_timestamp(), done = t.total
         WHERE x.run_id = run AND x.task = task_no;
        RETURN NULL;
    END IF;

    block_end := least(t.total, t.done + greatest(1, ceil(batch_size / rows_per_block))::bigint);
    moved := envelope.reencrypt_blocks(t.relation, col, tenant_col, source_col, t.context,
                                       t.done, block_end);

    UPDATE envelope.rotation_task x
       SET done = block_end, values_moved = x.values_moved + moved,
           started_at = COALESCE(x.started_at, batch_start),
           active_since = COALESCE(x.active_since, batch_start),
           updated_at = clock_timestamp()
     WHERE x.run_id = run AND x.task = task_no;
    RAISE NOTICE 'envelope.%: %.%.%: re-encrypted % values (% in all); % of % blocks done',
        proc, rel_schema, rel_name, col, moved, t.values_moved + moved, block_end, t.total;
    RETURN moved;
END
$$;

-- Every task of a run, one committed batch after another.
CREATE PROCEDURE envelope.reencrypt_run(run bigint, batch_size integer, max_rows_per_second integer)
LANGUAGE plpgsql
AS $$
DECLARE
    task_no integer;
    moved bigint;
    batch_start timestamptz;
BEGIN
    LOOP
        task_no := envelope.rotation_next_task(run);
        EXIT WHEN task_no IS NULL;
        LOOP
            batch_start := pg_catalog.clock_timestamp();
            moved := envelope.reencrypt_step(run, task_no, batch_size);
            COMMIT;
            EXIT WHEN moved IS NULL;
            PERFORM pg_catalog.pg_sleep(envelope.rotation_throttle(moved, batch_start, max_rows_per_second));
        END LOOP;
    END LOOP;
    PERFORM envelope.rotation_run_end(run);
    COMMIT;
END
$$;

CREATE FUNCTION envelope.reencrypt_check_batch(batch_size integer, max_rows_per_second integer)
    RETURNS void
    LANGUAGE plpgsql IMMUTABLE
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF batch_size IS NULL OR batch_size < 1 THEN
        RAISE EXCEPTION 'batch_size must be at least 1' USING ERRCODE = '22023';
    END IF;
    IF max_rows_per_second < 1 THEN
        RAISE EXCEPTION 'max_rows_per_second must be at least 1'
            USING ERRCODE = '22023',
                  HINT = 'Pass NULL (the default) for no throttle.';
    END IF;
END
$$;

CREATE FUNCTION envelope.reencrypt_begin(rel regclass, ciphertext_column name, tenant_column name,
                                         batch_size integer, context text)
    RETURNS bigint
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    run bigint;
    kind "char";
BEGIN
    PERFORM envelope.reencrypt_check_batch(batch_size, NULL);
    SELECT c.relkind INTO kind FROM pg_class c WHERE c.oid = rel;
    IF kind = 'p' THEN
        RAISE EXCEPTION 'cannot re-encrypt partitioned table %', rel
            USING ERRCODE = '42809',
                  HINT = 'Call envelope.reencrypt() for each partition, or register the table and call envelope.reencrypt_all().';
    ELSIF kind IS DISTINCT FROM 'r' THEN
        RAISE EXCEPTION 'cannot re-encrypt %: it is not a table', rel USING ERRCODE = '42809';
    END IF;
    run := envelope.rotation_run_begin('reencrypt',
        jsonb_build_object('relation', rel::oid, 'column', ciphertext_column,
                           'tenant_column', tenant_column, 'context', context));
    PERFORM envelope.reencrypt_add_task(run, rel, ciphertext_column, tenant_column, context);
    -- Blind-index columns registered as made from this column follow it.
    PERFORM envelope.reencrypt_add_blind_index_task(run, rel, b.column_name, b.source_column,
                                                     reencrypt_begin.tenant_column,
                                                     reencrypt_begin.context)
       FROM envelope.blind_index_columns b
      WHERE b.relation = rel AND b.source_column = ciphertext_column;
    RETURN run;
END
$$;

-- Re-encrypt stored values under each tenant's active DEK version, online and
-- resumably (0.2.0: through the same batch engine as reencrypt_all).  Deterministic
-- values and the values of disabled and destroyed tenants are left alone.
-- CALL it outside an explicit transaction block so that the batches can commit.
CREATE OR REPLACE PROCEDURE envelope.reencrypt(rel regclass, ciphertext_column name, tenant_column name,
                                               batch_size integer DEFAULT 1000, context text DEFAULT NULL)
LANGUAGE plpgsql
AS $reencrypt$
DECLARE
    run bigint;
BEGIN
    run := envelope.reencrypt_begin(rel, ciphertext_column, tenant_column, batch_size, context);
    COMMIT;
    CALL envelope.reencrypt_run(run, batch_size, NULL);
END
$reencrypt$;

CREATE FUNCTION envelope.reencrypt_all_begin(batch_size integer, max_rows_per_second integer)
    RETURNS bigint
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    run bigint;
    c record;
BEGIN
    PERFORM envelope.reencrypt_check_batch(batch_size, max_rows_per_second);
    run := envelope.rotation_run_begin('reencrypt_all', '{}');
    FOR c IN SELECT b.relation, b.column_name FROM envelope.blind_index_columns b
              WHERE b.source_column IS NULL ORDER BY 1, 2
    LOOP
        RAISE WARNING 'envelope.reencrypt_all: skipping blind index column "%" of %: the column it is made from is gone',
            c.column_name, c.relation
            USING HINT = 'Unregister it with envelope.unregister_column(), or register it again with envelope.register_blind_index().';
    END LOOP;
    -- Columns registered since an interrupted run started join it; a partitioned
    -- table is re-encrypted partition by partition.  Blind-index columns come with
    -- the column they are made from (source_column).
    FOR c IN SELECT l.rel, e.column_name, e.tenant_column, e.context, e.source_column
               FROM (SELECT r.relation, r.column_name, r.tenant_column, r.context,
                            NULL::name AS source_column
                       FROM envelope.encrypted_columns r
                     UNION ALL
                     SELECT b.relation, b.column_name, b.tenant_column, b.context,
                            b.source_column
                       FROM envelope.blind_index_columns b
                      WHERE b.source_column IS NOT NULL) e,
                    LATERAL (SELECT p.relid AS rel FROM pg_partition_tree(e.relation) p
                              WHERE p.isleaf
                             UNION ALL
                             SELECT e.relation
                              WHERE NOT EXISTS (SELECT FROM pg_partition_tree(e.relation))) l
              ORDER BY e.relation::text, e.source_column NULLS FIRST, e.column_name,
                       l.rel::regclass::text
    LOOP
        IF (SELECT c2.relkind FROM pg_class c2 WHERE c2.oid = c.rel) <> 'r' THEN
            RAISE NOTICE 'envelope.reencrypt_all: skipping %: it is not a table', c.rel::regclass;
            CONTINUE;
        END IF;
        IF c.source_column IS NULL THEN
            PERFORM envelope.reencrypt_add_task(run, c.rel, c.column_name, c.tenant_column,
                                                c.context);
        ELSE
            PERFORM envelope.reencrypt_add_blind_index_task(run, c.rel, c.column_name,
                                                            c.source_column, c.tenant_column,
                                                            c.context);
        END IF;
    END LOOP;
    RETURN run;
END
$$;

-- Every registered column, every tenant, onto the active DEK version.  Resumable:
-- after a cancel, a timeout, a terminated session or a crash, calling it again
-- carries on from the last committed batch of each column.
CREATE PROCEDURE envelope.reencrypt_all(batch_size integer DEFAULT 1000,
                                        max_rows_per_second integer DEFAULT NULL)
LANGUAGE plpgsql
AS $$
DECLARE
    run bigint;
BEGIN
    run := envelope.reencrypt_all_begin(batch_size, max_rows_per_second);
    COMMIT;
    CALL envelope.reencrypt_run(run, batch_size, max_rows_per_second);
END
$$;

-- ---- rotate_keys

-- Active tenants whose active version was created before `cutoff` (of those listed,
-- when `tenants` is given).  Tenants rotated by the run have a newer active version,
-- so the same query, run again, gives what is left.
CREATE FUNCTION envelope.rotate_keys_candidates(cutoff timestamptz, tenants text[])
    RETURNS SETOF text
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT k.tenant FROM envelope.tenant_keys k
     WHERE k.state = 'active' AND k.created_at < cutoff
       AND (tenants IS NULL OR k.tenant = ANY (tenants))
     ORDER BY k.tenant
$$;

-- The cutoff of a rotate_keys run: versions older than older_than when the run
-- started, or (tenants given) created before the run started.
CREATE FUNCTION envelope.rotate_keys_cutoff(run bigint, older_than interval)
    RETURNS timestamptz
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT r.started_at - COALESCE(older_than, interval '0')
      FROM envelope.rotation_run r WHERE r.run_id = run
$$;

CREATE FUNCTION envelope.check_tenant_list(procedure text, tenants text[])
    RETURNS void
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    missing text;
BEGIN
    IF tenants IS NULL THEN
        RETURN;
    END IF;
    IF array_position(tenants, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'tenants must not contain NULL' USING ERRCODE = '22004';
    END IF;
    SELECT l.tenant INTO missing FROM unnest(tenants) l(tenant)
     WHERE NOT EXISTS (SELECT FROM envelope.tenant_keys k WHERE k.tenant = l.tenant)
     LIMIT 1;
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'tenant "%" does not exist', missing USING ERRCODE = '42704';
    END IF;
END
$$;

CREATE FUNCTION envelope.rotate_keys_begin(older_than interval, tenants text[])
    RETURNS bigint
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    run bigint;
    remaining bigint;
BEGIN
    IF older_than IS NULL AND tenants IS NULL THEN
        RAISE EXCEPTION 'rotate_keys needs older_than or tenants'
            USING ERRCODE = '22004',
                  HINT = 'To rotate every active tenant, pass older_than => ''0''.';
    END IF;
    IF older_than < interval '0' THEN
        RAISE EXCEPTION 'older_than must not be negative' USING ERRCODE = '22023';
    END IF;
    PERFORM envelope.check_tenant_list('rotate_keys', tenants);
    run := envelope.rotation_run_begin('rotate_keys',
        jsonb_build_object('older_than', older_than, 'tenants', tenants));
    SELECT count(*) INTO remaining
      FROM envelope.rotate_keys_candidates(envelope.rotate_keys_cutoff(run, older_than), tenants);
    IF EXISTS (SELECT FROM envelope.rotation_task t WHERE t.run_id = run) THEN
        UPDATE envelope.rotation_task t SET total = t.done + remaining WHERE t.run_id = run;
    ELSE
        INSERT INTO envelope.rotation_task (run_id, task, relation, unit, total)
             VALUES (run, 1, 'envelope.data_key'::regclass, 'tenants', remaining);
    END IF;
    RETURN run;
END
$$;

-- One batch of rotate_keys: a new DEK version for up to 50 tenants.  Returns how many
-- were rotated, or NULL when none is left.
CREATE FUNCTION envelope.rotate_keys_step(run bigint, older_than interval, tenants text[])
    RETURNS bigint
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    batch_start timestamptz := clock_timestamp();
    one text;
    rotated bigint := 0;
    t envelope.rotation_task;
    batch_end timestamptz;  -- a variable: Citus refuses clock_timestamp() in an UPDATE
BEGIN
    FOR one IN SELECT c FROM envelope.rotate_keys_candidates(
                   envelope.rotate_keys_cutoff(run, older_than), tenants) c LIMIT 50
    LOOP
        PERFORM envelope.rotate_tenant_key(one);
        rotated := rotated + 1;
    END LOOP;
    batch_end := clock_timestamp();
    UPDATE envelope.rotation_task x
       SET done = x.done + rotated, values_moved = x.values_moved + rotated,
           total = greatest(x.total, x.done + rotated),
           started_at = COALESCE(x.started_at, batch_start),
           active_since = COALESCE(x.active_since, batch_start),
           updated_at = batch_end,
           finished_at = CASE WHEN rotated = 0 THEN batch_end END
     WHERE x.run_id = run AND x.task = 1
    RETURNING * INTO t;
    IF rotated = 0 THEN
        RETURN NULL;
    END IF;
    RAISE NOTICE 'envelope.rotate_keys: rotated % tenants; % of % done', rotated, t.done, t.total;
    RETURN rotated;
END
$$;

-- A new DEK version for every active tenant whose active version is older than
-- older_than, or for the tenants listed (both: the listed ones that are that old).
-- Commits per batch of tenants; calling it again with the same arguments resumes.
CREATE PROCEDURE envelope.rotate_keys(older_than interval DEFAULT NULL, tenants text[] DEFAULT NULL)
LANGUAGE plpgsql
AS $$
DECLARE
    run bigint;
    rotated bigint;
BEGIN
    run := envelope.rotate_keys_begin(older_than, tenants);
    COMMIT;
    LOOP
        rotated := envelope.rotate_keys_step(run, older_than, tenants);
        COMMIT;
        EXIT WHEN rotated IS NULL;
    END LOOP;
    PERFORM envelope.rotation_run_end(run);
    COMMIT;
END
$$;

-- ---- rewrap_keys

-- Tenants (not destroyed) whose master key is not yet new_kms_key, with how many DEKs
-- they hold.  envelope.rewrap sets a tenant's master key in the same transaction as
-- its DEKs, so a tenant it has finished never comes back.  Definer: the key tables
-- are readable by their owner only, and nothing secret leaves here.
CREATE FUNCTION envelope.rewrap_candidates(new_kms_key text, tenants text[])
    RETURNS TABLE (tenant text, key_count bigint)
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT t.tenant, (SELECT count(*) FROM envelope.data_key d
                       WHERE d.tenant = t.tenant AND d.wrapped_dek IS NOT NULL)
      FROM envelope.tenant t
     WHERE t.state <> 'destroyed' AND t.kms_key <> new_kms_key
       AND (tenants IS NULL OR t.tenant = ANY (tenants))
     ORDER BY t.tenant
$$;

CREATE FUNCTION envelope.rewrap_keys_begin(new_kms_key text, tenants text[])
    RETURNS bigint
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    run bigint;
    remaining bigint;
BEGIN
    IF new_kms_key IS NULL OR new_kms_key = '' THEN
        RAISE EXCEPTION 'new master key must not be empty' USING ERRCODE = '22023';
    END IF;
    PERFORM envelope.check_tenant_list('rewrap_keys', tenants);
    run := envelope.rotation_run_begin('rewrap_keys',
        jsonb_build_object('new_kms_key', new_kms_key, 'tenants', tenants));
    SELECT COALESCE(sum(c.key_count), 0) INTO remaining
      FROM envelope.rewrap_candidates(new_kms_key, tenants) c;
    IF EXISTS (SELECT FROM envelope.rotation_task t WHERE t.run_id = run) THEN
        UPDATE envelope.rotation_task t SET total = t.done + remaining WHERE t.run_id = run;
    ELSE
        INSERT INTO envelope.rotation_task (run_id, task, relation, unit, total)
             VALUES (run, 1, 'envelope.data_key'::regclass, 'keys', remaining);
    END IF;
    RETURN run;
END
$$;

-- envelope.rewrap for every tenant listed, in one transaction, with their DEKs'
-- ReEncrypt requests in flight together (up to envelope.kms_max_concurrent_requests
-- with the aws provider; the local and kmip providers send one after another).  The
-- new wrappings are written once every request is back: until the commit each DEK
-- stays under its old master key (see src/rewrap_sql.c).
CREATE FUNCTION envelope.rewrap_tenants(new_kms_key text, tenants text[])
    RETURNS bigint
    AS 'MODULE_PATHNAME', 'envelope_rewrap_tenants'
    LANGUAGE C VOLATILE PARALLEL UNSAFE CALLED ON NULL INPUT;

-- One batch of rewrap_keys: whole tenants, until at least 64 DEKs have been handled,
-- re-wrapped by one envelope.rewrap_tenants call (several KMS requests in flight);
-- the KMS's throttling answers are retried by the client.  Returns the number of
-- DEKs handled, or NULL when none is left.
CREATE FUNCTION envelope.rewrap_keys_step(run bigint, new_kms_key text, tenants text[])
    RETURNS bigint
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    batch_start timestamptz := clock_timestamp();
    c record;
    handled bigint := 0;
    moved bigint := 0;
    batch text[] := '{}';
    t envelope.rotation_task;
    batch_end timestamptz;  -- a variable: Citus refuses clock_timestamp() in an UPDATE
BEGIN
    FOR c IN SELECT * FROM envelope.rewrap_candidates(new_kms_key, tenants)
    LOOP
        batch := batch || c.tenant;
        handled := handled + c.key_count;
        EXIT WHEN handled >= 64;
    END LOOP;
    IF batch <> '{}' THEN
        moved := envelope.rewrap_tenants(new_kms_key, batch);
    END IF;
    batch_end := clock_timestamp();
    UPDATE envelope.rotation_task x
       SET done = x.done + handled, values_moved = x.values_moved + moved,
           total = greatest(x.total, x.done + handled),
           started_at = COALESCE(x.started_at, batch_start),
           active_since = COALESCE(x.active_since, batch_start),
           updated_at = batch_end,
           finished_at = CASE WHEN handled = 0 THEN batch_end END
     WHERE x.run_id = run AND x.task = 1
    RETURNING * INTO t;
    IF handled = 0 THEN
        RETURN NULL;
    END IF;
    RAISE NOTICE 'envelope.rewrap_keys: rewrapped % data keys; % of % done', moved, t.done, t.total;
    RETURN handled;
END
$$;

-- Move every tenant's DEKs (or the listed tenants') under new_kms_key with the KMS's
-- ReEncrypt, committing per batch of DEKs; calling it again resumes.
-- envelope.rewrap stays for one tenant.
CREATE PROCEDURE envelope.rewrap_keys(new_kms_key text, tenants text[] DEFAULT NULL)
LANGUAGE plpgsql
AS $$
DECLARE
    run bigint;
    handled bigint;
BEGIN
    run := envelope.rewrap_keys_begin(new_kms_key, tenants);
    COMMIT;
    LOOP
        handled := envelope.rewrap_keys_step(run, new_kms_key, tenants);
        COMMIT;
        EXIT WHEN handled IS NULL;
    END LOOP;
    PERFORM envelope.rotation_run_end(run);
    COMMIT;
END
$$;

-- ---- Citus: the procedures on a coordinator
--
-- Under Citus the progress tables are reference tables (see "Citus: key tables as
-- reference tables"), written on every node with two-phase commit.  Citus refuses an
-- UPDATE of one that calls a VOLATILE function, and evaluates a function with column
-- arguments on each copy separately, so the procedures compute timestamps and other
-- values into variables first and pass them as parameters.
--
-- A distributed table is empty on the coordinator: its rows are in its shards, tables
-- of the workers, and no block range of it can be read from here.  So each shard is a
-- task of its own (rotation_task.shard_id), and each batch runs on the node that holds
-- the shard, through a connection of its own (master_run_on_worker, as
-- run_command_on_shards uses): there reencrypt_relation_batch re-encrypts a block range
-- of the shard and advances the task, in one transaction.  Citus writes the task row on
-- every node (two-phase commit, from the worker), so the shard's values and the task
-- row commit together, as on one node, and the task rows still say exactly what was
-- committed.  A table of the coordinator (not distributed) takes the same function,
-- called here.  Shards go one after another, batch by batch, in shard order.

-- Are the progress tables Citus reference tables?  (Citus installed after pg_envelope
-- leaves them local, and the single-node path is then the right one.)
CREATE FUNCTION envelope.citus_fleet()
    RETURNS boolean
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    distributed boolean := false;
BEGIN
    IF to_regclass('pg_catalog.pg_dist_partition') IS NOT NULL THEN
        EXECUTE 'SELECT EXISTS (SELECT FROM pg_catalog.pg_dist_partition p
                                 WHERE p.logicalrelid OPERATOR(pg_catalog.=) $1)'
           INTO distributed USING 'envelope.rotation_task'::regclass;
    END IF;
    RETURN distributed;
END
$$;

-- The shards of a Citus table, each with the node of its first active placement (the
-- one run_command_on_shards uses), the number of its active placements, and its name
-- as that node knows it, schema-qualified.  No rows for a table Citus does not manage.
CREATE FUNCTION envelope.citus_shards(rel regclass)
    RETURNS TABLE (shard_id bigint, shard_name text, node_name text, node_port integer,
                   placements integer)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF to_regclass('pg_catalog.pg_dist_partition') IS NULL THEN
        RETURN;
    END IF;
    RETURN QUERY
    SELECT s.shardid,
           -- shard_name() leaves names in public unqualified
           CASE WHEN n.nspname = 'public' THEN 'public.' ELSE '' END
           || pg_catalog.shard_name(s.logicalrelid, s.shardid),
           (array_agg(p.nodename::text ORDER BY p.nodename, p.nodeport))[1],
           (array_agg(p.nodeport::integer ORDER BY p.nodename, p.nodeport))[1],
           count(p.nodeport)::integer
      FROM pg_catalog.pg_dist_shard s
      JOIN pg_class c ON c.oid = s.logicalrelid
      JOIN pg_namespace n ON n.oid = c.relnamespace
      LEFT JOIN pg_catalog.pg_dist_shard_placement p
             ON p.shardid = s.shardid AND p.shardstate = 1
     WHERE s.logicalrelid = rel
     GROUP BY s.shardid, s.logicalrelid, n.nspname
     ORDER BY s.shardid;
END
$$;

-- Run one command per shard, each on the node of its shard and in a transaction of its
-- own, all at once; the answers in the order of the commands.  A command that failed
-- (or could not be sent) is an error here, naming the shard, with the node's message
-- as detail.
CREATE FUNCTION envelope.citus_run_on_shards(procedure text, shard_ids bigint[],
                                             node_names text[], node_ports integer[],
                                             commands text[])
    RETURNS SETOF text
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r record;
BEGIN
    IF cardinality(commands) = 0 THEN
        RETURN;
    END IF;
    FOR r IN SELECT x.success, x.result, x.i
               FROM pg_catalog.master_run_on_worker(node_names, node_ports, commands,
                                                    cardinality(commands) > 1)
                    WITH ORDINALITY x(node_name, node_port, success, result, i)
    LOOP
        IF NOT r.success THEN
            RAISE EXCEPTION 'envelope.%: could not run a batch on shard % on node %:%',
                            procedure, shard_ids[r.i], node_names[r.i], node_ports[r.i]
                USING ERRCODE = '08000',
                      DETAIL = format('The node answered: %s', r.result),
                      HINT = 'Calling the procedure again resumes from the last committed batch.';
        END IF;
        RETURN NEXT r.result;
    END LOOP;
END
$$;

-- Add the tasks of column col_num of a Citus table `rel`, one per shard, and return
-- true; return false for a table Citus does not manage (the caller adds one task for
-- the whole table).  A table whose shards have copies on several nodes (a reference
-- table, or shards replicated by Citus) is skipped with a notice: its copies must be
-- written through Citus, which refuses encrypt in an UPDATE, and writing each copy
-- separately would leave them different (every encryption draws a new nonce).
CREATE FUNCTION envelope.citus_shard_tasks(run bigint, rel regclass,
                                                         col_num smallint, tenant_num smallint,
                                                         context text)
    RETURNS boolean
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    proc text;
    shards bigint[];
    names text[];
    nodes text[];
    ports integer[];
    commands text[];
    sizes bigint[];
    first_task integer;
BEGIN
    SELECT array_agg(s.shard_id ORDER BY s.shard_id), array_agg(s.shard_name ORDER BY s.shard_id),
           array_agg(s.node_name ORDER BY s.shard_id), array_agg(s.node_port ORDER BY s.shard_id),
           array_agg(format('SELECT pg_catalog.pg_relation_size(%L::pg_catalog.regclass)'
                            ' OPERATOR(pg_catalog./) pg_catalog.current_setting(''block_size'')::pg_catalog.int8',
                            s.shard_name) ORDER BY s.shard_id)
      INTO shards, names, nodes, ports, commands
      FROM envelope.citus_shards(rel) s;
    IF shards IS NULL THEN
        RETURN false;
    END IF;
    SELECT r.procedure INTO proc FROM envelope.rotation_run r WHERE r.run_id = run;
    IF NOT envelope.citus_fleet() THEN
        -- the batches on the workers could not write the progress tables
        RAISE EXCEPTION 'cannot re-encrypt %: the pg_envelope tables are not Citus reference tables', rel
            USING ERRCODE = '55000',
                  DETAIL = 'Citus was installed after pg_envelope, which left its tables local to the coordinator.',
                  HINT = 'See "Deployment" in doc/citus.md.';
    END IF;
    IF EXISTS (SELECT FROM envelope.citus_shards(rel) s WHERE s.placements <> 1) THEN
        RAISE NOTICE 'envelope.%: skipping %: its shards have copies on several nodes', proc, rel
            USING DETAIL = 'A reference table or a replicated distributed table can only be written through Citus, which refuses encrypt in an UPDATE.',
                  HINT = 'Re-encrypt it with INSERT ... SELECT into a new table, or make it a distributed table with one copy of each shard.';
        RETURN true;
    END IF;
    SELECT array_agg(x::bigint) INTO sizes
      FROM envelope.citus_run_on_shards(proc, shards, nodes, ports, commands) x;
    SELECT COALESCE(max(t.task), 0) + 1 INTO first_task
      FROM envelope.rotation_task t WHERE t.run_id = run;
    INSERT INTO envelope.rotation_task (run_id, task, relation, column_attnum, tenant_attnum,
                                        context, unit, total, shard_id)
    SELECT run, first_task + i - 1, rel, col_num, tenant_num, context, 'blocks', sizes[i], shards[i]
      FROM generate_subscripts(shards, 1) i;
    RETURN true;
END
$$;

-- One batch of a re-encryption task, on the node that holds relation `rel` (the
-- task's shard, or a table of the coordinator), described by `batch`: run, task, rel,
-- column, tenant_column, source_column (a blind-index column's source, or null),
-- context, done, total, batch_size, batch_start.  Re-encrypts the values that need it
-- (recomputes the blind indexes, as reencrypt_step does) in the next block range
-- after `done`, up to `total`, and advances the task in the same transaction, only
-- from `done` (a task advanced meanwhile by another session is an error, and nothing
-- commits).  Returns {"moved", "done", "blocks": the relation's size now}; once done
-- reaches total, only {"blocks"}.  An error of the UPDATE (a value that does not
-- decrypt, say) is returned as {"sqlstate", "message", "detail", "hint"}, with nothing
-- done, so that the coordinator can raise it with its SQLSTATE: the connection it comes
-- back through carries only an error's text.  (A cancel is not caught: it stops all.)
CREATE FUNCTION envelope.reencrypt_relation_batch(batch jsonb)
    RETURNS jsonb
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    run bigint := batch ->> 'run';
    task_no integer := batch ->> 'task';
    relid regclass := (batch ->> 'rel')::regclass;
    column_name name := batch ->> 'column';
    tenant_column name := batch ->> 'tenant_column';
    source_column name := batch ->> 'source_column';
    context text := batch ->> 'context';
    done_before bigint := batch ->> 'done';
    total bigint := batch ->> 'total';
    batch_size integer := batch ->> 'batch_size';
    batch_start timestamptz := batch ->> 'batch_start';
    rows_per_block double precision;
    block_end bigint;
    moved bigint;
    advanced bigint;
    batch_end timestamptz;
    blocks bigint;
    err_state text;
    err_message text;
    err_detail text;
    err_hint text;
BEGIN
    IF done_before < total THEN
        SELECT CASE WHEN c.relpages > 0 AND c.reltuples > 0 THEN c.reltuples / c.relpages ELSE 50 END
          INTO rows_per_block FROM pg_class c WHERE c.oid = relid;
        block_end := least(total, done_before + greatest(1, ceil(batch_size / rows_per_block))::bigint);
        BEGIN
            moved := envelope.reencrypt_blocks(relid, column_name, tenant_column, source_column,
                                               context, done_before, block_end);
        EXCEPTION WHEN OTHERS THEN
            GET STACKED DIAGNOSTICS err_state = RETURNED_SQLSTATE, err_message = MESSAGE_TEXT,
                                    err_detail = PG_EXCEPTION_DETAIL, err_hint = PG_EXCEPTION_HINT;
            RETURN jsonb_build_object('sqlstate', err_state, 'message', err_message,
                                      'detail', NULLIF(err_detail, ''), 'hint', NULLIF(err_hint, ''));
        END;
        batch_end := clock_timestamp();
        UPDATE envelope.rotation_task x
           SET done = block_end, values_moved = x.values_moved + moved,
               started_at = COALESCE(x.started_at, batch_start),
               active_since = COALESCE(x.active_since, batch_start),
               updated_at = batch_end
         WHERE x.run_id = run AND x.task = task_no AND x.done = done_before
           AND x.finished_at IS NULL;
        GET DIAGNOSTICS advanced = ROW_COUNT;
        IF advanced <> 1 THEN
            RAISE EXCEPTION 'task % of run % was advanced by another session', task_no, run
                USING ERRCODE = '40001';
        END IF;
    END IF;
    blocks := pg_relation_size(relid) / current_setting('block_size')::bigint;
    IF block_end IS NULL THEN
        RETURN jsonb_build_object('blocks', blocks);
    END IF;
    RETURN jsonb_build_object('moved', moved, 'done', block_end, 'blocks', blocks);
END
$$;

-- reencrypt_step under Citus: one batch of the task, on the node of its shard (or here,
-- for a table of the coordinator).  Returns how many values moved, or NULL once the
-- task is finished.  Nothing here holds a lock on the task row while the batch runs:
-- the batch writes that row from the other node.
CREATE FUNCTION envelope.citus_reencrypt_step(run bigint, task_no integer, batch_size integer)
    RETURNS bigint
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t envelope.rotation_task;
    proc text;
    rel_schema name;
    rel_name name;
    col name;
    tenant_col name;
    source_col name;
    shard record;
    target text;
    label text;             -- the column for notices, and its shard
    call text;
    answer jsonb;
    moved bigint;
    now_ts timestamptz;
    batch_start timestamptz := clock_timestamp();
BEGIN
    SELECT * INTO t FROM envelope.rotation_task x WHERE x.run_id = run AND x.task = task_no;
    IF t.finished_at IS NOT NULL THEN
        RETURN NULL;
    END IF;
    SELECT r.procedure INTO proc FROM envelope.rotation_run r WHERE r.run_id = run;
    SELECT n.nspname, c.relname INTO rel_schema, rel_name
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = t.relation;
    SELECT a.attname INTO col FROM pg_attribute a
     WHERE a.attrelid = t.relation AND a.attnum = t.column_attnum AND NOT a.attisdropped;
    SELECT a.attname INTO tenant_col FROM pg_attribute a
     WHERE a.attrelid = t.relation AND a.attnum = t.tenant_attnum AND NOT a.attisdropped;
    SELECT a.attname INTO source_col FROM pg_attribute a
     WHERE a.attrelid = t.relation AND a.attnum = t.source_attnum AND NOT a.attisdropped;
    target := format('%I.%I', rel_schema, rel_name);
    label := format('%s.%s.%s', rel_schema, rel_name, col)
             || COALESCE(format(' (shard %s)', t.shard_id), '');
    IF t.shard_id IS NOT NULL THEN
        SELECT * INTO shard FROM envelope.citus_shards(t.relation) s
         WHERE s.shard_id = t.shard_id AND s.placements = 1;
        target := shard.shard_name;
    END IF;

    IF rel_name IS NULL OR col IS NULL OR tenant_col IS NULL OR target IS NULL
       OR (t.source_attnum IS NOT NULL AND source_col IS NULL) THEN
        RAISE NOTICE 'envelope.%: skipping relation %: it, its columns or its shard no longer exist',
            proc, t.relation || COALESCE(format(' (shard %s)', t.shard_id), '');
        now_ts := clock_timestamp();
        UPDATE envelope.rotation_task x SET finished_at = now_ts, updated_at = now_ts, done = t.total
         WHERE x.run_id = run AND x.task = task_no;
        RETURN NULL;
    END IF;

    call := format('SELECT envelope.reencrypt_relation_batch(%L::pg_catalog.jsonb)',
                   jsonb_build_object('run', run, 'task', task_no, 'rel', target, 'column', col,
                                      'tenant_column', tenant_col, 'source_column', source_col,
                                      'context', t.context,
                                      'done', t.done, 'total', t.total,
                                      'batch_size', batch_size, 'batch_start', batch_start));
    IF t.shard_id IS NULL THEN
        EXECUTE call INTO answer;
    ELSE
        answer := envelope.citus_run_on_shards(proc, ARRAY[t.shard_id], ARRAY[shard.node_name],
                                               ARRAY[shard.node_port], ARRAY[call])::jsonb;
    END IF;
    IF answer ? 'sqlstate' THEN
        -- the batch's own error, raised again as it was (RAISE takes no NULL option)
        IF answer ->> 'hint' IS NOT NULL THEN
            RAISE EXCEPTION USING ERRCODE = answer ->> 'sqlstate', MESSAGE = answer ->> 'message',
                                  DETAIL = COALESCE(answer ->> 'detail', ''), HINT = answer ->> 'hint';
        ELSIF answer ->> 'detail' IS NOT NULL THEN
            RAISE EXCEPTION USING ERRCODE = answer ->> 'sqlstate', MESSAGE = answer ->> 'message',
                                  DETAIL = answer ->> 'detail';
        END IF;
        RAISE EXCEPTION USING ERRCODE = answer ->> 'sqlstate', MESSAGE = answer ->> 'message';
    END IF;

    IF NOT answer ? 'moved' THEN
        -- done reached total: once more over the blocks added since, then finished
        now_ts := clock_timestamp();
        IF NOT t.tail_added THEN
            UPDATE envelope.rotation_task x
               SET total = greatest(x.total, (answer ->> 'blocks')::bigint), tail_added = true
             WHERE x.run_id = run AND x.task = task_no;
            RETURN 0;
        END IF;
        UPDATE envelope.rotation_task x SET finished_at = now_ts, updated_at = now_ts, done = t.total
         WHERE x.run_id = run AND x.task = task_no;
        RETURN NULL;
    END IF;
    moved := (answer ->> 'moved')::bigint;
    RAISE NOTICE 'envelope.%: %: re-encrypted % values (% in all); % of % blocks done',
        proc, label, moved, t.values_moved + moved, answer ->> 'done', t.total;
    RETURN moved;
END
$$;

-- Run as the caller of the procedures (envelope_admin), here and on the workers.
REVOKE ALL ON FUNCTION
    envelope.citus_fleet(),
    envelope.citus_shards(regclass),
    envelope.citus_run_on_shards(text, bigint[], text[], integer[], text[]),
    envelope.citus_shard_tasks(bigint, regclass, smallint, smallint, text),
    envelope.reencrypt_relation_batch(jsonb),
    envelope.citus_reencrypt_step(bigint, integer, integer)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    envelope.citus_fleet(),
    envelope.citus_shards(regclass),
    envelope.citus_run_on_shards(text, bigint[], text[], integer[], text[]),
    envelope.citus_shard_tasks(bigint, regclass, smallint, smallint, text),
    envelope.reencrypt_relation_batch(jsonb),
    envelope.citus_reencrypt_step(bigint, integer, integer)
    TO envelope_admin;

-- ---- privileges: the procedures run as their caller (who needs UPDATE on the
-- tables it re-encrypts); envelope_admin may call them and read the progress.

REVOKE ALL ON FUNCTION
    envelope.needs_reencryption(bytea, text),
    envelope.reencrypt_value(text, bytea, text),
    envelope.rotation_run_is_live(integer, timestamptz),
    envelope.rotation_run_begin(text, jsonb),
    envelope.rotation_run_end(bigint),
    envelope.rotation_throttle(bigint, timestamptz, integer),
    envelope.reencrypt_add_task(bigint, regclass, name, name, text),
    envelope.reencrypt_add_blind_index_task(bigint, regclass, name, name, name, text),
    envelope.rotation_next_task(bigint),
    envelope.reencrypt_blocks(regclass, name, name, name, text, bigint, bigint),
    envelope.reencrypt_step(bigint, integer, integer),
    envelope.reencrypt_check_batch(integer, integer),
    envelope.reencrypt_begin(regclass, name, name, integer, text),
    envelope.reencrypt_all_begin(integer, integer),
    envelope.rotate_keys_candidates(timestamptz, text[]),
    envelope.rotate_keys_cutoff(bigint, interval),
    envelope.check_tenant_list(text, text[]),
    envelope.rotate_keys_begin(interval, text[]),
    envelope.rotate_keys_step(bigint, interval, text[]),
    envelope.rewrap_candidates(text, text[]),
    envelope.rewrap_tenants(text, text[]),
    envelope.rewrap_keys_begin(text, text[]),
    envelope.rewrap_keys_step(bigint, text, text[])
    FROM PUBLIC;
REVOKE ALL ON PROCEDURE
    envelope.reencrypt_run(bigint, integer, integer),
    envelope.reencrypt_all(integer, integer),
    envelope.rotate_keys(interval, text[]),
    envelope.rewrap_keys(text, text[])
    FROM PUBLIC;

GRANT EXECUTE ON FUNCTION envelope.needs_reencryption(bytea, text) TO envelope_user;
GRANT EXECUTE ON FUNCTION
    envelope.reencrypt_value(text, bytea, text),
    envelope.rotation_run_is_live(integer, timestamptz),
    envelope.rotation_run_begin(text, jsonb),
    envelope.rotation_run_end(bigint),
    envelope.rotation_throttle(bigint, timestamptz, integer),
    envelope.reencrypt_add_task(bigint, regclass, name, name, text),
    envelope.reencrypt_add_blind_index_task(bigint, regclass, name, name, name, text),
    envelope.rotation_next_task(bigint),
    envelope.reencrypt_blocks(regclass, name, name, name, text, bigint, bigint),
    envelope.reencrypt_step(bigint, integer, integer),
    envelope.reencrypt_check_batch(integer, integer),
    envelope.reencrypt_begin(regclass, name, name, integer, text),
    envelope.reencrypt_all_begin(integer, integer),
    envelope.rotate_keys_candidates(timestamptz, text[]),
    envelope.rotate_keys_cutoff(bigint, interval),
    envelope.check_tenant_list(text, text[]),
    envelope.rotate_keys_begin(interval, text[]),
    envelope.rotate_keys_step(bigint, interval, text[]),
    envelope.rewrap_candidates(text, text[]),
    envelope.rewrap_tenants(text, text[]),
    envelope.rewrap_keys_begin(text, text[]),
    envelope.rewrap_keys_step(bigint, text, text[])
    TO envelope_admin;
GRANT EXECUTE ON PROCEDURE
    envelope.reencrypt_run(bigint, integer, integer),
    envelope.reencrypt_all(integer, integer),
    envelope.rotate_keys(interval, text[]),
    envelope.rewrap_keys(text, text[])
    TO envelope_admin;
GRANT SELECT ON envelope.rotation_progress TO envelope_admin;
GRANT SELECT, INSERT, UPDATE ON envelope.rotation_run, envelope.rotation_task TO envelope_admin;

-- ---------------------------------------------------------------------------
-- Health check.

-- One row per check: preload, provider and KMS (one cheap request), credentials or
-- key file, cache, the KMS request rate limit (kms_rate_limit), the re-checks of master
-- keys (kms_recheck), inventory, values under retired versions, settings that log
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

-- ---------------------------------------------------------------------------
-- Key cache statistics.
-- New columns at the end: tenant states held in shared memory, keys unwrapped again
-- within envelope.cache_ttl of being evicted to make room (the working set is larger
-- than envelope.cache_size), a hint that says so, graced_loads, the loads that
-- found the KMS unreachable and served the key's expired copy instead
-- (envelope.cache_grace), and the progress of envelope.cache_prewarm since the last
-- start: prewarm_state (off, starting, running, done, failed), prewarm_total (key
-- versions listed so far), prewarm_loaded, prewarm_failed.

DROP VIEW envelope.cache_stats;
DROP FUNCTION envelope.cache_stats();
CREATE FUNCTION envelope.cache_stats(
    OUT capacity bigint, OUT entries bigint, OUT hits bigint, OUT misses bigint,
    OUT evictions bigint, OUT kms_generate_calls bigint, OUT kms_decrypt_calls bigint,
    OUT kms_reencrypt_calls bigint, OUT kms_errors bigint,
    OUT kms_mean_latency_ms double precision, OUT kms_max_latency_ms double precision,
    OUT shared boolean, OUT tenant_entries bigint, OUT evicted_reloads bigint,
    OUT hint text, OUT graced_loads bigint, OUT prewarm_state text,
    OUT prewarm_total bigint, OUT prewarm_loaded bigint, OUT prewarm_failed bigint)
    RETURNS record
    AS 'MODULE_PATHNAME', 'envelope_cache_stats_v3'
    LANGUAGE C VOLATILE PARALLEL SAFE;

CREATE VIEW envelope.cache_stats AS SELECT * FROM envelope.cache_stats();

REVOKE ALL ON FUNCTION envelope.cache_stats() FROM PUBLIC;
REVOKE ALL ON envelope.cache_stats FROM PUBLIC;
GRANT EXECUTE ON FUNCTION envelope.cache_stats() TO envelope_admin;
GRANT SELECT ON envelope.cache_stats TO envelope_admin;

-- ---------------------------------------------------------------------------
-- Per-tenant access.
-- A tenant without rows here is open to every envelope_user member, as in 0.1.0.  Once
-- it has one, only roles with the privileges of a granted role (pg_has_role(...,
-- 'USAGE'), checked against current_user at each call) and envelope_admin's may
-- encrypt, decrypt or compute deterministic values and blind indexes with its keys
-- (src/tenant_access.c).  Its rows are key-store rows: the key-store trigger makes a
-- grant or revoke take effect in every session when it commits, on standbys and
-- logical-replication subscribers too; pg_dump keeps them (roles by name, so create
-- the roles before restoring).
CREATE TABLE envelope.tenant_grant (
    tenant      text NOT NULL REFERENCES envelope.tenant (tenant),
    role        regrole NOT NULL,
    granted_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (tenant, role)
);

COMMENT ON TABLE envelope.tenant_grant IS
    'pg_envelope: roles allowed to use a tenant''s keys (none: every envelope_user)';

REVOKE ALL ON envelope.tenant_grant FROM PUBLIC;
GRANT SELECT ON envelope.tenant_grant TO envelope_admin;
SELECT pg_catalog.pg_extension_config_dump('envelope.tenant_grant', '');

CREATE TRIGGER key_store_changed
    AFTER INSERT OR UPDATE OR DELETE ON envelope.tenant_grant
    FOR EACH STATEMENT EXECUTE FUNCTION envelope.key_store_changed();
CREATE TRIGGER key_store_changed_truncate
    AFTER TRUNCATE ON envelope.tenant_grant
    FOR EACH STATEMENT EXECUTE FUNCTION envelope.key_store_changed();
CREATE TRIGGER key_store_changed_replicated
    AFTER INSERT OR UPDATE OR DELETE ON envelope.tenant_grant
    FOR EACH ROW EXECUTE FUNCTION envelope.key_store_changed();
ALTER TABLE envelope.tenant_grant ENABLE ALWAYS TRIGGER key_store_changed;
ALTER TABLE envelope.tenant_grant ENABLE ALWAYS TRIGGER key_store_changed_truncate;
ALTER TABLE envelope.tenant_grant ENABLE REPLICA TRIGGER key_store_changed_replicated;

-- True if the grant (the revocation) changed anything; audited when it did.
CREATE FUNCTION envelope.grant_tenant(tenant text, role regrole)
    RETURNS boolean
    AS 'MODULE_PATHNAME', 'envelope_grant_tenant'
    LANGUAGE C VOLATILE PARALLEL UNSAFE CALLED ON NULL INPUT;

CREATE FUNCTION envelope.revoke_tenant(tenant text, role regrole)
    RETURNS boolean
    AS 'MODULE_PATHNAME', 'envelope_revoke_tenant'
    LANGUAGE C VOLATILE PARALLEL UNSAFE CALLED ON NULL INPUT;

REVOKE ALL ON FUNCTION envelope.grant_tenant(text, regrole),
    envelope.revoke_tenant(text, regrole) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION envelope.grant_tenant(text, regrole),
    envelope.revoke_tenant(text, regrole) TO envelope_admin;

-- ---------------------------------------------------------------------------
-- Citus: key tables as reference tables.
--
-- Under Citus every node encrypts and decrypts (pushed-down queries run the functions
-- on the workers), so every node must read the same key store: each table of the
-- extension becomes a reference table, a copy on every node kept in step by Citus,
-- written with two-phase commit.  Their statement triggers go with them to every copy
-- (hence citus.enable_unsafe_triggers, for this statement only), so a state change
-- reaches each node's key cache when it commits there.
--
-- The coordinator converts the tables.  Citus runs CREATE EXTENSION and ALTER
-- EXTENSION on the workers too, with DDL propagation off; there the tables become the
-- shells of the reference tables.  Foreign keys between the tables are dropped while
-- they are converted and added again after, through Citus, which puts them on every
-- copy: converted one by one with a key in place, Citus would turn the other end into
-- a local table of its metadata, under a new oid.  So the workers drop theirs, or the
-- coordinator's ADD CONSTRAINT would meet them there.  A table already distributed is
-- left as it is.  Without Citus nothing happens.  See doc/citus.md.
DO $citus$
DECLARE
    on_coordinator boolean;
    unsafe_triggers text;
    pending pg_catalog.regclass[];
    rel pg_catalog.regclass;
    fk record;
    fks text[] := '{}';
    fk_sql text;
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname OPERATOR(pg_catalog.=) 'citus') THEN
        RETURN;
    END IF;
    on_coordinator := pg_catalog.citus_is_coordinator()
        AND pg_catalog.current_setting('citus.enable_ddl_propagation')::boolean;

    SELECT pg_catalog.array_agg(c.oid::pg_catalog.regclass ORDER BY c.oid) INTO pending
      FROM pg_catalog.pg_class c
      JOIN pg_catalog.pg_depend d
        ON d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
       AND d.objid OPERATOR(pg_catalog.=) c.oid AND d.deptype OPERATOR(pg_catalog.=) 'e'
      JOIN pg_catalog.pg_extension e
        ON e.oid OPERATOR(pg_catalog.=) d.refobjid AND e.extname OPERATOR(pg_catalog.=) 'pg_envelope'
     WHERE c.relkind OPERATOR(pg_catalog.=) 'r'
       AND NOT EXISTS (SELECT FROM pg_catalog.pg_dist_partition p
                        WHERE p.logicalrelid OPERATOR(pg_catalog.=) c.oid);
    IF pending IS NULL THEN
        RETURN;
    END IF;

    FOR fk IN SELECT k.conrelid::pg_catalog.regclass AS rel, k.conname,
                     pg_catalog.pg_get_constraintdef(k.oid) AS def
                FROM pg_catalog.pg_constraint k
               WHERE k.contype OPERATOR(pg_catalog.=) 'f'
                 AND k.conrelid OPERATOR(pg_catalog.=) ANY (pending)
                 AND k.confrelid OPERATOR(pg_catalog.=) ANY (pending) LOOP
        EXECUTE pg_catalog.format('ALTER TABLE %s DROP CONSTRAINT %I', fk.rel, fk.conname);
        fks := fks OPERATOR(pg_catalog.||)
               pg_catalog.format('ALTER TABLE %s ADD CONSTRAINT %I %s', fk.rel, fk.conname, fk.def);
    END LOOP;
    IF NOT on_coordinator THEN
        RETURN;
    END IF;

    -- An update: Citus sends ALTER EXTENSION to the workers only after this script, but
    -- converting a table needs its shell, at this version, on every worker.  Update
    -- them first (as Citus itself would: propagation off there).
    IF EXISTS (SELECT FROM pg_catalog.run_command_on_workers($cmd$
        DO $w$ BEGIN
            IF EXISTS (SELECT FROM pg_catalog.pg_extension
                        WHERE extname OPERATOR(pg_catalog.=) 'pg_envelope'
                          AND extversion OPERATOR(pg_catalog.<>) '0.2.0') THEN
                PERFORM pg_catalog.set_config('citus.enable_ddl_propagation', 'off', true);
                ALTER EXTENSION pg_envelope UPDATE TO '0.2.0';
            END IF;
        END $w$$cmd$) r WHERE NOT r.success) THEN
        RAISE EXCEPTION 'could not update pg_envelope on every Citus worker'
            USING ERRCODE = '55000',
                  HINT = 'Run ALTER EXTENSION pg_envelope UPDATE TO ''0.2.0'' on each worker with citus.enable_ddl_propagation off, then here again.';
    END IF;

    -- The coordinator's caches learn of changes made by hand from the triggers on its
    -- copy, and it reads its copy instead of asking a worker.
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_dist_node n
                    WHERE n.groupid OPERATOR(pg_catalog.=) 0) THEN
        RAISE WARNING 'the Citus coordinator is not in the metadata: it will hold no copy of the pg_envelope key tables'
            USING DETAIL = 'Its sessions then read the key tables from a worker, and changes made to the key tables by hand do not reach their caches.',
                  HINT = 'Run SELECT citus_set_coordinator_host(...) and then SELECT replicate_reference_tables().';
    END IF;

    unsafe_triggers := pg_catalog.current_setting('citus.enable_unsafe_triggers');
    PERFORM pg_catalog.set_config('citus.enable_unsafe_triggers', 'on', true);
    FOREACH rel IN ARRAY pending LOOP
        PERFORM pg_catalog.create_reference_table(rel);
    END LOOP;
    PERFORM pg_catalog.set_config('citus.enable_unsafe_triggers', unsafe_triggers, true);
    FOREACH fk_sql IN ARRAY fks LOOP
        EXECUTE fk_sql;
    END LOOP;
END
$citus$;

-- ---------------------------------------------------------------------------
-- Equality key versions.
-- An equality key version is one of the tenant's DEK versions: deterministic values
-- and blind indexes are made with its HKDF subkeys.  Every tenant starts at 1, the
-- version 0.1.0 always used, so stored values and indexes keep matching.  The live
-- equality versions are the tenant's active DEK versions up to equality_version.

-- Under Citus the key tables are reference tables by now (above), and the coordinator
-- sends this statement to workers that have run this script themselves: IF NOT EXISTS
-- lets it pass there and still reach the shards.  No CHECK: Citus adds no column with
-- a constraint to a reference table (only the extension's C code writes the column,
-- with DEK versions, which are >= 1).
ALTER TABLE envelope.tenant ADD COLUMN IF NOT EXISTS equality_version integer NOT NULL DEFAULT 1;

-- Under the tenant's current equality version (0.1.0's symbols keep using version 1).
CREATE OR REPLACE FUNCTION envelope.encrypt_deterministic(tenant text, plaintext text, context text DEFAULT NULL)
    RETURNS bytea
    AS 'MODULE_PATHNAME', 'envelope_encrypt_deterministic_text_v2'
    LANGUAGE C STABLE PARALLEL SAFE CALLED ON NULL INPUT;

CREATE OR REPLACE FUNCTION envelope.encrypt_deterministic(tenant text, plaintext bytea, context text DEFAULT NULL)
    RETURNS bytea
    AS 'MODULE_PATHNAME', 'envelope_encrypt_deterministic_bytea_v2'
    LANGUAGE C STABLE PARALLEL SAFE CALLED ON NULL INPUT;

-- Version 1: the 32-byte HMAC of 0.1.0; version N >= 2: be32(N) || HMAC (36 bytes).
CREATE OR REPLACE FUNCTION envelope.blind_index(tenant text, value text)
    RETURNS bytea
    AS 'MODULE_PATHNAME', 'envelope_blind_index_v2'
    LANGUAGE C STABLE PARALLEL SAFE CALLED ON NULL INPUT;

-- The token under every live equality version, current first: for
-- WHERE col = ANY(envelope.blind_index_all(...)), which a btree index on col serves.
CREATE FUNCTION envelope.blind_index_all(tenant text, value text)
    RETURNS bytea[]
    AS 'MODULE_PATHNAME', 'envelope_blind_index_all'
    LANGUAGE C STABLE PARALLEL SAFE CALLED ON NULL INPUT;

CREATE FUNCTION envelope.encrypt_deterministic_all(tenant text, plaintext text, context text DEFAULT NULL)
    RETURNS bytea[]
    AS 'MODULE_PATHNAME', 'envelope_encrypt_deterministic_all_text'
    LANGUAGE C STABLE PARALLEL SAFE CALLED ON NULL INPUT;

CREATE FUNCTION envelope.encrypt_deterministic_all(tenant text, plaintext bytea, context text DEFAULT NULL)
    RETURNS bytea[]
    AS 'MODULE_PATHNAME', 'envelope_encrypt_deterministic_all_bytea'
    LANGUAGE C STABLE PARALLEL SAFE CALLED ON NULL INPUT;

-- The equality version new deterministic values and blind indexes use.
CREATE FUNCTION envelope.equality_key_version(tenant text)
    RETURNS integer
    AS 'MODULE_PATHNAME', 'envelope_equality_key_version'
    LANGUAGE C STABLE PARALLEL SAFE CALLED ON NULL INPUT;

-- Rotate the tenant's DEK and make the new version the equality key version.
CREATE FUNCTION envelope.rotate_equality_key(tenant text)
    RETURNS integer
    AS 'MODULE_PATHNAME', 'envelope_rotate_equality_key'
    LANGUAGE C VOLATILE PARALLEL UNSAFE CALLED ON NULL INPUT;

REVOKE ALL ON FUNCTION
    envelope.blind_index_all(text, text),
    envelope.encrypt_deterministic_all(text, text, text),
    envelope.encrypt_deterministic_all(text, bytea, text),
    envelope.equality_key_version(text),
    envelope.rotate_equality_key(text)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    envelope.blind_index_all(text, text),
    envelope.encrypt_deterministic_all(text, text, text),
    envelope.encrypt_deterministic_all(text, bytea, text),
    envelope.equality_key_version(text)
    TO envelope_user;
GRANT EXECUTE ON FUNCTION envelope.rotate_equality_key(text) TO envelope_admin;


-- ---------------------------------------------------------------------------
-- Encryption counts per DEK version.
-- Randomized encryptions (AES-GCM, random nonces) under each DEK version, which must
-- stay under 2^32 per key.  The figure is reserved ahead in blocks and rewritten in
-- place by the extension's C code (WAL-logged, not transactional, as a sequence is),
-- so it is an upper bound that a crash never lowers: see src/encryption_count.c.
-- The count is the first column, where the in-place update finds it; nothing but the
-- extension writes this table.  A key stored before 0.2.0 starts from 0 here.
-- Created after the Citus conversion above: under Citus each node counts the
-- encryptions it makes itself, in its own table.
CREATE TABLE envelope.data_key_encryptions (
    encryptions bigint NOT NULL DEFAULT 0,
    tenant_id   integer NOT NULL,
    version     integer NOT NULL,
    PRIMARY KEY (tenant_id, version)
);

COMMENT ON TABLE envelope.data_key_encryptions IS
    'pg_envelope: randomized encryptions reserved per DEK version (an upper bound of those made)';

REVOKE ALL ON envelope.data_key_encryptions FROM PUBLIC;

-- pg_dump keeps the counts with the keys they count.
SELECT pg_catalog.pg_extension_config_dump('envelope.data_key_encryptions', '');

-- Every stored key gets its row (under Citus a node adds its rows as it encrypts).
DO $counts$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname OPERATOR(pg_catalog.=) 'citus') THEN
        INSERT INTO envelope.data_key_encryptions (tenant_id, version)
            SELECT t.tenant_id, d.version
              FROM envelope.data_key d JOIN envelope.tenant t ON t.tenant OPERATOR(pg_catalog.=) d.tenant
            ON CONFLICT DO NOTHING;
    END IF;
END
$counts$;

-- Two columns at the end: encryptions (the reserved count above; NULL where this node
-- has not counted the key) and the tenant's equality key version.
CREATE OR REPLACE VIEW envelope.tenant_keys AS
    SELECT d.tenant, d.version,
           CASE WHEN t.state <> 'active' THEN t.state
                WHEN d.version = t.active_version THEN 'active'
                WHEN d.state = 'active' THEN 'decrypt-only'
                ELSE d.state END AS state,
           d.kms_provider, d.kms_key, d.created_at,
           c.encryptions,
           t.equality_version
      FROM envelope.data_key d JOIN envelope.tenant t USING (tenant)
      LEFT JOIN envelope.data_key_encryptions c
        ON c.tenant_id = t.tenant_id AND c.version = d.version;

-- ---------------------------------------------------------------------------
-- Stored blind indexes.
--
-- A blind index is a keyed hash of a plaintext the database holds only encrypted, so
-- moving it onto a new equality key version needs that plaintext.  A registered
-- blind-index column names the registered encrypted column it is made from (a security
-- label, like every registration: see src/inventory.c), and reencrypt_all and
-- reencrypt recompute it from that column's value, decrypted in C and never a Datum.
-- The rule: the column holds envelope.blind_index(tenant, envelope.decrypt_text(tenant,
-- source, context)), the source's tenant column and context; an index of a normalised
-- form (lower(), trim()) is not recomputable this way and must not be registered.

CREATE FUNCTION envelope.register_blind_index(rel regclass, "column" name, source_column name)
    RETURNS void
    AS 'MODULE_PATHNAME', 'envelope_register_blind_index'
    LANGUAGE C VOLATILE PARALLEL UNSAFE CALLED ON NULL INPUT;

-- True for a stored blind index under an equality key version other than the tenant's
-- current one (when that one is live); false for anything else, never an error.
CREATE FUNCTION envelope.blind_index_needs_recompute(blind_index bytea, tenant text)
    RETURNS boolean
    AS 'MODULE_PATHNAME', 'envelope_blind_index_needs_recompute'
    LANGUAGE C STABLE STRICT PARALLEL SAFE;

-- envelope.blind_index(tenant, envelope.decrypt_text(tenant, source, context)) under
-- the tenant's current equality key version, the plaintext never a Datum.  The batch
-- engine's SET clause for blind-index columns.
CREATE FUNCTION envelope.blind_index_recompute(tenant text, source bytea, context text DEFAULT NULL)
    RETURNS bytea
    AS 'MODULE_PATHNAME', 'envelope_blind_index_recompute'
    LANGUAGE C STABLE PARALLEL SAFE CALLED ON NULL INPUT;

CREATE VIEW envelope.blind_index_columns AS
    SELECT l.objoid::pg_catalog.regclass AS relation,
           a.attname AS column_name,
           sa.attname AS source_column,
           e.tenant_column,
           e.context
      FROM pg_catalog.pg_seclabel l
      JOIN pg_catalog.pg_attribute a
        ON a.attrelid = l.objoid AND a.attnum = l.objsubid AND NOT a.attisdropped
      LEFT JOIN pg_catalog.pg_seclabel sl
        ON sl.provider = l.provider AND sl.classoid = l.classoid AND sl.objoid = l.objoid
       AND sl.objsubid > 0
       AND (sl.label::pg_catalog.jsonb OPERATOR(pg_catalog.->>) 'role') = 'encrypted'
       AND (sl.label::pg_catalog.jsonb OPERATOR(pg_catalog.->>) 'tag')
           = (l.label::pg_catalog.jsonb OPERATOR(pg_catalog.->>) 'source')
      LEFT JOIN pg_catalog.pg_attribute sa
        ON sa.attrelid = sl.objoid AND sa.attnum = sl.objsubid AND NOT sa.attisdropped
      LEFT JOIN envelope.encrypted_columns e
        ON e.relation OPERATOR(pg_catalog.=) l.objoid::pg_catalog.regclass
       AND e.column_name OPERATOR(pg_catalog.=) sa.attname
     WHERE l.provider = 'pg_envelope'
       AND l.classoid = 'pg_catalog.pg_class'::pg_catalog.regclass
       AND l.objsubid > 0
       AND (l.label::pg_catalog.jsonb OPERATOR(pg_catalog.->>) 'role') = 'blind_index';

REVOKE ALL ON envelope.blind_index_columns FROM PUBLIC;
GRANT SELECT ON envelope.blind_index_columns TO envelope_admin;
REVOKE ALL ON FUNCTION
    envelope.register_blind_index(regclass, name, name),
    envelope.blind_index_needs_recompute(bytea, text),
    envelope.blind_index_recompute(text, bytea, text)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION envelope.register_blind_index(regclass, name, name) TO envelope_admin;
GRANT EXECUTE ON FUNCTION envelope.blind_index_needs_recompute(bytea, text) TO envelope_user;
-- As reencrypt_value: for the batch engine, which its caller (an admin) runs.
GRANT EXECUTE ON FUNCTION envelope.blind_index_recompute(text, bytea, text) TO envelope_admin;
