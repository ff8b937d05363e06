
# EnvelopeKmip.pm — a PyKMIP server, its certificates and a raw TCP fault proxy for
# pg_envelope's KMIP TAP tests.
#
# Test harness layer.  EnvelopeKmip->new makes a throwaway PKI with openssl (a CA; a
# server certificate for 127.0.0.1 and localhost; a client certificate; a server
# certificate for another host; a second CA with a client certificate of its own),
# starts `pykmip-server -f CONF` (Debian's python3-pykmip) on a free loopback port with
# TLS 1.2 and client authentication, and test/kms/tcp_fault_proxy.py in front of it.
# Keys are made, revoked and destroyed through test/kms/kmip_admin.py.  Everything
# started here is stopped by ->stop, DESTROY and the END block; the server runs under
# `timeout`, the proxy watches this process, so nothing outlives a crashed test.
#
# $ENV{ENVELOPE_KMIP_PYTHON} names an interpreter with PyKMIP (default /usr/bin/python3).
# Without pykmip-server or PyKMIP the test BAIL_OUTs: it never passes by skipping.
#
#   my $kmip = EnvelopeKmip->new;
#   my $uid = $kmip->create_key;
#   $node->append_conf('postgresql.conf', $kmip->server_conf(key => $uid));
#   $kmip->proxy('hang');  ...  $kmip->proxy('forward');

package EnvelopeKmip;

use strict;
use warnings;

use Cwd qw(abs_path);
use File::Basename qw(dirname);
use File::Path qw(make_path);
use IO::Socket::INET;
use IPC::Run;
use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time sleep);

my @live;

my $srcdir = abs_path(dirname(__FILE__) . '/../..');

sub python { return $ENV{ENVELOPE_KMIP_PYTHON} || '/usr/bin/python3'; }

sub _run
{
	my (@cmd) = @_;
	my ($out, $err) = ('', '');
	IPC::Run::run(\@cmd, '<', \undef, '>', \$out, '2>', \$err, IPC::Run::timeout(120))
	  or die "@cmd failed: $err";
	return $out;
}

# A key and a certificate signed by $ca (or self-signed when $ca is undef).
sub _make_cert
{
	my ($dir, $name, $cn, $ca, %ext) = @_;
	my $key = "$dir/$name.key";
	my $crt = "$dir/$name.crt";
	my $extfile = "$dir/$name.ext";
	open(my $fh, '>', $extfile) or die;
	print $fh join("\n", map { "$_ = $ext{$_}" } sort keys %ext), "\n";
	close $fh;
	_run('openssl', 'req', '-new', '-newkey', 'rsa:2048', '-nodes', '-keyout', $key,
		'-subj', "/CN=$cn", '-out', "$dir/$name.csr");
	if ($ca)
	{
		_run('openssl', 'x509', '-req', '-in', "$dir/$name.csr", '-CA', "$dir/$ca.crt",
			'-CAkey', "$dir/$ca.key", '-CAcreateserial', '-days', '2', '-sha256',
			'-extfile', $extfile, '-out', $crt);
	}
	else
	{
		_run('openssl', 'x509', '-req', '-in', "$dir/$name.csr", '-signkey', $key,
			'-days', '2', '-sha256', '-extfile', $extfile, '-out', $crt);
	}
	chmod 0600, $key;
	return ($crt, $key);
}

sub _make_pki
{
	my ($self) = @_;
	my $d = $self->{dir};
	_make_cert($d, 'ca', 'pg_envelope test CA', undef,
		basicConstraints => 'critical,CA:TRUE', keyUsage => 'critical,keyCertSign,cRLSign');
	_make_cert($d, 'server', 'localhost', 'ca',
		subjectAltName => 'IP:127.0.0.1,DNS:localhost', extendedKeyUsage => 'serverAuth');
	_make_cert($d, 'other_server', 'kmip.other.example', 'ca',
		subjectAltName => 'DNS:kmip.other.example', extendedKeyUsage => 'serverAuth');
	_make_cert($d, 'client', 'pg_envelope', 'ca', extendedKeyUsage => 'clientAuth');
	_make_cert($d, 'rogue_ca', 'another CA', undef,
		basicConstraints => 'critical,CA:TRUE', keyUsage => 'critical,keyCertSign,cRLSign');
	_make_cert($d, 'rogue_client', 'pg_envelope', 'rogue_ca', extendedKeyUsage => 'clientAuth');
	return;
}

# Start a pykmip-server with server certificate $cert; returns its port.
sub _start_server
{
	my ($self, $name, $cert) = @_;
	my $d = $self->{dir};
	my $port = PostgreSQL::Test::Cluster::get_free_port();
	make_path("$d/policies_$name");
	my $conf = "$d/$name.conf";
	open(my $fh, '>', $conf) or die;
	print $fh <<"EOF";
[server]
hostname=127.0.0.1
port=$port
certificate_path=$d/$cert.crt
key_path=$d/$cert.key
ca_path=$d/ca.crt
auth_suite=TLS1.2
policy_path=$d/policies_$name
enable_tls_client_auth=True
logging_level=DEBUG
database_path=$d/$name.db
EOF
	close $fh;
	my $log = "$self->{logdir}/pykmip_${name}_$port.log";
	$self->{"server_$name"} = IPC::Run::start(
		[ 'timeout', '3600', 'pykmip-server', '-f', $conf, '-l', $log ],
		'<', \undef, '>', "$log.out", '2>&1');
	my $deadline = time() + 60;
	while (1)
	{
		my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port, Timeout => 1);
		if ($s) { close $s; last; }
		BAIL_OUT("pykmip-server did not start on port $port; see $log and $log.out")
		  if time() > $deadline || !$self->{"server_$name"}->pumpable;
		sleep(0.2);
	}
	return $port;
}

sub new
{
	my ($class) = @_;
	my $self = bless {}, $class;

	my ($out, $err) = ('', '');
	IPC::Run::run([ 'sh', '-c', 'command -v pykmip-server' ], '>', \$out, '2>', \$err)
	  or BAIL_OUT('pykmip-server is not installed (apt-get install python3-pykmip; test/install_deps.sh does it)');
	IPC::Run::run([ python(), '-c', 'import kmip.pie.client' ], '>', \$out, '2>', \$err)
	  or BAIL_OUT("interpreter '" . python() . "' cannot import PyKMIP (set ENVELOPE_KMIP_PYTHON): $err");

	push @live, $self;
	$self->{logdir} = $PostgreSQL::Test::Utils::log_path // $PostgreSQL::Test::Utils::tmp_check;
	# outside any data directory; the private keys are 0600
	$self->{dir} = PostgreSQL::Test::Utils::tempdir('kmip_pki');
	$self->_make_pki;

	$self->{port} = $self->_start_server('main', 'server');

	my $pout = '';
	$self->{proxy} = IPC::Run::start(
		[
			python(), "$srcdir/test/kms/tcp_fault_proxy.py",
			'--upstream' => "127.0.0.1:$self->{port}",
			'--parent-pid' => $$, '--lifetime' => 3600
		],
		'<', \undef, '>', \$pout, '2>', "$self->{logdir}/tcp_fault_proxy_$self->{port}.log");
	my $deadline = time() + 30;
	while ($pout !~ /^(\d+)\n(\d+)\n/)
	{
		BAIL_OUT('tcp fault proxy did not start') if time() > $deadline;
		$self->{proxy}->pump_nb;
		sleep(0.05);
	}
	$pout =~ /^(\d+)\n(\d+)\n/;
	($self->{proxy_port}, $self->{control_port}) = ($1, $2);
	return $self;
}

sub dir        { return $_[0]->{dir}; }
sub port       { return $_[0]->{port}; }
sub proxy_port { return $_[0]->{proxy_port}; }

# A second server whose certificate names another host (kmip.other.example).
sub start_other_host_server
{
	my ($self) = @_;
	return $self->{other_port} //= $self->_start_server('other', 'other_server');
}

sub admin
{
	my ($self, @args) = @_;
	my $d = $self->{dir};
	my $out = _run(python(), "$srcdir/test/kms/kmip_admin.py",
		'--host' => '127.0.0.1', '--port' => $self->{port},
		'--ca' => "$d/ca.crt", '--cert' => "$d/client.crt", '--key' => "$d/client.key", @args);
	return decode_json($out);
}

sub create_key { my ($self) = @_; return $self->admin('create')->{uid}; }
sub revoke_key { my ($self, $uid) = @_; return $self->admin('revoke', $uid); }
sub compromise_key { my ($self, $uid) = @_; return $self->admin('compromise', $uid); }
sub destroy_key { my ($self, $uid) = @_; return $self->admin('destroy', $uid); }
sub key_state { my ($self, $uid) = @_; return $self->admin('state', $uid)->{state}; }

# One control command to the TCP proxy; returns its answer without "ok ".
sub proxy
{
	my ($self, @words) = @_;
	my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $self->{control_port},
		Timeout => 10) or die "tcp fault proxy control: $!";
	print $s join(' ', @words), "\n";
	my $line = <$s>;
	close $s;
	die "tcp fault proxy: " . ($line // 'no answer') unless defined $line && $line =~ /^ok ?(.*)/;
	return $1;
}

sub proxy_mode { my ($self, $mode) = @_; return $self->proxy('mode', $mode); }

# TCP connections the proxy has accepted (since the last zero).
sub connections { my ($self) = @_; my ($n) = split ' ', $self->proxy('count'); return $n; }

# postgresql.conf lines for the kmip provider.  Options: key, port (default: the
# proxy's), host, cert/keyfile/ca (file names in dir()), timeout, retries.
sub server_conf
{
	my ($self, %o) = @_;
	my $d = $self->{dir};
	my $conf = "envelope.kms_provider = 'kmip'\n"
	  . "envelope.kmip_host = '" . ($o{host} // '127.0.0.1') . "'\n"
	  . "envelope.kmip_port = " . ($o{port} // $self->{proxy_port}) . "\n"
	  . "envelope.kmip_ca_file = '$d/" . ($o{ca} // 'ca.crt') . "'\n"
	  . "envelope.kmip_cert_file = '$d/" . ($o{cert} // 'client.crt') . "'\n"
	  . "envelope.kmip_key_file = '$d/" . ($o{keyfile} // 'client.key') . "'\n";
	$conf .= "envelope.kms_key = '$o{key}'\n" if defined $o{key};
	$conf .= "envelope.kms_timeout = $o{timeout}\n" if defined $o{timeout};
	$conf .= "envelope.kms_retries = $o{retries}\n" if defined $o{retries};
	return $conf;
}

sub stop
{
	my ($self) = @_;
	for my $h (qw(proxy server_other server_main))
	{
		next unless $self->{$h};
		eval { $self->{$h}->kill_kill(grace => 3) };
		delete $self->{$h};
	}
	@live = grep { $_ != $self } @live;
	return;
}

sub DESTROY { my ($self) = @_; local ($@, $?); $self->stop; }

END
{
	local $?;
	$_->stop for @live;
}

1;
