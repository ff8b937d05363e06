# A DEK the KMS has just generated (create_tenant, rotate_tenant_key, rotate_keys)
# enters the shared cache when its transaction commits, so that its first use needs no
# KMS Decrypt; never when it rolls back (also a subtransaction), and until the commit
# only a copy that is wiped.  Local provider: cache_stats counts the unwraps, and the
# DEK is recomputed from the key file and searched for in the backend's own memory and
# in shared memory through /proc/PID/mem (test/kms/memory_probe.py).
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use EnvelopeLocal qw(new_master_key local_node);
use File::Basename qw(dirname);
use Cwd qw(abs_path);

my $ntenants = 20;
my $python = $ENV{ENVELOPE_PYTHON} || 'python3';
my $probe = abs_path(dirname(__FILE__) . '/../kms/memory_probe.py');
system($python, '-c', 'import cryptography') == 0
  or BAIL_OUT("$python cannot import cryptography: this test cannot run");

my ($keyfile) = new_master_key();
my $node = local_node('new_keys', $keyfile, "envelope.cache_size = 1024\n");
$node->start;
my $postmaster_pid = (split /\n/, slurp_file($node->data_dir . '/postmaster.pid'))[0];
sub sql { return $node->safe_psql('postgres', $_[0]); }
sub stat_value { return sql("SELECT $_[0] FROM envelope.cache_stats"); }

sql('CREATE EXTENSION pg_envelope');
my $calls = stat_value('kms_decrypt_calls');
sql("SELECT count(envelope.create_tenant('t' || i)) FROM generate_series(1, $ntenants) i");
is(stat_value('entries'), $ntenants, 'create_tenant: the new DEKs are cached at commit');
sql(qq{
CREATE TABLE data AS SELECT 't' || i AS tenant, envelope.encrypt('t' || i, 'value ' || i) AS v
  FROM generate_series(1, $ntenants) i;
SELECT envelope.register_column('data', 'v', 'tenant');
});
is(stat_value('kms_decrypt_calls'), $calls, 'and their first use unwraps none');

# Created, rotated and used in one transaction: the key generated is used as it is,
# not unwrapped again, though it enters shared memory only at the commit.
$calls = stat_value('kms_decrypt_calls');
sql(q{
BEGIN;
SELECT envelope.create_tenant('same');
SELECT envelope.encrypt('same', 'one');
SELECT envelope.rotate_tenant_key('same');
SELECT envelope.encrypt('same', 'two');
COMMIT;
});
is(stat_value('kms_decrypt_calls'), $calls, 'a key used in the transaction that made it is not unwrapped');

# Rolled back: nothing cached.
my $entries = stat_value('entries');
sql(qq{
BEGIN;
SELECT count(envelope.rotate_tenant_key('t' || i)) FROM generate_series(1, $ntenants) i;
ROLLBACK;
});
is(stat_value('entries'), $entries, 'a rotation rolled back caches nothing');

# A subtransaction rolled back takes its keys with it; a released one's wait for the top.
sql(q{
BEGIN;
SAVEPOINT a;
SELECT envelope.rotate_tenant_key('t1');
ROLLBACK TO a;
SAVEPOINT b;
SELECT envelope.rotate_tenant_key('t2');
RELEASE b;
COMMIT;
});
is(stat_value('entries'), $entries + 1, 'only the key of the committed subtransaction is cached');
is(sql("SELECT envelope.active_key_version('t1') || ',' || envelope.active_key_version('t2')"),
	'1,2', 't1 not rotated, t2 rotated');

# rotate_keys, then re-encryption in a new session: no KMS Decrypt at all.
$entries = stat_value('entries');
my $active = sql("SELECT count(*) FROM envelope.tenant WHERE state = 'active'");
sql("CALL envelope.rotate_keys(older_than => '0')");
is(stat_value('entries'), $entries + $active, "rotate_keys: $active new DEKs cached at commit");
$calls = stat_value('kms_decrypt_calls');
sql('SET client_min_messages = warning; CALL envelope.reencrypt_all(1000)');
is(sql(q{SELECT count(*) FROM data
          WHERE envelope.key_version(v) <> envelope.active_key_version(tenant)}),
	0, 'reencrypt_all moved every value to the new versions');
is(stat_value('kms_decrypt_calls'), $calls, 'and made no KMS Decrypt call');

# A tenant disabled after its rotation committed refuses, cached key or not.
sql("SELECT envelope.disable_tenant('t3')");
my ($ret, $stdout, $stderr) = $node->psql('postgres',
	"SELECT envelope.decrypt_text(tenant, v) FROM data WHERE tenant = 't3'");
like($stderr, qr/tenant "t3" is disabled/, 'a tenant disabled after the rotation refuses decrypt');
($ret, $stdout, $stderr) = $node->psql('postgres', "SELECT envelope.encrypt('t3', 'x')");
like($stderr, qr/tenant "t3" is disabled/, 'and encrypt');

# Where the DEK is: in the rotating backend's memory until the end of its transaction
# (the copy waiting for the commit), then nowhere in it; in shared memory only once
# committed.
sub hits
{
	my ($pid, $dek, $where) = @_;
	my $out = `$python $probe find $pid $dek $where`;
	my ($n) = $out =~ /^hits (\d+)$/m;
	die "memory probe failed: $out" unless defined $n;
	return $n;
}

my $session = $node->background_psql('postgres');
my $backend_pid = $session->query_safe('SELECT pg_backend_pid()');
sub new_dek_in_session
{
	my ($tenant) = @_;
	my $version = $session->query_safe("SELECT envelope.rotate_tenant_key('$tenant')");
	my ($key_id, $wrapped) = split /\|/, $session->query_safe(
		"SELECT kms_key, encode(wrapped_dek, 'hex') FROM envelope.data_key
		  WHERE tenant = '$tenant' AND version = $version");
	my $dek = `$python $probe unwrap $keyfile $key_id $tenant $version $wrapped`;
	chomp $dek;
	die "could not unwrap the DEK of $tenant" unless $dek =~ /^[0-9a-f]{64}$/;
	return $dek;
}

$session->query_safe('BEGIN');
my $dek = new_dek_in_session('t5');
ok(hits($backend_pid, $dek, 'private') >= 1,
	'before the commit, the backend holds the new DEK (the probe finds it)');
is(hits($postmaster_pid, $dek, 'shared'), 0, 'and shared memory does not');
$session->query_safe('ROLLBACK');
is(hits($backend_pid, $dek, 'private'), 0, 'rolled back: wiped from the backend');
is(hits($postmaster_pid, $dek, 'shared'), 0, 'and never in shared memory');

$session->query_safe('BEGIN');
$dek = new_dek_in_session('t6');
$session->query_safe('SAVEPOINT s');
my $dek7 = new_dek_in_session('t7');
$session->query_safe('ROLLBACK TO s');
is(hits($backend_pid, $dek7, 'private'), 0, 'a subtransaction rolled back: its DEK wiped at once');
$session->query_safe('COMMIT');
is(hits($backend_pid, $dek, 'private'), 0, 'committed: wiped from the backend');
is(hits($postmaster_pid, $dek, 'shared'), 1, 'and in shared memory once');
$session->quit;

# A full cache: the rotation's keys take the free slots, and no slot of a key in use.
$node->append_conf('postgresql.conf', "envelope.cache_size = 16\n");
$node->restart;
$postmaster_pid = (split /\n/, slurp_file($node->data_dir . '/postmaster.pid'))[0];
my $working_set = q{tenant IN ('t1','t2','t4','t5','t6','t7','t8','t9','t10','t11','t12','t13')};
sql("SELECT count(envelope.decrypt(tenant, v)) FROM data WHERE $working_set");
is(stat_value('entries'), 12, 'a working set of 12 keys in a cache of 16');
my $evictions = stat_value('evictions');
sql(q{
BEGIN;
SELECT count(envelope.create_tenant('r' || i)) FROM generate_series(1, 10) i;
SELECT count(envelope.rotate_tenant_key('r' || i)) FROM generate_series(1, 10) i;
COMMIT;
});
is(stat_value('entries'), 16, 'the new keys filled the free slots');
is(stat_value('evictions'), $evictions, 'and evicted no key in use');
$calls = stat_value('kms_decrypt_calls');
sql("SELECT count(envelope.decrypt(tenant, v)) FROM data WHERE $working_set");
is(stat_value('kms_decrypt_calls'), $calls, 'the working set is still cached');

# A new key expires cache_ttl after it was made, as its master key's re-checks do
# (they stop a cache_ttl after the key was noted in use), not after the commit: a
# transaction that outlives cache_ttl leaves its key for the first use to unwrap.
$node->append_conf('postgresql.conf', "envelope.cache_ttl = 2\n");
$node->reload;
sql(q{
BEGIN;
SELECT envelope.rotate_tenant_key('t8');
SELECT pg_sleep(3);
COMMIT;
});
$calls = stat_value('kms_decrypt_calls');
sql("SELECT envelope.encrypt('t8', 'after a long rotation')");
is(stat_value('kms_decrypt_calls'), $calls + 1,
	'a key made more than cache_ttl before its commit is not cached');

$node->stop;
done_testing();
