# pg_envelope on Citus: a coordinator and two workers on loopback, tenants sharded by
# tenant.  The key store as reference tables, encrypt/decrypt pushed down to the
# workers, routed lookups, re-encryption shard by shard, and key-state changes reaching
# every node's cache when they commit.  Needs a Citus installed beside PostgreSQL
# (citus.so in pkglibdir); without one the test is skipped, saying so.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);
use EnvelopeLocal qw(new_master_key);

my $pkglibdir = `pg_config --pkglibdir`;
chomp $pkglibdir;
plan skip_all =>
  'SKIP: Citus is not installed (citus.so not in pkglibdir); the Citus tests did not run'
  unless -e "$pkglibdir/citus.so";

my $started = time;
my ($keyfile) = new_master_key();

# Every node: both libraries preloaded (Citus first), the same master key, TCP on
# loopback so that Citus's connections between nodes use TLS (Citus makes a
# self-signed certificate at CREATE EXTENSION citus and requires TLS by default).
my @nodes;
for my $name (qw(coordinator worker1 worker2))
{
	my $node = PostgreSQL::Test::Cluster->new($name);
	$node->init;
	$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'citus,pg_envelope'
envelope.local_master_key_file = '$keyfile'
listen_addresses = '127.0.0.1'
max_prepared_transactions = 20
log_min_messages = warning
});
	$node->start;
	$node->safe_psql('postgres', 'CREATE EXTENSION citus');
	push @nodes, $node;
}
my ($coord, $w1, $w2) = @nodes;
# CREATE EXTENSION citus turned ssl on and asked for a reload, which takes effect a
# moment later: the coordinator's connections require TLS.
for my $node (@nodes)
{
	$node->poll_query_until('postgres', 'SHOW ssl', 'on')
	  or die $node->name . ': ssl did not come on';
}

$coord->safe_psql('postgres', sprintf(q{
SELECT citus_set_coordinator_host('127.0.0.1', %d);
SELECT citus_add_node('127.0.0.1', %d);
SELECT citus_add_node('127.0.0.1', %d);
}, $coord->port, $w1->port, $w2->port));

sub on_coord { return $coord->safe_psql('postgres', $_[0]); }

# ---- 1. Install: every table of the extension is a reference table, with placements
# and the key-store triggers on every node.
on_coord('CREATE EXTENSION pg_envelope');
is(on_coord(q{
SELECT string_agg(logicalrelid::text || ':' || partmethod::text || repmodel::text, ' ' ORDER BY logicalrelid::text)
  FROM pg_dist_partition WHERE logicalrelid::text LIKE 'envelope.%'}),
	'envelope.audit_log:nt envelope.column_usage:nt envelope.column_usage_scan:nt '
	  . 'envelope.counted_column:nt envelope.data_key:nt envelope.rotation_run:nt '
	  . 'envelope.rotation_task:nt envelope.tenant:nt envelope.tenant_grant:nt',
	'the key, access, inventory, audit and progress tables are reference tables');
# Per key table: the statement triggers for changes and for TRUNCATE, and the row
# trigger that fires only in logical-replication apply workers.
for my $node ($coord, $w1, $w2)
{
	is( $node->safe_psql('postgres', q{
SET citus.override_table_visibility TO off;
SELECT count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
 WHERE c.relname ~ '^(tenant|data_key)_[0-9]+$' AND t.tgname ~ '^key_store_changed'}),
		'6', $node->name . ': the key-store triggers are on its placements of the key tables');
}

# ---- 2. Tenants sharded by tenant, values encrypted on the coordinator and the workers.
my $ntenants = 12;
on_coord(qq{
SELECT envelope.create_tenant('t' || lpad(i::text, 2, '0')) FROM generate_series(1, $ntenants) i;
CREATE TABLE docs (tenant text NOT NULL, id int NOT NULL, body bytea, email bytea, email_bi bytea,
                   PRIMARY KEY (tenant, id));
SELECT create_distributed_table('docs', 'tenant');
CREATE TABLE copied (tenant text NOT NULL, id int NOT NULL, body bytea);
SELECT create_distributed_table('copied', 'tenant', colocate_with => 'docs');
});
my %node_of = map { split /\|/ } split /\n/, on_coord(q{
SELECT t.tenant, p.nodeport FROM envelope.tenant t
  JOIN pg_dist_shard_placement p ON p.shardid = get_shard_id_for_distribution_column('docs', t.tenant)});
my %tenants_on;
push @{ $tenants_on{ $node_of{$_} } }, $_ for sort keys %node_of;
ok(@{ $tenants_on{ $w1->port } // [] } && @{ $tenants_on{ $w2->port } // [] },
	'both workers hold tenants');

# INSERT ... VALUES: Citus evaluates the function on the coordinator.
on_coord(q{INSERT INTO docs VALUES ('t01', 0, envelope.encrypt('t01', 'first'),
  envelope.encrypt_deterministic('t01', 'a@example.com'), envelope.blind_index('t01', 'a@example.com'))});
# INSERT ... SELECT from the coordinator's rows, then a colocated INSERT ... SELECT that
# Citus pushes down: encrypt and decrypt run on the workers.
on_coord(qq{
INSERT INTO docs
SELECT t, i, envelope.encrypt(t, 'body ' || i), envelope.encrypt_deterministic(t, 'e' || i || '\@example.com'),
       envelope.blind_index(t, 'e' || i || '\@example.com')
  FROM generate_series(1, 240) i, LATERAL (SELECT 't' || lpad((i % $ntenants + 1)::text, 2, '0') AS t) s;
INSERT INTO docs (tenant, id, body)
SELECT tenant, id + 1000, envelope.encrypt(tenant, envelope.decrypt_text(tenant, body) || ' again')
  FROM docs WHERE id > 0;
});
like(on_coord(q{EXPLAIN (COSTS OFF) INSERT INTO docs (tenant, id, body)
  SELECT tenant, id + 5000, envelope.encrypt(tenant, envelope.decrypt_text(tenant, body)) FROM docs}),
	qr/Task Count: 32.*\n.*\n.*Node: host=127\.0\.0\.1/s, 'INSERT ... SELECT is pushed down to the shards');
is(on_coord(q{SELECT count(*) FILTER (WHERE envelope.decrypt_text(tenant, body) = 'body ' || id)
                   || '/' || count(*) FILTER (WHERE envelope.decrypt_text(tenant, body) = 'body ' || (id - 1000) || ' again')
                   || '/' || count(*) FROM docs}),
	'240/240/481', 'SELECT decrypts every value on the workers, those written there included');
is(on_coord(q{SELECT envelope.decrypt_text(tenant, body) FROM docs WHERE tenant = 't01' AND id = 0}),
	'first', 'the value encrypted on the coordinator decrypts on its worker');

# COPY in and out: ciphertext copied in decrypts, plaintext copied out through decrypt.
my $copyfile = PostgreSQL::Test::Utils::tempdir() . '/copy.csv';
on_coord(qq{
COPY (SELECT tenant, id, envelope.encrypt(tenant, 'copied ' || id) FROM docs WHERE id BETWEEN 1 AND 60) TO '$copyfile' CSV;
COPY copied FROM '$copyfile' CSV;
});
is(on_coord(q{SELECT count(*) FROM copied WHERE envelope.decrypt_text(tenant, body) = 'copied ' || id}),
	'60', 'COPY FROM of values encrypted by COPY TO: every one decrypts on the workers');
my $copied_out = on_coord(q{COPY (SELECT id, envelope.decrypt_text(tenant, body) FROM docs
  WHERE tenant = 't02' AND id < 1000 ORDER BY id LIMIT 2) TO STDOUT});
is($copied_out, "1\tbody 1\n13\tbody 13", 'COPY TO through decrypt_text');

# ---- WHERE lookups routed to one shard.
for my $lookup (
	[ 'deterministic value', q{email = envelope.encrypt_deterministic('t06', 'e5@example.com')} ],
	[ 'blind index', q{email_bi = envelope.blind_index('t06', 'e5@example.com')} ])
{
	my ($what, $cond) = @$lookup;
	my $sql = "SELECT id, envelope.decrypt_text(tenant, body) FROM docs WHERE tenant = 't06' AND $cond";
	like(on_coord("EXPLAIN (COSTS OFF) $sql"), qr/Task Count: 1\n/, "lookup by $what: one task");
	is(on_coord($sql), '5|body 5', "lookup by $what finds the row");
}

# ---- Parallel query on the workers: the parallel workers read the key store too.
my $parallel = q{parallel_setup_cost = 0, parallel_tuple_cost = 0, min_parallel_table_scan_size = 0,
  force_parallel_mode = on};
for my $setting (split /,\s*/, $parallel)
{
	on_coord("SELECT run_command_on_workers('ALTER SYSTEM SET $setting')");
}
on_coord(q{SELECT run_command_on_workers('SELECT pg_reload_conf()')});
# Every task shown: under load some tasks find no free worker process and run alone.
like(on_coord(q{SET citus.explain_all_tasks = on;
EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF)
  SELECT count(*) FROM docs WHERE envelope.decrypt_text(tenant, body) LIKE 'body%'}),
	qr/Workers Launched: [1-9]/, 'shard queries run with parallel workers');
is(on_coord(q{SELECT count(*) FROM docs WHERE envelope.decrypt_text(tenant, body) LIKE 'body%'}),
	'480', 'and decrypt there');
for my $setting (split /,\s*/, $parallel)
{
	my ($name) = split / = /, $setting;
	on_coord("SELECT run_command_on_workers('ALTER SYSTEM RESET $name')");
}
on_coord(q{SELECT run_command_on_workers('SELECT pg_reload_conf()')});

# ---- 3. Cache statistics per node; cluster KMS calls = nodes x keys.
on_coord(q{SELECT envelope.cache_flush();
           SELECT run_command_on_workers('SELECT envelope.cache_flush()')});
sub worker_stat
{
	my ($column) = @_;
	my %v = map { split /\|/ } split /\n/, on_coord(qq{
SELECT nodeport, result FROM run_command_on_workers('SELECT $column FROM envelope.cache_stats')});
	return %v;
}
my %before = worker_stat('kms_decrypt_calls');
on_coord(q{SELECT count(envelope.decrypt_text(tenant, body)) FROM docs});
my %after = worker_stat('kms_decrypt_calls');
for my $w ($w1, $w2)
{
	is($after{ $w->port } - $before{ $w->port }, scalar @{ $tenants_on{ $w->port } },
		$w->name . ': one KMS Decrypt per key of the tenants it holds');
}
# Each worker encrypting for every tenant: every node unwraps every key once.
on_coord(q{SELECT run_command_on_workers('SELECT count(envelope.encrypt(tenant, ''x'')) FROM envelope.tenant')});
my %all = worker_stat('kms_decrypt_calls');
is(($all{ $w1->port } - $before{ $w1->port }) + ($all{ $w2->port } - $before{ $w2->port }),
	2 * $ntenants, 'two workers using every key: 2 x keys KMS Decrypts in all');
my %entries = worker_stat('entries');
is(join(',', map { $entries{ $_->port } } $w1, $w2), "$ntenants,$ntenants",
	'cache_stats through run_command_on_workers: each worker caches every key');

# ---- Key-state changes reach the caches of every node at commit.  One coordinator
# session keeps its connections to the workers (Citus caches them), so the same worker
# backends that cached a tenant's state must see each change.
my $session = $coord->background_psql('postgres', on_error_stop => 0);
sub in_session
{
	my ($sql) = @_;
	$session->{stderr} = '';
	my $out = $session->query($sql);
	my $err = $session->{stderr};
	$session->{stderr} = '';
	return ($out, $err);
}
my ($tw1) = @{ $tenants_on{ $w1->port } };
my ($tw2) = @{ $tenants_on{ $w2->port } };
my $count_sql = "SELECT count(envelope.decrypt_text(tenant, body)) FROM docs WHERE tenant IN ('$tw1', '$tw2')";
my ($n_ok) = in_session($count_sql);
ok($n_ok > 0, 'session decrypts both workers\' tenants');

on_coord("SELECT envelope.disable_tenant('$tw1')");
my ($out, $err) = in_session($count_sql);
like($err, qr/tenant "$tw1" is disabled/, 'disable_tenant: the worker refuses at once');
on_coord("SELECT envelope.enable_tenant('$tw1')");
($out, $err) = in_session($count_sql);
is("$out$err", $n_ok, 'enable_tenant: the worker decrypts again');

# Rotation: values written on the workers after it use the new version.
is(on_coord("SELECT envelope.rotate_tenant_key('$tw2')"), '2', 'rotate_tenant_key');
($out, $err) = in_session(qq{
INSERT INTO copied SELECT tenant, id + 100000, envelope.encrypt(tenant, 'after rotation') FROM docs WHERE tenant = '$tw2';
SELECT DISTINCT envelope.key_version(body) FROM copied WHERE id > 100000});
is("$out$err", '2', 'after rotate_tenant_key the worker encrypts under version 2');

# Re-encryption: an UPDATE of the distributed table with encrypt (VOLATILE) is refused
# by Citus; the same UPDATE runs on each shard through run_command_on_shards.
my $stdout = '';
my $stderr = '';
$coord->psql('postgres', q{UPDATE docs SET body = envelope.encrypt(tenant, envelope.decrypt(tenant, body))},
	stdout => \$stdout, stderr => \$stderr);
like($stderr, qr/must not be VOLATILE/, 'Citus refuses UPDATE with encrypt on a distributed table');
on_coord("CREATE TABLE old_value AS SELECT tenant, body FROM docs WHERE tenant = '$tw2' LIMIT 1");
is(on_coord(q{
SELECT bool_and(success) FROM run_command_on_shards('docs', $$
UPDATE %s SET body = envelope.encrypt(tenant, envelope.decrypt(tenant, body))
 WHERE envelope.needs_reencryption(body, tenant)$$)}),
	't', 're-encryption through run_command_on_shards');
is(on_coord("SELECT string_agg(DISTINCT envelope.key_version(body)::text, ',') FROM docs WHERE tenant = '$tw2'"),
	'2', 'every value of the rotated tenant is under version 2');
is(on_coord("SELECT count(*) FROM docs WHERE tenant = '$tw2' AND envelope.decrypt_text(tenant, body) IS NULL"),
	'0', 'and decrypts');

# Retire the old version: the worker's backend refuses values still under it.
($out, $err) = in_session("SELECT envelope.decrypt_text(tenant, body) IS NOT NULL FROM old_value");
is("$out$err", 't', 'the session decrypts a value under version 1 before retirement');
on_coord("SELECT envelope.retire_key_version('$tw2', 1, force => true)");
($out, $err) = in_session("SELECT envelope.decrypt_text(tenant, body) FROM old_value");
like($err, qr/key version 1 of tenant "$tw2" is retired/, 'retire_key_version reaches the worker');

# Rewrap: as on one node (the local provider holds one master key, so nothing moves);
# every node unwraps the keys again after a flush of every cache.
is(on_coord("SELECT envelope.rewrap('local', '$tw1')"), '0', 'rewrap');
on_coord(q{SELECT envelope.cache_flush(); SELECT run_command_on_workers('SELECT envelope.cache_flush()')});
($out, $err) = in_session($count_sql);
is("$out$err", $n_ok, 'after rewrap and a flush of every node, the workers decrypt with the rewrapped keys');

# Destroy: the worker refuses, and its shared cache no longer holds the tenant's keys.
on_coord("SELECT envelope.destroy_tenant('$tw1', '$tw1')");
($out, $err) = in_session("SELECT count(envelope.decrypt_text(tenant, body)) FROM docs WHERE tenant = '$tw1'");
like($err, qr/tenant "$tw1" has been destroyed/, 'destroy_tenant reaches the worker');
is( $coord->safe_psql('postgres', sprintf(q{
SELECT result FROM run_command_on_workers('SELECT count(*) FROM envelope.data_key WHERE tenant = ''%s'' AND wrapped_dek IS NOT NULL')
 WHERE nodeport = %d}, $tw1, $w1->port)),
	'0', 'the destroyed keys are gone from the worker\'s copy of the key store');
($out, $err) = in_session($count_sql);
like($err, qr/has been destroyed/, 'the session still refuses on its next statement');
$session->quit;

# ---- Audit rows of the actions above, readable from every node.
is( on_coord(q{SELECT bool_and(success AND result::int >= 5)
  FROM run_command_on_workers('SELECT count(*) FROM envelope.audit_log')}),
	't', 'the audit trail is a reference table: every worker reads the actions');

# ---- A worker added later: Citus creates the extension there and copies the
# reference tables; a tenant's shard moved to it decrypts there.
my $w3 = PostgreSQL::Test::Cluster->new('worker3');
$w3->init;
$w3->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'citus,pg_envelope'
envelope.local_master_key_file = '$keyfile'
listen_addresses = '127.0.0.1'
max_prepared_transactions = 20
log_min_messages = warning
});
$w3->start;
$w3->safe_psql('postgres', 'CREATE EXTENSION citus');
$w3->poll_query_until('postgres', 'SHOW ssl', 'on') or die 'worker3: ssl did not come on';
on_coord(sprintf(q{
SELECT citus_add_node('127.0.0.1', %d);
SELECT replicate_reference_tables('block_writes');
SELECT citus_move_shard_placement(get_shard_id_for_distribution_column('docs', '%s'),
    '127.0.0.1', %d, '127.0.0.1', %d, shard_transfer_mode => 'block_writes');
}, $w3->port, $tw2, $w2->port, $w3->port));
is( $w3->safe_psql('postgres', q{
SET citus.override_table_visibility TO off;
SELECT count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
 WHERE c.relname ~ '^(tenant|data_key)_[0-9]+$' AND t.tgname ~ '^key_store_changed'}),
	'6', 'the added worker has the key tables with their triggers');
is(on_coord("SELECT count(*) FROM docs WHERE tenant = '$tw2' AND envelope.decrypt_text(tenant, body) IS NOT NULL"),
	on_coord("SELECT count(*) FROM docs WHERE tenant = '$tw2'"),
	'the tenant moved to the added worker decrypts there');
ok($w3->safe_psql('postgres', 'SELECT kms_decrypt_calls FROM envelope.cache_stats') > 0,
	'the added worker unwrapped the key itself');

# ---- The fleet procedures on the cluster, now of a coordinator and three workers: a
# distributed table (a task per shard, each batch run on the shard's node) with a
# stored blind index made from one of its columns, a table of the coordinator, and a
# reference table (skipped by re-encryption, counted).
my @fleet_tenants = map { "f$_" } 1 .. 6;
my $fleet_list = join(', ', map { "'$_'" } @fleet_tenants);
on_coord(qq{
SELECT envelope.create_tenant(t) FROM unnest(ARRAY[$fleet_list]) t;
CREATE TABLE fleet_docs (tenant text NOT NULL, id int NOT NULL, body bytea, plain text,
                         email bytea, email_bi bytea);
SELECT create_distributed_table('fleet_docs', 'tenant');
INSERT INTO fleet_docs
SELECT t, i, envelope.encrypt(t, 'fleet ' || i, 'fleet.body'), 'fleet ' || i,
       envelope.encrypt(t, 'e' || i || '\@example.com', 'fleet.email'),
       envelope.blind_index(t, 'e' || i || '\@example.com')
  FROM generate_series(1, 600) i, LATERAL (SELECT 'f' || (i % 6 + 1) AS t) s;
CREATE TABLE fleet_local (tenant text NOT NULL, body bytea, plain text);
INSERT INTO fleet_local SELECT 'f' || (i % 6 + 1), envelope.encrypt('f' || (i % 6 + 1), 'local ' || i), 'local ' || i
  FROM generate_series(1, 60) i;
CREATE TABLE fleet_ref (tenant text NOT NULL, body bytea);
SELECT create_reference_table('fleet_ref');
INSERT INTO fleet_ref VALUES ('f1', envelope.encrypt('f1', 'ref'));
SELECT envelope.register_column('fleet_docs', 'body', 'tenant', 'fleet.body');
SELECT envelope.register_column('fleet_docs', 'email', 'tenant', 'fleet.email');
SELECT envelope.register_blind_index('fleet_docs', 'email_bi', 'email');
SELECT envelope.register_column('fleet_local', 'body', 'tenant');
SELECT envelope.register_column('fleet_ref', 'body', 'tenant');
});

# What count_key_usage must find: the stored values per (tenant, version), counted directly.
my $direct_count = q{
SELECT string_agg(tenant || ':' || v || ':' || n, ',' ORDER BY tenant, v)
  FROM (SELECT tenant, envelope.key_version(body) AS v, count(*) AS n
          FROM (SELECT tenant, body FROM fleet_docs UNION ALL SELECT tenant, email FROM fleet_docs
                UNION ALL SELECT tenant, body FROM fleet_local
                UNION ALL SELECT tenant, body FROM fleet_ref) x
         GROUP BY 1, 2) y};
my $key_usage = q{
SELECT string_agg(tenant || ':' || version || ':' || value_count, ',' ORDER BY tenant, version)
  FROM envelope.key_usage WHERE tenant LIKE 'f_' AND value_count > 0};
my $every_node = sub {
	my ($sql) = @_;
	(my $quoted = $sql) =~ s/'/''/g;
	return join(' ', on_coord($sql),
		split /\n/, on_coord("SELECT result FROM run_command_on_workers('$quoted') ORDER BY nodeport"));
};
my $copies_agree = sub {
	my ($table) = @_;
	my %seen = map { $_ => 1 } split / /,
	  $every_node->("SELECT md5(COALESCE(string_agg(x::text, ',' ORDER BY x::text), '')) FROM $table x");
	return scalar(keys %seen) == 1;
};

on_coord('CALL envelope.count_key_usage()');
is(on_coord($key_usage), on_coord($direct_count),
	'count_key_usage: the counts equal a direct count (distributed, local and reference tables)');
like(on_coord($key_usage), qr/^f1:1:\d+,f2:1:/, 'and there is something to count');

# rotate_keys: the new versions reach every node's copy of the key store and cache.
# (A value under the old version that will not decrypt, for reencrypt_all below.)
on_coord(q{INSERT INTO fleet_docs VALUES ('f3', 9999, envelope.encrypt('f3', 'bad', 'wrong.context'), 'bad')});
on_coord("CALL envelope.rotate_keys(tenants => ARRAY[$fleet_list])");
is( $every_node->(qq{SELECT string_agg(tenant || ':' || version, ',' ORDER BY tenant)
  FROM envelope.tenant_keys WHERE tenant IN ($fleet_list) AND state = 'active'}),
	join(' ', (join(',', map { "$_:2" } @fleet_tenants)) x 4),
	'rotate_keys: version 2 is the active version of every tenant on every node');
is( $every_node->(qq{SELECT string_agg(DISTINCT envelope.key_version(envelope.encrypt(t, 'x'))::text, ',')
  FROM unnest(ARRAY[$fleet_list]) t}),
	'2 2 2 2', 'and every node encrypts under it');
is(on_coord(q{SELECT done || '/' || total || ' ' || state FROM envelope.rotation_progress WHERE procedure = 'rotate_keys'}),
	'6/6 done', 'rotate_keys: the run is complete in the progress view');
# f1's equality key version moves too (version 3): its blind indexes are to be recomputed.
is(on_coord(q{SELECT envelope.rotate_equality_key('f1')}), '3', 'rotate_equality_key');

# reencrypt_all, interrupted by a value that does not decrypt (a wrong context) in one
# shard: the batches committed before stay, and the next call resumes.
$stderr = '';
$coord->psql('postgres', 'SET client_min_messages = warning; CALL envelope.reencrypt_all(25)',
	stderr => \$stderr);
like($stderr, qr/ERROR:  could not decrypt value for tenant "f3"/,
	'reencrypt_all: a batch\'s error on a worker is raised on the coordinator');
is( on_coord(q{SELECT count(*) FILTER (WHERE state = 'interrupted') > 0 AND sum(values_moved) > 0
                 FROM envelope.rotation_progress WHERE procedure = 'reencrypt_all'}),
	't', 'the run is interrupted, and the batches committed before the error are recorded');
# The shards' values and the task rows commit together: what the tasks say they moved
# is exactly what is on the new versions (and the blind indexes, 36 bytes under a
# version >= 2).
is( on_coord(q{SELECT count(*) FILTER (WHERE envelope.key_version(body) > 1)
                    + count(*) FILTER (WHERE envelope.key_version(email) > 1)
                    + count(*) FILTER (WHERE octet_length(email_bi) = 36) FROM fleet_docs}),
	on_coord(q{SELECT sum(values_moved) FROM envelope.rotation_progress
  WHERE procedure = 'reencrypt_all' AND relation = 'fleet_docs'::regclass}),
	'the values moved by the interrupted run are exactly those its task rows count');
on_coord(q{DELETE FROM fleet_docs WHERE id = 9999});
on_coord('SET client_min_messages = warning; CALL envelope.reencrypt_all(25)');
is(on_coord(q{SELECT count(*) || ' ' || count(resumed_at) || ' ' || string_agg(outcome, ',')
  FROM envelope.rotation_run WHERE procedure = 'reencrypt_all'}),
	'1 1 done', 'the next call resumed the run and finished it');
is( on_coord(q{SELECT count(*) || ' ' || count(*) FILTER (WHERE envelope.key_version(body) = envelope.active_key_version(tenant))
                  || ' ' || count(*) FILTER (WHERE envelope.decrypt_text(tenant, body, 'fleet.body') = plain)
                 FROM fleet_docs}),
	'600 600 600', 'reencrypt_all: every value of the distributed table is on the active version, and decrypts');
is( on_coord(q{SELECT count(*) FILTER (WHERE envelope.key_version(email) = envelope.active_key_version(tenant))
                  || ' ' || count(*) FILTER (WHERE email_bi = envelope.blind_index(tenant, envelope.decrypt_text(tenant, email, 'fleet.email')))
                  || ' ' || count(*) FILTER (WHERE tenant = 'f1' AND octet_length(email_bi) = 36)
                 FROM fleet_docs}),
	'600 600 100', 'and of its second column; the blind indexes made from it are recomputed on the shards');
is( on_coord(q{SELECT count(*) FILTER (WHERE envelope.key_version(body) = envelope.active_key_version(tenant))
                  || ' ' || count(*) FILTER (WHERE envelope.decrypt_text(tenant, body) = plain)
                 FROM fleet_local}),
	'60 60', 'and every value of the coordinator\'s table');
is( on_coord(q{SELECT count(*) || ' ' || count(*) FILTER (WHERE t.finished_at IS NOT NULL) || ' ' || sum(values_moved)
                 FROM envelope.rotation_task t JOIN envelope.rotation_run r USING (run_id)
                WHERE r.procedure = 'reencrypt_all' AND t.shard_id IS NOT NULL}),
	on_coord(q{SELECT 3 * count(*) || ' ' || 3 * count(*) || ' 1300' FROM pg_dist_shard WHERE logicalrelid = 'fleet_docs'::regclass}),
	'one task per shard and column, each finished, 1300 values moved (600 + 600 + 100 blind indexes)');
is(on_coord(q{SELECT envelope.key_version(body) FROM fleet_ref}), '1',
	'the reference table was skipped: its copies are written only through Citus');
is( on_coord(q{SELECT detail ->> 'moved' FROM envelope.audit_log WHERE action = 'reencrypt_all'}),
	'1360', 'the audit trail records the run and what it moved');
ok($copies_agree->('envelope.rotation_task') && $copies_agree->('envelope.rotation_run'),
	'the progress tables are the same on every node (batches wrote them from the workers)');

# Another session of the coordinator counting at the same time: its partial counts are
# its own, and stay, on every node's copy (whether it is alive is the coordinator's to say).
my $other = $coord->background_psql('postgres');
my $other_pid = $other->query('SELECT pg_backend_pid()');
on_coord("INSERT INTO envelope.column_usage_scan VALUES ($other_pid, 1, 1, 'f1', 1, 1, 5)");
on_coord('CALL envelope.count_key_usage()');
is($every_node->("SELECT count(*) FROM envelope.column_usage_scan WHERE pid = $other_pid"), '1 1 1 1',
	'count_key_usage leaves the partial counts of a live session alone, on every node');
$other->quit;
on_coord("DELETE FROM envelope.column_usage_scan WHERE pid = $other_pid");
is(on_coord($key_usage), on_coord($direct_count),
	'count_key_usage after reencrypt_all: the counts equal a direct count');
unlike(on_coord($key_usage), qr/f[2-6]:1:/, 'and only the reference table keeps a value under version 1');
ok($copies_agree->('envelope.column_usage') && $copies_agree->('envelope.counted_column'),
	'the counts are the same on every node');

# rewrap_keys: the local provider has one master key, so the DEKs keep their wrapping;
# the tenants move to the master key named, on every node, and still decrypt everywhere.
on_coord("CALL envelope.rewrap_keys('local', ARRAY[$fleet_list])");
is(on_coord(q{SELECT done || '/' || total || ' ' || state FROM envelope.rotation_progress WHERE procedure = 'rewrap_keys'}),
	'13/13 done', 'rewrap_keys: the run handled the 13 DEKs of the six tenants');
is( $every_node->(qq{SELECT string_agg(DISTINCT kms_key, ',') FROM envelope.tenant WHERE tenant IN ($fleet_list)}),
	'local local local local', 'every node\'s copy of the key store names the new master key');
on_coord(q{SELECT envelope.cache_flush(); SELECT run_command_on_workers('SELECT envelope.cache_flush()')});
is(on_coord(q{SELECT count(*) FROM fleet_docs WHERE envelope.decrypt_text(tenant, body, 'fleet.body') = plain}),
	'600', 'after rewrap_keys and a flush of every cache the workers decrypt every value');
is(on_coord(q{SELECT count(*) FROM envelope.audit_log WHERE action = 'rewrap_keys'}), '1',
	'the audit trail records the rewrap run');

# ---- ALTER EXTENSION UPDATE from 0.1.0 on a Citus cluster (another database): the
# workers are updated first, the tables become reference tables, the keys made under
# 0.1.0 decrypt on the workers.
for my $node ($w1, $w2, $coord)
{
	$node->safe_psql('postgres', 'CREATE DATABASE upd');
	$node->safe_psql('upd', 'CREATE EXTENSION citus');
}
$coord->safe_psql('upd', sprintf(q{
SELECT citus_set_coordinator_host('127.0.0.1', %d);
SELECT citus_add_node('127.0.0.1', %d);
SELECT citus_add_node('127.0.0.1', %d);
CREATE EXTENSION pg_envelope VERSION '0.1.0';
SELECT envelope.create_tenant('u' || i) FROM generate_series(1, 6) i;
CREATE TABLE d (tenant text NOT NULL, v bytea);
INSERT INTO d SELECT 'u' || i, envelope.encrypt('u' || i, 'old ' || i) FROM generate_series(1, 6) i;
}, $coord->port, $w1->port, $w2->port));
$coord->safe_psql('upd', q{
ALTER EXTENSION pg_envelope UPDATE;
SELECT create_distributed_table('d', 'tenant');
});
is($coord->safe_psql('upd', q{SELECT count(*) FROM pg_dist_partition WHERE logicalrelid::text LIKE 'envelope.%'}),
	'9', 'after the update every table of the extension is a reference table');
is($coord->safe_psql('upd', q{SELECT string_agg(result, ',') FROM run_command_on_workers(
  $$SELECT extversion FROM pg_extension WHERE extname = 'pg_envelope'$$)}),
	'0.2.0,0.2.0', 'the workers are at 0.2.0');
is($coord->safe_psql('upd', q{SELECT count(*) FROM d WHERE envelope.decrypt_text(tenant, v) = 'old ' || substr(tenant, 2)}),
	'6', 'values encrypted under 0.1.0 decrypt on the workers after the update');

# ---- A coordinator not in the metadata (another database): no copy of the key tables
# on it, a warning at install, and revocation still reaching its sessions.
# ---- Per-tenant access: a grant names a role by oid, and oids differ between nodes.
# Citus writes the copies through SQL, where a regrole travels as its name, so every
# node's copy names the same role; the worker checks the role the query runs as.
on_coord(q{
CREATE ROLE citus_app_a LOGIN;
CREATE ROLE citus_app_b LOGIN;
GRANT envelope_user TO citus_app_a, citus_app_b;
GRANT SELECT ON docs TO citus_app_a, citus_app_b;
});
on_coord(q{
SELECT envelope.create_tenant('g01');
INSERT INTO docs (tenant, id, body) SELECT 'g01', i, envelope.encrypt('g01', 'g' || i) FROM generate_series(1, 5) i;
SELECT envelope.grant_tenant('g01', 'citus_app_a');
});
is( on_coord(
		"SELECT string_agg(result, ',' ORDER BY nodeport) FROM run_command_on_workers("
		  . "\$\$SELECT string_agg(role::text, ',') FROM envelope.tenant_grant WHERE tenant = 'g01'\$\$)"),
	'citus_app_a,citus_app_a,citus_app_a',
	'every worker\'s copy of the grant names the granted role');
my $grant_sql = "SELECT count(envelope.decrypt_text(tenant, body)) > 0 FROM docs WHERE tenant = 'g01'";
my ($ret) = 0;
($ret, $out, $err) = $coord->psql('postgres', "SET ROLE citus_app_a; $grant_sql");
is("$ret $out", '0 t', 'the granted role decrypts the tenant on its worker');
($ret, $out, $err) = $coord->psql('postgres', "SET ROLE citus_app_b; $grant_sql");
like($err, qr/permission denied for tenant "g01"/, 'a role without the grant is refused on the worker');
on_coord("SELECT envelope.revoke_tenant('g01', 'citus_app_a')");

for my $node ($w1, $w2, $coord)
{
	$node->safe_psql('postgres', 'CREATE DATABASE nocoord');
	$node->safe_psql('nocoord', 'CREATE EXTENSION citus');
}
$coord->safe_psql('nocoord', sprintf(q{
SELECT citus_add_node('127.0.0.1', %d);
SELECT citus_add_node('127.0.0.1', %d);
}, $w1->port, $w2->port));
$stderr = '';
$coord->psql('nocoord', 'CREATE EXTENSION pg_envelope', stderr => \$stderr, on_error_die => 1);
like($stderr, qr/WARNING:  the Citus coordinator is not in the metadata/,
	'the install warns when the coordinator is not in the metadata');
$coord->safe_psql('nocoord', q{SELECT envelope.create_tenant('n1')});
my $nsession = $coord->background_psql('nocoord', on_error_stop => 0);
is($nsession->query(q{SELECT envelope.decrypt_text('n1', envelope.encrypt('n1', 'x'))}), 'x',
	'a coordinator session encrypts and decrypts');
$coord->safe_psql('nocoord', q{SELECT envelope.disable_tenant('n1')});
$nsession->{stderr} = '';
$nsession->query(q{SELECT envelope.encrypt('n1', 'x')});
like($nsession->{stderr}, qr/tenant "n1" is disabled/,
	'disable_tenant reaches the coordinator\'s sessions without a copy of the key tables');
$nsession->quit;

my $elapsed = time - $started;
diag(sprintf('the Citus test took %.0f s', $elapsed));
done_testing();
