
# 021_aws_faults.pl — a misbehaving KMS, through the fault proxy, seen from SQL.
#
# With envelope.kms_retries = 2: faults that clear up within the budget are invisible
# (and cost exactly one extra request each), faults that outlast it end in 1 + 2
# requests and one clean error, and errors that no retry can cure are raised after a
# single request.  Each error names the operation and AWS's error type, carries a
# fitting SQLSTATE, and never a body, a header or a key.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);
use EnvelopeKms;

my $kms = EnvelopeKms->new;
my $key = $kms->create_key;

$ENV{AWS_ACCESS_KEY_ID}     = 'testing';
$ENV{AWS_SECRET_ACCESS_KEY} = 'testing';
delete $ENV{AWS_SESSION_TOKEN};
$ENV{AWS_EC2_METADATA_DISABLED} = 'true';

my $node = $kms->init_node('aws_faults', key => $key->{Arn}, retries => 2,
	timeout => 3000);

sub sql { return $node->safe_psql('postgres', $_[0]); }

sql("SELECT envelope.create_tenant('acme')");
sql("CREATE TABLE t AS SELECT envelope.encrypt('acme', 'top secret') AS c");

my $decrypt = "SELECT envelope.cache_flush(); SELECT envelope.decrypt_text('acme', c) FROM t";

# Faults that clear up: [mode, count, requests seen]
for my $case (
	[ 'throttle', 1, 2 ],
	[ '429',      1, 2 ],
	[ '500',      2, 3 ],
	[ '503',      1, 2 ],
	[ 'reset',    1, 2 ],
	[ 'expired_token', 1, 2 ])
{
	my ($mode, $count, $requests) = @$case;
	$kms->reset_proxy;
	$kms->fault(op => 'Decrypt', mode => $mode, count => $count);
	my $got = $node->safe_psql('postgres', $decrypt);
	like($got, qr/top secret$/, "$mode x$count: decrypts after retrying");
	is($kms->count('Decrypt', 'faulted'),   $count, "$mode x$count: faulted requests");
	is($kms->count('Decrypt', 'forwarded'), 1,      "$mode x$count: then one reached KMS");
	is($kms->count('Decrypt', 'requests'),  $requests, "$mode x$count: $requests requests in all");
}

# Faults that outlast the retries, and faults never retried:
#   [mode, SQLSTATE, error type in the message, requests seen]
for my $case (
	[ 'throttle',       '53400', 'ThrottlingException',       3 ],
	[ '429',            '53400', 'throttled',                 3 ],
	[ '500',            '58000', 'KMSInternalException',      3 ],
	[ '503',            '58000', 'unavailable',               3 ],
	[ 'reset',          '58000', 'unavailable',               undef ],
	[ 'disabled',       '55000', 'DisabledException',         1 ],
	[ 'invalid_state',  '55000', 'KMSInvalidStateException',  1 ],
	[ 'access_denied',  '42501', 'AccessDeniedException',     1 ],
	[ 'xml_auth_error', '28000', 'InvalidClientTokenId',      1 ],
	[ 'garbage',        '58000', 'protocol error',            1 ],
	[ 'big',            '58000', 'protocol error',            1 ],
	[ 'short_plaintext', '58000', 'protocol error',           1 ],
	[ 'wrong_keyid',    '58000', 'protocol error',            1 ],
	[ 'expired_token',  '28000', 'ExpiredTokenException',     2 ])
{
	my ($mode, $sqlstate, $type, $requests) = @$case;
	$kms->reset_proxy;
	$kms->fault(op => 'Decrypt', mode => $mode, count => -1);
	my ($state, $err) = EnvelopeKms::psql_error($node, $decrypt);
	is($state, $sqlstate, "$mode: SQLSTATE $sqlstate");
	like($err, qr/KMS Decrypt failed for key version 1 of tenant "acme": \Q$type\E/,
		"$mode: error names the operation and $type");
	unlike($err, qr/top secret|Rate exceeded|<Message>|testing/,
		"$mode: no body or credential in the error");
	if (defined $requests)
	{
		is($kms->count('Decrypt', 'requests'), $requests, "$mode: $requests requests");
	}
	else
	{
		# libcurl silently re-sends once on a reused connection that died unanswered
		my $n = $kms->count('Decrypt', 'requests');
		ok($n >= 3 && $n <= 6, "$mode: 3 attempts ($n requests)");
	}
}

# a KMS that never answers: each attempt times out (and is retried), then 58000
$kms->reset_proxy;
$kms->fault(op => 'Decrypt', mode => 'hang', count => -1, seconds => 30);
my $t0 = time();
my ($st, $e) = EnvelopeKms::psql_error($node, "SET envelope.kms_timeout = '300ms'; $decrypt");
my $took = time() - $t0;
is($st, '58000', 'hung KMS: system_error after the timeouts');
like($e, qr/KMS Decrypt failed for key version 1 of tenant "acme": timeout/, 'says timeout');
is($kms->count('Decrypt', 'requests'), 3, 'hung KMS: 3 attempts of 300 ms');
cmp_ok($took, '<', 5, sprintf('and gave up in %.1fs', $took));

# a body that trickles in is cut off by the same limit
$kms->reset_proxy;
$kms->fault(op => 'Decrypt', mode => 'slow_body', count => -1, seconds => 30);
($st) = EnvelopeKms::psql_error($node,
	"SET envelope.kms_timeout = '500ms'; SET envelope.kms_retries = 0; $decrypt");
is($st, '58000', 'slow body: cut off by kms_timeout');

# throttled GenerateDataKey: the retry count holds for every operation
$kms->reset_proxy;
$kms->fault(op => 'GenerateDataKey', mode => 'throttle', count => 2);
is(sql("SELECT envelope.rotate_tenant_key('acme')"), '2', 'rotation succeeds after 2 throttles');
is($kms->count('GenerateDataKey', 'requests'), 3, 'GenerateDataKey: 3 requests');

# kms_retries = 0: the first throttle is final
$kms->reset_proxy;
$kms->fault(op => 'Decrypt', mode => 'throttle', count => -1);
my ($state) = EnvelopeKms::psql_error($node, "SET envelope.kms_retries = 0; $decrypt");
is($state, '53400', 'kms_retries = 0: throttled at once');
is($kms->count('Decrypt', 'requests'), 1, 'kms_retries = 0: one request');

# A KMS outage never stops the server from starting.  First a KMS that accepts
# connections and never answers, with a KMS timeout far longer than any start: the
# restart must not wait for it, and only statements that need a DEK not yet cached
# fail.  When the KMS answers again, the same server recovers without a restart.
$kms->reset_proxy;
$kms->fault(op => '*', mode => 'hang', count => -1, seconds => 120);
$node->append_conf('postgresql.conf', "envelope.kms_timeout = '60s'\n");
$t0 = time();
$node->restart;
$took = time() - $t0;
cmp_ok($took, '<', 10, sprintf('hung KMS: the server restarted in %.1fs', $took));
is(sql("SELECT 1"), '1', 'hung KMS: the server serves queries');
is(sql("SELECT count(*) FROM envelope.tenant_keys"), '2', 'hung KMS: the key store reads');
is($kms->counts->{total}{requests}, 0, 'hung KMS: nothing asked the KMS during start');
($state) = EnvelopeKms::psql_error($node,
	"SET envelope.kms_timeout = '300ms'; SET envelope.kms_retries = 0; $decrypt");
is($state, '58000', 'hung KMS: a statement that needs a DEK fails cleanly');
$kms->reset_proxy;
like($node->safe_psql('postgres', $decrypt), qr/top secret$/,
	'KMS back: the same server decrypts again, no restart needed');

# Then an endpoint that refuses connections.
$node->append_conf('postgresql.conf', "envelope.aws_endpoint = 'http://127.0.0.1:1'\n");
$node->restart;
($state, my $err) = EnvelopeKms::psql_error($node, $decrypt);
is($state, '58000', 'endpoint refusing connections: system_error');
like($err, qr/KMS Decrypt failed/, 'error names the operation');
is(sql("SELECT 1"), '1', 'the server started and serves queries without its KMS');

$node->stop;
$kms->stop;
done_testing();
