# A tenant rotated many times: a backend's first level notes a few of its versions
# (the active one, the one asked for, the other active ones, at most 8), not all of
# them, so its memory does not grow with a tenant's history, and values under every
# old version still decrypt.  The key store is read again for each tenant after a
# cache_flush (the shared tenant states are then stale), which is when a read used to
# note every version it found.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use EnvelopeLocal qw(new_master_key local_node);

my $ntenants = 50;
my $rotations = 40;
my ($keyfile) = new_master_key();
my $node = local_node('many_versions', $keyfile, "envelope.cache_size = 4096\n");
$node->start;
sub sql { return $node->safe_psql('postgres', $_[0]); }

sql(qq{
CREATE EXTENSION pg_envelope;
SELECT count(envelope.create_tenant('m' || i)) FROM generate_series(1, $ntenants) i;
CREATE TABLE data (tenant text, v bytea);
SELECT envelope.register_column('data', 'v', 'tenant');
});
# One value under each version of each tenant.
for my $r (1 .. $rotations)
{
	sql(qq{
INSERT INTO data SELECT 'm' || i, envelope.encrypt('m' || i, 'value ' || $r)
  FROM generate_series(1, $ntenants) i;
SELECT count(envelope.rotate_tenant_key('m' || i)) FROM generate_series(1, $ntenants) i;
});
}
is(sql("SELECT envelope.active_key_version('m1')"), $rotations + 1, "each tenant has $rotations old versions");

# The first level's memory after every tenant is read from the key store and a value
# of its newest old version is decrypted (the read sees all 41 versions).
my $query = qq{
SELECT envelope.cache_flush();
SELECT count(envelope.decrypt_text(tenant, v)) FROM data
 WHERE envelope.key_version(v) = $rotations;
SELECT used_bytes FROM pg_backend_memory_contexts WHERE name = 'pg_envelope key cache';
};
my @out = split /\n/, sql($query);
my $used = $out[-1];
is($out[-2], $ntenants, 'a value of each tenant decrypted');
# A LocalVersion is about 80 bytes: all 41 versions cost about 64 x 80 B a tenant.
cmp_ok($used, '<', $ntenants * 2048,
	"the first level holds a few versions a tenant, not all of them ($used bytes for $ntenants tenants)");

# Then every value, under every version, in one session: each version asked for is
# noted, and past 8 one not checked lately makes room.
$query = qq{
SELECT count(*) FROM data WHERE envelope.decrypt_text(tenant, v) LIKE 'value %';
SELECT used_bytes FROM pg_backend_memory_contexts WHERE name = 'pg_envelope key cache';
};
@out = split /\n/, sql($query);
is($out[0], $ntenants * $rotations, 'values under every old version still decrypt');
cmp_ok($out[1], '<', $ntenants * 2048,
	"and the first level stays bounded ($out[1] bytes for $ntenants tenants)");

# Re-encryption still needs no second key store read per row, and ends on one version.
sql('SET client_min_messages = warning; CALL envelope.reencrypt_all(1000)');
is(sql(q{SELECT count(*) FROM data
          WHERE envelope.key_version(v) <> envelope.active_key_version(tenant)}),
	0, 'reencrypt_all moved every value to the active versions');

$node->stop;
done_testing();
