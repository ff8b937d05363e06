# The shared key cache in huge pages: its DEKs are still excluded from core dumps.
# A segment in huge pages can be marked (MADV_DONTDUMP) only in whole huge pages, so
# the DEK array is aligned to them; this checks it with huge_pages = on.
#
# Huge pages must be reserved by root (/proc/sys/vm/nr_hugepages), which the server's
# user cannot do: test/run_tests.sh reserves some for this file alone when it runs as
# root and says so in ENVELOPE_TEST_HUGE_PAGES; without them this file skips, loudly.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use EnvelopeLocal qw(new_master_key local_node local_dek);
use File::Basename qw(dirname);
use Cwd qw(abs_path);

if (!$ENV{ENVELOPE_TEST_HUGE_PAGES})
{
	diag('SKIP: no huge pages reserved for this test (run test/run_tests.sh as root): '
		  . 'the key cache in huge pages is NOT tested');
	plan skip_all => 'no huge pages reserved (needs root)';
}

my $python = $ENV{ENVELOPE_PYTHON} || 'python3';
my $probe = abs_path(dirname(__FILE__) . '/../kms/memory_probe.py');

my ($keyfile) = new_master_key();
my $node = local_node('huge', $keyfile,
	"envelope.cache_size = 1000\nhuge_pages = on\nshared_buffers = 16MB\n");
$node->start;
my $postmaster_pid = (split /\n/, slurp_file($node->data_dir . '/postmaster.pid'))[0];
sub sql { return $node->safe_psql('postgres', $_[0]); }

my $smaps = slurp_file("/proc/$postmaster_pid/smaps");
like($smaps, qr/VmFlags:.*\bht\b/, 'the server runs with its shared memory in huge pages');

sql(q{
CREATE EXTENSION pg_envelope;
SELECT envelope.create_tenant('h1');
CREATE TABLE data AS SELECT envelope.encrypt('h1', 'v') AS v;
SELECT envelope.cache_flush();
});
is(sql(q{SELECT envelope.decrypt_text('h1', v) FROM data}), 'v', 'a value decrypts');

my $dek = local_dek($node, $keyfile, 'h1', 1);
my $out = `$python $probe find $postmaster_pid $dek`;
my ($hits) = $out =~ /^hits (\d+)$/m;
is($hits, 1, 'the DEK is in shared memory once');
like($out, qr/flags=.*\bht\b/, 'in a huge page');
like($out, qr/flags=.*\bdd\b/, 'which is excluded from core dumps (MADV_DONTDUMP)');

$node->stop;
unlike(slurp_file($node->logfile), qr/could not exclude its key cache from core dumps/,
	'no warning that the key cache could not be excluded from core dumps');

done_testing();
