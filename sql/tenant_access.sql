-- Per-tenant access: grant_tenant / revoke_tenant, their errors, and the check on
-- every path that uses a tenant's keys (encrypt, decrypt, deterministic values, blind
-- indexes, re-encryption), against current_user at each call.
\set VERBOSITY default
\set SHOW_CONTEXT never
CREATE ROLE regress_ta_app LOGIN IN ROLE envelope_user;
CREATE ROLE regress_ta_other LOGIN IN ROLE envelope_user;
CREATE ROLE regress_ta_group NOLOGIN;
CREATE ROLE regress_ta_member LOGIN IN ROLE envelope_user, regress_ta_group;
CREATE ROLE regress_ta_admin LOGIN IN ROLE envelope_admin;
-- reencrypt_value is envelope_admin's; granted here to application roles to show
-- that it is checked like the other key paths.
GRANT EXECUTE ON FUNCTION envelope.reencrypt_value(text, bytea, text) TO regress_ta_app, regress_ta_other;
CREATE TABLE ta_mark AS SELECT coalesce(max(id), 0) AS last FROM envelope.audit_log;

SELECT envelope.create_tenant('ta-open');
SELECT envelope.create_tenant('ta-closed');
CREATE TABLE ta_data (id int, tenant text, v bytea, d bytea, b bytea);
INSERT INTO ta_data SELECT g, t,
       envelope.encrypt(t, 'v' || g, 'ctx'),
       envelope.encrypt_deterministic(t, 'd' || g),
       envelope.blind_index(t, 'd' || g)
  FROM generate_series(1, 3) g, unnest(ARRAY['ta-open', 'ta-closed']) t;
GRANT SELECT ON ta_data TO PUBLIC;

-- Bad arguments.
SELECT envelope.grant_tenant(NULL, 'regress_ta_app');
SELECT envelope.grant_tenant('ta-closed', NULL);
SELECT envelope.grant_tenant('', 'regress_ta_app');
SELECT envelope.grant_tenant('no-such-tenant', 'regress_ta_app');
SELECT envelope.grant_tenant('ta-closed', 'regress_no_such_role');
SELECT envelope.grant_tenant('ta-closed', '-');
SELECT envelope.grant_tenant('ta-closed', 4000000000::oid::regrole);
SELECT envelope.revoke_tenant(NULL, 'regress_ta_app');
SELECT envelope.revoke_tenant('ta-closed', NULL);
SELECT envelope.revoke_tenant('no-such-tenant', 'regress_ta_app');
-- Nothing granted yet: nothing to revoke.
SELECT envelope.revoke_tenant('ta-closed', 'regress_ta_app') AS revoked;

-- Only envelope_admin manages grants; envelope_user cannot even read them.
SET ROLE regress_ta_app;
SELECT envelope.grant_tenant('ta-closed', 'regress_ta_app');
SELECT envelope.revoke_tenant('ta-closed', 'regress_ta_app');
SELECT * FROM envelope.tenant_grant;
RESET ROLE;

-- Without grants a tenant is open to every envelope_user, as before.
SET ROLE regress_ta_other;
SELECT count(*) FILTER (WHERE envelope.decrypt_text(tenant, v, 'ctx') = 'v' || id) AS decrypted
  FROM ta_data;
RESET ROLE;

-- The first grant restricts the tenant; granting again changes nothing.
SET ROLE regress_ta_admin;
SELECT envelope.grant_tenant('ta-closed', 'regress_ta_app') AS granted;
SELECT envelope.grant_tenant('ta-closed', 'regress_ta_app') AS granted;
SELECT tenant, role FROM envelope.tenant_grant ORDER BY 1, 2;
RESET ROLE;

-- A granted role uses the tenant's keys on every path.
SET ROLE regress_ta_app;
SELECT count(*) FILTER (WHERE envelope.decrypt_text(tenant, v, 'ctx') = 'v' || id
                          AND envelope.decrypt_text(tenant, d) = 'd' || id
                          AND envelope.encrypt_deterministic(tenant, 'd' || id) = d
                          AND envelope.blind_index(tenant, 'd' || id) = b
                          AND b = ANY (envelope.blind_index_all(tenant, 'd' || id))
                          AND d = ANY (envelope.encrypt_deterministic_all(tenant, 'd' || id))
                          AND envelope.decrypt_text(tenant, envelope.reencrypt_value(tenant, v, 'ctx'), 'ctx') = 'v' || id
                          AND envelope.decrypt(tenant, envelope.encrypt(tenant, 'x'::bytea)) = 'x'::bytea)
       AS all_paths_ok, count(*)
  FROM ta_data;
RESET ROLE;

-- Another envelope_user is refused on each of them, before any key is used; the
-- statement (which may carry a plaintext) stays out of the log.
SET ROLE regress_ta_other;
SELECT envelope.encrypt('ta-closed', 'secret');
SELECT envelope.encrypt('ta-closed', 'secret'::bytea);
SELECT envelope.decrypt_text(tenant, v, 'ctx') FROM ta_data WHERE tenant = 'ta-closed';
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.decrypt(tenant, v, 'ctx') FROM ta_data WHERE tenant = 'ta-closed';
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.decrypt_text(tenant, d) FROM ta_data WHERE tenant = 'ta-closed';
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.encrypt_deterministic('ta-closed', 'secret');
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.blind_index('ta-closed', 'secret');
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.blind_index_all('ta-closed', 'secret');
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.encrypt_deterministic_all('ta-closed', 'secret');
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.reencrypt_value(tenant, v, 'ctx') FROM ta_data WHERE tenant = 'ta-closed';
\echo :LAST_ERROR_SQLSTATE
-- The row path: a scan over both tenants stops at the first restricted row.
SELECT id, tenant, envelope.decrypt_text(tenant, v, 'ctx') FROM ta_data ORDER BY tenant DESC, id;
\echo :LAST_ERROR_SQLSTATE
-- The open tenant still works, and so does what reads no key (the public header,
-- the version numbers).
SELECT count(*) FILTER (WHERE envelope.decrypt_text(tenant, v, 'ctx') = 'v' || id) AS decrypted
  FROM ta_data WHERE tenant = 'ta-open';
SELECT envelope.key_version(v), envelope.active_key_version(tenant),
       envelope.equality_key_version(tenant), envelope.needs_reencryption(v, tenant)
  FROM ta_data WHERE tenant = 'ta-closed' AND id = 1;
RESET ROLE;

-- A new session finds the tenant's state, grants included, in shared memory (this one
-- read it from the key store): the same answers.
\c
SET ROLE regress_ta_other;
SELECT envelope.decrypt_text(tenant, v, 'ctx') FROM ta_data WHERE tenant = 'ta-closed' AND id = 1;
\echo :LAST_ERROR_SQLSTATE
SET ROLE regress_ta_app;
SELECT envelope.decrypt_text(tenant, v, 'ctx') FROM ta_data WHERE tenant = 'ta-closed' AND id = 1;
RESET ROLE;

-- envelope_admin's members and superusers need no grant.
SET ROLE regress_ta_admin;
SELECT envelope.decrypt_text(tenant, v, 'ctx') FROM ta_data WHERE tenant = 'ta-closed' AND id = 1;
RESET ROLE;
SELECT envelope.decrypt_text(tenant, v, 'ctx') FROM ta_data WHERE tenant = 'ta-closed' AND id = 1;

-- The check is against current_user: in one session, a verdict for one role is never
-- taken for another.
SET ROLE regress_ta_app;
SELECT envelope.decrypt_text(tenant, v, 'ctx') FROM ta_data WHERE tenant = 'ta-closed' AND id = 1;
SET ROLE regress_ta_other;
SELECT envelope.decrypt_text(tenant, v, 'ctx') FROM ta_data WHERE tenant = 'ta-closed' AND id = 1;
\echo :LAST_ERROR_SQLSTATE
SET ROLE regress_ta_app;
SELECT envelope.decrypt_text(tenant, v, 'ctx') FROM ta_data WHERE tenant = 'ta-closed' AND id = 1;
RESET ROLE;

-- SECURITY DEFINER: the function runs as its owner, whose grant counts; an invoker's
-- function runs as the caller, whose does not.
CREATE FUNCTION ta_read_as_owner(i int) RETURNS text SECURITY DEFINER SET search_path = pg_catalog
    LANGUAGE sql AS $$ SELECT envelope.decrypt_text(tenant, v, 'ctx') FROM public.ta_data WHERE tenant = 'ta-closed' AND id = i $$;
CREATE FUNCTION ta_read_as_caller(i int) RETURNS text SET search_path = pg_catalog
    LANGUAGE sql AS $$ SELECT envelope.decrypt_text(tenant, v, 'ctx') FROM public.ta_data WHERE tenant = 'ta-closed' AND id = i $$;
ALTER FUNCTION ta_read_as_owner(int) OWNER TO regress_ta_app;
ALTER FUNCTION ta_read_as_caller(int) OWNER TO regress_ta_app;
SET ROLE regress_ta_other;
SELECT ta_read_as_owner(2);
SELECT ta_read_as_caller(2);
\echo :LAST_ERROR_SQLSTATE
RESET ROLE;

-- A grant to a group role serves its members (with inheritance); a membership
-- revoked is seen by the next statement of the same session.
SELECT envelope.grant_tenant('ta-closed', 'regress_ta_group') AS granted;
SET ROLE regress_ta_member;
SELECT envelope.decrypt_text(tenant, v, 'ctx') FROM ta_data WHERE tenant = 'ta-closed' AND id = 1;
RESET ROLE;
REVOKE regress_ta_group FROM regress_ta_member;
SET ROLE regress_ta_member;
SELECT envelope.decrypt_text(tenant, v, 'ctx') FROM ta_data WHERE tenant = 'ta-closed' AND id = 1;
\echo :LAST_ERROR_SQLSTATE
RESET ROLE;
GRANT regress_ta_group TO regress_ta_member;
SET ROLE regress_ta_member;
SELECT envelope.decrypt_text(tenant, v, 'ctx') FROM ta_data WHERE tenant = 'ta-closed' AND id = 1;
RESET ROLE;

-- A grant takes effect in its own transaction at once, and not at all if it rolls
-- back; a revocation too.
BEGIN;
SELECT envelope.grant_tenant('ta-open', 'regress_ta_app') AS granted;
SET LOCAL ROLE regress_ta_other;
SELECT envelope.decrypt_text(tenant, v, 'ctx') FROM ta_data WHERE tenant = 'ta-open' AND id = 1;
ROLLBACK;
SET ROLE regress_ta_other;
SELECT envelope.decrypt_text(tenant, v, 'ctx') FROM ta_data WHERE tenant = 'ta-open' AND id = 1;
RESET ROLE;
BEGIN;
SELECT envelope.revoke_tenant('ta-closed', 'regress_ta_group') AS revoked;
ROLLBACK;
SET ROLE regress_ta_member;
SELECT envelope.decrypt_text(tenant, v, 'ctx') FROM ta_data WHERE tenant = 'ta-closed' AND id = 1;
RESET ROLE;

-- More grants than shared memory holds with a tenant's state (8): still exact.
DO $$ BEGIN
    FOR i IN 1..9 LOOP
        EXECUTE format('CREATE ROLE regress_ta_g%s NOLOGIN IN ROLE envelope_user', i);
        PERFORM envelope.grant_tenant('ta-closed', format('regress_ta_g%s', i)::regrole);
    END LOOP;
END $$;
SELECT count(*) AS grants FROM envelope.tenant_grant WHERE tenant = 'ta-closed';
SET ROLE regress_ta_g9;
SELECT envelope.decrypt_text(tenant, v, 'ctx') FROM ta_data WHERE tenant = 'ta-closed' AND id = 3;
SET ROLE regress_ta_other;
SELECT envelope.decrypt_text(tenant, v, 'ctx') FROM ta_data WHERE tenant = 'ta-closed' AND id = 3;
\echo :LAST_ERROR_SQLSTATE
RESET ROLE;
-- and in a new session, which must not take a shortened list from shared memory
\c
SET ROLE regress_ta_g9;
SELECT envelope.decrypt_text(tenant, v, 'ctx') FROM ta_data WHERE tenant = 'ta-closed' AND id = 3;
SET ROLE regress_ta_other;
SELECT envelope.decrypt_text(tenant, v, 'ctx') FROM ta_data WHERE tenant = 'ta-closed' AND id = 3;
\echo :LAST_ERROR_SQLSTATE
RESET ROLE;
DO $$ BEGIN
    FOR i IN 1..9 LOOP
        PERFORM envelope.revoke_tenant('ta-closed', format('regress_ta_g%s', i)::regrole);
        EXECUTE format('DROP ROLE regress_ta_g%s', i);
    END LOOP;
END $$;

-- A dropped role's grant stays (shown by oid) and grants nothing: the tenant stays
-- restricted until it is revoked by that oid.
CREATE ROLE regress_ta_gone;
SELECT envelope.grant_tenant('ta-open', 'regress_ta_gone') AS granted;
DROP ROLE regress_ta_gone;
SELECT role::text ~ '^[0-9]+$' AS shown_by_oid FROM envelope.tenant_grant WHERE tenant = 'ta-open';
SET ROLE regress_ta_other;
SELECT envelope.decrypt_text(tenant, v, 'ctx') FROM ta_data WHERE tenant = 'ta-open' AND id = 1;
\echo :LAST_ERROR_SQLSTATE
RESET ROLE;
SELECT envelope.revoke_tenant('ta-open', role) AS revoked FROM envelope.tenant_grant WHERE tenant = 'ta-open';

-- Revoking the last grant opens the tenant again, with a warning.
SELECT envelope.revoke_tenant('ta-closed', 'regress_ta_app') AS revoked;
SELECT envelope.revoke_tenant('ta-closed', 'regress_ta_group') AS revoked;
SET ROLE regress_ta_other;
SELECT envelope.decrypt_text(tenant, v, 'ctx') FROM ta_data WHERE tenant = 'ta-closed' AND id = 1;
RESET ROLE;

-- A destroyed tenant takes no new grant; an old one can still be revoked.
SELECT envelope.create_tenant('ta-doomed');
SELECT envelope.grant_tenant('ta-doomed', 'regress_ta_app') AS granted;
SELECT envelope.destroy_tenant('ta-doomed', 'ta-doomed');
SELECT envelope.grant_tenant('ta-doomed', 'regress_ta_other');
SELECT envelope.revoke_tenant('ta-doomed', 'regress_ta_app') AS revoked;

-- Every grant and revocation that changed something is audited, with its caller.
SELECT CASE WHEN a."current_user" = current_user THEN '(superuser)' ELSE a."current_user"::text END AS by,
       a.action, a.tenant,
       CASE WHEN a.detail->>'role' ~ '^[0-9]+$' THEN '{"role": "<oid>"}'::jsonb ELSE a.detail END AS detail
  FROM envelope.audit_log a, ta_mark m
 WHERE a.id > m.last AND a.action IN ('grant', 'revoke') ORDER BY a.id;

-- The key store is read through an index of tenant_grant only if that index compares
-- tenants as text does.  With bpchar_ops 'ta-pad' and 'ta-pad ' are equal: a scan for
-- 'ta-pad ' would stop at the 'ta-pad' grant and miss its own, opening the tenant to
-- every envelope_user.  Such an index is not used; 'ta-pad ' stays closed.
SELECT envelope.create_tenant('ta-pad');
SELECT envelope.create_tenant('ta-pad ');
SELECT envelope.grant_tenant('ta-pad', 'regress_ta_other') AS granted;
SELECT envelope.grant_tenant('ta-pad ', 'regress_ta_app') AS granted;
ALTER TABLE envelope.tenant_grant DROP CONSTRAINT tenant_grant_pkey;
CREATE INDEX ta_grant_bpchar ON envelope.tenant_grant (tenant bpchar_ops);
SET ROLE regress_ta_other;
SELECT envelope.encrypt('ta-pad ', 'secret');
SELECT envelope.decrypt_text('ta-pad', envelope.encrypt('ta-pad', 'mine')) AS own_tenant;
RESET ROLE;
SET ROLE regress_ta_app;
SELECT envelope.decrypt_text('ta-pad ', envelope.encrypt('ta-pad ', 'mine')) AS own_tenant;
RESET ROLE;
DROP INDEX envelope.ta_grant_bpchar;
ALTER TABLE envelope.tenant_grant ADD CONSTRAINT tenant_grant_pkey PRIMARY KEY (tenant, role);
SELECT envelope.revoke_tenant('ta-pad', 'regress_ta_other') AS revoked;
SELECT envelope.revoke_tenant('ta-pad ', 'regress_ta_app') AS revoked;

DROP FUNCTION ta_read_as_owner(int), ta_read_as_caller(int);
DROP TABLE ta_data, ta_mark;
REVOKE EXECUTE ON FUNCTION envelope.reencrypt_value(text, bytea, text) FROM regress_ta_app, regress_ta_other;
DROP ROLE regress_ta_app, regress_ta_other, regress_ta_member, regress_ta_group, regress_ta_admin;
