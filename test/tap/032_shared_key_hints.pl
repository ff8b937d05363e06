# The shared cache hands a backend a tenant's state and its DEK in one lookup: the
# tenant's entry remembers which slot held each version's DEK, and the slot's
# sequence number says whether it still holds that key.  When keys are evicted and
# their slots go to other tenants' keys, the remembered slots must not be used: the
# rows still decrypt, with the right key.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use EnvelopeLocal qw(new_master_key local_node);

my ($keyfile) = new_master_key();
my $node = local_node('hints', $keyfile, q{
envelope.cache_size = 16
autovacuum = off
});
$node->start;
# Tenant a: three versions; tenant b: sixteen, enough to fill the cache on its own.
$node->safe_psql('postgres', q{
CREATE EXTENSION pg_envelope;
SELECT envelope.create_tenant('a'), envelope.create_tenant('b');
CREATE TABLE data (tenant text, version int, v bytea);
INSERT INTO data VALUES ('a', 1, envelope.encrypt('a', 'a1')), ('b', 1, envelope.encrypt('b', 'b1'));
});
for my $v (2 .. 3)
{
	$node->safe_psql('postgres', qq{
SELECT envelope.rotate_tenant_key('a');
INSERT INTO data VALUES ('a', $v, envelope.encrypt('a', 'a$v'));});
}
for my $v (2 .. 16)
{
	$node->safe_psql('postgres', qq{
SELECT envelope.rotate_tenant_key('b');
INSERT INTO data VALUES ('b', $v, envelope.encrypt('b', 'b$v'));});
}
is($node->safe_psql('postgres', q{SELECT string_agg(DISTINCT envelope.key_version(v)::text, ',') FROM data WHERE tenant = 'a'}),
	'1,2,3', 'tenant a has values under three versions');

my $decrypt_a = q{SELECT string_agg(envelope.decrypt_text(tenant, v), ',' ORDER BY version) FROM data WHERE tenant = 'a'};
my $decrypt_b = q{SELECT count(*) FROM data WHERE tenant = 'b' AND envelope.decrypt_text(tenant, v) = 'b' || version};

$node->safe_psql('postgres', 'SELECT envelope.cache_flush()');
# The first session unwraps a's keys; the second finds them in shared memory through
# the key hash, which leaves the slots in a's tenant entry.
is($node->safe_psql('postgres', $decrypt_a), 'a1,a2,a3', "a's keys are unwrapped");
is($node->safe_psql('postgres', $decrypt_a), 'a1,a2,a3', 'and found in shared memory by a new session');
my $calls = $node->safe_psql('postgres', 'SELECT kms_decrypt_calls FROM envelope.cache_stats');

# b's sixteen keys push a's three out of the 16-key cache: their slots now hold b's.
is($node->safe_psql('postgres', $decrypt_b), '16', "b's sixteen keys fill the cache");
is($node->safe_psql('postgres', 'SELECT entries FROM envelope.cache_stats'), '16', 'the cache is full');

# A new session reads a's entry, whose remembered slots hold b's keys now.
is($node->safe_psql('postgres', $decrypt_a), 'a1,a2,a3',
	"a's values still decrypt after their slots went to other keys");
is($node->safe_psql('postgres', 'SELECT kms_decrypt_calls FROM envelope.cache_stats') - $calls, 19,
	"a's keys were unwrapped again, not taken from the slots they once had");
is($node->safe_psql('postgres', q{SELECT envelope.decrypt_text('a', envelope.encrypt('a', 'fresh'))}),
	'fresh', 'a new value of a round-trips');
$node->safe_psql('postgres', 'SELECT envelope.cache_flush()');
is($node->safe_psql('postgres', $decrypt_a), 'a1,a2,a3', 'and every value of a decrypts from a cold cache');

# A backend that looks at a tenant's state alone (needs_reencryption) keeps, for each
# version, the slot shared memory found its key in, so that the keys re-encryption
# needs next are copied from there.  Here b's keys take those slots between the look
# and the decryption, in the same session: the session's own notes of the slots must
# not be used either.
is($node->safe_psql('postgres', $decrypt_a), 'a1,a2,a3', "a's keys found through the key hash again");
is($node->safe_psql('postgres', qq{
SELECT count(*) FROM data WHERE tenant = 'a' AND envelope.needs_reencryption(v, 'a');
$decrypt_b;
$decrypt_a;
}), "2\n16\na1,a2,a3", "a's values decrypt after the slots this session noted went to b's keys");

$node->stop;
done_testing();
