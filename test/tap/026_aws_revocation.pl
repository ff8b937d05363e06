
# 026_aws_revocation.pl — a master key revoked in the KMS stops decryption within
# envelope.kms_recheck_interval plus one KMS round trip, in sessions that already hold
# the key, and decryption comes back when the key works again.
#
# moto does not refuse a disabled key's Decrypt, so the revocation is played by the
# fault proxy answering every Decrypt with DisabledException (or AccessDeniedException),
# as the KMS does for a disabled key (or a key policy that no longer lets this role in).

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

# ---- Enabled again: the next load goes to the KMS, which answers.
$kms->reset_proxy;
($out, $state) = attempt($s);
is($out, 'top secret', 'decryption is back as soon as the KMS accepts the key');
sleep($interval + 1);
like(slurp_file($node->logfile), qr/KMS accepts master key "\Q$key->{Arn}\E" again/,
	'the worker notices the key works again');

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
