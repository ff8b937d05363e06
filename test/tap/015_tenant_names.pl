# The tenant-name grammar, in UTF-8, LATIN1 and SQL_ASCII databases: control, format
# and separator characters are refused when a tenant is created, and in a UTF-8
# database so are names not in NFC; ordinary names of any script are accepted.
use strict;
use warnings;
use utf8;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use EnvelopeLocal qw(new_master_key local_node);

my ($keyfile) = new_master_key();
my $node = local_node('names', $keyfile);
$node->start;

for my $enc ('UTF8', 'LATIN1', 'SQL_ASCII')
{
	my $db = lc("db_$enc");
	$node->safe_psql('postgres',
		"CREATE DATABASE $db TEMPLATE template0 ENCODING '$enc' LC_COLLATE 'C' LC_CTYPE 'C'");
	$node->safe_psql($db, q{
CREATE EXTENSION pg_envelope;
CREATE FUNCTION try_create(name text) RETURNS text LANGUAGE plpgsql AS $f$
BEGIN
    PERFORM envelope.create_tenant(name);
    RETURN 'created';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ' ' || SQLERRM;
END $f$;
});
}

# Each name is written as an SQL expression, so that the test file says exactly which
# code points it sends.
sub try_create
{
	my ($db, $expr) = @_;
	return $node->safe_psql($db, "SET client_encoding = 'UTF8'; SELECT try_create($expr)");
}

my @refused_everywhere = (
	[ 'C1 NEXT LINE U+0085', q{U&'a\0085b'} ],
	[ 'C1 CSI U+009B', q{U&'a\009B31m'} ],
	[ 'soft hyphen U+00AD', q{U&'a\00ADb'} ],
);
my @refused_utf8 = (
	[ 'right-to-left override U+202E', q{U&'invoice\202Etxt.exe'} ],
	[ 'line separator U+2028', q{U&'a\2028b'} ],
	[ 'byte order mark U+FEFF', q{U&'\FEFFacme'} ],
	[ 'zero-width space U+200B', q{U&'ac\200Bme'} ],
	[ 'first strong isolate U+2068', q{U&'a\2068b'} ],
	[ 'tag character U+E0041', q{U&'a\+0E0041'} ],
	[ 'zero-width joiner U+200D', q{U&'a\200Db'} ],
);

for my $case (@refused_everywhere, @refused_utf8)
{
	like(try_create('db_utf8', $case->[1]), qr/^22023 tenant name must not contain/,
		"UTF8: $case->[0] refused");
}
like(try_create('db_utf8', q{U&'cafe\0301'}), qr/^22023 tenant name must be in Unicode normalization form NFC/,
	'UTF8: decomposed café refused');
is(try_create('db_utf8', q{U&'caf\00E9'}), 'created', 'UTF8: precomposed café accepted');
is(try_create('db_utf8', q{normalize(U&'Zu\0308rich', NFC)}), 'created',
	'UTF8: a name normalised to NFC is accepted');
for my $name (q{'O''Brien & Sons, Ltd.'}, q{U&'\6771\4EAC'}, q{U&'\+01F642 shop'},
	q{U&'\0645\062A\062C\0631'})
{
	is(try_create('db_utf8', $name), 'created', "UTF8: $name accepted");
}

for my $case (@refused_everywhere)
{
	like(try_create('db_latin1', $case->[1]), qr/^22023 tenant name must not contain/,
		"LATIN1: $case->[0] refused");
}
is(try_create('db_latin1', q{U&'caf\00E9'}), 'created', 'LATIN1: café accepted');

# SQL_ASCII: bytes with no declared encoding.  Valid UTF-8 is checked as UTF-8.
like(try_create('db_sql_ascii', q{convert_from('\x61c28562', 'SQL_ASCII')}),
	qr/^22023 tenant name must not contain control characters/,
	'SQL_ASCII: U+0085 as UTF-8 bytes refused');
like(try_create('db_sql_ascii', q{convert_from('\x61e280ae62', 'SQL_ASCII')}),
	qr/^22023 tenant name must not contain format or separator characters/,
	'SQL_ASCII: U+202E as UTF-8 bytes refused');
is(try_create('db_sql_ascii', q{convert_from('\x636166c3a9', 'SQL_ASCII')}), 'created',
	'SQL_ASCII: café as UTF-8 bytes accepted');
like(try_create('db_sql_ascii', q{E'a\x01b'}), qr/^22023 tenant name must not contain control characters/,
	'SQL_ASCII: C0 refused');

# Lookups do not apply the grammar: an unknown name is just unknown.
my ($ret, $out, $err) = $node->psql('db_utf8', q{SELECT envelope.encrypt(U&'a\202Eb', 'x')});
like($err, qr/tenant .* does not exist/, 'lookup of a name the grammar refuses: does not exist');

# Values under the accepted names round-trip.
is($node->safe_psql('db_utf8',
		q{SELECT envelope.decrypt_text(U&'caf\00E9', envelope.encrypt(U&'caf\00E9', 'ok'))}),
	'ok', 'UTF8: values of an accepted name round-trip');

$node->stop;
done_testing();
