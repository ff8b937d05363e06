/*
 * test_kms_aws.c — the aws KMS provider against moto, directly and through the
 * fault-injecting proxy.
 *
 * Layer: pure-C unit test (no server).  It starts moto (`python3 -m moto.server`) and
 * test/kms/fault_proxy.py on loopback, creates keys with test/kms/kms_admin.py, and
 * drives kms_aws_provider: round trips by key ARN, key id and alias, encryption-context
 * binding, ReEncrypt, tenant names that need JSON escaping, KMS errors, every proxy
 * fault with its retry count, cancellation, timeouts, and SigV4 with moto's request
 * authentication switched on.  Credentials come from the environment, through the
 * real credential chain.
 *
 * ENVELOPE_PYTHON names the interpreter that has moto and boto3 (default python3; not
 * PYTHON, which PGXS sets to its own interpreter for everything make runs); without
 * them this test fails: it never passes by skipping.  ENVELOPE_SRCDIR is the source
 * root (default ".", which is where `make unit` runs).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <dirent.h>
#include <fcntl.h>
#include <malloc.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <json-c/json.h>

#include "aws_credentials.h"
#include "http.h"
#include "kms.h"
#include "kms_aws.h"
#include "unit.h"

extern const KmsProvider kms_aws_provider;

static const KmsProvider *aws = &kms_aws_provider;

static pid_t moto_pid = 0;
static pid_t proxy_pid = 0;
static char moto_url[64];
static char proxy_url[64];
static const char *python;
static const char *srcdir;

/* ---------------------------------------------------------------------------
 * Harness
 */

static double
now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void
stop_children(void)
{
	pid_t		pids[2] = {proxy_pid, moto_pid};

	for (int i = 0; i < 2; i++)
	{
		if (pids[i] <= 0)
			continue;
		kill(pids[i], SIGTERM);
		for (int j = 0; j < 50; j++)
		{
			if (waitpid(pids[i], NULL, WNOHANG) != 0)
				break;
			usleep(100000);
		}
		kill(pids[i], SIGKILL);
		waitpid(pids[i], NULL, 0);
	}
	proxy_pid = moto_pid = 0;
}

static void
die(const char *what)
{
	fprintf(stderr, "FAIL test_kms_aws: %s\n", what);
	stop_children();
	exit(1);
}

static int
free_port(void)
{
	struct sockaddr_in sa;
	socklen_t	len = sizeof(sa);
	int			fd = socket(AF_INET, SOCK_STREAM, 0);
	int			port;

	memset(&sa, 0, sizeof(sa));
	sa.sin_family = AF_INET;
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (fd < 0 || bind(fd, (struct sockaddr *) &sa, sizeof(sa)) != 0 ||
		getsockname(fd, (struct sockaddr *) &sa, &len) != 0)
		die("no free port");
	port = ntohs(sa.sin_port);
	close(fd);
	return port;
}

/* fork+exec argv with stdout to a pipe (returned in *outfd when non-NULL). */
static pid_t
spawn(char *const argv[], int *outfd)
{
	int			p[2];
	pid_t		pid;

	if (pipe(p) != 0)
		die("pipe");
	pid = fork();
	if (pid < 0)
		die("fork");
	if (pid == 0)
	{
		int			devnull = open("/dev/null", 1);

		/* die with the test, even if it crashes */
		prctl(PR_SET_PDEATHSIG, SIGTERM);
		dup2(outfd ? p[1] : devnull, 1);
		if (getenv("ENVELOPE_TEST_VERBOSE") == NULL)
			dup2(devnull, 2);
		close(p[0]);
		close(p[1]);
		execvp(argv[0], argv);
		_exit(127);
	}
	close(p[1]);
	if (outfd)
		*outfd = p[0];
	else
		close(p[0]);
	return pid;
}

static bool
http_get_ok(const char *url)
{
	HttpRequest req = {.method = "GET", .url = url, .timeout_ms = 1000,
	.max_response = 1 << 20};
	HttpResponse resp = {0};
	char		errbuf[128];
	HttpStatus	st = http_perform(&req, &resp, errbuf, sizeof(errbuf));
	bool		ok = st == HTTP_OK && resp.status > 0;

	http_response_free(&resp);
	return ok;
}

static void
start_services(void)
{
	char		port[16];
	char		ppid[16];
	char		proxy_script[512];
	char		line[64] = {0};
	int			fd;
	ssize_t		n = 0;
	double		deadline;

	snprintf(port, sizeof(port), "%d", free_port());
	snprintf(moto_url, sizeof(moto_url), "http://127.0.0.1:%s", port);
	{
		char	   *argv[] = {(char *) python, "-m", "moto.server", "-H", "127.0.0.1",
		"-p", port, NULL};

		moto_pid = spawn(argv, NULL);
	}
	deadline = now_s() + 30;
	while (!http_get_ok(moto_url))
	{
		if (now_s() > deadline || waitpid(moto_pid, NULL, WNOHANG) != 0)
			die("moto did not start (does $ENVELOPE_PYTHON have moto?)");
		usleep(200000);
	}

	snprintf(proxy_script, sizeof(proxy_script), "%s/test/kms/fault_proxy.py", srcdir);
	snprintf(ppid, sizeof(ppid), "%d", (int) getpid());
	{
		char	   *argv[] = {(char *) python, proxy_script, "--upstream", moto_url,
		"--parent-pid", ppid, "--lifetime", "600", NULL};

		proxy_pid = spawn(argv, &fd);
	}
	deadline = now_s() + 20;
	while (n < (ssize_t) sizeof(line) - 1 && strchr(line, '\n') == NULL && now_s() < deadline)
	{
		ssize_t		r = read(fd, line + n, sizeof(line) - 1 - n);

		if (r <= 0)
			break;
		n += r;
	}
	close(fd);
	if (atoi(line) <= 0)
		die("fault proxy did not start");
	snprintf(proxy_url, sizeof(proxy_url), "http://127.0.0.1:%d", atoi(line));
}

/* Run kms_admin.py against moto; returns the parsed JSON output (or dies). */
static json_object *admin(const char *fmt,...) __attribute__((format(printf, 1, 2)));

static json_object *
admin(const char *fmt,...)
{
	char		args[1024];
	char		cmd[2048];
	char		out[8192];
	size_t		n;
	FILE	   *f;
	va_list		ap;
	json_object *obj;

	va_start(ap, fmt);
	vsnprintf(args, sizeof(args), fmt, ap);
	va_end(ap);
	snprintf(cmd, sizeof(cmd),
			 "env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY -u AWS_SESSION_TOKEN "
			 "%s %s/test/kms/kms_admin.py --endpoint %s %s",
			 python, srcdir, moto_url, args);
	f = popen(cmd, "r");
	if (f == NULL)
		die("popen kms_admin.py");
	n = fread(out, 1, sizeof(out) - 1, f);
	out[n] = '\0';
	if (pclose(f) != 0)
	{
		fprintf(stderr, "kms_admin.py %s failed\n", args);
		die("kms_admin.py");
	}
	obj = json_tokener_parse(out);
	if (obj == NULL)
		die("kms_admin.py printed no JSON");
	return obj;
}

/* Admin command with explicit credentials (auth on). */
static json_object *
admin_as(const char *akid, const char *secret, const char *args)
{
	char		cmd[1024];
	char		out[8192];
	size_t		n;
	FILE	   *f;
	json_object *obj;

	snprintf(cmd, sizeof(cmd),
			 "AWS_ACCESS_KEY_ID='%s' AWS_SECRET_ACCESS_KEY='%s' %s %s/test/kms/kms_admin.py --endpoint %s %s",
			 akid, secret, python, srcdir, moto_url, args);
	f = popen(cmd, "r");
	if (f == NULL)
		die("popen kms_admin.py");
	n = fread(out, 1, sizeof(out) - 1, f);
	out[n] = '\0';
	if (pclose(f) != 0)
		die("kms_admin.py (with credentials)");
	obj = json_tokener_parse(out);
	if (obj == NULL)
		die("kms_admin.py printed no JSON");
	return obj;
}

static const char *
jstr(json_object *o, const char *key)
{
	json_object *v;

	if (!json_object_object_get_ex(o, key, &v))
		die("missing key in kms_admin.py output");
	return json_object_get_string(v);
}

/* POST body to the proxy's control path; GET when body is NULL.  Returns the JSON. */
static json_object *
proxy_ctl(const char *path, const char *body)
{
	char		url[128];
	HttpRequest req = {0};
	HttpResponse resp = {0};
	char		errbuf[128];
	json_object *obj = NULL;

	snprintf(url, sizeof(url), "%s%s", proxy_url, path);
	req.method = body ? "POST" : "GET";
	req.url = url;
	req.body = body;
	req.body_len = body ? strlen(body) : 0;
	req.timeout_ms = 5000;
	req.max_response = 1 << 20;
	if (http_perform(&req, &resp, errbuf, sizeof(errbuf)) != HTTP_OK || resp.status != 200)
		die("proxy control request failed");
	obj = json_tokener_parse(resp.body);
	http_response_free(&resp);
	if (obj == NULL)
		die("proxy control answer is not JSON");
	return obj;
}

static void
proxy_reset(void)
{
	json_object_put(proxy_ctl("/_reset", "{}"));
}

static void
proxy_fault(const char *op, const char *mode, int count)
{
	char		body[256];

	snprintf(body, sizeof(body), "{\"op\": \"%s\", \"mode\": \"%s\", \"count\": %d}",
			 op, mode, count);
	json_object_put(proxy_ctl("/_fault", body));
}

/* requests seen by the proxy for op: what = "requests" | "forwarded" | "faulted" */
static int
proxy_count(const char *op, const char *what)
{
	json_object *c = proxy_ctl("/_counts", NULL);
	json_object *ops,
			   *o,
			   *v;
	int			n = 0;

	if (json_object_object_get_ex(c, "ops", &ops) &&
		json_object_object_get_ex(ops, op, &o) &&
		json_object_object_get_ex(o, what, &v))
		n = json_object_get_int(v);
	json_object_put(c);
	return n;
}

/* ---------------------------------------------------------------------------
 * Provider helpers
 */

static KmsConfig
cfg_for(const char *endpoint, int retries, int timeout_ms)
{
	KmsConfig	cfg = {0};

	cfg.aws_region = "us-east-1";
	cfg.aws_endpoint = endpoint;
	cfg.retries = retries;
	cfg.timeout_ms = timeout_ms;
	return cfg;
}

static bool
all_zero(const uint8_t *p, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (p[i])
			return false;
	return true;
}

typedef struct Dek
{
	uint8_t		dek[KMS_DEK_LEN];
	uint8_t		wrapped[KMS_WRAPPED_MAX];
	size_t		wrapped_len;
	char		arn[KMS_KEY_ID_MAX];
} Dek;

static KmsStatus
gen(const KmsConfig *cfg, const char *key, const char *tenant, uint32_t version,
	Dek *d, KmsError *err)
{
	KmsEncryptionContext ec = {tenant, version};

	memset(d, 0, sizeof(*d));
	return aws->generate_data_key(cfg, key, &ec, d->dek, d->wrapped, &d->wrapped_len,
								  d->arn, err);
}

static KmsStatus
dec(const KmsConfig *cfg, const char *key, const char *tenant, uint32_t version,
	const Dek *d, uint8_t out[KMS_DEK_LEN], KmsError *err)
{
	KmsEncryptionContext ec = {tenant, version};

	memset(out, 0, KMS_DEK_LEN);
	return aws->decrypt(cfg, key, &ec, d->wrapped, d->wrapped_len, out, err);
}

/* Decrypt through cfg and check status, attempts and (on success) the key. */
#define EXPECT_DEC(cfg, key, d, want_st, want_attempts) \
	do { \
		uint8_t		out_[KMS_DEK_LEN]; \
		KmsError	e_; \
		KmsStatus	st_ = dec(cfg, key, "acme", 1, d, out_, &e_); \
		CHECK(st_ == (want_st), "line %d: status %s, want %s (%s)", __LINE__, \
			  kms_status_name(st_), kms_status_name(want_st), e_.message); \
		CHECK(e_.attempts == (want_attempts), "line %d: %d attempts, want %d (%s)", \
			  __LINE__, e_.attempts, want_attempts, e_.message); \
		if ((want_st) == KMS_OK) \
			CHECK(memcmp(out_, (d)->dek, KMS_DEK_LEN) == 0, "line %d: wrong DEK", __LINE__); \
		else \
			CHECK(all_zero(out_, KMS_DEK_LEN), "line %d: DEK output not wiped", __LINE__); \
	} while (0)

/* ---------------------------------------------------------------------------
 * Tests
 */

static void
test_config_errors(void)
{
	KmsConfig	cfg = cfg_for(moto_url, 0, 2000);
	Dek			d;
	KmsError	err;

	cfg.aws_region = "";
	CHECK(gen(&cfg, "alias/x", "acme", 1, &d, &err) == KMS_ERR_CONFIG &&
		  err.attempts == 0 && strstr(err.message, "aws_region") != NULL,
		  "empty region: %s", err.message);
	cfg.aws_region = "us-east-1/../x";
	CHECK(gen(&cfg, "alias/x", "acme", 1, &d, &err) == KMS_ERR_CONFIG,
		  "bad region: %s", err.message);
	cfg = cfg_for("ftp://127.0.0.1:1", 0, 2000);
	CHECK(gen(&cfg, "alias/x", "acme", 1, &d, &err) == KMS_ERR_CONFIG,
		  "bad scheme: %s", err.message);
	cfg = cfg_for("http://user@127.0.0.1:1", 0, 2000);
	CHECK(gen(&cfg, "alias/x", "acme", 1, &d, &err) == KMS_ERR_CONFIG,
		  "userinfo: %s", err.message);
	cfg = cfg_for(moto_url, 0, 2000);
	CHECK(gen(&cfg, "", "acme", 1, &d, &err) == KMS_ERR_CONFIG, "empty key: %s", err.message);
	CHECK(gen(&cfg, "alias/x\ny", "acme", 1, &d, &err) == KMS_ERR_CONFIG &&
		  err.attempts == 0, "key id with a line break: %s", err.message);
	CHECK(gen(&cfg, "alias/caf\xc3\xa9", "acme", 1, &d, &err) == KMS_ERR_CONFIG &&
		  err.attempts == 0, "non-ASCII key id: %s", err.message);

	/*
	 * The encryption context is JSON, so UTF-8: a tenant name in any other encoding is
	 * refused before a request is made, by every operation, rather than sent as bytes
	 * a KMS might read as U+FFFD (and so confuse with another tenant).
	 */
	{
		const char *const bad[] = {
			"\xff",				/* never in UTF-8 */
			"caf\xe9",			/* Latin-1 */
			"\xc3",				/* truncated sequence */
			"\xc0\xaf",			/* overlong "/" */
			"\xe0\x80\xaf",		/* overlong "/" */
			"\xed\xa0\x80",		/* surrogate U+D800 */
			"\xf4\x90\x80\x80",	/* above U+10FFFF */
			("\x80" "abc"),		/* continuation byte first */
		};
		uint8_t		out[KMS_DEK_LEN];
		uint8_t		blob[64] = {1};
		uint8_t		nw[KMS_WRAPPED_MAX];
		size_t		nwlen;
		char		arn[KMS_KEY_ID_MAX];

		for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		{
			KmsEncryptionContext ec = {bad[i], 1};

			CHECK(gen(&cfg, "alias/x", bad[i], 1, &d, &err) == KMS_ERR_INTERNAL &&
				  err.attempts == 0 && strstr(err.message, "UTF-8") != NULL &&
				  all_zero(d.dek, KMS_DEK_LEN),
				  "GenerateDataKey, bad tenant %zu: %s", i, err.message);
			memset(out, 0, sizeof(out));
			CHECK(aws->decrypt(&cfg, "alias/x", &ec, blob, sizeof(blob), out, &err) ==
				  KMS_ERR_INTERNAL && err.attempts == 0,
				  "Decrypt, bad tenant %zu: %s", i, err.message);
			CHECK(aws->reencrypt(&cfg, "alias/x", "alias/y", &ec, blob, sizeof(blob),
								 nw, &nwlen, arn, &err) == KMS_ERR_INTERNAL &&
				  err.attempts == 0,
				  "ReEncrypt, bad tenant %zu: %s", i, err.message);
		}
	}

	/*
	 * A single-Region key, or an alias ARN, of another region than envelope.aws_region
	 * has no replica here: refused before any request, by every operation, naming
	 * both regions.  (Multi-Region keys are rewritten to the configured region; the
	 * round trip through a replica is test/tap/029_aws_multi_region.pl.)
	 */
	{
		const char *other = "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab";
		const char *other_alias = "arn:aws:kms:eu-west-1:123456789012:alias/pg";
		KmsEncryptionContext ec = {"acme", 1};
		uint8_t		out[KMS_DEK_LEN];
		uint8_t		blob[64] = {1};
		uint8_t		nw[KMS_WRAPPED_MAX];
		size_t		nwlen;
		char		arn[KMS_KEY_ID_MAX];

		cfg = cfg_for(moto_url, 0, 2000);
		CHECK(gen(&cfg, other, "acme", 1, &d, &err) == KMS_ERR_WRONG_REGION &&
			  err.attempts == 0 && strstr(err.message, "single-Region") != NULL &&
			  strstr(err.message, "eu-west-1") != NULL && strstr(err.message, "us-east-1") != NULL,
			  "GenerateDataKey, single-Region key of another region: %s", err.message);
		memset(out, 0x5a, sizeof(out));
		CHECK(aws->decrypt(&cfg, other, &ec, blob, sizeof(blob), out, &err) ==
			  KMS_ERR_WRONG_REGION && err.attempts == 0 && all_zero(out, sizeof(out)),
			  "Decrypt, single-Region key of another region: %s", err.message);
		CHECK(aws->reencrypt(&cfg, other, "alias/y", &ec, blob, sizeof(blob),
							 nw, &nwlen, arn, &err) == KMS_ERR_WRONG_REGION &&
			  err.attempts == 0, "ReEncrypt from another region: %s", err.message);
		CHECK(aws->reencrypt(&cfg, "alias/y", other, &ec, blob, sizeof(blob),
							 nw, &nwlen, arn, &err) == KMS_ERR_WRONG_REGION &&
			  err.attempts == 0, "ReEncrypt to another region: %s", err.message);
		CHECK(gen(&cfg, other_alias, "acme", 1, &d, &err) == KMS_ERR_WRONG_REGION &&
			  err.attempts == 0 && strstr(err.message, "alias") != NULL,
			  "alias ARN of another region: %s", err.message);
	}
}

static void
test_round_trips(const char *arn, const char *key_id, const char *alias,
				 const char *alias_arn, const char *arn2)
{
	KmsConfig	cfg = cfg_for(moto_url, 0, 5000);
	Dek			d,
				d2;
	KmsError	err;
	uint8_t		out[KMS_DEK_LEN];
	KmsEncryptionContext ec = {"acme", 1};
	const char *const keys[] = {arn, key_id, alias, alias_arn};

	for (int i = 0; i < 4; i++)
	{
		KmsStatus	st = gen(&cfg, keys[i], "acme", 1, &d, &err);

		CHECK(st == KMS_OK, "GenerateDataKey via %s: %s", keys[i], err.message);
		if (st != KMS_OK)
			continue;
		CHECK(err.attempts == 1, "one request, not %d", err.attempts);
		CHECK(strcmp(d.arn, arn) == 0, "key_arn recorded is %s", d.arn);
		CHECK(!all_zero(d.dek, KMS_DEK_LEN), "DEK is zero");
		CHECK(d.wrapped_len > KMS_DEK_LEN && d.wrapped_len <= KMS_WRAPPED_MAX,
			  "wrapped length %zu", d.wrapped_len);
		for (int j = 0; j < 4; j++)
			EXPECT_DEC(&cfg, keys[j], &d, KMS_OK, 1);
	}

	/* two DEKs differ */
	gen(&cfg, arn, "acme", 1, &d, &err);
	gen(&cfg, arn, "acme", 1, &d2, &err);
	CHECK(memcmp(d.dek, d2.dek, KMS_DEK_LEN) != 0, "two DEKs are equal");

	/* the encryption context binds tenant and version */
	CHECK(dec(&cfg, arn, "acme", 2, &d, out, &err) == KMS_ERR_INVALID_CIPHERTEXT &&
		  err.attempts == 1 && all_zero(out, KMS_DEK_LEN),
		  "other version: %s", err.message);
	CHECK(strstr(err.message, "KMS Decrypt failed: InvalidCiphertextException (HTTP 400)") != NULL,
		  "message: %s", err.message);
	CHECK(dec(&cfg, arn, "acme2", 1, &d, out, &err) == KMS_ERR_INVALID_CIPHERTEXT,
		  "other tenant: %s", err.message);

	/* a blob wrapped under one key, presented as another's: KMS refuses it */
	CHECK(dec(&cfg, arn2, "acme", 1, &d, out, &err) != KMS_OK && err.attempts == 1,
		  "other key: %s", err.message);

	/* ReEncrypt moves the DEK to key 2 without showing it */
	{
		uint8_t		nw[KMS_WRAPPED_MAX];
		size_t		nwlen = 0;
		char		dest_arn[KMS_KEY_ID_MAX];
		Dek			moved;
		KmsStatus	st = aws->reencrypt(&cfg, arn, arn2, &ec, d.wrapped, d.wrapped_len,
										nw, &nwlen, dest_arn, &err);

		CHECK(st == KMS_OK, "ReEncrypt: %s", err.message);
		CHECK(strcmp(dest_arn, arn2) == 0, "dest arn %s", dest_arn);
		moved = d;
		memcpy(moved.wrapped, nw, nwlen);
		moved.wrapped_len = nwlen;
		EXPECT_DEC(&cfg, arn2, &moved, KMS_OK, 1);
		CHECK(dec(&cfg, arn, "acme", 1, &moved, out, &err) != KMS_OK,
			  "moved DEK still opens under the old key");
		/* wrong source context */
		ec.version = 7;
		st = aws->reencrypt(&cfg, arn, arn2, &ec, d.wrapped, d.wrapped_len,
							nw, &nwlen, dest_arn, &err);
		CHECK(st == KMS_ERR_INVALID_CIPHERTEXT, "ReEncrypt wrong context: %s", err.message);
		CHECK(strstr(err.message, "KMS ReEncrypt failed") != NULL, "message: %s", err.message);
		ec.version = 1;
	}

	/* tenant names that need JSON escaping survive exactly */
	{
		const char *tenant = "o'brien \"quoted\" \\ back/slash \xc3\xa9t\xc3\xa9 \xe4\xb8\xad\t"
			"\xf0\x9f\x94\x91 \x7f\x01";
		KmsEncryptionContext ec2 = {tenant, 3};

		CHECK(gen(&cfg, arn, tenant, 3, &d, &err) == KMS_OK, "odd tenant: %s", err.message);
		memset(out, 0, sizeof(out));
		CHECK(aws->decrypt(&cfg, arn, &ec2, d.wrapped, d.wrapped_len, out, &err) == KMS_OK &&
			  memcmp(out, d.dek, KMS_DEK_LEN) == 0, "odd tenant decrypt: %s", err.message);
		CHECK(dec(&cfg, arn, "o'brien", 3, &d, out, &err) == KMS_ERR_INVALID_CIPHERTEXT,
			  "prefix of tenant opened it");
	}

	/* unknown key */
	CHECK(gen(&cfg, "arn:aws:kms:us-east-1:123456789012:key/00000000-0000-0000-0000-000000000000",
			  "acme", 1, &d, &err) == KMS_ERR_NOT_FOUND && err.attempts == 1 &&
		  strcmp(err.error_type, "NotFoundException") == 0, "not found: %s", err.message);
	CHECK(gen(&cfg, "alias/nope", "acme", 1, &d, &err) == KMS_ERR_NOT_FOUND,
		  "alias not found: %s", err.message);

	/* tampered blob */
	gen(&cfg, arn, "acme", 1, &d, &err);
	d.wrapped[d.wrapped_len / 2] ^= 1;
	CHECK(dec(&cfg, arn, "acme", 1, &d, out, &err) == KMS_ERR_INVALID_CIPHERTEXT,
		  "tampered: %s", err.message);
}

/* The rate limit's hooks, as the backend's kms_rate.c would be called. */
static int	slots_asked;
static int	answers_noted;
static int	throttles_noted;
static bool refuse_slots;

static bool
count_slot(const KmsConfig *cfg)
{
	(void) cfg;
	slots_asked++;
	return !refuse_slots;
}

static void
count_answer(bool throttled)
{
	answers_noted++;
	if (throttled)
		throttles_noted++;
}

/*
 * Every request waits for a slot first, retries included, and every answer is noted
 * with whether it was a throttling one; a refused slot (an interrupt during the wait)
 * sends nothing.
 */
static void
test_pacing_hooks(const char *arn)
{
	KmsConfig	cfg = cfg_for(proxy_url, 3, 5000);
	Dek			d;
	KmsError	err;

	cfg.await_request_slot = count_slot;
	cfg.note_answer = count_answer;
	proxy_reset();
	CHECK(gen(&cfg, arn, "acme", 1, &d, &err) == KMS_OK, "paced generate: %s", err.message);
	CHECK(slots_asked == 1 && answers_noted == 1 && throttles_noted == 0,
		  "one request, one slot, one answer: %d %d %d", slots_asked, answers_noted,
		  throttles_noted);

	slots_asked = answers_noted = throttles_noted = 0;
	proxy_reset();
	proxy_fault("Decrypt", "throttle", 1);
	proxy_fault("Decrypt", "429", 1);
	EXPECT_DEC(&cfg, arn, &d, KMS_OK, 3);
	CHECK(slots_asked == 3 && answers_noted == 3 && throttles_noted == 2,
		  "a slot for each retry, throttles noted: %d %d %d", slots_asked, answers_noted,
		  throttles_noted);

	slots_asked = answers_noted = throttles_noted = 0;
	proxy_reset();
	proxy_fault("Decrypt", "access_denied", 1);
	EXPECT_DEC(&cfg, arn, &d, KMS_ERR_ACCESS_DENIED, 1);
	CHECK(answers_noted == 1 && throttles_noted == 0, "a refusal is no throttle: %d %d",
		  answers_noted, throttles_noted);

	slots_asked = answers_noted = throttles_noted = 0;
	refuse_slots = true;
	proxy_reset();
	EXPECT_DEC(&cfg, arn, &d, KMS_ERR_CANCELED, 0);
	CHECK(slots_asked == 1 && answers_noted == 0 && proxy_count("Decrypt", "requests") == 0,
		  "an interrupted wait sends nothing: %d slots, %d requests", slots_asked,
		  proxy_count("Decrypt", "requests"));
	refuse_slots = false;
}

/* Faults through the proxy; every Decrypt below is of one valid DEK. */
static void
test_faults(const char *arn)
{
	KmsConfig	cfg = cfg_for(proxy_url, 2, 5000);
	Dek			d;
	KmsError	err;
	uint8_t		out[KMS_DEK_LEN];

	proxy_reset();
	CHECK(gen(&cfg, arn, "acme", 1, &d, &err) == KMS_OK, "via proxy: %s", err.message);
	EXPECT_DEC(&cfg, arn, &d, KMS_OK, 1);
	CHECK(proxy_count("GenerateDataKey", "forwarded") == 1 &&
		  proxy_count("Decrypt", "forwarded") == 1, "proxy counts");

	/* retryable faults that clear up within the budget */
	proxy_reset();
	proxy_fault("Decrypt", "throttle", 1);
	EXPECT_DEC(&cfg, arn, &d, KMS_OK, 2);
	CHECK(proxy_count("Decrypt", "faulted") == 1 && proxy_count("Decrypt", "forwarded") == 1,
		  "throttle once: counts");
	proxy_reset();
	proxy_fault("Decrypt", "500", 2);
	EXPECT_DEC(&cfg, arn, &d, KMS_OK, 3);
	proxy_reset();
	proxy_fault("Decrypt", "429", 1);
	EXPECT_DEC(&cfg, arn, &d, KMS_OK, 2);
	proxy_reset();
	proxy_fault("Decrypt", "503", 1);
	EXPECT_DEC(&cfg, arn, &d, KMS_OK, 2);
	proxy_reset();
	proxy_fault("Decrypt", "reset", 2);
	{
		/*
		 * libcurl itself re-sends once, unseen, when a reused connection dies before
		 * any answer; so two resets cost us one or two attempts of our own.
		 */
		uint8_t		o[KMS_DEK_LEN];
		KmsStatus	st = dec(&cfg, arn, "acme", 1, &d, o, &err);

		CHECK(st == KMS_OK && memcmp(o, d.dek, KMS_DEK_LEN) == 0 &&
			  err.attempts >= 2 && err.attempts <= 3 &&
			  proxy_count("Decrypt", "faulted") == 2 &&
			  proxy_count("Decrypt", "forwarded") == 1,
			  "reset twice: %s, %d attempts", kms_status_name(st), err.attempts);
	}
	proxy_reset();
	proxy_fault("GenerateDataKey", "throttle", 1);
	CHECK(gen(&cfg, arn, "acme", 1, &d, &err) == KMS_OK && err.attempts == 2,
		  "GenerateDataKey after throttle: %s, %d", err.message, err.attempts);

	/* retryable faults that outlast it: 1 + retries requests, then the error */
	proxy_reset();
	proxy_fault("Decrypt", "throttle", -1);
	EXPECT_DEC(&cfg, arn, &d, KMS_ERR_THROTTLED, 3);
	dec(&cfg, arn, "acme", 1, &d, out, &err);
	CHECK(strcmp(err.error_type, "ThrottlingException") == 0 && err.http_status == 400,
		  "throttle type %s %d", err.error_type, err.http_status);
	CHECK(strstr(err.message, "KMS Decrypt failed: ThrottlingException (HTTP 400)") != NULL,
		  "throttle message: %s", err.message);
	CHECK(proxy_count("Decrypt", "faulted") == 6 && proxy_count("Decrypt", "forwarded") == 0,
		  "throttle forever: counts %d", proxy_count("Decrypt", "faulted"));
	proxy_reset();
	proxy_fault("Decrypt", "503", -1);
	EXPECT_DEC(&cfg, arn, &d, KMS_ERR_UNAVAILABLE, 3);
	proxy_reset();
	proxy_fault("Decrypt", "500", -1);
	EXPECT_DEC(&cfg, arn, &d, KMS_ERR_UNAVAILABLE, 3);
	dec(&cfg, arn, "acme", 1, &d, out, &err);
	CHECK(strcmp(err.error_type, "KMSInternalException") == 0 && err.http_status == 500,
		  "500 type %s %d", err.error_type, err.http_status);
	proxy_reset();
	proxy_fault("Decrypt", "reset", -1);
	EXPECT_DEC(&cfg, arn, &d, KMS_ERR_UNAVAILABLE, 3);
	cfg.retries = 0;
	proxy_reset();
	proxy_fault("Decrypt", "throttle", -1);
	EXPECT_DEC(&cfg, arn, &d, KMS_ERR_THROTTLED, 1);
	cfg.retries = 2;

	/* never retried; moto 5 never refuses a disabled key, so the proxy answers */
	proxy_reset();
	proxy_fault("Decrypt", "disabled", -1);
	EXPECT_DEC(&cfg, arn, &d, KMS_ERR_DISABLED, 1);
	proxy_reset();
	proxy_fault("Decrypt", "invalid_state", -1);
	EXPECT_DEC(&cfg, arn, &d, KMS_ERR_DISABLED, 1);
	dec(&cfg, arn, "acme", 1, &d, out, &err);
	CHECK(strcmp(err.error_type, "KMSInvalidStateException") == 0, "type %s", err.error_type);
	proxy_reset();
	proxy_fault("Decrypt", "access_denied", -1);
	EXPECT_DEC(&cfg, arn, &d, KMS_ERR_ACCESS_DENIED, 1);
	dec(&cfg, arn, "acme", 1, &d, out, &err);
	CHECK(strcmp(err.message, "KMS Decrypt failed: AccessDeniedException (HTTP 400)") == 0,
		  "message: %s", err.message);
	proxy_reset();
	proxy_fault("Decrypt", "garbage", -1);
	EXPECT_DEC(&cfg, arn, &d, KMS_ERR_PROTOCOL, 1);
	proxy_reset();
	proxy_fault("Decrypt", "big", -1);
	EXPECT_DEC(&cfg, arn, &d, KMS_ERR_PROTOCOL, 1);
	proxy_reset();
	proxy_fault("Decrypt", "xml_auth_error", -1);
	EXPECT_DEC(&cfg, arn, &d, KMS_ERR_CREDENTIALS, 1);
	dec(&cfg, arn, "acme", 1, &d, out, &err);
	CHECK(strcmp(err.error_type, "InvalidClientTokenId") == 0 && err.http_status == 403,
		  "xml type %s %d", err.error_type, err.http_status);
	proxy_reset();
	proxy_fault("Decrypt", "short_plaintext", -1);
	EXPECT_DEC(&cfg, arn, &d, KMS_ERR_PROTOCOL, 1);
	proxy_reset();
	proxy_fault("Decrypt", "wrong_keyid", -1);
	EXPECT_DEC(&cfg, arn, &d, KMS_ERR_PROTOCOL, 1);
	proxy_reset();
	proxy_fault("Decrypt", "bad_base64", -1);
	EXPECT_DEC(&cfg, arn, &d, KMS_ERR_PROTOCOL, 1);
	dec(&cfg, arn, "acme", 1, &d, out, &err);
	CHECK(strstr(err.message, "Plaintext is not valid base64") != NULL, "message: %s",
		  err.message);
	proxy_reset();
	proxy_fault("GenerateDataKey", "bad_base64", -1);
	{
		Dek			bad;

		CHECK(gen(&cfg, arn, "acme", 1, &bad, &err) == KMS_ERR_PROTOCOL &&
			  all_zero(bad.dek, KMS_DEK_LEN), "GenerateDataKey bad base64: %s", err.message);
	}
	proxy_reset();
	proxy_fault("ReEncrypt", "bad_base64", -1);
	{
		KmsEncryptionContext ec = {"acme", 1};
		uint8_t		nw[KMS_WRAPPED_MAX];
		size_t		nwlen = 0;
		char		dest[KMS_KEY_ID_MAX];

		CHECK(aws->reencrypt(&cfg, arn, arn, &ec, d.wrapped, d.wrapped_len, nw, &nwlen,
							 dest, &err) == KMS_ERR_PROTOCOL &&
			  strstr(err.message, "CiphertextBlob is not valid base64") != NULL,
			  "ReEncrypt bad base64: %s", err.message);
	}
	proxy_reset();
	proxy_fault("GenerateDataKey", "wrong_keyid", -1);
	CHECK(gen(&cfg, arn, "acme", 1, &d, &err) == KMS_ERR_PROTOCOL && all_zero(d.dek, KMS_DEK_LEN),
		  "GenerateDataKey wrong KeyId: %s", err.message);
	proxy_reset();
	gen(&cfg, arn, "acme", 1, &d, &err);

	/* an expired session token: refresh and retry once, outside the retry budget */
	proxy_reset();
	proxy_fault("Decrypt", "expired_token", 1);
	EXPECT_DEC(&cfg, arn, &d, KMS_OK, 2);
	proxy_reset();
	proxy_fault("Decrypt", "expired_token", -1);
	EXPECT_DEC(&cfg, arn, &d, KMS_ERR_CREDENTIALS, 2);
	proxy_reset();
}

static double cancel_at;

static bool
cancel_after_deadline(void)
{
	return now_s() > cancel_at;
}

static void
test_timeouts(const char *arn)
{
	KmsConfig	cfg = cfg_for(proxy_url, 1, 600);
	Dek			d;
	KmsError	err;
	uint8_t		out[KMS_DEK_LEN];
	double		t0;
	KmsStatus	st;

	proxy_reset();
	CHECK(gen(&cfg, arn, "acme", 1, &d, &err) == KMS_OK, "gen: %s", err.message);

	/* a hung KMS: each attempt times out, and the timeout is retried once */
	proxy_fault("Decrypt", "hang", -1);
	t0 = now_s();
	st = dec(&cfg, arn, "acme", 1, &d, out, &err);
	CHECK(st == KMS_ERR_TIMEOUT && err.attempts == 2, "hang: %s, %d attempts",
		  kms_status_name(st), err.attempts);
	CHECK(now_s() - t0 < 4.0, "hang took %.2fs", now_s() - t0);

	/* a body that trickles in: the total timeout still ends it */
	proxy_reset();
	proxy_fault("Decrypt", "slow_body", -1);
	cfg.retries = 0;
	cfg.timeout_ms = 1500;
	t0 = now_s();
	st = dec(&cfg, arn, "acme", 1, &d, out, &err);
	CHECK(st == KMS_ERR_TIMEOUT && err.attempts == 1, "slow body: %s (%s)",
		  kms_status_name(st), err.message);
	CHECK(now_s() - t0 < 4.0, "slow body took %.2fs", now_s() - t0);

	/* cancel while a request hangs: back within a fraction of a second */
	proxy_reset();
	proxy_fault("Decrypt", "hang", -1);
	cfg.retries = 3;
	cfg.timeout_ms = 30000;
	cfg.interrupted = cancel_after_deadline;
	t0 = now_s();
	cancel_at = t0 + 0.3;
	st = dec(&cfg, arn, "acme", 1, &d, out, &err);
	CHECK(st == KMS_ERR_CANCELED && err.attempts == 1, "cancel: %s, %d attempts",
		  kms_status_name(st), err.attempts);
	CHECK(now_s() - t0 < 1.0, "cancel took %.2fs", now_s() - t0);

	/* cancel during the backoff sleep between retries */
	proxy_reset();
	proxy_fault("Decrypt", "throttle", -1);
	cfg.retries = 10;
	t0 = now_s();
	cancel_at = t0 + 0.2;
	st = dec(&cfg, arn, "acme", 1, &d, out, &err);
	CHECK(st == KMS_ERR_CANCELED, "cancel in backoff: %s", kms_status_name(st));
	CHECK(now_s() - t0 < 1.0, "cancel in backoff took %.2fs", now_s() - t0);
	cfg.interrupted = NULL;
	proxy_reset();

	/* nothing listening: connect failures are retried, then UNAVAILABLE */
	{
		char		dead[64];

		snprintf(dead, sizeof(dead), "http://127.0.0.1:%d", free_port());
		cfg = cfg_for(dead, 2, 2000);
		st = dec(&cfg, arn, "acme", 1, &d, out, &err);
		CHECK(st == KMS_ERR_UNAVAILABLE && err.attempts == 3, "refused: %s, %d (%s)",
			  kms_status_name(st), err.attempts, err.message);
		CHECK(strstr(err.message, "KMS Decrypt failed") != NULL, "message %s", err.message);
	}
}

static int
count_fds(void)
{
	DIR		   *dir = opendir("/proc/self/fd");
	struct dirent *e;
	int			n = 0;

	if (dir == NULL)
		return -1;
	while ((e = readdir(dir)) != NULL)
		if (e->d_name[0] != '.')
			n++;
	closedir(dir);
	return n;
}

/*
 * No memory and no descriptor is left behind per request, on success or on any error
 * path (retried, refused, garbage, too large, timed out): a backend makes KMS calls for
 * as long as it lives.  The first rounds warm up what is allocated once per process
 * (curl's handles and connection cache, OpenSSL's tables).
 */
static void
test_no_leaks(const char *arn)
{
	KmsConfig	cfg = cfg_for(proxy_url, 1, 300);
	const char *const modes[] = {NULL, "throttle", "500", "garbage", "big", "access_denied",
	"bad_base64", "reset", "hang"};
	Dek			d;
	KmsError	err;
	uint8_t		out[KMS_DEK_LEN];
	size_t		mem0 = 0;
	int			fds0 = 0;

	proxy_reset();
	CHECK(gen(&cfg, arn, "acme", 1, &d, &err) == KMS_OK, "gen: %s", err.message);
	for (int round = 0; round < 6; round++)
	{
		if (round == 2)
		{
			mem0 = mallinfo2().uordblks;
			fds0 = count_fds();
		}
		for (size_t m = 0; m < sizeof(modes) / sizeof(modes[0]); m++)
		{
			proxy_reset();
			if (modes[m])
				proxy_fault("Decrypt", modes[m], 1);
			for (int i = 0; i < 3; i++)
				dec(&cfg, arn, "acme", 1, &d, out, &err);
			gen(&cfg, arn, "acme", 1, &d, &err);
		}
	}
	proxy_reset();
	{
		size_t		mem1 = mallinfo2().uordblks;
		int			fds1 = count_fds();

		/* 4 rounds x 9 modes x 4 calls; a leak of 64 bytes per call would show */
		CHECK(mem1 <= mem0 + 8192, "heap in use grew by %zd bytes over 144 calls",
			  (ssize_t) (mem1 - mem0));
		CHECK(fds0 > 0 && fds1 <= fds0, "file descriptors %d -> %d", fds0, fds1);
	}
}

static void
test_signatures(const char *arn)
{
	KmsConfig	cfg = cfg_for(proxy_url, 0, 5000);
	json_object *user = admin("create-user pgenvelope");
	json_object *role = admin("create-role pgenvelope-role");
	json_object *sess;
	Dek			d;
	KmsError	err;
	char		akid[128],
				secret[128];

	snprintf(akid, sizeof(akid), "%s", jstr(user, "AccessKeyId"));
	snprintf(secret, sizeof(secret), "%s", jstr(user, "SecretAccessKey"));

	json_object_put(admin("auth on"));

	/* right secret, signed for the proxy's host:port and verified by moto */
	setenv("AWS_ACCESS_KEY_ID", akid, 1);
	setenv("AWS_SECRET_ACCESS_KEY", secret, 1);
	unsetenv("AWS_SESSION_TOKEN");
	aws_credentials_invalidate();
	CHECK(gen(&cfg, arn, "acme", 1, &d, &err) == KMS_OK, "signed: %s", err.message);
	EXPECT_DEC(&cfg, arn, &d, KMS_OK, 1);

	/* wrong secret: a credentials error, not retried */
	setenv("AWS_SECRET_ACCESS_KEY", "wrongwrongwrongwrongwrongwrongwrongwrong", 1);
	aws_credentials_invalidate();
	EXPECT_DEC(&cfg, arn, &d, KMS_ERR_CREDENTIALS, 1);
	{
		uint8_t		out[KMS_DEK_LEN];

		dec(&cfg, arn, "acme", 1, &d, out, &err);
		CHECK(strstr(err.message, "SignatureDoesNotMatch") != NULL &&
			  strstr(err.message, "wrongwrong") == NULL, "message: %s", err.message);
	}

	/* unknown access key id */
	setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNUNKNOWN00", 1);
	aws_credentials_invalidate();
	EXPECT_DEC(&cfg, arn, &d, KMS_ERR_CREDENTIALS, 1);

	/* STS session credentials, sent with X-Amz-Security-Token */
	sess = admin_as(akid, secret, "assume-role arn:aws:iam::123456789012:role/pgenvelope-role");
	setenv("AWS_ACCESS_KEY_ID", jstr(sess, "AccessKeyId"), 1);
	setenv("AWS_SECRET_ACCESS_KEY", jstr(sess, "SecretAccessKey"), 1);
	setenv("AWS_SESSION_TOKEN", jstr(sess, "SessionToken"), 1);
	aws_credentials_invalidate();
	EXPECT_DEC(&cfg, arn, &d, KMS_OK, 1);
	setenv("AWS_SESSION_TOKEN", "bogus-token", 1);
	aws_credentials_invalidate();
	EXPECT_DEC(&cfg, arn, &d, KMS_ERR_CREDENTIALS, 1);

	setenv("AWS_ACCESS_KEY_ID", akid, 1);
	setenv("AWS_SECRET_ACCESS_KEY", secret, 1);
	unsetenv("AWS_SESSION_TOKEN");
	json_object_put(admin_as(akid, secret, "auth off"));
	setenv("AWS_ACCESS_KEY_ID", "testing", 1);
	setenv("AWS_SECRET_ACCESS_KEY", "testing", 1);
	aws_credentials_invalidate();
	json_object_put(sess);
	json_object_put(role);
	json_object_put(user);
}

/* The regional host the SDKs use, and the FIPS one that AWS_USE_FIPS_ENDPOINT picks. */
static void
test_default_hosts(void)
{
	char		host[128];

	CHECK(kms_aws_default_host("eu-west-1", false, host, sizeof(host)) &&
		  strcmp(host, "kms.eu-west-1.amazonaws.com") == 0, "standard host: %s", host);
	CHECK(kms_aws_default_host("us-east-1", true, host, sizeof(host)) &&
		  strcmp(host, "kms-fips.us-east-1.amazonaws.com") == 0, "FIPS host: %s", host);
	CHECK(kms_aws_default_host("us-gov-west-1", true, host, sizeof(host)) &&
		  strcmp(host, "kms-fips.us-gov-west-1.amazonaws.com") == 0, "GovCloud FIPS host: %s",
		  host);
	CHECK(kms_aws_default_host("cn-north-1", false, host, sizeof(host)) &&
		  strcmp(host, "kms.cn-north-1.amazonaws.com.cn") == 0, "China host: %s", host);
	CHECK(!kms_aws_default_host("cn-north-1", true, host, sizeof(host)),
		  "no FIPS endpoint in the China regions");
}

int
main(int argc, char **argv)
{
	json_object *k1,
			   *k2,
			   *al;
	const char *arn,
			   *arn2,
			   *key_id;

	/*
	 * The heap check of test_no_leaks reads mallinfo2(), which counts blocks parked in
	 * glibc's per-thread cache as in use: run with that cache off, so the check sees
	 * leaks and not the allocator's bookkeeping.
	 */
	if (getenv("ENVELOPE_TEST_REEXEC") == NULL)
	{
		setenv("ENVELOPE_TEST_REEXEC", "1", 1);
		setenv("GLIBC_TUNABLES", "glibc.malloc.tcache_count=0", 1);
		execv("/proc/self/exe", argv);
		/* if the re-exec fails, go on: the check may then report allocator noise */
	}
	(void) argc;

	python = getenv("ENVELOPE_PYTHON") && *getenv("ENVELOPE_PYTHON") ?
		getenv("ENVELOPE_PYTHON") : "python3";
	srcdir = getenv("ENVELOPE_SRCDIR") && *getenv("ENVELOPE_SRCDIR") ?
		getenv("ENVELOPE_SRCDIR") : ".";
	signal(SIGPIPE, SIG_IGN);
	atexit(stop_children);

	/* only the environment may supply credentials here */
	setenv("AWS_ACCESS_KEY_ID", "testing", 1);
	setenv("AWS_SECRET_ACCESS_KEY", "testing", 1);
	unsetenv("AWS_SESSION_TOKEN");
	unsetenv("AWS_PROFILE");
	setenv("AWS_EC2_METADATA_DISABLED", "true", 1);
	setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent", 1);
	setenv("AWS_CONFIG_FILE", "/nonexistent", 1);

	test_default_hosts();
	if (http_global_init() != 0)
		die("http_global_init");
	start_services();

	k1 = admin("create-key");
	k2 = admin("create-key");
	arn = jstr(k1, "Arn");
	key_id = jstr(k1, "KeyId");
	arn2 = jstr(k2, "Arn");
	al = admin("create-alias alias/pgenvelope-unit %s", key_id);
	{
		char		alias_arn[512];

		snprintf(alias_arn, sizeof(alias_arn), "arn:aws:kms:us-east-1:123456789012:%s",
				 jstr(al, "AliasName"));
		test_config_errors();
		test_round_trips(arn, key_id, jstr(al, "AliasName"), alias_arn, arn2);
	}
	test_faults(arn);
	test_pacing_hooks(arn);
	test_timeouts(arn);
	test_no_leaks(arn);
	test_signatures(arn);

	json_object_put(al);
	json_object_put(k1);
	json_object_put(k2);
	stop_children();
	return unit_finish("test_kms_aws");
}
