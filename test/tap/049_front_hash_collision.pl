# The first level's front array (keycache.c, L1FrontSet) finds a tenant by a 32-bit
# hash of its name and the name's length, and only then compares the name: two tenants
# whose names hash alike must never be served each other's entry.  'collide-0522789'
# and 'collide-0739192' have the same length and the same l1_name_hash() (FNV-1a,
# folded), so they share a set of the front array, and the same filter fingerprint.
# Rows alternate between them, so that each row finds the other tenant's entry in the
# set first: every value must decrypt under its own tenant only, and a re-encryption
# must move each value onto its own tenant's active version (the two tenants' active
# versions differ).
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use EnvelopeLocal qw(new_master_key local_node);

my ($a, $b) = ('collide-0522789', 'collide-0739192');
my ($keyfile) = new_master_key();
my $node = local_node('front_collision', $keyfile, qq{
autovacuum = off
});
$node->start;
$node->safe_psql('postgres', qq{
CREATE EXTENSION pg_envelope;
SELECT envelope.create_tenant('$a');
SELECT envelope.create_tenant('$b');
-- Different active versions, so that a row served the other tenant's entry shows.
SELECT envelope.rotate_tenant_key('$a');
SELECT envelope.rotate_tenant_key('$a');
CREATE TABLE rows AS
SELECT i, CASE WHEN i % 2 = 0 THEN '$a' ELSE '$b' END AS tenant, 'value ' || i AS v
  FROM generate_series(1, 2000) i;
});

# One session: encrypt and decrypt with the tenants alternating on every row.
my @out = split /\n/, $node->safe_psql('postgres', qq{
CREATE TABLE sealed AS SELECT i, tenant, v, envelope.encrypt(tenant, v) AS c FROM rows;
SELECT count(*) FROM sealed WHERE envelope.decrypt_text(tenant, c) = v;
SELECT count(*) FROM sealed WHERE envelope.key_version(c) = envelope.active_key_version(tenant);
SELECT string_agg(DISTINCT tenant || ':' || envelope.key_version(c), ',' ORDER BY tenant || ':' || envelope.key_version(c)) FROM sealed;
});
is($out[0], 2000, 'every value decrypts under its own tenant, tenants alternating on every row');
is($out[1], 2000, 'every value was encrypted under its own tenant\'s active version');
is($out[2], "$a:3,$b:1", 'the two tenants\' values carry their own versions');

# Values of one tenant never decrypt under the other, in a session holding both.
my ($ret, $stdout, $stderr) = $node->psql('postgres', qq{
SELECT count(envelope.decrypt_text(tenant, c)) FROM sealed;
SELECT envelope.decrypt_text('$a', c) FROM sealed WHERE tenant = '$b' LIMIT 1;
});
isnt($ret, 0, 'a value of one tenant does not decrypt under the other');
like($stderr, qr/could not decrypt value for tenant "\Q$a\E"/, 'with the authentication error');

# The re-encryption row: each value onto its own tenant's new active version.
$node->safe_psql('postgres', qq{
SELECT envelope.rotate_tenant_key('$b');
});
@out = split /\n/, $node->safe_psql('postgres', qq{
SELECT count(*) FROM sealed WHERE envelope.needs_reencryption(c, tenant);
UPDATE sealed SET c = envelope.reencrypt_value(tenant, c, NULL)
 WHERE envelope.needs_reencryption(c, tenant);
SELECT count(*) FROM sealed WHERE envelope.key_version(c) = envelope.active_key_version(tenant)
   AND envelope.decrypt_text(tenant, c) = v;
SELECT string_agg(DISTINCT tenant || ':' || envelope.key_version(c), ',' ORDER BY tenant || ':' || envelope.key_version(c)) FROM sealed;
});
is($out[0], 1000, 'only the rotated tenant\'s values need re-encryption');
is($out[1], 2000, 'after it every value is under its own tenant\'s active version and decrypts');
is($out[2], "$a:3,$b:2", 'each tenant\'s values under its own version');

$node->stop;
done_testing();
