# EnvelopeFleet.pm — TAP helpers for the fleet procedures (rotate_keys, reencrypt_all,
# rewrap_keys): a CALL running in the background, and waiting on rotation_progress.
package EnvelopeFleet;

use strict;
use warnings;

use File::Temp;
use IPC::Run;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time sleep);
use Exporter 'import';

our @EXPORT_OK = qw(start_sql finish_sql wait_for);

# Run $sql (statements one after another, as a script) with psql in the background;
# returns a handle for finish_sql.
sub start_sql
{
	my ($node, $sql) = @_;
	my %bg = (out => '', err => '');
	# a file, not a pipe: IPC::Run feeds a pipe only while the caller pumps it
	my ($fh, $file) = File::Temp::tempfile(DIR => PostgreSQL::Test::Utils::tempdir());
	print $fh $sql;
	close($fh);
	$bg{h} = IPC::Run::start(
		[
			$node->installed_command('psql'), '-XAtq', '-v', 'ON_ERROR_STOP=1',
			'-d', $node->connstr('postgres'), '-f', $file
		],
		'<', \undef, '>', \$bg{out}, '2>', \$bg{err});
	return \%bg;
}

# Wait for a background psql; returns (exit code, stdout, stderr).
sub finish_sql
{
	my ($bg) = @_;
	$bg->{h}->finish;
	return ($bg->{h}->result(0), $bg->{out}, $bg->{err});
}

# Poll $sql until it returns 't' (every 20 ms, for at most $timeout seconds); true
# if it did.
sub wait_for
{
	my ($node, $sql, $timeout) = @_;
	my $deadline = time() + ($timeout // $PostgreSQL::Test::Utils::timeout_default);
	while (time() < $deadline)
	{
		my $r = $node->safe_psql('postgres', $sql);
		return 1 if $r eq 't';
		sleep(0.02);
	}
	return 0;
}

1;
