# The server log never holds a statement that failed in encrypt, decrypt or a KMS call
# (its text may carry a literal plaintext), nor any DEK, in any form.
#
# Every error site on those paths is driven once, by a statement that carries its own
# marker literal: the error must reach the client (so the site was really driven) and
# the marker must be nowhere in the server log, although log_min_error_statement
# would log the statement of any error raised without errhidestmt.  The sites are
# those of `grep -n errhidestmt src/*.c` (envelope_sql.c, keycache.c, kms_glue.c,
# tenant_name.c); each is driven below, in @sites or after it.  Not driven, because
# nothing outside OpenSSL can make them fail: "AES-256-GCM failed in OpenSSL", "could
# not generate a random nonce" and "could not initialize AES-256-GCM".  "the KMS call of
# another backend failed" needs a KMS that can be held: test/tap/028_aws_load_races.pl.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use EnvelopeLocal qw(new_master_key local_node local_dek);
use EnvelopeLog qw(log_lacks_dek);

my ($keyfile, $keyhex) = new_master_key();
my ($otherfile) = new_master_key();
my $node = local_node('hygiene', $keyfile, q{
log_statement = none
log_min_messages = debug1
log_min_error_statement = error
log_error_verbosity = verbose
envelope.cache_ttl = 3600
});
$node->start;

$node->safe_psql('postgres', q{
CREATE EXTENSION pg_envelope;
SELECT envelope.create_tenant('t' || i) FROM generate_series(1, 9) i;
CREATE TABLE data AS
SELECT 't' || i AS tenant, envelope.encrypt('t' || i, 'value ' || i) AS v
  FROM generate_series(1, 9) i;
-- t3 disabled, t4 destroyed, t5 version 1 retired, t6 version 1 destroyed by hand,
-- t7's key under a provider this server does not know
SELECT envelope.disable_tenant('t3');
SELECT envelope.destroy_tenant('t4', 't4');
SELECT envelope.rotate_tenant_key('t5');
SELECT envelope.retire_key_version('t5', 1);
SELECT envelope.rotate_tenant_key('t6');
UPDATE envelope.data_key SET state = 'destroyed', wrapped_dek = NULL WHERE tenant = 't6' AND version = 1;
UPDATE envelope.data_key SET kms_provider = 'nosuch' WHERE tenant = 't7';
SELECT envelope.cache_flush();
});
my %dek = map { ("t$_" => local_dek($node, $keyfile, "t$_", 1)) } (1, 2, 5, 8, 9);

# name => [ statement (with MARKER), expected error ]
my @sites = (
	[ 'empty tenant', q{SELECT envelope.encrypt('', 'MARKER')}, qr/tenant name must not be empty/ ],
	[ 'tenant too long', q{SELECT envelope.encrypt(repeat('x', 256), 'MARKER')}, qr/tenant name is too long/ ],
	[ 'control character in tenant', q{SELECT envelope.decrypt(E'a\x01b', v, 'MARKER') FROM data},
		qr/tenant name must not contain control characters/ ],
	[ 'value too large', q{SELECT envelope.encrypt('t1', repeat('x', 1073741810)), 'MARKER'},
		qr/value is too large to encrypt/ ],
	[ 'deterministic value too large', q{SELECT envelope.encrypt_deterministic('t1', repeat('x', 1073741810)), 'MARKER'},
		qr/value is too large to encrypt/ ],
	[ 'not a ciphertext', q{SELECT envelope.decrypt('t1', '\x00'::bytea, 'MARKER')},
		qr/value is not a pg_envelope ciphertext/ ],
	[ 'not a ciphertext (key_version)', q{SELECT envelope.key_version('\x00'::bytea), 'MARKER'},
		qr/value is not a pg_envelope ciphertext/ ],
	[ 'key version out of range (key_version)', q{SELECT envelope.key_version('\x01ffffffff000000000000000000000000000000000000000000000000000000000000000000'::bytea), 'MARKER'},
		qr/value is not a pg_envelope ciphertext/ ],
	[ 'authentication failure', q{SELECT envelope.decrypt('t1', v, 'MARKER') FROM data WHERE tenant = 't1'},
		qr/could not decrypt value for tenant "t1"/ ],
	[ 'not valid text', q{SELECT envelope.decrypt_text('t1', envelope.encrypt('t1', '\xff'::bytea, 'MARKER'), 'MARKER')},
		qr/decrypted value is not valid text/ ],
	[ 'tenant disabled', q{SELECT envelope.decrypt_text('t3', v, 'MARKER') FROM data WHERE tenant = 't3'},
		qr/tenant "t3" is disabled/ ],
	[ 'tenant destroyed', q{SELECT envelope.encrypt('t4', 'MARKER')}, qr/tenant "t4" has been destroyed/ ],
	[ 'tenant does not exist', q{SELECT envelope.encrypt('nosuch', 'MARKER')}, qr/tenant "nosuch" does not exist/ ],
	[ 'key version does not exist', q{SELECT envelope.decrypt('t1', overlay(v placing '\x00000063'::bytea from 2), 'MARKER') FROM data WHERE tenant = 't1'},
		qr/key version 99 of tenant "t1" does not exist/ ],
	[ 'key version retired', q{SELECT envelope.decrypt_text('t5', v, 'MARKER') FROM data WHERE tenant = 't5'},
		qr/key version 1 of tenant "t5" is retired/ ],
	[ 'key version destroyed', q{SELECT envelope.decrypt_text('t6', v, 'MARKER') FROM data WHERE tenant = 't6'},
		qr/key version 1 of tenant "t6" has been destroyed/ ],
	[ 'unknown KMS provider', q{SELECT envelope.decrypt_text('t7', v, 'MARKER') FROM data WHERE tenant = 't7'},
		qr/unknown KMS provider "nosuch"/ ],
);

my $n = 0;
my %marker;
for my $site (@sites)
{
	my ($name, $sql, $expect) = @$site;
	my $mark = sprintf('hygiene-literal-%02d-%s', ++$n, join('', map { chr(97 + int(rand(26))) } 1 .. 8));
	$sql =~ s/MARKER/$mark/g;
	my ($ret, $out, $err) = $node->psql('postgres', $sql);
	like($err, $expect, "$name: the error is raised");
	$marker{$name} = $mark;
}

# The grammar of new tenant names (create_tenant), in a UTF-8 database.
$node->safe_psql('postgres',
	"CREATE DATABASE utf8 TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'");
$node->safe_psql('utf8', 'CREATE EXTENSION pg_envelope');
for my $site (
	[ 'format character in a new tenant name', q{SELECT envelope.create_tenant(E'a\u200Bb'), 'MARKER'},
		qr/tenant name must not contain/ ],
	[ 'new tenant name not in NFC', q{SELECT envelope.create_tenant(E'cafe\u0301'), 'MARKER'},
		qr/tenant name must be in Unicode normalization form NFC/ ])
{
	my ($name, $sql, $expect) = @$site;
	my $mark = sprintf('hygiene-literal-%02d-utf8', ++$n);
	$sql =~ s/MARKER/$mark/g;
	my ($ret, $out, $err) = $node->psql('utf8', $sql);
	like($err, $expect, "$name: the error is raised");
	$marker{$name} = $mark;
}

# The disable seen by a backend that had the key in its first level: the per-row path.
my $session = $node->background_psql('postgres', on_error_stop => 0);
$session->query_safe("SELECT envelope.decrypt_text('t8', v) FROM data WHERE tenant = 't8'");
$node->safe_psql('postgres', "SELECT envelope.disable_tenant('t8')");
$marker{'tenant disabled, cached'} = 'hygiene-literal-cached-disable';
$session->query("SELECT envelope.decrypt_text('t8', v, 'hygiene-literal-cached-disable') FROM data WHERE tenant = 't8'");
like($session->{stderr}, qr/tenant "t8" is disabled/, 'tenant disabled, cached: the error is raised');
$session->quit;

# A KMS failure: the server pointed at another master key file, the cache emptied.
$node->safe_psql('postgres', "ALTER SYSTEM SET envelope.local_master_key_file = '$otherfile'");
$node->reload;
$node->safe_psql('postgres', 'SELECT envelope.cache_flush()');
$marker{'KMS failure'} = 'hygiene-literal-kms-failure';
my ($ret, $out, $err) = $node->psql('postgres',
	"SELECT envelope.decrypt_text('t9', v, 'hygiene-literal-kms-failure') FROM data WHERE tenant = 't9'");
like($err, qr/KMS Decrypt failed for key version 1 of tenant "t9"/, 'KMS failure: the error is raised');

# A statement with no errhidestmt is logged: the scan below would see a leak.
$node->psql('postgres', "SELECT 1 / 0, 'hygiene-literal-control'");

$node->stop;
my $log = slurp_file($node->logfile);
like($log, qr/hygiene-literal-control/,
	'control: a failing statement is logged where errhidestmt is not set');
like($log, qr/tenant "t3" is disabled/, 'the errors themselves are logged');
for my $name (sort keys %marker)
{
	unlike($log, qr/\Q$marker{$name}\E/, "$name: the statement is not in the server log");
}
for my $t (sort keys %dek)
{
	log_lacks_dek($log, $dek{$t}, "DEK of $t");
}
unlike($log, qr/\Q$keyhex\E/i, 'the master key is not in the log');
unlike($log, qr/value \d/, 'no plaintext is in the log');

done_testing();
