
# 023_aws_signature.pl — SigV4 as moto verifies it, with IAM users it knows.
#
# moto checks signatures once its authentication is switched on: the right secret
# works (signed for the proxy's host:port, checked by moto behind it), a wrong secret
# or an unknown access key is a credentials error (SQLSTATE 28000, no retry), and STS
# session credentials work with X-Amz-Security-Token.  Credentials reach the server
# through its environment only.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use EnvelopeKms;

my $kms  = EnvelopeKms->new;
my $key  = $kms->create_key;
my $user = $kms->create_user('pg-envelope');
$kms->create_role('pg-envelope-role');
my %admin_env = (
	AWS_ACCESS_KEY_ID     => $user->{AccessKeyId},
	AWS_SECRET_ACCESS_KEY => $user->{SecretAccessKey});

sub server_env
{
	my (%e) = @_;
	delete @ENV{qw(AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_SESSION_TOKEN)};
	@ENV{ keys %e } = values %e;
}

$ENV{AWS_EC2_METADATA_DISABLED} = 'true';
server_env(%admin_env);
my $node = $kms->init_node('aws_signature', key => $key->{Arn}, retries => 2,
	timeout => 5000);

$kms->auth(1);
my $ok = eval { $kms->create_key; 1 };
ok(!$ok, 'moto now refuses unsigned admin requests');

# right secret
$kms->reset_proxy;
is($node->safe_psql('postgres', "SELECT envelope.create_tenant('acme')"), '1',
	'correct signature: GenerateDataKey accepted');
$node->safe_psql('postgres', "CREATE TABLE t AS SELECT envelope.encrypt('acme', 'signed') AS c");
like($node->safe_psql('postgres',
		"SELECT envelope.cache_flush(); SELECT envelope.decrypt_text('acme', c) FROM t"),
	qr/^\s*signed$/, 'correct signature: Decrypt accepted');

my $decrypt = "SELECT envelope.cache_flush(); SELECT envelope.decrypt_text('acme', c) FROM t";

# wrong secret
server_env(%admin_env, AWS_SECRET_ACCESS_KEY => 'not-the-secret-not-the-secret-not-the-sec');
$node->restart;
$kms->reset_proxy;
my ($state, $err) = EnvelopeKms::psql_error($node, $decrypt);
is($state, '28000', 'wrong secret: invalid_authorization_specification');
like($err, qr/KMS Decrypt failed .*SignatureDoesNotMatch/, 'wrong secret: names SignatureDoesNotMatch');
unlike($err, qr/not-the-secret|\Q$user->{AccessKeyId}\E/, 'no credential in the error');
is($kms->count('Decrypt', 'requests'), 1, 'credential errors are not retried');

# unknown access key id
server_env(AWS_ACCESS_KEY_ID => 'AKIAUNKNOWNUNKNOWN00', AWS_SECRET_ACCESS_KEY => 'x' x 40);
$node->restart;
($state, $err) = EnvelopeKms::psql_error($node, $decrypt);
is($state, '28000', 'unknown access key: invalid_authorization_specification');
like($err, qr/InvalidClientTokenId|UnrecognizedClientException/, 'unknown access key named');

# STS session credentials
my $sess = $kms->admin([ 'assume-role', 'arn:aws:iam::123456789012:role/pg-envelope-role' ],
	%admin_env);
server_env(
	AWS_ACCESS_KEY_ID     => $sess->{AccessKeyId},
	AWS_SECRET_ACCESS_KEY => $sess->{SecretAccessKey},
	AWS_SESSION_TOKEN     => $sess->{SessionToken});
$node->restart;
like($node->safe_psql('postgres', $decrypt), qr/^\s*signed$/, 'STS session token: Decrypt accepted');
is($node->safe_psql('postgres', "SELECT envelope.rotate_tenant_key('acme')"), '2',
	'STS session token: GenerateDataKey accepted');

# a session token that is not the one issued with those keys
server_env(
	AWS_ACCESS_KEY_ID     => $sess->{AccessKeyId},
	AWS_SECRET_ACCESS_KEY => $sess->{SecretAccessKey},
	AWS_SESSION_TOKEN     => 'bogus');
$node->restart;
($state, $err) = EnvelopeKms::psql_error($node, $decrypt);
is($state, '28000', 'bogus session token: invalid_authorization_specification');

$kms->auth(0, %admin_env);
$node->stop;
$kms->stop;
done_testing();
