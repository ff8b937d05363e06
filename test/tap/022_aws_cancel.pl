
# 022_aws_cancel.pl — a backend blocked on a hung KMS request can be stopped.
#
# The fault proxy accepts KMS requests and never answers.  pg_cancel_backend and
# statement_timeout must stop the waiting backend within a second (SQLSTATE
# 57014), long before envelope.kms_timeout, and pg_terminate_backend must end it.
# The same for hung credential endpoints: STS (web identity), ECS and IMDS.  The
# request loop polls for interrupts every 100 ms; a second is what doc/aws.md
# promises, with room for a loaded machine.

use strict;
use warnings;

use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time sleep);
use HTTP::Tiny;
use EnvelopeKms;

my $kms = EnvelopeKms->new;
my $key = $kms->create_key;

$ENV{AWS_ACCESS_KEY_ID}     = 'testing';
$ENV{AWS_SECRET_ACCESS_KEY} = 'testing';
delete $ENV{AWS_SESSION_TOKEN};
$ENV{AWS_EC2_METADATA_DISABLED} = 'true';

# a long KMS timeout and retries, so only the cancel can end the wait quickly
my $node = $kms->init_node('aws_cancel', key => $key->{Arn}, retries => 3,
	timeout => 60000);

$node->safe_psql('postgres', "SELECT envelope.create_tenant('acme')");
$node->safe_psql('postgres', "CREATE TABLE t AS SELECT envelope.encrypt('acme', 'x') AS c");
$node->safe_psql('postgres', "SELECT envelope.cache_flush()");

my $slow_sql = "SELECT envelope.decrypt_text('acme', c) FROM t";

# Start psql on a query that will hang in KMS; wait until the proxy holds it.
sub start_hung_query
{
	my ($sql) = @_;
	my ($out, $err) = ('', '');
	$node->safe_psql('postgres', "SELECT envelope.cache_flush()");
	my $h = IPC::Run::start(
		[
			'psql', '-X', '-v', 'VERBOSITY=verbose', '-d', $node->connstr('postgres'),
			'-c', $sql
		],
		'<', \undef, '>', \$out, '2>', \$err);
	my $deadline = time() + 30;
	until ($kms->count('Decrypt', 'faulted') >= 1)
	{
		die "query never reached the KMS" if time() > $deadline;
		sleep(0.05);
	}
	return ($h, \$out, \$err);
}

# Wait (bounded) for psql to end; returns seconds waited.
sub wait_done
{
	my ($h, $limit) = @_;
	my $t0 = time();
	while ($h->pumpable && time() - $t0 < $limit)
	{
		$h->pump_nb;
		sleep(0.02);
	}
	my $done = !$h->pumpable;
	eval { $h->finish; 1 } if $done;
	$h->kill_kill unless $done;
	return time() - $t0;
}

# After a cancel, the next query must get the key: nothing may stay "being loaded".
# Bounded by statement_timeout, so a leak fails the test instead of hanging it.
sub decrypts_again
{
	my ($what) = @_;
	$kms->reset_proxy;
	my ($out, $err) = ('', '');
	$node->psql('postgres', "SET statement_timeout = '20s'; $slow_sql",
		stdout => \$out, stderr => \$err, timeout => 60);
	is($out, 'x', "after $what, the next query decrypts") or diag($err);
}

# pg_cancel_backend
$kms->reset_proxy;
$kms->fault(op => 'Decrypt', mode => 'hang', count => -1, seconds => 60);
my ($h, $out, $err) = start_hung_query($slow_sql);
my $pid = $node->safe_psql('postgres',
	"SELECT pid FROM pg_stat_activity WHERE query LIKE '%decrypt_text%' AND state = 'active' AND pid <> pg_backend_pid()");
like($pid, qr/^\d+$/, 'the hung backend is visible');
my $t_cancel = time();
$node->safe_psql('postgres', "SELECT pg_cancel_backend($pid)");
my $waited = wait_done($h, 10);
cmp_ok($waited, '<', 1.0, sprintf('pg_cancel_backend ended the KMS wait in %.2fs', time() - $t_cancel));
like($$err, qr/ERROR:\s+57014: canceling statement due to user request/, 'SQLSTATE 57014');
is($kms->count('Decrypt', 'requests'), 1, 'no retry after a cancel');
decrypts_again('pg_cancel_backend');

# statement_timeout
$kms->reset_proxy;
$kms->fault(op => 'Decrypt', mode => 'hang', count => -1, seconds => 60);
$node->safe_psql('postgres', "SELECT envelope.cache_flush()");
my $t0 = time();
my ($state, $e) = EnvelopeKms::psql_error($node,
	"SET statement_timeout = '1s'; $slow_sql", timeout => 30);
my $elapsed = time() - $t0;
is($state, '57014', 'statement_timeout: SQLSTATE 57014');
like($e, qr/canceling statement due to statement timeout/, 'statement_timeout message');
cmp_ok($elapsed, '<', 2.0, sprintf('statement_timeout of 1s returned in %.2fs', $elapsed));
decrypts_again('statement_timeout');

# pg_terminate_backend
$kms->reset_proxy;
$kms->fault(op => 'Decrypt', mode => 'hang', count => -1, seconds => 60);
($h, $out, $err) = start_hung_query($slow_sql);
$pid = $node->safe_psql('postgres',
	"SELECT pid FROM pg_stat_activity WHERE query LIKE '%decrypt_text%' AND state = 'active' AND pid <> pg_backend_pid()");
$t0 = time();
$node->safe_psql('postgres', "SELECT pg_terminate_backend($pid)");
$waited = wait_done($h, 10);
cmp_ok($waited, '<', 1.0, sprintf('pg_terminate_backend ended it in %.2fs', $waited));
like($$err, qr/57P01|terminating connection/, 'terminated');

decrypts_again('pg_terminate_backend');

# A hung credential endpoint (here STS, for web identity) is cut short the same way:
# the credential chain's requests poll for interrupts like KMS requests do.
my $tokdir = PostgreSQL::Test::Utils::tempdir;
open my $fh, '>', "$tokdir/web-token" or die;
print $fh "eyJhbGciOiJSUzI1NiJ9.pg-envelope-test.signature\n";
close $fh;
delete @ENV{qw(AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_SESSION_TOKEN)};
$ENV{AWS_SHARED_CREDENTIALS_FILE} = "$tokdir/none";
$ENV{AWS_CONFIG_FILE}             = "$tokdir/none";
$ENV{AWS_WEB_IDENTITY_TOKEN_FILE} = "$tokdir/web-token";
$ENV{AWS_ROLE_ARN}                = 'arn:aws:iam::123456789012:role/pg-envelope-hung';
$ENV{AWS_ENDPOINT_URL_STS}        = $kms->proxy_url;
$node->restart;
$kms->reset_proxy;
$kms->fault(op => 'other', mode => 'hang', count => -1, seconds => 60);
$t0 = time();
($state, $e) = EnvelopeKms::psql_error($node,
	"SET statement_timeout = '1s'; SELECT envelope.create_tenant('hung_sts')", timeout => 30);
$elapsed = time() - $t0;
is($state, '57014', 'hung STS: statement_timeout cancels the credential fetch') or diag($e);
cmp_ok($elapsed, '<', 2.0, sprintf('hung STS: statement_timeout of 1s returned in %.2fs', $elapsed));
is($kms->count('other', 'faulted'), 1, 'hung STS: the backend was waiting on STS');
is($kms->count('GenerateDataKey', 'requests'), 0, 'hung STS: KMS was never asked');
$kms->reset_proxy;

# Hung ECS and IMDS credential endpoints (credential_stub.py holds the request): both
# statement_timeout and pg_cancel_backend end the fetch within a second.
my $stub = $kms->start_credential_stub;
sub stub_get
{
	my ($path) = @_;
	my $r = HTTP::Tiny->new(timeout => 10)->get("$stub$path");
	die "credential stub $path: $r->{status}" unless $r->{success};
}
my %source_env = (
	ecs => {
		AWS_CONTAINER_CREDENTIALS_FULL_URI => "$stub/ecs/creds",
		AWS_CONTAINER_AUTHORIZATION_TOKEN  => 'ecs-auth-token' },
	imds => { AWS_EC2_METADATA_SERVICE_ENDPOINT => $stub });
for my $source (qw(ecs imds))
{
	delete @ENV{qw(AWS_WEB_IDENTITY_TOKEN_FILE AWS_ROLE_ARN AWS_ENDPOINT_URL_STS
		AWS_CONTAINER_CREDENTIALS_FULL_URI AWS_CONTAINER_AUTHORIZATION_TOKEN
		AWS_EC2_METADATA_SERVICE_ENDPOINT AWS_EC2_METADATA_DISABLED)};
	$ENV{AWS_EC2_METADATA_DISABLED} = 'true' if $source ne 'imds';
	$ENV{$_} = $source_env{$source}{$_} for keys %{ $source_env{$source} };
	$node->restart;
	$kms->reset_proxy;
	stub_get('/_reset');
	stub_get("/_set?hang=$source&hang_seconds=60");

	$t0 = time();
	($state, $e) = EnvelopeKms::psql_error($node,
		"SET statement_timeout = '1s'; SELECT envelope.create_tenant('hung_$source')", timeout => 30);
	$elapsed = time() - $t0;
	is($state, '57014', "hung $source: statement_timeout cancels the credential fetch") or diag($e);
	cmp_ok($elapsed, '<', 2.0, sprintf("hung $source: statement_timeout of 1s returned in %.2fs", $elapsed));
	cmp_ok($kms->stub_counts->{"hung $source"} // 0, '>=', 1, "hung $source: the backend was waiting on $source");
	is($kms->count('GenerateDataKey', 'requests'), 0, "hung $source: KMS was never asked");

	stub_get('/_reset');
	my ($out, $err) = ('', '');
	my $h = IPC::Run::start(
		[ 'psql', '-X', '-v', 'VERBOSITY=verbose', '-d', $node->connstr('postgres'),
		  '-c', "SELECT envelope.create_tenant('hung_${source}_2')" ],
		'<', \undef, '>', \$out, '2>', \$err);
	my $deadline = time() + 30;
	until (($kms->stub_counts->{"hung $source"} // 0) >= 1)
	{
		die "the backend never asked $source" if time() > $deadline;
		sleep(0.05);
	}
	$pid = $node->safe_psql('postgres',
		"SELECT pid FROM pg_stat_activity WHERE query LIKE '%create_tenant%' AND state = 'active' AND pid <> pg_backend_pid()");
	$t0 = time();
	$node->safe_psql('postgres', "SELECT pg_cancel_backend($pid)");
	$waited = wait_done($h, 10);
	cmp_ok($waited, '<', 1.0, sprintf("hung $source: pg_cancel_backend ended the fetch in %.2fs", $waited));
	like($err, qr/ERROR:\s+57014: canceling statement due to user request/, "hung $source: SQLSTATE 57014");
	stub_get('/_set?hang=none');
}

$node->stop;
$kms->stop;
done_testing();
