# EnvelopeLog.pm — what a server log must never hold, for the TAP tests' log scans.
package EnvelopeLog;

use strict;
use warnings;
use MIME::Base64 qw(encode_base64);
use Test::More;
use Exporter 'import';

our @EXPORT_OK = qw(log_lacks_dek);

# Check that $log holds a DEK (given in hex) in none of the forms a mistake would
# write it: raw bytes, hex in either case (bytea's \x output included), base64.
sub log_lacks_dek
{
	my ($log, $dek_hex, $what) = @_;
	die "not a DEK: $dek_hex" unless $dek_hex =~ /^[0-9a-f]{64}$/;
	my $raw = pack('H*', $dek_hex);
	my $b64 = encode_base64($raw, '');
	(my $b64_bare = $b64) =~ s/=+$//;
	ok(index($log, $raw) < 0, "$what: the DEK is not in the log as raw bytes");
	unlike($log, qr/\Q$dek_hex\E/i, "$what: nor in hex");
	ok(index($log, $b64_bare) < 0, "$what: nor in base64");
	# half of it, in case something prints a truncated key
	unlike($log, qr/\Q${\ substr($dek_hex, 0, 32)}\E|\Q${\ substr($dek_hex, 32)}\E/i,
		"$what: nor either half of it in hex");
	return;
}

1;
