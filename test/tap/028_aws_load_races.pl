# 028_aws_load_races.pl — revocations and failures while a KMS load is in flight.
#
# The fault proxy holds a KMS Decrypt (mode "hold": forwarded to moto only when the
# test releases it), so a load is in flight for as long as the test wants:
#   - a cache_flush, and a destroy_tenant, committed during the load: the DEK that
#     arrives afterwards must not be published in the shared cache (the entry was
#     doomed), so the next backend asks the KMS again and the DEK is nowhere in shared
#     memory (searched for through /proc by test/kms/memory_probe.py);
#   - a load that fails while another backend waits for it: the waiter gets "the KMS
#     call of another backend failed", and neither statement reaches the server log.

use strict;
use warnings;

use File::Basename qw(dirname);
use Cwd qw(abs_path);
use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time sleep);
use EnvelopeKms;
use EnvelopeLog qw(log_lacks_dek);

my $python = $ENV{ENVELOPE_PYTHON} || 'python3';
my $probe = abs_path(dirname(__FILE__) . '/../kms/memory_probe.py');
system($python, '-c', 'import cryptography') == 0
  or BAIL_OUT("$python cannot import cryptography: this test cannot run");

my $kms = EnvelopeKms->new;
my $key = $kms->create_key;

$ENV{AWS_ACCESS_KEY_ID}     = 'testing';
$ENV{AWS_SECRET_ACCESS_KEY} = 'testing';
delete $ENV{AWS_SESSION_TOKEN};
$ENV{AWS_EC2_METADATA_DISABLED} = 'true';

my $node = $kms->init_node('aws_load_races', key => $key->{Arn}, retries => 0,
	timeout => 60000,
	extra_conf => "log_min_error_statement = error\nlog_statement = none\n");
my $postmaster_pid = (split /\n/, slurp_file($node->data_dir . '/postmaster.pid'))[0];

$node->safe_psql('postgres', q{
SELECT envelope.create_tenant(t) FROM unnest(ARRAY['flushed', 'destroyed', 'failing']) t;
CREATE TABLE t AS SELECT tenant, envelope.encrypt(tenant, 'secret of ' || tenant) AS c
  FROM unnest(ARRAY['flushed', 'destroyed', 'failing']) tenant;
});
my %dek = map { ($_ => $kms->dek_of($node, $_, 1)) } qw(flushed destroyed failing);

sub sql { return $node->safe_psql('postgres', $_[0]); }
sub entries { return sql('SELECT entries FROM envelope.cache_stats'); }

sub dek_hits
{
	my ($dek) = @_;
	my $out = `$python $probe find $postmaster_pid $dek`;
	my ($n) = $out =~ /^hits (\d+)$/m;
	die "memory probe failed: $out" unless defined $n;
	return $n;
}

# Start psql on $sql in the background; returns (handle, \stdout, \stderr).
sub start_psql
{
	my ($sql) = @_;
	my ($out, $err) = ('', '');
	my $h = IPC::Run::start(
		[ 'psql', '-X', '-A', '-t', '-v', 'VERBOSITY=verbose', '-d', $node->connstr('postgres'), '-c', $sql ],
		'<', \undef, '>', \$out, '2>', \$err);
	return ($h, \$out, \$err);
}

sub wait_until
{
	my ($what, $cond) = @_;
	my $deadline = time() + 30;
	until ($cond->())
	{
		die "timed out waiting until $what" if time() > $deadline;
		sleep(0.05);
	}
}

sub finish
{
	my ($h) = @_;
	my $deadline = time() + 30;
	while ($h->pumpable && time() < $deadline) { $h->pump_nb; sleep(0.02); }
	if ($h->pumpable) { $h->kill_kill; return 0; }
	eval { $h->finish; 1 };
	return 1;
}

# A load held in the proxy, and $revoke committed meanwhile; then the load arrives.
sub load_during
{
	my ($tenant, $revoke) = @_;
	sql('SELECT envelope.cache_flush()');
	$kms->reset_proxy;
	$kms->fault(op => 'Decrypt', mode => 'hold', count => 1, seconds => 60);
	my ($h, $out, $err) = start_psql("SELECT envelope.decrypt_text(tenant, c) FROM t WHERE tenant = '$tenant'");
	wait_until("the load of $tenant is held", sub { $kms->count('Decrypt', 'faulted') >= 1 });
	is(entries(), 1, "$tenant: the load is in flight (one LOADING entry)");
	sql($revoke);
	$kms->release;
	ok(finish($h), "$tenant: the loading statement ended") or diag($$err);
	note("$tenant: the loading statement said: $$out $$err");
	return ($$out, $$err);
}

# ---- cache_flush during the load
load_during('flushed', 'SELECT envelope.cache_flush()');
is(entries(), 0, 'flushed: the DEK that arrived after the flush was not published');
is(dek_hits($dek{flushed}), 0, 'flushed: the DEK is nowhere in shared memory');
my $before = $kms->count('Decrypt', 'requests');
is(sql("SELECT envelope.decrypt_text(tenant, c) FROM t WHERE tenant = 'flushed'"), 'secret of flushed',
	'flushed: the next backend decrypts');
is($kms->count('Decrypt', 'requests') - $before, 1, 'flushed: after asking the KMS again');

# ---- destroy_tenant during the load
load_during('destroyed', "SELECT envelope.destroy_tenant('destroyed', 'destroyed')");
is(entries(), 0, 'destroyed: the DEK that arrived after the destroy was not published');
is(dek_hits($dek{destroyed}), 0, 'destroyed: the DEK is nowhere in shared memory');
my ($state, $err) = EnvelopeKms::psql_error($node,
	"SELECT envelope.decrypt_text(tenant, c) FROM t WHERE tenant = 'destroyed'");
like($err, qr/tenant "destroyed" has been destroyed/, 'destroyed: the next backend is refused');

# ---- a failed load with a waiter: both errors, neither statement in the log
sql('SELECT envelope.cache_flush()');
$kms->reset_proxy;
$kms->fault(op => 'Decrypt', mode => 'hang', count => 1, seconds => 60);
my ($loader, $lout, $lerr) = start_psql(
	"SELECT envelope.decrypt_text(tenant, c, 'load-race-literal-loader') FROM t WHERE tenant = 'failing'");
wait_until('the load of failing hangs', sub { $kms->count('Decrypt', 'faulted') >= 1 });
my ($waiter, $wout, $werr) = start_psql(
	"SELECT envelope.decrypt_text(tenant, c, 'load-race-literal-waiter') FROM t WHERE tenant = 'failing'");
wait_until('the second backend waits for the load', sub {
	sql(q{SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Extension'
	        AND query LIKE '%load-race-literal-waiter%'}) == 1 });
$kms->release;
ok(finish($loader) && finish($waiter), 'both statements ended');
like($$lerr, qr/KMS Decrypt failed for key version 1 of tenant "failing"/, 'the loader reports the KMS failure');
like($$werr, qr/the KMS call of another backend failed/, 'the waiter reports the loader\'s failure');
is($kms->count('Decrypt', 'requests'), 1, 'one KMS call for both backends');
$kms->reset_proxy;
is(sql("SELECT envelope.decrypt_text(tenant, c) FROM t WHERE tenant = 'failing'"), 'secret of failing',
	'the next statement loads the key');

$node->stop;
my $log = slurp_file($node->logfile);
like($log, qr/the KMS call of another backend failed/, 'the waiter\'s error is logged');
unlike($log, qr/load-race-literal/, 'neither failing statement is in the server log');
log_lacks_dek($log, $dek{$_}, "DEK of $_") for sort keys %dek;
$kms->stop;
done_testing();
