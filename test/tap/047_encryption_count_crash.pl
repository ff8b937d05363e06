# Encryption counts survive a crash: the count stored for a DEK version is never lower
# than the values written under it.  Two sessions encrypt into one table in committed
# batches under one key, reserving blocks of counts from the same row, and a backend is
# killed with SIGKILL mid-batch, which makes the server crash and replay its WAL.  After
# the restart the stored count must be at least the number of committed rows, and new
# encryptions continue above it.  A standby replays the counts, and refuses to encrypt
# (it cannot write them).  A transaction that delivered a ciphertext and rolled back
# keeps its count through an immediate stop.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);
use EnvelopeLocal qw(new_master_key local_node);

my ($keyfile) = new_master_key();
my $node = local_node('count_crash', $keyfile, "checkpoint_timeout = '1h'\nmax_wal_size = '4GB'\nrestart_after_crash = on\n",
	allows_streaming => 1);
$node->start;
$node->safe_psql('postgres', q{
CREATE EXTENSION pg_envelope;
SELECT envelope.create_tenant('crash');
CREATE TABLE sealed (id bigserial, c bytea);
CHECKPOINT;
});

my $count_sql = q{SELECT encryptions FROM envelope.tenant_keys WHERE tenant = 'crash' AND version = 1};
is($node->safe_psql('postgres', $count_sql), '0', 'the key starts at 0, on disk since the checkpoint');

# Two writers, each a loop of committed batches of 97 rows.
my $loop = q{
DO $$
BEGIN
    FOR i IN 1 .. 100000 LOOP
        INSERT INTO sealed (c) SELECT envelope.encrypt('crash', 'value ' || g) FROM generate_series(1, 97) g;
        COMMIT;
    END LOOP;
END
$$;
};
my @writers;
my @pids;
for (1 .. 2)
{
	my $w = $node->background_psql('postgres', on_error_stop => 0);
	push @pids, $w->query_safe('SELECT pg_backend_pid()');
	$w->query_until(qr/started/, "\\echo started\n$loop");
	push @writers, $w;
}

my $rows = 0;
for (1 .. 600)
{
	$rows = $node->safe_psql('postgres', 'SELECT count(*) FROM sealed');
	last if $rows >= 300000;
	usleep(100_000);
}
ok($rows >= 300000, "the writers committed $rows rows before the crash");

kill 'KILL', $pids[0];
eval { $_->quit } for @writers;
$node->poll_query_until('postgres', 'SELECT 1', '1')
  or die 'server did not come back after the crash';

my $written = $node->safe_psql('postgres', 'SELECT count(*) FROM sealed');
my $stored = $node->safe_psql('postgres', $count_sql);
note("after the crash: $written committed rows, stored count $stored");
ok($written >= $rows, 'the committed rows survived the crash');
cmp_ok($stored, '>=', $written, 'the stored count is not lower than the values written');
# Each of the two writers held at most one block (65,536) unused when the crash came.
cmp_ok($stored - $written, '<=', 2 * 65536, 'and higher by at most one block per writer');

# Counting goes on above the stored figure.
$node->safe_psql('postgres',
	q{INSERT INTO sealed (c) SELECT envelope.encrypt('crash', 'after ' || g) FROM generate_series(1, 1000) g});
my $after = $node->safe_psql('postgres', $count_sql);
cmp_ok($after, '>=', $stored + 1000, 'encryptions after the restart are counted above it');
cmp_ok($after, '>=', $node->safe_psql('postgres', 'SELECT count(*) FROM sealed'), 'and still cover every row');

# ---- A standby: the counts replay there; it refuses to encrypt.
$node->backup('b');
my $standby = PostgreSQL::Test::Cluster->new('count_standby');
$standby->init_from_backup($node, 'b', has_streaming => 1);
$standby->start;
$node->safe_psql('postgres', q{SELECT count(envelope.encrypt('crash', 'more')) FROM generate_series(1, 100)});
$node->wait_for_catchup($standby, 'replay');
is($standby->safe_psql('postgres', $count_sql), $node->safe_psql('postgres', $count_sql),
	'the standby shows the primary\'s count (replayed)');
my ($ret, $out, $err) = $standby->psql('postgres', q{SELECT envelope.encrypt('crash', 'x')});
like($err, qr/cannot encrypt on a standby/, 'a standby refuses to encrypt');
my $decrypted = q{SELECT count(*) FROM sealed WHERE envelope.decrypt_text('crash', c) LIKE 'value %'};
is($standby->safe_psql('postgres', $decrypted), $node->safe_psql('postgres', $decrypted),
	'and decrypts');
$standby->stop;

# ---- A transaction that returned a ciphertext and rolled back: its reservation is
# flushed at the abort, so an immediate stop right after it loses no count (the next
# backend must not hand the same counts out again).
$node->safe_psql('postgres', q{SELECT envelope.create_tenant('aborted'); CHECKPOINT});
my $aborted_sql = q{SELECT encryptions FROM envelope.tenant_keys WHERE tenant = 'aborted' AND version = 1};
my $delivered = $node->safe_psql('postgres', q{
BEGIN;
SELECT count(envelope.encrypt('aborted', 'hello'));
ROLLBACK;
});
is($delivered, '1', 'a rolled-back transaction returned one ciphertext');
$node->stop('immediate');
$node->start;
cmp_ok($node->safe_psql('postgres', $aborted_sql), '>=', 1,
	'after an immediate stop the stored count covers the ciphertext the aborted transaction delivered');
$node->stop;
done_testing();
