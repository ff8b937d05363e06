
# 025_aws_rewrap.pl — envelope.rewrap moves DEKs to another KMS key with ReEncrypt.
#
# Against moto through the fault proxy: the DEKs move without ever being unwrapped
# outside KMS (no Decrypt call), values still decrypt under the new key, a second run
# finds nothing to do, a throttled ReEncrypt is retried, a refused one is a clean
# error, and a wrapped DEK whose encryption context does not match is refused by KMS.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use EnvelopeKms;

my $kms  = EnvelopeKms->new;
my $key1 = $kms->create_key;
my $key2 = $kms->create_key;
my $key3 = $kms->create_key;

$ENV{AWS_ACCESS_KEY_ID}     = 'testing';
$ENV{AWS_SECRET_ACCESS_KEY} = 'testing';
delete $ENV{AWS_SESSION_TOKEN};
$ENV{AWS_EC2_METADATA_DISABLED} = 'true';

my $node = $kms->init_node('aws_rewrap', key => $key1->{Arn}, retries => 2,
	timeout => 5000);

sub sql { return $node->safe_psql('postgres', $_[0]); }

sql("SELECT envelope.create_tenant('acme')");
sql("CREATE TABLE t (tenant text, v text, c bytea)");
sql("INSERT INTO t SELECT 'acme', 'v1-' || g, envelope.encrypt('acme', 'v1-' || g) FROM generate_series(1, 5) g");
sql("SELECT envelope.rotate_tenant_key('acme')");
sql("INSERT INTO t SELECT 'acme', 'v2-' || g, envelope.encrypt('acme', 'v2-' || g) FROM generate_series(1, 5) g");
sql("SELECT envelope.create_tenant('beta')");
sql("INSERT INTO t VALUES ('beta', 'b', envelope.encrypt('beta', 'b'))");

# one tenant
$kms->reset_proxy;
is(sql("SELECT envelope.rewrap('$key2->{Arn}', 'acme')"), '2', 'rewrap moved both DEK versions of acme');
is($kms->count('ReEncrypt', 'forwarded'), 2, 'two ReEncrypt calls');
is($kms->count('Decrypt', 'requests'), 0, 'no DEK was unwrapped outside KMS');
is( sql("SELECT string_agg(DISTINCT kms_key, ',') FROM envelope.tenant_keys WHERE tenant = 'acme'"),
	$key2->{Arn}, 'acme\'s DEKs are recorded under key 2');
is( sql("SELECT kms_key FROM envelope.tenant_keys WHERE tenant = 'beta'"),
	$key1->{Arn}, 'beta was left alone');

sql("SELECT envelope.cache_flush()");
$kms->reset_proxy;
is( sql("SELECT count(*) FROM t WHERE tenant = 'acme' AND envelope.decrypt_text(tenant, c) = v"),
	'10', 'every value still decrypts');
is($kms->count('Decrypt', 'forwarded'), 2, 'with one Decrypt per DEK version, under key 2');
is(sql("SELECT envelope.rewrap('$key2->{Arn}', 'acme')"), '0', 'a second run has nothing to move');

# a throttled ReEncrypt is retried; a refused one is a clean error
$kms->reset_proxy;
$kms->fault(op => 'ReEncrypt', mode => 'throttle', count => 1);
is(sql("SELECT envelope.rewrap('$key3->{Arn}', 'beta')"), '1', 'rewrap after one throttle');
is($kms->count('ReEncrypt', 'requests'), 2, 'the throttled ReEncrypt was retried once');

$kms->reset_proxy;
$kms->fault(op => 'ReEncrypt', mode => 'access_denied', count => -1);
my ($state, $err) = EnvelopeKms::psql_error($node, "SELECT envelope.rewrap('$key1->{Arn}', 'acme')");
is($state, '42501', 'ReEncrypt refused: insufficient_privilege');
like($err, qr/KMS ReEncrypt failed .*AccessDeniedException/, 'names ReEncrypt and the AWS error');
is($kms->count('ReEncrypt', 'requests'), 1, 'not retried');
$kms->reset_proxy;
is( sql("SELECT string_agg(DISTINCT kms_key, ',') FROM envelope.tenant_keys WHERE tenant = 'acme'"),
	$key2->{Arn}, 'a failed rewrap changed nothing');

# KMS checks the source encryption context: a DEK copied from another tenant
sql(    "UPDATE envelope.data_key SET wrapped_dek = "
	  . "(SELECT wrapped_dek FROM envelope.data_key WHERE tenant = 'acme' AND version = 1), "
	  . "kms_key = '$key2->{Arn}' WHERE tenant = 'beta' AND version = 1");
($state, $err) = EnvelopeKms::psql_error($node, "SELECT envelope.rewrap('$key1->{Arn}', 'beta')");
is($state, 'XX001', 'mismatched encryption context: data_corrupted');
like($err, qr/KMS ReEncrypt failed .*InvalidCiphertextException/, 'KMS refused to re-wrap it');

$node->stop;
$kms->stop;
done_testing();
