# Errors raised inside PL/pgSQL carry a CONTEXT line that quotes the inner statement,
# literals included.  For errors that hide their statement (every failed encrypt,
# decrypt and KMS call), the server log must not show that CONTEXT either, while other
# errors keep theirs.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use EnvelopeLocal qw(new_master_key local_node);

my ($keyfile) = new_master_key();
my $node = local_node('logctx', $keyfile, q{
log_statement = none
log_min_error_statement = error
log_error_verbosity = verbose
});
$node->start;
$node->safe_psql('postgres', q{
CREATE EXTENSION pg_envelope;
SELECT envelope.create_tenant('acme');
CREATE FUNCTION wrap_encrypt() RETURNS bytea LANGUAGE plpgsql AS $f$
BEGIN
    RETURN envelope.encrypt('no-such-tenant', 'secret-literal-in-function');
END $f$;
CREATE FUNCTION sql_encrypt() RETURNS bytea LANGUAGE sql AS $f$
    SELECT envelope.encrypt('no-such-tenant', 'secret-literal-sql-function');
$f$;
});

my @cases = (
	[ 'encrypt in a DO block',
	  q{DO $$ BEGIN PERFORM envelope.encrypt('no-such-tenant', 'secret-literal-do'); END $$;},
	  'secret-literal-do' ],
	[ 'decrypt with a context literal',
	  q{DO $$ BEGIN PERFORM envelope.decrypt_text('acme', envelope.encrypt('acme', 'x', 'a'), 'secret-literal-context'); END $$;},
	  'secret-literal-context' ],
	[ 'encrypt in a PL/pgSQL function',
	  q{SELECT wrap_encrypt();}, 'secret-literal-in-function' ],
	[ 're-raised from an exception handler',
	  q{DO $$ BEGIN PERFORM envelope.encrypt_deterministic('no-such-tenant', 'secret-literal-reraise'); EXCEPTION WHEN OTHERS THEN RAISE; END $$;},
	  'secret-literal-reraise' ],
	[ 'EXECUTE format(...) in a DO block',
	  q{DO $$ BEGIN EXECUTE format('SELECT envelope.encrypt(%L, %L)', 'no-such-tenant', 'secret-literal-execute'); END $$;},
	  'secret-literal-execute' ],
	[ 'encrypt in an SQL function',
	  q{SELECT sql_encrypt();}, 'secret-literal-sql-function' ],
	[ 'blind index in a DO block',
	  q{DO $$ BEGIN PERFORM envelope.blind_index('no-such-tenant', 'secret-literal-blind'); END $$;},
	  'secret-literal-blind' ],
);

for my $level ('warning', 'debug5')
{
	$node->safe_psql('postgres',
		"ALTER SYSTEM SET log_min_messages = $level; SELECT pg_reload_conf();");
	$node->poll_query_until('postgres', 'SHOW log_min_messages', $level)
	  or die "log_min_messages did not become $level";
	for my $case (@cases)
	{
		my ($name, $sql, $secret) = @$case;
		$name = "$name (log_min_messages = $level)";
		my $offset = -s $node->logfile;
		my ($ret, $out, $err) = $node->psql('postgres', $sql);
		isnt($ret, 0, "$name: fails");
		like($err, qr/tenant "no-such-tenant" does not exist|could not decrypt value/,
			"$name: the expected error");
		my $log = slurp_file($node->logfile, $offset);
		like($log, qr/ERROR:/, "$name: the error is in the server log");
		unlike($log, qr/\Q$secret\E/, "$name: the literal is not in the server log");
	}
}

# Control: an error that does not hide its statement keeps its CONTEXT, so the checks
# above would see a literal that reached the log.
my $offset = -s $node->logfile;
$node->psql('postgres',
	q{DO $$ BEGIN PERFORM 1 / 0, 'visible-literal-control'; END $$;});
like(slurp_file($node->logfile, $offset), qr/visible-literal-control/,
	'other errors keep their CONTEXT in the log');

$node->stop;
done_testing();
