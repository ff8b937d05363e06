-- Every bad input gets one clear error with its SQLSTATE, and nothing of the value.
\set VERBOSITY default
\set SHOW_CONTEXT never
\getenv keydir ENVELOPE_TEST_DIR
CREATE TEMP TABLE ct AS
SELECT envelope.encrypt('acme', 'attack at dawn') AS v,
       envelope.encrypt('acme', 'attack at dawn', 'orders.note') AS v_ctx;

-- Wrong tenant.
SELECT envelope.decrypt_text('globex', v) FROM ct;
\echo :LAST_ERROR_SQLSTATE
-- Wrong, missing, added and empty-vs-absent context.
SELECT envelope.decrypt_text('acme', v_ctx, 'orders.other') FROM ct;
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.decrypt_text('acme', v_ctx) FROM ct;
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.decrypt_text('acme', v, 'orders.note') FROM ct;
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.decrypt_text('acme', v, '') FROM ct;
\echo :LAST_ERROR_SQLSTATE

-- Tampering anywhere: header, nonce, body, tag.  Each byte position, every time the
-- same error.
DO $$
DECLARE
    c bytea;
    tampered bytea;
    outcomes text[] := '{}';
    state text;
BEGIN
    SELECT v INTO c FROM ct;
    FOR i IN 0 .. octet_length(c) - 1 LOOP
        CONTINUE WHEN i BETWEEN 1 AND 4;   -- the version bytes: see below
        tampered := set_byte(c, i, get_byte(c, i) # 1);
        BEGIN
            PERFORM envelope.decrypt('acme', tampered);
            state := 'ACCEPTED';
        EXCEPTION WHEN OTHERS THEN
            state := SQLSTATE;
        END;
        IF NOT state = ANY (outcomes) THEN
            outcomes := outcomes || state;
        END IF;
    END LOOP;
    RAISE NOTICE 'outcomes of single-bit flips: %', outcomes;
END
$$;

-- Truncated, empty, or not ours at all.
SELECT envelope.decrypt_text('acme', substr(v, 1, octet_length(v) - 1)) FROM ct;
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.decrypt_text('acme', substr(v, 1, 20)) FROM ct;
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.decrypt_text('acme', '\x');
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.decrypt_text('acme', '\x7f000000010102030405060708090a0b0c0d0e0f101112131415161718191a1b1c');
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.key_version('\x0001');
\echo :LAST_ERROR_SQLSTATE

-- Unknown key version (a header rewritten to version 9), and version 0.
SELECT envelope.decrypt_text('acme', overlay(v placing '\x00000009'::bytea from 2 for 4)) FROM ct;
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.decrypt_text('acme', overlay(v placing '\x00000000'::bytea from 2 for 4)) FROM ct;
\echo :LAST_ERROR_SQLSTATE

-- Unknown tenant.
SELECT envelope.encrypt('nobody', 'x');
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.decrypt('nobody', v) FROM ct;
\echo :LAST_ERROR_SQLSTATE

-- Hostile tenant names.
SELECT envelope.encrypt('', 'x');
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.encrypt(repeat('a', 256), 'x');
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.encrypt(E'ac\nme', 'x');
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.create_tenant(E'tab\there');
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.create_tenant(NULL);
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.create_tenant('acme');
\echo :LAST_ERROR_SQLSTATE
SELECT envelope.create_tenant(repeat('é', 127));   -- 254 bytes: allowed

-- A value encrypted from bytea that is not text.
SELECT envelope.decrypt_text('acme', envelope.encrypt('acme', '\xff00'::bytea));
\echo :LAST_ERROR_SQLSTATE

-- An unknown provider is refused by the setting itself.
SET envelope.kms_provider = 'vault';
\echo :LAST_ERROR_SQLSTATE

-- Bad master key files.  Each case starts from an empty cache, so the file is read.
CREATE FUNCTION try_decrypt_detail(keyfile text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    detail text;
BEGIN
    PERFORM set_config('envelope.local_master_key_file', keyfile, false);
    PERFORM envelope.cache_flush();
    PERFORM envelope.decrypt_text('acme', v) FROM ct;
    RETURN 'decrypted';
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS detail = PG_EXCEPTION_DETAIL;
    RETURN SQLSTATE || ': ' || regexp_replace(replace(SQLERRM || ' | ' || coalesce(detail, ''),
           keyfile, '<file>'), 'local:[0-9a-f]{16}', 'local:<id>', 'g');
END
$$;
SELECT try_decrypt_detail(:'keydir' || '/open.key') AS group_readable;
SELECT try_decrypt_detail(:'keydir' || '/short.key') AS wrong_length;
SELECT try_decrypt_detail(:'keydir' || '/missing.key') AS missing;
SELECT try_decrypt_detail('relative/path.key') AS relative;
SELECT try_decrypt_detail(:'keydir') AS a_directory;
SELECT try_decrypt_detail(current_setting('data_directory') || '/postgresql.conf') AS inside_pgdata;
SELECT try_decrypt_detail(:'keydir' || '/other.key') AS other_master_key;
SELECT try_decrypt_detail('') AS unset;
SELECT try_decrypt_detail(:'keydir' || '/master.key') AS the_right_key;
RESET envelope.local_master_key_file;
DROP FUNCTION try_decrypt_detail(text);


-- A wrapped DEK that does not unwrap: the KMS binds tenant and version, so a wrapped
-- key moved to another tenant (by hand, or by a restore gone wrong) is refused as
-- corrupted, XX001, and nothing decrypts under it.
SELECT envelope.create_tenant('moved_from') IS NOT NULL AS created,
       envelope.create_tenant('moved_to') IS NOT NULL AS created;
CREATE TEMP TABLE saved_key AS
SELECT wrapped_dek FROM envelope.data_key WHERE tenant = 'moved_to';
UPDATE envelope.data_key SET wrapped_dek = (SELECT wrapped_dek FROM envelope.data_key
                                             WHERE tenant = 'moved_from')
 WHERE tenant = 'moved_to';
SELECT envelope.encrypt('moved_to', 'x') IS NOT NULL AS encrypted;
\echo :LAST_ERROR_SQLSTATE
UPDATE envelope.data_key SET wrapped_dek = (SELECT wrapped_dek FROM saved_key)
 WHERE tenant = 'moved_to';
SELECT envelope.decrypt_text('moved_to', envelope.encrypt('moved_to', 'restored')) AS restored;
