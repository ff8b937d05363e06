# A backend's encryption budgets are bounded: it keeps at most as many (tenant, DEK
# version) reservations as the shared key cache holds keys (envelope.cache_size, here
# 16,384, the pool's minimum), whatever the number of keys it has encrypted under, and a
# reservation given up to make room costs only its unused rest (the stored counts stay
# at least the encryptions made).  One session encrypts under 17,000 keys, then under
# 17,000 others, then under the first ones again: the budgets' memory context does not
# grow in the second round, and every key's stored count covers its rows.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use EnvelopeLocal qw(new_master_key local_node);

my ($keyfile) = new_master_key();
# Each new tenant takes a lock until its transaction ends.
my $node = local_node('budget_pool', $keyfile,
	"max_locks_per_transaction = 512\nenvelope.cache_size = 16384\n");
$node->start;
$node->safe_psql('postgres', q{
CREATE EXTENSION pg_envelope;
SELECT count(envelope.create_tenant('a' || i)) FROM generate_series(1, 17000) i;
SELECT count(envelope.create_tenant('b' || i)) FROM generate_series(1, 17000) i;
CREATE TABLE sealed (tenant text, c bytea);
});

# The pool's context and the hash's, its child.
my $context_bytes = q{SELECT sum(total_bytes) FROM pg_backend_memory_contexts
 WHERE 'pg_envelope encryption counts' IN (name, parent) HAVING count(*) = 2};
# One session (one psql), so one backend's budgets.
my @bytes = split /\n/, $node->safe_psql('postgres', qq{
INSERT INTO sealed SELECT 'a' || i, envelope.encrypt('a' || i, 'x') FROM generate_series(1, 17000) i;
$context_bytes;
INSERT INTO sealed SELECT 'b' || i, envelope.encrypt('b' || i, 'x') FROM generate_series(1, 17000) i;
$context_bytes;
-- The first keys again: their budgets were given up for the second round.
INSERT INTO sealed SELECT 'a' || i, envelope.encrypt('a' || i, 'y' || j)
  FROM generate_series(1, 17000) i, generate_series(1, 3) j;
$context_bytes;
});
is(scalar(@bytes), 3, 'the budgets have their own memory context');
note("budget context after 17,000 / 34,000 / 34,000 keys: @bytes bytes");
cmp_ok($bytes[0], '<', 4 * 1024 * 1024, 'the budgets of 17,000 keys take less than 4 MB');
cmp_ok($bytes[1], '<=', $bytes[0], 'and 17,000 more keys add nothing');
cmp_ok($bytes[2], '<=', $bytes[0], 'nor does coming back to the first ones');

is($node->safe_psql('postgres', q{
SELECT count(*) FROM envelope.tenant_keys k
  JOIN (SELECT tenant, count(*) AS n FROM sealed GROUP BY tenant) s USING (tenant)
 WHERE k.version = 1 AND k.encryptions < s.n}), '0',
	'every key\'s stored count covers the rows encrypted under it');
is($node->safe_psql('postgres', q{SELECT count(*) FROM sealed}), 17000 * 5, 'all rows written');

# Keys created and encrypted under in one transaction, more of them than the pool
# holds, then rolled back: the budgets on rows the transaction inserted are given up
# (or were, when their slot was taken), and the backend goes on counting correctly.
is($node->safe_psql('postgres', q{
BEGIN;
SELECT count(envelope.create_tenant('r' || i)) FROM generate_series(1, 17000) i;
SELECT count(envelope.encrypt('r' || i, 'x')) FROM generate_series(1, 17000) i;
ROLLBACK;
INSERT INTO sealed SELECT 'b' || i, envelope.encrypt('b' || i, 'z') FROM generate_series(1, 17000) i;
SELECT count(*) FROM envelope.tenant_keys k
  JOIN (SELECT tenant, count(*) AS n FROM sealed GROUP BY tenant) s USING (tenant)
 WHERE k.version = 1 AND k.encryptions < s.n;
}), "17000\n17000\n0", 'after a rolled-back transaction of 17,000 new keys the counts still cover the rows');
$node->stop;
done_testing();
