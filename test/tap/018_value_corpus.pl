# The frozen value corpus: key-store rows and values written by an earlier version,
# under the fixed test master key of test/corpus/ (test/corpus/generate.sh made them).
# Every later version must decrypt each value to the same bytes, give the same
# deterministic values, and keep refusing a value under a changed tenant or context —
# contexts past the cipher layer's stack buffer (491 and 5,000 bytes) and the longest
# tenant name included.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use File::Basename qw(dirname);
use Cwd qw(abs_path);
use EnvelopeLocal qw(local_node);

my $corpus = abs_path(dirname(__FILE__) . '/../corpus');
-f "$corpus/corpus.sql" or BAIL_OUT("no value corpus in $corpus");

my $dir = PostgreSQL::Test::Utils::tempdir;
my $keyfile = "$dir/corpus.key";
open(my $fh, '>', $keyfile) or die;
print $fh slurp_file("$corpus/master.key.hex");
close($fh);
chmod(0600, $keyfile);

my $node = local_node('corpus', $keyfile);
$node->start;
$node->safe_psql('postgres', q{
CREATE EXTENSION pg_envelope;
CREATE FUNCTION corpus_context(n int) RETURNS text LANGUAGE sql AS
  $$ SELECT string_agg(chr(97 + (i * 7 + i / 26) % 26), '' ORDER BY i) FROM generate_series(0, n - 1) i $$;
CREATE TABLE corpus (tenant text, kind text, context text, plain bytea, value bytea);
});
my ($ret, $out, $err) = $node->psql('postgres', undef,
	extra_params => [ '-v', 'ON_ERROR_STOP=1', '-f', "$corpus/corpus.sql" ]);
is($ret, 0, 'the corpus loads') or diag($err);

sub sql { return $node->safe_psql('postgres', $_[0]); }

my $total = sql('SELECT count(*) FROM corpus');
cmp_ok($total, '>=', 196, "$total values in the corpus");
is(sql(q{SELECT string_agg(DISTINCT kind, ',' ORDER BY kind) FROM corpus}),
	'deterministic,random,random-v1', 'both formats, and a rotated-away version');

is(sql(q{SELECT count(*) FROM corpus WHERE get_byte(value, 0) = 1 AND kind LIKE 'random%'}),
	sql(q{SELECT count(*) FROM corpus WHERE kind LIKE 'random%'}), 'randomized values are format 0x01');
is(sql(q{SELECT count(*) FROM corpus WHERE get_byte(value, 0) = 2 AND kind = 'deterministic'}),
	sql(q{SELECT count(*) FROM corpus WHERE kind = 'deterministic'}), 'deterministic values are format 0x02');

is(sql(q{SELECT count(*) FROM corpus WHERE envelope.decrypt(tenant, value, context) = plain}),
	$total, 'every stored value decrypts to its plaintext, byte for byte');
is(sql(q{SELECT string_agg(tenant || '/' || kind || '/' || coalesce(length(context)::text, 'null'), ', ')
           FROM corpus WHERE envelope.decrypt(tenant, value, context) IS DISTINCT FROM plain}),
	'', 'no value decrypts differently');
is(sql(q{SELECT count(*) FROM corpus WHERE kind = 'deterministic'
           AND envelope.encrypt_deterministic(tenant, plain, context) <> value}),
	0, 'deterministic encryption gives the stored bytes again');
is(sql(q{SELECT string_agg(DISTINCT tenant || ':' || kind || ':' || envelope.key_version(value), ',')
           FROM corpus WHERE tenant = 'acme'}),
	'acme:deterministic:1,acme:random-v1:1,acme:random:2', 'the versions in the stored headers');
is(sql(q{SELECT count(*) FROM corpus WHERE kind = 'random'
           AND envelope.decrypt(tenant, envelope.encrypt(tenant, plain, context), context) <> plain}),
	0, 'new randomized values under the same keys round-trip');

# The binding holds for every stored value: a changed last byte of the context, a
# context added or dropped, or another tenant is refused as a value that does not
# authenticate (22P03), not for any other reason.
$node->safe_psql('postgres', q{
CREATE FUNCTION refused(t text, v bytea, c text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    PERFORM envelope.decrypt(t, v, c);
    RETURN false;
EXCEPTION WHEN invalid_binary_representation THEN
    RETURN true;
END $$;
});
is(sql(q{SELECT count(*) FROM corpus WHERE context <> '' AND NOT refused(tenant, value,
           left(context, -1) || chr(ascii(right(context, 1)) # 1))}),
	0, 'a context changed in its last byte is refused (short and long contexts)');
is(sql(q{SELECT count(*) FROM corpus WHERE NOT refused(tenant, value,
           CASE WHEN context IS NULL THEN '' ELSE NULL END)}),
	0, 'no context and an empty one are different bindings');
is(sql(q{SELECT count(*) FROM corpus WHERE envelope.key_version(value) = 1
           AND NOT refused(CASE WHEN tenant = 'acme' THEN 'globex' ELSE 'acme' END, value, context)}),
	0, 'another tenant is refused');

$node->stop;
done_testing();
