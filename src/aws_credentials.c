/*
 * aws_credentials.c — the AWS credential provider chain, in the order the AWS SDKs use.
 *
 * Plain C on http.h, json-c and OpenSSL: no postgres.h, no ereport.  The chain, first
 * source that yields credentials wins:
 *
 *   1. environment: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN;
 *   2. shared files: the credentials file (AWS_SHARED_CREDENTIALS_FILE, ~/.aws/credentials)
 *      then the config file (AWS_CONFIG_FILE, ~/.aws/config, "[profile x]" sections),
 *      static keys only, profile from envelope.aws_profile, else AWS_PROFILE, else
 *      "default";
 *   3. web identity: AWS_WEB_IDENTITY_TOKEN_FILE + AWS_ROLE_ARN, exchanged at STS
 *      (AssumeRoleWithWebIdentity, an unsigned request);
 *   4. ECS container credentials (AWS_CONTAINER_CREDENTIALS_RELATIVE_URI or _FULL_URI);
 *   5. EC2 instance role through IMDSv2.  IMDSv1 is never used: without a session token
 *      from the PUT we give up, because an IMDSv1 GET is what SSRF attacks replay.
 *
 * As in the SDKs, a source that is configured but fails (a partial key pair, a refused
 * web identity token, a container endpoint that answers 403) stops the chain with its
 * own error instead of silently falling through to a weaker source; a source that is
 * simply absent (no variables, no profile, no metadata service) moves on.
 *
 * Results are cached per process and refreshed when less than CRED_REFRESH_MARGIN
 * seconds remain; if the refresh fails while the cached credentials are still valid,
 * they are used until they expire, so a brief STS or IMDS hiccup costs nothing.
 *
 * Secrets: every buffer that held a key, a token or a response body is wiped on every
 * path — files read, request and response bodies, json-c's copies of string values and
 * its parse buffer.  Error messages are built from fixed text, source names, HTTP
 * status codes and AWS error codes only.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE			/* memmem, timegm */
#endif
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <pwd.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <json-c/json.h>
#include <openssl/crypto.h>

#include "aws_credentials.h"
#include "aws_json.h"
#include "http.h"
#include "util.h"

/* Refresh temporary credentials this many seconds before they expire. */
#define CRED_REFRESH_MARGIN 300

/* Metadata endpoints answer in milliseconds; off EC2/ECS they must fail fast. */
#define METADATA_TIMEOUT_MS 1000
#define ECS_TIMEOUT_MS 2000
#define STS_DEFAULT_TIMEOUT_MS 5000

#define CRED_MAX_RESPONSE (64 * 1024)
#define CRED_MAX_FILE (1024 * 1024)
#define CRED_MAX_TOKEN_FILE (64 * 1024)

#define ECS_DEFAULT_ENDPOINT "http://169.254.170.2"
#define IMDS_DEFAULT_ENDPOINT "http://169.254.169.254"
#define IMDS_TOKEN_TTL_SECONDS "21600"

typedef enum SourceResult
{
	SOURCE_FOUND,				/* *out filled */
	SOURCE_ABSENT,				/* not configured or not there: try the next one */
	SOURCE_FAILED				/* configured but failed: err filled, stop */
} SourceResult;

/* What the chain looked at, for the "nothing found" message. */
typedef struct Tried
{
	char		text[200];
} Tried;

static AwsCredentials cache;
static bool cache_valid = false;
static char cache_profile[128];

/* ------------------------------------------------------------------------ */
/* Small helpers                                                             */
/* ------------------------------------------------------------------------ */

static const char *
env_nonempty(const char *name)
{
	const char *v = getenv(name);

	return v && v[0] ? v : NULL;
}

static void tried_add(Tried *t, const char *fmt,...) __attribute__((format(printf, 2, 3)));

static void
tried_add(Tried *t, const char *fmt,...)
{
	size_t		used = strlen(t->text);
	va_list		ap;

	if (used > 0 && used + 2 < sizeof(t->text))
	{
		strcat(t->text, ", ");
		used += 2;
	}
	va_start(ap, fmt);
	vsnprintf(t->text + used, sizeof(t->text) - used, fmt, ap);
	va_end(ap);
}

/* Copy a value into a fixed field; false if it does not fit (nothing is truncated). */
static bool
set_field(char *dst, size_t dstlen, const char *src, size_t srclen)
{
	if (srclen >= dstlen)
		return false;
	memcpy(dst, src, srclen);
	dst[srclen] = '\0';
	return true;
}

static void
trim_in_place(char *s)
{
	size_t		n = strlen(s);
	size_t		start = 0;

	while (n > 0 && isspace((unsigned char) s[n - 1]))
		s[--n] = '\0';
	while (start < n && isspace((unsigned char) s[start]))
		start++;
	if (start > 0)
		memmove(s, s + start, n - start + 1);
}

/* A value we will put in a header or a URL must be one printable line. */
static bool
is_printable_line(const char *s)
{
	for (const unsigned char *p = (const unsigned char *) s; *p; p++)
		if (*p < 0x20 || *p == 0x7f)
			return false;
	return true;
}

/*
 * Read a whole small file into a NUL-terminated malloc'd buffer.  *alloc_len gets the
 * allocation size for wiping.  Returns NULL with errno set on failure.
 *
 * A character device is read as a stream up to maxlen bytes: SDK users switch the
 * shared files off with AWS_SHARED_CREDENTIALS_FILE=/dev/null (and AWS_CONFIG_FILE),
 * which the SDKs read as empty files.  Other non-regular files (directories, FIFOs,
 * whose open can block) are refused.
 */
static char *
read_small_file(const char *path, size_t maxlen, size_t *alloc_len)
{
	int			fd;
	struct stat st;
	char	   *buf;
	size_t		capacity;
	size_t		len = 0;
	bool		stream;

	/*
	 * O_NONBLOCK, so that opening a FIFO nobody writes to cannot hang the backend
	 * before the file type is checked; it is cleared again for reading.
	 */
	fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
	if (fd < 0)
		return NULL;
	if (fstat(fd, &st) != 0)
	{
		int			save_errno = errno;

		close(fd);
		errno = save_errno;
		return NULL;
	}
	stream = S_ISCHR(st.st_mode);
	if (!stream && (!S_ISREG(st.st_mode) || (size_t) st.st_size > maxlen))
	{
		close(fd);
		errno = S_ISREG(st.st_mode) ? EFBIG : EINVAL;
		return NULL;
	}
	if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK) != 0)
	{
		int			save_errno = errno;

		close(fd);
		errno = save_errno;
		return NULL;
	}
	/* One more byte than allowed, so that a stream longer than maxlen is noticed. */
	capacity = stream ? maxlen + 1 : (size_t) st.st_size;
	buf = malloc(capacity + 1);
	if (buf == NULL)
	{
		close(fd);
		return NULL;
	}
	while (len < capacity)
	{
		ssize_t		r = read(fd, buf + len, capacity - len);

		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
		{
			/* A read error is not the end of the file: never use half a file. */
			int			save_errno = errno;

			close(fd);
			explicit_bzero(buf, capacity + 1);
			free(buf);
			errno = save_errno;
			return NULL;
		}
		if (r == 0)
			break;
		len += (size_t) r;
	}
	close(fd);
	if (stream && len > maxlen)
	{
		explicit_bzero(buf, capacity + 1);
		free(buf);
		errno = EFBIG;
		return NULL;
	}
	buf[len] = '\0';
	*alloc_len = capacity + 1;
	return buf;
}

/*
 * Parse an ISO 8601 UTC time as AWS writes it: "2024-01-01T00:00:00Z", optionally
 * with fractional seconds or a numeric offset.
 */
static bool
parse_iso8601(const char *s, time_t *out)
{
	struct tm	tm;
	int			n = 0;
	int			offset = 0;
	const char *p;

	memset(&tm, 0, sizeof(tm));
	if (sscanf(s, "%4d-%2d-%2dT%2d:%2d:%2d%n", &tm.tm_year, &tm.tm_mon, &tm.tm_mday,
			   &tm.tm_hour, &tm.tm_min, &tm.tm_sec, &n) != 6 || n == 0)
		return false;
	p = s + n;
	if (*p == '.')
	{
		p++;
		while (isdigit((unsigned char) *p))
			p++;
	}
	if (*p == 'Z' || *p == 'z')
		p++;
	else if (*p == '+' || *p == '-')
	{
		/* Exactly "HH:MM": sscanf would also take "1:0" and p would pass the end. */
		for (int i = 1; i <= 5; i++)
			if (i == 3 ? p[i] != ':' : !isdigit((unsigned char) p[i]))
				return false;
		offset = ((p[1] - '0') * 10 + (p[2] - '0')) * 3600 +
			((p[4] - '0') * 10 + (p[5] - '0')) * 60;
		if (*p == '-')
			offset = -offset;
		p += 6;
	}
	if (*p != '\0' || tm.tm_mon < 1 || tm.tm_mon > 12 || tm.tm_mday < 1 ||
		tm.tm_mday > 31 || tm.tm_hour > 23 || tm.tm_min > 59 || tm.tm_sec > 60)
		return false;
	tm.tm_year -= 1900;
	tm.tm_mon -= 1;
	*out = timegm(&tm) - offset;
	return *out > 0;
}

static KmsStatus
http_failure_status(HttpStatus st)
{
	switch (st)
	{
		case HTTP_ERR_CANCELED:
			return KMS_ERR_CANCELED;
		case HTTP_ERR_TIMEOUT:
			return KMS_ERR_TIMEOUT;
		case HTTP_ERR_INTERNAL:
			return KMS_ERR_INTERNAL;
		case HTTP_ERR_TOO_LARGE:
			return KMS_ERR_PROTOCOL;
		default:
			return KMS_ERR_UNAVAILABLE;
	}
}

static int
request_timeout(const KmsConfig *cfg, int cap)
{
	if (cfg->timeout_ms > 0 && cfg->timeout_ms < cap)
		return cfg->timeout_ms;
	return cap;
}

/*
 * One request to a credential endpoint (STS, ECS, IMDS): no retries here, since a
 * source that does not answer either falls through to the next one or fails the chain.
 * Counts the attempt in err.  The caller frees *resp.
 */
static HttpStatus
cred_request(const KmsConfig *cfg, const char *method, const char *url,
			 const char *const *headers, int nheaders, const char *body, size_t body_len,
			 int timeout_ms, HttpResponse *resp, char *herr, size_t herrlen, KmsError *err)
{
	HttpRequest req;

	memset(&req, 0, sizeof(req));
	req.method = method;
	req.url = url;
	req.headers = headers;
	req.nheaders = nheaders;
	req.body = body;
	req.body_len = body_len;
	req.timeout_ms = timeout_ms;
	req.max_response = CRED_MAX_RESPONSE;
	req.interrupted = cfg->interrupted;
	/*
	 * Each of these carries a secret one way or the other: the web identity token to
	 * STS, the ECS authorization token, the IMDSv2 session token (both ways), and the
	 * credentials that come back.
	 */
	req.sensitive = true;
	err->attempts++;
	return http_perform(&req, resp, herr, herrlen);
}

/* ------------------------------------------------------------------------ */
/* Parsing answers                                                           */
/* ------------------------------------------------------------------------ */

/*
 * The JSON the ECS and EC2 metadata endpoints return:
 * {"AccessKeyId", "SecretAccessKey", "Token", "Expiration"} (EC2 adds "Code").
 */
static bool
parse_json_credentials(const char *body, size_t len, AwsCredentials *out, const char **why)
{
	json_object *obj = aws_json_parse(body, len, CRED_MAX_RESPONSE);
	const char *v;
	size_t		vlen = 0;
	bool		ok = false;

	*why = "answer is not a JSON object";
	if (obj == NULL || !json_object_is_type(obj, json_type_object))
		goto done;
	v = aws_json_string(obj, "Code", &vlen);
	if (v && strcmp(v, "Success") != 0)
	{
		*why = "answer does not report success";
		goto done;
	}
	*why = "answer lacks AccessKeyId, SecretAccessKey or Expiration";
	v = aws_json_string(obj, "AccessKeyId", &vlen);
	if (v == NULL || vlen == 0 ||
		!set_field(out->access_key_id, sizeof(out->access_key_id), v, vlen))
		goto done;
	v = aws_json_string(obj, "SecretAccessKey", &vlen);
	if (v == NULL || vlen == 0 ||
		!set_field(out->secret_access_key, sizeof(out->secret_access_key), v, vlen))
		goto done;
	v = aws_json_string(obj, "Token", &vlen);
	if (v && !set_field(out->session_token, sizeof(out->session_token), v, vlen))
	{
		*why = "session token is too long";
		goto done;
	}
	v = aws_json_string(obj, "Expiration", &vlen);
	if (v == NULL || !parse_iso8601(v, &out->expiration))
		goto done;
	ok = true;

done:
	aws_json_free(obj);
	return ok;
}

/*
 * Find the content of the first element <name ...>...</name> in [start, end).
 * Enough XML for STS answers: no namespace prefixes, no CDATA (content holding '<'
 * is refused by xml_copy_text).
 */
static const char *
xml_element(const char *start, const char *end, const char *name, size_t *len)
{
	size_t		nlen = strlen(name);
	const char *p = start;

	while (p < end)
	{
		const char *lt = memchr(p, '<', end - p);
		const char *gt;
		const char *close;
		char		after;

		if (lt == NULL || lt + 1 + nlen >= end)
			return NULL;
		after = lt[1 + nlen];
		if (memcmp(lt + 1, name, nlen) != 0 ||
			!(after == '>' || after == '/' || isspace((unsigned char) after)))
		{
			p = lt + 1;
			continue;
		}
		gt = memchr(lt, '>', end - lt);
		if (gt == NULL)
			return NULL;
		if (gt[-1] == '/')
		{
			*len = 0;
			return gt + 1;
		}
		for (close = gt + 1; close < end; close++)
		{
			close = memmem(close, end - close, "</", 2);
			if (close == NULL)
				return NULL;
			if (close + 2 + nlen < end && memcmp(close + 2, name, nlen) == 0 &&
				close[2 + nlen] == '>')
			{
				*len = close - (gt + 1);
				return gt + 1;
			}
		}
		return NULL;
	}
	return NULL;
}

/* Copy element text, decoding the five XML entities and numeric ASCII references. */
static bool
xml_copy_text(const char *s, size_t n, char *dst, size_t dstlen)
{
	size_t		o = 0;

	for (size_t i = 0; i < n; i++)
	{
		char		c = s[i];

		if (c == '<')
			return false;
		if (c == '&')
		{
			const char *semi = memchr(s + i, ';', n - i);
			size_t		elen;

			if (semi == NULL)
				return false;
			elen = semi - (s + i) + 1;
			if (elen == 5 && memcmp(s + i, "&amp;", 5) == 0)
				c = '&';
			else if (elen == 4 && memcmp(s + i, "&lt;", 4) == 0)
				c = '<';
			else if (elen == 4 && memcmp(s + i, "&gt;", 4) == 0)
				c = '>';
			else if (elen == 6 && memcmp(s + i, "&quot;", 6) == 0)
				c = '"';
			else if (elen == 6 && memcmp(s + i, "&apos;", 6) == 0)
				c = '\'';
			else if (elen > 3 && s[i + 1] == '#')
			{
				char		num[16];
				long		v;
				char	   *endp;

				if (elen - 3 >= sizeof(num))
					return false;
				memcpy(num, s + i + 2, elen - 3);
				num[elen - 3] = '\0';
				v = (num[0] == 'x' || num[0] == 'X') ? strtol(num + 1, &endp, 16) :
					strtol(num, &endp, 10);
				if (*endp != '\0' || v <= 0 || v > 0x7e)
					return false;
				c = (char) v;
			}
			else
				return false;
			i += elen - 1;
		}
		if (o + 1 >= dstlen)
			return false;
		dst[o++] = c;
	}
	dst[o] = '\0';
	return true;
}

static bool
xml_field(const char *start, const char *end, const char *name, char *dst, size_t dstlen)
{
	size_t		len = 0;
	const char *v = xml_element(start, end, name, &len);

	return v != NULL && xml_copy_text(v, len, dst, dstlen);
}

/* The AWS error code of an XML error answer, if it is a plain identifier. */
static void
xml_error_code(const char *body, size_t len, char *code, size_t codelen)
{
	size_t		elen = 0;
	const char *e = xml_element(body, body + len, "Error", &elen);

	code[0] = '\0';
	if (e == NULL || !xml_field(e, e + elen, "Code", code, codelen))
	{
		code[0] = '\0';
		return;
	}
	for (char *p = code; *p; p++)
		if (!isalnum((unsigned char) *p) && *p != '.' && *p != '_')
		{
			code[0] = '\0';
			return;
		}
}

/* ------------------------------------------------------------------------ */
/* 1. Environment                                                            */
/* ------------------------------------------------------------------------ */

static SourceResult
source_environment(AwsCredentials *out, Tried *tried, KmsError *err)
{
	const char *id = env_nonempty("AWS_ACCESS_KEY_ID");
	const char *secret = env_nonempty("AWS_SECRET_ACCESS_KEY");
	const char *token = env_nonempty("AWS_SESSION_TOKEN");

	if (id == NULL && secret == NULL)
	{
		tried_add(tried, "environment");
		return SOURCE_ABSENT;
	}
	if (id == NULL || secret == NULL)
	{
		kms_set_error(err, KMS_ERR_CREDENTIALS, NULL,
					  "incomplete AWS credentials in the environment: %s is set but %s is not",
					  id ? "AWS_ACCESS_KEY_ID" : "AWS_SECRET_ACCESS_KEY",
					  id ? "AWS_SECRET_ACCESS_KEY" : "AWS_ACCESS_KEY_ID");
		return SOURCE_FAILED;
	}
	if (!set_field(out->access_key_id, sizeof(out->access_key_id), id, strlen(id)) ||
		!set_field(out->secret_access_key, sizeof(out->secret_access_key), secret,
				   strlen(secret)) ||
		(token && !set_field(out->session_token, sizeof(out->session_token), token,
							 strlen(token))))
	{
		kms_set_error(err, KMS_ERR_CREDENTIALS, NULL,
					  "AWS credentials in the environment are too long");
		return SOURCE_FAILED;
	}
	out->expiration = 0;
	snprintf(out->source, sizeof(out->source), "environment");
	return SOURCE_FOUND;
}

/* ------------------------------------------------------------------------ */
/* 2. Shared credentials and config files                                    */
/* ------------------------------------------------------------------------ */

typedef struct IniResult
{
	bool		section_found;
	bool		too_long;
	bool		has_id;
	bool		has_secret;
	bool		has_token;
} IniResult;

static const char *
effective_profile(const KmsConfig *cfg)
{
	if (cfg->aws_profile && cfg->aws_profile[0])
		return cfg->aws_profile;
	if (env_nonempty("AWS_PROFILE"))
		return getenv("AWS_PROFILE");
	return "default";
}

/*
 * Does section header text sec[0..len) name `profile`?  In the credentials file a
 * section is the bare profile name; in the config file it is "profile <name>", except
 * that the default profile may also be plain "default".
 */
static bool
section_matches(const char *sec, size_t len, const char *profile, bool config_file)
{
	size_t		plen = strlen(profile);

	if (config_file && len > 7 && memcmp(sec, "profile", 7) == 0 &&
		isspace((unsigned char) sec[7]))
	{
		size_t		i = 7;

		while (i < len && isspace((unsigned char) sec[i]))
			i++;
		return len - i == plen && memcmp(sec + i, profile, plen) == 0;
	}
	if (config_file && strcmp(profile, "default") != 0)
		return false;
	return len == plen && memcmp(sec, profile, plen) == 0;
}

/*
 * A careful INI reader for the AWS files: '#' and ';' comment lines, blank lines,
 * whitespace around names, '=' and values, CRLF endings, repeated sections (later keys
 * win).  An indented line after a key continues that key (AWS nested settings such as
 * "s3 =\n  max_concurrent_requests = 10"), so a nested key never counts as a top-level
 * one.  Only static credential keys of the wanted profile are taken.
 */
static void
ini_read_profile(const char *text, const char *profile, bool config_file,
				 AwsCredentials *out, IniResult *res)
{
	const char *p = text;
	bool		in_profile = false;
	bool		after_key = false;

	while (*p)
	{
		const char *eol = strchr(p, '\n');
		const char *line_end = eol ? eol : p + strlen(p);
		const char *s = p;
		const char *e = line_end;
		bool		indented;

		p = eol ? eol + 1 : line_end;

		while (e > s && isspace((unsigned char) e[-1]))
			e--;
		indented = s < e && isspace((unsigned char) *s);
		while (s < e && isspace((unsigned char) *s))
			s++;
		if (s == e || *s == '#' || *s == ';')
			continue;

		if (*s == '[')
		{
			const char *close = e - 1;
			const char *ns = s + 1;
			const char *ne;

			after_key = false;
			in_profile = false;
			if (*close != ']')
				continue;		/* malformed header: ignore what follows it */
			ne = close;
			while (ns < ne && isspace((unsigned char) *ns))
				ns++;
			while (ne > ns && isspace((unsigned char) ne[-1]))
				ne--;
			in_profile = section_matches(ns, ne - ns, profile, config_file);
			if (in_profile)
				res->section_found = true;
			continue;
		}

		if (indented && after_key)
			continue;

		{
			const char *eq = memchr(s, '=', e - s);
			const char *ke;
			const char *vs;
			size_t		klen;
			char	   *dst = NULL;
			size_t		dstlen = 0;
			bool	   *flag = NULL;

			if (eq == NULL)
				continue;
			after_key = true;
			if (!in_profile)
				continue;
			ke = eq;
			while (ke > s && isspace((unsigned char) ke[-1]))
				ke--;
			klen = ke - s;
			vs = eq + 1;
			while (vs < e && isspace((unsigned char) *vs))
				vs++;

			if (klen == 17 && strncasecmp(s, "aws_access_key_id", 17) == 0)
			{
				dst = out->access_key_id;
				dstlen = sizeof(out->access_key_id);
				flag = &res->has_id;
			}
			else if (klen == 21 && strncasecmp(s, "aws_secret_access_key", 21) == 0)
			{
				dst = out->secret_access_key;
				dstlen = sizeof(out->secret_access_key);
				flag = &res->has_secret;
			}
			else if ((klen == 17 && strncasecmp(s, "aws_session_token", 17) == 0) ||
					 (klen == 18 && strncasecmp(s, "aws_security_token", 18) == 0))
			{
				dst = out->session_token;
				dstlen = sizeof(out->session_token);
				flag = &res->has_token;
			}
			if (dst == NULL)
				continue;
			if (!set_field(dst, dstlen, vs, e - vs))
			{
				res->too_long = true;
				continue;
			}
			*flag = e > vs;
		}
	}
}

static bool
home_path(const char *rel, char *buf, size_t buflen)
{
	const char *home = env_nonempty("HOME");
	struct passwd pw;
	struct passwd *pwp = NULL;
	char		pwbuf[1024];

	if (home == NULL)
	{
		if (getpwuid_r(getuid(), &pw, pwbuf, sizeof(pwbuf), &pwp) != 0 || pwp == NULL ||
			pw.pw_dir == NULL)
			return false;
		home = pw.pw_dir;
	}
	return snprintf(buf, buflen, "%s/%s", home, rel) < (int) buflen;
}

static SourceResult
source_shared_files(const KmsConfig *cfg, AwsCredentials *out, Tried *tried, KmsError *err)
{
	const char *profile = effective_profile(cfg);
	/* As in botocore: naming a profile that does not exist is an error, except "default". */
	bool		explicit_profile = strcmp(profile, "default") != 0;
	bool		any_section = false;

	for (int f = 0; f < 2; f++)
	{
		bool		config_file = f == 1;
		const char *envname = config_file ? "AWS_CONFIG_FILE" : "AWS_SHARED_CREDENTIALS_FILE";
		char		path[1024];
		char	   *text;
		size_t		alloc_len = 0;
		IniResult	res;

		if (env_nonempty(envname))
			snprintf(path, sizeof(path), "%s", getenv(envname));
		else if (!home_path(config_file ? ".aws/config" : ".aws/credentials", path,
							sizeof(path)))
			continue;

		text = read_small_file(path, CRED_MAX_FILE, &alloc_len);
		if (text == NULL)
		{
			if (errno == ENOENT || errno == ENOTDIR)
				continue;
			kms_set_error(err, KMS_ERR_CREDENTIALS, NULL,
						  "could not read AWS %s file \"%s\": %s",
						  config_file ? "config" : "shared credentials", path,
						  strerror(errno));
			return SOURCE_FAILED;
		}
		memset(&res, 0, sizeof(res));
		ini_read_profile(text, profile, config_file, out, &res);
		util_wipe_free(text, alloc_len);

		any_section |= res.section_found;
		if (res.too_long)
		{
			kms_set_error(err, KMS_ERR_CREDENTIALS, NULL,
						  "a credential of AWS profile \"%s\" in \"%s\" is too long",
						  profile, path);
			return SOURCE_FAILED;
		}
		if (res.has_id != res.has_secret)
		{
			kms_set_error(err, KMS_ERR_CREDENTIALS, NULL,
						  "AWS profile \"%s\" in \"%s\" has %s but not %s", profile, path,
						  res.has_id ? "aws_access_key_id" : "aws_secret_access_key",
						  res.has_id ? "aws_secret_access_key" : "aws_access_key_id");
			return SOURCE_FAILED;
		}
		if (res.has_id && res.has_secret)
		{
			if (!res.has_token)
				out->session_token[0] = '\0';
			out->expiration = 0;
			snprintf(out->source, sizeof(out->source), "shared-file");
			return SOURCE_FOUND;
		}
		/* A section without keys (region only, say): nothing from this file. */
		aws_credentials_wipe(out);
	}

	if (explicit_profile && !any_section)
	{
		kms_set_error(err, KMS_ERR_CONFIG, NULL,
					  "AWS profile \"%s\" not found in the shared credentials or config file",
					  profile);
		return SOURCE_FAILED;
	}
	tried_add(tried, "shared-file (profile \"%s\"%s)", profile,
			  any_section ? " has no static keys" : "");
	return SOURCE_ABSENT;
}

/* ------------------------------------------------------------------------ */
/* 3. Web identity (STS AssumeRoleWithWebIdentity)                           */
/* ------------------------------------------------------------------------ */

/* Append application/x-www-form-urlencoded text; false when it does not fit. */
static bool
form_append(char *buf, size_t buflen, size_t *pos, const char *s)
{
	static const char digits[] = "0123456789ABCDEF";

	for (const unsigned char *p = (const unsigned char *) s; *p; p++)
	{
		if (*pos + 4 > buflen)
			return false;
		if (isalnum(*p) || *p == '-' || *p == '.' || *p == '_' || *p == '~')
			buf[(*pos)++] = (char) *p;
		else
		{
			buf[(*pos)++] = '%';
			buf[(*pos)++] = digits[*p >> 4];
			buf[(*pos)++] = digits[*p & 0x0f];
		}
	}
	buf[*pos] = '\0';
	return true;
}

static bool
form_raw(char *buf, size_t buflen, size_t *pos, const char *s)
{
	size_t		n = strlen(s);

	if (*pos + n + 1 > buflen)
		return false;
	memcpy(buf + *pos, s, n + 1);
	*pos += n;
	return true;
}

static void
sts_endpoint(const KmsConfig *cfg, char *url, size_t urllen)
{
	const char *region = cfg->aws_region && cfg->aws_region[0] ? cfg->aws_region :
		env_nonempty("AWS_REGION") ? getenv("AWS_REGION") :
		env_nonempty("AWS_DEFAULT_REGION") ? getenv("AWS_DEFAULT_REGION") : NULL;

	if (env_nonempty("AWS_ENDPOINT_URL_STS"))
		snprintf(url, urllen, "%s", getenv("AWS_ENDPOINT_URL_STS"));
	else if (region == NULL)
		snprintf(url, urllen, "https://sts.amazonaws.com/");
	else
		snprintf(url, urllen, "https://sts.%s.amazonaws.com%s/", region,
				 strncmp(region, "cn-", 3) == 0 ? ".cn" : "");
}

static SourceResult
source_web_identity(const KmsConfig *cfg, AwsCredentials *out, Tried *tried, KmsError *err)
{
	const char *token_file = env_nonempty("AWS_WEB_IDENTITY_TOKEN_FILE");
	const char *role_arn = env_nonempty("AWS_ROLE_ARN");
	const char *session = env_nonempty("AWS_ROLE_SESSION_NAME");
	char		session_buf[64];
	char	   *token = NULL;
	size_t		token_alloc = 0;
	char	   *body = NULL;
	size_t		body_cap = 0;
	size_t		pos = 0;
	char		url[1024];
	const char *headers[] = {
		"Content-Type: application/x-www-form-urlencoded; charset=utf-8",
		"Accept: application/xml",
	};
	HttpResponse resp;
	HttpStatus	hst;
	char		herr[256];
	SourceResult result = SOURCE_FAILED;

	memset(&resp, 0, sizeof(resp));
	if (token_file == NULL && role_arn == NULL)
	{
		tried_add(tried, "web-identity (not configured)");
		return SOURCE_ABSENT;
	}
	if (token_file == NULL || role_arn == NULL)
	{
		kms_set_error(err, KMS_ERR_CONFIG, NULL,
					  "web identity credentials need both AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN");
		return SOURCE_FAILED;
	}
	if (session == NULL)
	{
		snprintf(session_buf, sizeof(session_buf), "pg_envelope-%ld", (long) time(NULL));
		session = session_buf;
	}

	token = read_small_file(token_file, CRED_MAX_TOKEN_FILE, &token_alloc);
	if (token == NULL)
	{
		kms_set_error(err, KMS_ERR_CREDENTIALS, NULL,
					  "could not read web identity token file \"%s\": %s", token_file,
					  strerror(errno));
		return SOURCE_FAILED;
	}
	trim_in_place(token);
	if (token[0] == '\0')
	{
		kms_set_error(err, KMS_ERR_CREDENTIALS, NULL,
					  "web identity token file \"%s\" is empty", token_file);
		goto done;
	}

	body_cap = 3 * (strlen(token) + strlen(role_arn) + strlen(session)) + 256;
	body = malloc(body_cap);
	if (body == NULL)
	{
		kms_set_error(err, KMS_ERR_INTERNAL, NULL, "out of memory");
		goto done;
	}
	if (!form_raw(body, body_cap, &pos,
				  "Action=AssumeRoleWithWebIdentity&Version=2011-06-15&RoleArn=") ||
		!form_append(body, body_cap, &pos, role_arn) ||
		!form_raw(body, body_cap, &pos, "&RoleSessionName=") ||
		!form_append(body, body_cap, &pos, session) ||
		!form_raw(body, body_cap, &pos, "&WebIdentityToken=") ||
		!form_append(body, body_cap, &pos, token))
	{
		kms_set_error(err, KMS_ERR_INTERNAL, NULL, "web identity request does not fit");
		goto done;
	}

	sts_endpoint(cfg, url, sizeof(url));
	hst = cred_request(cfg, "POST", url, headers, 2, body, pos,
					   cfg->timeout_ms > 0 ? cfg->timeout_ms : STS_DEFAULT_TIMEOUT_MS,
					   &resp, herr, sizeof(herr), err);
	if (hst != HTTP_OK)
	{
		kms_set_error(err, http_failure_status(hst), NULL,
					  "STS AssumeRoleWithWebIdentity failed: %s", herr);
		goto done;
	}
	err->http_status = (int) resp.status;
	if (resp.status != 200)
	{
		char		code[64];

		xml_error_code(resp.body, resp.body_len, code, sizeof(code));
		kms_set_error(err, resp.status >= 500 ? KMS_ERR_UNAVAILABLE : KMS_ERR_CREDENTIALS,
					  code, "STS AssumeRoleWithWebIdentity refused the web identity token: HTTP %ld%s%s",
					  resp.status, code[0] ? " " : "", code);
		goto done;
	}

	{
		const char *b = resp.body;
		const char *e = resp.body + resp.body_len;
		size_t		rlen = 0;
		size_t		clen = 0;
		const char *result_el = xml_element(b, e, "AssumeRoleWithWebIdentityResult", &rlen);
		const char *creds = result_el ? xml_element(result_el, result_el + rlen,
													"Credentials", &clen) : NULL;
		char		expiration[64];

		if (creds == NULL ||
			!xml_field(creds, creds + clen, "AccessKeyId", out->access_key_id,
					   sizeof(out->access_key_id)) ||
			!xml_field(creds, creds + clen, "SecretAccessKey", out->secret_access_key,
					   sizeof(out->secret_access_key)) ||
			!xml_field(creds, creds + clen, "SessionToken", out->session_token,
					   sizeof(out->session_token)) ||
			!xml_field(creds, creds + clen, "Expiration", expiration, sizeof(expiration)) ||
			!parse_iso8601(expiration, &out->expiration) ||
			out->access_key_id[0] == '\0' || out->secret_access_key[0] == '\0')
		{
			aws_credentials_wipe(out);
			kms_set_error(err, KMS_ERR_PROTOCOL, NULL,
						  "STS AssumeRoleWithWebIdentity answer has no usable credentials");
			goto done;
		}
	}
	snprintf(out->source, sizeof(out->source), "web-identity");
	result = SOURCE_FOUND;

done:
	http_response_free(&resp);
	util_wipe_free(body, body_cap);
	util_wipe_free(token, token_alloc);
	return result;
}

/* ------------------------------------------------------------------------ */
/* 4. ECS container credentials                                              */
/* ------------------------------------------------------------------------ */

/*
 * Plain-http full URIs may only point at the container agent or loopback, as the SDKs
 * require: anything else would hand the authorization token to an arbitrary host.
 */
static bool
ecs_host_allowed(const char *url)
{
	const char *h;
	const char *he;
	char		host[256];
	struct in_addr a4;

	if (strncasecmp(url, "https://", 8) == 0)
		return true;
	if (strncasecmp(url, "http://", 7) != 0)
		return false;
	h = url + 7;
	if (strchr(h, '@') && strchr(h, '@') < h + strcspn(h, "/"))
		return false;			/* no userinfo tricks */
	if (*h == '[')
	{
		he = strchr(h, ']');
		if (he == NULL)
			return false;
		he++;
	}
	else
		he = h + strcspn(h, ":/?#");
	if ((size_t) (he - h) >= sizeof(host))
		return false;
	memcpy(host, h, he - h);
	host[he - h] = '\0';

	if (strcasecmp(host, "localhost") == 0 || strcmp(host, "[::1]") == 0 ||
		strcmp(host, "169.254.170.2") == 0 || strcmp(host, "169.254.170.23") == 0 ||
		strcasecmp(host, "[fd00:ec2::23]") == 0)
		return true;
	return inet_pton(AF_INET, host, &a4) == 1 && (ntohl(a4.s_addr) >> 24) == 127;
}

static SourceResult
source_ecs(const KmsConfig *cfg, AwsCredentials *out, Tried *tried, KmsError *err)
{
	const char *rel = env_nonempty("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI");
	const char *full = env_nonempty("AWS_CONTAINER_CREDENTIALS_FULL_URI");
	const char *token_file = env_nonempty("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE");
	const char *token_env = env_nonempty("AWS_CONTAINER_AUTHORIZATION_TOKEN");
	char		url[2048];
	char	   *file_token = NULL;
	size_t		file_token_alloc = 0;
	char	   *auth_header = NULL;
	size_t		auth_len = 0;
	const char *headers[2];
	int			nheaders = 0;
	HttpResponse resp;
	HttpStatus	hst;
	char		herr[256];
	const char *why;
	SourceResult result = SOURCE_FAILED;

	memset(&resp, 0, sizeof(resp));
	if (rel)
	{
		if (rel[0] != '/' || !is_printable_line(rel) ||
			snprintf(url, sizeof(url), "%s%s", ECS_DEFAULT_ENDPOINT, rel) >= (int) sizeof(url))
		{
			kms_set_error(err, KMS_ERR_CONFIG, NULL,
						  "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI is not a valid path");
			return SOURCE_FAILED;
		}
	}
	else if (full)
	{
		if (!is_printable_line(full) || !ecs_host_allowed(full) ||
			snprintf(url, sizeof(url), "%s", full) >= (int) sizeof(url))
		{
			kms_set_error(err, KMS_ERR_CONFIG, NULL,
						  "AWS_CONTAINER_CREDENTIALS_FULL_URI must use https, or http to a loopback or ECS agent address");
			return SOURCE_FAILED;
		}
	}
	else
	{
		tried_add(tried, "ecs (not configured)");
		return SOURCE_ABSENT;
	}

	/* The token file, when set, wins over the variable (it can be rotated). */
	if (token_file)
	{
		file_token = read_small_file(token_file, CRED_MAX_TOKEN_FILE, &file_token_alloc);
		if (file_token == NULL)
		{
			kms_set_error(err, KMS_ERR_CREDENTIALS, NULL,
						  "could not read container authorization token file \"%s\": %s",
						  token_file, strerror(errno));
			return SOURCE_FAILED;
		}
		trim_in_place(file_token);
		token_env = file_token;
	}
	if (token_env)
	{
		if (!is_printable_line(token_env))
		{
			kms_set_error(err, KMS_ERR_CONFIG, NULL,
						  "the container authorization token contains line breaks or control characters");
			goto done;
		}
		auth_len = strlen(token_env) + sizeof("Authorization: ");
		auth_header = malloc(auth_len);
		if (auth_header == NULL)
		{
			kms_set_error(err, KMS_ERR_INTERNAL, NULL, "out of memory");
			goto done;
		}
		snprintf(auth_header, auth_len, "Authorization: %s", token_env);
		headers[nheaders++] = auth_header;
	}
	headers[nheaders++] = "Accept: application/json";

	hst = cred_request(cfg, "GET", url, headers, nheaders, NULL, 0,
					   request_timeout(cfg, ECS_TIMEOUT_MS), &resp, herr, sizeof(herr), err);
	if (hst != HTTP_OK)
	{
		kms_set_error(err, http_failure_status(hst), NULL,
					  "container credentials endpoint failed: %s", herr);
		goto done;
	}
	err->http_status = (int) resp.status;
	if (resp.status != 200)
	{
		kms_set_error(err, resp.status >= 500 ? KMS_ERR_UNAVAILABLE : KMS_ERR_CREDENTIALS,
					  NULL, "container credentials endpoint answered HTTP %ld", resp.status);
		goto done;
	}
	if (!parse_json_credentials(resp.body, resp.body_len, out, &why))
	{
		aws_credentials_wipe(out);
		kms_set_error(err, KMS_ERR_PROTOCOL, NULL,
					  "container credentials endpoint: %s", why);
		goto done;
	}
	snprintf(out->source, sizeof(out->source), "ecs");
	result = SOURCE_FOUND;

done:
	http_response_free(&resp);
	util_wipe_free(auth_header, auth_len);
	util_wipe_free(file_token, file_token_alloc);
	return result;
}

/* ------------------------------------------------------------------------ */
/* 5. EC2 instance metadata, IMDSv2 only                                     */
/* ------------------------------------------------------------------------ */

static HttpStatus
imds_request(const KmsConfig *cfg, const char *method, const char *base, const char *path,
			 const char *header, HttpResponse *resp, char *herr, size_t herrlen,
			 KmsError *err)
{
	char		url[1024];

	if (snprintf(url, sizeof(url), "%s%s", base, path) >= (int) sizeof(url))
	{
		snprintf(herr, herrlen, "metadata URL too long");
		return HTTP_ERR_INTERNAL;
	}
	return cred_request(cfg, method, url, &header, 1, "", 0,
						request_timeout(cfg, METADATA_TIMEOUT_MS), resp, herr, herrlen, err);
}

static SourceResult
source_imds(const KmsConfig *cfg, AwsCredentials *out, Tried *tried, KmsError *err)
{
	const char *disabled = getenv("AWS_EC2_METADATA_DISABLED");
	const char *endpoint = env_nonempty("AWS_EC2_METADATA_SERVICE_ENDPOINT");
	char		base[512];
	size_t		blen;
	char		token_header[1200];
	char		role[256];
	char		path[512];
	HttpResponse resp;
	HttpStatus	hst;
	char		herr[256];
	const char *why;
	SourceResult result = SOURCE_FAILED;

	memset(&resp, 0, sizeof(resp));
	token_header[0] = '\0';
	if (disabled && strcasecmp(disabled, "true") == 0)
	{
		tried_add(tried, "imds (disabled)");
		return SOURCE_ABSENT;
	}
	if (snprintf(base, sizeof(base), "%s", endpoint ? endpoint : IMDS_DEFAULT_ENDPOINT) >=
		(int) sizeof(base) || !is_printable_line(base))
	{
		kms_set_error(err, KMS_ERR_CONFIG, NULL,
					  "AWS_EC2_METADATA_SERVICE_ENDPOINT is not a valid URL");
		return SOURCE_FAILED;
	}
	blen = strlen(base);
	while (blen > 0 && base[blen - 1] == '/')
		base[--blen] = '\0';

	/* Session token first.  No token, no credentials: never an IMDSv1 GET. */
	hst = imds_request(cfg, "PUT", base, "/latest/api/token",
					   "X-aws-ec2-metadata-token-ttl-seconds: " IMDS_TOKEN_TTL_SECONDS,
					   &resp, herr, sizeof(herr), err);
	if (hst == HTTP_ERR_CANCELED)
	{
		kms_set_error(err, KMS_ERR_CANCELED, NULL, "instance metadata request canceled");
		goto done;
	}
	if (hst != HTTP_OK)
	{
		tried_add(tried, "imds (no answer)");
		result = SOURCE_ABSENT;
		goto done;
	}
	if (resp.status != 200)
	{
		tried_add(tried, "imds (token refused, HTTP %ld)", resp.status);
		result = SOURCE_ABSENT;
		goto done;
	}
	trim_in_place(resp.body);
	if (resp.body[0] == '\0' || !is_printable_line(resp.body) ||
		snprintf(token_header, sizeof(token_header), "X-aws-ec2-metadata-token: %s",
				 resp.body) >= (int) sizeof(token_header))
	{
		kms_set_error(err, KMS_ERR_PROTOCOL, NULL, "instance metadata token is malformed");
		goto done;
	}
	http_response_free(&resp);

	/* The instance role's name. */
	hst = imds_request(cfg, "GET", base, "/latest/meta-data/iam/security-credentials/",
					   token_header, &resp, herr, sizeof(herr), err);
	if (hst != HTTP_OK)
	{
		kms_set_error(err, http_failure_status(hst), NULL,
					  "instance metadata role lookup failed: %s", herr);
		goto done;
	}
	err->http_status = (int) resp.status;
	if (resp.status == 404)
	{
		tried_add(tried, "imds (no instance role)");
		result = SOURCE_ABSENT;
		goto done;
	}
	if (resp.status != 200)
	{
		kms_set_error(err, KMS_ERR_CREDENTIALS, NULL,
					  "instance metadata role lookup answered HTTP %ld", resp.status);
		goto done;
	}
	{
		size_t		rlen = strcspn(resp.body, "\r\n");

		if (!set_field(role, sizeof(role), resp.body, rlen))
			role[0] = '\0';
		trim_in_place(role);
	}
	http_response_free(&resp);
	if (role[0] == '\0' || strspn(role, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
								  "0123456789+=,.@_-") != strlen(role))
	{
		kms_set_error(err, KMS_ERR_PROTOCOL, NULL,
					  "instance metadata returned no valid role name");
		goto done;
	}

	snprintf(path, sizeof(path), "/latest/meta-data/iam/security-credentials/%s", role);
	hst = imds_request(cfg, "GET", base, path, token_header, &resp, herr, sizeof(herr), err);
	if (hst != HTTP_OK)
	{
		kms_set_error(err, http_failure_status(hst), NULL,
					  "instance metadata credentials request failed: %s", herr);
		goto done;
	}
	err->http_status = (int) resp.status;
	if (resp.status != 200)
	{
		kms_set_error(err, KMS_ERR_CREDENTIALS, NULL,
					  "instance metadata credentials for role \"%s\" answered HTTP %ld",
					  role, resp.status);
		goto done;
	}
	if (!parse_json_credentials(resp.body, resp.body_len, out, &why))
	{
		aws_credentials_wipe(out);
		kms_set_error(err, KMS_ERR_PROTOCOL, NULL, "instance metadata credentials: %s", why);
		goto done;
	}
	snprintf(out->source, sizeof(out->source), "imds");
	result = SOURCE_FOUND;

done:
	http_response_free(&resp);
	OPENSSL_cleanse(token_header, sizeof(token_header));
	return result;
}

/* ------------------------------------------------------------------------ */
/* The chain and its cache                                                   */
/* ------------------------------------------------------------------------ */

static KmsStatus
resolve_chain(const KmsConfig *cfg, AwsCredentials *out, KmsError *err)
{
	Tried		tried;
	SourceResult r;

	memset(&tried, 0, sizeof(tried));
	aws_credentials_wipe(out);

	r = source_environment(out, &tried, err);
	if (r == SOURCE_ABSENT)
		r = source_shared_files(cfg, out, &tried, err);
	if (r == SOURCE_ABSENT)
		r = source_web_identity(cfg, out, &tried, err);
	if (r == SOURCE_ABSENT)
		r = source_ecs(cfg, out, &tried, err);
	if (r == SOURCE_ABSENT)
		r = source_imds(cfg, out, &tried, err);

	if (r == SOURCE_FOUND)
		return KMS_OK;
	aws_credentials_wipe(out);
	if (r == SOURCE_FAILED)
		return err->status;
	return kms_set_error(err, KMS_ERR_CREDENTIALS, NULL,
						 "no AWS credentials found (tried %s)", tried.text);
}

KmsStatus
aws_credentials_get(const KmsConfig *cfg, AwsCredentials *out, KmsError *err)
{
	const char *profile;
	time_t		now = time(NULL);
	bool		same_profile;
	AwsCredentials fresh;
	KmsStatus	st;

	if (out == NULL || err == NULL || cfg == NULL)
		return err ? kms_set_error(err, KMS_ERR_INTERNAL, NULL,
								   "aws_credentials_get: missing argument") : KMS_ERR_INTERNAL;
	memset(err, 0, sizeof(*err));
	aws_credentials_wipe(out);

	/* A changed envelope.aws_profile (reload) must not be served stale keys. */
	profile = effective_profile(cfg);
	same_profile = cache_valid && strcmp(cache_profile, profile) == 0;
	if (same_profile &&
		(cache.expiration == 0 || cache.expiration - now > CRED_REFRESH_MARGIN))
	{
		memcpy(out, &cache, sizeof(*out));
		return KMS_OK;
	}

	st = resolve_chain(cfg, &fresh, err);
	if (st == KMS_OK)
	{
		aws_credentials_wipe(&cache);
		memcpy(&cache, &fresh, sizeof(cache));
		snprintf(cache_profile, sizeof(cache_profile), "%s", profile);
		cache_valid = strlen(profile) < sizeof(cache_profile);
		memcpy(out, &fresh, sizeof(*out));
		aws_credentials_wipe(&fresh);
		return KMS_OK;
	}
	aws_credentials_wipe(&fresh);

	/* Refresh failed: still-valid cached credentials keep working until they expire. */
	if (same_profile && cache.expiration > now)
	{
		memcpy(out, &cache, sizeof(*out));
		memset(err, 0, sizeof(*err));
		return KMS_OK;
	}
	return st;
}

void
aws_credentials_invalidate(void)
{
	aws_credentials_wipe(&cache);
	cache_valid = false;
	cache_profile[0] = '\0';
}

void
aws_credentials_wipe(AwsCredentials *c)
{
	if (c)
		OPENSSL_cleanse(c, sizeof(*c));
}
