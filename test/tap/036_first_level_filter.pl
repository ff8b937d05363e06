# The first level's filter of the tenants it holds (keycache.c, L1FilterBucket): a
# backend asks it before searching its own hash table, and a tenant the filter says it
# does not hold is looked up in shared memory instead.  So the filter must never miss a
# tenant the first level holds: a backend that holds every tenant of a scan answers the
# scan's second pass from its first level alone, without one lookup in shared memory
# (cache_stats.hits, which counts those lookups, stays where it was).  6,000 tenants:
# fewer than the first level holds (8,192), more than its front array has slots
# (4,096), so that many rows go past the front array to the filter and the hash.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use EnvelopeLocal qw(new_master_key local_node);

my $ntenants = 6000;
my ($keyfile) = new_master_key();
my $node = local_node('l1_filter', $keyfile, qq{
envelope.cache_size = 16384
autovacuum = off
});
$node->start;
$node->safe_psql('postgres', qq{
CREATE EXTENSION pg_envelope;
SELECT count(envelope.create_tenant('f' || i)) FROM generate_series(1, $ntenants) i;
CREATE TABLE plain AS SELECT 'f' || i AS tenant, 'v' || i AS v FROM generate_series(1, $ntenants) i;
CREATE TABLE sealed AS SELECT tenant, envelope.encrypt(tenant, v) AS c FROM plain;
});

# One session: a warming pass of each kind, then the counters, a second pass, the counters.
my @out = split /\n/, $node->safe_psql('postgres', q{
SELECT count(envelope.decrypt_text(tenant, c)) FROM sealed;
SELECT count(envelope.encrypt(tenant, v)) FROM plain;
SELECT hits || ' ' || misses FROM envelope.cache_stats;
SELECT count(*) FROM sealed WHERE envelope.decrypt_text(tenant, c) = 'v' || substr(tenant, 2);
SELECT hits || ' ' || misses FROM envelope.cache_stats;
SELECT count(envelope.encrypt(tenant, v)) FROM plain;
SELECT hits || ' ' || misses FROM envelope.cache_stats;
});
is($out[0], $ntenants, 'the first pass decrypts every row');
is($out[3], $ntenants, 'so does the second, each value right');
is($out[4], $out[2],
	'a second decrypting pass over tenants the backend holds never looks in shared memory');
is($out[6], $out[4], 'nor does a second encrypting pass');

# And a new session over the same tenants: its own first level starts empty, fills,
# and its second pass stays in it too.
@out = split /\n/, $node->safe_psql('postgres', q{
SELECT count(envelope.decrypt_text(tenant, c)) FROM sealed;
SELECT hits || ' ' || misses FROM envelope.cache_stats;
SELECT count(envelope.decrypt_text(tenant, c)) FROM sealed;
SELECT hits || ' ' || misses FROM envelope.cache_stats;
});
is($out[3], $out[1], 'in a new session too');

$node->stop;
done_testing();
