
# 033_aws_rate_limit.pl — envelope.kms_max_requests_per_second: one request bucket for
# the whole server, and a rate that shrinks when the KMS throttles.
#
# 32 backends read the values of 160 tenants on a cold cache (cache_flush, and new
# sessions with empty first levels), so 160 Decrypts want out at once.  The fault
# proxy plays a KMS request quota (mode "rate": ThrottlingException while it has
# forwarded R requests in the last second) and logs the arrival time of every request.
#   - quota N, limit N: no one-second window at the proxy holds more than N requests
#     (plus one, for the scheduling jitter between the server releasing a request and
#     the proxy reading it: the bucket holds one token, so there is no burst to allow),
#     and every value decrypts;
#   - quota N/2, limit N: the throttling answers lower the rate (adaptive, CUBIC-shaped),
#     so few requests are throttled, and every value still decrypts;
#   - a wait for the bucket ends at statement_timeout and at pg_cancel_backend;
#   - envelope.check() shows the limiter.

use strict;
use warnings;

use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time sleep);
use EnvelopeKms;

my $rate     = 20;     # envelope.kms_max_requests_per_second
my $tenants  = 160;
my $backends = 32;

my $kms = EnvelopeKms->new;
my $key = $kms->create_key;

$ENV{AWS_ACCESS_KEY_ID}     = 'testing';
$ENV{AWS_SECRET_ACCESS_KEY} = 'testing';
delete $ENV{AWS_SESSION_TOKEN};
$ENV{AWS_EC2_METADATA_DISABLED} = 'true';

# Retries enough that a throttled request gets through in the end; a generous
# timeout, because 32 backends share two slow cores with moto.
my $node = $kms->init_node('aws_rate_limit', key => $key->{Arn}, retries => 10,
	timeout => 30000, extra_conf => "max_connections = 60\n");

sub sql { return $node->safe_psql('postgres', $_[0]); }

sql(qq{
SELECT envelope.create_tenant('t' || i) FROM generate_series(1, $tenants) i;
CREATE TABLE t AS
  SELECT i, 't' || i AS tenant, envelope.encrypt('t' || i, 'value ' || i) AS c
  FROM generate_series(1, $tenants) i;
});

sub set_limit
{
	my ($n) = @_;
	$node->append_conf('postgresql.conf', "envelope.kms_max_requests_per_second = $n\n");
	$node->reload;
	# every process reads the file at its next command; the worker within a second
	sleep(1);
}

# Cold cache, fresh proxy (playing a quota of $quota requests per second, if given),
# 32 backends each reading its share of the tenants.  Returns (seconds, number of
# values decrypted, errors).
sub cold_read
{
	my ($quota) = @_;
	sql('SELECT envelope.cache_flush()');
	$kms->reset_proxy;
	$kms->fault(op => '*', mode => 'rate', rate => $quota, count => -1) if $quota;
	my @runs;
	my $t0 = time();
	for my $b (0 .. $backends - 1)
	{
		my ($out, $err) = ('', '');
		my $h = IPC::Run::start(
			[
				'psql', '-X', '-A', '-t', '-d', $node->connstr('postgres'), '-c',
				"SELECT count(*) FROM t WHERE i % $backends = $b"
				  . " AND envelope.decrypt_text(tenant, c) = 'value ' || i"
			],
			'<', \undef, '>', \$out, '2>', \$err,
			IPC::Run::timeout(180));
		push @runs, [ $h, \$out, \$err ];
	}
	my ($decrypted, $errors) = (0, '');
	for my $r (@runs)
	{
		eval { $r->[0]->finish; };
		$errors .= $@ if $@;
		$errors .= ${ $r->[2] };
		$decrypted += ${ $r->[1] } =~ /^(\d+)$/m ? $1 : 0;
	}
	return (time() - $t0, $decrypted, $errors);
}

# The most requests the proxy saw in any one-second window [t, t + 1).
sub busiest_second
{
	my ($arrivals) = @_;
	my @t = sort { $a <=> $b } map { $_->[0] } @$arrivals;
	my ($max, $j) = (0, 0);
	for my $i (0 .. $#t)
	{
		$j++ while $j <= $#t && $t[$j] < $t[$i] + 1.0;
		$max = $j - $i if $j - $i > $max;
	}
	return $max;
}

sub throttled { return scalar grep { $_->[2] ne 'forwarded' } @{ $_[0] }; }

# ---- No limit: the cold start goes out as fast as the backends can ask.
my ($secs, $n, $errors) = cold_read();
is($n, $tenants, 'without a limit every value decrypts');
my $arrivals = $kms->arrivals;
my $unlimited_peak = busiest_second($arrivals);
diag(sprintf('no limit: %d requests in %.1f s, busiest second %d',
		scalar @$arrivals, $secs, $unlimited_peak));

# ---- Quota N, limit N.
set_limit($rate);
($secs, $n, $errors) = cold_read($rate);
is($n, $tenants, "with the limit at the quota every value decrypts ($secs s)");
is($errors, '', 'and no session saw an error');
$arrivals = $kms->arrivals;
my $peak = busiest_second($arrivals);
cmp_ok($peak, '<=', $rate + 1,
	"no one-second window holds more than the limit ($peak requests, limit $rate)");
cmp_ok($secs, '>=', ($tenants - $rate) / $rate,
	sprintf('the requests were paced (%.1f s for %d)', $secs, scalar @$arrivals));
my $throttled_at_quota = throttled($arrivals);
cmp_ok($throttled_at_quota, '<=', 5,
	"the KMS hardly ever had to throttle ($throttled_at_quota throttling answers)");

my $check = sql("SELECT status || ' ' || detail FROM envelope.check() WHERE name = 'kms_rate_limit'");
like($check, qr/envelope\.kms_max_requests_per_second = $rate; /, 'check() shows the limit');
like($check, qr/one shared bucket/, 'one bucket for the whole server');
my ($waited) = $check =~ /requests, (\d+) of which waited/;
cmp_ok($waited // 0, '>', $backends, "check() counts the requests that waited ($waited)");

# ---- Quota N/2, limit N: the throttling answers shrink the rate.
my $quota = $rate / 2;
($secs, $n, $errors) = cold_read($quota);
is($n, $tenants, "with the quota below the limit every value still decrypts ($secs s)");
is($errors, '', 'and no session saw an error');
$arrivals = $kms->arrivals;
my $throttled = throttled($arrivals);
my $forwarded = scalar(@$arrivals) - $throttled;
diag("quota $quota/s under a limit of $rate/s: $forwarded forwarded, $throttled throttled, "
	  . 'busiest second ' . busiest_second($arrivals));
cmp_ok($throttled, '<=', $tenants / 8,
	"the adaptive rate keeps throttling answers few ($throttled for $forwarded requests)");
$check = sql("SELECT detail FROM envelope.check() WHERE name = 'kms_rate_limit'");
my ($seen) = $check =~ /(\d+) throttling answers/;
cmp_ok($seen // 0, '>=', 1, "check() counts the throttling answers ($seen)");
$kms->reset_proxy;

# ---- A wait for the bucket ends at statement_timeout and at pg_cancel_backend.
set_limit(1);
sql('SELECT envelope.cache_flush()');
my ($ret, $out, $err) = $node->psql('postgres',
	"SET statement_timeout = '1500ms'; SELECT count(envelope.decrypt_text(tenant, c)) FROM t",
	extra_params => [ '-v', 'VERBOSITY=verbose' ]);
like($err, qr/57014.*statement timeout/s, 'statement_timeout ends a wait for the bucket');

sql('SELECT envelope.cache_flush()');
my ($cout, $cerr) = ('', '');
my $t0 = time();
my $h = IPC::Run::start(
	[
		'psql', '-X', '-v', 'VERBOSITY=verbose', '-d', $node->connstr('postgres'),
		'-c', "SELECT /* waiting */ count(envelope.decrypt_text(tenant, c)) FROM t"
	],
	'<', \undef, '>', \$cout, '2>', \$cerr);
sleep(2);
sql("SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE query LIKE '%/* waiting */%'"
	  . ' AND pid <> pg_backend_pid()');
my $t1 = time();
$h->finish;
my $ended = time() - $t1;
like($cerr, qr/57014.*canceling statement due to user request/s,
	'pg_cancel_backend ends a wait for the bucket');
cmp_ok($ended, '<', 2, sprintf('at once (%.2f s)', $ended));

done_testing();
