# The shared key cache across backends, a hot standby and a crash-restart, with the
# local provider: one unwrap per key per cluster, revocation replayed on a standby, an
# empty cache after a crash, and no plaintext or key in the server log.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use IPC::Run;
use Test::More;
use EnvelopeLocal qw(new_master_key local_node local_dek);
use EnvelopeLog qw(log_lacks_dek);

my $ntenants = 200;
my $nbackends = 8;

my ($keyfile, $keyhex) = new_master_key();
my $primary = local_node('primary', $keyfile, q{
envelope.cache_size = 1024
max_connections = 40
restart_after_crash = on
log_statement = none
log_min_messages = debug1
log_min_error_statement = error
}, allows_streaming => 1);
$primary->start;

$primary->safe_psql('postgres', qq{
CREATE EXTENSION pg_envelope;
SELECT envelope.create_tenant('t' || i) FROM generate_series(1, $ntenants) i;
CREATE TABLE data AS
SELECT 't' || i AS tenant, envelope.encrypt('t' || i, 'value ' || i) AS v
  FROM generate_series(1, $ntenants) i;
CREATE ROLE ta_reader LOGIN IN ROLE envelope_user;
CREATE ROLE ta_other;
GRANT SELECT ON data TO ta_reader;
});

sub stat_value
{
	my ($node, $column) = @_;
	return $node->safe_psql('postgres', "SELECT $column FROM envelope.cache_stats");
}

# ---- Cold cache, 8 backends at once over the same 200 tenants: 200 KMS Decrypts.
$primary->safe_psql('postgres', 'SELECT envelope.cache_flush()');
my $before = stat_value($primary, 'kms_decrypt_calls');
my @runs;
for my $i (1 .. $nbackends)
{
	my ($out, $err) = ('', '');
	my $h = IPC::Run::start(
		[
			'psql', '-X', '-A', '-t', '-d', $primary->connstr('postgres'), '-c',
			"SELECT count(*) FROM data WHERE envelope.decrypt_text(tenant, v) = 'value ' || substr(tenant, 2)"
		],
		'>', \$out, '2>', \$err);
	push @runs, [ $h, \$out, \$err ];
}
my $all_ok = 1;
for my $r (@runs)
{
	$r->[0]->finish;
	my $out = ${ $r->[1] };
	chomp $out;
	$all_ok = 0 unless $out eq $ntenants;
	diag("backend said: $out / ${ $r->[2] }") unless $out eq $ntenants;
}
ok($all_ok, "$nbackends concurrent backends each decrypted all $ntenants tenants");
my $calls = stat_value($primary, 'kms_decrypt_calls') - $before;
is($calls, $ntenants, "cold cache: $ntenants KMS Decrypt calls for $ntenants keys across $nbackends backends");
is(stat_value($primary, 'entries'), $ntenants, 'the shared cache holds one entry per key');

# A warm cache: no more KMS calls, from new backends.
$before = stat_value($primary, 'kms_decrypt_calls');
$primary->safe_psql('postgres', 'SELECT count(envelope.decrypt_text(tenant, v)) FROM data');
is(stat_value($primary, 'kms_decrypt_calls') - $before, 0, 'a new backend is served by the shared cache');

# ---- Hot standby: a disable on the primary stops decrypts on the standby after replay.
$primary->backup('b1');
my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($primary, 'b1', has_streaming => 1);
$standby->start;
$primary->wait_for_catchup($standby, 'replay');

# A standby session that has t1 in its per-backend cache before the disable.
my $reader = $standby->background_psql('postgres', on_error_stop => 0);
is($reader->query_safe("SELECT envelope.decrypt_text('t1', v) FROM data WHERE tenant = 't1'"),
	'value 1', 'standby decrypts');
$primary->safe_psql('postgres', "SELECT envelope.disable_tenant('t1')");
$primary->wait_for_catchup($standby, 'replay');
my ($ret, $stdout, $stderr) = $standby->psql('postgres',
	"SELECT envelope.decrypt_text('t1', v) FROM data WHERE tenant = 't1'");
like($stderr, qr/tenant "t1" is disabled/, 'a new standby session sees the disable after replay');
$reader->query("SELECT envelope.decrypt_text('t1', v) FROM data WHERE tenant = 't1'");
like($reader->{stderr}, qr/tenant "t1" is disabled/,
	'a standby session that had the key cached sees the disable after replay');
$reader->quit;

# Per-tenant access on the standby: a grant committed on the primary restricts the
# tenant for a standby session that had its key cached, once replayed; its revocation
# opens it again.
$reader = $standby->background_psql('postgres', on_error_stop => 0);
$reader->query_safe('SET ROLE ta_reader');
is($reader->query_safe("SELECT envelope.decrypt_text('t2', v) FROM data WHERE tenant = 't2'"),
	'value 2', 'a standby session of an envelope_user decrypts an unrestricted tenant');
$primary->safe_psql('postgres', "SELECT envelope.grant_tenant('t2', 'ta_other')");
$primary->wait_for_catchup($standby, 'replay');
$reader->query("SELECT envelope.decrypt_text('t2', v) FROM data WHERE tenant = 't2'");
like($reader->{stderr}, qr/permission denied for tenant "t2"/,
	'a grant to another role, replayed, stops that standby session');
$reader->{stderr} = '';
$primary->safe_psql('postgres', "SELECT envelope.revoke_tenant('t2', 'ta_other')");
$primary->wait_for_catchup($standby, 'replay');
is($reader->query("SELECT envelope.decrypt_text('t2', v) FROM data WHERE tenant = 't2'"),
	'value 2', 'and its revocation, replayed, lets it decrypt again');
$reader->quit;
is($standby->safe_psql('postgres', "SELECT envelope.decrypt_text('t2', v) FROM data WHERE tenant = 't2'"),
	'value 2', 'other tenants still decrypt on the standby');
$standby->stop;

# ---- Crash-restart: kill -9 of a backend; the cache comes back empty and working.
ok(stat_value($primary, 'entries') > 0, 'cache is warm before the crash');
my $victim = $primary->background_psql('postgres');
my $pid = $victim->query_safe('SELECT pg_backend_pid()');
kill 'KILL', $pid;
$victim->quit;
$primary->poll_query_until('postgres', 'SELECT 1', '1')
  or die 'server did not come back after the crash';
is(stat_value($primary, 'entries'), 0, 'after a crash-restart the shared cache is empty');
is($primary->safe_psql('postgres', "SELECT envelope.decrypt_text('t3', v) FROM data WHERE tenant = 't3'"),
	'value 3', 'and decrypts again');
is(stat_value($primary, 'kms_decrypt_calls'), 1, 'with one new KMS call');

# ---- The server log holds no plaintext and no key, even for failing statements.
$primary->psql('postgres',
	"SELECT envelope.decrypt_text('t2', envelope.encrypt('t3', 'attack at dawn'))");
$primary->psql('postgres', "SELECT envelope.encrypt('no such tenant', 'launch codes 1234')");
$primary->safe_psql('postgres', "SELECT envelope.grant_tenant('t5', 'ta_other')");
$primary->psql('postgres', "SET ROLE ta_reader; SELECT envelope.encrypt('t5', 'eyes only 5678')");
my $log = slurp_file($primary->logfile);
like($log, qr/permission denied for tenant "t5"/, 'a refused tenant is logged');
unlike($log, qr/eyes only/, 'but not the plaintext of the refused statement');
like($log, qr/could not decrypt value for tenant "t2"/, 'the failure is logged');
unlike($log, qr/attack at dawn/, 'the plaintext of a failing statement is not logged');
unlike($log, qr/launch codes/, 'nor is the plaintext of a statement naming an unknown tenant');
unlike($log, qr/$keyhex/i, 'the master key is not in the log');
log_lacks_dek($log, local_dek($primary, $keyfile, $_, 1), "DEK of $_") for qw(t1 t2 t3);

# ---- The extension dropped under a live session: its next read of the key store (for
# a tenant its cache does not hold) says so in words, never crashes, and once the
# extension is created again the session reads the new tables.
$primary->safe_psql('postgres', 'CREATE DATABASE dropped');
$primary->safe_psql('dropped', q{
CREATE EXTENSION pg_envelope;
SELECT envelope.create_tenant('d1');
SELECT envelope.create_tenant('d2');
UPDATE envelope.tenant SET state = state WHERE false;
});
my $live = $primary->background_psql('dropped', on_error_stop => 0);
is($live->query_safe("SELECT envelope.active_key_version('d1')"), '1', 'a live session reads the key store');
$live->query_safe('BEGIN');
$live->query_safe('SELECT 1');
$primary->safe_psql('dropped', 'DROP EXTENSION pg_envelope CASCADE');
$live->{stderr} = '';
$live->query("SELECT envelope.active_key_version('d2')");
like($live->{stderr}, qr/the key store of extension "pg_envelope" no longer exists/,
	'a key store dropped under a transaction gives a clear error');
$live->{stderr} = '';
$live->query_safe('ROLLBACK');
$primary->safe_psql('dropped', q{
CREATE EXTENSION pg_envelope;
SELECT envelope.create_tenant('d3');
SELECT envelope.rotate_tenant_key('d3');
});
is($live->query_safe("SELECT envelope.active_key_version('d3')"), '2',
	'the session reads the key store of the extension created again');
$live->quit;

$primary->stop;
done_testing();
