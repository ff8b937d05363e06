-- Round trips and the ciphertext format.
SELECT envelope.decrypt_text('acme', envelope.encrypt('acme', 'hello world'));
SELECT envelope.decrypt('acme', envelope.encrypt('acme', '\x00ff10'::bytea));
SELECT envelope.decrypt_text('acme', envelope.encrypt('acme', ''));

-- 33 bytes of overhead: format byte, version, nonce, tag.
SELECT octet_length(envelope.encrypt('acme', 'hello')) - octet_length('hello') AS overhead;
SELECT get_byte(envelope.encrypt('acme', 'x'), 0) AS format_byte,
       envelope.key_version(envelope.encrypt('acme', 'x')) AS version;

-- A fresh nonce for every value: equal plaintexts never give equal ciphertexts.
SELECT count(DISTINCT c) AS distinct_ciphertexts, count(DISTINCT substr(c, 6, 12)) AS distinct_nonces
  FROM (SELECT envelope.encrypt('acme', 'same') AS c FROM generate_series(1, 2000)) s;

-- The plaintext does not appear in the ciphertext.
SELECT position(convert_to('secret-value', 'UTF8') IN envelope.encrypt('acme', 'secret-value')) AS found_at;

-- NULL in, NULL out; a NULL context means "no context".
SELECT envelope.encrypt(NULL, 'x') IS NULL AS null_tenant,
       envelope.encrypt('acme', NULL::text) IS NULL AS null_text,
       envelope.encrypt('acme', NULL::bytea) IS NULL AS null_bytea,
       envelope.decrypt('acme', NULL) IS NULL AS null_ciphertext,
       envelope.decrypt_text(NULL, '\x00') IS NULL AS null_tenant_decrypt,
       envelope.key_version(NULL) IS NULL AS null_version;
SELECT envelope.decrypt_text('acme', envelope.encrypt('acme', 'x', NULL)) AS null_context;

-- Contexts: the same context decrypts.
SELECT envelope.decrypt_text('acme', envelope.encrypt('acme', 'a@example.com', 'users.email'), 'users.email');
SELECT envelope.decrypt_text('acme', envelope.encrypt('acme', 'v', ''), '') AS empty_context;

-- Non-ASCII values and tenant names, and names that look like SQL.
SELECT envelope.create_tenant('租户-ünïcødé');
SELECT envelope.decrypt_text('租户-ünïcødé', envelope.encrypt('租户-ünïcødé', 'données 🔐'));
SELECT envelope.create_tenant($$x'); DROP TABLE envelope.tenant; --$$);
SELECT envelope.decrypt_text($$x'); DROP TABLE envelope.tenant; --$$,
       envelope.encrypt($$x'); DROP TABLE envelope.tenant; --$$, 'still here'));
SELECT count(*) AS tenants FROM envelope.tenant;

-- Large values.
SELECT md5(envelope.decrypt_text('acme', envelope.encrypt('acme', repeat('0123456789', 5000000))))
     = md5(repeat('0123456789', 5000000)) AS fifty_mb_round_trip;

-- A table of rows for two tenants.
CREATE TABLE customer (id int PRIMARY KEY, tenant text NOT NULL, email bytea NOT NULL);
INSERT INTO customer
SELECT i, CASE WHEN i % 2 = 0 THEN 'acme' ELSE 'globex' END,
       envelope.encrypt(CASE WHEN i % 2 = 0 THEN 'acme' ELSE 'globex' END,
                        'user' || i || '@example.com', 'customer.email')
  FROM generate_series(1, 1000) i;
SELECT count(*) FILTER (WHERE envelope.decrypt_text(tenant, email, 'customer.email') = 'user' || id || '@example.com') AS decrypted_ok
  FROM customer;
SELECT id, tenant, envelope.decrypt_text(tenant, email, 'customer.email') AS email
  FROM customer WHERE id <= 4 ORDER BY id;
