/*
 * test_sigv4.c — sigv4.c against the AWS SigV4 test suite (header signing).
 *
 * Every case directory of test/vectors/sigv4/v4 is run: request.txt is parsed into a
 * Sigv4Request, context.json gives credentials, region, service, time and flags, and
 * the canonical request, string to sign, signature and Authorization header are
 * compared with the suite's header-*.txt files.  A missing directory is a failure.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE			/* strptime, timegm */
#endif
#include <dirent.h>
#include <stdbool.h>
#include <time.h>

#include <json-c/json.h>
#include <openssl/evp.h>

#include "sigv4.h"
#include "unit.h"

#define EXPECTED_CASES 38
#define MAX_HEADERS 32

typedef struct ParsedRequest
{
	char		method[16];
	char	   *uri;
	char	   *names[MAX_HEADERS];
	char	   *values[MAX_HEADERS];
	int			nheaders;
	char	   *body;
	size_t		body_len;
} ParsedRequest;

static char *
xstrndup(const char *s, size_t n)
{
	char	   *p = malloc(n + 1);

	memcpy(p, s, n);
	p[n] = '\0';
	return p;
}

/* Drop trailing CR/LF so that files with or without a final newline compare alike. */
static void
chomp(char *s)
{
	size_t		n = strlen(s);

	while (n > 0 && (s[n - 1] == '\n' || s[n - 1] == '\r'))
		s[--n] = '\0';
}

static char *
read_case_file(const char *dir, const char *name, bool strip)
{
	char		path[1024];
	char	   *data;

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	data = unit_read_file(path, NULL);
	if (data && strip)
		chomp(data);
	return data;
}

/*
 * Parse the suite's request.txt: request line, header lines (a line starting with
 * whitespace continues the previous value, unfolded to one space as RFC 7230 allows),
 * blank line, body.
 */
static bool
parse_request(const char *text, ParsedRequest *r)
{
	const char *p = text;
	const char *eol;
	const char *sp;
	const char *http;

	memset(r, 0, sizeof(*r));
	eol = strchr(p, '\n');
	if (eol == NULL)
		eol = p + strlen(p);
	sp = memchr(p, ' ', eol - p);
	if (sp == NULL || (size_t) (sp - p) >= sizeof(r->method))
		return false;
	memcpy(r->method, p, sp - p);
	r->method[sp - p] = '\0';

	/* The path may contain spaces: it ends at the last " HTTP/". */
	http = NULL;
	for (const char *q = sp + 1; q + 6 <= eol; q++)
		if (strncmp(q, " HTTP/", 6) == 0)
			http = q;
	if (http == NULL)
		return false;
	r->uri = xstrndup(sp + 1, http - sp - 1);

	p = *eol ? eol + 1 : eol;
	while (*p)
	{
		size_t		len;
		const char *colon;

		eol = strchr(p, '\n');
		if (eol == NULL)
			eol = p + strlen(p);
		len = eol - p;
		if (len > 0 && p[len - 1] == '\r')
			len--;
		if (len == 0)
		{
			p = *eol ? eol + 1 : eol;
			r->body_len = strlen(p);
			r->body = xstrndup(p, r->body_len);
			return true;
		}
		if ((p[0] == ' ' || p[0] == '\t') && r->nheaders > 0)
		{
			char	   *prev = r->values[r->nheaders - 1];
			size_t		plen = strlen(prev);
			char	   *joined = malloc(plen + 1 + len + 1);

			memcpy(joined, prev, plen);
			joined[plen] = ' ';
			memcpy(joined + plen + 1, p, len);
			joined[plen + 1 + len] = '\0';
			free(prev);
			r->values[r->nheaders - 1] = joined;
		}
		else
		{
			colon = memchr(p, ':', len);
			if (colon == NULL || r->nheaders >= MAX_HEADERS)
				return false;
			r->names[r->nheaders] = xstrndup(p, colon - p);
			r->values[r->nheaders] = xstrndup(colon + 1, p + len - colon - 1);
			r->nheaders++;
		}
		p = *eol ? eol + 1 : eol;
	}
	r->body = xstrndup("", 0);
	return true;
}

static void
free_request(ParsedRequest *r)
{
	free(r->uri);
	for (int i = 0; i < r->nheaders; i++)
	{
		free(r->names[i]);
		free(r->values[i]);
	}
	free(r->body);
}

static const char *
json_str(json_object *obj, const char *key)
{
	json_object *v;

	if (obj && json_object_object_get_ex(obj, key, &v) && json_object_is_type(v, json_type_string))
		return json_object_get_string(v);
	return NULL;
}

static bool
ctx_bool(json_object *obj, const char *key, bool dflt)
{
	json_object *v;

	if (obj && json_object_object_get_ex(obj, key, &v))
		return json_object_get_boolean(v);
	return dflt;
}

static void
sha256_hex(const void *data, size_t len, char out[65])
{
	unsigned char md[32];
	unsigned int mdlen;

	EVP_Digest(data, len, md, &mdlen, EVP_sha256(), NULL);
	for (int i = 0; i < 32; i++)
		sprintf(out + 2 * i, "%02x", md[i]);
}

/* The Authorization value from header-signed-request.txt. */
static char *
expected_authorization(const char *signed_request)
{
	const char *p = strstr(signed_request, "\nAuthorization:");
	const char *end;

	if (p == NULL)
		return NULL;
	p += strlen("\nAuthorization:");
	while (*p == ' ')
		p++;
	end = strchr(p, '\n');
	return xstrndup(p, end ? (size_t) (end - p) : strlen(p));
}

/* Returns true when the case passed every comparison. */
static bool
run_case(const char *suite, const char *name)
{
	char		dir[1024];
	char	   *ctx_text = NULL;
	char	   *req_text = NULL;
	char	   *exp_creq = NULL;
	char	   *exp_sts = NULL;
	char	   *exp_sig = NULL;
	char	   *exp_signed = NULL;
	char	   *exp_auth = NULL;
	json_object *ctx = NULL;
	json_object *credobj = NULL;
	ParsedRequest pr;
	Sigv4Header headers[MAX_HEADERS + 2];
	int			nh = 0;
	Sigv4Request req;
	Sigv4Credentials cred;
	Sigv4Debug dbg;
	char		amz_date[17];
	char		body_hash[65];
	char		auth[2048];
	char		err[256] = "";
	const char *ts;
	struct tm	tm;
	bool		ok = false;
	int			before = unit_failed;

	snprintf(dir, sizeof(dir), "%s/%s", suite, name);
	ctx_text = read_case_file(dir, "context.json", true);
	/* The body is the rest of request.txt, byte for byte: no stripping. */
	req_text = read_case_file(dir, "request.txt", false);
	exp_creq = read_case_file(dir, "header-canonical-request.txt", true);
	exp_sts = read_case_file(dir, "header-string-to-sign.txt", true);
	exp_sig = read_case_file(dir, "header-signature.txt", true);
	exp_signed = read_case_file(dir, "header-signed-request.txt", true);
	CHECK(ctx_text && req_text && exp_creq && exp_sts && exp_sig && exp_signed,
		  "%s: a case file is missing", name);
	if (!(ctx_text && req_text && exp_creq && exp_sts && exp_sig && exp_signed))
		goto out;

	memset(&pr, 0, sizeof(pr));
	ctx = json_tokener_parse(ctx_text);
	CHECK(ctx != NULL, "%s: context.json does not parse", name);
	CHECK(parse_request(req_text, &pr), "%s: request.txt does not parse", name);
	if (ctx == NULL || pr.uri == NULL)
		goto out_req;
	json_object_object_get_ex(ctx, "credentials", &credobj);

	/* "2015-08-30T12:36:00Z" -> time_t -> our own formatter. */
	ts = json_str(ctx, "timestamp");
	memset(&tm, 0, sizeof(tm));
	CHECK(ts && strptime(ts, "%Y-%m-%dT%H:%M:%SZ", &tm) != NULL, "%s: bad timestamp", name);
	sigv4_format_amz_date(timegm(&tm), amz_date);

	for (int i = 0; i < pr.nheaders; i++)
	{
		headers[nh].name = pr.names[i];
		headers[nh].value = pr.values[i];
		nh++;
	}
	headers[nh].name = "X-Amz-Date";
	headers[nh].value = amz_date;
	nh++;
	if (ctx_bool(ctx, "sign_body", false))
	{
		sha256_hex(pr.body, pr.body_len, body_hash);
		headers[nh].name = "x-amz-content-sha256";
		headers[nh].value = body_hash;
		nh++;
	}

	req.method = pr.method;
	req.uri = pr.uri;
	req.headers = headers;
	req.nheaders = nh;
	req.payload = (const unsigned char *) pr.body;
	req.payload_len = pr.body_len;
	cred.access_key_id = json_str(credobj, "access_key_id");
	cred.secret_access_key = json_str(credobj, "secret_access_key");
	cred.session_token = json_str(credobj, "token");

	memset(&dbg, 0, sizeof(dbg));
	if (sigv4_sign(&req, &cred, json_str(ctx, "region"), json_str(ctx, "service"),
				   amz_date, ctx_bool(ctx, "normalize", true),
				   !ctx_bool(ctx, "omit_session_token", false),
				   auth, sizeof(auth), &dbg, err, sizeof(err)) != 0)
	{
		CHECK(false, "%s: sigv4_sign failed: %s", name, err);
		goto out_req;
	}
	exp_auth = expected_authorization(exp_signed);
	CHECK(strcmp(dbg.canonical_request, exp_creq) == 0,
		  "%s: canonical request\n--- got\n%s\n--- expected\n%s", name,
		  dbg.canonical_request, exp_creq);
	CHECK(strcmp(dbg.string_to_sign, exp_sts) == 0,
		  "%s: string to sign\n--- got\n%s\n--- expected\n%s", name,
		  dbg.string_to_sign, exp_sts);
	CHECK(strcmp(dbg.signature, exp_sig) == 0,
		  "%s: signature %s, expected %s", name, dbg.signature, exp_sig);
	CHECK(exp_auth && strcmp(auth, exp_auth) == 0,
		  "%s: authorization\n got %s\n expected %s", name, auth, exp_auth ? exp_auth : "?");
	ok = unit_failed == before;

out_req:
	free_request(&pr);
out:
	if (ctx)
		json_object_put(ctx);
	free(ctx_text);
	free(req_text);
	free(exp_creq);
	free(exp_sts);
	free(exp_sig);
	free(exp_signed);
	free(exp_auth);
	return ok;
}

static int
only_dirs(const struct dirent *d)
{
	return d->d_name[0] != '.';
}

static void
test_suite(void)
{
	char		suite[1024];
	struct dirent **list = NULL;
	int			n;
	int			ncases = 0;
	int			npassed = 0;

	snprintf(suite, sizeof(suite), "%s/sigv4/v4", UNIT_VECTORS_DIR);
	n = scandir(suite, &list, only_dirs, alphasort);
	CHECK(n > 0, "sigv4 test suite not found at %s", suite);
	for (int i = 0; i < n; i++)
	{
		ncases++;
		if (run_case(suite, list[i]->d_name))
			npassed++;
		free(list[i]);
	}
	free(list);
	printf("sigv4 suite: %d/%d cases passed\n", npassed, ncases);
	CHECK(ncases == EXPECTED_CASES, "expected %d cases in %s, found %d",
		  EXPECTED_CASES, suite, ncases);
	CHECK(npassed == ncases, "%d of %d cases failed", ncases - npassed, ncases);
}

/* Argument checking, and a KMS-shaped request with a session token. */
static void
test_api(void)
{
	Sigv4Header h[] = {
		{"Host", "kms.us-east-1.amazonaws.com"},
		{"X-Amz-Date", "20240101T000000Z"},
		{"Content-Type", "application/x-amz-json-1.1"},
		{"X-Amz-Target", "TrentService.Decrypt"},
	};
	const char *body = "{}";
	Sigv4Request req = {"POST", "/", h, 4, (const unsigned char *) body, 2};
	Sigv4Credentials cred = {"AKID", "SECRET", "TOKEN"};
	Sigv4Debug dbg;
	char		auth[1024];
	char		small[20];
	char		err[128];
	char		date[17];

	sigv4_format_amz_date(0, date);
	CHECK(strcmp(date, "19700101T000000Z") == 0, "format epoch: %s", date);
	sigv4_format_amz_date(1440938160, date);
	CHECK(strcmp(date, "20150830T123600Z") == 0, "format 2015: %s", date);

	CHECK(sigv4_sign(&req, &cred, "us-east-1", "kms", "20240101T000000Z", true, true,
					 auth, sizeof(auth), &dbg, err, sizeof(err)) == 0, "kms sign: %s", err);
	CHECK(strncmp(auth, "AWS4-HMAC-SHA256 Credential=AKID/20240101/us-east-1/kms/aws4_request, "
				  "SignedHeaders=content-type;host;x-amz-date;x-amz-security-token;x-amz-target, "
				  "Signature=", 137) == 0, "kms authorization: %s", auth);
	CHECK(strstr(dbg.canonical_request, "x-amz-security-token:TOKEN\n") != NULL,
		  "token signed");

	/* The token header given by the caller too: signed once. */
	{
		Sigv4Header h2[] = {
			{"Host", "kms.us-east-1.amazonaws.com"},
			{"X-Amz-Date", "20240101T000000Z"},
			{"X-Amz-Security-Token", "TOKEN"},
		};
		Sigv4Request r2 = {"POST", "/", h2, 3, NULL, 0};

		CHECK(sigv4_sign(&r2, &cred, "us-east-1", "kms", "20240101T000000Z", true, true,
						 auth, sizeof(auth), &dbg, err, sizeof(err)) == 0, "sign: %s", err);
		CHECK(strstr(auth, "SignedHeaders=host;x-amz-date;x-amz-security-token,") != NULL,
			  "token signed once: %s", auth);
	}

	CHECK(sigv4_sign(&req, &cred, "us-east-1", "kms", "2024-01-01", true, true,
					 auth, sizeof(auth), NULL, err, sizeof(err)) == -1 && err[0],
		  "bad date refused");
	CHECK(sigv4_sign(&req, &cred, "us-east-1", "kms", "20240102T000000Z", true, true,
					 auth, sizeof(auth), NULL, err, sizeof(err)) == -1,
		  "date mismatch with x-amz-date refused");
	req.nheaders = 1;
	CHECK(sigv4_sign(&req, &cred, "us-east-1", "kms", "20240101T000000Z", true, true,
					 auth, sizeof(auth), NULL, err, sizeof(err)) == -1,
		  "missing x-amz-date refused");
	req.nheaders = 4;
	CHECK(sigv4_sign(&req, &cred, "us/east", "kms", "20240101T000000Z", true, true,
					 auth, sizeof(auth), NULL, err, sizeof(err)) == -1,
		  "bad region refused");
	CHECK(sigv4_sign(&req, &cred, "us-east-1", "kms", "20240101T000000Z", true, true,
					 small, sizeof(small), NULL, err, sizeof(err)) == -1 && small[0] == '\0',
		  "small buffer refused");
	CHECK(strstr(err, "SECRET") == NULL && strstr(err, "TOKEN") == NULL, "no secret in error");
	cred.secret_access_key = "";
	CHECK(sigv4_sign(&req, &cred, "us-east-1", "kms", "20240101T000000Z", true, true,
					 auth, sizeof(auth), NULL, err, sizeof(err)) == -1,
		  "empty secret refused");
}

int
main(void)
{
	test_suite();
	test_api();
	return unit_finish("test_sigv4");
}
