-- Encryption counts per DEK version, and envelope.max_encryptions_per_key.
\set VERBOSITY default
\set SHOW_CONTEXT never
SELECT envelope.create_tenant('ec_a');
SELECT envelope.create_tenant('ec_b');

-- A new key has its count, 0; the view shows it and the tenant's equality version.
SELECT tenant, version, state, encryptions, equality_version
  FROM envelope.tenant_keys WHERE tenant LIKE 'ec\_%' ORDER BY 1, 2;

-- Randomized encryptions are counted (the figure is what is reserved: never less than
-- what was encrypted); deterministic values and blind indexes use no nonce, and are not.
CREATE TABLE ec_t (tenant text, c bytea);
INSERT INTO ec_t SELECT 'ec_a', envelope.encrypt('ec_a', 'v' || i) FROM generate_series(1, 50) i;
INSERT INTO ec_t SELECT 'ec_a', envelope.encrypt('ec_a', ('\x0102')::bytea) FROM generate_series(1, 20) i;
SELECT count(envelope.encrypt_deterministic('ec_b', 'v' || i)) AS det,
       count(envelope.blind_index('ec_b', 'v' || i)) AS idx
  FROM generate_series(1, 100) i;
SELECT k.tenant, k.encryptions >= (SELECT count(*) FROM ec_t WHERE tenant = k.tenant) AS covers_rows,
       k.encryptions - (SELECT count(*) FROM ec_t WHERE tenant = k.tenant) < 64 + 512 AS within_two_blocks
  FROM envelope.tenant_keys k WHERE k.tenant LIKE 'ec\_%' ORDER BY 1;
SELECT encryptions AS ec_b_uncounted FROM envelope.tenant_keys WHERE tenant = 'ec_b';

-- envelope.reencrypt_value encrypts too, under the active version.
SELECT envelope.rotate_tenant_key('ec_a') AS v;
SELECT count(envelope.reencrypt_value('ec_a', c, NULL)) FROM ec_t;
SELECT version, encryptions >= 70 AS covers_rows FROM envelope.tenant_keys
 WHERE tenant = 'ec_a' AND version = 2;

-- A backend's unused reservation is lost when it exits: an upper bound, never less.
SELECT encryptions AS before_reconnect FROM envelope.tenant_keys WHERE tenant = 'ec_a' AND version = 2 \gset
\c
SELECT envelope.key_version(envelope.encrypt('ec_a', 'x')) AS v;
SELECT encryptions > :before_reconnect AS new_block FROM envelope.tenant_keys
 WHERE tenant = 'ec_a' AND version = 2;

-- The setting: reloaded (PGC_SIGHUP), range checked.
SET envelope.max_encryptions_per_key = 100;
ALTER SYSTEM SET envelope.max_encryptions_per_key = 0;
ALTER SYSTEM SET envelope.max_encryptions_per_key = 100;
SELECT pg_reload_conf();
SELECT pg_sleep(1);
\c
SHOW envelope.max_encryptions_per_key;

-- 89 encryptions: below 90 %, no warning.
SELECT envelope.create_tenant('ec_lim');
CREATE TABLE ec_lim (n int, c bytea);
INSERT INTO ec_lim SELECT i, envelope.encrypt('ec_lim', 'v' || i) FROM generate_series(1, 89) i;
-- The 91st reaches 90 %: one WARNING, not one per row.
INSERT INTO ec_lim SELECT i, envelope.encrypt('ec_lim', 'v' || i) FROM generate_series(90, 95) i;
-- The 101st finds version 1 spent: the tenant's key rotates in this transaction.
INSERT INTO ec_lim SELECT i, envelope.encrypt('ec_lim', 'v' || i) FROM generate_series(96, 110) i;
SELECT envelope.key_version(c) AS version, count(*) FROM ec_lim GROUP BY 1 ORDER BY 1;
SELECT version, state, encryptions FROM envelope.tenant_keys WHERE tenant = 'ec_lim' ORDER BY 1;
SELECT action, tenant, versions FROM envelope.audit_log WHERE tenant = 'ec_lim' ORDER BY id;
-- Every value decrypts.
SELECT count(*) FILTER (WHERE envelope.decrypt_text('ec_lim', c) = 'v' || n) AS decrypted FROM ec_lim;

-- A lower limit applies at once: version 2 (64 reserved) is spent under a limit of 64.
ALTER SYSTEM SET envelope.max_encryptions_per_key = 64;
SELECT pg_reload_conf();
SELECT pg_sleep(1);
\c
-- A read-only transaction cannot rotate: it refuses to encrypt under the spent key.
BEGIN READ ONLY;
SELECT envelope.encrypt('ec_lim', 'x');
ROLLBACK;
-- A rotation rolled back leaves the key spent; the next encryption rotates again.
BEGIN;
SELECT envelope.key_version(envelope.encrypt('ec_lim', 'x')) AS v;
ROLLBACK;
SELECT envelope.key_version(envelope.encrypt('ec_lim', 'x')) AS v;
SELECT version, state, encryptions FROM envelope.tenant_keys WHERE tenant = 'ec_lim' ORDER BY 1;

-- A larger limit, whose last blocks are more than one encryption: exactly 10,000
-- values under version 1, not one more.
ALTER SYSTEM SET envelope.max_encryptions_per_key = 10000;
SELECT pg_reload_conf();
SELECT pg_sleep(1);
\c
SELECT envelope.create_tenant('ec_big');
CREATE TABLE ec_big AS SELECT envelope.encrypt('ec_big', 'v' || i) AS c FROM generate_series(1, 10050) i;
SELECT envelope.key_version(c) AS version, count(*) FROM ec_big GROUP BY 1 ORDER BY 1;
SELECT version, encryptions FROM envelope.tenant_keys WHERE tenant = 'ec_big' AND version = 1;

ALTER SYSTEM RESET envelope.max_encryptions_per_key;
SELECT pg_reload_conf();
DROP TABLE ec_t, ec_lim, ec_big;

-- DROP EXTENSION and CREATE EXTENSION in one session: the new count table starts at 0
-- and gives a new key the (tenant_id, version) of an old one; a block this backend
-- reserved in the old table is never used for it (each encryption is counted anew).
\c
SELECT tenant AS ec_old, tenant_id AS ec_id FROM envelope.tenant
 WHERE state = 'active' AND active_version = 1 ORDER BY tenant_id LIMIT 1 \gset
SELECT envelope.key_version(envelope.encrypt(:'ec_old', 'x')) AS v;
DROP EXTENSION pg_envelope CASCADE;
CREATE EXTENSION pg_envelope;
SELECT count(envelope.create_tenant('ec_again_' || i)) = :ec_id AS created
  FROM generate_series(1, :ec_id) i;
SELECT tenant_id = :ec_id AS same_tenant_id, active_version
  FROM envelope.tenant WHERE tenant = 'ec_again_' || :ec_id;
SELECT count(envelope.encrypt('ec_again_' || :ec_id, 'v' || i)) FROM generate_series(1, 50) i;
SELECT version, encryptions >= 50 AS covers_rows FROM envelope.tenant_keys
 WHERE tenant = 'ec_again_' || :ec_id;
