
# 024_aws_credentials.pl — where the server's AWS credentials come from, end to end.
#
# Each source is set up through the server's environment only (as on EC2, ECS or
# EKS, where no key is written anywhere), the server restarted, and a tenant created
# and decrypted through KMS.  The fault proxy records which access key id signed each
# request, so the test knows which source answered:
#   - shared credentials file with envelope.aws_profile, verified by moto's SigV4
#     check (the default profile holds a wrong key);
#   - web identity (AWS_WEB_IDENTITY_TOKEN_FILE + AWS_ROLE_ARN) against moto's STS,
#     then verified by moto's SigV4 check with the session it issued;
#   - ECS container credentials and EC2 IMDSv2, served by credential_stub.py (moto
#     does not know those keys, so its check stays off for them);
#   - IMDSv2 only: a host that refuses the token PUT is not asked the IMDSv1 way;
#   - the environment wins over every other source.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use EnvelopeKms;
use EnvelopeLog qw(log_lacks_dek);

my $kms  = EnvelopeKms->new;
my $key  = $kms->create_key;
my $user = $kms->create_user('pg-envelope-file');
my $role = $kms->create_role('pg-envelope-web');
my $stub = $kms->start_credential_stub;
my %admin_env = (
	AWS_ACCESS_KEY_ID     => $user->{AccessKeyId},
	AWS_SECRET_ACCESS_KEY => $user->{SecretAccessKey});
my $dir = PostgreSQL::Test::Utils::tempdir;

# Only what a case sets may reach the server: no keys, no files, no metadata service.
sub server_env
{
	my (%e) = @_;
	delete $ENV{$_} for grep { /^AWS_/ } keys %ENV;
	$ENV{AWS_SHARED_CREDENTIALS_FILE} = "$dir/no-credentials";
	$ENV{AWS_CONFIG_FILE}             = "$dir/no-config";
	$ENV{AWS_EC2_METADATA_DISABLED}   = 'true';
	for my $k (keys %e)
	{
		if (defined $e{$k}) { $ENV{$k} = $e{$k}; }
		else                { delete $ENV{$k}; }
	}
}

server_env();
# verbose logging, so the check at the end that no secret reached the log means more
my $node = $kms->init_node('aws_credentials', key => $key->{Arn}, retries => 0,
	timeout => 5000,
	extra_conf => "log_min_messages = debug1\nlog_error_verbosity = verbose\n"
	  . "log_statement = 'all'\n");

sub stub_get
{
	my ($path) = @_;
	my $r = HTTP::Tiny->new(timeout => 10)->get("$stub$path");
	die "credential stub $path: $r->{status}" unless $r->{success};
}

my $roundtrip_n = 0;
# create a tenant (GenerateDataKey) and decrypt after a flush (Decrypt)
sub roundtrip
{
	my ($what) = @_;
	my $t = 'tenant_' . ++$roundtrip_n;
	my ($out, $err) = ('', '');
	my $ret = $node->psql('postgres',
		"SELECT envelope.create_tenant('$t');"
		  . "CREATE TABLE $t AS SELECT envelope.encrypt('$t', 'v') AS c;"
		  . "SELECT envelope.cache_flush();"
		  . "SELECT envelope.decrypt_text('$t', c) FROM $t;",
		stdout => \$out, stderr => \$err, timeout => 60);
	is($ret, 0, "$what: create_tenant, encrypt, flush, decrypt") or diag($err);
	return $err;
}

# -- no source at all ----------------------------------------------------------
$node->restart;
my ($state, $err) = EnvelopeKms::psql_error($node, "SELECT envelope.create_tenant('none')");
is($state, '28000', 'no credentials anywhere: invalid_authorization_specification');
like($err, qr/no AWS credentials/i, 'says no credentials were found');

# -- shared credentials file and envelope.aws_profile, checked by moto -----------
open my $fh, '>', "$dir/credentials" or die;
print $fh "[default]\naws_access_key_id = AKIADEFAULTWRONG0000\n"
  . "aws_secret_access_key = wrongwrongwrongwrongwrongwrongwrongwrong\n\n"
  . "[pgenv]\naws_access_key_id = $user->{AccessKeyId}\n"
  . "aws_secret_access_key = $user->{SecretAccessKey}\n";
close $fh;
chmod 0600, "$dir/credentials";
server_env(AWS_SHARED_CREDENTIALS_FILE => "$dir/credentials");
$node->restart;
$kms->auth(1);
($state) = EnvelopeKms::psql_error($node, "SELECT envelope.create_tenant('default_profile')");
is($state, '28000', 'shared file, default profile (wrong key): refused by moto');
$node->safe_psql('postgres', "ALTER SYSTEM SET envelope.aws_profile = 'pgenv'");
$node->reload;
$kms->reset_proxy;
roundtrip('shared file, envelope.aws_profile = pgenv, signature checked');
is_deeply([ $kms->signers ], [ $user->{AccessKeyId} ], 'signed with the profile\'s key');
$kms->auth(0, %admin_env);
$node->safe_psql('postgres', "ALTER SYSTEM RESET envelope.aws_profile");
$node->reload;

# -- web identity against moto's STS ----------------------------------------------
open $fh, '>', "$dir/web-token" or die;
print $fh "eyJhbGciOiJSUzI1NiJ9.pg-envelope-test.signature\n";
close $fh;
server_env(
	AWS_WEB_IDENTITY_TOKEN_FILE => "$dir/web-token",
	AWS_ROLE_ARN                => $role->{Arn},
	AWS_ROLE_SESSION_NAME       => 'pg-envelope',
	AWS_REGION                  => 'us-east-1',
	AWS_ENDPOINT_URL_STS        => $kms->proxy_url);
$node->restart;
$kms->reset_proxy;
roundtrip('web identity');
is($kms->count('other', 'forwarded'), 1, 'one STS AssumeRoleWithWebIdentity per backend');
my @signers = $kms->signers;
ok(@signers == 1 && $signers[0] =~ /^ASIA/, "KMS requests signed with the STS session key (@signers)");
cmp_ok($kms->session_tokens, '>=', 2, 'and carried its session token');

# The same backend, now with moto checking signatures: the session moto's STS issued
# must sign correctly (STS itself can't be asked unsigned while checking is on).
my $bg = $node->background_psql('postgres');
$bg->query_safe("SELECT envelope.create_tenant('web_checked')");
$bg->query_safe("CREATE TABLE web_checked AS SELECT envelope.encrypt('web_checked', 'ok') AS c");
$kms->auth(1);
$kms->reset_proxy;
$bg->query_safe("SELECT envelope.cache_flush()");
is($bg->query_safe("SELECT envelope.decrypt_text('web_checked', c) FROM web_checked"),
	'ok', 'web identity session accepted by moto\'s signature check');
is($kms->count('Decrypt', 'forwarded'), 1, 'that was a KMS Decrypt, not the cache');
$kms->auth(0, %admin_env);
$bg->quit;

# -- ECS container credentials (credential_stub.py) --------------------------------
server_env(
	AWS_CONTAINER_CREDENTIALS_FULL_URI => "$stub/ecs/creds",
	AWS_CONTAINER_AUTHORIZATION_TOKEN  => 'ecs-auth-token');
$node->restart;
$kms->reset_proxy;
stub_get('/_reset');
roundtrip('ECS container credentials');
@signers = $kms->signers;
ok(@signers == 1 && $signers[0] =~ /^ASIAECS\d+$/, "signed with the container's key (@signers)");
cmp_ok($kms->session_tokens, '>=', 2, 'with its session token');
cmp_ok($kms->stub_counts->{'GET /ecs/creds'} // 0, '>=', 1, 'the ECS endpoint was asked');
ok(!$kms->stub_counts->{ecs_unauthorized}, 'with the authorization token');

# -- EC2 instance role over IMDSv2 (credential_stub.py) -----------------------------
server_env(
	AWS_EC2_METADATA_DISABLED         => undef,
	AWS_EC2_METADATA_SERVICE_ENDPOINT => $stub);
$node->restart;
$kms->reset_proxy;
stub_get('/_reset');
roundtrip('EC2 instance role (IMDSv2)');
@signers = $kms->signers;
ok(@signers == 1 && $signers[0] =~ /^ASIAIMDS\d+$/, "signed with the instance role's key (@signers)");
my $c = $kms->stub_counts;
cmp_ok($c->{'PUT /latest/api/token'} // 0, '>=', 1, 'IMDSv2 token PUT first');
ok(!$c->{imds_v1_refused}, 'never an IMDSv1 request');

# Temporary credentials within five minutes of expiry are refreshed before use: one
# backend, credentials issued for 60 s, two KMS calls, two fetches, two signing keys.
my $creds_path = qr{^GET /latest/meta-data/iam/security-credentials/.+};
sub imds_fetches
{
	my $c = $kms->stub_counts;
	my $n = 0;
	$n += $c->{$_} for grep { $_ =~ $creds_path } keys %$c;
	return $n;
}
stub_get('/_set?expiry=60');
$bg = $node->background_psql('postgres');
$kms->reset_proxy;
stub_get('/_reset');
$bg->query_safe("SELECT envelope.create_tenant('imds_refresh')");
$bg->query_safe("CREATE TABLE imds_refresh AS SELECT envelope.encrypt('imds_refresh', 'ok') AS c");
$bg->query_safe("SELECT envelope.cache_flush()");
is($bg->query_safe("SELECT envelope.decrypt_text('imds_refresh', c) FROM imds_refresh"),
	'ok', 'credentials near expiry: the KMS calls succeed');
is(imds_fetches(), 2, 'credentials near expiry: fetched again before the second call');
@signers = $kms->signers;
is(scalar(@signers), 2, "and the second call signed with the new key (@signers)");
stub_get('/_set?expiry=3600');
$bg->quit;

# ExpiredTokenException: the backend drops its credentials, fetches new ones and
# retries once, signed with the new key; KMS is asked twice, IMDS once more.
$bg = $node->background_psql('postgres');
$bg->query_safe("SELECT envelope.create_tenant('imds_expired')");
$bg->query_safe("CREATE TABLE imds_expired AS SELECT envelope.encrypt('imds_expired', 'ok') AS c");
$bg->query_safe("SELECT envelope.cache_flush()");
$kms->reset_proxy;
stub_get('/_reset');
$kms->fault(op => 'Decrypt', mode => 'expired_token', count => 1);
is($bg->query_safe("SELECT envelope.decrypt_text('imds_expired', c) FROM imds_expired"),
	'ok', 'ExpiredTokenException: decrypts after one refresh and retry');
is($kms->count('Decrypt', 'requests'), 2, 'ExpiredTokenException: two Decrypt requests');
is(imds_fetches(), 1, 'ExpiredTokenException: credentials fetched again');
@signers = $kms->signers;
is(scalar(@signers), 2, "ExpiredTokenException: the retry signed with the new key (@signers)");
$bg->quit;

# an IMDSv1-only host: the token PUT fails, and no credentials are fetched without one
stub_get('/_set?imds_token_status=403');
stub_get('/_reset');
$node->restart;
($state, $err) = EnvelopeKms::psql_error($node, "SELECT envelope.create_tenant('imds_v1')");
is($state, '28000', 'IMDSv1-only host: no credentials');
$c = $kms->stub_counts;
ok(!$c->{imds_v1_refused} && !grep({ /^GET \/latest/ } keys %$c),
	'no metadata GET without a token');
stub_get('/_set?imds_token_status=200');

# -- the environment comes first -----------------------------------------------------
server_env(
	AWS_ACCESS_KEY_ID                 => 'AKIAENVIRONMENT00001',
	AWS_SECRET_ACCESS_KEY             => 'environment-secret',
	AWS_EC2_METADATA_DISABLED         => undef,
	AWS_EC2_METADATA_SERVICE_ENDPOINT => $stub,
	AWS_CONTAINER_CREDENTIALS_FULL_URI => "$stub/ecs/creds",
	AWS_CONTAINER_AUTHORIZATION_TOKEN  => 'ecs-auth-token');
$node->restart;
$kms->reset_proxy;
stub_get('/_reset');
roundtrip('environment over ECS and IMDS');
is_deeply([ $kms->signers ], ['AKIAENVIRONMENT00001'], 'signed with the environment\'s key');
is($kms->session_tokens, 0, 'no session token');
is_deeply($kms->stub_counts, {}, 'neither ECS nor IMDS was asked');

# No credential of any source, and no DEK, reached the server log, debug messages
# included.
my %deks = map { ($_ => $kms->dek_of($node, $_, 1)) } ('tenant_1', 'tenant_2', 'imds_expired');
$node->stop;
my $log = slurp_file($node->logfile);
for my $secret (
	$user->{SecretAccessKey}, 'wrongwrongwrongwrong', 'environment-secret',
	'secret-imds-', 'token-imds-', 'secret-ecs-', 'token-ecs-', 'ecs-auth-token',
	'pg-envelope-test.signature', 'X-Amz-Security-Token', 'Authorization: ', 'AWS4-HMAC-SHA256')
{
	unlike($log, qr/\Q$secret\E/i, "server log holds no \"$secret\"");
}
log_lacks_dek($log, $deks{$_}, "DEK of $_") for sort keys %deks;
cmp_ok(length($log), '>', 1000, 'the log was written');

$kms->stop;
done_testing();
