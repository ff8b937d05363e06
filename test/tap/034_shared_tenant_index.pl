# The shared tenant index: one cache line per tenant (state, active version, the slot
# of its DEK, and the name itself) in front of the shared tenant hash.  Each session
# here starts with an empty first level, so every key comes from shared memory, through
# the index where it holds the tenant.  What must never happen:
#   - two names that share an index position (the same low half of the name hash, so
#     the same home, and the same length) get each other's key: the whole name is
#     compared, never the hash alone;
#   - the index serves a state older than the key store's: disabling, enabling,
#     rotating, granting and destroying are each seen by the next session;
#   - a tenant with granted roles is served without the check of its roles.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use EnvelopeLocal qw(new_master_key local_node);

my ($keyfile) = new_master_key();
my $node = local_node('tenant_index', $keyfile, "autovacuum = off\n");
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION pg_envelope');

# Two names of the same length whose hashes (hash_any_extended with seed 0, the one the
# shared level uses, which hashtextextended() computes for text) agree in their low 32
# bits: the index places both at the same home.
my ($first, $second) = split /\|/, $node->safe_psql('postgres', q{
WITH h AS (SELECT 'k' || lpad(i::text, 7, '0') AS n,
                  hashtextextended('k' || lpad(i::text, 7, '0'), 0) & 4294967295 AS low
             FROM generate_series(1, 400000) i)
SELECT min(n), max(n) FROM h GROUP BY low HAVING count(*) > 1 ORDER BY min(n) LIMIT 1});
ok(defined $second && $first ne $second, "two names share an index home: $first and $second")
  or BAIL_OUT('no two names with the same low hash half: the test cannot run');

$node->safe_psql('postgres', qq{
SELECT envelope.create_tenant('$first'), envelope.create_tenant('$second');
CREATE TABLE sealed (tenant text, c bytea);
});
# Each value encrypted by a session of its own after a flush of the cache (a new
# generation, at which the index holds nothing), so that the keys are the right ones
# whatever the index does.  Then new sessions decrypt both: the first name looked up
# enters the index at the shared home, the second is looked up past it.
for my $name ($first, $second)
{
	$node->safe_psql('postgres', 'SELECT envelope.cache_flush()');
	my $value = $name eq $first ? 'first value' : 'second value';
	$node->safe_psql('postgres', qq{INSERT INTO sealed VALUES ('$name', envelope.encrypt('$name', '$value'))});
}
$node->safe_psql('postgres', 'SELECT envelope.cache_flush()');
my $decrypt_all = q{SELECT string_agg(tenant || '=' || envelope.decrypt_text(tenant, c), ',' ORDER BY tenant) FROM sealed};
for my $round (1 .. 2)
{
	is($node->safe_psql('postgres', $decrypt_all), "$first=first value,$second=second value",
		"new session, round $round: each name gets its own key");
}
is($node->safe_psql('postgres', qq{SELECT envelope.decrypt_text('$second', envelope.encrypt('$second', 'x'))}),
	'x', 'a value of the second name encrypted by a new session decrypts');
is($node->safe_psql('postgres', qq{
SELECT envelope.decrypt_text('$first', c) FROM sealed WHERE tenant = '$first';
SELECT envelope.decrypt_text('$second', c) FROM sealed WHERE tenant = '$second'}),
	"first value\nsecond value", 'both names in one session, the first one first');

# Changes of the key store, each followed by new sessions that find the tenant in the
# index: the first of them must see the change.
$node->safe_psql('postgres', q{
SELECT envelope.create_tenant('ix');
INSERT INTO sealed VALUES ('ix', envelope.encrypt('ix', 'ix value'));
});
my $use_ix = q{SELECT envelope.decrypt_text('ix', c) FROM sealed WHERE tenant = 'ix'};
is($node->safe_psql('postgres', $use_ix), 'ix value', 'ix is served');
is($node->safe_psql('postgres', $use_ix), 'ix value', 'ix is served again (from the index)');

$node->safe_psql('postgres', q{SELECT envelope.disable_tenant('ix')});
my ($rc, $out, $err) = $node->psql('postgres', $use_ix);
like($err, qr/tenant "ix" is disabled/, 'the next session sees ix disabled');
($rc, $out, $err) = $node->psql('postgres', q{SELECT envelope.encrypt('ix', 'y')});
like($err, qr/tenant "ix" is disabled/, 'and cannot encrypt under it');

$node->safe_psql('postgres', q{SELECT envelope.enable_tenant('ix')});
is($node->safe_psql('postgres', $use_ix), 'ix value', 'enabled again, ix is served');
is($node->safe_psql('postgres', $use_ix), 'ix value', 'and again');

$node->safe_psql('postgres', q{SELECT envelope.rotate_tenant_key('ix')});
is($node->safe_psql('postgres', q{SELECT envelope.key_version(envelope.encrypt('ix', 'z'))}), '2',
	'after a rotation the next session encrypts under the new version');
is($node->safe_psql('postgres', $use_ix), 'ix value', 'and still decrypts the old one');
is($node->safe_psql('postgres', q{SELECT envelope.key_version(envelope.encrypt('ix', 'z'))}), '2',
	'a session after that too');

# Granted roles: the index does not hold such a tenant, and a role without the grant
# is refused in a new session.
$node->safe_psql('postgres', q{
CREATE ROLE ix_granted LOGIN IN ROLE envelope_user;
CREATE ROLE ix_other LOGIN IN ROLE envelope_user;
GRANT SELECT ON sealed TO PUBLIC;
SELECT envelope.grant_tenant('ix', 'ix_granted');
});
# The granted role's session reads the tenant's state, with the active version's,
# into shared memory.
is($node->safe_psql('postgres', q{SELECT envelope.decrypt_text('ix', envelope.encrypt('ix', 'g'))},
	extra_params => [ '-U', 'ix_granted' ]), 'g', 'the granted role is served');
is($node->safe_psql('postgres', $use_ix, extra_params => [ '-U', 'ix_granted' ]), 'ix value',
	'also for a value under the old version');
($rc, $out, $err) = $node->psql('postgres', q{SELECT envelope.encrypt('ix', 'w')},
	extra_params => [ '-U', 'ix_other' ]);
like($err, qr/permission denied/, 'another role cannot encrypt in a new session');
($rc, $out, $err) = $node->psql('postgres', $use_ix, extra_params => [ '-U', 'ix_other' ]);
like($err, qr/permission denied/, 'nor decrypt');
$node->safe_psql('postgres', q{SELECT envelope.revoke_tenant('ix', 'ix_granted')});
is($node->safe_psql('postgres', $use_ix, extra_params => [ '-U', 'ix_other' ]), 'ix value',
	'once the grant is revoked, every role is served again');
is($node->safe_psql('postgres', $use_ix, extra_params => [ '-U', 'ix_other' ]), 'ix value',
	'also from the index');

$node->safe_psql('postgres', q{SELECT envelope.destroy_tenant('ix', 'ix')});
($rc, $out, $err) = $node->psql('postgres', $use_ix);
like($err, qr/tenant "ix" has been destroyed/, 'the next session sees ix destroyed');
($rc, $out, $err) = $node->psql('postgres', q{SELECT envelope.encrypt('ix', 'v')});
like($err, qr/tenant "ix" has been destroyed/, 'and cannot encrypt under it');

# A flush of the cache: the index is bypassed by the new generation.
$node->safe_psql('postgres', 'SELECT envelope.cache_flush()');
is($node->safe_psql('postgres', $decrypt_all =~ s/FROM sealed/FROM sealed WHERE tenant <> 'ix'/r),
	"$first=first value,$second=second value", 'after a flush both names still get their own keys');

# A name too long for the index takes the hash.
my $long = 'long-' . ('n' x 60);
$node->safe_psql('postgres', qq{SELECT envelope.create_tenant('$long')});
for my $round (1 .. 2)
{
	is($node->safe_psql('postgres', qq{SELECT envelope.decrypt_text('$long', envelope.encrypt('$long', 'long'))}),
		'long', "a name longer than the index holds round-trips, session $round");
}

$node->stop;
done_testing();
