
# 031_cache_prewarm.pl — envelope.cache_prewarm loads the DEKs clients will ask for
# into the shared cache after a start, in every database that has the extension, at
# most envelope.cache_prewarm_rate KMS requests a second, and never caches a key the
# KMS refuses or a key revoked while it was being loaded.
#
# Against moto behind the fault proxy, whose counts are the KMS's own view.  After the
# prewarm is done, a full scan of the values it was meant for makes no KMS call.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time sleep);
use EnvelopeKms;

my $kms = EnvelopeKms->new;
my $key = $kms->create_key;

$ENV{AWS_ACCESS_KEY_ID}     = 'testing';
$ENV{AWS_SECRET_ACCESS_KEY} = 'testing';
delete $ENV{AWS_SESSION_TOKEN};
$ENV{AWS_EC2_METADATA_DISABLED} = 'true';

my $node = $kms->init_node('prewarm', key => $key->{Arn}, retries => 1, timeout => 60000,
	extra_conf => "envelope.cache_prewarm = off\nenvelope.cache_ttl = 60\n");

sub sql { my ($sql, $db) = @_; return $node->safe_psql($db // 'postgres', $sql); }
sub stats { return sql("SELECT $_[0] FROM envelope.cache_stats"); }

# database postgres: t01..t20; t01..t05 rotated (two versions); t05's version 1
# retired, t19 disabled, t20 destroyed.  One value under every version.
sql(q{
SELECT count(envelope.create_tenant(format('t%s', lpad(i::text, 2, '0')))) FROM generate_series(1, 20) i;
CREATE TABLE data AS SELECT tenant, 'v1 of ' || tenant AS v, envelope.encrypt(tenant, 'v1 of ' || tenant) AS c
  FROM envelope.tenant ORDER BY tenant_id;
SELECT envelope.rotate_tenant_key(format('t%s', lpad(i::text, 2, '0'))) FROM generate_series(1, 5) i;
INSERT INTO data SELECT tenant, 'v2 of ' || tenant, envelope.encrypt(tenant, 'v2 of ' || tenant)
  FROM envelope.tenant WHERE active_version = 2;
SELECT envelope.retire_key_version('t05', 1, true);
SELECT envelope.disable_tenant('t19');
SELECT envelope.destroy_tenant('t20', 't20');
});
# database other: o1..o3; database plain has no pg_envelope and is skipped
sql('CREATE DATABASE other');
sql('CREATE DATABASE plain');
sql(q{
CREATE EXTENSION pg_envelope;
SELECT count(envelope.create_tenant('o' || i)) FROM generate_series(1, 3) i;
CREATE TABLE data AS SELECT tenant, 'v1 of ' || tenant AS v, envelope.encrypt(tenant, 'v1 of ' || tenant) AS c
  FROM envelope.tenant;
}, 'other');

my $active_keys = 18 + 3;    # every active tenant's active version
my $all_keys    = 22 + 3;    # and t01..t04's version 1

# The values each mode is for, decrypted and checked: (rows, rows that decrypted right).
my $active_scan = q{
SELECT count(*), count(*) FILTER (WHERE envelope.decrypt_text(d.tenant, d.c) = d.v)
  FROM data d JOIN envelope.tenant t USING (tenant)
 WHERE t.state = 'active' AND envelope.key_version(d.c) = t.active_version};
my $all_scan = q{
SELECT count(*), count(*) FILTER (WHERE envelope.decrypt_text(d.tenant, d.c) = d.v)
  FROM data d JOIN envelope.tenant t USING (tenant)
  JOIN envelope.data_key k ON k.tenant = d.tenant AND k.version = envelope.key_version(d.c)
 WHERE t.state = 'active' AND k.state = 'active'};

# Restart with these settings; the proxy's counts start from zero, and $before (if
# given) runs just before the start, to set faults.
sub restart_with
{
	my ($set, $before) = @_;
	$node->stop;
	$node->append_conf('postgresql.conf', join('', map { "envelope.$_ = '$set->{$_}'\n" } sort keys %$set));
	$kms->reset_proxy;
	$before->() if $before;
	$node->start;
}

sub wait_prewarm_finished
{
	$node->poll_query_until('postgres',
		"SELECT prewarm_state IN ('done', 'failed') FROM envelope.cache_stats")
	  or die 'the prewarm did not finish';
	return stats('prewarm_state');
}

# ---- off: nothing happens
restart_with({ cache_prewarm => 'off' });
sleep(3);
is(stats('prewarm_state'), 'off', 'off: prewarm_state says so');
is(stats('prewarm_total') + stats('prewarm_loaded') + stats('entries'), 0, 'off: nothing listed, nothing cached');
is($kms->count('Decrypt', 'requests'), 0, 'off: no KMS request after the start');

# ---- active
restart_with({ cache_prewarm => 'active' });
is(wait_prewarm_finished(), 'done', 'active: the prewarm finishes');
is(stats('prewarm_total'), $active_keys, "active: $active_keys key versions listed (two databases)");
is(stats('prewarm_loaded'), $active_keys, 'active: all of them loaded');
is(stats('prewarm_failed'), 0, 'active: none failed');
is(stats('entries'), $active_keys, 'active: and they are in the shared cache');
is($kms->count('Decrypt', 'forwarded'), $active_keys, 'active: one KMS Decrypt each');

my $calls = stats('kms_decrypt_calls');
is(sql($active_scan), '18|18', 'active: a full scan of the active versions decrypts every value');
is(sql($active_scan, 'other'), '3|3', 'active: so does one in the other database');
is($kms->count('Decrypt', 'requests'), $active_keys, 'active: the scans made no KMS request');
is(stats('kms_decrypt_calls'), $calls, 'active: cache_stats agrees');

# ---- all, at 5 requests a second
my $rate = 5;
restart_with({ cache_prewarm => 'all', cache_prewarm_rate => $rate });
my @samples;    # [seconds, Decrypt requests seen]
my $t0 = time();
while (1)
{
	push @samples, [ time() - $t0, $kms->count('Decrypt', 'requests') ];
	last if stats('prewarm_state') =~ /^(done|failed)$/;
	die 'the prewarm did not finish' if time() - $t0 > 180;
	sleep(0.2);
}
is(stats('prewarm_state'), 'done', 'all: the prewarm finishes');
is(stats('prewarm_total'), $all_keys, "all: $all_keys key versions listed (not retired, disabled or destroyed ones)");
is(stats('prewarm_loaded'), $all_keys, 'all: all of them loaded');
is($kms->count('Decrypt', 'forwarded'), $all_keys, 'all: one KMS Decrypt each');

# no window between two samples holds more requests than the rate allows (+1 for the
# request that may start at each edge of the window)
my ($first) = grep { $_->[1] > 0 } @samples;
my @over = grep { $_->[1] - $first->[1] > $rate * ($_->[0] - $first->[0]) + 2 } @samples;
ok(!@over, "all: at most $rate KMS requests a second")
  or diag(join(', ', map { sprintf('%.1fs: %d', @$_) } @samples));
cmp_ok(scalar(grep { $_->[1] > $first->[1] && $_->[1] < $all_keys } @samples), '>=', 3,
	'all: the prewarm was seen in progress');

$calls = stats('kms_decrypt_calls');
is(sql($all_scan), '22|22', 'all: a full scan of every usable version decrypts every value');
is(sql($all_scan, 'other'), '3|3', 'all: so does one in the other database');
is($kms->count('Decrypt', 'requests'), $all_keys, 'all: the scans made no KMS request');
is(stats('kms_decrypt_calls'), $calls, 'all: cache_stats agrees');

# ---- the KMS refuses the master key: nothing is cached
restart_with({ cache_prewarm => 'active', cache_prewarm_rate => 1000 },
	sub { $kms->fault(op => 'Decrypt', mode => 'disabled', count => -1) });
is(wait_prewarm_finished(), 'done', 'refused: the prewarm still finishes');
is(stats('prewarm_failed'), $active_keys, 'refused: every key failed');
is(stats('prewarm_loaded'), 0, 'refused: nothing loaded');
# failed loads stay as markers for a second, until the sweeper forgets them
ok($node->poll_query_until('postgres', 'SELECT entries = 0 FROM envelope.cache_stats'),
	'refused: nothing cached');
like(slurp_file($node->logfile), qr/cache prewarm could not load key version \d+ of tenant "\w+": .*DisabledException/,
	'refused: the log says why');

# ---- workers terminated half-way: the state says failed, not running forever
restart_with({ cache_prewarm_rate => 1 });
$node->poll_query_until('postgres', 'SELECT prewarm_loaded >= 1 FROM envelope.cache_stats')
  or die 'the slow prewarm did not start';
is(sql(q{SELECT count(pg_terminate_backend(pid)) >= 1 FROM pg_stat_activity
          WHERE backend_type = 'pg_envelope cache prewarm'}), 't', 'terminated: the prewarm workers are stopped');
is(wait_prewarm_finished(), 'failed', 'terminated: prewarm_state says failed');
cmp_ok(stats('prewarm_loaded'), '<', $active_keys, 'terminated: it had not loaded everything');

# ---- a tenant destroyed while its key is being loaded is not cached
restart_with({ cache_prewarm_rate => 1000 }, sub { $kms->fault(op => 'Decrypt', mode => 'hold', count => 1, seconds => 60) });
my $deadline = time() + 60;
sleep(0.1) until $kms->count('Decrypt', 'faulted') >= 1 || time() > $deadline;
is($kms->count('Decrypt', 'faulted'), 1, 'destroyed: the first load (of t01) is held in the proxy');
sql("SELECT envelope.destroy_tenant('t01', 't01')");
$kms->release;
is(wait_prewarm_finished(), 'done', 'destroyed: the prewarm finishes');
is(stats('prewarm_loaded'), $active_keys - 1, 'destroyed: every other key is loaded');
is(stats('prewarm_failed'), 1, 'destroyed: the destroyed tenant\'s key counts as not loaded');
is(stats('entries'), $active_keys - 1, 'destroyed: its key is not in the shared cache');

$node->stop;
$kms->stop;
done_testing();
