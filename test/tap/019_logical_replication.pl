# Revocation reaches logical-replication subscribers.  With a publication FOR ALL
# TABLES the key tables replicate with the data; the key-store triggers fire in the
# subscriber's apply worker too (0.2.0), so a disable, rotate, retire or destroy made
# on the publisher takes effect in the subscriber's existing sessions when the apply
# worker commits it, not only in new ones.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use EnvelopeLocal qw(new_master_key local_node);

# The same master key on both sides: a subscriber unwraps the replicated DEKs itself.
my ($keyfile) = new_master_key();
my $publisher = local_node('publisher', $keyfile, '', allows_streaming => 'logical');
my $subscriber = local_node('subscriber', $keyfile, '', allows_streaming => 'logical');
$publisher->start;
$subscriber->start;

my $schema = 'CREATE TABLE data (tenant text, n int, v bytea, PRIMARY KEY (tenant, n));';
$publisher->safe_psql('postgres', qq{
CREATE EXTENSION pg_envelope;
$schema
SELECT envelope.create_tenant(t) FROM unnest(ARRAY['disabled', 'rotated', 'retired', 'destroyed', 'kept']) t;
INSERT INTO data SELECT t, 1, envelope.encrypt(t, 'old ' || t)
  FROM unnest(ARRAY['disabled', 'rotated', 'retired', 'destroyed', 'kept']) t;
CREATE PUBLICATION everything FOR ALL TABLES;
});
is($subscriber->safe_psql('postgres', q{
CREATE EXTENSION pg_envelope;
SELECT count(*) FROM pg_trigger WHERE tgrelid IN ('envelope.tenant'::regclass, 'envelope.data_key'::regclass)
   AND tgenabled IN ('A', 'R')}), 6, 'the key-store triggers fire in replica sessions');
$subscriber->safe_psql('postgres', $schema);
my $connstr = $publisher->connstr . ' dbname=postgres';
$subscriber->safe_psql('postgres',
	"CREATE SUBSCRIPTION everything CONNECTION '$connstr' PUBLICATION everything");
$subscriber->wait_for_subscription_sync($publisher, 'everything');

is($subscriber->safe_psql('postgres', 'SELECT count(*) FROM envelope.data_key'), 5,
	'the key store replicated');

# A subscriber session that has every tenant's key in its first level.
my $session = $subscriber->background_psql('postgres', on_error_stop => 0);
is($session->query_safe(q{SELECT string_agg(envelope.decrypt_text(tenant, v), ',' ORDER BY tenant) FROM data}),
	'old destroyed,old disabled,old kept,old retired,old rotated', 'the subscriber decrypts replicated values');
is($session->query_safe(q{SELECT envelope.key_version(envelope.encrypt('rotated', 'x'))}), 1,
	'and encrypts under the active version');

sub replicate
{
	my ($sql) = @_;
	$publisher->safe_psql('postgres', $sql);
	$publisher->wait_for_catchup('everything');
}

sub session_error
{
	my ($sql) = @_;
	$session->{stderr} = '';
	$session->query($sql);
	# psql may print the error after the query's end marker: a second query collects it
	$session->query('SELECT 1');
	my $err = $session->{stderr};
	$session->{stderr} = '';
	return $err;
}

replicate("SELECT envelope.disable_tenant('disabled')");
like(session_error(q{SELECT envelope.decrypt_text(tenant, v) FROM data WHERE tenant = 'disabled'}),
	qr/tenant "disabled" is disabled/, 'disable: refused in the existing subscriber session');

replicate(q{SELECT envelope.rotate_tenant_key('rotated');
INSERT INTO data VALUES ('rotated', 2, envelope.encrypt('rotated', 'new rotated'))});
is($session->query_safe(q{SELECT envelope.key_version(envelope.encrypt('rotated', 'x'))}), 2,
	'rotate: the existing subscriber session encrypts under the new version');
is($session->query_safe(q{SELECT string_agg(envelope.decrypt_text(tenant, v), ',' ORDER BY n) FROM data WHERE tenant = 'rotated'}),
	'old rotated,new rotated', 'and decrypts both versions');

replicate(q{SELECT envelope.rotate_tenant_key('retired');
SELECT envelope.retire_key_version('retired', 1)});
like(session_error(q{SELECT envelope.decrypt_text(tenant, v) FROM data WHERE tenant = 'retired'}),
	qr/key version 1 of tenant "retired" is retired/, 'retire: refused in the existing subscriber session');

replicate("SELECT envelope.destroy_tenant('destroyed', 'destroyed')");
like(session_error(q{SELECT envelope.decrypt_text(tenant, v) FROM data WHERE tenant = 'destroyed'}),
	qr/tenant "destroyed" has been destroyed/, 'destroy: refused in the existing subscriber session');

is($session->query_safe(q{SELECT envelope.decrypt_text(tenant, v) FROM data WHERE tenant = 'kept'}),
	'old kept', 'other tenants still decrypt');
$session->quit;

# A new subscriber session agrees, and an enable comes back the same way.
replicate("SELECT envelope.enable_tenant('disabled')");
is($subscriber->safe_psql('postgres', q{SELECT envelope.decrypt_text(tenant, v) FROM data WHERE tenant = 'disabled'}),
	'old disabled', 'enable: replicated too');

$subscriber->stop;
$publisher->stop;
done_testing();
