# 043_fleet_crash_resume.pl — rotate_keys, reencrypt_all and rewrap_keys survive a
# server crash.
#
# Against moto through the fault proxy.  Each procedure is started in the background,
# allowed to commit at least one batch (seen in envelope.rotation_progress from another
# session), then every server process gets SIGKILL.  After the restart the progress
# shows the run as interrupted with its committed batches; calling the procedure again
# resumes it, redoes nothing already done (no tenant rotated twice, no value
# re-encrypted twice, no DEK sent to ReEncrypt twice), and leaves every value
# decrypting.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(sleep);
use EnvelopeKms;
use EnvelopeFleet qw(start_sql finish_sql wait_for);

my $kms  = EnvelopeKms->new;
my $key1 = $kms->create_key;
my $key2 = $kms->create_key;

$ENV{AWS_ACCESS_KEY_ID}     = 'testing';
$ENV{AWS_SECRET_ACCESS_KEY} = 'testing';
delete $ENV{AWS_SESSION_TOKEN};
$ENV{AWS_EC2_METADATA_DISABLED} = 'true';

my $node = $kms->init_node('fleet_crash', key => $key1->{Arn}, retries => 2,
	timeout => 60000, extra_conf => "restart_after_crash = on\n");

sub sql { return $node->safe_psql('postgres', $_[0]); }

my $tenants = 150;
my $rows    = 30000;
sql("SELECT count(envelope.create_tenant('t' || i)) FROM generate_series(1, $tenants) i");
sql(    "CREATE TABLE account (id integer PRIMARY KEY, tenant text NOT NULL, plain text NOT NULL, "
	  . "secret bytea) WITH (autovacuum_enabled = false)");
sql(    "INSERT INTO account SELECT i, 't' || (i % $tenants + 1), 'value ' || i, "
	  . "envelope.encrypt('t' || (i % $tenants + 1), 'value ' || i, 'account.secret') "
	  . "FROM generate_series(1, $rows) i");
sql("SELECT envelope.register_column('account', 'secret', 'tenant', 'account.secret')");

# SIGKILL to the postmaster and every process it started, as a power cut would see it.
sub crash_server
{
	my $postmaster = $node->{_pid};
	my @children = split(/\s+/, `ps --ppid $postmaster -o pid= 2>/dev/null`);
	$node->kill9;
	kill 'KILL', grep { /^\d+$/ } @children;
	# wait until every one is gone, so that the restart finds no attached memory
	for (1 .. 500)
	{
		last unless grep { /^\d+$/ && kill(0, $_) } @children;
		sleep(0.02);
	}
	$node->start;
}

sub progress
{
	my ($procedure) = @_;
	return sql(
		"SELECT done || '/' || total || ' ' || values_moved || ' ' || state FROM envelope.rotation_progress "
		  . "WHERE procedure = '$procedure' ORDER BY run_id DESC LIMIT 1");
}

# ---------------------------------------------------------------------------
# rotate_keys: a new DEK version per tenant, 50 tenants per committed batch.
my $bg = start_sql($node, "CALL envelope.rotate_keys(older_than => '0')");
ok( wait_for(
		$node,
		"SELECT coalesce(bool_or(done >= 50), false) FROM envelope.rotation_progress "
		  . "WHERE procedure = 'rotate_keys' AND state = 'running'"),
	'rotate_keys committed a batch, seen from another session');
# the next GenerateDataKey hangs, so the crash comes in the middle of a batch
$kms->fault(op => 'GenerateDataKey', mode => 'hang', count => -1, seconds => 60);
sleep(0.3);
crash_server();
finish_sql($bg);
$kms->reset_proxy;

my ($done, $total) = split m{[/ ]}, progress('rotate_keys');
like(progress('rotate_keys'), qr/ interrupted$/, 'after the crash the run shows as interrupted');
ok($done >= 50 && $done < $tenants, "the committed batches are kept ($done of $tenants tenants)");
is( sql("SELECT count(*) FROM envelope.tenant_keys WHERE state = 'active' AND version = 2"),
	$done, 'exactly the tenants the progress counts have a new version');

my ($ret, $out, $err) = $node->psql('postgres', "CALL envelope.rotate_keys(older_than => '0')");
is($ret, 0, 'the rerun completes');
like($err, qr/resuming run/, 'the rerun resumes the interrupted run');
is( sql("SELECT string_agg(DISTINCT version::text, ',') FROM envelope.tenant_keys WHERE state = 'active'"),
	'2', 'every tenant was rotated exactly once');
like(progress('rotate_keys'), qr{^$tenants/$tenants $tenants done$}, 'the progress shows the whole run');

# ---------------------------------------------------------------------------
# reencrypt_all: every value onto version 2, throttled so that it runs for seconds.
$bg = start_sql($node, "CALL envelope.reencrypt_all(1000, 5000)");
ok( wait_for(
		$node,
		"SELECT coalesce(bool_or(values_moved >= 2000), false) FROM envelope.rotation_progress "
		  . "WHERE procedure = 'reencrypt_all' AND state = 'running'"),
	'reencrypt_all committed batches, seen from another session');
is( sql("SELECT rate > 0 AND estimated_finish > now() FROM envelope.rotation_progress "
		  . "WHERE procedure = 'reencrypt_all' AND state = 'running'"),
	't', 'the progress has a rate and an estimated finish');
crash_server();
finish_sql($bg);

like(progress('reencrypt_all'), qr/ interrupted$/, 'after the crash the run shows as interrupted');
my ($blocks_at_crash) = split m{/}, progress('reencrypt_all');
sql("CREATE TABLE moved_before_crash AS SELECT id, secret FROM account WHERE envelope.key_version(secret) = 2");
my $moved = sql("SELECT count(*) FROM moved_before_crash");
ok($moved >= 2000 && $moved < $rows, "the committed batches are kept ($moved of $rows values)");

$kms->reset_proxy;
($ret, $out, $err) = $node->psql('postgres', "CALL envelope.reencrypt_all(2000)");
is($ret, 0, 'the rerun completes');
like($err, qr/resuming run/, 'the rerun resumes the interrupted run');
my ($first_batch_end) = $err =~ /re-encrypted \d+ values \(\d+ in all\); (\d+) of \d+ blocks done/;
ok(defined $first_batch_end && $first_batch_end > $blocks_at_crash,
	"and carries on after block $blocks_at_crash, where the crash stopped it");
is( sql("SELECT count(*) FROM moved_before_crash m JOIN account a USING (id) WHERE a.secret <> m.secret"),
	'0', 'no value moved before the crash was re-encrypted again');
is( sql("SELECT count(*) FILTER (WHERE envelope.key_version(secret) = 2) || ' '"
		  . " || count(*) FILTER (WHERE envelope.decrypt_text(tenant, secret, 'account.secret') = plain) FROM account"),
	"$rows $rows", 'every value is under version 2 and decrypts (after the restart emptied the cache)');
ok($kms->count('Decrypt', 'forwarded') > 0, 'the keys came back from the KMS');

# ---------------------------------------------------------------------------
# rewrap_keys: 300 DEKs to key 2, 25 DEKs per committed batch.
$kms->reset_proxy;
$bg = start_sql($node, "CALL envelope.rewrap_keys('$key2->{Arn}')");
ok( wait_for(
		$node,
		"SELECT coalesce(bool_or(done >= 25), false) FROM envelope.rotation_progress "
		  . "WHERE procedure = 'rewrap_keys' AND state = 'running'"),
	'rewrap_keys committed a batch, seen from another session');
$kms->fault(op => 'ReEncrypt', mode => 'hang', count => -1, seconds => 60);
sleep(0.3);
crash_server();
finish_sql($bg);
$kms->reset_proxy;

like(progress('rewrap_keys'), qr/ interrupted$/, 'after the crash the run shows as interrupted');
my $left = sql("SELECT count(*) FROM envelope.tenant_keys WHERE kms_key <> '$key2->{Arn}'");
ok($left > 0 && $left <= 2 * $tenants - 25, "the committed batches are kept ($left DEKs left to move)");

($ret, $out, $err) = $node->psql('postgres', "CALL envelope.rewrap_keys('$key2->{Arn}')");
is($ret, 0, 'the rerun completes');
like($err, qr/resuming run/, 'the rerun resumes the interrupted run');
is($kms->count('ReEncrypt', 'forwarded'), $left, 'only the DEKs left were sent to ReEncrypt');
is( sql("SELECT count(*) FROM envelope.tenant_keys WHERE kms_key <> '$key2->{Arn}'"),
	'0', 'every DEK is under key 2');

$node->restart;
$kms->reset_proxy;
is( sql("SELECT count(*) FROM account WHERE envelope.decrypt_text(tenant, secret, 'account.secret') = plain"),
	$rows, 'every value decrypts with the DEKs unwrapped under key 2');
is( sql("SELECT action || ':' || (detail ->> 'moved') FROM envelope.audit_log "
		  . "WHERE action IN ('rotate_keys', 'reencrypt_all', 'rewrap_keys') ORDER BY id"),
	"rotate_keys:$tenants\nreencrypt_all:$rows\nrewrap_keys:" . (2 * $tenants),
	'each completed run is in the audit trail with its counts (the crashed part included)');

$node->stop;
$kms->stop;
done_testing();
