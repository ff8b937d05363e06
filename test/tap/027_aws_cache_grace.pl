
# 027_aws_cache_grace.pl — envelope.cache_grace: while the KMS cannot be reached, a
# data key past envelope.cache_ttl is still served for up to cache_grace, with one
# WARNING per key and a count in cache_stats; a refusal is never graced, and by
# default (0) nothing is.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);
use EnvelopeKms;

my $ttl   = 2;
my $grace = 8;

my $kms = EnvelopeKms->new;
my $key = $kms->create_key;

$ENV{AWS_ACCESS_KEY_ID}     = 'testing';
$ENV{AWS_SECRET_ACCESS_KEY} = 'testing';
delete $ENV{AWS_SESSION_TOKEN};
$ENV{AWS_EC2_METADATA_DISABLED} = 'true';

my $node = $kms->init_node('aws_grace', key => $key->{Arn}, retries => 0, timeout => 2000,
	extra_conf => "envelope.cache_ttl = $ttl\nenvelope.cache_grace = $grace\n"
	  . "envelope.kms_recheck_interval = 0\n");

sub sql { return $node->safe_psql('postgres', $_[0]); }

sql("SELECT envelope.create_tenant('acme')");
sql("CREATE TABLE t AS SELECT envelope.encrypt('acme', 'top secret') AS c");

my $decrypt = "SELECT envelope.decrypt_text('acme', c) FROM t";

# A new session's decrypt: (value, SQLSTATE or '00000', stderr).
sub attempt
{
	my ($out, $err) = ('', '');
	my $ret = $node->psql('postgres', "\\set VERBOSITY verbose\n$decrypt",
		stdout => \$out, stderr => \$err);
	my ($state) = $err =~ /ERROR:\s+([0-9A-Z]{5}):/;
	return ($out, $ret == 0 ? '00000' : ($state // ''), $err);
}

sub graced_loads { return sql('SELECT graced_loads FROM envelope.cache_stats'); }

# Load the key now (not when the tenant was created): the clock starts here.
sub load_now
{
	sql('SELECT envelope.cache_flush()');
	my $t = time();
	my ($out) = attempt();
	is($out, 'top secret', 'the key is unwrapped by the KMS');
	return $t;
}

# ---- An outage past cache_ttl, within cache_grace: served, with one WARNING.
$kms->reset_proxy;
my $loaded = load_now();
$kms->fault(op => 'Decrypt', mode => '503', count => -1);
usleep(1_000_000 * ($ttl + 1 - (time() - $loaded)));
my ($out, $state, $err) = attempt();
is($out, 'top secret', 'past cache_ttl with the KMS down, the expired key is served');
like($err, qr/WARNING:.*key version 1 of tenant "acme" is used past envelope.cache_ttl because the KMS cannot be reached/,
	'with a WARNING');
like($err, qr/DETAIL:\s+KMS Decrypt failed for key version 1 of tenant "acme": unavailable\. aws provider: .*503/,
	'that says what the KMS answered');
ok($kms->count('Decrypt', 'faulted') >= 1, 'the KMS was asked first');
is(graced_loads(), 1, 'cache_stats counts it');

($out, $state, $err) = attempt();
is($out, 'top secret', 'another session is served too');
unlike($err, qr/WARNING/, 'without a second WARNING for the same key');

# ---- The KMS throttling us is an outage too.
$kms->reset_proxy;
$kms->fault(op => 'Decrypt', mode => 'throttle', count => -1);
sleep(2);		# past the retry point of the graced key
($out, $state, $err) = attempt();
is($out, 'top secret', 'throttling is graced as well');
ok($kms->count('Decrypt', 'faulted') >= 1, 'after asking the KMS again');
ok(graced_loads() >= 2, 'and counted');

# ---- Past cache_ttl + cache_grace: the key is gone.
$kms->reset_proxy;
$kms->fault(op => 'Decrypt', mode => '503', count => -1);
usleep(1_000_000 * ($ttl + $grace + 1 - (time() - $loaded)));
($out, $state, $err) = attempt();
is($state, '58000', 'past cache_ttl + cache_grace the outage is an error again');

# ---- A refusal is never graced.
$kms->reset_proxy;
$loaded = load_now();
$kms->fault(op => 'Decrypt', mode => 'disabled', count => -1);
usleep(1_000_000 * ($ttl + 1 - (time() - $loaded)));
($out, $state, $err) = attempt();
is($state, '55000', 'a disabled key is refused at once, grace or not');
like($err, qr/DisabledException/, "with the KMS's error");
$kms->reset_proxy;
$kms->fault(op => 'Decrypt', mode => 'access_denied', count => -1);
($out, $state) = attempt();
is($state, '42501', 'so is a key the KMS denies us');

# ---- 0 (the default): no grace.
$kms->reset_proxy;
$node->append_conf('postgresql.conf', "envelope.cache_grace = 0\n");
$node->reload;
sleep(1);
my $before = graced_loads();
$loaded = load_now();
$kms->fault(op => 'Decrypt', mode => '503', count => -1);
usleep(1_000_000 * ($ttl + 1 - (time() - $loaded)));
($out, $state) = attempt();
is($state, '58000', 'without cache_grace an outage past cache_ttl is an error');
is(graced_loads(), $before, 'and nothing is graced');
$kms->reset_proxy;

done_testing();
