# 044_fleet_concurrency.pl — reencrypt_all beside live traffic, and its interruptions.
#
# With the local provider: a session that updates 10 % of the rows (half of them a new
# encrypted value, half only another column) while reencrypt_all runs loses none of
# its updates; a second reencrypt_all is refused while one runs; statement_timeout and
# pg_terminate_backend stop a run that the next call resumes; the throttle holds the
# rate down.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);
use EnvelopeLocal qw(new_master_key local_node);
use EnvelopeFleet qw(start_sql finish_sql wait_for);
use EnvelopeKms;

my ($keyfile) = new_master_key();
my $node = local_node('fleet_concurrency', $keyfile);
$node->start;

sub sql { return $node->safe_psql('postgres', $_[0]); }

my $rows = 20000;
sql("CREATE EXTENSION pg_envelope");
sql("SELECT count(envelope.create_tenant('t' || i)) FROM generate_series(1, 20) i");
sql(    "CREATE TABLE account (id integer PRIMARY KEY, tenant text NOT NULL, plain text NOT NULL, "
	  . "secret bytea, other integer NOT NULL DEFAULT 0, updates integer NOT NULL DEFAULT 0) "
	  # room in every page: updates stay in their block (HOT), so reencrypt_all meets
	  # the updated rows where it scans, while they are being updated
	  . "WITH (fillfactor = 50)");
sql(    "INSERT INTO account (id, tenant, plain, secret) SELECT i, 't' || (i % 20 + 1), 'value ' || i, "
	  . "envelope.encrypt('t' || (i % 20 + 1), 'value ' || i, 'account.secret') "
	  . "FROM generate_series(1, $rows) i");
sql("VACUUM ANALYZE account");
sql("SELECT envelope.register_column('account', 'secret', 'tenant', 'account.secret')");

sub all_decrypt
{
	return sql("SELECT count(*) FROM account "
		  . "WHERE envelope.decrypt_text(tenant, secret, 'account.secret') = plain");
}

sub on_active
{
	return sql("SELECT count(*) FROM account "
		  . "WHERE envelope.key_version(secret) = envelope.active_key_version(tenant)");
}

# ---------------------------------------------------------------------------
# 10 % of the rows updated, one transaction each, while reencrypt_all runs.
sql("CALL envelope.rotate_keys(older_than => '0')");
my $reenc = start_sql($node, "CALL envelope.reencrypt_all(2000, 6000)");
ok( wait_for(
		$node,
		"SELECT coalesce(bool_or(state = 'running'), false) FROM envelope.rotation_progress "
		  . "WHERE procedure = 'reencrypt_all'"),
	'reencrypt_all is running');
my $updater = start_sql(
	$node, q{
CREATE TABLE updater_log (first_update timestamptz, last_update timestamptz,
                          new_values integer, other_updates integer);
-- every update that put a row in another block, with how far reencrypt_all had come
CREATE TABLE updater_moves (id integer, new_block bigint, done_then bigint);
-- passes over the same 10 % of the rows, one row per transaction, for as long as
-- reencrypt_all runs
DO $$
DECLARE
    r record;
    started timestamptz := clock_timestamp();
    new_values integer := 0;
    other_updates integer := 0;
    block_before bigint;
    block_after bigint;
    passes integer := 0;
BEGIN
    LOOP
        FOR r IN SELECT id FROM account WHERE id % 10 = 3 ORDER BY md5(id::text || passes) LOOP
            SELECT (ctid::text::point)[0] INTO block_before FROM account WHERE id = r.id;
            IF r.id % 20 = 3 THEN
                UPDATE account
                   SET plain = plain || '+',
                       secret = envelope.encrypt(tenant, plain || '+', 'account.secret'),
                       updates = updates + 1
                 WHERE id = r.id
                RETURNING (ctid::text::point)[0] INTO block_after;
                new_values := new_values + 1;
            ELSE
                UPDATE account SET other = other + 1, updates = updates + 1 WHERE id = r.id
                RETURNING (ctid::text::point)[0] INTO block_after;
                other_updates := other_updates + 1;
            END IF;
            IF block_after <> block_before THEN
                -- read after the update: the run may have gone further since
                INSERT INTO updater_moves
                SELECT r.id, block_after, max(t.done)
                  FROM envelope.rotation_task t JOIN envelope.rotation_run x USING (run_id)
                 WHERE x.procedure = 'reencrypt_all' AND x.finished_at IS NULL;
            END IF;
            COMMIT;
        END LOOP;
        passes := passes + 1;
        EXIT WHEN passes >= 100 OR NOT EXISTS (
            SELECT FROM envelope.rotation_progress
             WHERE procedure = 'reencrypt_all' AND state = 'running');
    END LOOP;
    INSERT INTO updater_log VALUES (started, clock_timestamp(), new_values, other_updates);
    COMMIT;
END
$$;
});
my ($ret, $out, $err) = finish_sql($updater);
is($ret, 0, 'the updater finished') or diag($err);
($ret, $out, $err) = finish_sql($reenc);
is($ret, 0, 'reencrypt_all finished') or diag($err);

is( sql("SELECT u.first_update < t.finished_at AND u.last_update > t.started_at "
		  . "FROM updater_log u, envelope.rotation_progress t WHERE t.procedure = 'reencrypt_all'"),
	't', 'the updates ran while reencrypt_all did');
my ($new_values, $other_updates) = split /\|/, sql("SELECT new_values, other_updates FROM updater_log");
note("concurrent updates: $new_values new values, $other_updates of another column");
is(sql("SELECT sum(updates) FROM account"), $new_values + $other_updates,
	'every update is there (10 % of the rows, updated again and again)');
is(sql("SELECT sum(length(plain) - length(rtrim(plain, '+'))) FROM account"), $new_values,
	'every new value is there');
is(sql("SELECT sum(other) FROM account"), $other_updates, 'every update of another column is there');
is(all_decrypt(), $rows, 'every value decrypts to its row\'s plaintext');
my $left = $rows - on_active();
note("values a concurrent update moved behind the scan: $left");
# A row an update leaves in its block is met by the scan there, or was re-encrypted
# before the update copied its value: only an update that moves a row into a block the
# scan has passed (or may be passing: the batch in flight, up to two batches' worth of
# blocks past the committed progress), or past the blocks its last pass covers, can
# leave a value behind.  A run that passed over rows it did not write itself (another
# session's xmin) leaves others behind too.
is( sql("SELECT count(*) FROM account a, envelope.rotation_task t, pg_class c "
		  . "WHERE t.relation = 'account'::regclass AND c.oid = t.relation "
		  . "  AND envelope.key_version(a.secret) <> envelope.active_key_version(a.tenant) "
		  . "  AND NOT EXISTS (SELECT FROM updater_moves m WHERE m.id = a.id "
		  . "        AND (m.done_then IS NULL OR m.new_block >= t.total "
		  . "             OR m.new_block < m.done_then + 2 * ceil(2000 / (c.reltuples / c.relpages))))"),
	'0', 'the first run leaves no value behind but in rows an update moved behind its scan');
sql("CALL envelope.reencrypt_all()");
is(on_active(), $rows, 'after a second run every value is under the active version');

# ---------------------------------------------------------------------------
# One run at a time; pg_terminate_backend stops it and the next call resumes it.
sql("CALL envelope.rotate_keys(older_than => '0')");
$reenc = start_sql($node, "CALL envelope.reencrypt_all(500, 4000)");
ok( wait_for(
		$node,
		"SELECT coalesce(bool_or(state = 'running' AND values_moved > 0), false) "
		  . "FROM envelope.rotation_progress WHERE procedure = 'reencrypt_all'"),
	'reencrypt_all is running again');
my ($state, $msg) = EnvelopeKms::psql_error($node, "CALL envelope.reencrypt_all()");
is($state, '55006', 'a second reencrypt_all is refused while one runs');
like($msg, qr/envelope\.reencrypt_all is already running/, 'with a message that says so');
sql("SELECT pg_terminate_backend(backend_pid) FROM envelope.rotation_run "
	  . "WHERE procedure = 'reencrypt_all' AND finished_at IS NULL");
($ret, $out, $err) = finish_sql($reenc);
like($err, qr/terminating connection/, 'pg_terminate_backend stopped it');
is( sql("SELECT state FROM envelope.rotation_progress WHERE procedure = 'reencrypt_all' "
		  . "ORDER BY run_id DESC LIMIT 1"),
	'interrupted', 'the progress shows it interrupted');
my $moved = on_active();
ok($moved > 0 && $moved < $rows, "its committed batches are kept ($moved values)");
($ret, $out, $err) = $node->psql('postgres', "CALL envelope.reencrypt_all(2000)");
like($err, qr/resuming run/, 'the next call resumes it');
is(on_active() . ' ' . all_decrypt(), "$rows $rows", 'and finishes: every value moved and decrypts');

# ---------------------------------------------------------------------------
# statement_timeout, then a rerun in the same session.
sql("CALL envelope.rotate_keys(older_than => '0')");
($ret, $out, $err) = $node->psql(
	'postgres', q{
SET statement_timeout = '1s';
CALL envelope.reencrypt_all(500, 3000);
RESET statement_timeout;
SELECT state FROM envelope.rotation_progress WHERE procedure = 'reencrypt_all' ORDER BY run_id DESC LIMIT 1;
CALL envelope.reencrypt_all(2000);
}, on_error_stop => 0);
like($err, qr/canceling statement due to statement timeout/, 'statement_timeout stopped the run');
is($out, 'interrupted', 'the progress shows it interrupted');
like($err, qr/resuming run/, 'the same session resumes it');
is(on_active() . ' ' . all_decrypt(), "$rows $rows", 'and finishes: every value moved and decrypts');

# ---------------------------------------------------------------------------
# The throttle: 6,000 values at 3,000 a second take two seconds at least.
sql("SELECT envelope.rotate_tenant_key('t' || i) FROM generate_series(1, 6) i");
my $to_move = $rows - on_active();
my $t0 = time();
sql("CALL envelope.reencrypt_all(500, 3000)");
my $elapsed = time() - $t0;
ok($elapsed >= 0.9 * $to_move / 3000,
	sprintf('max_rows_per_second holds the rate down (%d values in %.1f s)', $to_move, $elapsed));
is(on_active(), $rows, 'and the run completes');

# ---------------------------------------------------------------------------
# A registered blind-index column recomputed from its source after an equality key
# rotation, while a session changes 10 % of the sources (and their indexes) again and
# again: every index ends up equal to the blind index of its row's current plaintext.
sql("ALTER TABLE account ADD COLUMN secret_idx bytea");
sql("UPDATE account SET secret_idx = envelope.blind_index(tenant, plain)");
sql("SELECT envelope.register_blind_index('account', 'secret_idx', 'secret')");
sql("SELECT count(envelope.rotate_equality_key('t' || i)) FROM generate_series(1, 20) i");
$reenc = start_sql($node, "CALL envelope.reencrypt_all(2000, 6000)");
ok( wait_for(
		$node,
		"SELECT coalesce(bool_or(state = 'running'), false) FROM envelope.rotation_progress "
		  . "WHERE procedure = 'reencrypt_all'"),
	'reencrypt_all is running with a blind-index column');
$updater = start_sql(
	$node, q{
DO $$
DECLARE
    r record;
    changed integer := 0;
BEGIN
    LOOP
        FOR r IN SELECT id FROM account WHERE id % 10 = 7 ORDER BY md5(id::text || changed) LOOP
            UPDATE account
               SET plain = plain || '*',
                   secret = envelope.encrypt(tenant, plain || '*', 'account.secret'),
                   secret_idx = envelope.blind_index(tenant, plain || '*')
             WHERE id = r.id;
            changed := changed + 1;
            COMMIT;
        END LOOP;
        EXIT WHEN changed >= 100000 OR NOT EXISTS (
            SELECT FROM envelope.rotation_progress
             WHERE procedure = 'reencrypt_all' AND state = 'running');
    END LOOP;
END
$$;
});
($ret, $out, $err) = finish_sql($updater);
is($ret, 0, 'the source updater finished') or diag($err);
($ret, $out, $err) = finish_sql($reenc);
is($ret, 0, 'reencrypt_all finished') or diag($err);
sql("CALL envelope.reencrypt_all()");
is( sql("SELECT count(*) FROM account WHERE secret_idx = envelope.blind_index(tenant, plain)"),
	$rows, 'every blind index is the index of its row\'s current plaintext, under the new version');
is(sql("SELECT count(*) FROM account WHERE octet_length(secret_idx) = 36"),
	$rows, 'and every one carries the new equality version');
is(all_decrypt(), $rows, 'every value still decrypts to its row\'s plaintext');

$node->stop;
done_testing();
