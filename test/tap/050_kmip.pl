
# 050_kmip.pl — the kmip provider against a real KMIP server (PyKMIP).
#
# A PyKMIP server on loopback with certificates made for the test, TLS 1.2 and client
# authentication, behind a raw TCP fault proxy.  Round trip, the authenticated data
# binding (tenant, version), KMS calls with a cold cache and one connection per
# backend, key states (Deactivated, Compromised, destroyed), client and server
# certificate checks, the private key file checks, the server down and hung,
# cancellation, and rewrap between two KMIP keys.

use strict;
use warnings;

use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time sleep);
use EnvelopeKms;
use EnvelopeKmip;

my $kmip = EnvelopeKmip->new;
my $key1 = $kmip->create_key;
my $key2 = $kmip->create_key;
like($key1, qr/^\S+$/, "PyKMIP made master key $key1");

my $node = PostgreSQL::Test::Cluster->new('kmip');
$node->init;
$node->append_conf('postgresql.conf',
	"shared_preload_libraries = 'pg_envelope'\n"
	  . $kmip->server_conf(key => $key1, timeout => 2000, retries => 2));
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION pg_envelope');

my ($state, $err);

sub sql { return $node->safe_psql('postgres', $_[0]); }
sub stat_of { return sql("SELECT $_[0] FROM envelope.cache_stats"); }

sub psql_error
{
	my ($sql, %o) = @_;
	return EnvelopeKms::psql_error($node, $sql, %o);
}

# ---------------------------------------------------------------------------
# the settings are the superuser's: other roles can neither read nor set them
sql("CREATE ROLE app LOGIN");
for my $guc (qw(kmip_host kmip_port kmip_ca_file kmip_cert_file kmip_key_file))
{
	($state, $err) = psql_error("SET ROLE app; SHOW envelope.$guc");
	is($state, '42501', "envelope.$guc is hidden from other roles");
}
($state, $err) = psql_error("SET ROLE app; SET envelope.kmip_host = 'evil.example'");
is($state, '42501', 'other roles cannot point the provider elsewhere');

# ---------------------------------------------------------------------------
# round trip
is(sql("SELECT envelope.create_tenant('acme')"), '1', 'create_tenant under a KMIP key');
is( sql("SELECT kms_provider || ' ' || kms_key FROM envelope.tenant_keys WHERE tenant = 'acme'"),
	"kmip $key1", 'the DEK records the provider and the key\'s Unique Identifier');
is( sql("SELECT get_byte(wrapped_dek, 0) || ' ' || length(wrapped_dek) FROM envelope.data_key WHERE tenant = 'acme'"),
	'1 ' . (2 + 16 + 16 + 32), 'wrapped DEK: format 1, a 16-byte IV from the server, tag, 32 bytes');
sql("CREATE TABLE t (id int, tenant text, secret bytea)");
sql("INSERT INTO t VALUES (1, 'acme', envelope.encrypt('acme', 'hello kmip'))");
sql("SELECT envelope.cache_flush()");
is(sql("SELECT envelope.decrypt_text('acme', secret) FROM t WHERE id = 1"),
	'hello kmip', 'round trip through a KMIP Decrypt after a cache flush');
is(sql("SELECT envelope.rotate_tenant_key('acme')"), '2', 'rotation wraps a new DEK');
sql("INSERT INTO t VALUES (2, 'acme', envelope.encrypt('acme', 'after rotation'))");

# ---------------------------------------------------------------------------
# KMS calls with a cold cache, and one connection per backend
for my $i (1 .. 5) { sql("SELECT envelope.create_tenant('cold$i')"); }
sql("INSERT INTO t SELECT 10 + i, 'cold' || i, envelope.encrypt('cold' || i, 'v' || i) FROM generate_series(1, 5) i");
sql("SELECT envelope.cache_flush()");
my $calls_before = stat_of('kms_decrypt_calls');
my $conns_before = $kmip->connections;
is(sql("SELECT string_agg(envelope.decrypt_text(tenant, secret), ',' ORDER BY id) FROM t WHERE id > 10"),
	'v1,v2,v3,v4,v5', 'five tenants decrypt with a cold cache');
is(stat_of('kms_decrypt_calls') - $calls_before, 5, 'cold cache: one KMIP Decrypt per DEK');
is($kmip->connections - $conns_before, 1, 'five KMIP requests from one backend: one TCP connection (one TLS handshake)');
is(sql("SELECT string_agg(envelope.decrypt_text(tenant, secret), ',' ORDER BY id) FROM t WHERE id > 10"),
	'v1,v2,v3,v4,v5', 'again, warm');
is(stat_of('kms_decrypt_calls') - $calls_before, 5, 'warm cache: no KMIP call');
is(stat_of('kms_errors'), 0, 'no KMS errors so far');

# a server that drops kept connections (a restart): the next call of the same backend
# reconnects by itself.  The backend asks the proxy to reset every connection between
# two cold-cache reads (COPY TO PROGRAM, so the drop happens inside one session).
my $ctl = $kmip->{control_port};
my $drop = "COPY (SELECT 'drop') TO PROGRAM \$\$python3 -c 'import socket,sys; "
  . "s=socket.create_connection((\"127.0.0.1\", $ctl)); s.sendall(sys.stdin.buffer.read()); s.recv(100)'\$\$";
$conns_before = $kmip->connections;
($state, $err) = psql_error(
	"SELECT envelope.cache_flush(); SELECT count(envelope.decrypt_text(tenant, secret)) FROM t WHERE id > 10; "
	  . "$drop; SELECT envelope.cache_flush(); SELECT count(envelope.decrypt_text(tenant, secret)) FROM t WHERE id > 10");
is($state, '00000', 'a kept connection reset by the server is replaced without an error') or diag($err);
is($kmip->connections - $conns_before, 2, 'the backend opened exactly one new connection after the reset');

# ---------------------------------------------------------------------------
# authenticated data: a wrapped DEK copied to another tenant or version does not unwrap
sql("SELECT envelope.create_tenant('beta')");
sql("INSERT INTO t VALUES (200, 'beta', envelope.encrypt('beta', 'beta secret'))");
sql("UPDATE envelope.data_key SET wrapped_dek = "
	  . "(SELECT wrapped_dek FROM envelope.data_key WHERE tenant = 'acme' AND version = 1) "
	  . "WHERE tenant = 'beta' AND version = 1");
sql("SELECT envelope.cache_flush()");
($state, $err) = psql_error("SELECT envelope.encrypt('beta', 'x')");
is($state, 'XX001', 'a DEK wrapped for another tenant: data_corrupted');
like($err, qr/KMS Decrypt failed .*kmip provider: KMIP Decrypt failed/s,
	'the KMIP Decrypt refused it');
sql("CREATE TABLE saved AS SELECT wrapped_dek FROM envelope.data_key WHERE tenant = 'acme' AND version = 2");
sql("UPDATE envelope.data_key SET wrapped_dek = "
	  . "(SELECT wrapped_dek FROM envelope.data_key WHERE tenant = 'acme' AND version = 1) "
	  . "WHERE tenant = 'acme' AND version = 2");
sql("SELECT envelope.cache_flush()");
($state, $err) = psql_error("SELECT envelope.encrypt('acme', 'x')");
is($state, 'XX001', 'a DEK wrapped for another version of the same tenant: data_corrupted');
unlike($err, qr/beta secret|hello kmip/, 'no plaintext in the errors');
sql("UPDATE envelope.data_key SET wrapped_dek = (SELECT wrapped_dek FROM saved) WHERE tenant = 'acme' AND version = 2");
sql("SELECT envelope.cache_flush()");
is(sql("SELECT envelope.decrypt_text('acme', secret) FROM t WHERE id = 2"), 'after rotation',
	'version 2 restored decrypts again');
note('PyKMIP answers a wrong GCM tag with General Failure, not Cryptographic Failure; '
	  . 'the provider reads either as a wrapped key that does not unwrap');

# ---------------------------------------------------------------------------
# key states on the server
my $key3 = $kmip->create_key;
sql("SELECT envelope.create_tenant('rev', '$key3')");
sql("INSERT INTO t VALUES (300, 'rev', envelope.encrypt('rev', 'revoked later'))");
$kmip->revoke_key($key3);
is($kmip->key_state($key3), 'DEACTIVATED', 'the server says Deactivated');
sql("SELECT envelope.cache_flush()");
($state, $err) = psql_error("SELECT envelope.decrypt_text('rev', secret) FROM t WHERE id = 300");
is($state, '55000', 'a Deactivated master key refuses like a disabled AWS key (55000)');
like($err, qr/is Deactivated on the KMIP server/, 'the error names the state');
($state, $err) = psql_error("SELECT envelope.create_tenant('rev2', '$key3')");
is($state, '55000', 'no new DEK under a Deactivated key');

my $key4 = $kmip->create_key;
sql("SELECT envelope.create_tenant('comp', '$key4')");
$kmip->compromise_key($key4);
sql("SELECT envelope.cache_flush()");
($state, $err) = psql_error("SELECT envelope.encrypt('comp', 'x')");
is($state, '55000', 'a Compromised master key: 55000');
like($err, qr/is Compromised on the KMIP server/, 'the error names the state');

my $key5 = $kmip->create_key;
sql("SELECT envelope.create_tenant('gone', '$key5')");
$kmip->destroy_key($key5);
sql("SELECT envelope.cache_flush()");
($state, $err) = psql_error("SELECT envelope.encrypt('gone', 'x')");
is($state, '42704', 'a destroyed master key: 42704, as a deleted AWS key');
like($err, qr/Item Not Found/, 'names Item Not Found');
diag('PYKMIP LIMITATION: PyKMIP deletes a destroyed object instead of keeping it in the '
	  . 'Destroyed state, so a key in state Destroyed cannot be shown here; it is refused '
	  . 'like Deactivated and Compromised (55000) by the same code path');

my $key6 = $kmip->admin('create-inactive')->{uid};
($state, $err) = psql_error("SELECT envelope.create_tenant('early', '$key6')");
is($state, '55000', 'a Pre-Active (never activated) master key: 55000');
like($err, qr/is Pre-Active on the KMIP server/, 'the error names the state');

($state, $err) = psql_error("SELECT envelope.create_tenant('nokey', 'no-such-uid')");
is($state, '42704', 'an unknown Unique Identifier: 42704');

# ---------------------------------------------------------------------------
# client certificate and private key
my $d = $kmip->dir;
my $cold = "SELECT envelope.cache_flush(); SELECT envelope.decrypt_text('acme', secret) FROM t WHERE id = 1";

($state, $err) = psql_error("SET envelope.kmip_cert_file = '$d/rogue_client.crt'; "
	  . "SET envelope.kmip_key_file = '$d/rogue_client.key'; $cold");
is($state, '28000', 'a client certificate from another CA is refused by the server (28000)');
like($err, qr/refused the client certificate/, 'says the server refused the certificate');

($state, $err) = psql_error("SET envelope.kmip_cert_file = '$d/server.crt'; "
	  . "SET envelope.kmip_key_file = '$d/server.key'; $cold");
is($state, '28000', 'a certificate of the trusted CA that is not for client authentication is refused (28000)');

diag('NOT EXERCISED: a client that presents no certificate at all.  The provider always '
	  . 'presents envelope.kmip_cert_file and refuses to connect without it (F0000, next test); '
	  . 'that PyKMIP also refuses certificate-less clients is its own configuration '
	  . '(enable_tls_client_auth, CERT_REQUIRED), not this code');
($state, $err) = psql_error("SET envelope.kmip_cert_file = ''; $cold");
is($state, 'F0000', 'no client certificate configured: F0000');
like($err, qr/envelope.kmip_cert_file is not set/, 'names the setting');

($state, $err) = psql_error("SET envelope.kmip_key_file = '$d/rogue_client.key'; $cold");
is($state, 'F0000', 'a private key that does not match the certificate: F0000');

chmod 0644, "$d/client.key";
($state, $err) = psql_error($cold);
is($state, 'F0000', 'a group/other-readable private key file is refused');
like($err, qr/KMIP client key file ".*" is accessible by group or others/, 'the same check as the local master key');
chmod 0600, "$d/client.key";

my $inside = $node->data_dir . '/kmip_client.key';
{
	open(my $in, '<', "$d/client.key") or die;
	open(my $out, '>', $inside) or die;
	print $out $_ while <$in>;
	close $out;
	chmod 0600, $inside;
}
($state, $err) = psql_error("SET envelope.kmip_key_file = '$inside'; $cold");
is($state, 'F0000', 'a private key file inside PGDATA is refused');
like($err, qr/is inside the data directory/, 'says why');
unlink $inside;

($state, $err) = psql_error($cold);
is($state, '00000', 'with the right files, the same query works') or diag($err);

# ---------------------------------------------------------------------------
# server certificate
my $other_port = $kmip->start_other_host_server;
($state, $err) = psql_error("SET envelope.kmip_port = $other_port; $cold");
is($state, '58000', 'a server certificate (from the trusted CA) for another host is refused');
like($err, qr/certificate did not verify/, 'says the certificate did not verify');
($state, $err) = psql_error("SET envelope.kmip_host = 'localhost'; SET envelope.kmip_port = $other_port; $cold");
is($state, '58000', 'refused by host name as well as by address');
($state, $err) = psql_error("SET envelope.kmip_host = 'localhost'; $cold");
is($state, '00000', 'the right server by host name (DNS SAN) works') or diag($err);
($state, $err) = psql_error("SET envelope.kmip_ca_file = '$d/rogue_ca.crt'; $cold");
is($state, '58000', 'a server certificate from an untrusted CA is refused');
like($err, qr/certificate did not verify/, 'says the certificate did not verify');

# ---------------------------------------------------------------------------
# server down and hung
$kmip->proxy_mode('down');
($state, $err) = psql_error($cold);
is($state, '58000', 'KMIP server down: 58000');
like($err, qr/could not connect to the KMIP server.*after 3 attempts/s, 'retried, bounded by envelope.kms_retries');
$kmip->proxy_mode('forward');

$kmip->proxy_mode('hang');
my $t0 = time();
($state, $err) = psql_error("SET envelope.kms_timeout = '500ms'; SET envelope.kms_retries = 1; $cold", timeout => 60);
my $elapsed = time() - $t0;
is($state, '58000', 'KMIP server hung: 58000');
like($err, qr/timed out|within envelope.kms_timeout/, 'says it timed out');
cmp_ok($elapsed, '<', 5, sprintf('two attempts of 0.5 s ended in %.2fs', $elapsed));

# pg_cancel_backend during a hung request (a long kms_timeout: only the cancel ends it)
my ($out, $perr) = ('', '');
my $h = IPC::Run::start(
	[
		'psql', '-X', '-v', 'VERBOSITY=verbose', '-d', $node->connstr('postgres'),
		'-c', "SET envelope.kms_timeout = '60s'; SET application_name = 'hung_kmip'; $cold"
	],
	'<', \undef, '>', \$out, '2>', \$perr);
my $pid = '';
my $deadline = time() + 30;
while ($pid !~ /^\d+$/ && time() < $deadline)
{
	$pid = sql("SELECT pid FROM pg_stat_activity WHERE application_name = 'hung_kmip' AND state = 'active'");
	sleep(0.1);
}
like($pid, qr/^\d+$/, 'the backend waiting on the hung server is visible');
sleep(0.5);    # let it get into the TLS handshake
my $t_cancel = time();
sql("SELECT pg_cancel_backend($pid)");
while ($h->pumpable && time() - $t_cancel < 10) { $h->pump_nb; sleep(0.02); }
my $waited = time() - $t_cancel;
eval { $h->finish; 1 } or $h->kill_kill;
cmp_ok($waited, '<', 1.0, sprintf('pg_cancel_backend ended the KMIP wait in %.2fs', $waited));
like($perr, qr/ERROR:\s+57014/, 'SQLSTATE 57014');

$t0 = time();
($state, $err) = psql_error("SET envelope.kms_timeout = '60s'; SET statement_timeout = '1s'; $cold", timeout => 60);
$elapsed = time() - $t0;
is($state, '57014', 'statement_timeout during a hung KMIP request: 57014');
cmp_ok($elapsed, '<', 2.0, sprintf('statement_timeout of 1s returned in %.2fs', $elapsed));
$kmip->proxy_mode('forward');
($state, $err) = psql_error($cold);
is($state, '00000', 'after the faults, the same query works') or diag($err);

# a server that stops answering on a kept connection: the read waits, not only the
# handshake, are bounded by kms_timeout and by statement_timeout
my $freeze = $drop =~ s/'drop'/'freeze'/r;
($state, $err) = psql_error("SET envelope.kms_timeout = '60s'; $cold; $freeze; "
	  . "SET statement_timeout = '1s'; $cold", timeout => 60);
is($state, '57014', 'statement_timeout while a kept connection is silent: 57014');
$t0 = time();
($state, $err) = psql_error("SET envelope.kms_timeout = '1s'; SET envelope.kms_retries = 1; $cold; $freeze; $cold",
	timeout => 60);
$elapsed = time() - $t0;
is($state, '00000', 'a silent kept connection times out and the retry on a new one succeeds') or diag($err);
cmp_ok($elapsed, '>=', 1.0, sprintf('(the first attempt waited out kms_timeout: %.2fs in all)', $elapsed));

# ---------------------------------------------------------------------------
# rewrap between two KMIP keys: Decrypt under the old key, Encrypt under the new
my $dec_before = stat_of('kms_reencrypt_calls');
is(sql("SELECT envelope.rewrap('$key2', 'acme')"), '2', 'rewrap moved both DEK versions of acme');
is(stat_of('kms_reencrypt_calls') - $dec_before, 2, 'one provider re-wrap per DEK');
is(sql("SELECT string_agg(DISTINCT kms_key, ',') FROM envelope.tenant_keys WHERE tenant = 'acme'"),
	$key2, 'acme\'s DEKs are now under the second key');
$kmip->revoke_key($key1);
sql("SELECT envelope.cache_flush()");
is(sql("SELECT string_agg(envelope.decrypt_text('acme', secret), ',' ORDER BY id) FROM t WHERE id IN (1, 2)"),
	'hello kmip,after rotation',
	'acme decrypts under the second key with the first one revoked');
is(sql("SELECT envelope.rewrap('$key2', 'acme')"), '0', 'a second rewrap moves nothing');
($state, $err) = psql_error("SELECT envelope.decrypt_text('cold1', secret) FROM t WHERE id = 11");
is($state, '55000', 'a tenant left under the revoked first key is refused');

$node->stop;
$kmip->stop;
done_testing();
