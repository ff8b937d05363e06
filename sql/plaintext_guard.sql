-- Decrypted values never reach the catalog without the user storing them on purpose.
\set VERBOSITY default
\set SHOW_CONTEXT never
CREATE TABLE guarded (tenant text, v bytea, n int);
INSERT INTO guarded
SELECT 'acme', envelope.encrypt('acme', 'value ' || (i % 7)), i FROM generate_series(1, 50) i;

-- Extended statistics over a decrypting expression: ANALYZE would keep plaintext
-- most-common values in pg_statistic_ext_data.  Refused, directly or nested, for
-- every decrypting function, and nothing is left behind.
CREATE STATISTICS guarded_plain ON (envelope.decrypt_text(tenant, v)) FROM guarded;
\echo :LAST_ERROR_SQLSTATE
CREATE STATISTICS guarded_bytes ON (envelope.decrypt(tenant, v)), n FROM guarded;
\echo :LAST_ERROR_SQLSTATE
CREATE STATISTICS guarded_nested
    ON (lower(envelope.decrypt_text(tenant, v, NULL))), (n + 1) FROM guarded;
\echo :LAST_ERROR_SQLSTATE
SELECT count(*) AS statistics_objects FROM pg_statistic_ext
 WHERE stxrelid = 'guarded'::regclass;

-- Statistics that hold no plaintext are fine: columns, the ciphertext itself, a blind
-- index.
CREATE STATISTICS guarded_cols ON tenant, n FROM guarded;
CREATE STATISTICS guarded_ct ON (octet_length(v)), (envelope.blind_index(tenant, n::text)) FROM guarded;
ANALYZE guarded;
SELECT stxname FROM pg_statistic_ext WHERE stxrelid = 'guarded'::regclass ORDER BY 1;

-- The other places that evaluate an expression and keep its result ask for
-- IMMUTABLE functions, which decrypt never is.
CREATE INDEX ON guarded ((envelope.decrypt_text(tenant, v)));
\echo :LAST_ERROR_SQLSTATE
CREATE INDEX ON guarded (n) WHERE envelope.decrypt_text(tenant, v) = 'value 1';
\echo :LAST_ERROR_SQLSTATE
ALTER TABLE guarded ADD COLUMN plain text
    GENERATED ALWAYS AS (envelope.decrypt_text(tenant, v)) STORED;
\echo :LAST_ERROR_SQLSTATE

DROP TABLE guarded;
