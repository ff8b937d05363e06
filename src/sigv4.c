/*
 * sigv4.c — AWS Signature Version 4 request signing (header form).
 *
 * Plain C on OpenSSL.  We sign requests ourselves rather than with libcurl's
 * CURLOPT_AWS_SIGV4 because that option is missing from older distributions' libcurl
 * and had port-handling bugs; the price is that this file must match the published test
 * suite exactly, which test/unit/test_sigv4.c checks case by case.
 *
 * The canonical request is built in a growable heap buffer because a session token
 * alone may be several kilobytes.  That buffer, the "AWS4"+secret key material and
 * every intermediate HMAC are wiped with OPENSSL_cleanse on every path out.
 */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/sha.h>

#include "sigv4.h"
#include "util.h"

#define SIGV4_ALGORITHM "AWS4-HMAC-SHA256"

/* A growable string that remembers an allocation failure instead of reporting it. */
typedef struct StrBuf
{
	char	   *data;
	size_t		len;
	size_t		cap;
	bool		failed;
} StrBuf;

/* One header after lower-casing and whitespace folding, before merging duplicates. */
typedef struct CanonHeader
{
	char	   *name;
	char	   *value;
	int			order;			/* position in the request, to keep duplicates in order */
} CanonHeader;

/* One query parameter, already decoded and re-encoded. */
typedef struct CanonParam
{
	char	   *key;
	char	   *value;
} CanonParam;

static void
sb_reserve(StrBuf *sb, size_t extra)
{
	size_t		need;
	size_t		newcap;
	char	   *p;

	if (sb->failed)
		return;
	need = sb->len + extra + 1;
	if (need <= sb->cap)
		return;
	newcap = sb->cap ? sb->cap : 256;
	while (newcap < need)
		newcap *= 2;

	/*
	 * Not realloc: the old block may hold a session token, and realloc would free it
	 * without wiping it.
	 */
	p = malloc(newcap);
	if (p == NULL)
	{
		sb->failed = true;
		return;
	}
	if (sb->data)
	{
		memcpy(p, sb->data, sb->len + 1);
		OPENSSL_cleanse(sb->data, sb->cap);
		free(sb->data);
	}
	else
		p[0] = '\0';
	sb->data = p;
	sb->cap = newcap;
}

static void
sb_appendn(StrBuf *sb, const char *s, size_t n)
{
	sb_reserve(sb, n);
	if (sb->failed)
		return;
	memcpy(sb->data + sb->len, s, n);
	sb->len += n;
	sb->data[sb->len] = '\0';
}

static void
sb_append(StrBuf *sb, const char *s)
{
	sb_appendn(sb, s, strlen(s));
}

static void
sb_appendc(StrBuf *sb, char c)
{
	sb_appendn(sb, &c, 1);
}

static void
sb_free(StrBuf *sb)
{
	if (sb->data)
	{
		OPENSSL_cleanse(sb->data, sb->cap);
		free(sb->data);
	}
	sb->data = NULL;
	sb->len = sb->cap = 0;
}

static void
set_error(char *errbuf, size_t errlen, const char *msg)
{
	if (errbuf && errlen > 0)
		snprintf(errbuf, errlen, "%s", msg);
}

static void
hex_encode(const unsigned char *in, size_t len, char *out)
{
	static const char digits[] = "0123456789abcdef";

	for (size_t i = 0; i < len; i++)
	{
		out[2 * i] = digits[in[i] >> 4];
		out[2 * i + 1] = digits[in[i] & 0x0f];
	}
	out[2 * len] = '\0';
}

static bool
sha256_hex(const void *data, size_t len, char out[65])
{
	unsigned char md[SHA256_DIGEST_LENGTH];
	unsigned int mdlen = 0;

	if (EVP_Digest(data, len, md, &mdlen, EVP_sha256(), NULL) != 1 ||
		mdlen != SHA256_DIGEST_LENGTH)
		return false;
	hex_encode(md, mdlen, out);
	return true;
}

static bool
hmac_sha256(const unsigned char *key, size_t keylen, const void *data, size_t len,
			unsigned char out[SHA256_DIGEST_LENGTH])
{
	unsigned int outlen = 0;

	return HMAC(EVP_sha256(), key, (int) keylen, data, len, out, &outlen) != NULL &&
		outlen == SHA256_DIGEST_LENGTH;
}

/* RFC 3986 unreserved characters: the only bytes SigV4 leaves unencoded. */
static bool
is_unreserved(unsigned char c)
{
	return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
		(c >= '0' && c <= '9') || c == '-' || c == '.' || c == '_' || c == '~';
}

static void
uri_encode(StrBuf *sb, const char *s, size_t n, bool keep_slash)
{
	static const char digits[] = "0123456789ABCDEF";

	for (size_t i = 0; i < n; i++)
	{
		unsigned char c = (unsigned char) s[i];

		if (is_unreserved(c) || (keep_slash && c == '/'))
			sb_appendc(sb, (char) c);
		else
		{
			char		esc[3] = {'%', digits[c >> 4], digits[c & 0x0f]};

			sb_appendn(sb, esc, 3);
		}
	}
}

/*
 * Percent-decode s[0..n) into a new string.  A malformed escape is kept literally,
 * which then encodes as %25..., as the AWS SDKs do.
 */
static char *
uri_decode(const char *s, size_t n)
{
	char	   *out = malloc(n + 1);
	size_t		o = 0;

	if (out == NULL)
		return NULL;
	for (size_t i = 0; i < n; i++)
	{
		if (s[i] == '%' && i + 2 < n &&
			util_hex_value(s[i + 1]) >= 0 && util_hex_value(s[i + 2]) >= 0)
		{
			out[o++] = (char) (util_hex_value(s[i + 1]) * 16 + util_hex_value(s[i + 2]));
			i += 2;
		}
		else
			out[o++] = s[i];
	}
	out[o] = '\0';
	return out;
}

/*
 * Canonical URI.  Services other than S3 sign the path URI-encoded once more than it
 * is sent ("double encoding"): we encode the path exactly as given, so a path sent as
 * "/a%20b" signs as "/a%2520b", and a raw "/a b" signs as "/a%20b".
 *
 * With normalize, "." and ".." segments are resolved (RFC 3986 section 5.2.4) and
 * empty segments dropped, which collapses repeated slashes; a trailing slash survives.
 */
static bool
canonical_path(StrBuf *sb, const char *path, size_t n, bool normalize)
{
	const char **segs;
	size_t	   *seglens;
	size_t		nsegs = 0;
	size_t		i;
	bool		trailing = false;

	if (n == 0)
	{
		sb_appendc(sb, '/');
		return true;
	}
	if (!normalize)
	{
		uri_encode(sb, path, n, true);
		return true;
	}

	/* At most n/2 + 1 segments; allocate for n + 1 to keep it simple. */
	segs = malloc((n + 1) * sizeof(*segs));
	seglens = malloc((n + 1) * sizeof(*seglens));
	if (segs == NULL || seglens == NULL)
	{
		free(segs);
		free(seglens);
		return false;
	}

	i = 0;
	while (i < n)
	{
		size_t		start;
		size_t		len;

		while (i < n && path[i] == '/')
			i++;
		if (i >= n)
		{
			trailing = true;
			break;
		}
		start = i;
		while (i < n && path[i] != '/')
			i++;
		len = i - start;
		trailing = false;
		if (len == 1 && path[start] == '.')
			trailing = true;
		else if (len == 2 && path[start] == '.' && path[start + 1] == '.')
		{
			if (nsegs > 0)
				nsegs--;
			trailing = true;
		}
		else
		{
			segs[nsegs] = path + start;
			seglens[nsegs] = len;
			nsegs++;
		}
	}

	sb_appendc(sb, '/');
	for (size_t s = 0; s < nsegs; s++)
	{
		if (s > 0)
			sb_appendc(sb, '/');
		uri_encode(sb, segs[s], seglens[s], false);
	}
	if (trailing && nsegs > 0)
		sb_appendc(sb, '/');

	free(segs);
	free(seglens);
	return true;
}

static int
param_cmp(const void *a, const void *b)
{
	const CanonParam *pa = a;
	const CanonParam *pb = b;
	int			c = strcmp(pa->key, pb->key);

	return c != 0 ? c : strcmp(pa->value, pb->value);
}

/* Encode one query component (decode first so it is not encoded twice). */
static char *
encode_component(const char *s, size_t n)
{
	char	   *decoded = uri_decode(s, n);
	StrBuf		sb = {0};

	if (decoded == NULL)
		return NULL;
	uri_encode(&sb, decoded, strlen(decoded), false);
	sb_reserve(&sb, 0);			/* make sure an empty component is "" not NULL */
	OPENSSL_cleanse(decoded, n);
	free(decoded);
	if (sb.failed)
	{
		sb_free(&sb);
		return NULL;
	}
	return sb.data;
}

/*
 * Canonical query string: parameters decoded, re-encoded, sorted by key then value,
 * "key=value" joined with '&'; a key without '=' signs as "key=".
 */
static bool
canonical_query(StrBuf *sb, const char *query)
{
	size_t		qlen = strlen(query);
	size_t		max = 1;
	size_t		np = 0;
	CanonParam *params;
	const char *p = query;
	bool		ok = true;

	for (size_t i = 0; i < qlen; i++)
		if (query[i] == '&')
			max++;
	params = calloc(max, sizeof(*params));
	if (params == NULL)
		return false;

	while (ok && p <= query + qlen)
	{
		const char *end = strchr(p, '&');
		const char *eq;

		if (end == NULL)
			end = query + qlen;
		if (end > p)
		{
			eq = memchr(p, '=', end - p);
			params[np].key = encode_component(p, (eq ? eq : end) - p);
			params[np].value = eq ? encode_component(eq + 1, end - eq - 1) :
				encode_component("", 0);
			if (params[np].key == NULL || params[np].value == NULL)
				ok = false;
			np++;
		}
		p = end + 1;
	}

	if (ok)
	{
		qsort(params, np, sizeof(*params), param_cmp);
		for (size_t i = 0; i < np; i++)
		{
			if (i > 0)
				sb_appendc(sb, '&');
			sb_append(sb, params[i].key);
			sb_appendc(sb, '=');
			sb_append(sb, params[i].value);
		}
	}

	for (size_t i = 0; i < np; i++)
	{
		free(params[i].key);
		free(params[i].value);
	}
	free(params);
	return ok;
}

static bool
is_space(char c)
{
	return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

/*
 * Header value as signed: leading and trailing whitespace trimmed, every inner run
 * of whitespace (folded lines included) turned into one space.
 */
static char *
fold_value(const char *v)
{
	size_t		n = strlen(v);
	char	   *out = malloc(n + 1);
	size_t		o = 0;
	bool		pending_space = false;

	if (out == NULL)
		return NULL;
	for (size_t i = 0; i < n; i++)
	{
		if (is_space(v[i]))
		{
			pending_space = o > 0;
			continue;
		}
		if (pending_space)
			out[o++] = ' ';
		pending_space = false;
		out[o++] = v[i];
	}
	out[o] = '\0';
	return out;
}

static int
header_cmp(const void *a, const void *b)
{
	const CanonHeader *ha = a;
	const CanonHeader *hb = b;
	int			c = strcmp(ha->name, hb->name);

	/* qsort is not stable: keep repeated headers in request order explicitly. */
	return c != 0 ? c : (ha->order > hb->order) - (ha->order < hb->order);
}

static bool
valid_header_name(const char *name)
{
	if (name == NULL || name[0] == '\0')
		return false;
	for (const char *p = name; *p; p++)
	{
		unsigned char c = (unsigned char) *p;

		if (c <= ' ' || c >= 0x7f || c == ':')
			return false;
	}
	return true;
}

static void
free_headers(CanonHeader *h, int n)
{
	for (int i = 0; i < n; i++)
	{
		free(h[i].name);
		if (h[i].value)
		{
			/* The value may be the session token. */
			OPENSSL_cleanse(h[i].value, strlen(h[i].value));
			free(h[i].value);
		}
	}
	free(h);
}

static bool
valid_amz_date(const char *d)
{
	if (d == NULL || strlen(d) != 16 || d[8] != 'T' || d[15] != 'Z')
		return false;
	for (int i = 0; i < 15; i++)
		if (i != 8 && !isdigit((unsigned char) d[i]))
			return false;
	return true;
}

static bool
valid_scope_part(const char *s)
{
	if (s == NULL || s[0] == '\0')
		return false;
	for (const char *p = s; *p; p++)
		if (*p == '/' || (unsigned char) *p <= ' ' || (unsigned char) *p >= 0x7f)
			return false;
	return true;
}

static void
copy_debug(char *dst, size_t dstlen, const char *src)
{
	snprintf(dst, dstlen, "%s", src ? src : "");
}

/*
 * How a step of sigv4_sign went.  SIGN_FAILED means the step has set errbuf itself;
 * the two others get their message in one place, sigv4_sign.
 */
typedef enum SignStep
{
	SIGN_OK,
	SIGN_FAILED,
	SIGN_OUT_OF_MEMORY,
	SIGN_CRYPTO_FAILED
} SignStep;

/* The caller's arguments, before any work: false with errbuf set when one is unusable. */
static bool
check_sign_arguments(const Sigv4Request *req, const Sigv4Credentials *cred,
					 const char *region, const char *service, const char *amz_date,
					 char *errbuf, size_t errlen)
{
	if (req->method == NULL || req->method[0] == '\0' || req->uri == NULL ||
		(req->nheaders > 0 && req->headers == NULL) || req->nheaders < 0 ||
		(req->payload == NULL && req->payload_len > 0))
	{
		set_error(errbuf, errlen, "sigv4: malformed request");
		return false;
	}
	if (cred->access_key_id == NULL || cred->access_key_id[0] == '\0' ||
		cred->secret_access_key == NULL || cred->secret_access_key[0] == '\0')
	{
		set_error(errbuf, errlen, "sigv4: access key id or secret access key is empty");
		return false;
	}
	if (!valid_scope_part(region) || !valid_scope_part(service))
	{
		set_error(errbuf, errlen, "sigv4: invalid region or service name");
		return false;
	}
	if (!valid_amz_date(amz_date))
	{
		set_error(errbuf, errlen, "sigv4: amz_date is not in YYYYMMDDTHHMMSSZ form");
		return false;
	}
	return true;
}

/*
 * The headers to sign, lower-cased, folded and sorted by name (repeated names in
 * request order), into hdrs (room for req->nheaders + 1), counted in *nhdrs.  The
 * session token goes in as one more header when session_token is not NULL and the
 * caller does not already list it.  host and x-amz-date (equal to amz_date) must be
 * among them.
 */
static SignStep
canonical_headers(const Sigv4Request *req, const char *amz_date, const char *session_token,
				  CanonHeader *hdrs, int *nhdrs, char *errbuf, size_t errlen)
{
	bool		have_host = false;
	bool		have_date = false;
	bool		have_token_header = false;

	for (int i = 0; i < req->nheaders; i++)
	{
		const Sigv4Header *h = &req->headers[i];
		CanonHeader *c = &hdrs[*nhdrs];

		if (!valid_header_name(h->name) || h->value == NULL)
		{
			set_error(errbuf, errlen, "sigv4: invalid header name or missing header value");
			return SIGN_FAILED;
		}
		c->name = strdup(h->name);
		c->value = fold_value(h->value);
		c->order = (*nhdrs)++;
		if (c->name == NULL || c->value == NULL)
			return SIGN_OUT_OF_MEMORY;
		for (char *p = c->name; *p; p++)
			*p = (char) tolower((unsigned char) *p);

		if (strcmp(c->name, "host") == 0)
			have_host = true;
		else if (strcmp(c->name, "x-amz-date") == 0)
		{
			if (strcmp(c->value, amz_date) != 0)
			{
				set_error(errbuf, errlen, "sigv4: x-amz-date header differs from the signing date");
				return SIGN_FAILED;
			}
			have_date = true;
		}
		else if (strcmp(c->name, "x-amz-security-token") == 0)
			have_token_header = true;
	}
	if (!have_host || !have_date)
	{
		set_error(errbuf, errlen, "sigv4: the host and x-amz-date headers must be signed");
		return SIGN_FAILED;
	}
	/* A caller that already lists the token header gets it signed once, not twice. */
	if (session_token != NULL && !have_token_header)
	{
		CanonHeader *c = &hdrs[*nhdrs];

		c->name = strdup("x-amz-security-token");
		c->value = fold_value(session_token);
		c->order = (*nhdrs)++;
		if (c->name == NULL || c->value == NULL)
			return SIGN_OUT_OF_MEMORY;
	}
	qsort(hdrs, *nhdrs, sizeof(*hdrs), header_cmp);
	return SIGN_OK;
}

/*
 * The canonical request: method, canonical path and query, the sorted headers (repeated
 * names merged with ',' in request order), the signed header names (also into
 * signed_headers) and the payload hash, which ends it whether or not it is sent.
 */
static SignStep
canonical_request(const Sigv4Request *req, const CanonHeader *hdrs, int nhdrs,
				  bool normalize_path, StrBuf *creq, StrBuf *signed_headers)
{
	const char *qmark = strchr(req->uri, '?');
	char		payload_hash[65];

	sb_append(creq, req->method);
	sb_appendc(creq, '\n');
	if (!canonical_path(creq, req->uri, qmark ? (size_t) (qmark - req->uri) : strlen(req->uri),
						normalize_path))
		return SIGN_OUT_OF_MEMORY;
	sb_appendc(creq, '\n');
	if (qmark && !canonical_query(creq, qmark + 1))
		return SIGN_OUT_OF_MEMORY;
	sb_appendc(creq, '\n');

	for (int i = 0; i < nhdrs; i++)
	{
		bool		first = i == 0 || strcmp(hdrs[i].name, hdrs[i - 1].name) != 0;
		bool		last = i == nhdrs - 1 || strcmp(hdrs[i].name, hdrs[i + 1].name) != 0;

		if (first)
		{
			sb_append(creq, hdrs[i].name);
			sb_appendc(creq, ':');
			if (signed_headers->len > 0)
				sb_appendc(signed_headers, ';');
			sb_append(signed_headers, hdrs[i].name);
		}
		else
			sb_appendc(creq, ',');
		sb_append(creq, hdrs[i].value);
		if (last)
			sb_appendc(creq, '\n');
	}
	sb_appendc(creq, '\n');
	sb_append(creq, signed_headers->data ? signed_headers->data : "");
	sb_appendc(creq, '\n');

	if (!sha256_hex(req->payload ? (const void *) req->payload : (const void *) "",
					req->payload_len, payload_hash))
		return SIGN_CRYPTO_FAILED;
	sb_append(creq, payload_hash);
	return creq->failed || signed_headers->failed ? SIGN_OUT_OF_MEMORY : SIGN_OK;
}

/*
 * The credential scope ("date/region/service/aws4_request", into scope) and the string
 * to sign: algorithm, date, scope and the hash of the canonical request.
 */
static SignStep
string_to_sign(const char *amz_date, const char *region, const char *service,
			   const StrBuf *creq, char *scope, size_t scope_len, StrBuf *sts,
			   char *errbuf, size_t errlen)
{
	char		creq_hash[65];
	int			n;

	n = snprintf(scope, scope_len, "%.8s/%s/%s/aws4_request", amz_date, region, service);
	if (n < 0 || (size_t) n >= scope_len)
	{
		set_error(errbuf, errlen, "sigv4: region or service name too long");
		return SIGN_FAILED;
	}
	if (!sha256_hex(creq->data, creq->len, creq_hash))
		return SIGN_CRYPTO_FAILED;
	sb_append(sts, SIGV4_ALGORITHM "\n");
	sb_append(sts, amz_date);
	sb_appendc(sts, '\n');
	sb_append(sts, scope);
	sb_appendc(sts, '\n');
	sb_append(sts, creq_hash);
	return sts->failed ? SIGN_OUT_OF_MEMORY : SIGN_OK;
}

/*
 * The signature, in hex: the signing key is the HMAC chain from "AWS4" + secret through
 * date, region, service and "aws4_request", and signs the string to sign.  Every
 * derived key is wiped, on every path.
 */
static SignStep
signature(const char *secret_access_key, const char *amz_date, const char *region,
		  const char *service, const StrBuf *sts, char sighex[65])
{
	StrBuf		secret = {0};
	unsigned char k1[SHA256_DIGEST_LENGTH];
	unsigned char k2[SHA256_DIGEST_LENGTH];
	unsigned char sig[SHA256_DIGEST_LENGTH];
	SignStep	step = SIGN_OK;

	sb_append(&secret, "AWS4");
	sb_append(&secret, secret_access_key);
	if (secret.failed)
		step = SIGN_OUT_OF_MEMORY;
	else if (!hmac_sha256((unsigned char *) secret.data, secret.len, amz_date, 8, k1) ||
			 !hmac_sha256(k1, sizeof(k1), region, strlen(region), k2) ||
			 !hmac_sha256(k2, sizeof(k2), service, strlen(service), k1) ||
			 !hmac_sha256(k1, sizeof(k1), "aws4_request", 12, k2) ||
			 !hmac_sha256(k2, sizeof(k2), sts->data, sts->len, sig))
		step = SIGN_CRYPTO_FAILED;
	else
		hex_encode(sig, sizeof(sig), sighex);
	OPENSSL_cleanse(k1, sizeof(k1));
	OPENSSL_cleanse(k2, sizeof(k2));
	OPENSSL_cleanse(sig, sizeof(sig));
	sb_free(&secret);
	return step;
}

int
sigv4_sign(const Sigv4Request *req, const Sigv4Credentials *cred, const char *region,
		   const char *service, const char *amz_date, bool normalize_path,
		   bool sign_session_token, char *authorization, size_t authorization_len,
		   Sigv4Debug *debug, char *errbuf, size_t errlen)
{
	CanonHeader *hdrs = NULL;
	int			nhdrs = 0;
	StrBuf		creq = {0};
	StrBuf		signed_headers = {0};
	StrBuf		sts = {0};
	char		scope[256];
	char		sighex[65];
	const char *token;
	SignStep	step;
	int			n;

	if (authorization && authorization_len > 0)
		authorization[0] = '\0';
	if (req == NULL || cred == NULL || authorization == NULL || authorization_len == 0)
	{
		set_error(errbuf, errlen, "sigv4: missing argument");
		return -1;
	}
	if (!check_sign_arguments(req, cred, region, service, amz_date, errbuf, errlen))
		return -1;
	token = sign_session_token && cred->session_token != NULL &&
		cred->session_token[0] != '\0' ? cred->session_token : NULL;

	hdrs = calloc(req->nheaders + 1, sizeof(*hdrs));
	step = hdrs == NULL ? SIGN_OUT_OF_MEMORY :
		canonical_headers(req, amz_date, token, hdrs, &nhdrs, errbuf, errlen);
	if (step == SIGN_OK)
		step = canonical_request(req, hdrs, nhdrs, normalize_path, &creq, &signed_headers);
	if (step == SIGN_OK)
		step = string_to_sign(amz_date, region, service, &creq, scope, sizeof(scope),
							  &sts, errbuf, errlen);
	if (step == SIGN_OK)
		step = signature(cred->secret_access_key, amz_date, region, service, &sts, sighex);
	if (step == SIGN_OK)
	{
		n = snprintf(authorization, authorization_len,
					 SIGV4_ALGORITHM " Credential=%s/%s, SignedHeaders=%s, Signature=%s",
					 cred->access_key_id, scope, signed_headers.data, sighex);
		if (n < 0 || (size_t) n >= authorization_len)
		{
			authorization[0] = '\0';
			set_error(errbuf, errlen, "sigv4: authorization buffer too small");
			step = SIGN_FAILED;
		}
	}
	if (step == SIGN_OK && debug)
	{
		copy_debug(debug->canonical_request, sizeof(debug->canonical_request), creq.data);
		copy_debug(debug->string_to_sign, sizeof(debug->string_to_sign), sts.data);
		copy_debug(debug->signature, sizeof(debug->signature), sighex);
	}
	if (step == SIGN_OUT_OF_MEMORY)
		set_error(errbuf, errlen, "sigv4: out of memory");
	else if (step == SIGN_CRYPTO_FAILED)
		set_error(errbuf, errlen, "sigv4: OpenSSL digest or HMAC failed");

	sb_free(&creq);
	sb_free(&sts);
	sb_free(&signed_headers);
	if (hdrs)
		free_headers(hdrs, nhdrs);
	return step == SIGN_OK ? 0 : -1;
}

void
sigv4_format_amz_date(time_t t, char out[17])
{
	struct tm	tm;

	if (gmtime_r(&t, &tm) == NULL ||
		strftime(out, 17, "%Y%m%dT%H%M%SZ", &tm) != 16)
		snprintf(out, 17, "19700101T000000Z");
}
