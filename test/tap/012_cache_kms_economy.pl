# The shared cache against a real KMS protocol (moto behind the fault proxy, which
# counts requests): 8 backends touching 200 tenants from a cold cache make exactly 200
# KMS Decrypt calls, and backends waiting on another backend's KMS call share its
# failure instead of each calling the KMS again.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use IPC::Run;
use Test::More;
use EnvelopeKms;

my $ntenants = 200;
my $nbackends = 8;

my $kms = EnvelopeKms->new;
my $key = $kms->create_key;
$ENV{AWS_ACCESS_KEY_ID}     = 'testing';
$ENV{AWS_SECRET_ACCESS_KEY} = 'testing';
delete $ENV{AWS_SESSION_TOKEN};
$ENV{AWS_EC2_METADATA_DISABLED} = 'true';

my $node = $kms->init_node('kms_economy', key => $key->{Arn}, retries => 0, timeout => 1000,
	extra_conf => "max_connections = 40\n");
sub sql { return $node->safe_psql('postgres', $_[0]); }

sql(qq{
SELECT count(envelope.create_tenant('t' || i)) FROM generate_series(1, $ntenants) i;
CREATE TABLE data AS
SELECT 't' || i AS tenant, envelope.encrypt('t' || i, 'value ' || i) AS v
  FROM generate_series(1, $ntenants) i;
SELECT envelope.cache_flush();
});

# Run the same query in N backends at once; returns their outputs and errors.
sub concurrently
{
	my ($n, @commands) = @_;
	my @runs;
	for (1 .. $n)
	{
		my ($out, $err) = ('', '');
		my $h = IPC::Run::start([ 'psql', '-X', '-A', '-t', '-d', $node->connstr('postgres'), map { ('-c', $_) } @commands ],
			'>', \$out, '2>', \$err, IPC::Run::timeout(120));
		push @runs, [ $h, \$out, \$err ];
	}
	$_->[0]->finish for @runs;
	return map { [ ${ $_->[1] }, ${ $_->[2] } ] } @runs;
}

$kms->reset_proxy;
my $stats_before = sql('SELECT kms_decrypt_calls FROM envelope.cache_stats');
my @results = concurrently($nbackends,
	"SELECT count(*) FROM data WHERE envelope.decrypt_text(tenant, v) = 'value ' || substr(tenant, 2)");
is(scalar(grep { $_->[0] =~ /^$ntenants$/m } @results), $nbackends,
	"$nbackends backends each decrypted all $ntenants tenants")
  or diag(join("\n", map { "$_->[0] $_->[1]" } @results));
is($kms->count('Decrypt', 'forwarded'), $ntenants,
	"the KMS saw exactly $ntenants Decrypt calls for $ntenants keys (proxy count)");
is(sql('SELECT kms_decrypt_calls FROM envelope.cache_stats') - $stats_before, $ntenants, 'cache_stats agrees');
is(sql('SELECT kms_errors FROM envelope.cache_stats'), 0, 'no KMS errors');

# A KMS call that hangs past envelope.kms_timeout, with 4 backends waiting on the same
# key: one request reaches the KMS, and every backend gets an error with its SQLSTATE.
sql('SELECT envelope.cache_flush()');
$kms->reset_proxy;
$kms->fault(op => 'Decrypt', mode => 'hang', count => 1, seconds => 5);
@results = concurrently(4, '\set VERBOSITY verbose',
	"SELECT envelope.decrypt_text(tenant, v) FROM data WHERE tenant = 't1'");
is($kms->count('Decrypt', 'requests'), 1, 'one KMS request for 4 backends missing the same key');
is(scalar(grep { $_->[1] =~ /ERROR:\s+58000:/ } @results), 4, 'all 4 backends failed with 58000')
  or diag(join("\n", map { $_->[1] } @results));
ok(scalar(grep { $_->[1] =~ /the KMS call of another backend failed/ } @results) >= 1,
	'the waiters say the failure came from another backend\'s call');

# The failure is not cached: the next attempt asks the KMS again and succeeds.
$kms->reset_proxy;
is(sql("SELECT envelope.decrypt_text(tenant, v) FROM data WHERE tenant = 't1'"), 'value 1',
	'after the failure, the next caller loads the key');
is($kms->count('Decrypt', 'forwarded'), 1, 'with one new KMS call');

# A loader canceled by its own statement_timeout is no answer about the key: the
# backends waiting on it take over the load and succeed.
sql('SELECT envelope.cache_flush()');
$kms->reset_proxy;
$kms->fault(op => 'Decrypt', mode => 'hang', count => 1, seconds => 5);
my ($lout, $lerr) = ('', '');
my $loader = IPC::Run::start(
	[ 'psql', '-X', '-A', '-t', '-d', $node->connstr('postgres'),
	  '-c', "SET statement_timeout = '400ms'",
	  '-c', "SELECT envelope.decrypt_text(tenant, v) FROM data WHERE tenant = 't2'" ],
	'>', \$lout, '2>', \$lerr, IPC::Run::timeout(60));
select(undef, undef, undef, 0.2);
@results = concurrently(3, "SELECT envelope.decrypt_text(tenant, v) FROM data WHERE tenant = 't2'");
$loader->finish;
like($lerr, qr/canceling statement due to statement timeout/, 'the loader was canceled');
is(scalar(grep { $_->[0] =~ /^value 2$/m } @results), 3, 'the 3 waiters still got the key')
  or diag(join("\n", map { "$_->[0] $_->[1]" } @results));
is($kms->count('Decrypt', 'requests'), 2, 'one of them asked the KMS again, once');

$node->stop;
$kms->stop;
done_testing();
