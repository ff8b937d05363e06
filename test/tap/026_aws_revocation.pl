
# 026_aws_revocation.pl — a master key revoked in the KMS stops decryption within
# envelope.kms_recheck_interval plus one KMS round trip, in sessions that already hold
# the key, and decryption comes back when the key works again.
#
# moto does not refuse a disabled key's Decrypt, so the revocation is played by the
# fault proxy answering every Decrypt with DisabledException (or AccessDeniedException),
# as the KMS does for a disabled key (or a key policy that no longer lets this role in).
#
# envelope.check() reports the re-checks in its kms_recheck row at each step: usable,
# refused (an error naming the key), unanswered, off, and a full table of master keys.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);
use EnvelopeKms;

my $interval = 3;		# envelope.kms_recheck_interval, seconds
my $timeout_ms = 3000;	# envelope.kms_timeout: the longest one KMS round trip may take

my $kms = EnvelopeKms->new;
my $key = $kms->create_key;

$ENV{AWS_ACCESS_KEY_ID}     = 'testing';
$ENV{AWS_SECRET_ACCESS_KEY} = 'testing';
delete $ENV{AWS_SESSION_TOKEN};
$ENV{AWS_EC2_METADATA_DISABLED} = 'true';

my $node = $kms->init_node('aws_revocation', key => $key->{Arn}, retries => 1,
	timeout => $timeout_ms, extra_conf => "envelope.kms_recheck_interval = $interval\n");

sub sql { return $node->safe_psql('postgres', $_[0]); }

sql("SELECT envelope.create_tenant('acme')");
sql("CREATE TABLE t AS SELECT envelope.encrypt('acme', 'top secret') AS c");

my $decrypt = "SELECT envelope.decrypt_text('acme', c) FROM t";

# envelope.check()'s kms_recheck row: (status, detail).
sub recheck_row
{
	my $row = $node->safe_psql('postgres',
		"SELECT status || '|' || detail FROM envelope.check() WHERE name = 'kms_recheck'");
	return split /\|/, $row, 2;
}

# One query in a live session: (value, SQLSTATE or '', error text).
sub attempt
{
	my ($session) = @_;
	$session->{stderr} = '';
	my $out = $session->query("\\set VERBOSITY verbose\n$decrypt");
	my $err = $session->{stderr};
	$session->{stderr} = '';
	my ($state) = $err =~ /ERROR:\s+([0-9A-Z]{5}):/;
	return ($out, $state // '', $err);
}

# Query every 100 ms until the session is refused; returns seconds waited and the error.
sub seconds_until_refused
{
	my ($session, $limit) = @_;
	my $t0 = time();
	while (time() - $t0 < $limit)
	{
		my ($out, $state, $err) = attempt($session);
		return (time() - $t0, $state, $err) if $state ne '';
		usleep(100_000);
	}
	return (undef, '', '');
}

# ---- The worker re-checks the key in use, once per interval, with a Decrypt.
my $s = $node->background_psql('postgres', on_error_stop => 0);
my ($out) = attempt($s);
is($out, 'top secret', 'a live session decrypts (the key is in its first level)');
$kms->reset_proxy;
sleep(3 * $interval);
my $checks = $kms->count('Decrypt', 'requests');
ok($checks >= 2 && $checks <= 4,
	"the worker asks the KMS about the key once per interval ($checks Decrypts in 3 intervals)");
($out) = attempt($s);
is($out, 'top secret', 'the session still decrypts from its own copy');
is($kms->count('Decrypt', 'requests'), $checks, 'without a KMS call of its own');
my ($status, $detail) = recheck_row();
is($status, 'ok', 'check(): the re-check is ok');
like($detail, qr/envelope\.kms_recheck_interval = $interval s; 1 of at most 128 master keys tracked; the latest re-check, \d+ s ago, of "\Q$key->{Arn}\E": usable; [2-4] re-checks answered \(0 refusals\), 0 unanswered\./,
	'check() shows the interval, the key tracked, the latest answer and the counts');

# ---- Disabled: the live session is refused within one interval and one round trip.
$kms->reset_proxy;
$kms->fault(op => 'Decrypt', mode => 'disabled', count => -1);
my ($waited, $state, $err) = seconds_until_refused($s, $interval + 20);
ok(defined $waited, 'the live session is refused after the key is disabled');
$waited //= 999;
cmp_ok($waited, '<=', $interval + $timeout_ms / 1000,
	sprintf('within envelope.kms_recheck_interval + one KMS round trip (%.1f s)', $waited));
is($state, '55000', "the KMS's SQLSTATE");
like($err, qr/DisabledException/, "and the KMS's error type");
($state) = (attempt($s))[1];
is($state, '55000', 'the next query is refused too');
my ($ret, $stdout, $stderr) = $node->psql('postgres', $decrypt);
like($stderr, qr/DisabledException/, 'a new session is refused: nothing is left in shared memory');
like(slurp_file($node->logfile), qr/KMS refused master key "\Q$key->{Arn}\E": DisabledException; its cached data keys are evicted/,
	'the server log says which key was refused and why');
($status, $detail) = recheck_row();
is($status, 'error', 'check(): a refused master key is an error');
like($detail, qr/^The KMS refuses master key "\Q$key->{Arn}\E": .*of "\Q$key->{Arn}\E": DisabledException; \d+ re-checks answered \([1-9]\d* refusals\)/,
	'naming the key and the answer of the KMS');

# ---- Enabled again: the next load goes to the KMS, which answers.
$kms->reset_proxy;
($out, $state) = attempt($s);
is($out, 'top secret', 'decryption is back as soon as the KMS accepts the key');
sleep($interval + 1);
like(slurp_file($node->logfile), qr/KMS accepts master key "\Q$key->{Arn}\E" again/,
	'the worker notices the key works again');
($status) = recheck_row();
is($status, 'ok', 'check(): ok again once the KMS accepts the key');

# ---- Access denied (a key policy that no longer grants this role) counts the same.
($out) = attempt($s);
is($out, 'top secret', 'the session holds the key again');
$kms->fault(op => 'Decrypt', mode => 'access_denied', count => -1);
($waited, $state) = seconds_until_refused($s, $interval + 20);
ok(defined $waited && $waited <= $interval + $timeout_ms / 1000,
	sprintf('a key whose policy refuses us is revoked just as fast (%.1f s)', $waited // 999));
is($state, '42501', 'with the SQLSTATE of AccessDeniedException');
$kms->reset_proxy;

# ---- An unreachable KMS is no refusal: nothing is evicted.
($out) = attempt($s);
is($out, 'top secret', 'the session holds the key again');
$kms->fault(op => 'Decrypt', mode => '503', count => -1);
sleep(2 * $interval + 1);
ok($kms->count('Decrypt', 'faulted') >= 1, 'the worker met the outage');
($out, $state) = attempt($s);
is($out, 'top secret', 'an outage of the KMS evicts nothing');
($status, $detail) = recheck_row();
is($status, 'warning', 'check(): a re-check without an answer is a warning');
like($detail, qr/: (KMSInternalException|unavailable|server error)[^;]*; \d+ re-checks answered \(\d+ refusals\), [1-9]\d* unanswered/,
	'with the outcome and the count of unanswered re-checks');
$kms->reset_proxy;

# ---- 0 turns the re-check off: a cached key then lives out its envelope.cache_ttl.
$node->append_conf('postgresql.conf', "envelope.kms_recheck_interval = 0\n");
$node->reload;
sleep(1);
$kms->reset_proxy;
$kms->fault(op => 'Decrypt', mode => 'disabled', count => -1);
sleep(2 * $interval + 1);
is($kms->count('Decrypt', 'requests'), 0, 'with the re-check off the worker asks nothing');
($out) = attempt($s);
is($out, 'top secret', 'and the cached key keeps decrypting');
$s->quit;
($status, $detail) = recheck_row();
is($status, 'warning', 'check(): the re-check turned off is a warning');
like($detail, qr/^envelope\.kms_recheck_interval = 0: a master key disabled or revoked in the KMS keeps decrypting/,
	'that says what it costs');
$kms->reset_proxy;

# ---- A full table: 128 master keys are tracked, a 129th is not, and check() says so.
$node->append_conf('postgresql.conf', "envelope.kms_recheck_interval = 3600\n");
$node->reload;
my @more = map { $_->{Arn} } @{ $kms->create_keys(128) };
my $arns = join(',', map { "'$_'" } @more);
my ($ret2, $stdout2, $stderr2) = $node->psql('postgres',
	"SELECT count(envelope.create_tenant('k' || n, arn)) FROM unnest(ARRAY[$arns]) WITH ORDINALITY AS a(arn, n)");
is($stdout2, '128', 'tenants under 128 more master keys');
like($stderr2, qr/WARNING:  pg_envelope tracks at most 128 master keys/, 'the 129th key is warned about');
($status, $detail) = recheck_row();
is($status, 'warning', 'check(): a full table of master keys is a warning');
like($detail, qr/128 of at most 128 master keys tracked; .*; 1 loads under keys beyond the table, the latest \d+ s ago\./,
	'with the count of loads it had no room for');

# ---- The worker never holds up a shutdown, even in the middle of a hung KMS call.
$node->append_conf('postgresql.conf',
	"envelope.kms_recheck_interval = 1\nenvelope.kms_timeout = 60000\n");
$node->reload;
$kms->reset_proxy;
sql($decrypt);		# a key in use again, so that the worker has something to check
$kms->fault(op => 'Decrypt', mode => 'hang', count => -1, seconds => 60);
my $t0 = time();
while ($kms->count('Decrypt', 'faulted') < 1 && time() - $t0 < 15) { usleep(100_000); }
is($kms->count('Decrypt', 'faulted'), 1, 'the worker is stuck in a KMS call');
$t0 = time();
$node->stop('fast');
my $stop = time() - $t0;
cmp_ok($stop, '<', 10, sprintf('a fast shutdown does not wait for it (%.1f s)', $stop));
$kms->reset_proxy;

done_testing();
