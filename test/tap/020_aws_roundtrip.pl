
# 020_aws_roundtrip.pl — the aws provider end to end through SQL, against moto.
#
# Tenants whose DEKs come from KMS GenerateDataKey (by key ARN and by alias), values
# that decrypt again after the cache is flushed (one KMS Decrypt, counted by the fault
# proxy), rotation, and the encryption context that binds a wrapped DEK to its tenant
# and version.  ReEncrypt through envelope.rewrap is 025_aws_rewrap.pl.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use EnvelopeKms;

my $kms  = EnvelopeKms->new;
my $key1 = $kms->create_key;
my $key2 = $kms->create_key;
$kms->create_alias('alias/pg-envelope-tap', $key1->{KeyId});

# only the environment supplies credentials (moto accepts any while auth is off)
$ENV{AWS_ACCESS_KEY_ID}     = 'testing';
$ENV{AWS_SECRET_ACCESS_KEY} = 'testing';
delete $ENV{AWS_SESSION_TOKEN};
$ENV{AWS_EC2_METADATA_DISABLED} = 'true';

my $node = $kms->init_node('aws_roundtrip', key => $key1->{Arn}, retries => 2,
	timeout => 5000);

sub sql { return $node->safe_psql('postgres', $_[0]); }

# a tenant by key ARN: one GenerateDataKey
is(sql("SELECT envelope.create_tenant('acme')"), '1', 'create_tenant with the aws provider');
is($kms->count('GenerateDataKey', 'forwarded'), 1, 'one GenerateDataKey');
is( sql("SELECT kms_key FROM envelope.tenant_keys WHERE tenant = 'acme'"),
	$key1->{Arn}, 'the key ARN KMS used is recorded');

sql("CREATE TABLE t (id int, tenant text, secret bytea)");
sql("INSERT INTO t SELECT g, 'acme', envelope.encrypt('acme', 'secret ' || g) FROM generate_series(1, 20) g");

# decrypt after a flush: KMS Decrypt happens once, then the cache serves
sql("SELECT envelope.cache_flush()");
$kms->reset_proxy;
is( sql("SELECT envelope.decrypt_text('acme', secret) FROM t WHERE id = 7"),
	'secret 7', 'decrypts after the cache was flushed');
is($kms->count('Decrypt', 'forwarded'), 1, 'that took one KMS Decrypt');
is( sql("SELECT count(*) FROM t WHERE envelope.decrypt_text(tenant, secret) = 'secret ' || id"),
	'20', 'all rows decrypt');
is($kms->count('Decrypt', 'forwarded'), 1, 'the cached DEK served the other rows');

# a tenant by alias; names that need escaping in the KMS JSON
my $odd = q{o'brien "x" \\ é 中};
(my $odd_sql = $odd) =~ s/'/''/g;
is(sql("SELECT envelope.create_tenant('$odd_sql', 'alias/pg-envelope-tap')"),
	'1', 'create_tenant by alias, odd tenant name');
is( sql("SELECT kms_key FROM envelope.tenant_keys WHERE tenant = '$odd_sql'"),
	$key1->{Arn}, 'the alias resolved to the key ARN');
sql("SELECT envelope.cache_flush()");
is( sql("SELECT envelope.decrypt_text('$odd_sql', envelope.encrypt('$odd_sql', 'v'))"),
	'v', 'odd tenant round trip through KMS');

# rotation: a second GenerateDataKey, version 2
$kms->reset_proxy;
is(sql("SELECT envelope.rotate_tenant_key('acme')"), '2', 'rotate_tenant_key');
is($kms->count('GenerateDataKey', 'forwarded'), 1, 'rotation asked KMS for a new DEK');
sql("INSERT INTO t VALUES (100, 'acme', envelope.encrypt('acme', 'after rotation'))");

# the encryption context: a wrapped DEK copied to another tenant does not unwrap
sql("SELECT envelope.create_tenant('beta')");
sql("INSERT INTO t VALUES (200, 'beta', envelope.encrypt('beta', 'beta secret'))");
sql("UPDATE envelope.data_key SET wrapped_dek = "
	  . "(SELECT wrapped_dek FROM envelope.data_key WHERE tenant = 'acme' AND version = 1) "
	  . "WHERE tenant = 'beta' AND version = 1");
sql("SELECT envelope.cache_flush()");
my ($state, $err) = EnvelopeKms::psql_error($node,
	"SELECT envelope.decrypt_text('beta', secret) FROM t WHERE id = 200");
is($state, 'XX001', 'a DEK under another tenant\'s context: data_corrupted');
like($err, qr/KMS Decrypt failed .*InvalidCiphertextException/, 'names the AWS error');
unlike($err, qr/beta secret/, 'no plaintext in the error');

# the stats count KMS calls by operation
cmp_ok(sql("SELECT kms_decrypt_calls FROM envelope.cache_stats"), '>=', 2,
	'cache_stats counts KMS Decrypt calls');

# a key that does not exist
($state, $err) = EnvelopeKms::psql_error($node,
	"SELECT envelope.create_tenant('gamma', 'alias/does-not-exist')");
is($state, '42704', 'unknown master key: undefined_object');
like($err, qr/NotFoundException/, 'names NotFoundException');

$node->stop;
$kms->stop;
done_testing();
