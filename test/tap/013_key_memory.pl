# Where a plaintext DEK lives: only in the shared key cache, in pages excluded from core
# dumps and locked in memory, and nowhere in it once flushed, evicted or destroyed.
# The DEK is recomputed from the local provider's key file and searched for in the
# postmaster's mapping of shared memory through /proc/PID/mem.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use EnvelopeLocal qw(new_master_key local_node);
use File::Basename qw(dirname);
use Cwd qw(abs_path);

my $python = $ENV{ENVELOPE_PYTHON} || 'python3';
my $probe = abs_path(dirname(__FILE__) . '/../kms/memory_probe.py');
system($python, '-c', 'import cryptography') == 0
  or BAIL_OUT("$python cannot import cryptography: this test cannot run");

my ($keyfile) = new_master_key();
# Pages locked with mlock() are what this test looks for; a segment in huge pages
# (huge_pages = try takes them wherever the machine reserves them) is never swapped but
# shows no "lo" flag: test/tap/037_huge_pages.pl covers that case.
my $node = local_node('memory', $keyfile, "envelope.cache_size = 16\nhuge_pages = off\n");
$node->start;
my $postmaster_pid = (split /\n/, slurp_file($node->data_dir . '/postmaster.pid'))[0];
sub sql { return $node->safe_psql('postgres', $_[0]); }

sql(q{
CREATE EXTENSION pg_envelope;
SELECT envelope.create_tenant('t' || i) FROM generate_series(1, 20) i;
CREATE TABLE data AS SELECT 't' || i AS tenant, envelope.encrypt('t' || i, 'v') AS v
  FROM generate_series(1, 20) i;
SELECT envelope.cache_flush();
});

sub dek_of
{
	my ($tenant) = @_;
	my ($key_id, $wrapped) = split /\|/, sql(
		"SELECT kms_key, encode(wrapped_dek, 'hex') FROM envelope.data_key WHERE tenant = '$tenant' AND version = 1");
	my $dek = `$python $probe unwrap $keyfile $key_id $tenant 1 $wrapped`;
	chomp $dek;
	die "could not unwrap the DEK of $tenant" unless $dek =~ /^[0-9a-f]{64}$/;
	return $dek;
}

sub hits
{
	my ($dek) = @_;
	my $out = `$python $probe find $postmaster_pid $dek`;
	my ($n) = $out =~ /^hits (\d+)$/m;
	die "memory probe failed: $out" unless defined $n;
	return ($n, $out);
}

my $dek1 = dek_of('t1');
my ($n, $out) = hits($dek1);
is($n, 0, 'a DEK is in no shared memory before it is used');

sql("SELECT envelope.decrypt(tenant, v) FROM data WHERE tenant = 't1'");
($n, $out) = hits($dek1);
is($n, 1, 'once used, the DEK is in shared memory exactly once');
like($out, qr/flags=.*\bdd\b/, 'its pages are excluded from core dumps (MADV_DONTDUMP)');
like($out, qr/flags=.*\blo\b/, 'and locked in memory');

sql('SELECT envelope.cache_flush()');
($n) = hits($dek1);
is($n, 0, 'cache_flush zeroes it');

# Eviction: 17 more keys through a 16-entry cache push t1 out.
sql("SELECT envelope.decrypt(tenant, v) FROM data WHERE tenant = 't1'");
is((hits($dek1))[0], 1, 't1 is cached again');
sql("SELECT count(envelope.decrypt(tenant, v)) FROM data WHERE tenant <> 't1'");
ok(sql('SELECT evictions FROM envelope.cache_stats') > 0, 'keys were evicted');
is((hits($dek1))[0], 0, 'the evicted DEK was zeroed');

# Destroy: the DEK leaves shared memory when the destroy commits.
my $dek5 = dek_of('t5');
sql('SELECT envelope.cache_flush()');
sql("SELECT envelope.decrypt(tenant, v) FROM data WHERE tenant = 't5'");
is((hits($dek5))[0], 1, 't5 is cached');
sql("SELECT envelope.destroy_tenant('t5', 't5')");
is((hits($dek5))[0], 0, 'destroy_tenant wipes its DEK from shared memory at commit');

# Expiry: with a short TTL the sweeper zeroes a key nobody touches again.
sql("ALTER SYSTEM SET envelope.cache_ttl = 2");
sql('SELECT pg_reload_conf()');
my $dek3 = dek_of('t3');
sql('SELECT envelope.cache_flush()');
sql("SELECT envelope.decrypt(tenant, v) FROM data WHERE tenant = 't3'");
is((hits($dek3))[0], 1, 't3 is cached');
my $gone = 0;
for (1 .. 40)
{
	if ((hits($dek3))[0] == 0) { $gone = 1; last; }
	select(undef, undef, undef, 0.25);
}
ok($gone, 'an expired DEK nobody asks for again is zeroed by the sweeper');
is(sql('SELECT entries FROM envelope.cache_stats'), 0, 'and leaves the cache');

$node->stop;
done_testing();
