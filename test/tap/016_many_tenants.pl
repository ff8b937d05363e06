# More tenants than one backend's first-level cache holds (8,192): rows that cycle
# through them are served from shared memory (keys and tenant states), with no KMS
# call once the keys are there, and revocation still holds for every tenant whose
# state a backend reads from shared memory rather than from its own cache or the key
# store: disable, retire, destroy, in a session that was live before the change and in
# one that starts after it.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use EnvelopeLocal qw(new_master_key local_node);

my $ntenants = 8400;
my ($keyfile) = new_master_key();
my $node = local_node('many', $keyfile, q{
envelope.cache_size = 20000
autovacuum = off
});
$node->start;
$node->safe_psql('postgres', qq{
CREATE EXTENSION pg_envelope;
SELECT count(envelope.create_tenant('many' || i)) FROM generate_series(1, $ntenants) i;
CREATE TABLE many AS SELECT 'many' || i AS tenant, envelope.encrypt('many' || i, 'm' || i) AS v
  FROM generate_series(1, $ntenants) i ORDER BY i;
});

sub stat_value
{
	my ($column) = @_;
	return $node->safe_psql('postgres', "SELECT $column FROM envelope.cache_stats");
}

my $check_all = q{SELECT count(*) FROM many WHERE envelope.decrypt_text(tenant, v) = 'm' || substr(tenant, 5)};
# The error a live session gets for `$sql` (BackgroundPsql keeps stderr across queries).
sub error_of
{
	my ($session, $sql) = @_;
	$session->{stderr} = '';
	$session->query($sql);
	my $err = $session->{stderr};
	$session->{stderr} = '';
	return $err;
}

sub decrypt_one
{
	my ($i) = @_;
	return "SELECT envelope.decrypt_text(tenant, v) FROM many WHERE tenant = 'many$i'";
}

# ---- One live session cycles through all tenants twice: the first of them leave its
# first level, and come back from shared memory without a KMS call.
$node->safe_psql('postgres', 'SELECT envelope.cache_flush()');
my $reader = $node->background_psql('postgres', on_error_stop => 0);
my $calls0 = stat_value('kms_decrypt_calls');
is($reader->query_safe($check_all), $ntenants, "one session decrypts rows of $ntenants tenants");
my $calls1 = stat_value('kms_decrypt_calls');
is($calls1 - $calls0, $ntenants, 'one KMS Decrypt per key');
is($reader->query_safe($check_all), $ntenants, 'and again, past its first-level limit');
is(stat_value('kms_decrypt_calls') - $calls1, 0, 'the second pass makes no KMS call');
ok(stat_value('tenant_entries') >= $ntenants, 'tenant states are held in shared memory');
is(stat_value('evicted_reloads'), 0, 'no key was evicted while in use');

# A second live session that has read a few tenants (not many1 .. many4).
my $other = $node->background_psql('postgres', on_error_stop => 0);
is($other->query_safe(decrypt_one(5000)), 'm5000', 'a second session decrypts');

# ---- Revocations while the tenants' states sit in shared memory.  many1 .. many4 left
# the reader's first level during the second pass; the shared states are older than
# these commits and must not be taken for current.
$node->safe_psql('postgres', q{
SELECT envelope.disable_tenant('many1');
SELECT envelope.rotate_tenant_key('many3');
SELECT envelope.retire_key_version('many3', 1);
SELECT envelope.destroy_tenant('many4', 'many4');
});

like(error_of($reader, decrypt_one(1)), qr/tenant "many1" is disabled/,
	'a live session refuses a disabled tenant whose state it reads from shared memory');
like(error_of($other, decrypt_one(1)), qr/tenant "many1" is disabled/, 'so does another live session');
my ($ret, $stdout, $stderr) = $node->psql('postgres', decrypt_one(1));
like($stderr, qr/tenant "many1" is disabled/, 'and a new session');

like(error_of($reader, decrypt_one(3)), qr/key version 1 of tenant "many3" is retired/,
	'a retired version is refused');
like(error_of($other, decrypt_one(3)), qr/key version 1 of tenant "many3" is retired/,
	'in the other live session too');
like(error_of($reader, decrypt_one(4)), qr/tenant "many4" has been destroyed/, 'a destroyed tenant is refused');

# The reader read these states after the commits and published them; the other
# session, and a new one, must see the same, never an older copy.
like(error_of($other, decrypt_one(4)), qr/tenant "many4" has been destroyed/,
	'the other session refuses the destroyed tenant');
is($other->query_safe(decrypt_one(2)), 'm2', 'tenants that were not touched still decrypt');

# A full pass in the live session: exactly the revoked tenants fail.
is($reader->query_safe(q{
SELECT count(*) FROM many WHERE tenant NOT IN ('many1', 'many3', 'many4')
   AND envelope.decrypt_text(tenant, v) = 'm' || substr(tenant, 5)}),
	$ntenants - 3, 'every other tenant still decrypts in the live session');

# ---- A transaction that enables the tenant sees its own change, but what it reads
# must not reach shared memory: after its rollback, a new session (whose first level
# is empty, so it asks shared memory) still refuses the tenant.
$other->query_safe('BEGIN');
$other->query_safe("SELECT envelope.enable_tenant('many1')");
is($other->query_safe(decrypt_one(1)), 'm1', 'an uncommitted enable is seen by its own transaction');
$other->query_safe('ROLLBACK');
($ret, $stdout, $stderr) = $node->psql('postgres', decrypt_one(1));
like($stderr, qr/tenant "many1" is disabled/,
	'after its rollback a new session still refuses the tenant');
like(error_of($reader, decrypt_one(1)), qr/tenant "many1" is disabled/, 'and so does the live session');

# ---- Enabling is seen the same way.
$node->safe_psql('postgres', "SELECT envelope.enable_tenant('many1')");
is($reader->query_safe(decrypt_one(1)), 'm1', 'an enabled tenant decrypts again');
is($other->query_safe(decrypt_one(1)), 'm1', 'in the other session too');

# ---- Encrypting uses the active version read from shared memory: after a rotation
# by another session, new values carry the new version in a live session.
$node->safe_psql('postgres', "SELECT envelope.rotate_tenant_key('many7')");
is($reader->query_safe("SELECT envelope.key_version(envelope.encrypt('many7', 'x'))"), '2',
	'a live session encrypts under the version made active by another session');

# ---- The key store read of a cache miss keeps nothing per call.  In a transaction that
# changed the key store every miss reads the key store (shared memory may not answer
# it), and a scan cycling through twice as many tenants as the first level holds
# misses on most rows: 1,000,000 calls (over 500,000 key store reads) must leave the
# backend's memory where 100,000 left it.  The scans of envelope.tenant count the reads.
my $nleak = 17000;
$node->safe_psql('postgres', 'CREATE DATABASE leak');
$node->safe_psql('leak', 'CREATE EXTENSION pg_envelope');
# In batches: each create_tenant locks its tenant until the transaction ends.
for (my $s = 0; $s < $nleak; $s += 5000)
{
	$node->safe_psql('leak', qq{
SELECT count(envelope.create_tenant('leak' || i)) FROM generate_series($s + 1, least($s + 5000, $nleak)) i});
}
my $cycle = "'leak' || (i % $nleak + 1)";
my $scans = q{SELECT idx_scan + seq_scan FROM pg_stat_xact_user_tables
               WHERE relid = 'envelope.tenant'::regclass};
my @mem = split /\n/, $node->safe_psql('leak', qq{
BEGIN;
UPDATE envelope.tenant SET state = state WHERE false;
SELECT count(envelope.active_key_version($cycle)) FROM generate_series(1, 100000) i;
SELECT sum(total_bytes) FROM pg_backend_memory_contexts;
$scans;
SELECT count(envelope.active_key_version($cycle)) FROM generate_series(1, 1000000) i;
SELECT sum(total_bytes) FROM pg_backend_memory_contexts;
$scans;
ROLLBACK;
});
cmp_ok($mem[5] - $mem[2], '>=', 500000, 'over half of 1,000,000 calls read the key store')
  or diag("tenant scans: $mem[2] after 100,000 calls, $mem[5] after 1,100,000");
cmp_ok($mem[4] - $mem[1], '<', 1024 * 1024,
	'1,000,000 calls leave the backend memory where 100,000 left it');
note("backend memory: $mem[1] bytes after 100,000 calls, $mem[4] after 1,100,000; "
	  . ($mem[5] - $mem[2]) . " key store reads in between");

# ---- cache_stats of 0.1.0 keeps its twelve columns (its C symbol is unchanged), and
# the update to 0.2.0 adds tenant_entries, evicted_reloads and hint.
$node->safe_psql('postgres', 'CREATE DATABASE old_version');
$node->safe_psql('old_version', "CREATE EXTENSION pg_envelope VERSION '0.1.0'");
is($node->safe_psql('old_version', q{
SELECT count(*) FROM information_schema.columns
 WHERE table_schema = 'envelope' AND table_name = 'cache_stats'}), '12', 'cache_stats of 0.1.0');
is($node->safe_psql('old_version', 'SELECT capacity FROM envelope.cache_stats'), '20000',
	'works with the 0.1.0 symbol');
$node->safe_psql('old_version', 'ALTER EXTENSION pg_envelope UPDATE');
is($node->safe_psql('old_version', q{
SELECT tenant_entries >= 0 AND evicted_reloads = 0 AND hint IS NULL FROM envelope.cache_stats}),
	't', 'cache_stats of 0.2.0 after the update');

$reader->quit;
$other->quit;
$node->stop;
done_testing();
