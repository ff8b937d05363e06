# ALTER EXTENSION pg_envelope UPDATE from 0.1.0: a database with tenants and stored
# values, created at 0.1.0 and run for a while with the 0.2.0 library (0.1.0's SQL
# names the old C symbols, which must keep working), is updated; every value still
# decrypts, the new features work, and its catalog equals a fresh 0.2.0 install's:
# functions with volatility, strictness, security, parallel safety and defaults,
# privileges and initial privileges, tables and columns, constraints and indexes,
# views and their definitions, triggers, sequences, comments, extension membership and
# pg_dump's configuration registrations.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use EnvelopeLocal qw(new_master_key local_node);

my ($keyfile) = new_master_key();
my $node = local_node('upgrade', $keyfile);
$node->start;

$node->safe_psql('postgres', 'CREATE DATABASE updated');
$node->safe_psql('postgres', 'CREATE DATABASE fresh');

# ---- 0.1.0 with data, exercised through the old symbols.
$node->safe_psql('updated', q{
CREATE EXTENSION pg_envelope VERSION '0.1.0';
SELECT envelope.create_tenant('t' || i) FROM generate_series(1, 5) i;
CREATE TABLE data (id int, tenant text, r bytea, d bytea, b bytea);
INSERT INTO data SELECT g, 't' || (g % 5 + 1),
    envelope.encrypt('t' || (g % 5 + 1), 'r' || g, 'ctx'),
    envelope.encrypt_deterministic('t' || (g % 5 + 1), 'd' || g),
    envelope.blind_index('t' || (g % 5 + 1), 'd' || g)
  FROM generate_series(1, 200) g;
SELECT envelope.rotate_tenant_key('t1');
SELECT envelope.rotate_tenant_key('t2');
UPDATE data SET r = envelope.encrypt(tenant, 'r' || id, 'ctx') WHERE tenant IN ('t1', 't2') AND id % 2 = 0;
SELECT envelope.rotate_tenant_key('t3');
SELECT envelope.rotate_tenant_key('t3');
SELECT envelope.retire_key_version('t3', 2);   -- 0.1.0: no guard, no force argument
SELECT envelope.disable_tenant('t4');
SELECT envelope.enable_tenant('t4');
SELECT envelope.create_tenant('doomed');
SELECT envelope.destroy_tenant('doomed');      -- 0.1.0: one argument
});
is($node->safe_psql('updated', q{SELECT extversion FROM pg_extension WHERE extname = 'pg_envelope'}),
	'0.1.0', 'installed at 0.1.0');
is($node->safe_psql('updated', q{SELECT state FROM envelope.tenant_keys WHERE tenant = 'doomed'}),
	'destroyed', '0.1.0 destroy_tenant(text) still works with the 0.2.0 library');
is($node->safe_psql('updated', q{SELECT state FROM envelope.tenant_keys WHERE tenant = 't3' AND version = 2}),
	'retired', '0.1.0 retire_key_version(text, integer) still works with the 0.2.0 library');

my $decrypt_sql = q{SELECT count(*) FILTER (WHERE envelope.decrypt_text(tenant, r, 'ctx') = 'r' || id
                                AND envelope.decrypt_text(tenant, d) = 'd' || id
                                AND envelope.blind_index(tenant, 'd' || id) = b
                                AND envelope.encrypt_deterministic(tenant, 'd' || id) = d),
       count(*) FROM data};
is($node->safe_psql('updated', $decrypt_sql), '200|200', 'every value decrypts at 0.1.0');
my $versions_before = $node->safe_psql('updated',
	q{SELECT tenant, version, state, kms_key FROM envelope.tenant_keys ORDER BY 1, 2});

# A session that has used the key store at 0.1.0 (which has no grants table) and
# lives on through the update.
$node->safe_psql('updated', q{
CREATE ROLE upd_reader LOGIN IN ROLE envelope_user;
CREATE ROLE upd_other;
GRANT SELECT ON data TO upd_reader;
});
my $long_lived = $node->background_psql('updated', on_error_stop => 0);
# Flushed, so that this session reads the key store itself (prepares its query at 0.1.0).
$long_lived->query_safe('SELECT envelope.cache_flush()');
$long_lived->query_safe('SET ROLE upd_reader');
is($long_lived->query_safe(q{SELECT count(envelope.decrypt_text(tenant, r, 'ctx')) FROM data WHERE tenant = 't1'}),
	'40', 'a session at 0.1.0 decrypts');

# ---- The update.
$node->safe_psql('updated', 'ALTER EXTENSION pg_envelope UPDATE');
is($node->safe_psql('updated', q{SELECT extversion FROM pg_extension WHERE extname = 'pg_envelope'}),
	'0.2.0', 'updated to 0.2.0');
is($node->safe_psql('updated', $decrypt_sql), '200|200', 'every value still decrypts after the update');
is($node->safe_psql('updated', q{SELECT tenant, version, state, kms_key FROM envelope.tenant_keys ORDER BY 1, 2}),
	$versions_before, 'the key store is unchanged by the update');
$node->safe_psql('updated', 'SELECT envelope.cache_flush()');
is($node->safe_psql('updated', $decrypt_sql), '200|200', 'and with a cold cache');

# Every key stored at 0.1.0 has its encryption count from the update on, starting at 0
# (0.1.0 counted nothing); encryptions under the new SQL are counted.
is($node->safe_psql('updated',
	q{SELECT count(*) FILTER (WHERE encryptions = 0), count(*) FROM envelope.tenant_keys}),
	'10|10', 'every stored key has an encryption count after the update');
$node->safe_psql('updated',
	q{INSERT INTO data SELECT 1000 + g, 't1', envelope.encrypt('t1', 'r' || (1000 + g), 'ctx') FROM generate_series(1, 10) g});
ok($node->safe_psql('updated',
	q{SELECT encryptions FROM envelope.tenant_keys WHERE tenant = 't1' AND version = 2}) >= 10,
	'and encryptions after it are counted');
$node->safe_psql('updated', q{DELETE FROM data WHERE id > 1000});

# Per-tenant access works after the update, also in the session that lived through it.
$node->safe_psql('updated', q{SELECT envelope.grant_tenant('t1', 'upd_other')});
$long_lived->query(q{SELECT count(envelope.decrypt_text(tenant, r, 'ctx')) FROM data WHERE tenant = 't1'});
like($long_lived->{stderr}, qr/permission denied for tenant "t1"/,
	'a grant made after the update restricts the tenant in a session that began at 0.1.0');
$long_lived->quit;
$node->safe_psql('updated', q{SELECT envelope.revoke_tenant('t1', 'upd_other')});

# ---- The fresh install.
$node->safe_psql('fresh', 'CREATE EXTENSION pg_envelope');
is($node->safe_psql('fresh', q{SELECT extversion FROM pg_extension WHERE extname = 'pg_envelope'}),
	'0.2.0', 'fresh install at 0.2.0');

# One line per catalog fact, in a form that does not depend on oids.
my $catalog_sql = q{
WITH ext AS (SELECT oid FROM pg_extension WHERE extname = 'pg_envelope'),
nsp AS (SELECT 'envelope'::regnamespace AS oid),
acl(kind, object, acl) AS (
    SELECT 'function', p.oid::regprocedure::text,
           (SELECT string_agg(coalesce(r.rolname, 'PUBLIC') || ':' || a.privilege_type
                              || CASE WHEN a.is_grantable THEN '*' ELSE '' END, ',' ORDER BY 1)
              FROM aclexplode(coalesce(p.proacl, acldefault('f'::"char", p.proowner))) a
              LEFT JOIN pg_roles r ON r.oid = a.grantee)
      FROM pg_proc p WHERE p.pronamespace = (SELECT oid FROM nsp)
    UNION ALL
    SELECT 'relation', c.oid::regclass::text,
           (SELECT string_agg(coalesce(r.rolname, 'PUBLIC') || ':' || a.privilege_type, ',' ORDER BY 1)
              FROM aclexplode(coalesce(c.relacl, acldefault(CASE WHEN c.relkind = 'S' THEN 's' ELSE 'r' END::"char", c.relowner))) a
              LEFT JOIN pg_roles r ON r.oid = a.grantee)
      FROM pg_class c WHERE c.relnamespace = (SELECT oid FROM nsp)
    UNION ALL
    SELECT 'schema', n.nspname,
           (SELECT string_agg(coalesce(r.rolname, 'PUBLIC') || ':' || a.privilege_type, ',' ORDER BY 1)
              FROM aclexplode(n.nspacl) a LEFT JOIN pg_roles r ON r.oid = a.grantee)
      FROM pg_namespace n WHERE n.oid = (SELECT oid FROM nsp)
)
SELECT line FROM (
  SELECT 'function ' || p.oid::regprocedure || ' returns ' || pg_get_function_result(p.oid)
         || ' args(' || pg_get_function_arguments(p.oid) || ')'
         || ' kind=' || p.prokind::text || ' volatile=' || p.provolatile::text || ' strict=' || p.proisstrict
         || ' secdef=' || p.prosecdef || ' parallel=' || p.proparallel::text || ' leakproof=' || p.proleakproof
         || ' lang=' || l.lanname || ' cost=' || p.procost || ' rows=' || p.prorows
         || ' src=' || md5(p.prosrc) || ' bin=' || coalesce(p.probin, '-')
         || ' config=' || coalesce(array_to_string(p.proconfig, ','), '-') AS line
    FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
   WHERE p.pronamespace = (SELECT oid FROM nsp)
  UNION ALL
  SELECT 'acl ' || kind || ' ' || object || ' ' || coalesce(acl, '-') FROM acl
  UNION ALL
  SELECT 'initacl ' || i.classoid::regclass || ' ' || pg_describe_object(i.classoid, i.objoid, i.objsubid)
         || ' ' || (SELECT string_agg(coalesce(r.rolname, 'PUBLIC') || ':' || a.privilege_type, ',' ORDER BY 1)
                      FROM aclexplode(i.initprivs) a LEFT JOIN pg_roles r ON r.oid = a.grantee)
    FROM pg_init_privs i
   WHERE pg_describe_object(i.classoid, i.objoid, i.objsubid) LIKE '%envelope%'
  UNION ALL
  SELECT 'relation ' || c.oid::regclass || ' kind=' || c.relkind::text || ' persistence=' || c.relpersistence::text
         || ' owner=' || pg_get_userbyid(c.relowner) || ' rls=' || c.relrowsecurity
    FROM pg_class c WHERE c.relnamespace = (SELECT oid FROM nsp)
  UNION ALL
  SELECT 'column ' || a.attrelid::regclass || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
         || ' notnull=' || a.attnotnull || ' identity=' || a.attidentity::text || ' generated=' || a.attgenerated::text
         || ' default=' || coalesce(pg_get_expr(d.adbin, d.adrelid), '-') || ' position=' || a.attnum
    FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
    LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
   WHERE c.relnamespace = (SELECT oid FROM nsp) AND a.attnum > 0 AND NOT a.attisdropped
  UNION ALL
  SELECT 'constraint ' || conrelid::regclass || ' ' || conname || ' ' || pg_get_constraintdef(oid)
    FROM pg_constraint WHERE connamespace = (SELECT oid FROM nsp)
  UNION ALL
  SELECT 'index ' || pg_get_indexdef(indexrelid) FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
   WHERE c.relnamespace = (SELECT oid FROM nsp)
  UNION ALL
  SELECT 'view ' || c.oid::regclass || ' ' || pg_get_viewdef(c.oid)
    FROM pg_class c WHERE c.relnamespace = (SELECT oid FROM nsp) AND c.relkind IN ('v', 'm')
  UNION ALL
  SELECT 'trigger ' || pg_get_triggerdef(t.oid) || ' enabled=' || t.tgenabled::text
    FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
   WHERE c.relnamespace = (SELECT oid FROM nsp) AND NOT t.tgisinternal
  UNION ALL
  SELECT 'sequence ' || s.seqrelid::regclass || ' ' || format_type(s.seqtypid, NULL) || ' ' || s.seqstart
         || ' ' || s.seqincrement || ' ' || s.seqmax || ' ' || s.seqmin || ' ' || s.seqcache || ' ' || s.seqcycle
    FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid WHERE c.relnamespace = (SELECT oid FROM nsp)
  UNION ALL
  SELECT 'comment ' || pg_describe_object(d.classoid, d.objoid, d.objsubid) || ' ' || md5(d.description)
    FROM pg_description d WHERE pg_describe_object(d.classoid, d.objoid, d.objsubid) LIKE '%envelope%'
  UNION ALL
  SELECT 'member ' || pg_describe_object(d.classid, d.objid, d.objsubid)
    FROM pg_depend d WHERE d.refclassid = 'pg_extension'::regclass AND d.refobjid = (SELECT oid FROM ext)
     AND d.deptype = 'e'
  UNION ALL
  SELECT 'config_dump ' || cfg::regclass || ' condition=' || coalesce(cond, '-')
    FROM pg_extension e, unnest(e.extconfig, e.extcondition) AS u(cfg, cond)
   WHERE e.oid = (SELECT oid FROM ext)
  UNION ALL
  SELECT 'extension relocatable=' || extrelocatable || ' schema=' || extnamespace::regnamespace
    FROM pg_extension WHERE oid = (SELECT oid FROM ext)
) facts ORDER BY line};

my $updated = $node->safe_psql('updated', $catalog_sql);
my $fresh = $node->safe_psql('fresh', $catalog_sql);
cmp_ok(scalar(split /\n/, $fresh), '>', 150, 'the catalog comparison covers the whole extension');
for my $kind (qw(function acl initacl relation column constraint index view trigger sequence comment member config_dump))
{
	my @u = grep { /^\Q$kind\E / } split /\n/, $updated;
	my @f = grep { /^\Q$kind\E / } split /\n/, $fresh;
	ok(scalar(@f) > 0, "fresh install has $kind facts");
	is_deeply(\@u, \@f, "updated and fresh installs agree on $kind facts");
}
is($updated, $fresh, 'updated and fresh catalogs are identical');

# ---- The 0.2.0 features on the updated database.
$node->safe_psql('updated', q{SELECT envelope.register_column('data', 'r', 'tenant', 'ctx')});
$node->safe_psql('updated', q{SELECT envelope.register_column('data', 'd', 'tenant')});
$node->safe_psql('updated', 'CALL envelope.count_key_usage()');
is($node->safe_psql('updated', q{SELECT sum(value_count) FROM envelope.key_usage}), '400',
	'count_key_usage counts every stored value after the update');
my ($ret, $stdout, $stderr) = $node->psql('updated', q{SELECT envelope.retire_key_version('t1', 1)});
like($stderr, qr/cannot retire key version 1 of tenant "t1"/, 'the retire guard works after the update');
($ret, $stdout, $stderr) = $node->psql('updated', q{SELECT envelope.destroy_tenant('t5')});
like($stderr, qr/function envelope.destroy_tenant\(unknown\) does not exist/,
	'the one-argument destroy_tenant is gone after the update');
is($node->safe_psql('updated', q{SELECT string_agg(action, ',' ORDER BY id) FROM envelope.audit_log}),
	'grant,revoke,register,register', 'the audit trail starts with the update (the grant and revocation above)');
is($node->safe_psql('updated', q{SELECT count(*) FROM envelope.check() WHERE status = 'error'}), '0',
	'check() finds no error after the update');

# Tokens written under 0.1.0 are equality version 1, and still match after the
# equality key rotates; re-encryption moves the deterministic ones onto the new version.
is($node->safe_psql('updated', q{SELECT envelope.equality_key_version('t5') || ',' || envelope.rotate_equality_key('t5')}),
	'1,2', 'tenants start at equality version 1 after the update, and rotate');
my $match_sql = q{SELECT count(*) FILTER (WHERE b = ANY (envelope.blind_index_all(tenant, 'd' || id))
                                AND d = ANY (envelope.encrypt_deterministic_all(tenant, 'd' || id))),
       count(*) FILTER (WHERE envelope.key_version(d) = 2)
  FROM data WHERE tenant = 't5'};
is($node->safe_psql('updated', $match_sql), '40|0', '0.1.0 tokens match through *_all after the rotation');
$node->safe_psql('updated', q{CALL envelope.reencrypt('data', 'd', 'tenant')});
is($node->safe_psql('updated', $match_sql), '40|40', 'and after their re-encryption onto version 2');

$node->stop;
done_testing();
