# 045_runbook.pl — every command of doc/runbook.md, in order, against moto.
#
# The runbook's fenced blocks are turned into one shell script: `sh` blocks run as they
# are, `sql` blocks through psql -v ON_ERROR_STOP=1, and the commands that the
# `sql cron` block schedules with pg_cron run directly (pg_cron is only the example
# scheduler).  The AWS CLI is the real one (awscli from ENVELOPE_PYTHON), pointed at
# moto.  The fixtures are what the runbook assumes: a customer table, tenants acme and
# globex under one master key and initech under its own, DEKs 100 days old.  After the
# script, the state it should leave is checked: rotated and retired versions, every
# value decrypting, every DEK under the new master key, initech destroyed and its KMS
# key pending deletion, the restore drill's values decrypting.

use strict;
use warnings;

use File::Temp;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use EnvelopeKms;

my $python = EnvelopeKms::python();
system($python, '-c', 'import awscli') == 0
  or BAIL_OUT("python interpreter '$python' cannot import awscli (the runbook's AWS CLI)");

my $kms  = EnvelopeKms->new;
my $key1 = $kms->create_key;
my $key3 = $kms->create_key;

$ENV{AWS_ACCESS_KEY_ID}     = 'testing';
$ENV{AWS_SECRET_ACCESS_KEY} = 'testing';
delete $ENV{AWS_SESSION_TOKEN};
$ENV{AWS_EC2_METADATA_DISABLED} = 'true';

my $node = $kms->init_node('runbook', key => $key1->{Arn}, direct => 1, retries => 2,
	timeout => 10000);

sub sql { return $node->safe_psql('postgres', $_[0]); }

# ---------------------------------------------------------------------------
# Fixtures
sql("SELECT envelope.create_tenant('acme'), envelope.create_tenant('globex'), "
	  . "envelope.create_tenant('initech', '$key3->{Arn}')");
sql(    "CREATE TABLE customer (id integer PRIMARY KEY, tenant text NOT NULL, email_plain text, email bytea)");
sql(    "INSERT INTO customer SELECT i, (ARRAY['acme', 'globex', 'initech'])[i % 3 + 1], "
	  . "'user' || i || '\@example.com', NULL FROM generate_series(1, 3000) i");
sql("UPDATE customer SET email = envelope.encrypt(tenant, email_plain, 'customer.email')");
sql("UPDATE envelope.data_key SET created_at = created_at - interval '100 days'");

# ---------------------------------------------------------------------------
# The runbook as one script
my $runbook = slurp_file(EnvelopeKms::srcdir() . '/doc/runbook.md');
my $script  = "set -euo pipefail\n";
my $blocks  = 0;
while ($runbook =~ /^```(\w+)([^\n]*)\n(.*?)^```\s*$/msg)
{
	my ($lang, $meta, $body) = ($1, $2, $3);
	if ($lang eq 'sql' && $meta =~ /\bcron\b/)
	{
		# what pg_cron would run: the scheduled commands
		while ($body =~ /\$\$(.*?)\$\$/sg)
		{
			$script .= "psql -X -v ON_ERROR_STOP=1 <<'RUNBOOK_SQL'\n$1;\nRUNBOOK_SQL\n";
		}
	}
	elsif ($lang eq 'sql')
	{
		$script .= "psql -X -v ON_ERROR_STOP=1 <<'RUNBOOK_SQL'\n${body}RUNBOOK_SQL\n";
	}
	elsif ($lang eq 'sh')
	{
		$script .= $body;
	}
	else
	{
		next;
	}
	$blocks++;
}
cmp_ok($blocks, '>=', 10, "the runbook has its command blocks ($blocks)");

# The AWS CLI, pointed at moto.
my $bindir = PostgreSQL::Test::Utils::tempdir();
open(my $fh, '>', "$bindir/aws") or die;
print $fh "#!/bin/sh\nexec '$python' -m awscli --endpoint-url '" . $kms->moto_url . "' \"\$\@\"\n";
close($fh);
chmod(0755, "$bindir/aws");

my ($out, $err) = ('', '');
{
	local $ENV{PATH}       = "$bindir:" . $node->config_data('--bindir') . ":$ENV{PATH}";
	local $ENV{PGHOST}     = $node->host;
	local $ENV{PGPORT}     = $node->port;
	local $ENV{PGDATABASE} = 'postgres';
	local $ENV{AWS_REGION} = $kms->region;
	local $ENV{AWS_DEFAULT_REGION} = $kms->region;
	my $ok = IPC::Run::run([ 'bash', '-c', $script ], '<', \undef, '>', \$out, '2>', \$err);
	ok($ok, 'every command of the runbook ran') or diag("stdout:\n$out\nstderr:\n$err");
}
note($out);

# ---------------------------------------------------------------------------
# What it should have left
is( sql("SELECT string_agg(tenant || ':' || version, ',' ORDER BY tenant) FROM envelope.tenant_keys "
		  . "WHERE state = 'active'"),
	'acme:2,globex:3', 'acme rotated on schedule, globex once more in the incident');
is( sql("SELECT string_agg(tenant || ':' || version || ':' || state, ',' ORDER BY tenant, version) "
		  . "FROM envelope.tenant_keys WHERE tenant IN ('acme', 'globex')"),
	'acme:1:retired,acme:2:active,globex:1:retired,globex:2:retired,globex:3:active',
	'every old version that no value uses is retired');
is( sql("SELECT count(*) FROM customer WHERE envelope.decrypt_text(tenant, email, 'customer.email') = email_plain"),
	'2000', 'every remaining value decrypts');
is(sql("SELECT count(*) FROM customer WHERE tenant = 'initech'"), '0', 'initech\'s rows are gone');
is(sql("SELECT string_agg(DISTINCT state, ',') FROM envelope.tenant_keys WHERE tenant = 'initech'"),
	'destroyed', 'initech is destroyed');
like($out, qr/^PendingDeletion$/m, 'initech\'s KMS key is pending deletion');
my $new_key = sql("SELECT current_setting('envelope.kms_key')");
isnt($new_key, $key1->{Arn}, 'new tenants get the new master key');
is( sql("SELECT count(*) FROM envelope.tenant_keys WHERE kms_key <> '$new_key' AND state <> 'destroyed'"),
	'0', 'every live DEK is under the new master key');
is( sql("SELECT string_agg(DISTINCT action, ',' ORDER BY action) FROM envelope.audit_log "
		  . "WHERE action IN ('rotate_keys', 'reencrypt_all', 'rewrap_keys', 'destroy', 'retire', 'reactivate', 'disable', 'enable')"),
	'destroy,disable,enable,reactivate,reencrypt_all,retire,rewrap_keys,rotate_keys',
	'the audit trail has every kind of step');
like($out, qr/^\s*2000 \|\s+2000$/m, 'the restore drill decrypted every value of the dump');
is(sql("SELECT count(*) FROM pg_database WHERE datname = 'envelope_restore_drill'"), '0',
	'and dropped its database');

$node->stop;
$kms->stop;
done_testing();
