/*
 * test_aws_credentials.c — the AWS credential chain against test/kms/credential_stub.py.
 *
 * The stub (IMDSv2, ECS, STS AssumeRoleWithWebIdentity, request counters) is started
 * by this program on 127.0.0.1 and stopped at the end.  Every endpoint the chain could
 * reach is pointed at it or disabled, so nothing leaves loopback.  Covered: each
 * source, the order of precedence, profiles and the INI reader, expiry refresh and the
 * cache, IMDSv1 never used, IMDS disabled, configured-but-failing sources, nothing
 * found, and that no error message carries a secret.  A missing stub is a failure.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE			/* the Makefile defines it too */
#endif
#include <signal.h>
#include <stdbool.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <netinet/in.h>
#include <time.h>
#include <unistd.h>

#include <json-c/json.h>

#include "aws_credentials.h"
#include "http.h"
#include "unit.h"

#define STUB_SCRIPT "test/kms/credential_stub.py"
#define ECS_TOKEN "ecs-auth-token"
#define WEB_TOKEN "web-identity-jwt"

static pid_t stub_pid = 0;
static int	stub_port = 0;
static char tmpdir[256];
static char stub_url[128];

/* Every secret value the tests use; none may appear in an error message. */
static const char *const secrets_used[] = {
	"secretdefault", "secretother", "secretcfg", "secretenv", "tokenenv", "tokenother",
	WEB_TOKEN, ECS_TOKEN, "wrong-ecs-token", "wrong-jwt", "secret-", "token-",
};

static const char *const chain_vars[] = {
	"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
	"AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
	"AWS_ROLE_ARN", "AWS_ROLE_SESSION_NAME", "AWS_ENDPOINT_URL_STS", "AWS_REGION",
	"AWS_DEFAULT_REGION", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
	"AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_AUTHORIZATION_TOKEN",
	"AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", "AWS_EC2_METADATA_SERVICE_ENDPOINT",
	"AWS_EC2_METADATA_DISABLED",
};

/* ------------------------------------------------------------------------ */

static void
stop_stub(void)
{
	if (stub_pid > 0)
	{
		int			status;

		kill(stub_pid, SIGTERM);
		for (int i = 0; i < 50; i++)
		{
			if (waitpid(stub_pid, &status, WNOHANG) == stub_pid)
			{
				stub_pid = 0;
				return;
			}
			usleep(100 * 1000);
		}
		kill(stub_pid, SIGKILL);
		waitpid(stub_pid, &status, 0);
		stub_pid = 0;
	}
}

static bool
start_stub(void)
{
	int			fds[2];
	FILE	   *f;
	char		line[64];

	if (access(STUB_SCRIPT, R_OK) != 0 || pipe(fds) != 0)
		return false;
	stub_pid = fork();
	if (stub_pid < 0)
		return false;
	if (stub_pid == 0)
	{
		dup2(fds[1], STDOUT_FILENO);
		close(fds[0]);
		close(fds[1]);
		execlp("python3", "python3", STUB_SCRIPT, "--port", "0", "--lifetime", "120",
			   "--ecs-token", ECS_TOKEN, "--web-token", WEB_TOKEN, (char *) NULL);
		_exit(127);
	}
	close(fds[1]);
	atexit(stop_stub);
	f = fdopen(fds[0], "r");
	if (f == NULL || fgets(line, sizeof(line), f) == NULL)
	{
		if (f)
			fclose(f);
		return false;
	}
	fclose(f);
	stub_port = atoi(line);
	snprintf(stub_url, sizeof(stub_url), "http://127.0.0.1:%d", stub_port);
	return stub_port > 0;
}

/* GET a control path of the stub; returns the malloc'd body or NULL. */
static char *
stub_get(const char *path)
{
	char		url[256];
	HttpRequest req;
	HttpResponse resp;
	char		err[256];
	char	   *out = NULL;

	snprintf(url, sizeof(url), "%s%s", stub_url, path);
	memset(&req, 0, sizeof(req));
	req.method = "GET";
	req.url = url;
	req.timeout_ms = 2000;
	req.max_response = 65536;
	if (http_perform(&req, &resp, err, sizeof(err)) == HTTP_OK && resp.status == 200)
		out = strdup(resp.body);
	http_response_free(&resp);
	return out;
}

static int
stub_count(const char *key)
{
	char	   *body = stub_get("/_counts");
	json_object *obj = body ? json_tokener_parse(body) : NULL;
	json_object *v;
	int			n = -1;

	if (obj)
		n = json_object_object_get_ex(obj, key, &v) ? json_object_get_int(v) : 0;
	json_object_put(obj);
	free(body);
	return n;
}

static void
stub_set(const char *query)
{
	char		path[128];

	snprintf(path, sizeof(path), "/_set?%s", query);
	free(stub_get(path));
}

static void
write_file(const char *name, const char *text, char *path, size_t pathlen)
{
	FILE	   *f;

	snprintf(path, pathlen, "%s/%s", tmpdir, name);
	f = fopen(path, "w");
	if (f == NULL)
	{
		CHECK(false, "cannot write %s", path);
		return;
	}
	fputs(text, f);
	fclose(f);
}

/* A clean slate: no chain variable, HOME in our temp dir, IMDS off, empty cache. */
static void
reset_env(void)
{
	for (size_t i = 0; i < sizeof(chain_vars) / sizeof(chain_vars[0]); i++)
		unsetenv(chain_vars[i]);
	setenv("HOME", tmpdir, 1);
	setenv("AWS_EC2_METADATA_DISABLED", "true", 1);
	aws_credentials_invalidate();
	free(stub_get("/_reset"));
	stub_set("expiry=3600&imds_token_status=200");
}

static void
check_no_secret(const KmsError *err, const char *what)
{
	for (size_t i = 0; i < sizeof(secrets_used) / sizeof(secrets_used[0]); i++)
		CHECK(strstr(err->message, secrets_used[i]) == NULL,
			  "%s: error message reveals a secret: %s", what, err->message);
}

static KmsStatus
get(const char *profile, AwsCredentials *c, KmsError *err)
{
	KmsConfig	cfg;
	KmsStatus	st;

	memset(&cfg, 0, sizeof(cfg));
	cfg.aws_region = "us-east-1";
	cfg.aws_profile = profile;
	cfg.timeout_ms = 3000;
	st = aws_credentials_get(&cfg, c, err);
	if (st != KMS_OK)
		check_no_secret(err, "get");
	return st;
}

static void
use_imds_stub(void)
{
	unsetenv("AWS_EC2_METADATA_DISABLED");
	setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", stub_url, 1);
}

/* ------------------------------------------------------------------------ */

static void
test_nothing_found(void)
{
	AwsCredentials c;
	KmsError	err;

	reset_env();
	CHECK(get(NULL, &c, &err) == KMS_ERR_CREDENTIALS, "nothing: %s", err.message);
	CHECK(err.status == KMS_ERR_CREDENTIALS, "err.status set");
	CHECK(strstr(err.message, "environment") && strstr(err.message, "shared-file") &&
		  strstr(err.message, "web-identity") && strstr(err.message, "ecs") &&
		  strstr(err.message, "imds (disabled)"), "message lists what was tried: %s",
		  err.message);
	CHECK(c.access_key_id[0] == '\0' && c.secret_access_key[0] == '\0',
		  "nothing left in the output");
	printf("nothing found: %s\n", err.message);
}

static void
test_environment(void)
{
	AwsCredentials c;
	KmsError	err;

	reset_env();
	setenv("AWS_ACCESS_KEY_ID", "AKIDENV", 1);
	setenv("AWS_SECRET_ACCESS_KEY", "secretenv", 1);
	setenv("AWS_SESSION_TOKEN", "tokenenv", 1);
	CHECK(get(NULL, &c, &err) == KMS_OK, "env: %s", err.message);
	CHECK(strcmp(c.source, "environment") == 0 && strcmp(c.access_key_id, "AKIDENV") == 0 &&
		  strcmp(c.secret_access_key, "secretenv") == 0 &&
		  strcmp(c.session_token, "tokenenv") == 0 && c.expiration == 0, "env values");
	aws_credentials_wipe(&c);
	CHECK(c.access_key_id[0] == '\0' && c.secret_access_key[0] == '\0', "wipe");

	aws_credentials_invalidate();
	unsetenv("AWS_SESSION_TOKEN");
	CHECK(get(NULL, &c, &err) == KMS_OK && c.session_token[0] == '\0', "env without token");

	aws_credentials_invalidate();
	unsetenv("AWS_SECRET_ACCESS_KEY");
	CHECK(get(NULL, &c, &err) == KMS_ERR_CREDENTIALS &&
		  strstr(err.message, "AWS_SECRET_ACCESS_KEY"), "partial env: %s", err.message);
}

static const char credentials_file[] =
"# shared credentials for the tests\n"
"; a semicolon comment\n"
"\n"
"[default]\n"
"aws_access_key_id = AKIDDEFAULT\n"
"aws_secret_access_key=secretdefault   \n"
"   \n"
"[other]\n"
"\taws_access_key_id\t=\tAKIDOTHER\n"
"AWS_SECRET_ACCESS_KEY = secretother\n"
"aws_session_token = tokenother\n"
"s3 =\n"
"  aws_access_key_id = AKIDNESTED\n"
"[partial]\n"
"aws_access_key_id = AKIDPARTIAL\n"
"[regiononly]\n"
"region = us-east-1\n"
"[broken\n"
"aws_access_key_id = AKIDBROKEN\n";

static const char config_file[] =
"[default]\n"
"region = eu-west-1\n"
"[profile   cfgonly ]\r\n"
"aws_access_key_id = AKIDCFG\r\n"
"aws_secret_access_key = secretcfg\r\n"
"[cfgbare]\n"
"aws_access_key_id = AKIDCFGBARE\n"
"aws_secret_access_key = secretcfg\n"
"[profile other]\n"
"aws_access_key_id = AKIDOTHERCFG\n"
"aws_secret_access_key = secretcfg\n";

static void
test_shared_files(void)
{
	AwsCredentials c;
	KmsError	err;
	char		cred_path[512];
	char		conf_path[512];
	char		dir[512];

	reset_env();
	write_file("credentials", credentials_file, cred_path, sizeof(cred_path));
	write_file("config", config_file, conf_path, sizeof(conf_path));
	setenv("AWS_SHARED_CREDENTIALS_FILE", cred_path, 1);
	setenv("AWS_CONFIG_FILE", conf_path, 1);

	CHECK(get(NULL, &c, &err) == KMS_OK && strcmp(c.source, "shared-file") == 0 &&
		  strcmp(c.access_key_id, "AKIDDEFAULT") == 0 &&
		  strcmp(c.secret_access_key, "secretdefault") == 0 && c.session_token[0] == '\0' &&
		  c.expiration == 0, "default profile: %s %s", err.message, c.access_key_id);

	aws_credentials_invalidate();
	CHECK(get("other", &c, &err) == KMS_OK && strcmp(c.access_key_id, "AKIDOTHER") == 0 &&
		  strcmp(c.secret_access_key, "secretother") == 0 &&
		  strcmp(c.session_token, "tokenother") == 0,
		  "profile other (credentials file wins, nested key ignored): %s", c.access_key_id);

	/* The cache follows the profile: a changed envelope.aws_profile is not served stale. */
	CHECK(get(NULL, &c, &err) == KMS_OK && strcmp(c.access_key_id, "AKIDDEFAULT") == 0,
		  "profile change re-resolves: %s", c.access_key_id);

	aws_credentials_invalidate();
	setenv("AWS_PROFILE", "other", 1);
	CHECK(get(NULL, &c, &err) == KMS_OK && strcmp(c.access_key_id, "AKIDOTHER") == 0,
		  "AWS_PROFILE: %s", c.access_key_id);
	aws_credentials_invalidate();
	CHECK(get("cfgonly", &c, &err) == KMS_OK && strcmp(c.access_key_id, "AKIDCFG") == 0,
		  "envelope.aws_profile beats AWS_PROFILE; [profile x] in config: %s %s",
		  err.message, c.access_key_id);
	unsetenv("AWS_PROFILE");

	aws_credentials_invalidate();
	CHECK(get("cfgbare", &c, &err) == KMS_ERR_CONFIG,
		  "config file [x] without \"profile\" is not profile x: %s", err.message);

	aws_credentials_invalidate();
	CHECK(get("partial", &c, &err) == KMS_ERR_CREDENTIALS &&
		  strstr(err.message, "partial"), "partial profile: %s", err.message);

	aws_credentials_invalidate();
	CHECK(get("missing", &c, &err) == KMS_ERR_CONFIG && strstr(err.message, "missing"),
		  "missing profile: %s", err.message);

	aws_credentials_invalidate();
	CHECK(get("regiononly", &c, &err) == KMS_ERR_CREDENTIALS &&
		  strstr(err.message, "no static keys"), "profile without keys: %s", err.message);

	aws_credentials_invalidate();
	CHECK(get("broken", &c, &err) == KMS_ERR_CONFIG, "malformed section header ignored: %s",
		  err.message);

	/* Default locations under $HOME/.aws. */
	reset_env();
	snprintf(dir, sizeof(dir), "%s/.aws", tmpdir);
	mkdir(dir, 0700);
	write_file(".aws/credentials", "[default]\r\naws_access_key_id=AKIDHOME\r\n"
			   "aws_secret_access_key=secretdefault\r\n", cred_path, sizeof(cred_path));
	CHECK(get(NULL, &c, &err) == KMS_OK && strcmp(c.access_key_id, "AKIDHOME") == 0 &&
		  strcmp(c.secret_access_key, "secretdefault") == 0,
		  "~/.aws/credentials with CRLF: %s %s", err.message, c.access_key_id);
	unlink(cred_path);
	write_file(".aws/config", "[profile home]\naws_access_key_id=AKIDHOMECFG\n"
			   "aws_secret_access_key=secretcfg\n", conf_path, sizeof(conf_path));
	aws_credentials_invalidate();
	CHECK(get("home", &c, &err) == KMS_OK && strcmp(c.access_key_id, "AKIDHOMECFG") == 0,
		  "~/.aws/config: %s", err.message);
	unlink(conf_path);
	rmdir(dir);
}

static void
setup_web_identity(const char *jwt)
{
	char		path[512];
	char		url[160];

	write_file("web-token", jwt, path, sizeof(path));
	setenv("AWS_WEB_IDENTITY_TOKEN_FILE", path, 1);
	setenv("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/pg-envelope-test-role", 1);
	snprintf(url, sizeof(url), "%s/", stub_url);
	setenv("AWS_ENDPOINT_URL_STS", url, 1);
}

static void
test_web_identity(void)
{
	AwsCredentials c;
	KmsError	err;
	time_t		now = time(NULL);

	reset_env();
	setup_web_identity(WEB_TOKEN "\n");
	CHECK(get(NULL, &c, &err) == KMS_OK, "web identity: %s", err.message);
	CHECK(strcmp(c.source, "web-identity") == 0 && strncmp(c.access_key_id, "ASIASTS", 7) == 0 &&
		  strncmp(c.secret_access_key, "secret-sts-", 11) == 0, "web identity values: %s",
		  c.access_key_id);
	CHECK(strncmp(c.session_token, "token-sts-", 10) == 0 &&
		  strstr(c.session_token, "+a/b=&c") != NULL, "XML entity decoded in token: %s",
		  c.session_token);
	CHECK(c.expiration > now + 3500 && c.expiration < now + 3700, "expiration parsed");
	CHECK(stub_count("POST /") == 1, "one STS request");

	aws_credentials_invalidate();
	setup_web_identity("wrong-jwt");
	CHECK(get(NULL, &c, &err) == KMS_ERR_CREDENTIALS &&
		  strcmp(err.error_type, "InvalidIdentityToken") == 0 && err.http_status == 400,
		  "refused token: %s / %s", err.error_type, err.message);

	aws_credentials_invalidate();
	unsetenv("AWS_ROLE_ARN");
	CHECK(get(NULL, &c, &err) == KMS_ERR_CONFIG, "token file without role: %s", err.message);

	aws_credentials_invalidate();
	setup_web_identity(WEB_TOKEN);
	setenv("AWS_WEB_IDENTITY_TOKEN_FILE", "/nonexistent/token", 1);
	CHECK(get(NULL, &c, &err) == KMS_ERR_CREDENTIALS && strstr(err.message, "/nonexistent"),
		  "unreadable token file: %s", err.message);
}

static void
test_ecs(void)
{
	AwsCredentials c;
	KmsError	err;
	char		url[160];
	char		path[512];

	reset_env();
	snprintf(url, sizeof(url), "%s/ecs/creds", stub_url);
	setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", url, 1);
	setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN", ECS_TOKEN, 1);
	CHECK(get(NULL, &c, &err) == KMS_OK && strcmp(c.source, "ecs") == 0 &&
		  strncmp(c.access_key_id, "ASIAECS", 7) == 0 &&
		  strncmp(c.session_token, "token-ecs-", 10) == 0 && c.expiration > time(NULL),
		  "ecs: %s", err.message);

	/* The token file wins over the variable. */
	aws_credentials_invalidate();
	setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN", "wrong-ecs-token", 1);
	write_file("ecs-token", ECS_TOKEN "\n", path, sizeof(path));
	setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", path, 1);
	CHECK(get(NULL, &c, &err) == KMS_OK && strcmp(c.source, "ecs") == 0,
		  "ecs token file: %s", err.message);

	aws_credentials_invalidate();
	unsetenv("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE");
	CHECK(get(NULL, &c, &err) == KMS_ERR_CREDENTIALS && err.http_status == 403,
		  "ecs wrong token: %s", err.message);
	CHECK(stub_count("ecs_unauthorized") == 1, "stub saw the wrong token");

	/* Plain http to anywhere but loopback or the ECS agent is refused before sending. */
	aws_credentials_invalidate();
	setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", "http://10.1.2.3/creds", 1);
	CHECK(get(NULL, &c, &err) == KMS_ERR_CONFIG && err.attempts == 0,
		  "ecs non-loopback http refused: %s", err.message);
	setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", "http://127.0.0.1@10.1.2.3/creds", 1);
	CHECK(get(NULL, &c, &err) == KMS_ERR_CONFIG && err.attempts == 0,
		  "ecs userinfo trick refused: %s", err.message);
}

static void
test_imds(void)
{
	AwsCredentials c;
	KmsError	err;
	int			s;
	struct sockaddr_in sa;
	socklen_t	salen = sizeof(sa);
	char		url[64];
	struct timespec t0,
				t1;

	reset_env();
	use_imds_stub();
	CHECK(get(NULL, &c, &err) == KMS_OK && strcmp(c.source, "imds") == 0 &&
		  strncmp(c.access_key_id, "ASIAIMDS", 8) == 0 &&
		  strncmp(c.session_token, "token-imds-", 11) == 0, "imds: %s", err.message);
	CHECK(stub_count("PUT /latest/api/token") == 1, "one token PUT");
	CHECK(stub_count("GET /latest/meta-data/iam/security-credentials/") == 1, "one role GET");
	CHECK(stub_count("GET /latest/meta-data/iam/security-credentials/pg-envelope-test-role") == 1,
		  "one credentials GET");
	CHECK(stub_count("imds_v1_refused") == 0, "never a GET without a token");

	/* A host that refuses the token PUT (IMDSv1 only): no GET at all. */
	reset_env();
	use_imds_stub();
	stub_set("imds_token_status=403");
	CHECK(get(NULL, &c, &err) == KMS_ERR_CREDENTIALS &&
		  strstr(err.message, "imds (token refused, HTTP 403)"), "v1-only host: %s",
		  err.message);
	CHECK(stub_count("PUT /latest/api/token") == 1, "token PUT tried once");
	CHECK(stub_count("GET /latest/meta-data/iam/security-credentials/") == 0 &&
		  stub_count("imds_v1_refused") == 0, "no IMDSv1 fallback");

	/* Disabled: not even the token request. */
	reset_env();
	use_imds_stub();
	setenv("AWS_EC2_METADATA_DISABLED", "TRUE", 1);
	CHECK(get(NULL, &c, &err) == KMS_ERR_CREDENTIALS && strstr(err.message, "imds (disabled)"),
		  "disabled: %s", err.message);
	CHECK(stub_count("PUT /latest/api/token") == 0, "disabled IMDS not contacted");

	/* Nothing listening: fail fast and say so. */
	reset_env();
	unsetenv("AWS_EC2_METADATA_DISABLED");
	s = socket(AF_INET, SOCK_STREAM, 0);
	memset(&sa, 0, sizeof(sa));
	sa.sin_family = AF_INET;
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	bind(s, (struct sockaddr *) &sa, sizeof(sa));
	getsockname(s, (struct sockaddr *) &sa, &salen);
	snprintf(url, sizeof(url), "http://127.0.0.1:%d/", ntohs(sa.sin_port));
	close(s);
	setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", url, 1);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	CHECK(get(NULL, &c, &err) == KMS_ERR_CREDENTIALS && strstr(err.message, "imds (no answer)"),
		  "no IMDS: %s", err.message);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	CHECK(t1.tv_sec - t0.tv_sec < 2, "no IMDS fails fast");
}

static void
test_precedence(void)
{
	AwsCredentials c;
	KmsError	err;
	char		path[512];
	char		url[160];

	reset_env();
	setenv("AWS_ACCESS_KEY_ID", "AKIDENV", 1);
	setenv("AWS_SECRET_ACCESS_KEY", "secretenv", 1);
	write_file("credentials", credentials_file, path, sizeof(path));
	setenv("AWS_SHARED_CREDENTIALS_FILE", path, 1);
	setup_web_identity(WEB_TOKEN);
	snprintf(url, sizeof(url), "%s/ecs/creds", stub_url);
	setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", url, 1);
	setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN", ECS_TOKEN, 1);
	use_imds_stub();

	CHECK(get(NULL, &c, &err) == KMS_OK && strcmp(c.source, "environment") == 0,
		  "1. environment first: %s", c.source);
	CHECK(stub_count("POST /") == 0 && stub_count("GET /ecs/creds") == 0 &&
		  stub_count("PUT /latest/api/token") == 0, "later sources not contacted");

	aws_credentials_invalidate();
	unsetenv("AWS_ACCESS_KEY_ID");
	unsetenv("AWS_SECRET_ACCESS_KEY");
	CHECK(get(NULL, &c, &err) == KMS_OK && strcmp(c.source, "shared-file") == 0,
		  "2. shared file: %s", c.source);

	aws_credentials_invalidate();
	unsetenv("AWS_SHARED_CREDENTIALS_FILE");
	CHECK(get(NULL, &c, &err) == KMS_OK && strcmp(c.source, "web-identity") == 0,
		  "3. web identity: %s %s", c.source, err.message);

	aws_credentials_invalidate();
	unsetenv("AWS_WEB_IDENTITY_TOKEN_FILE");
	unsetenv("AWS_ROLE_ARN");
	CHECK(get(NULL, &c, &err) == KMS_OK && strcmp(c.source, "ecs") == 0,
		  "4. ecs: %s %s", c.source, err.message);

	aws_credentials_invalidate();
	unsetenv("AWS_CONTAINER_CREDENTIALS_FULL_URI");
	CHECK(get(NULL, &c, &err) == KMS_OK && strcmp(c.source, "imds") == 0,
		  "5. imds: %s %s", c.source, err.message);
	CHECK(stub_count("POST /") == 1 && stub_count("GET /ecs/creds") == 1 &&
		  stub_count("PUT /latest/api/token") == 1, "each remote source asked once");
}

/*
 * AWS_SHARED_CREDENTIALS_FILE=/dev/null and AWS_CONFIG_FILE=/dev/null are how SDK users
 * switch the shared files off to force the instance or task role: the SDKs read them as
 * empty files, and so must the chain.
 */
static void
test_shared_files_switched_off(void)
{
	AwsCredentials c;
	KmsError	err;

	reset_env();
	setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null", 1);
	setenv("AWS_CONFIG_FILE", "/dev/null", 1);
	setup_web_identity(WEB_TOKEN);
	CHECK(get(NULL, &c, &err) == KMS_OK && strcmp(c.source, "web-identity") == 0,
		  "/dev/null shared files are empty: %s %s", c.source, err.message);

	/* A profile that an empty file cannot have is still an error, as in botocore. */
	aws_credentials_invalidate();
	CHECK(get("named", &c, &err) == KMS_ERR_CONFIG && strstr(err.message, "\"named\" not found"),
		  "named profile in /dev/null files: %s", err.message);

	/* An endless device is refused by size, a directory by type: never read forever. */
	aws_credentials_invalidate();
	setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/zero", 1);
	CHECK(get(NULL, &c, &err) == KMS_ERR_CREDENTIALS && strstr(err.message, "/dev/zero") &&
		  strstr(err.message, "too large"), "/dev/zero refused: %s", err.message);
	aws_credentials_invalidate();
	setenv("AWS_SHARED_CREDENTIALS_FILE", "/", 1);
	CHECK(get(NULL, &c, &err) == KMS_ERR_CREDENTIALS && strstr(err.message, "\"/\""),
		  "directory refused: %s", err.message);

	/* A FIFO nobody writes to: refused at once, never a backend hung in open(). */
	{
		char		fifo[512];

		snprintf(fifo, sizeof(fifo), "%s/credentials.fifo", tmpdir);
		unlink(fifo);
		CHECK(mkfifo(fifo, 0600) == 0, "mkfifo");
		aws_credentials_invalidate();
		setenv("AWS_SHARED_CREDENTIALS_FILE", fifo, 1);
		alarm(10);				/* a hang fails the test instead of stalling it */
		CHECK(get(NULL, &c, &err) == KMS_ERR_CREDENTIALS && strstr(err.message, "credentials.fifo"),
			  "FIFO refused: %s", err.message);
		alarm(0);
		unlink(fifo);
	}
}

static void
test_cache_and_refresh(void)
{
	AwsCredentials c;
	KmsError	err;
	char		first[128];
	const char *creds_path = "GET /latest/meta-data/iam/security-credentials/pg-envelope-test-role";

	/* Long-lived: served from the cache. */
	reset_env();
	use_imds_stub();
	CHECK(get(NULL, &c, &err) == KMS_OK, "cache 1: %s", err.message);
	snprintf(first, sizeof(first), "%s", c.access_key_id);
	CHECK(get(NULL, &c, &err) == KMS_OK && strcmp(c.access_key_id, first) == 0,
		  "cache 2 same keys");
	CHECK(stub_count(creds_path) == 1, "second call served from cache");
	aws_credentials_invalidate();
	CHECK(get(NULL, &c, &err) == KMS_OK && strcmp(c.access_key_id, first) != 0,
		  "invalidate fetches new keys");
	CHECK(stub_count(creds_path) == 2, "invalidate refetched");

	/* Expiring in one minute: inside the 5-minute margin, so every call refreshes. */
	reset_env();
	use_imds_stub();
	stub_set("expiry=60");
	CHECK(get(NULL, &c, &err) == KMS_OK, "short 1: %s", err.message);
	snprintf(first, sizeof(first), "%s", c.access_key_id);
	CHECK(get(NULL, &c, &err) == KMS_OK && strcmp(c.access_key_id, first) != 0,
		  "short-lived credentials refreshed");
	CHECK(stub_count(creds_path) == 2, "refresh fetched again");

	/* Refresh fails, cached keys still valid for a minute: keep using them. */
	stub_set("imds_token_status=500");
	snprintf(first, sizeof(first), "%s", c.access_key_id);
	CHECK(get(NULL, &c, &err) == KMS_OK && strcmp(c.access_key_id, first) == 0 &&
		  err.message[0] == '\0', "still-valid cache survives a failed refresh: %s",
		  err.message);
	CHECK(stub_count("PUT /latest/api/token") == 3, "refresh was attempted");

	/* Already expired and refresh fails: an error, not expired keys. */
	reset_env();
	use_imds_stub();
	stub_set("expiry=-10");
	CHECK(get(NULL, &c, &err) == KMS_OK, "expired creds fetched");
	stub_set("imds_token_status=500");
	CHECK(get(NULL, &c, &err) == KMS_ERR_CREDENTIALS && c.access_key_id[0] == '\0',
		  "expired and no refresh: %s", err.message);
}

int
main(void)
{
	char		tmpl[] = "/tmp/pg_envelope_cred_XXXXXX";

	if (mkdtemp(tmpl) == NULL)
	{
		CHECK(false, "mkdtemp");
		return unit_finish("test_aws_credentials");
	}
	snprintf(tmpdir, sizeof(tmpdir), "%s", tmpl);
	if (!start_stub())
	{
		CHECK(false, "could not start %s (run from the repository root)", STUB_SCRIPT);
		return unit_finish("test_aws_credentials");
	}

	test_nothing_found();
	test_environment();
	test_shared_files();
	test_web_identity();
	test_ecs();
	test_imds();
	test_precedence();
	test_shared_files_switched_off();
	test_cache_and_refresh();

	reset_env();
	stop_stub();
	{
		char		cmd[300];

		snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tmpdir);
		if (system(cmd) != 0)
			fprintf(stderr, "could not remove %s\n", tmpdir);
	}
	return unit_finish("test_aws_credentials");
}
