# A key store read made in parallel mode sees the statement's snapshot, which may be
# older than the generation it is noted at.  A tenant disabled after the statement
# began is still served to that statement (its rows see its snapshot), but never to the
# next one: the backend's first level keeps such a read for its statement only.
#
# force_parallel_mode with no parallel worker to launch: the leader runs the whole
# plan itself, in parallel mode, so the read is made in this very backend.
use strict;
use warnings;
use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use EnvelopeLocal qw(new_master_key local_node);

my ($keyfile) = new_master_key();
my $node = local_node('parallel_read', $keyfile, '');
$node->start;
$node->safe_psql('postgres', q{
CREATE EXTENSION pg_envelope;
SELECT envelope.create_tenant('p');
SELECT envelope.create_tenant('q');
CREATE TABLE t (tenant text, v bytea);
INSERT INTO t VALUES ('q', envelope.encrypt('q', 'other'));
INSERT INTO t VALUES ('p', envelope.encrypt('p', 'secret'));
});

my $session = $node->background_psql('postgres', on_error_stop => 0);
$session->query_safe('SET force_parallel_mode = on');
$session->query_safe('SET max_parallel_workers = 0');
like($session->query_safe(q{EXPLAIN (COSTS OFF) SELECT envelope.decrypt_text(tenant, v) FROM t WHERE tenant = 'p'}),
	qr/Gather/, 'the query runs under a Gather node, in parallel mode');

# The disable of p commits while the statement sleeps, before its first decrypt.  The
# first row, of q, makes this backend read the key store, which processes the
# invalidation the disable sent: the row of p is then looked up at the generation that
# follows the disable, and read with the statement's older snapshot.
my $disable = IPC::Run::start(
	[ 'psql', '-XAtq', '-d', $node->connstr('postgres'), '-c',
	  "SELECT pg_sleep(1); SELECT envelope.disable_tenant('p')" ]);
is($session->query_safe(
	q{SELECT string_agg(envelope.decrypt_text(tenant, v), ',') FROM t
	   WHERE tenant <> 'q' OR pg_sleep(3) IS NOT NULL}),
	'other,secret', 'the statement that began before the disable still decrypts');
$disable->finish;
is($node->safe_psql('postgres', "SELECT state FROM envelope.tenant WHERE tenant = 'p'"), 'disabled',
	'the tenant was disabled meanwhile');

$session->{stderr} = '';
$session->query(q{SELECT envelope.decrypt_text(tenant, v) FROM t WHERE tenant = 'p'});
like($session->{stderr}, qr/tenant "p" is disabled/,
	'the next statement in parallel mode is refused');
$session->{stderr} = '';
$session->query_safe('SET force_parallel_mode = off');
$session->{stderr} = '';
$session->query(q{SELECT envelope.decrypt_text(tenant, v) FROM t WHERE tenant = 'p'});
like($session->{stderr}, qr/tenant "p" is disabled/, 'and so is one outside it');
$session->{stderr} = '';
$session->quit;

$node->stop;
done_testing();
