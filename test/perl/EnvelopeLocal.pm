# EnvelopeLocal.pm — TAP helpers for clusters that use the local KMS provider.
package EnvelopeLocal;

use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Exporter 'import';
use File::Basename qw(dirname);
use File::Spec;

our @EXPORT_OK = qw(new_master_key local_node local_dek);

# A fresh random master key in a 0600 file of a temporary directory; returns
# (path, hex of the key).
sub new_master_key
{
	my $dir = PostgreSQL::Test::Utils::tempdir;
	my $file = "$dir/master.key";
	my $hex = join('', map { sprintf('%02x', int(rand(256))) } 1 .. 32);
	open(my $fh, '>', $file) or die "cannot write $file: $!";
	print $fh "$hex\n";
	close($fh);
	chmod(0600, $file) or die "cannot chmod $file: $!";
	return ($file, $hex);
}

# An initialised (not started) cluster named $name with pg_envelope preloaded and the
# local provider pointed at $keyfile; $extra is appended to postgresql.conf.
sub local_node
{
	my ($name, $keyfile, $extra, %init) = @_;
	my $node = PostgreSQL::Test::Cluster->new($name);
	$node->init(%init);
	$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'pg_envelope'
envelope.local_master_key_file = '$keyfile'
} . ($extra // ''));
	return $node;
}

# The DEK (hex) of a tenant's key version in database $db (default postgres),
# unwrapped from the key store with the master key file by test/kms/memory_probe.py.
sub local_dek
{
	my ($node, $keyfile, $tenant, $version, $db) = @_;
	my $python = $ENV{ENVELOPE_PYTHON} || 'python3';
	my $probe = File::Spec->rel2abs(dirname(__FILE__) . '/../kms/memory_probe.py');
	my ($key_id, $wrapped) = split /\|/, $node->safe_psql($db // 'postgres',
		"SELECT kms_key, encode(wrapped_dek, 'hex') FROM envelope.data_key "
		  . "WHERE tenant = '$tenant' AND version = $version");
	my $dek = `$python $probe unwrap $keyfile $key_id '$tenant' $version $wrapped`;
	chomp $dek;
	die "could not unwrap the DEK of $tenant version $version" unless $dek =~ /^[0-9a-f]{64}$/;
	return $dek;
}

1;
