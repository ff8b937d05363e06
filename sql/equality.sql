-- Equality key versions: rotation of the key deterministic values and blind indexes
-- are made with, and lookups that span it.
\set VERBOSITY default
\set SHOW_CONTEXT never
SELECT envelope.create_tenant('eq_a');
SELECT envelope.create_tenant('eq_b');
SELECT envelope.equality_key_version('eq_a') AS eq_version;

-- Rotating the DEK alone leaves the equality key where it was (version 1).
SELECT envelope.rotate_tenant_key('eq_a') AS dek_version;
SELECT envelope.equality_key_version('eq_a') AS eq_version,
       octet_length(envelope.blind_index('eq_a', 'alice')) AS index_len,
       envelope.key_version(envelope.encrypt_deterministic('eq_a', 'alice', 'c')) AS det_version;

-- Version 1 tokens: one element in each *_all array, equal to the single token.
SELECT envelope.blind_index_all('eq_a', 'alice') = ARRAY[envelope.blind_index('eq_a', 'alice')] AS idx_all_v1,
       envelope.encrypt_deterministic_all('eq_a', 'alice', 'c')
         = ARRAY[envelope.encrypt_deterministic('eq_a', 'alice', 'c')] AS det_all_v1,
       envelope.encrypt_deterministic_all('eq_a', '\x00ff'::bytea)
         = ARRAY[envelope.encrypt_deterministic('eq_a', '\x00ff'::bytea)] AS det_all_bytea;

-- A table with rows of both tenants under equality version 1.
CREATE TABLE eq_user (id int PRIMARY KEY, tenant text NOT NULL, email_idx bytea NOT NULL,
                      email_det bytea NOT NULL);
CREATE INDEX eq_user_email_idx ON eq_user (email_idx);
CREATE UNIQUE INDEX eq_user_email_det ON eq_user (tenant, email_det);
INSERT INTO eq_user
SELECT i, t, envelope.blind_index(t, 'user' || i || '@example.com'),
       envelope.encrypt_deterministic(t, 'user' || i || '@example.com', 'eq_user.email')
  FROM generate_series(1, 200) i, LATERAL (SELECT CASE WHEN i % 2 = 0 THEN 'eq_a' ELSE 'eq_b' END) s(t);
ANALYZE eq_user;

-- Rotate the equality key of eq_a: a new DEK version, and it is the equality version.
SELECT envelope.rotate_equality_key('eq_a') AS new_eq_version;
SELECT envelope.equality_key_version('eq_a') AS eq_a, envelope.equality_key_version('eq_b') AS eq_b,
       envelope.active_key_version('eq_a') AS active_a;
SELECT action, tenant, versions FROM envelope.audit_log
 WHERE tenant = 'eq_a' ORDER BY id DESC LIMIT 2;

-- New tokens carry version 3: a 36-byte index that starts with it, a SIV header.
SELECT octet_length(envelope.blind_index('eq_a', 'alice')) AS index_len,
       substr(envelope.blind_index('eq_a', 'alice'), 1, 4) AS index_prefix,
       envelope.key_version(envelope.encrypt_deterministic('eq_a', 'alice', 'c')) AS det_version,
       envelope.decrypt_text('eq_a', envelope.encrypt_deterministic('eq_a', 'alice', 'c'), 'c') AS round_trip;
-- eq_b did not move: its tokens are those of before.
SELECT octet_length(envelope.blind_index('eq_b', 'alice')) AS eq_b_index_len;

-- *_all: the current version first, then version 1 (version 2 is a DEK version in
-- between: it made no token, and its token matches nothing).
SELECT array_length(envelope.blind_index_all('eq_a', 'alice'), 1) AS n,
       (envelope.blind_index_all('eq_a', 'alice'))[1] = envelope.blind_index('eq_a', 'alice') AS first_is_current,
       octet_length((envelope.blind_index_all('eq_a', 'alice'))[3]) AS last_len;
SELECT envelope.key_version(d) FROM unnest(envelope.encrypt_deterministic_all('eq_a', 'alice', 'c')) d;

-- Old rows (version 1) still match through *_all, and the new token alone misses them.
SELECT id FROM eq_user
 WHERE email_idx = ANY (envelope.blind_index_all('eq_a', 'user42@example.com'));
SELECT count(*) AS current_only FROM eq_user
 WHERE email_idx = envelope.blind_index('eq_a', 'user42@example.com');
SELECT id FROM eq_user
 WHERE tenant = 'eq_a'
   AND email_det = ANY (envelope.encrypt_deterministic_all('eq_a', 'user42@example.com', 'eq_user.email'));
-- A new row under version 3, found by the same lookup.
INSERT INTO eq_user VALUES (1000, 'eq_a', envelope.blind_index('eq_a', 'new@example.com'),
                            envelope.encrypt_deterministic('eq_a', 'new@example.com', 'eq_user.email'));
SELECT id FROM eq_user
 WHERE email_idx = ANY (envelope.blind_index_all('eq_a', 'new@example.com'));

-- No cross-tenant match: eq_b's rows hold odd ids, eq_a's lookups never find them.
SELECT count(*) AS cross_tenant FROM eq_user
 WHERE email_idx = ANY (envelope.blind_index_all('eq_a', 'user41@example.com'));
SELECT id FROM eq_user
 WHERE email_idx = ANY (envelope.blind_index_all('eq_b', 'user41@example.com'));

-- The lookup through *_all uses the btree index.
SET enable_seqscan = off;
EXPLAIN (COSTS OFF)
SELECT id FROM eq_user WHERE email_idx = ANY (envelope.blind_index_all('eq_a', 'alice'));
RESET enable_seqscan;

-- UNIQUE across a rotation: a unique index holds per version only, so the same value
-- under version 3 does not collide with its version-1 row ...
\set VERBOSITY terse
INSERT INTO eq_user VALUES (1001, 'eq_a', envelope.blind_index('eq_a', 'user42@example.com'),
                            envelope.encrypt_deterministic('eq_a', 'user42@example.com', 'eq_user.email'));
DELETE FROM eq_user WHERE id = 1001;
-- ... until the version-1 value is moved onto version 3 (what re-encryption does):
UPDATE eq_user
   SET email_det = envelope.encrypt_deterministic('eq_a',
                       envelope.decrypt_text('eq_a', email_det, 'eq_user.email'), 'eq_user.email')
 WHERE tenant = 'eq_a' AND envelope.key_version(email_det) < envelope.equality_key_version('eq_a');
SELECT count(*) FILTER (WHERE envelope.key_version(email_det) = 3) AS on_v3,
       count(*) FILTER (WHERE envelope.key_version(email_det) = 1) AS on_v1
  FROM eq_user WHERE tenant = 'eq_a';
-- then a second row with the same value violates the unique index again.
INSERT INTO eq_user VALUES (1001, 'eq_a', envelope.blind_index('eq_a', 'user42@example.com'),
                            envelope.encrypt_deterministic('eq_a', 'user42@example.com', 'eq_user.email'));
INSERT INTO eq_user VALUES (1002, 'eq_a', envelope.blind_index('eq_a', 'new@example.com'),
                            envelope.encrypt_deterministic('eq_a', 'new@example.com', 'eq_user.email'));
\set VERBOSITY default

-- Retiring a version ends its tokens: version 1 retired, *_all gives version 3 only;
-- the equality version retired, new tokens fail until it is back (or rotated).
SELECT envelope.retire_key_version('eq_a', 1, false);
SELECT array_length(envelope.blind_index_all('eq_a', 'alice'), 1) AS n_after_retire,
       octet_length((envelope.blind_index_all('eq_a', 'alice'))[1]) AS len;
SELECT envelope.reactivate_key_version('eq_a', 1);
SELECT array_length(envelope.blind_index_all('eq_a', 'alice'), 1) AS n_after_reactivate;
SELECT envelope.rotate_tenant_key('eq_a') AS dek_version;
SELECT envelope.equality_key_version('eq_a') AS eq_version;
SELECT envelope.retire_key_version('eq_a', 3, false);
SELECT envelope.blind_index('eq_a', 'alice');
SELECT envelope.encrypt_deterministic_all('eq_a', 'alice');
SELECT envelope.reactivate_key_version('eq_a', 3);
SELECT octet_length(envelope.blind_index('eq_a', 'alice')) AS len_after_reactivate;

-- A rotation in the same transaction is seen by the next statement, and a rollback
-- undoes it.
BEGIN;
SELECT envelope.rotate_equality_key('eq_b') AS eq_b_version;
SELECT octet_length(envelope.blind_index('eq_b', 'x')) AS len_in_xact,
       array_length(envelope.blind_index_all('eq_b', 'x'), 1) AS n_in_xact;
ROLLBACK;
SELECT envelope.equality_key_version('eq_b') AS eq_b_after_rollback,
       octet_length(envelope.blind_index('eq_b', 'x')) AS len_after_rollback;

-- Errors.
SELECT envelope.rotate_equality_key(NULL);
SELECT envelope.rotate_equality_key('eq_nobody');
SELECT envelope.blind_index_all('eq_nobody', 'x');
SELECT envelope.equality_key_version('eq_nobody');
SELECT envelope.blind_index_all(NULL, 'x') IS NULL AS null_tenant,
       envelope.encrypt_deterministic_all('eq_a', NULL::text) IS NULL AS null_value;
SELECT envelope.disable_tenant('eq_b');
SELECT envelope.rotate_equality_key('eq_b');
SELECT envelope.blind_index_all('eq_b', 'x');
SELECT envelope.enable_tenant('eq_b');
SELECT envelope.create_tenant('eq_gone');
SELECT envelope.destroy_tenant('eq_gone', 'eq_gone');
SELECT envelope.blind_index('eq_gone', 'x');
SELECT envelope.encrypt_deterministic_all('eq_gone', 'x');

DROP TABLE eq_user;

-- Online re-keying: reencrypt moves deterministic values onto the equality version
-- (and randomized ones onto the active DEK version), in committed batches.
CREATE TABLE eq_rk (id int PRIMARY KEY, tenant text NOT NULL, email bytea NOT NULL,
                    UNIQUE (tenant, email));
INSERT INTO eq_rk
SELECT i, t, envelope.encrypt_deterministic(t, 'u' || i, 'eq_rk.email')
  FROM generate_series(1, 40) i, LATERAL (SELECT CASE WHEN i % 2 = 0 THEN 'eq_a' ELSE 'eq_b' END) s(t);
INSERT INTO eq_rk VALUES (41, 'eq_b', envelope.encrypt('eq_b', 'randomized', 'eq_rk.email'));
SELECT envelope.rotate_equality_key('eq_b') AS eq_b_version;
SELECT envelope.needs_reencryption((envelope.encrypt_deterministic_all('eq_b', 'u7', 'eq_rk.email'))[2], 'eq_b') AS old_needs,
       envelope.needs_reencryption(envelope.encrypt_deterministic('eq_b', 'u7', 'eq_rk.email'), 'eq_b') AS new_needs,
       envelope.needs_reencryption('\x0102'::bytea, 'eq_b') AS stray_needs;
SELECT tenant, envelope.key_version(email) AS version, get_byte(email, 0) AS format, count(*)
  FROM eq_rk GROUP BY 1, 2, 3 ORDER BY 1, 2, 3;
SELECT id FROM eq_rk
 WHERE tenant = 'eq_b' AND email = ANY (envelope.encrypt_deterministic_all('eq_b', 'u7', 'eq_rk.email'));
SET client_min_messages = warning;
CALL envelope.reencrypt('eq_rk', 'email', 'tenant', 8, 'eq_rk.email');
RESET client_min_messages;
SELECT tenant, envelope.key_version(email) AS version, get_byte(email, 0) AS format, count(*)
  FROM eq_rk GROUP BY 1, 2, 3 ORDER BY 1, 2, 3;
SELECT id, envelope.decrypt_text(tenant, email, 'eq_rk.email') AS plain FROM eq_rk
 WHERE tenant = 'eq_b' AND email = ANY (envelope.encrypt_deterministic_all('eq_b', 'u7', 'eq_rk.email'));
SELECT id FROM eq_rk
 WHERE tenant = 'eq_b' AND email = envelope.encrypt_deterministic('eq_b', 'u7', 'eq_rk.email');
SELECT count(*) AS all_decrypt FROM eq_rk
 WHERE envelope.decrypt_text(tenant, email, 'eq_rk.email') IS NOT NULL;
-- Once re-keyed, the unique constraint holds against new rows again.
\set VERBOSITY terse
INSERT INTO eq_rk VALUES (100, 'eq_b', envelope.encrypt_deterministic('eq_b', 'u7', 'eq_rk.email'));
\set VERBOSITY default
-- A deterministic value re-encrypted by hand: onto the equality version, same plaintext.
SELECT envelope.key_version(envelope.reencrypt_value('eq_b', (envelope.encrypt_deterministic_all('eq_b', 'z', 'c'))[2], 'c')) AS moved_to,
       envelope.decrypt_text('eq_b', envelope.reencrypt_value('eq_b', (envelope.encrypt_deterministic_all('eq_b', 'z', 'c'))[2], 'c'), 'c') AS plain;
DROP TABLE eq_rk;
