
# EnvelopeKms.pm — moto and the fault proxy for pg_envelope's TAP tests.
#
# Test harness layer.  EnvelopeKms->new starts moto (test/kms/moto_server.py, i.e.
# `python3 -m moto.server` with a parent watchdog) on a free loopback port, waits until
# it answers, then starts test/kms/fault_proxy.py in front of it.  Keys, aliases, IAM
# users and moto's authentication switch go through test/kms/kms_admin.py (boto3).
# Everything started here is stopped by ->stop, by DESTROY and, whatever happens to
# the test, by the END block; the child processes also watch this process and exit
# when it is gone.
#
# $ENV{ENVELOPE_PYTHON} names an interpreter with moto and boto3 (default "python3").  Without
# them the test BAIL_OUTs: it never passes by skipping.
#
#   my $kms = EnvelopeKms->new;
#   my $key = $kms->create_key;               # { KeyId => ..., Arn => ... }
#   $node->append_conf('postgresql.conf', $kms->server_conf(key => $key->{Arn}));
#   $kms->fault(op => 'Decrypt', mode => 'throttle', count => 1);
#   is($kms->count('Decrypt', 'forwarded'), 1);

package EnvelopeKms;

use strict;
use warnings;

use Cwd qw(abs_path);
use File::Basename qw(dirname);
use HTTP::Tiny;
use IPC::Run;
use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time sleep);

my @live;    # instances to stop at END

my $srcdir = abs_path(dirname(__FILE__) . '/../..');

sub srcdir { return $srcdir; }

sub python { return $ENV{ENVELOPE_PYTHON} || 'python3'; }

sub new
{
	my ($class, %opts) = @_;
	my $self = bless { region => $opts{region} // 'us-east-1' }, $class;

	my ($out, $err) = ('', '');
	IPC::Run::run([ python(), '-c', 'import moto.server, boto3' ], '>', \$out, '2>', \$err)
	  or BAIL_OUT("python interpreter '" . python()
		  . "' cannot import moto and boto3 (set ENVELOPE_PYTHON): $err");

	push @live, $self;
	my $logdir = $PostgreSQL::Test::Utils::log_path // $PostgreSQL::Test::Utils::tmp_check;

	# moto
	my $port = PostgreSQL::Test::Cluster::get_free_port();
	$self->{moto_url} = "http://127.0.0.1:$port";
	$self->{moto_log} = "$logdir/moto_$port.log";
	$self->{moto} = IPC::Run::start(
		[
			python(), "$srcdir/test/kms/moto_server.py",
			'--port' => $port, '--parent-pid' => $$, '--lifetime' => 3600
		],
		'<', \undef, '>', $self->{moto_log}, '2>&1');
	my $deadline = time() + 60;
	until ($self->_http_answers($self->{moto_url} . '/moto-api/'))
	{
		BAIL_OUT("moto did not start on port $port; see $self->{moto_log}")
		  if time() > $deadline || !$self->{moto}->pumpable;
		sleep(0.2);
	}

	# fault proxy: prints its port on the first line of stdout
	my $pout = '';
	$self->{proxy_log} = "$logdir/fault_proxy_$port.log";
	$self->{proxy} = IPC::Run::start(
		[
			python(), "$srcdir/test/kms/fault_proxy.py",
			'--upstream' => $self->{moto_url},
			'--parent-pid' => $$, '--lifetime' => 3600
		],
		'<', \undef, '>', \$pout, '2>', $self->{proxy_log});
	$deadline = time() + 30;
	while ($pout !~ /^(\d+)\n/)
	{
		BAIL_OUT("fault proxy did not start; see $self->{proxy_log}")
		  if time() > $deadline;
		$self->{proxy}->pump_nb;
		sleep(0.05);
	}
	$pout =~ /^(\d+)\n/;
	$self->{proxy_url} = "http://127.0.0.1:$1";
	return $self;
}

sub moto_url  { return $_[0]->{moto_url}; }
sub proxy_url { return $_[0]->{proxy_url}; }
sub region    { return $_[0]->{region}; }

sub _http_answers
{
	my ($self, $url) = @_;
	my $r = HTTP::Tiny->new(timeout => 2)->get($url);
	return $r->{status} != 599;
}

# Run kms_admin.py; returns its decoded JSON.  %env adds environment variables
# (credentials once moto checks signatures); by default none are passed.
sub admin
{
	my ($self, $args, %env) = @_;
	my ($out, $err) = ('', '');
	my @cmd = (
		'env', '-u', 'AWS_ACCESS_KEY_ID', '-u', 'AWS_SECRET_ACCESS_KEY',
		'-u', 'AWS_SESSION_TOKEN', '-u', 'AWS_PROFILE',
		map({ "$_=$env{$_}" } sort keys %env),
		python(), "$srcdir/test/kms/kms_admin.py",
		'--endpoint' => $self->{moto_url}, '--region' => $self->{region},
		@$args);
	my $ok = IPC::Run::run(\@cmd, '<', \undef, '>', \$out, '2>', \$err,
		IPC::Run::timeout(60));
	die "kms_admin.py @$args failed: $err" unless $ok;
	return decode_json($out);
}

# create_key(multi_region => 1, region => 'eu-west-1'): both optional; the region
# defaults to the instance's.
sub create_key
{
	my ($self, %o) = @_;
	local $self->{region} = $o{region} if defined $o{region};
	return $self->admin([ 'create-key', $o{multi_region} ? ('--multi-region') : () ]);
}

# The replica of multi-Region key $key (id or ARN) in $region, made from the key's own
# region $from (default the instance's): { KeyId, Arn }.
sub replicate_key
{
	my ($self, $key, $region, %o) = @_;
	local $self->{region} = $o{from} if defined $o{from};
	return $self->admin([ 'replicate-key', $key, $region ]);
}
sub create_keys  { my ($self, $n) = @_; return $self->admin([ 'create-keys', $n ]); }
sub create_alias { my ($self, $alias, $key_id) = @_; return $self->admin([ 'create-alias', $alias, $key_id ]); }
sub disable_key  { my ($self, $key_id) = @_; return $self->admin([ 'disable-key', $key_id ]); }
sub enable_key   { my ($self, $key_id) = @_; return $self->admin([ 'enable-key', $key_id ]); }

# The DEK (hex) of a tenant's key version, unwrapped by moto from the key store of
# database postgres.  Ask while moto's authentication is off.
sub dek_of
{
	my ($self, $node, $tenant, $version) = @_;
	my $wrapped = $node->safe_psql('postgres',
		"SELECT encode(wrapped_dek, 'hex') FROM envelope.data_key WHERE tenant = '$tenant' AND version = $version");
	die "no wrapped key of $tenant version $version" unless $wrapped =~ /^[0-9a-f]+$/;
	return $self->admin([ 'unwrap', $wrapped, $tenant, $version ])->{Plaintext};
}

# An IAM user allowed kms:* and sts:*: { AccessKeyId, SecretAccessKey, Arn }.
sub create_user { my ($self, $name) = @_; return $self->admin([ 'create-user', $name ]); }
sub create_role { my ($self, $name) = @_; return $self->admin([ 'create-role', $name ]); }

# Switch moto's SigV4/IAM checking.  Turning it off while on needs known credentials.
sub auth
{
	my ($self, $on, %env) = @_;
	return $self->admin([ 'auth', $on ? 'on' : 'off' ], %env);
}

# Settings for postgresql.conf that point the aws provider at the proxy (or, with
# direct => 1, at moto itself), in the instance's region unless region => is given.
sub server_conf
{
	my ($self, %o) = @_;
	my $endpoint = $o{direct} ? $self->{moto_url} : $self->{proxy_url};
	my $region = $o{region} // $self->{region};
	my $conf = "envelope.kms_provider = 'aws'\n"
	  . "envelope.aws_region = '$region'\n"
	  . "envelope.aws_endpoint = '$endpoint'\n";
	$conf .= "envelope.kms_key = '$o{key}'\n" if defined $o{key};
	$conf .= "envelope.kms_timeout = $o{timeout}\n" if defined $o{timeout};
	$conf .= "envelope.kms_retries = $o{retries}\n" if defined $o{retries};
	return $conf;
}

# A started cluster with pg_envelope preloaded, configured for the aws provider
# (server_conf's options), and the extension created in database postgres.
# allows_streaming => 1 makes it ready for a streaming standby.
sub init_node
{
	my ($self, $name, %o) = @_;
	my $node = PostgreSQL::Test::Cluster->new($name);
	$node->init(allows_streaming => $o{allows_streaming} ? 1 : 0);
	$node->append_conf('postgresql.conf',
		"shared_preload_libraries = 'pg_envelope'\n" . $self->server_conf(%o)
		  . ($o{extra_conf} // ''));
	$node->start;
	$node->safe_psql('postgres', 'CREATE EXTENSION pg_envelope');
	return $node;
}

# Run SQL that should fail; returns (SQLSTATE, stderr).  psql prints the SQLSTATE
# with VERBOSITY verbose.
sub psql_error
{
	my ($node, $sql, %o) = @_;
	my ($out, $err) = ('', '');
	my $ret = $node->psql('postgres', "\\set VERBOSITY verbose\n$sql",
		stdout => \$out, stderr => \$err, %o);
	return ('00000', $err) if $ret == 0;
	my ($state) = $err =~ /ERROR:\s+([0-9A-Z]{5}):/;
	return ($state // '', $err);
}

sub _control
{
	my ($self, $method, $path, $body) = @_;
	my $http = HTTP::Tiny->new(timeout => 10);
	my $r = $http->request($method, $self->{proxy_url} . $path,
		defined $body ? { content => encode_json($body), headers => { 'Content-Type' => 'application/json' } } : {});
	die "fault proxy $method $path: $r->{status} $r->{content}" unless $r->{success};
	return decode_json($r->{content});
}

# fault(op => 'Decrypt' | '*', mode => 'throttle' | ..., count => N (-1: always))
sub fault
{
	my ($self, %rule) = @_;
	$rule{op} //= '*';
	$rule{count} //= 1;
	return $self->_control('POST', '/_fault', \%rule);
}

sub reset_proxy { my ($self) = @_; return $self->_control('POST', '/_reset', {}); }

# Let hung and held requests go (a held one is forwarded now); rules and counts stay.
sub release { my ($self) = @_; return $self->_control('POST', '/_release', {}); }
sub counts      { my ($self) = @_; return $self->_control('GET', '/_counts'); }

# Requests the proxy saw for an operation: what = requests | forwarded | faulted.
sub count
{
	my ($self, $op, $what) = @_;
	my $c = $self->counts->{ops}{$op};
	return $c ? $c->{ $what // 'requests' } : 0;
}

# Every KMS request the proxy saw since the last reset, in arrival order:
# [ [ seconds (monotonic), op, 'forwarded' or the fault's mode ], ... ].
sub arrivals { my ($self) = @_; return $self->_control('GET', '/_arrivals')->{arrivals}; }

# Requests signed with an access key id (any op), and requests with a session token.
sub signed_by { my ($self, $akid) = @_; return $self->counts->{access_keys}{$akid} // 0; }
sub session_tokens { my ($self) = @_; return $self->counts->{session_tokens}; }

# Access key ids that signed requests since the last reset.
sub signers { my ($self) = @_; return sort keys %{ $self->counts->{access_keys} }; }

# Start test/kms/credential_stub.py (IMDSv2, ECS and STS stand-ins); returns its URL.
# Stopped with the rest.
sub start_credential_stub
{
	my ($self, %o) = @_;
	my $out = '';
	$self->{stub} = IPC::Run::start(
		[
			python(), "$srcdir/test/kms/credential_stub.py", '--lifetime' => 900,
			map { ("--$_" => $o{$_}) } sort keys %o
		],
		'<', \undef, '>', \$out, '2>', "$self->{proxy_log}.stub");
	my $deadline = time() + 30;
	while ($out !~ /^(\d+)\n/)
	{
		BAIL_OUT("credential stub did not start") if time() > $deadline;
		$self->{stub}->pump_nb;
		sleep(0.05);
	}
	$out =~ /^(\d+)\n/;
	$self->{stub_url} = "http://127.0.0.1:$1";
	return $self->{stub_url};
}

sub stub_counts
{
	my ($self) = @_;
	my $r = HTTP::Tiny->new(timeout => 10)->get("$self->{stub_url}/_counts");
	die "credential stub: $r->{status}" unless $r->{success};
	return decode_json($r->{content});
}

sub stop
{
	my ($self) = @_;
	for my $h (qw(stub proxy moto))
	{
		next unless $self->{$h};
		# TERM, then KILL after the grace period; either way the child is reaped
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
