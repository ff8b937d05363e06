-- Deterministic encryption and blind indexes: equality without decryption.
\set VERBOSITY default
\set SHOW_CONTEXT never
SELECT envelope.create_tenant('det');

-- Equal inputs give equal bytes; 22 bytes of overhead; decrypt reads them.
SELECT envelope.encrypt_deterministic('det', 'alice@example.com', 'users.email')
     = envelope.encrypt_deterministic('det', 'alice@example.com', 'users.email') AS equal;
SELECT octet_length(envelope.encrypt_deterministic('det', 'abc')) - 3 AS overhead,
       get_byte(envelope.encrypt_deterministic('det', 'abc'), 0) AS format_byte;
SELECT envelope.decrypt_text('det', envelope.encrypt_deterministic('det', 'alice@example.com', 'users.email'), 'users.email');
SELECT envelope.decrypt('det', envelope.encrypt_deterministic('det', '\x00ff'::bytea));
SELECT envelope.decrypt_text('det', envelope.encrypt_deterministic('det', ''));
SELECT envelope.encrypt_deterministic('det', 'x', 'a') <> envelope.encrypt_deterministic('det', 'x', 'b') AS context_matters,
       envelope.encrypt_deterministic('det', 'x') <> envelope.encrypt_deterministic('acme', 'x') AS tenant_matters,
       envelope.encrypt_deterministic(NULL, 'x') IS NULL AS null_tenant,
       envelope.encrypt_deterministic('det', NULL::text) IS NULL AS null_value;

-- A unique index and equality lookups on deterministic values.
CREATE TABLE det_user (id int, tenant text, email bytea,
                       UNIQUE (tenant, email));
INSERT INTO det_user VALUES
    (1, 'det', envelope.encrypt_deterministic('det', 'alice@example.com', 'det_user.email')),
    (2, 'det', envelope.encrypt_deterministic('det', 'bob@example.com', 'det_user.email'));
\set VERBOSITY terse
INSERT INTO det_user VALUES
    (3, 'det', envelope.encrypt_deterministic('det', 'alice@example.com', 'det_user.email'));
\set VERBOSITY default
SELECT id FROM det_user
 WHERE tenant = 'det' AND email = envelope.encrypt_deterministic('det', 'bob@example.com', 'det_user.email');

-- Tampering and the wrong tenant or context fail like randomized values.
SELECT envelope.decrypt_text('det', set_byte(email, 10, get_byte(email, 10) # 1), 'det_user.email')
  FROM det_user WHERE id = 1;
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.decrypt_text('acme', email, 'det_user.email') FROM det_user WHERE id = 1;
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.decrypt_text('det', email) FROM det_user WHERE id = 1;
\echo :LAST_ERROR_SQLSTATE

-- Blind indexes: 32 bytes, stable, per tenant.
SELECT octet_length(envelope.blind_index('det', 'alice')) AS index_len,
       envelope.blind_index('det', 'alice') = envelope.blind_index('det', 'alice') AS stable,
       envelope.blind_index('det', 'alice') <> envelope.blind_index('det', 'alicf') AS value_matters,
       envelope.blind_index('det', 'alice') <> envelope.blind_index('acme', 'alice') AS tenant_matters,
       envelope.blind_index('det', NULL) IS NULL AS null_value;
CREATE TABLE det_ssn (tenant text, ssn bytea, ssn_index bytea);
CREATE INDEX ON det_ssn (tenant, ssn_index);
INSERT INTO det_ssn
SELECT 'det', envelope.encrypt('det', 'ssn-' || i), envelope.blind_index('det', 'ssn-' || i)
  FROM generate_series(1, 100) i;
SELECT envelope.decrypt_text(tenant, ssn) FROM det_ssn
 WHERE tenant = 'det' AND ssn_index = envelope.blind_index('det', 'ssn-42');

-- Rotation leaves equality intact: deterministic values and indexes use version 1.
CREATE TEMP TABLE before_rotation AS
SELECT envelope.encrypt_deterministic('det', 'carol') AS d, envelope.blind_index('det', 'carol') AS b;
SELECT envelope.rotate_tenant_key('det');
SELECT d = envelope.encrypt_deterministic('det', 'carol') AS same_value,
       b = envelope.blind_index('det', 'carol') AS same_index,
       envelope.key_version(d) AS version
  FROM before_rotation;

-- Retiring version 1 ends them, with a clear error.
SELECT envelope.retire_key_version('det', 1);
SELECT envelope.encrypt_deterministic('det', 'carol');
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.blind_index('det', 'carol');
\echo :LAST_ERROR_SQLSTATE
DROP TABLE det_user, det_ssn;
