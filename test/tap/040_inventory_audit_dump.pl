# The inventory of encrypted columns and the audit trail survive pg_dump and restore
# (custom and plain formats), into another database of the cluster and into another
# cluster with the same master key: registrations come back on the renamed columns,
# audit rows come back unchanged, and new audit ids continue after the restored ones.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use EnvelopeLocal qw(new_master_key local_node);

my ($keyfile) = new_master_key();
my $node = local_node('source', $keyfile);
$node->start;

$node->safe_psql('postgres', q{
CREATE EXTENSION pg_envelope;
SELECT envelope.create_tenant('acme'), envelope.create_tenant('globex');
SELECT envelope.rotate_tenant_key('acme');
CREATE SCHEMA app;
CREATE TABLE app.orders (id int PRIMARY KEY, dropped_early int, org text, card bytea, email bytea);
ALTER TABLE app.orders DROP COLUMN dropped_early;  -- column numbers shift in a restore
INSERT INTO app.orders
    SELECT g, CASE WHEN g % 2 = 0 THEN 'acme' ELSE 'globex' END,
           envelope.encrypt(CASE WHEN g % 2 = 0 THEN 'acme' ELSE 'globex' END, 'card ' || g, 'card'),
           envelope.encrypt_deterministic(CASE WHEN g % 2 = 0 THEN 'acme' ELSE 'globex' END, 'e' || g)
      FROM generate_series(1, 50) g;
SELECT envelope.register_column('app.orders', 'card', 'org', 'card');
SELECT envelope.register_column('app.orders', 'email', 'org');
ALTER TABLE app.orders RENAME TO orders_v2;
ALTER TABLE app.orders_v2 RENAME org TO tenant;
ALTER TABLE app.orders_v2 RENAME card TO card_ct;
SELECT envelope.disable_tenant('globex');
SELECT envelope.enable_tenant('globex');
SELECT envelope.audit_record('restore drill', detail => '{"note": "before the dump"}');
CREATE ROLE dump_app;
SELECT envelope.grant_tenant('acme', 'dump_app');
});

my $inventory_sql = q{SELECT relation::text, column_name, tenant_column, context
  FROM envelope.encrypted_columns ORDER BY 1, 2};
my $audit_sql = q{SELECT id, logged_at, "session_user", "current_user", action, tenant,
       versions, kms_key, detail, xid FROM envelope.audit_log ORDER BY id};
# Grants name their roles: a restore into another cluster needs the roles first.
my $grants_sql = q{SELECT tenant, role::text FROM envelope.tenant_grant ORDER BY 1, 2};
my $decrypt_sql = q{SELECT count(*) FROM app.orders_v2
 WHERE envelope.decrypt_text(tenant, card_ct, 'card') = 'card ' || id
   AND envelope.decrypt_text(tenant, email) = 'e' || id};

my $inventory = $node->safe_psql('postgres', $inventory_sql);
my $audit = $node->safe_psql('postgres', $audit_sql);
is($inventory, "app.orders_v2|card_ct|tenant|card\napp.orders_v2|email|tenant|",
	'inventory follows the renames before the dump');
like($audit, qr/\|create\|acme\|.*\|rotate\|acme\|.*\|register\|.*\|restore drill\|/s,
	'the audit trail holds the actions');

my $tmp = PostgreSQL::Test::Utils::tempdir;

# ---- Custom format into another database of the same cluster.
$node->command_ok([ 'pg_dump', '-Fc', '-f', "$tmp/source.dump", '-d', $node->connstr('postgres') ],
	'pg_dump -Fc');
my $dump_list = `pg_restore -l $tmp/source.dump`;
like($dump_list, qr/SECURITY LABEL/, 'the dump holds the security labels');
$node->safe_psql('postgres', 'CREATE DATABASE restored');
$node->command_ok([ 'pg_restore', '--exit-on-error', '-d', $node->connstr('restored'), "$tmp/source.dump" ],
	'pg_restore into another database');
is($node->safe_psql('restored', $inventory_sql), $inventory, 'inventory restored (custom format)');
is($node->safe_psql('restored', $audit_sql), $audit, 'audit rows restored unchanged (custom format)');
is($node->safe_psql('restored', $decrypt_sql), '50', 'every value decrypts in the restored database');
is($node->safe_psql('restored', $grants_sql), 'acme|dump_app', 'tenant grants restored (custom format)');

# New actions continue the trail after the restored ids.
my $max_id = $node->safe_psql('restored', 'SELECT max(id) FROM envelope.audit_log');
my ($rot_ret, $rot_out, $rot_err) = $node->psql('restored', q{SELECT envelope.rotate_tenant_key('globex')});
is($rot_err, '', 'a key action in the restored database is audited without a clash of ids');
is($node->safe_psql('restored', q{SELECT id > } . $max_id . q{ FROM envelope.audit_log WHERE action = 'rotate' AND tenant = 'globex'}),
	't', 'the audit sequence continues after the restored rows');
# The restored labels behave like fresh ones: counting and the guard see them.
$node->safe_psql('restored', 'CALL envelope.count_key_usage()');
is($node->safe_psql('restored', q{SELECT column_name, value_kind FROM envelope.encrypted_columns ORDER BY 1}),
	"card_ct|randomized\nemail|deterministic", 'restored registrations are counted');
my ($ret, $stdout, $stderr) = $node->psql('restored', q{SELECT envelope.retire_key_version('acme', 1)});
like($stderr, qr/still use it/, 'restored registrations guard retire_key_version');

# ---- Plain format into a second cluster with the same master key.
my $other = local_node('target', $keyfile);
$other->start;
$other->safe_psql('postgres', 'CREATE ROLE dump_app');
$node->command_ok([ 'pg_dump', '-Fp', '-f', "$tmp/source.sql", '-d', $node->connstr('postgres') ],
	'pg_dump -Fp');
$other->command_ok([ 'psql', '-X', '-q', '-v', 'ON_ERROR_STOP=1', '-d', $other->connstr('postgres'),
	'-f', "$tmp/source.sql" ], 'plain dump restored into another cluster');
is($other->safe_psql('postgres', $inventory_sql), $inventory, 'inventory restored (plain format, other cluster)');
is($other->safe_psql('postgres', $audit_sql), $audit, 'audit rows restored unchanged (plain format, other cluster)');
is($other->safe_psql('postgres', $decrypt_sql), '50', 'every value decrypts in the other cluster');
is($other->safe_psql('postgres', $grants_sql), 'acme|dump_app', 'tenant grants restored (plain format, other cluster)');
$other->safe_psql('postgres', q{CREATE ROLE dump_reader IN ROLE envelope_user; GRANT USAGE ON SCHEMA app TO dump_reader; GRANT SELECT ON app.orders_v2 TO dump_reader});
my ($g_ret, $g_out, $g_err) = $other->psql('postgres',
	q{SET ROLE dump_reader; SELECT envelope.decrypt_text(tenant, card_ct, 'card') FROM app.orders_v2 WHERE tenant = 'acme'});
like($g_err, qr/permission denied for tenant "acme"/, 'a restored grant restricts its tenant');

# Without preload the labels still restore: CREATE EXTENSION loads the library, whose
# initialisation registers the label provider before the labels come.
my $bare = PostgreSQL::Test::Cluster->new('bare');
$bare->init;
$bare->append_conf('postgresql.conf', "envelope.local_master_key_file = '$keyfile'\n");
$bare->start;
$bare->safe_psql('postgres', 'CREATE ROLE dump_app');
$bare->command_ok([ 'psql', '-X', '-q', '-v', 'ON_ERROR_STOP=1', '-d', $bare->connstr('postgres'),
	'-f', "$tmp/source.sql" ], 'plain dump restored into a cluster without preload');
is($bare->safe_psql('postgres', $inventory_sql), $inventory, 'inventory restored without preload');

$bare->stop;
$other->stop;
$node->stop;
done_testing();
