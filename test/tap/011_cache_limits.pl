# Cache limits: LRU eviction at envelope.cache_size, expiry after envelope.cache_ttl,
# and the backend-local fallback (with its one WARNING) when the library is not
# preloaded.  Also: pg_dump carries the key store, and a restore decrypts.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use EnvelopeLocal qw(new_master_key local_node);

my $keydir = PostgreSQL::Test::Utils::tempdir;
my ($keyfile) = new_master_key();
my $node = local_node('limits', $keyfile, q{
envelope.cache_size = 16
envelope.cache_ttl = 6
});
$node->start;
$node->safe_psql('postgres', q{
CREATE EXTENSION pg_envelope;
SELECT envelope.create_tenant('t' || i) FROM generate_series(1, 40) i;
CREATE TABLE data AS
SELECT 't' || i AS tenant, envelope.encrypt('t' || i, 'value ' || i) AS v
  FROM generate_series(1, 40) i;
SELECT envelope.cache_flush();
});

sub stats
{
	my ($node) = @_;
	my @v = split /\|/, $node->safe_psql('postgres',
		'SELECT capacity, entries, evictions, kms_decrypt_calls FROM envelope.cache_stats');
	return { capacity => $v[0], entries => $v[1], evictions => $v[2], decrypts => $v[3] };
}

# ---- Eviction: 40 keys through a 16-entry cache.
is($node->safe_psql('postgres',
	"SELECT count(*) FROM data WHERE envelope.decrypt_text(tenant, v) = 'value ' || substr(tenant, 2)"),
	'40', 'all 40 tenants decrypt through a 16-entry cache');
my $s = stats($node);
is($s->{capacity}, 16, 'capacity is envelope.cache_size');
ok($s->{entries} <= 16, "never more entries than the capacity ($s->{entries})");
ok($s->{evictions} >= 24, "least recently used keys were evicted ($s->{evictions})");

# The most recently used key is still cached; the first one was evicted.
my $before = stats($node)->{decrypts};
$node->safe_psql('postgres', "SELECT envelope.decrypt_text('t40', v) FROM data WHERE tenant = 't40'");
is(stats($node)->{decrypts} - $before, 0, 'the most recently used key is still cached');
$node->safe_psql('postgres', "SELECT envelope.decrypt_text('t1', v) FROM data WHERE tenant = 't1'");
is(stats($node)->{decrypts} - $before, 1, 'an evicted key is unwrapped again');
ok($node->safe_psql('postgres', 'SELECT evicted_reloads FROM envelope.cache_stats') >= 1,
	'cache_stats counts keys unwrapped again soon after their eviction');
like($node->safe_psql('postgres', 'SELECT hint FROM envelope.cache_stats'),
	qr/do not fit in envelope\.cache_size \(16\)\. Raise envelope\.cache_size\./,
	'and its hint says to raise envelope.cache_size');

# ---- Expiry: after envelope.cache_ttl a key is unwrapped again, by a new backend and
# by a long-lived one whose first level holds the key (it must expire there too).
my $long_lived = $node->background_psql('postgres');
is($long_lived->query_safe("SELECT envelope.decrypt_text('t39', v) FROM data WHERE tenant = 't39'"),
	'value 39', 'a long-lived backend decrypts before the TTL');
$before = stats($node)->{decrypts};
is($long_lived->query_safe("SELECT envelope.decrypt_text('t39', v) FROM data WHERE tenant = 't39'"),
	'value 39', 'and again from its first level');
is(stats($node)->{decrypts} - $before, 0, 'without a KMS call');
sleep(7);
$node->safe_psql('postgres', "SELECT envelope.decrypt_text('t40', v) FROM data WHERE tenant = 't40'");
is(stats($node)->{decrypts} - $before, 1, 'an expired key is unwrapped again');
is($long_lived->query_safe("SELECT envelope.decrypt_text('t39', v) FROM data WHERE tenant = 't39'"),
	'value 39', 'the long-lived backend decrypts after the TTL');
is(stats($node)->{decrypts} - $before, 2,
	'after unwrapping again: its first-level copy expired with the shared one');
$long_lived->quit;

# ---- pg_dump carries tenants and wrapped keys; a restore into another database decrypts.
my $dump = "$keydir/dump.sql";
$node->command_ok([ 'pg_dump', '-d', $node->connstr('postgres'), '-f', $dump ], 'pg_dump');
my $dumped = slurp_file($dump);
unlike($dumped, qr/value 1\b/, 'the dump holds no plaintext');
$node->safe_psql('postgres', 'CREATE DATABASE restored');
$node->command_ok([ 'psql', '-X', '-q', '-v', 'ON_ERROR_STOP=1', '-d', $node->connstr('restored'), '-f', $dump ],
	'restore');
is($node->safe_psql('restored',
	"SELECT count(*) FROM data WHERE envelope.decrypt_text(tenant, v) = 'value ' || substr(tenant, 2)"),
	'40', 'the restored database decrypts every row');
is($node->safe_psql('restored', "SELECT envelope.create_tenant('after-restore')"), '1',
	'new tenants can be created after a restore');

# ---- One backend cycling through more tenants than its first-level cache holds (8192)
# keeps working, one eviction at a time.
$node->safe_psql('postgres', q{
SELECT count(envelope.create_tenant('many' || i)) FROM generate_series(1, 8300) i;
CREATE TABLE many AS SELECT 'many' || i AS tenant, envelope.encrypt('many' || i, 'm' || i) AS v
  FROM generate_series(1, 8300) i;
});
is($node->safe_psql('postgres', q{
SELECT count(*) FROM (SELECT * FROM many UNION ALL SELECT * FROM many) m
 WHERE envelope.decrypt_text(tenant, v) = 'm' || substr(tenant, 5)}),
	'16600', 'a backend decrypts for 8,300 tenants twice over');

# ---- A non-ASCII tenant in a LATIN1 database: the KMS context and the binding are UTF-8,
# so the dump restores into a UTF-8 database and still decrypts.
$node->safe_psql('postgres',
	"CREATE DATABASE latin1 ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0");
$node->safe_psql('latin1', q{
CREATE EXTENSION pg_envelope;
SELECT envelope.create_tenant('café');
CREATE TABLE data AS SELECT 'café'::text AS tenant, envelope.encrypt('café', 'crème', 'ctx') AS v;
});
is($node->safe_psql('latin1', "SELECT envelope.decrypt_text(tenant, v, 'ctx') FROM data"),
	'crème', 'a LATIN1 database encrypts for a non-ASCII tenant');
my $dump1 = "$keydir/latin1.sql";
$node->command_ok([ 'pg_dump', '-d', $node->connstr('latin1'), '-f', $dump1 ], 'pg_dump of the LATIN1 database');
$node->safe_psql('postgres', "CREATE DATABASE utf8copy ENCODING 'UTF8' TEMPLATE template0");
$node->command_ok([ 'psql', '-X', '-q', '-v', 'ON_ERROR_STOP=1', '-d', $node->connstr('utf8copy'), '-f', $dump1 ],
	'restore into a UTF-8 database');
$node->safe_psql('utf8copy', 'SELECT envelope.cache_flush()');
is($node->safe_psql('utf8copy', "SELECT envelope.decrypt_text(tenant, v, 'ctx') FROM data"),
	'crème', 'and decrypts there');
$node->stop;

# ---- Not preloaded: works with a per-backend cache and says so once.
my $lone = PostgreSQL::Test::Cluster->new('not_preloaded');
$lone->init;
$lone->append_conf('postgresql.conf', qq{
envelope.local_master_key_file = '$keyfile'
});
$lone->start;
my ($ret, $out, $err) = $lone->psql('postgres', q{
CREATE EXTENSION pg_envelope;
SELECT envelope.create_tenant('solo');
SELECT envelope.decrypt_text('solo', envelope.encrypt('solo', 'works'));
SELECT envelope.decrypt_text('solo', envelope.encrypt('solo', 'still works'));
SELECT shared FROM envelope.cache_stats;
});
is($ret, 0, 'without preload the extension works');
like($out, qr/works\nstill works\nf/, 'round trips use a cache that is not shared');
my @warnings = ($err =~ /WARNING:  pg_envelope is not in shared_preload_libraries/g);
is(scalar(@warnings), 1, 'one WARNING per backend says the cache is not shared');
like($err, qr/HINT:  Add pg_envelope to shared_preload_libraries/, 'and says how to share it');
$lone->stop;

done_testing();
