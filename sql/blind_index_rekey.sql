-- Stored blind indexes: registered with the encrypted column they are made from, and
-- recomputed from it by reencrypt_all and reencrypt when the equality key rotates.
\set VERBOSITY default
\set SHOW_CONTEXT never
SELECT envelope.create_tenant('bi_a');
SELECT envelope.create_tenant('bi_b');
CREATE TABLE bi_user (id int PRIMARY KEY, org text NOT NULL, email bytea, email_idx bytea,
                      note bytea);
CREATE INDEX bi_user_email_idx ON bi_user (email_idx);
INSERT INTO bi_user
SELECT i, t, envelope.encrypt(t, 'user' || i || '@example.com', 'bi_user.email'),
       envelope.blind_index(t, 'user' || i || '@example.com'), NULL
  FROM generate_series(1, 120) i, LATERAL (SELECT CASE WHEN i % 2 = 0 THEN 'bi_a' ELSE 'bi_b' END) s(t);
-- A row with no email: nothing to recompute, and nothing is invented.
INSERT INTO bi_user VALUES (500, 'bi_a', NULL, NULL, NULL);

-- Registration: the blind index names its source, which must be registered first.
SELECT envelope.register_blind_index('bi_user', 'email_idx', 'email');
SELECT envelope.register_column('bi_user', 'email', 'org', 'bi_user.email');
SELECT envelope.register_blind_index('bi_user', 'email_idx', 'email');
SELECT * FROM envelope.blind_index_columns;
SELECT objname, label FROM pg_seclabels WHERE provider = 'pg_envelope' ORDER BY objname;
SELECT action, detail FROM envelope.audit_log ORDER BY id DESC LIMIT 1;

-- Mistakes are refused.
SELECT envelope.register_blind_index('bi_user', 'email_idx', 'email_idx');
SELECT envelope.register_blind_index('bi_user', 'email', 'email_idx');
SELECT envelope.register_blind_index('bi_user', 'org', 'email');
SELECT envelope.register_blind_index('bi_user', 'nope', 'email');
SELECT envelope.register_blind_index('bi_user', 'email_idx', NULL);
SELECT envelope.register_column('bi_user', 'email_idx', 'org');
SELECT envelope.unregister_column('bi_user', 'email');

-- Owning a table is not enough to register its columns: a label written by hand
-- needs envelope_admin too (the fleet procedures act on every registration with an
-- admin's access to every tenant).
CREATE ROLE bi_owner;
GRANT envelope_user TO bi_owner;
CREATE TABLE bi_owned (org text, src bytea, idx bytea);
ALTER TABLE bi_owned OWNER TO bi_owner;
SELECT envelope.register_column('bi_owned', 'src', 'org');
SET ROLE bi_owner;
SECURITY LABEL FOR pg_envelope ON COLUMN bi_owned.idx IS '{"role": "blind_index", "source": "src"}';
SECURITY LABEL FOR pg_envelope ON COLUMN bi_owned.src IS NULL;
RESET ROLE;
SELECT count(*) AS labels_kept FROM pg_seclabels WHERE objname LIKE 'bi_owned.%';
DROP TABLE bi_owned;
DROP ROLE bi_owner;

-- Re-registering the source (another context) keeps the blind index's reference.
SELECT envelope.register_column('bi_user', 'email', 'org', 'bi_user.email');
SELECT column_name, source_column, tenant_column, context FROM envelope.blind_index_columns;

-- Rotate bi_a's equality key: its stored indexes are now stale, bi_b's are not.
SELECT envelope.rotate_equality_key('bi_a') AS bi_a_eq_version;
SELECT org, envelope.blind_index_needs_recompute(email_idx, org) AS stale, count(*)
  FROM bi_user WHERE email_idx IS NOT NULL GROUP BY 1, 2 ORDER BY 1, 2;
SELECT envelope.blind_index_needs_recompute('\x0102'::bytea, 'bi_a') AS stray;
-- The recomputed index is the blind index of the decrypted source.
SELECT envelope.blind_index_recompute(org, email, 'bi_user.email')
         = envelope.blind_index(org, envelope.decrypt_text(org, email, 'bi_user.email')) AS same,
       octet_length(envelope.blind_index_recompute(org, email, 'bi_user.email')) AS len
  FROM bi_user WHERE id = 2;
-- Lookups span the rotation meanwhile.
SELECT id FROM bi_user
 WHERE org = 'bi_a' AND email_idx = ANY (envelope.blind_index_all('bi_a', 'user8@example.com'));

-- reencrypt_all recomputes the stale ones from the source column.
SET client_min_messages = warning;
CALL envelope.reencrypt_all(batch_size => 16);
RESET client_min_messages;
SELECT org, octet_length(email_idx) AS len, count(*)
  FROM bi_user WHERE email_idx IS NOT NULL GROUP BY 1, 2 ORDER BY 1, 2;
SELECT count(*) AS wrong FROM bi_user
 WHERE email IS NOT NULL
   AND email_idx IS DISTINCT FROM envelope.blind_index(org, envelope.decrypt_text(org, email, 'bi_user.email'));
SELECT id, email_idx IS NULL AS still_null FROM bi_user WHERE id = 500;
SELECT id FROM bi_user
 WHERE org = 'bi_a' AND email_idx = envelope.blind_index('bi_a', 'user8@example.com');
SELECT column_name, values_moved FROM envelope.rotation_progress
 WHERE procedure = 'reencrypt_all' ORDER BY run_id DESC, column_name LIMIT 2;

-- Renames keep the registration; reencrypt of the source column brings its blind
-- index along.
ALTER TABLE bi_user RENAME COLUMN email TO mail;
ALTER TABLE bi_user RENAME COLUMN email_idx TO mail_idx;
SELECT column_name, source_column, tenant_column FROM envelope.blind_index_columns;
SELECT envelope.rotate_equality_key('bi_b') AS bi_b_eq_version;
SET client_min_messages = warning;
CALL envelope.reencrypt('bi_user', 'mail', 'org', 16, 'bi_user.email');
RESET client_min_messages;
SELECT org, octet_length(mail_idx) AS len, count(*)
  FROM bi_user WHERE mail_idx IS NOT NULL GROUP BY 1, 2 ORDER BY 1, 2;
SELECT count(*) AS wrong FROM bi_user
 WHERE mail IS NOT NULL
   AND mail_idx IS DISTINCT FROM envelope.blind_index(org, envelope.decrypt_text(org, mail, 'bi_user.email'));

-- A source value encrypted from bytes that are not text: the same refusal as
-- decrypt_text, and no byte of it in the message.
SELECT envelope.blind_index_recompute('bi_a', envelope.encrypt('bi_a', '\xff00fe'::bytea, 'c'), 'c');
-- A tampered source or the wrong context does not authenticate.
SELECT envelope.blind_index_recompute('bi_a', mail, 'other context') FROM bi_user WHERE id = 2;
-- NULLs.
SELECT envelope.blind_index_recompute('bi_a', NULL, 'c') IS NULL AS null_source,
       envelope.blind_index_recompute(NULL, mail, 'c') IS NULL AS null_tenant
  FROM bi_user WHERE id = 2;

-- Unregistering the blind index first lets the source go; dropping the source column
-- removes the source's registration and reencrypt_all skips the orphan.
SELECT envelope.unregister_column('bi_user', 'mail_idx');
SELECT count(*) AS blind_index_columns FROM envelope.blind_index_columns;
SELECT envelope.register_blind_index('bi_user', 'mail_idx', 'mail');
ALTER TABLE bi_user DROP COLUMN mail;
SELECT column_name, source_column FROM envelope.blind_index_columns;
SET client_min_messages = warning;
CALL envelope.reencrypt_all(batch_size => 1000);
RESET client_min_messages;
SELECT envelope.unregister_column('bi_user', 'mail_idx');
DROP TABLE bi_user;
