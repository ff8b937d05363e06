
# 029_aws_multi_region.pl — a hot standby in a second region reads with the replica of a
# multi-Region key, and a single-Region key asked for from another region is a clear
# error.
#
# One moto serves every region (the SigV4 scope picks the region's backend).  The
# primary runs in us-east-1 and wraps its DEKs under a multi-Region key; ReplicateKey
# puts the replica (same key id and key material, its own ARN) in eu-west-1.  A
# streaming standby configured for eu-west-1 prewarms its cache and decrypts what the
# primary wrote, through the replica; promoted, it makes new DEKs and re-wraps old ones there, recording the
# eu-west-1 ARN that KMS answers with, and the primary's region still reads those.
# moto 5.2 cannot decrypt anything under a multi-Region key without the correction in
# test/kms/moto_server.py (real "mrk-" + 32 hex key ids).

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use EnvelopeKms;

my ($region1, $region2) = ('us-east-1', 'eu-west-1');

my $kms     = EnvelopeKms->new(region => $region1);
my $mrk     = $kms->create_key(multi_region => 1);
my $replica = $kms->replicate_key($mrk->{KeyId}, $region2);
my $single  = $kms->create_key;

like($mrk->{KeyId}, qr/^mrk-[0-9a-f]{32}$/, 'moto makes multi-Region key ids as AWS does');
is($replica->{KeyId}, $mrk->{KeyId}, 'the replica has the same key id');
like($replica->{Arn}, qr/^arn:aws:kms:$region2:\d+:key\/$mrk->{KeyId}$/, 'and its own region\'s ARN');

$ENV{AWS_ACCESS_KEY_ID}     = 'testing';
$ENV{AWS_SECRET_ACCESS_KEY} = 'testing';
delete $ENV{AWS_SESSION_TOKEN};
$ENV{AWS_EC2_METADATA_DISABLED} = 'true';

my $primary = $kms->init_node('mrk_primary', key => $mrk->{Arn}, retries => 1,
	timeout => 5000, allows_streaming => 1);

sub psql_on { my ($node, $sql) = @_; return $node->safe_psql('postgres', $sql); }

psql_on($primary, "SELECT envelope.create_tenant('acme')");
psql_on($primary, "SELECT envelope.create_tenant('solo', '$single->{Arn}')");
psql_on($primary, "CREATE TABLE t (tenant text, v text, c bytea)");
psql_on($primary, "INSERT INTO t SELECT 'acme', 'a' || g, envelope.encrypt('acme', 'a' || g) FROM generate_series(1, 20) g");
psql_on($primary, "INSERT INTO t VALUES ('solo', 's', envelope.encrypt('solo', 's'))");
is(psql_on($primary, "SELECT kms_key FROM envelope.data_key WHERE tenant = 'acme'"),
	$mrk->{Arn}, 'the primary records the us-east-1 ARN');

# ---- a streaming standby in the second region
$primary->backup('b1');
my $standby = PostgreSQL::Test::Cluster->new('mrk_standby');
$standby->init_from_backup($primary, 'b1', has_streaming => 1);
$standby->append_conf('postgresql.conf',
	"envelope.aws_region = '$region2'\nenvelope.cache_prewarm = 'active'\n");
$kms->reset_proxy;
$standby->start;
$primary->wait_for_catchup($standby, 'replay');

# the hot standby prewarms its cache in its own region
$standby->poll_query_until('postgres', "SELECT prewarm_state = 'done' FROM envelope.cache_stats")
  or die 'the standby did not prewarm';
is(psql_on($standby, "SELECT prewarm_loaded || '/' || prewarm_failed FROM envelope.cache_stats"),
	'1/1', 'the standby prewarms acme\'s key; solo\'s single-Region key fails');
is($kms->count('Decrypt', 'forwarded'), 1, 'with one Decrypt, answered by the replica');

my $count_acme = "SELECT count(*) FROM t WHERE tenant = 'acme' AND envelope.decrypt_text(tenant, c) = v";
$kms->reset_proxy;
is(psql_on($standby, $count_acme), '20', 'the eu-west-1 standby decrypts every value');
is($kms->count('Decrypt', 'requests'), 0, 'from the prewarmed cache, without a KMS request');

# ---- a single-Region key from another region: refused before any request
$kms->reset_proxy;
my ($state, $err) = EnvelopeKms::psql_error($standby,
	"SELECT envelope.decrypt_text(tenant, c) FROM t WHERE tenant = 'solo'");
is($state, 'F0000', 'single-Region key of another region: config_file_error');
like($err, qr/KMS Decrypt failed for key version 1 of tenant "solo": master key in another region/,
	'the message says the key is in another region');
like($err, qr/DETAIL:\s+aws provider: .*single-Region key of region $region1, and envelope.aws_region is $region2/,
	'the detail names both regions');
like($err, qr/HINT:\s+Only a multi-Region key/, 'the hint says what works');
is($kms->count('Decrypt', 'requests'), 0, 'nothing was sent to the KMS');

# ---- failover: the standby becomes the primary of the second region
$standby->promote;
$standby->poll_query_until('postgres', 'SELECT NOT pg_is_in_recovery()')
  or die 'standby was not promoted';

$kms->reset_proxy;
is(psql_on($standby, "SELECT envelope.rotate_tenant_key('acme')"), '2',
	'a new DEK under the tenant\'s key as recorded (the us-east-1 ARN)');
is(psql_on($standby, "SELECT kms_key FROM envelope.data_key WHERE tenant = 'acme' AND version = 2"),
	$replica->{Arn}, 'is made by the replica and records the eu-west-1 ARN KMS answered with');
psql_on($standby, "INSERT INTO t VALUES ('acme', 'b', envelope.encrypt('acme', 'b'))");

$kms->reset_proxy;
is(psql_on($standby, "SELECT envelope.rewrap('$replica->{Arn}', 'acme')"), '1',
	'rewrap moves version 1 from the us-east-1 ARN to the eu-west-1 replica');
is($kms->count('ReEncrypt', 'forwarded'), 1, 'with one ReEncrypt');
is(psql_on($standby, "SELECT string_agg(DISTINCT kms_key, ',') FROM envelope.data_key WHERE tenant = 'acme'"),
	$replica->{Arn}, 'every DEK of acme is recorded under the eu-west-1 ARN');

psql_on($standby, 'SELECT envelope.cache_flush()');
$kms->reset_proxy;
is(psql_on($standby, "SELECT count(*) FROM t WHERE tenant = 'acme' AND envelope.decrypt_text(tenant, c) = v"),
	'21', 'every value decrypts in the second region after the rewrap');
is($kms->count('Decrypt', 'forwarded'), 2, 'one Decrypt per DEK version');

# the first region reads what the second wrote: the eu-west-1 ARN goes to its replica
psql_on($standby, "SET envelope.aws_region = '$region1'; SELECT envelope.cache_flush()");
$kms->reset_proxy;
is( psql_on($standby,
		"SET envelope.aws_region = '$region1'; SELECT count(*) FROM t WHERE tenant = 'acme' AND envelope.decrypt_text(tenant, c) = v"),
	'21', 'with envelope.aws_region = us-east-1 the same rows decrypt through the primary key');
is($kms->count('Decrypt', 'forwarded'), 2, 'again one Decrypt per DEK version');

($state, $err) = EnvelopeKms::psql_error($standby, "SELECT envelope.rewrap('$single->{Arn}', 'acme')");
is($state, 'F0000', 'rewrap to a single-Region key of another region is refused');
like($err, qr/KMS ReEncrypt failed .*master key in another region/, 'by ReEncrypt, before any request');

$standby->stop;
$primary->stop;
$kms->stop;
done_testing();
