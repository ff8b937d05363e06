
# 017_local_revocation.pl — envelope.kms_recheck_interval with the local provider:
# when the master key file no longer holds the key the DEKs were wrapped under, the
# background worker's check is refused and every cached DEK under the key is evicted,
# in live sessions too; with the original file back, decryption resumes.  No KMS
# needed: the same code path as a key disabled in AWS KMS (026_aws_revocation.pl).

use strict;
use warnings;

use File::Copy;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);
use EnvelopeLocal qw(new_master_key local_node);

my $interval = 2;
my ($keyfile) = new_master_key();
my ($otherfile) = new_master_key();
copy($keyfile, "$keyfile.orig") or die "copy: $!";

my $node = local_node('local_revocation', $keyfile,
	"envelope.kms_recheck_interval = $interval\n");
$node->start;
$node->safe_psql('postgres', q{
CREATE EXTENSION pg_envelope;
SELECT envelope.create_tenant('acme');
CREATE TABLE t AS SELECT envelope.encrypt('acme', 'top secret') AS c;
});

my $decrypt = "\\set VERBOSITY verbose\nSELECT envelope.decrypt_text('acme', c) FROM t";
my $s = $node->background_psql('postgres', on_error_stop => 0);

sub attempt
{
	$s->{stderr} = '';
	my $out = $s->query($decrypt);
	my ($state) = $s->{stderr} =~ /ERROR:\s+([0-9A-Z]{5}):/;
	my $err = $s->{stderr};
	$s->{stderr} = '';
	return ($out, $state // '', $err);
}

my ($out) = attempt();
is($out, 'top secret', 'a live session decrypts');

# Another key in the file (written whole, then renamed into place, as an operator would).
copy($otherfile, "$keyfile.new") or die "copy: $!";
chmod(0600, "$keyfile.new");
rename("$keyfile.new", $keyfile) or die "rename: $!";
my $t0 = time();
my ($state, $err) = ('', '');
while (time() - $t0 < $interval + 15)
{
	(undef, $state, $err) = attempt();
	last if $state ne '';
	usleep(100_000);
}
my $waited = time() - $t0;
is($state, '42704', 'the live session is refused once the key file holds another key');
cmp_ok($waited, '<=', $interval + 2,
	sprintf('within envelope.kms_recheck_interval and one check (%.1f s)', $waited));
like($err, qr/is not the key in envelope.local_master_key_file/, 'the error says why');

copy("$keyfile.orig", "$keyfile.new") or die "copy: $!";
chmod(0600, "$keyfile.new");
rename("$keyfile.new", $keyfile) or die "rename: $!";
($out) = attempt();
is($out, 'top secret', 'with the original key file back, decryption resumes');

# A key made before its master key was refused never enters shared memory, though the
# refusal is over by the time its transaction commits: the refusal evicted every key
# under the master key, and this one must not come back after it.
sub decrypt_calls
{
	return $node->safe_psql('postgres', 'SELECT kms_decrypt_calls FROM envelope.cache_stats');
}
my $rotating = $node->background_psql('postgres');
$rotating->query_safe('BEGIN');
$rotating->query_safe("SELECT envelope.rotate_tenant_key('acme')");
copy($otherfile, "$keyfile.new") or die "copy: $!";
chmod(0600, "$keyfile.new");
rename("$keyfile.new", $keyfile) or die "rename: $!";
$t0 = time();
$state = '';
while (time() - $t0 < $interval + 15)
{
	(undef, $state) = attempt();
	last if $state ne '';
	usleep(100_000);
}
is($state, '42704', 'refused while a rotation waits for its commit');
copy("$keyfile.orig", "$keyfile.new") or die "copy: $!";
chmod(0600, "$keyfile.new");
rename("$keyfile.new", $keyfile) or die "rename: $!";
$rotating->query_safe('COMMIT');
$rotating->quit;
my $calls = decrypt_calls();
is($node->safe_psql('postgres', "SELECT envelope.decrypt_text('acme', envelope.encrypt('acme', 'new'))"),
	'new', 'the rotated tenant encrypts under its new key');
is(decrypt_calls(), $calls + 1,
	'whose DEK, made before the refusal, was not cached at the commit: unwrapped at its first use');

$s->quit;
$node->stop;
done_testing();
