# envelope.check() with the aws provider, against moto behind the fault proxy: the
# credential source is reported, the KMS reachability check costs exactly one request
# (a GenerateDataKey under envelope.kms_key), and a KMS that refuses or is gone turns
# that row into an error while the others still come back.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use EnvelopeKms;

my $kms = EnvelopeKms->new;
my $key = $kms->create_key;

# only the environment supplies credentials (moto accepts any while auth is off)
$ENV{AWS_ACCESS_KEY_ID}     = 'testing';
$ENV{AWS_SECRET_ACCESS_KEY} = 'testing';
delete $ENV{AWS_SESSION_TOKEN};
$ENV{AWS_EC2_METADATA_DISABLED} = 'true';

my $node = $kms->init_node('check_aws', key => $key->{Arn}, retries => 0, timeout => 2000);

sub check_rows
{
	my %rows;
	for my $line (split /\n/, $node->safe_psql('postgres',
		q{SELECT name, status, coalesce(detail, '') FROM envelope.check()}))
	{
		my ($name, $status, $detail) = split /\|/, $line, 3;
		$rows{$name} = [ $status, $detail ];
	}
	return \%rows;
}

$kms->reset_proxy;
my $rows = check_rows();
is($rows->{kms_provider}[0], 'ok', 'provider row');
like($rows->{kms_provider}[1], qr/"aws"/, 'names the aws provider');
is($rows->{kms_reachable}[0], 'ok', 'the KMS is reachable');
is($kms->count('GenerateDataKey', 'forwarded'), 1, 'the reachability check made one GenerateDataKey');
is($kms->count('Decrypt', 'forwarded'), 0, 'and nothing else');
is($rows->{aws_credentials}[0], 'ok', 'credentials found');
like($rows->{aws_credentials}[1], qr/from environment/, 'their source is the environment');
ok(!exists $rows->{local_master_key_file}, 'no key-file row with the aws provider');
is(scalar(grep { $_->[1] =~ /testing/ } values %$rows), 0, 'no credential appears in any row');

# The KMS refuses the key: that row is an error, the rest still report.
$kms->fault(op => 'GenerateDataKey', mode => 'disabled', count => 1);
$rows = check_rows();
is($rows->{kms_reachable}[0], 'error', 'a refused request is an error');
like($rows->{kms_reachable}[1], qr/disabled|Disabled/, 'saying why');
is($rows->{preload}[0], 'ok', 'the other checks still ran');

# No KMS at all.
$node->safe_psql('postgres', q{ALTER SYSTEM SET envelope.aws_endpoint = 'http://127.0.0.1:9'});
$node->reload;
$rows = check_rows();
is($rows->{kms_reachable}[0], 'error', 'an unreachable KMS is an error');

$node->stop;
$kms->stop;
done_testing();
