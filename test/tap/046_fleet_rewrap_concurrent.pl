# 046_fleet_rewrap_concurrent.pl — rewrap_keys keeps several ReEncrypt requests in
# flight, and an interrupted batch leaves every DEK readable.
#
# Against moto through the fault proxy, which adds latency to every ReEncrypt and
# records how many requests it was handling at once.  Facts that do not depend on the
# order or the timing of the requests: every DEK is re-wrapped exactly once (one
# request each, none unwrapped outside the KMS), more than one request was in flight
# at a time and never more than envelope.kms_max_concurrent_requests, a throttled
# request is retried on its own, a refused one fails the batch with the error the
# single path gives, and a cancel, a statement_timeout or a server crash with requests
# on the wire leaves each DEK under its old or its new master key, and readable.  No
# timing threshold: the speed-up is measured by test/bench/rewrap_concurrency.sh.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(sleep time);
use EnvelopeKms;
use EnvelopeFleet qw(start_sql finish_sql wait_for);

my $kms  = EnvelopeKms->new;
my $key1 = $kms->create_key;
my $key2 = $kms->create_key;
my $key3 = $kms->create_key;
my $key4 = $kms->create_key;

$ENV{AWS_ACCESS_KEY_ID}     = 'testing';
$ENV{AWS_SECRET_ACCESS_KEY} = 'testing';
delete $ENV{AWS_SESSION_TOKEN};
$ENV{AWS_EC2_METADATA_DISABLED} = 'true';

my $node = $kms->init_node('rewrap_concurrent', key => $key1->{Arn}, retries => 2,
	timeout => 30000, extra_conf => "restart_after_crash = on\n");

sub sql { return $node->safe_psql('postgres', $_[0]); }

# 40 tenants, 8 of them with a second DEK version: 48 DEKs, one batch of rewrap_keys.
my $tenants = 40;
my $deks    = 48;
sql("SELECT count(envelope.create_tenant('t' || i)) FROM generate_series(1, $tenants) i");
sql("CREATE TABLE account (tenant text, plain text, secret bytea)");
sub add_values
{
	my ($tag) = @_;
	sql(    "INSERT INTO account SELECT 't' || i, '$tag ' || i || '/' || v, "
		  . "envelope.encrypt('t' || i, '$tag ' || i || '/' || v) "
		  . "FROM generate_series(1, $tenants) i, generate_series(1, 2) v");
}
add_values('before');
sql("SELECT count(envelope.rotate_tenant_key('t' || i)) FROM generate_series(1, 8) i");
add_values('after');
is(sql("SELECT count(*) FROM envelope.tenant_keys"), $deks, "$deks DEKs to move");

sub all_decrypt
{
	sql("SELECT envelope.cache_flush()");
	return sql("SELECT count(*) = count(*) FILTER (WHERE envelope.decrypt_text(tenant, secret) = plain) "
		  . "FROM account WHERE secret IS NOT NULL");
}

# How many DEKs are under each master key, as "keyN:count" sorted by key.
sub wrapping
{
	my %name = ($key1->{Arn} => 'key1', $key2->{Arn} => 'key2', $key3->{Arn} => 'key3',
		$key4->{Arn} => 'key4');
	my %n;
	$n{ $name{$_} // "other:$_" }++
	  for split /\n/, sql("SELECT kms_key FROM envelope.tenant_keys");
	return join(' ', map { "$_:$n{$_}" } sort keys %n);
}

# ---------------------------------------------------------------------------
# Every ReEncrypt waits 0.3 s at the proxy: one at a time, 48 of them would take 14 s.
$kms->reset_proxy;
$kms->fault(op => 'ReEncrypt', mode => 'delay', seconds => 0.3, count => -1);
my $t0 = time();
my ($ret, $out, $err) = $node->psql('postgres', "CALL envelope.rewrap_keys('$key2->{Arn}')");
my $elapsed = time() - $t0;
is($ret, 0, 'rewrap_keys completes') or diag($err);
is(wrapping(), "key2:$deks", 'every DEK is under the new master key');
is($kms->count('ReEncrypt', 'requests'), $deks, 'one ReEncrypt per DEK, none repeated');
is($kms->count('Decrypt', 'requests'), 0, 'no DEK was unwrapped outside the KMS');
my $most = $kms->count('ReEncrypt', 'max_in_flight');
ok($most > 1, "several ReEncrypt requests were in flight at once ($most)");
ok($most <= 8, "never more than envelope.kms_max_concurrent_requests (8): $most");
note(sprintf('%d DEKs in %.2f s with 0.3 s per request', $deks, $elapsed));
is(sql("SELECT count(*) FROM envelope.audit_log WHERE action = 'rewrap'"), $deks,
	'one audit row per DEK moved');
is( sql("SELECT count(*) FROM envelope.tenant WHERE kms_key = '$key2->{Arn}'"),
	$tenants, 'every tenant makes its new DEKs under the new master key');
is(all_decrypt(), 't', 'every value decrypts with the DEKs unwrapped under the new key');

# The bound is the setting: 3 at a time, and still more than one.
$kms->reset_proxy;
$kms->fault(op => 'ReEncrypt', mode => 'delay', seconds => 0.3, count => -1);
($ret, $out, $err) = $node->psql('postgres',
	"SET envelope.kms_max_concurrent_requests = 3; CALL envelope.rewrap_keys('$key3->{Arn}')");
is($ret, 0, 'rewrap_keys with envelope.kms_max_concurrent_requests = 3') or diag($err);
is(wrapping(), "key3:$deks", 'every DEK moved again');
$most = $kms->count('ReEncrypt', 'max_in_flight');
ok($most > 1 && $most <= 3, "between 2 and 3 requests in flight at once ($most)");

# The cluster-wide rate limit holds for the concurrent requests too: at 10 a second,
# no one-second window at the proxy sees more than 10 (plus one for the scheduling
# jitter, as in 029_aws_rate_limit.pl), and still more than one is in flight.
$node->append_conf('postgresql.conf', "envelope.kms_max_requests_per_second = 10\n");
$node->reload;
sleep(1);
$kms->reset_proxy;
$kms->fault(op => 'ReEncrypt', mode => 'delay', seconds => 0.3, count => -1);
($ret, $out, $err) = $node->psql('postgres', "CALL envelope.rewrap_keys('$key2->{Arn}')");
is($ret, 0, 'rewrap_keys under envelope.kms_max_requests_per_second = 10') or diag($err);
is(wrapping(), "key2:$deks", 'every DEK moved under the rate limit');
my @t = sort { $a <=> $b } map { $_->[0] } @{ $kms->arrivals };
my ($busiest, $j) = (0, 0);
for my $i (0 .. $#t)
{
	$j++ while $j <= $#t && $t[$j] < $t[$i] + 1.0;
	$busiest = $j - $i if $j - $i > $busiest;
}
is(scalar @t, $deks, 'one request per DEK');
ok($busiest <= 11, "at most 10 (+1) requests in any second ($busiest)");
$most = $kms->count('ReEncrypt', 'max_in_flight');
ok($most > 1, "still several in flight at once ($most)");
$node->append_conf('postgresql.conf', "envelope.kms_max_requests_per_second = 0\n");
$node->reload;
sleep(1);

# ---------------------------------------------------------------------------
# A throttled request is retried on its own; the others are not sent again.
$kms->reset_proxy;
$kms->fault(op => 'ReEncrypt', mode => 'throttle', count => 2);
$kms->fault(op => 'ReEncrypt', mode => 'delay', seconds => 0.05, count => -1);
($ret, $out, $err) = $node->psql('postgres', "CALL envelope.rewrap_keys('$key3->{Arn}')");
is($ret, 0, 'rewrap_keys completes through two throttled answers') or diag($err);
is($kms->count('ReEncrypt', 'requests'), $deks + 2, 'two requests more than DEKs: the retries');
is(wrapping(), "key3:$deks", 'every DEK is under key 3');

# A refused request fails the batch with the single path's error; nothing is written.
$kms->reset_proxy;
$kms->fault(op => 'ReEncrypt', mode => 'access_denied', count => 1);
my ($state, $msg) = EnvelopeKms::psql_error($node, "CALL envelope.rewrap_keys('$key2->{Arn}')");
is($state, '42501', 'a refused ReEncrypt: insufficient_privilege');
like($msg, qr/KMS ReEncrypt failed for key version \d+ of tenant "t\d+": AccessDeniedException/,
	'names the operation, the DEK and the AWS error');
is(wrapping(), "key3:$deks", 'the failed batch changed no DEK');
is($kms->count('ReEncrypt', 'requests'), $deks, 'the refused request was not retried');
is(all_decrypt(), 't', 'every value still decrypts');

# ---------------------------------------------------------------------------
# Interruptions with requests on the wire: every ReEncrypt is held at the proxy.
sub held_run
{
	my ($sql) = @_;
	$kms->reset_proxy;
	$kms->fault(op => 'ReEncrypt', mode => 'hold', seconds => 60, count => -1);
	my $bg = start_sql($node, $sql);
	ok( wait_for(
			$node,
			"SELECT (SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'CALL envelope.rewrap_keys%') > 0",
			30),
		'rewrap_keys started');
	my $deadline = time() + 30;
	sleep(0.05) while $kms->count('ReEncrypt', 'requests') < 2 && time() < $deadline;
	ok($kms->count('ReEncrypt', 'requests') >= 2, 'requests are on the wire');
	return $bg;
}

sub old_or_new
{
	my ($old, $new) = @_;
	my $w = wrapping();
	ok($w eq "$old:$deks" || $w eq "$new:$deks" || $w =~ /^(?:$old|$new):\d+ (?:$old|$new):\d+$/,
		"each DEK is under $old or $new ($w)");
}

# pg_cancel_backend
my $bg = held_run("CALL envelope.rewrap_keys('$key4->{Arn}')");
$t0 = time();
sql("SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE query LIKE 'CALL envelope.rewrap_keys%'");
($ret, $out, $err) = finish_sql($bg);
ok($ret != 0 && $err =~ /canceling statement due to user request/, 'pg_cancel_backend stops the batch')
  or diag($err);
ok(time() - $t0 < 10, 'at once, not after the held requests');
$kms->release;
old_or_new('key3', 'key4');
is(wrapping(), "key3:$deks", 'the canceled batch wrote nothing');
is(all_decrypt(), 't', 'every value decrypts after the cancel');

# statement_timeout
$bg = held_run("SET statement_timeout = '2s';\nCALL envelope.rewrap_keys('$key4->{Arn}');");
($ret, $out, $err) = finish_sql($bg);
ok($ret != 0 && $err =~ /canceling statement due to statement timeout/,
	'statement_timeout stops the batch') or diag($err);
$kms->release;
old_or_new('key3', 'key4');
is(all_decrypt(), 't', 'every value decrypts after the timeout');

# a crash of the server
$bg = held_run("CALL envelope.rewrap_keys('$key4->{Arn}')");
my $postmaster = $node->{_pid};
my @children = split(/\s+/, `ps --ppid $postmaster -o pid= 2>/dev/null`);
$node->kill9;
kill 'KILL', grep { /^\d+$/ } @children;
for (1 .. 500)
{
	last unless grep { /^\d+$/ && kill(0, $_) } @children;
	sleep(0.02);
}
finish_sql($bg);
$kms->reset_proxy;
$node->start;
old_or_new('key3', 'key4');
is(all_decrypt(), 't', 'every value decrypts after the crash');

($ret, $out, $err) = $node->psql('postgres', "CALL envelope.rewrap_keys('$key4->{Arn}')");
is($ret, 0, 'the rerun completes') or diag($err);
like($err, qr/resuming run/, 'the rerun resumes the interrupted run');
is(wrapping(), "key4:$deks", 'every DEK is under key 4');
is($kms->count('ReEncrypt', 'forwarded'), $deks, 'each sent to ReEncrypt once by the rerun');
is(all_decrypt(), 't', 'every value decrypts under key 4');

$node->stop;
$kms->stop;
done_testing();
