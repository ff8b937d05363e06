-- Installation: schema, roles, key store, and the properties of every function.
CREATE EXTENSION pg_envelope;

SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname LIKE 'envelope%' ORDER BY 1;
SELECT pg_has_role('envelope_admin', 'envelope_user', 'MEMBER') AS admin_is_user;

-- The library is preloaded, so the key cache is shared.
SELECT current_setting('shared_preload_libraries') AS preload;
SELECT capacity, entries, shared FROM envelope.cache_stats;

-- Volatility, strictness, parallel safety, security: decrypt is never immutable.
SELECT p.oid::regprocedure AS function, provolatile, proisstrict, proparallel, prosecdef
  FROM pg_proc p WHERE pronamespace = 'envelope'::regnamespace ORDER BY p.oid::regprocedure::text;

-- PUBLIC holds nothing.
SELECT p.oid::regprocedure AS public_can_execute
  FROM pg_proc p WHERE pronamespace = 'envelope'::regnamespace
   AND has_function_privilege('public', p.oid, 'EXECUTE');
SELECT c.relname, has_table_privilege('public', c.oid, 'SELECT') AS public_select
  FROM pg_class c WHERE relnamespace = 'envelope'::regnamespace AND relkind IN ('r', 'v')
 ORDER BY 1;

-- The key tables are dumped with their rows.
SELECT extconfig::regclass[] FROM pg_extension WHERE extname = 'pg_envelope';

-- Superuser-only settings.
SELECT name, context FROM pg_settings WHERE name LIKE 'envelope.%' ORDER BY 1;

-- First tenants: one DEK each, made by the provider, stored only wrapped.
SELECT envelope.create_tenant('acme');
SELECT envelope.create_tenant('globex');
SELECT tenant, version, state, kms_provider, kms_key ~ '^local:[0-9a-f]{16}$' AS kms_key_is_local_id
  FROM envelope.tenant_keys ORDER BY 1, 2;
-- 1 format byte + 12 nonce + 32 wrapped key + 16 tag
SELECT tenant, octet_length(wrapped_dek) AS wrapped_len FROM envelope.data_key ORDER BY 1;
SELECT kms_generate_calls FROM envelope.cache_stats;
