/*
 * kms_aws.c — the `aws` KMS provider: AWS KMS over its JSON 1.1 protocol.
 *
 * Layer: KMS provider (plain C, no postgres.h, no ereport).  It speaks to AWS KMS
 * with `POST /`, `Content-Type: application/x-amz-json-1.1` and
 * `X-Amz-Target: TrentService.<Op>`, signs every request with SigV4 (sigv4.c), takes
 * credentials from the AWS chain (aws_credentials.c) and sends them over http.c.
 * Operations: GenerateDataKey (KeySpec AES_256), Decrypt (always with KeyId, so KMS
 * refuses a blob wrapped under another key) and ReEncrypt (the DEK never leaves KMS).
 *
 * Encryption context.  Every call binds the DEK to
 *
 *     {"tenant": "<tenant name>", "dek_version": "<decimal version>"}
 *
 * These two keys are part of the stored-data format: a wrapped DEK only unwraps with
 * exactly this context, they appear verbatim in CloudTrail (the KMS audit log), and IAM
 * policies may test them (kms:EncryptionContext:tenant).  Never rename them.
 *
 * Secrets.  The plaintext DEK exists, outside KMS, in: the HTTP response body (wiped by
 * http_response_free), json-c's tokenizer buffer and the json-c string object (both
 * wiped here before they are freed), the base64-decoded stack buffer, and the caller's
 * `dek`.  Each is wiped with OPENSSL_cleanse on every path, errors included.  Credentials
 * live in an AwsCredentials and a header line, both wiped after each attempt.  Messages
 * are built only from the operation name, AWS's error type, the HTTP status and http.c's
 * error text, never from a body, a header or a key.
 *
 * Retries.  At most cfg->retries extra attempts, with full-jitter exponential backoff
 * (base 50 ms, cap 2 s, slept in 10 ms slices that poll cfg->interrupted), and only for
 * errors that a second attempt can cure: throttling (ThrottlingException,
 * LimitExceededException, HTTP 429), KMS-side failures (HTTP 5xx, KMSInternalException,
 * DependencyTimeoutException) and transient network errors — connect failure, reset,
 * and a single attempt that ran out of time (a hung connection to one KMS front end
 * says little about the next one, and it is what the AWS SDKs do; the worst case is
 * therefore (retries + 1) × kms_timeout plus backoff, and statement_timeout still cuts
 * it short).  Every KMS operation used here is safe to repeat: a repeated
 * GenerateDataKey only wastes a DEK.  Never retried: access denied, not found,
 * disabled/invalid state, invalid ciphertext, validation errors, garbage answers and
 * TLS failures.  ExpiredTokenException drops the cached credentials and is retried once,
 * outside the retry budget, with freshly fetched ones.
 */
#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <json-c/json.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include "aws_credentials.h"
#include "aws_json.h"
#include "http.h"
#include "kms.h"
#include "kms_aws.h"
#include "sigv4.h"

/* KMS answers are a few hundred bytes; anything near this is not KMS. */
#define AWS_KMS_MAX_RESPONSE	(64 * 1024)

#define AWS_KMS_DEFAULT_TIMEOUT_MS	10000
#define AWS_KMS_MAX_RETRIES		10

/* Base64 of KMS_WRAPPED_MAX bytes. */
#define AWS_B64_WRAPPED_MAX		(4 * ((KMS_WRAPPED_MAX + 2) / 3))

/* The keys of the encryption context: see the header comment before changing. */
#define AWS_EC_TENANT			"tenant"
#define AWS_EC_VERSION			"dek_version"

typedef struct AwsEndpoint
{
	char		url[1024];		/* what http.c connects to */
	char		host[512];		/* Host header, as signed */
	char		path[512];		/* canonical URI, "/" for KMS */
} AwsEndpoint;

/* The outcome of one attempt, before it becomes a KmsError. */
typedef struct AwsAttempt
{
	KmsStatus	status;
	bool		retryable;
	int			http_status;
	char		error_type[64];
	char		detail[256];	/* http.c's text or our own; never a body */
} AwsAttempt;

/* ---------------------------------------------------------------------------
 * Small helpers
 */

static void
aws_attempt_set(AwsAttempt *a, KmsStatus status, bool retryable, const char *fmt,...)
			__attribute__((format(printf, 4, 5)));

static void
aws_attempt_set(AwsAttempt *a, KmsStatus status, bool retryable, const char *fmt,...)
{
	va_list		ap;

	a->status = status;
	a->retryable = retryable;
	va_start(ap, fmt);
	vsnprintf(a->detail, sizeof(a->detail), fmt, ap);
	va_end(ap);
}

/*
 * Strict base64 (RFC 4648, standard alphabet, padded, no whitespace).  EVP_DecodeBlock
 * alone would accept surrounding whitespace and count padding as zero bytes, so the
 * text is checked first and the padding subtracted here.  Returns the decoded length,
 * or -1 when the text is not canonical base64 or does not fit in `outlen`.
 */
static long
aws_b64_decode(const char *in, size_t inlen, uint8_t *out, size_t outlen)
{
	size_t		pad = 0;
	int			n;

	if (inlen == 0 || inlen % 4 != 0 || inlen / 4 * 3 > outlen || inlen > INT32_MAX)
		return -1;
	while (pad < 2 && in[inlen - 1 - pad] == '=')
		pad++;
	for (size_t i = 0; i < inlen - pad; i++)
	{
		char		c = in[i];

		if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
			  (c >= '0' && c <= '9') || c == '+' || c == '/'))
			return -1;
	}
	n = EVP_DecodeBlock(out, (const unsigned char *) in, (int) inlen);
	if (n < 0 || (size_t) n != inlen / 4 * 3)
	{
		OPENSSL_cleanse(out, outlen);
		return -1;
	}
	/* the bytes that stood for padding are zeros; they are not part of the value */
	return (long) ((size_t) n - pad);
}

/* out must hold 4 * ceil(len / 3) + 1 bytes. */
static void
aws_b64_encode(const uint8_t *in, size_t len, char *out)
{
	EVP_EncodeBlock((unsigned char *) out, in, (int) len);
}

/* A region is used in a host name: allow only what AWS region names contain. */
static bool
aws_region_valid(const char *region)
{
	size_t		len = strlen(region);

	if (len == 0 || len > 64)
		return false;
	for (size_t i = 0; i < len; i++)
	{
		unsigned char c = (unsigned char) region[i];

		if (!(islower(c) || isdigit(c) || c == '-'))
			return false;
	}
	return true;
}

/*
 * Strict UTF-8 (RFC 3629): no overlong forms, no surrogates, nothing above U+10FFFF.
 * The encryption context travels as JSON, which must be UTF-8.  json-c escapes quotes,
 * backslashes and control characters but copies other bytes as they are, so a tenant
 * name in another encoding would reach KMS as malformed JSON; worse, a parser that
 * replaces each bad sequence with U+FFFD would give two different tenants one context
 * and let one tenant's wrapped DEK unwrap as the other's.
 */
static bool
aws_utf8_valid(const char *s)
{
	const unsigned char *p = (const unsigned char *) s;

	while (*p)
	{
		unsigned char c = *p;
		int			n;
		uint32_t	cp;
		uint32_t	min;

		if (c < 0x80)
		{
			p++;
			continue;
		}
		if ((c & 0xE0) == 0xC0)
			n = 1, cp = c & 0x1F, min = 0x80;
		else if ((c & 0xF0) == 0xE0)
			n = 2, cp = c & 0x0F, min = 0x800;
		else if ((c & 0xF8) == 0xF0)
			n = 3, cp = c & 0x07, min = 0x10000;
		else
			return false;
		for (int i = 1; i <= n; i++)
		{
			if ((p[i] & 0xC0) != 0x80)
				return false;	/* also stops at the terminating NUL */
			cp = (cp << 6) | (p[i] & 0x3F);
		}
		if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
			return false;
		p += n + 1;
	}
	return true;
}

/* Key ids, ARNs and aliases are printable ASCII; anything else is a typo or worse. */
static bool
aws_key_id_valid(const char *key_id)
{
	for (const unsigned char *p = (const unsigned char *) key_id; *p; p++)
		if (*p <= ' ' || *p >= 0x7f)
			return false;
	return true;
}

/*
 * The regional KMS host the AWS SDKs use: kms.<region>.amazonaws.com (.com.cn in the
 * China regions), or kms-fips.<region>.amazonaws.com when FIPS endpoints are asked
 * for, as AWS_USE_FIPS_ENDPOINT does.  The China regions have none: false there.
 */
bool
kms_aws_default_host(const char *region, bool fips, char *host, size_t host_len)
{
	bool		china = strncmp(region, "cn-", 3) == 0;

	if (fips && china)
		return false;
	snprintf(host, host_len, "%s.%s.%s", fips ? "kms-fips" : "kms", region,
			 china ? "amazonaws.com.cn" : "amazonaws.com");
	return true;
}

/*
 * Work out URL, Host header and canonical path.  The Host header is sent explicitly
 * (curl then uses ours) so that what is signed is exactly what is sent; a port is kept
 * unless it is the scheme's default, as the AWS SDKs do.
 */
static KmsStatus
aws_endpoint_parse(const KmsConfig *cfg, AwsEndpoint *ep, KmsError *err)
{
	const char *endpoint = cfg->aws_endpoint;
	const char *authority;
	const char *path;
	size_t		alen;
	bool		https;

	if (cfg->aws_region == NULL || cfg->aws_region[0] == '\0')
		return kms_set_error(err, KMS_ERR_CONFIG, "",
							 "the aws KMS provider needs a region (envelope.aws_region)");
	if (!aws_region_valid(cfg->aws_region))
		return kms_set_error(err, KMS_ERR_CONFIG, "",
							 "invalid AWS region name in envelope.aws_region");

	if (endpoint == NULL || endpoint[0] == '\0')
	{
		if (!kms_aws_default_host(cfg->aws_region, cfg->aws_use_fips_endpoint,
								  ep->host, sizeof(ep->host)))
			return kms_set_error(err, KMS_ERR_CONFIG, "",
								 "AWS KMS has no FIPS endpoint in region \"%s\"",
								 cfg->aws_region);
		snprintf(ep->url, sizeof(ep->url), "https://%s/", ep->host);
		strcpy(ep->path, "/");
		return KMS_OK;
	}

	if (strncasecmp(endpoint, "https://", 8) == 0)
	{
		https = true;
		authority = endpoint + 8;
	}
	else if (strncasecmp(endpoint, "http://", 7) == 0)
	{
		https = false;
		authority = endpoint + 7;
	}
	else
		return kms_set_error(err, KMS_ERR_CONFIG, "",
							 "envelope.aws_endpoint must start with https:// or http://");

	alen = strcspn(authority, "/?#");
	path = authority + alen;
	if (alen == 0 || alen >= sizeof(ep->host) ||
		memchr(authority, '@', alen) != NULL ||
		strpbrk(path, "?#") != NULL ||
		strlen(path) >= sizeof(ep->path) ||
		strlen(endpoint) + 2 > sizeof(ep->url))
		return kms_set_error(err, KMS_ERR_CONFIG, "",
							 "envelope.aws_endpoint is not a valid endpoint URL (scheme://host[:port][/path])");
	for (size_t i = 0; i < alen; i++)
	{
		unsigned char c = (unsigned char) authority[i];

		if (c <= ' ' || c >= 127)
			return kms_set_error(err, KMS_ERR_CONFIG, "",
								 "envelope.aws_endpoint is not a valid endpoint URL (scheme://host[:port][/path])");
	}

	memcpy(ep->host, authority, alen);
	ep->host[alen] = '\0';
	/* drop a default port: the Host header (and so the signature) omits it */
	{
		const char *defport = https ? ":443" : ":80";
		size_t		dlen = strlen(defport);
		char	   *bracket = strrchr(ep->host, ']');
		char	   *colon = strrchr(ep->host, ':');

		if (colon != NULL && (bracket == NULL || colon > bracket) &&
			alen > dlen && strcmp(ep->host + alen - dlen, defport) == 0)
			ep->host[alen - dlen] = '\0';
	}

	if (*path == '\0')
	{
		strcpy(ep->path, "/");
		snprintf(ep->url, sizeof(ep->url), "%s/", endpoint);
	}
	else
	{
		snprintf(ep->path, sizeof(ep->path), "%s", path);
		snprintf(ep->url, sizeof(ep->url), "%s", endpoint);
	}
	return KMS_OK;
}



/* ---------------------------------------------------------------------------
 * Multi-Region keys
 */

/*
 * The master key to name in a request to the configured region.  A stored DEK records
 * the key ARN of the region it was wrapped in; a hot standby or a restore in another
 * region reads the same rows.  A multi-Region key (key id "mrk-…") has a replica of
 * the same key material, under the same key id, in each region it was replicated to,
 * and the KMS of a region only knows its own replica: so the ARN of another region is
 * rewritten to the configured region (same partition, account and key id), and the
 * replica decrypts and re-wraps what the primary wrapped.  KMS then answers with that
 * region's ARN, which is what a new or re-wrapped DEK records.  A single-Region key
 * has no replica: asking another region for it could only fail, so it is refused here
 * with KMS_ERR_WRONG_REGION, before anything is sent, and so is an alias ARN of another
 * region (aliases are per region; name the alias without its ARN to use the local one).
 * Key ids and alias names carry no region and are left as they are.
 */
static KmsStatus
aws_key_for_region(const KmsConfig *cfg, const char *op, const char *key_id,
				   char *out, size_t outlen, KmsError *err)
{
	const char *field[6];		/* arn, partition, service, region, account, resource */
	const char *p = key_id;
	size_t		region_len;
	const char *region = cfg->aws_region;

	if (strncmp(key_id, "arn:", 4) != 0 || region == NULL || !aws_region_valid(region))
	{
		snprintf(out, outlen, "%s", key_id);
		return KMS_OK;
	}
	for (int i = 0; i < 6; i++)
	{
		field[i] = p;
		if (i < 5 && (p = strchr(p, ':')) == NULL)
		{
			/* not an ARN we can read: KMS will say what is wrong with it */
			snprintf(out, outlen, "%s", key_id);
			return KMS_OK;
		}
		if (i < 5)
			p++;
	}
	region_len = (size_t) (field[4] - field[3] - 1);
	if (strncmp(field[2], "kms:", 4) != 0 ||
		(region_len == strlen(region) && strncmp(field[3], region, region_len) == 0))
	{
		snprintf(out, outlen, "%s", key_id);
		return KMS_OK;
	}

	if (strncmp(field[5], "key/mrk-", 8) == 0)
	{
		int			n = snprintf(out, outlen, "%.*s%s%s", (int) (field[3] - key_id), key_id,
								 region, field[4] - 1);

		if (n < 0 || (size_t) n >= outlen)
			return kms_set_error(err, KMS_ERR_CONFIG, "",
								 "KMS %s failed: master key id is too long", op);
		return KMS_OK;
	}
	if (strncmp(field[5], "key/", 4) == 0)
		return kms_set_error(err, KMS_ERR_WRONG_REGION, "",
							 "KMS %s failed: master key %s is a single-Region key of region %.*s, and envelope.aws_region is %s",
							 op, field[5] + 4, (int) region_len, field[3], region);
	return kms_set_error(err, KMS_ERR_WRONG_REGION, "",
						 "KMS %s failed: the alias ARN names region %.*s, and envelope.aws_region is %s; give the alias name alone to use the alias of the configured region",
						 op, (int) region_len, field[3], region);
}

/* ---------------------------------------------------------------------------
 * JSON
 */

static json_object *
aws_json_context(const KmsEncryptionContext *ec)
{
	json_object *ctx = json_object_new_object();
	char		version[16];

	snprintf(version, sizeof(version), "%u", (unsigned) ec->version);
	json_object_object_add(ctx, AWS_EC_TENANT, json_object_new_string(ec->tenant));
	json_object_object_add(ctx, AWS_EC_VERSION, json_object_new_string(version));
	return ctx;
}

/* ---------------------------------------------------------------------------
 * Errors
 */

static const struct
{
	const char *type;
	KmsStatus	status;
}			aws_error_map[] =
{
	{"AccessDeniedException", KMS_ERR_ACCESS_DENIED},
	{"AccessDenied", KMS_ERR_ACCESS_DENIED},
	{"NotFoundException", KMS_ERR_NOT_FOUND},
	{"DisabledException", KMS_ERR_DISABLED},
	{"KMSInvalidStateException", KMS_ERR_DISABLED},
	{"KeyUnavailableException", KMS_ERR_DISABLED},
	{"InvalidCiphertextException", KMS_ERR_INVALID_CIPHERTEXT},
	{"IncorrectKeyException", KMS_ERR_INVALID_CIPHERTEXT},
	{"ThrottlingException", KMS_ERR_THROTTLED},
	{"Throttling", KMS_ERR_THROTTLED},
	{"ThrottledException", KMS_ERR_THROTTLED},
	{"TooManyRequestsException", KMS_ERR_THROTTLED},
	{"RequestLimitExceeded", KMS_ERR_THROTTLED},
	{"LimitExceededException", KMS_ERR_THROTTLED},
	{"KMSInternalException", KMS_ERR_UNAVAILABLE},
	{"DependencyTimeoutException", KMS_ERR_UNAVAILABLE},
	{"InternalFailure", KMS_ERR_UNAVAILABLE},
	{"InternalError", KMS_ERR_UNAVAILABLE},
	{"ServiceUnavailable", KMS_ERR_UNAVAILABLE},
	{"ServiceUnavailableException", KMS_ERR_UNAVAILABLE},
	{"UnrecognizedClientException", KMS_ERR_CREDENTIALS},
	{"InvalidSignatureException", KMS_ERR_CREDENTIALS},
	{"ExpiredTokenException", KMS_ERR_CREDENTIALS},
	{"ExpiredToken", KMS_ERR_CREDENTIALS},
	{"IncompleteSignature", KMS_ERR_CREDENTIALS},
	{"IncompleteSignatureException", KMS_ERR_CREDENTIALS},
	{"MissingAuthenticationToken", KMS_ERR_CREDENTIALS},
	{"MissingAuthenticationTokenException", KMS_ERR_CREDENTIALS},
	{"SignatureDoesNotMatch", KMS_ERR_CREDENTIALS},
	{"InvalidClientTokenId", KMS_ERR_CREDENTIALS},
	{"InvalidAccessKeyId", KMS_ERR_CREDENTIALS},
	{"RequestExpired", KMS_ERR_CREDENTIALS},
	{"ValidationException", KMS_ERR_CONFIG},
	{"InvalidArnException", KMS_ERR_CONFIG},
	{"InvalidKeyUsageException", KMS_ERR_CONFIG},
	{"InvalidGrantTokenException", KMS_ERR_CONFIG},
	{"UnsupportedOperationException", KMS_ERR_CONFIG},
};

/*
 * Copy an AWS error code into out, dropping any "namespace#" prefix and ":detail"
 * suffix.  Only identifier characters pass, so nothing but a type name can reach a
 * message; false when nothing usable is left.
 */
static bool
aws_error_type_copy(const char *in, size_t inlen, char *out, size_t outlen)
{
	const char *hash = memchr(in, '#', inlen);
	size_t		n = 0;

	if (hash != NULL)
	{
		inlen -= (size_t) (hash + 1 - in);
		in = hash + 1;
	}
	while (inlen > 0 && isspace((unsigned char) *in))
		in++, inlen--;
	for (size_t i = 0; i < inlen && in[i] != ':'; i++)
	{
		unsigned char c = (unsigned char) in[i];

		if (isspace(c))
			break;
		if (!(isalnum(c) || c == '.' || c == '_' || c == '-') || c > 127 || n + 1 >= outlen)
			return false;
		out[n++] = (char) c;
	}
	out[n] = '\0';
	return n > 0;
}

/* <Code>X</Code> in an XML error document (moto answers some auth failures so). */
static bool
aws_xml_error_code(const char *body, size_t len, char *out, size_t outlen)
{
	const char *start = NULL;
	const char *end;

	for (size_t i = 0; i + 6 <= len; i++)
		if (memcmp(body + i, "<Code>", 6) == 0)
		{
			start = body + i + 6;
			break;
		}
	if (start == NULL)
		return false;
	end = NULL;
	for (const char *p = start; p + 7 <= body + len; p++)
		if (memcmp(p, "</Code>", 7) == 0)
		{
			end = p;
			break;
		}
	if (end == NULL || end == start)
		return false;
	return aws_error_type_copy(start, (size_t) (end - start), out, outlen);
}

/* Classify a non-2xx answer. */
static void
aws_classify_http_error(AwsAttempt *a, long http_status, const char *body, size_t len)
{
	json_object *obj = aws_json_parse(body, len, AWS_KMS_MAX_RESPONSE);
	bool		have_type = false;

	a->http_status = (int) http_status;
	a->error_type[0] = '\0';
	if (obj != NULL)
	{
		size_t		tlen;
		const char *type = aws_json_string(obj, "__type", &tlen);

		if (type == NULL)
			type = aws_json_string(obj, "code", &tlen);
		if (type != NULL)
			have_type = aws_error_type_copy(type, tlen, a->error_type, sizeof(a->error_type));
		aws_json_free(obj);
	}
	else if (body != NULL)
		have_type = aws_xml_error_code(body, len, a->error_type, sizeof(a->error_type));

	if (have_type)
	{
		for (size_t i = 0; i < sizeof(aws_error_map) / sizeof(aws_error_map[0]); i++)
		{
			if (strcmp(aws_error_map[i].type, a->error_type) == 0)
			{
				KmsStatus	st = aws_error_map[i].status;

				aws_attempt_set(a, st,
								st == KMS_ERR_THROTTLED || st == KMS_ERR_UNAVAILABLE,
								"%s (HTTP %ld)", a->error_type, http_status);
				return;
			}
		}
	}

	/* unknown or missing type: the HTTP status decides */
	if (http_status == 429)
		aws_attempt_set(a, KMS_ERR_THROTTLED, true, "%s (HTTP %ld)",
						have_type ? a->error_type : "throttled", http_status);
	else if (http_status >= 500 && http_status <= 599)
		aws_attempt_set(a, KMS_ERR_UNAVAILABLE, true, "%s (HTTP %ld)",
						have_type ? a->error_type : "server error", http_status);
	else if (have_type)
		aws_attempt_set(a, KMS_ERR_PROTOCOL, false, "%s (HTTP %ld)",
						a->error_type, http_status);
	else
		aws_attempt_set(a, KMS_ERR_PROTOCOL, false,
						"unexpected answer without an error type (HTTP %ld)", http_status);
}

static void
aws_classify_transport_error(AwsAttempt *a, HttpStatus hs, const char *errbuf)
{
	a->http_status = 0;
	a->error_type[0] = '\0';
	switch (hs)
	{
		case HTTP_ERR_CONNECT:
			aws_attempt_set(a, KMS_ERR_UNAVAILABLE, true, "could not connect: %s", errbuf);
			break;
		case HTTP_ERR_NETWORK:
			aws_attempt_set(a, KMS_ERR_UNAVAILABLE, true, "network error: %s", errbuf);
			break;
		case HTTP_ERR_TIMEOUT:
			aws_attempt_set(a, KMS_ERR_TIMEOUT, true, "no answer in time: %s", errbuf);
			break;
		case HTTP_ERR_CANCELED:
			aws_attempt_set(a, KMS_ERR_CANCELED, false, "request canceled");
			break;
		case HTTP_ERR_TOO_LARGE:
			aws_attempt_set(a, KMS_ERR_PROTOCOL, false, "answer larger than %d bytes",
							AWS_KMS_MAX_RESPONSE);
			break;
		case HTTP_ERR_TLS:
			aws_attempt_set(a, KMS_ERR_UNAVAILABLE, false, "TLS error: %s", errbuf);
			break;
		case HTTP_ERR_INTERNAL:
		default:
			aws_attempt_set(a, KMS_ERR_INTERNAL, false, "HTTP client error: %s", errbuf);
			break;
	}
}

/* ---------------------------------------------------------------------------
 * One KMS operation, with signing, retries and error mapping
 */

/* The header lines of one signed request, and the secrets in them. */
typedef struct AwsSigned
{
	char		authorization[1024];
	char		h_host[600];
	char		h_date[64];
	char		h_target[96];
	char		h_auth[1100];
	char		h_token[4200];
	const char *lines[6];
} AwsSigned;

static void
aws_signed_wipe(AwsSigned *sg)
{
	OPENSSL_cleanse(sg, sizeof(*sg));
}

/*
 * Credentials, a signature and the header lines for one attempt of `op` with `body`,
 * and the request that sends them (pointing into *sg and body, which must outlive
 * it).  False with `a` set when there are no credentials or signing failed: the KMS
 * was not asked.  Wipe *sg with aws_signed_wipe in every case.
 */
static bool
aws_sign(const KmsConfig *cfg, const AwsEndpoint *ep, const char *op,
		 const char *body, size_t body_len, AwsSigned *sg, HttpRequest *hreq,
		 AwsAttempt *a)
{
	AwsCredentials creds;
	Sigv4Credentials sc;
	char		amz_date[17];
	char		target[64];
	Sigv4Header sh[4];
	Sigv4Request sreq;
	char		sigerr[128];
	KmsStatus	cst;
	KmsError	cerr;
	int			nlines = 0;

	memset(sg, 0, sizeof(*sg));
	memset(&cerr, 0, sizeof(cerr));
	memset(&creds, 0, sizeof(creds));

	cst = aws_credentials_get(cfg, &creds, &cerr);
	if (cst != KMS_OK)
	{
		/* keep the credential chain's status and text; it fetched, KMS was not asked */
		a->status = cst;
		a->retryable = false;
		a->http_status = cerr.http_status;
		snprintf(a->error_type, sizeof(a->error_type), "%s", cerr.error_type);
		snprintf(a->detail, sizeof(a->detail), "%s",
				 cerr.message[0] ? cerr.message : kms_status_name(cst));
		aws_credentials_wipe(&creds);
		return false;
	}

	sigv4_format_amz_date(time(NULL), amz_date);
	snprintf(target, sizeof(target), "TrentService.%s", op);

	/* sigv4 wants every signed header; names in lower case, sorted by it */
	sh[0].name = "content-type";
	sh[0].value = "application/x-amz-json-1.1";
	sh[1].name = "host";
	sh[1].value = ep->host;
	sh[2].name = "x-amz-date";
	sh[2].value = amz_date;
	sh[3].name = "x-amz-target";
	sh[3].value = target;
	sreq.method = "POST";
	sreq.uri = ep->path;
	sreq.headers = sh;
	sreq.nheaders = 4;
	sreq.payload = (const unsigned char *) body;
	sreq.payload_len = body_len;
	sc.access_key_id = creds.access_key_id;
	sc.secret_access_key = creds.secret_access_key;
	sc.session_token = creds.session_token[0] ? creds.session_token : NULL;

	if (sigv4_sign(&sreq, &sc, cfg->aws_region, "kms", amz_date, true, true,
				   sg->authorization, sizeof(sg->authorization), NULL,
				   sigerr, sizeof(sigerr)) != 0)
	{
		aws_attempt_set(a, KMS_ERR_INTERNAL, false, "could not sign the request: %s", sigerr);
		a->http_status = 0;
		a->error_type[0] = '\0';
		aws_credentials_wipe(&creds);
		return false;
	}

	snprintf(sg->h_host, sizeof(sg->h_host), "Host: %s", ep->host);
	snprintf(sg->h_date, sizeof(sg->h_date), "X-Amz-Date: %s", amz_date);
	snprintf(sg->h_target, sizeof(sg->h_target), "X-Amz-Target: %s", target);
	snprintf(sg->h_auth, sizeof(sg->h_auth), "Authorization: %s", sg->authorization);
	sg->lines[nlines++] = sg->h_host;
	sg->lines[nlines++] = "Content-Type: application/x-amz-json-1.1";
	sg->lines[nlines++] = sg->h_date;
	sg->lines[nlines++] = sg->h_target;
	sg->lines[nlines++] = sg->h_auth;
	if (sc.session_token != NULL)
	{
		snprintf(sg->h_token, sizeof(sg->h_token), "X-Amz-Security-Token: %s", creds.session_token);
		sg->lines[nlines++] = sg->h_token;
	}
	aws_credentials_wipe(&creds);

	memset(hreq, 0, sizeof(*hreq));
	hreq->method = "POST";
	hreq->url = ep->url;
	hreq->headers = sg->lines;
	hreq->nheaders = nlines;
	hreq->body = body;
	hreq->body_len = body_len;
	hreq->timeout_ms = cfg->timeout_ms > 0 ? cfg->timeout_ms : AWS_KMS_DEFAULT_TIMEOUT_MS;
	hreq->max_response = AWS_KMS_MAX_RESPONSE;
	hreq->interrupted = cfg->interrupted;
	/*
	 * Every KMS request carries a signature (and maybe a session token), and the
	 * answers of GenerateDataKey and Decrypt a plaintext DEK: have libcurl's copies
	 * wiped once the transfer is over.
	 */
	hreq->sensitive = true;
	return true;
}

/*
 * What the answer to one attempt (or its transport failure) comes to: `a`, and on a
 * 2xx JSON answer *result, the parsed response (free it with aws_json_free).
 */
static void
aws_read_answer(HttpStatus hs, const HttpResponse *resp, const char *errbuf,
				json_object **result, AwsAttempt *a)
{
	*result = NULL;
	if (hs != HTTP_OK)
		aws_classify_transport_error(a, hs, errbuf);
	else if (resp->status >= 200 && resp->status <= 299)
	{
		*result = aws_json_parse(resp->body, resp->body_len, AWS_KMS_MAX_RESPONSE);
		a->http_status = (int) resp->status;
		a->error_type[0] = '\0';
		if (*result == NULL)
			aws_attempt_set(a, KMS_ERR_PROTOCOL, false,
							"answer is not a JSON object (HTTP %ld)", resp->status);
		else
			aws_attempt_set(a, KMS_OK, false, "ok");
	}
	else
		aws_classify_http_error(a, resp->status, resp->body, resp->body_len);
}

/*
 * Send one signed request.  On KMS_OK with a 2xx answer, *result is the parsed
 * response (free it with aws_json_free).  Otherwise `a` says what went wrong.
 */
static void
aws_kms_attempt(const KmsConfig *cfg, const AwsEndpoint *ep, const char *op,
				const char *body, size_t body_len, json_object **result,
				AwsAttempt *a, int *attempts)
{
	AwsSigned	sg;
	HttpRequest hreq;
	HttpResponse resp;
	HttpStatus	hs;
	char		errbuf[128];

	*result = NULL;
	memset(&resp, 0, sizeof(resp));
	if (aws_sign(cfg, ep, op, body, body_len, &sg, &hreq, a))
	{
		errbuf[0] = '\0';
		(*attempts)++;
		hs = http_perform(&hreq, &resp, errbuf, sizeof(errbuf));
		aws_read_answer(hs, &resp, errbuf, result, a);
		http_response_free(&resp);
	}
	aws_signed_wipe(&sg);
}

/* Where one operation stands in its retries. */
typedef struct AwsRetry
{
	int			retries;		/* the budget: cfg->retries, bounded */
	int			used;
	int			attempts;		/* requests actually sent */
	bool		refreshed;		/* the one retry with fresh credentials was made */
} AwsRetry;

static void
aws_retry_init(AwsRetry *r, const KmsConfig *cfg)
{
	memset(r, 0, sizeof(*r));
	r->retries = cfg->retries < 0 ? 0 :
		cfg->retries > AWS_KMS_MAX_RETRIES ? AWS_KMS_MAX_RETRIES : cfg->retries;
}

/*
 * After a failed attempt: is another one worth making?  *pause says whether a backoff
 * comes first (kms_backoff_ms(r->used), after which r->used counts one more); the
 * retry with refreshed credentials comes at once and outside the budget.
 */
static bool
aws_retry_next(AwsRetry *r, const AwsAttempt *a, bool *pause)
{
	*pause = false;
	if (a->status == KMS_ERR_CREDENTIALS && a->http_status != 0)
	{
		/*
		 * KMS refused the credentials: drop the cached set so the next call fetches
		 * fresh ones (rotated keys, a renewed role session).  An expired session token
		 * is worth one immediate retry with the refreshed set.
		 */
		aws_credentials_invalidate();
		if (!r->refreshed && (strcmp(a->error_type, "ExpiredTokenException") == 0 ||
							  strcmp(a->error_type, "ExpiredToken") == 0))
		{
			r->refreshed = true;
			return true;
		}
	}
	if (!a->retryable || r->used >= r->retries)
		return false;
	*pause = true;
	return true;
}

static void
aws_attempt_canceled(AwsAttempt *a)
{
	aws_attempt_set(a, KMS_ERR_CANCELED, false, "request canceled");
	a->http_status = 0;
	a->error_type[0] = '\0';
}

/* The KmsError of an operation whose last attempt ended as `a`. */
static KmsStatus
aws_operation_error(const AwsAttempt *a, const AwsRetry *r, const char *op, KmsError *err)
{
	err->attempts = r->attempts;
	if (a->status == KMS_OK)
		return KMS_OK;

	err->http_status = a->http_status;
	if (a->http_status == 0 && a->error_type[0] == '\0' && a->status == KMS_ERR_CREDENTIALS)
		kms_set_error(err, a->status, "", "KMS %s failed: %s", op, a->detail);
	else if (r->attempts > 1)
		kms_set_error(err, a->status, a->error_type, "KMS %s failed: %s, after %d attempts",
					  op, a->detail, r->attempts);
	else
		kms_set_error(err, a->status, a->error_type, "KMS %s failed: %s", op, a->detail);
	return a->status;
}

/* The request body of `reqobj` (consumed), malloc'd; NULL with err set. */
static char *
aws_request_body(json_object *reqobj, const char *op, size_t *body_len, KmsError *err)
{
	const char *body;
	char	   *body_copy;

	body = json_object_to_json_string_length(reqobj,
											 JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE,
											 body_len);
	body_copy = body ? malloc(*body_len + 1) : NULL;
	if (body_copy != NULL)
		memcpy(body_copy, body, *body_len + 1);
	json_object_put(reqobj);
	if (body_copy == NULL)
		kms_set_error(err, KMS_ERR_INTERNAL, "", "KMS %s failed: out of memory", op);
	return body_copy;
}

/*
 * Run operation `op` with request `reqobj` (consumed).  Returns KMS_OK with *result
 * set, or an error status with err filled.
 */
static KmsStatus
aws_kms_call(const KmsConfig *cfg, const char *op, json_object *reqobj,
			 json_object **result, KmsError *err)
{
	AwsEndpoint ep;
	AwsAttempt	a;
	size_t		body_len;
	char	   *body;
	AwsRetry	r;
	bool		pause;
	KmsStatus	st;

	*result = NULL;
	memset(&a, 0, sizeof(a));
	st = aws_endpoint_parse(cfg, &ep, err);
	if (st != KMS_OK)
	{
		json_object_put(reqobj);
		return st;
	}
	body = aws_request_body(reqobj, op, &body_len, err);
	if (body == NULL)
		return err->status;

	aws_retry_init(&r, cfg);
	for (;;)
	{
		if (cfg->interrupted && cfg->interrupted())
		{
			aws_attempt_canceled(&a);
			break;
		}

		if (!kms_before_request(cfg))
		{
			aws_attempt_canceled(&a);
			break;
		}
		aws_kms_attempt(cfg, &ep, op, body, body_len, result, &a, &r.attempts);
		if (a.http_status != 0)
			kms_after_answer(cfg, a.status == KMS_ERR_THROTTLED);
		if (a.status == KMS_OK || !aws_retry_next(&r, &a, &pause))
			break;
		if (pause)
		{
			if (!kms_sleep_interruptible(cfg, kms_backoff_ms(r.used)))
			{
				aws_attempt_canceled(&a);
				break;
			}
			r.used++;
		}
	}
	free(body);
	return aws_operation_error(&a, &r, op, err);
}

/* ---------------------------------------------------------------------------
 * Response checks
 */

/* A key ARN: arn:<partition>:kms:<region>:<account>:key/<id>. */
static bool
aws_is_key_arn(const char *s)
{
	const char *p = s;
	int			colons = 0;

	if (strncmp(s, "arn:", 4) != 0 || strstr(s, ":kms:") == NULL)
		return false;
	for (; *p && colons < 5; p++)
		if (*p == ':')
			colons++;
	return colons == 5 && strncmp(p, "key/", 4) == 0 && p[4] != '\0';
}

/*
 * Does the KeyId KMS answered with name the key we asked for?  KMS always answers
 * with the key ARN, but the configured key may be written four ways:
 *   - a key ARN: the answer must be that ARN, byte for byte;
 *   - a bare key id (UUID or mrk-…): the answer must be a key ARN ending in
 *     ":key/<id>";
 *   - an alias ARN (arn:…:alias/name): which key an alias points at is known only to
 *     KMS and may change, so the answer must be a key ARN in the same partition,
 *     region and account;
 *   - an alias name (alias/name): likewise, only that the answer is a key ARN.
 * In every case the answer must be a well-formed key ARN that fits KMS_KEY_ID_MAX.
 */
static bool
aws_key_matches(const char *requested, const char *answered, size_t answered_len)
{
	const char *alias;

	if (answered == NULL || answered_len == 0 || answered_len >= KMS_KEY_ID_MAX ||
		strlen(answered) != answered_len)
		return false;
	for (size_t i = 0; i < answered_len; i++)
		if ((unsigned char) answered[i] <= ' ' || (unsigned char) answered[i] >= 127)
			return false;
	if (!aws_is_key_arn(answered))
		return false;

	if (strncmp(requested, "arn:", 4) == 0)
	{
		alias = strstr(requested, ":alias/");
		if (alias == NULL)
			return strcmp(requested, answered) == 0;
		/* same "arn:partition:kms:region:account:" prefix */
		return strncmp(requested, answered, (size_t) (alias - requested) + 1) == 0;
	}
	if (strncmp(requested, "alias/", 6) == 0)
		return true;

	/* bare key id */
	{
		size_t		rlen = strlen(requested);

		return answered_len > rlen + 5 &&
			strcmp(answered + answered_len - rlen, requested) == 0 &&
			strncmp(answered + answered_len - rlen - 5, ":key/", 5) == 0;
	}
}

static KmsStatus
aws_check_key_id(json_object *resp, const char *field, const char *requested,
				 const char *op, char *arn_out, KmsError *err)
{
	size_t		len;
	const char *keyid = aws_json_string(resp, field, &len);

	if (keyid == NULL)
		return kms_set_error(err, KMS_ERR_PROTOCOL, "",
							 "KMS %s failed: the answer names no %s", op, field);
	if (!aws_key_matches(requested, keyid, len))
		return kms_set_error(err, KMS_ERR_PROTOCOL, "",
							 "KMS %s failed: the answer's %s is not the requested master key",
							 op, field);
	if (arn_out != NULL)
		memcpy(arn_out, keyid, len + 1);
	return KMS_OK;
}

/* Decode CiphertextBlob into out (room for KMS_WRAPPED_MAX). */
static KmsStatus
aws_take_ciphertext(json_object *resp, const char *op, uint8_t *out, size_t *out_len,
					KmsError *err)
{
	size_t		len;
	const char *b64 = aws_json_string(resp, "CiphertextBlob", &len);
	uint8_t		buf[KMS_WRAPPED_MAX + 3];
	long		n;

	if (b64 == NULL)
		return kms_set_error(err, KMS_ERR_PROTOCOL, "",
							 "KMS %s failed: the answer has no CiphertextBlob", op);
	if (len > AWS_B64_WRAPPED_MAX)
		return kms_set_error(err, KMS_ERR_PROTOCOL, "",
							 "KMS %s failed: CiphertextBlob is larger than %d bytes",
							 op, KMS_WRAPPED_MAX);
	n = aws_b64_decode(b64, len, buf, sizeof(buf));
	if (n <= 0 || n > KMS_WRAPPED_MAX)
		return kms_set_error(err, KMS_ERR_PROTOCOL, "",
							 "KMS %s failed: CiphertextBlob is not valid base64 of 1 to %d bytes",
							 op, KMS_WRAPPED_MAX);
	memcpy(out, buf, (size_t) n);
	*out_len = (size_t) n;
	return KMS_OK;
}

/* Decode Plaintext into dek; exactly KMS_DEK_LEN bytes or an error. */
static KmsStatus
aws_take_plaintext(json_object *resp, const char *op, uint8_t dek[KMS_DEK_LEN],
				   KmsError *err)
{
	size_t		len;
	const char *b64 = aws_json_string(resp, "Plaintext", &len);
	uint8_t		buf[48];
	long		n;

	if (b64 == NULL)
		return kms_set_error(err, KMS_ERR_PROTOCOL, "",
							 "KMS %s failed: the answer has no Plaintext", op);
	n = len <= 4 * ((KMS_DEK_LEN + 2) / 3) ?
		aws_b64_decode(b64, len, buf, sizeof(buf)) : -1;
	if (n != KMS_DEK_LEN)
	{
		OPENSSL_cleanse(buf, sizeof(buf));
		return kms_set_error(err, KMS_ERR_PROTOCOL, "",
							 "KMS %s failed: Plaintext is not valid base64 of exactly %d bytes",
							 op, KMS_DEK_LEN);
	}
	memcpy(dek, buf, KMS_DEK_LEN);
	OPENSSL_cleanse(buf, sizeof(buf));
	return KMS_OK;
}

static KmsStatus
aws_check_args(const char *op, const char *key_id, const KmsEncryptionContext *ec,
			   KmsError *err)
{
	if (key_id == NULL || key_id[0] == '\0')
		return kms_set_error(err, KMS_ERR_CONFIG, "",
							 "KMS %s failed: no master key given (envelope.kms_key)", op);
	if (strlen(key_id) >= KMS_KEY_ID_MAX)
		return kms_set_error(err, KMS_ERR_CONFIG, "",
							 "KMS %s failed: master key id is too long", op);
	if (!aws_key_id_valid(key_id))
		return kms_set_error(err, KMS_ERR_CONFIG, "",
							 "KMS %s failed: master key id contains spaces, control or non-ASCII characters",
							 op);
	if (ec == NULL || ec->tenant == NULL || ec->tenant[0] == '\0' || ec->version < 1)
		return kms_set_error(err, KMS_ERR_INTERNAL, "",
							 "KMS %s failed: incomplete encryption context", op);
	/* the caller converts tenant names to UTF-8; anything else must not reach KMS */
	if (!aws_utf8_valid(ec->tenant))
		return kms_set_error(err, KMS_ERR_INTERNAL, "",
							 "KMS %s failed: tenant name is not valid UTF-8", op);
	return KMS_OK;
}

/* A request object holding a stored wrapped DEK as CiphertextBlob; NULL with err set. */
static json_object *
aws_blob_request(const char *op, const uint8_t *wrapped, size_t wrapped_len, KmsError *err)
{
	char		b64[AWS_B64_WRAPPED_MAX + 1];
	json_object *req;

	if (wrapped == NULL || wrapped_len == 0 || wrapped_len > KMS_WRAPPED_MAX)
	{
		kms_set_error(err, KMS_ERR_INVALID_CIPHERTEXT, "",
					  "KMS %s failed: stored wrapped key has an impossible length", op);
		return NULL;
	}
	aws_b64_encode(wrapped, wrapped_len, b64);
	req = json_object_new_object();
	if (req == NULL)
	{
		kms_set_error(err, KMS_ERR_INTERNAL, "", "KMS %s failed: out of memory", op);
		return NULL;
	}
	json_object_object_add(req, "CiphertextBlob", json_object_new_string(b64));
	return req;
}

static void
aws_reset_error(KmsError *err)
{
	memset(err, 0, sizeof(*err));
	err->status = KMS_OK;
}

/* ---------------------------------------------------------------------------
 * The provider
 */

/*
 * How every operation starts: a cleared error, the master key id and encryption
 * context checked, and a request object, which holds the stored wrapped DEK as
 * CiphertextBlob when with_blob is set.  NULL with err set.
 */
static json_object *
aws_request_start(const char *op, const char *key_id, const KmsEncryptionContext *ec,
				  bool with_blob, const uint8_t *wrapped, size_t wrapped_len,
				  KmsError *err)
{
	json_object *req;

	aws_reset_error(err);
	if (aws_check_args(op, key_id, ec, err) != KMS_OK)
		return NULL;
	if (with_blob)
		return aws_blob_request(op, wrapped, wrapped_len, err);
	req = json_object_new_object();
	if (req == NULL)
		kms_set_error(err, KMS_ERR_INTERNAL, "", "KMS %s failed: out of memory", op);
	return req;
}

/*
 * Send req (consumed) and check that the answer's KeyId is the master key asked for
 * (its ARN copied to key_arn when that is not NULL).  KMS_OK with *resp to be freed with
 * aws_json_free; otherwise *resp is NULL and err says why.
 */
static KmsStatus
aws_exchange(const KmsConfig *cfg, const char *op, json_object *req, const char *key_id,
			 char *key_arn, json_object **resp, KmsError *err)
{
	KmsStatus	st;

	*resp = NULL;
	st = aws_kms_call(cfg, op, req, resp, err);
	if (st != KMS_OK)
		return st;
	st = aws_check_key_id(*resp, "KeyId", key_id, op, key_arn, err);
	if (st != KMS_OK)
	{
		aws_json_free(*resp);
		*resp = NULL;
	}
	return st;
}

/*
 * The end of an operation that returns a data key: while st is KMS_OK, take Plaintext
 * from resp into dek; on any failure wipe dek.  Frees resp (NULL allowed).
 */
static KmsStatus
aws_finish_with_dek(KmsStatus st, json_object *resp, const char *op,
					uint8_t dek[KMS_DEK_LEN], KmsError *err)
{
	if (st == KMS_OK)
		st = aws_take_plaintext(resp, op, dek, err);
	if (st != KMS_OK)
		OPENSSL_cleanse(dek, KMS_DEK_LEN);
	aws_json_free(resp);
	return st;
}

static KmsStatus
aws_generate_data_key(const KmsConfig *cfg, const char *key_id,
					  const KmsEncryptionContext *ec,
					  uint8_t dek[KMS_DEK_LEN],
					  uint8_t *wrapped, size_t *wrapped_len,
					  char *key_arn, KmsError *err)
{
	const char *op = "GenerateDataKey";
	json_object *req = aws_request_start(op, key_id, ec, false, NULL, 0, err);
	json_object *resp;
	char		regional_key[KMS_KEY_ID_MAX];
	KmsStatus	st;

	if (req == NULL)
		return err->status;
	if (aws_key_for_region(cfg, op, key_id, regional_key, sizeof(regional_key), err) != KMS_OK)
	{
		json_object_put(req);	/* holds no secret yet */
		return err->status;
	}
	json_object_object_add(req, "KeyId", json_object_new_string(regional_key));
	json_object_object_add(req, "KeySpec", json_object_new_string("AES_256"));
	json_object_object_add(req, "EncryptionContext", aws_json_context(ec));

	st = aws_exchange(cfg, op, req, regional_key, key_arn, &resp, err);
	if (st == KMS_OK)
		st = aws_take_ciphertext(resp, op, wrapped, wrapped_len, err);
	return aws_finish_with_dek(st, resp, op, dek, err);
}

static KmsStatus
aws_decrypt(const KmsConfig *cfg, const char *key_id,
			const KmsEncryptionContext *ec,
			const uint8_t *wrapped, size_t wrapped_len,
			uint8_t dek[KMS_DEK_LEN], KmsError *err)
{
	const char *op = "Decrypt";
	json_object *req = aws_request_start(op, key_id, ec, true, wrapped, wrapped_len, err);
	json_object *resp;
	char		regional_key[KMS_KEY_ID_MAX];
	KmsStatus	st;

	if (req == NULL)
		return err->status;
	if (aws_key_for_region(cfg, op, key_id, regional_key, sizeof(regional_key), err) != KMS_OK)
	{
		json_object_put(req);	/* holds only the wrapped DEK, no secret */
		OPENSSL_cleanse(dek, KMS_DEK_LEN);
		return err->status;
	}
	/* KeyId makes KMS refuse a blob wrapped under any other key */
	json_object_object_add(req, "KeyId", json_object_new_string(regional_key));
	json_object_object_add(req, "EncryptionContext", aws_json_context(ec));

	st = aws_exchange(cfg, op, req, regional_key, NULL, &resp, err);
	return aws_finish_with_dek(st, resp, op, dek, err);
}

/*
 * The ReEncrypt request of one DEK; NULL with err set.  source_key and dest_key
 * (KMS_KEY_ID_MAX bytes each) receive the key ids sent, those of the configured
 * region (aws_key_for_region), which the answer must name.
 */
static json_object *
aws_reencrypt_request(const KmsConfig *cfg, const char *source_key_id,
					  const char *dest_key_id, const KmsEncryptionContext *ec,
					  const uint8_t *wrapped, size_t wrapped_len,
					  char *source_key, char *dest_key, KmsError *err)
{
	const char *op = "ReEncrypt";
	json_object *req;

	req = aws_request_start(op, source_key_id, ec, true, wrapped, wrapped_len, err);
	if (req == NULL)
		return NULL;
	if (aws_check_args(op, dest_key_id, ec, err) != KMS_OK ||
		aws_key_for_region(cfg, op, source_key_id, source_key, KMS_KEY_ID_MAX, err) != KMS_OK ||
		aws_key_for_region(cfg, op, dest_key_id, dest_key, KMS_KEY_ID_MAX, err) != KMS_OK)
	{
		json_object_put(req);	/* holds only the wrapped DEK, no secret */
		return NULL;
	}
	json_object_object_add(req, "SourceKeyId", json_object_new_string(source_key));
	json_object_object_add(req, "DestinationKeyId", json_object_new_string(dest_key));
	/* same tenant and version: the DEK moves keys, not owners */
	json_object_object_add(req, "SourceEncryptionContext", aws_json_context(ec));
	json_object_object_add(req, "DestinationEncryptionContext", aws_json_context(ec));
	return req;
}

/*
 * Check a ReEncrypt answer (KeyId the destination key, its ARN into dest_key_arn;
 * SourceKeyId, documented but optional in practice, the source key when present:
 * both as sent, see aws_reencrypt_request) and take the new wrapped DEK from it.
 * Frees resp.
 */
static KmsStatus
aws_reencrypt_answer(json_object *resp, const char *source_key, const char *dest_key,
					 uint8_t *new_wrapped, size_t *new_wrapped_len,
					 char *dest_key_arn, KmsError *err)
{
	const char *op = "ReEncrypt";
	KmsStatus	st;

	st = aws_check_key_id(resp, "KeyId", dest_key, op, dest_key_arn, err);
	if (st == KMS_OK && aws_json_string(resp, "SourceKeyId", NULL) != NULL)
		st = aws_check_key_id(resp, "SourceKeyId", source_key, op, NULL, err);
	if (st == KMS_OK)
		st = aws_take_ciphertext(resp, op, new_wrapped, new_wrapped_len, err);
	aws_json_free(resp);
	return st;
}

static KmsStatus
aws_reencrypt(const KmsConfig *cfg, const char *source_key_id,
			  const char *dest_key_id,
			  const KmsEncryptionContext *ec,
			  const uint8_t *wrapped, size_t wrapped_len,
			  uint8_t *new_wrapped, size_t *new_wrapped_len,
			  char *dest_key_arn, KmsError *err)
{
	json_object *req;
	json_object *resp;
	char		source_key[KMS_KEY_ID_MAX];
	char		dest_key[KMS_KEY_ID_MAX];
	KmsStatus	st;

	req = aws_reencrypt_request(cfg, source_key_id, dest_key_id, ec, wrapped, wrapped_len,
								source_key, dest_key, err);
	if (req == NULL)
		return err->status;
	st = aws_kms_call(cfg, "ReEncrypt", req, &resp, err);
	if (st != KMS_OK)
		return st;
	return aws_reencrypt_answer(resp, source_key, dest_key, new_wrapped,
								new_wrapped_len, dest_key_arn, err);
}

/* Where one DEK of aws_reencrypt_many stands. */
typedef struct AwsManyItem
{
	char	   *body;			/* its request, NULL once it is done */
	size_t		body_len;
	char		source_key[KMS_KEY_ID_MAX]; /* the key ids sent (aws_reencrypt_request) */
	char		dest_key[KMS_KEY_ID_MAX];
	AwsRetry	retry;
	AwsAttempt	last;			/* how its last attempt went */
} AwsManyItem;

/* The buffers of one round of aws_reencrypt_many, for up to n requests. */
typedef struct AwsManyRound
{
	int		   *item;			/* the item each request is for */
	bool	   *sent;			/* signed and handed to http.c */
	AwsSigned  *signed_;
	HttpResponse *resps;
	HttpStatus *statuses;
	char	   *errbufs;		/* 128 bytes each */
} AwsManyRound;

#define AWS_MANY_ERRLEN 128

static bool
aws_many_round_alloc(AwsManyRound *round, int n)
{
	round->item = calloc(n, sizeof(int));
	round->sent = calloc(n, sizeof(bool));
	round->signed_ = calloc(n, sizeof(AwsSigned));
	round->resps = calloc(n, sizeof(HttpResponse));
	round->statuses = calloc(n, sizeof(HttpStatus));
	round->errbufs = calloc(n, AWS_MANY_ERRLEN);
	return round->item && round->sent && round->signed_ && round->resps &&
		round->statuses && round->errbufs;
}

static void
aws_many_round_free(AwsManyRound *round, int n)
{
	if (round->signed_)
		OPENSSL_cleanse(round->signed_, n * sizeof(AwsSigned));
	free(round->item);
	free(round->sent);
	free(round->signed_);
	free(round->resps);
	free(round->statuses);
	free(round->errbufs);
}

/* What aws_many_prepare needs to sign the requests of one round. */
typedef struct AwsManyPrepare
{
	const KmsConfig *cfg;
	const AwsEndpoint *ep;
	AwsManyItem *st;
	AwsManyRound *round;
} AwsManyPrepare;

/*
 * http_perform_many's HttpPrepare: request j of the round, signed at the moment it
 * goes on the wire, once the rate limit lets it go (kms_before_request).  An item
 * whose signing fails is skipped, its error in its `last` attempt.
 */
static HttpStatus
aws_many_prepare(void *arg, int j, HttpRequest *req)
{
	AwsManyPrepare *p = arg;
	AwsManyItem *item = &p->st[p->round->item[j]];

	if (!kms_before_request(p->cfg))
		return HTTP_ERR_CANCELED;
	if (!aws_sign(p->cfg, p->ep, "ReEncrypt", item->body, item->body_len,
				  &p->round->signed_[j], req, &item->last))
		return HTTP_ERR_INTERNAL;
	item->retry.attempts++;
	p->round->sent[j] = true;
	return HTTP_OK;
}

/* The pending items of the next round into round->item; how many. */
static int
aws_many_pending(AwsManyItem *st, int n, AwsManyRound *round)
{
	int			m = 0;

	for (int i = 0; i < n; i++)
		if (st[i].body != NULL)
		{
			round->sent[m] = false;
			round->item[m++] = i;
		}
	return m;
}

/*
 * Read the answers of a round: a DEK re-wrapped, or failed for good, is done; one to
 * try again stays pending.  Returns the backoff the retries want before the next
 * round (-1: none, 0 or more: kms_backoff_ms of that many retries used).
 */
static int
aws_many_read(const KmsConfig *cfg, KmsRewrapItem *items, AwsManyItem *st,
			  AwsManyRound *round, int m)
{
	int			backoff = -1;

	for (int j = 0; j < m; j++)
	{
		int			i = round->item[j];
		json_object *resp;
		bool		pause;

		resp = NULL;
		if (round->sent[j])
			aws_read_answer(round->statuses[j], &round->resps[j],
							round->errbufs + (size_t) j * AWS_MANY_ERRLEN, &resp, &st[i].last);
		else if (round->statuses[j] == HTTP_ERR_CANCELED)
			aws_attempt_canceled(&st[i].last);
		/* else: its signing failed, and `last` says why */
		http_response_free(&round->resps[j]);
		aws_signed_wipe(&round->signed_[j]);
		if (round->sent[j] && st[i].last.http_status != 0)
			kms_after_answer(cfg, st[i].last.status == KMS_ERR_THROTTLED);
		if (st[i].last.status == KMS_OK)
		{
			items[i].err.attempts = st[i].retry.attempts;
			aws_reencrypt_answer(resp, st[i].source_key, st[i].dest_key,
								 items[i].new_wrapped, &items[i].new_wrapped_len,
								 items[i].dest_key_arn, &items[i].err);
		}
		else if (aws_retry_next(&st[i].retry, &st[i].last, &pause))
		{
			if (pause)
			{
				if (st[i].retry.used > backoff)
					backoff = st[i].retry.used;
				st[i].retry.used++;
			}
			continue;
		}
		free(st[i].body);
		st[i].body = NULL;
	}
	return backoff;
}

/*
 * ReEncrypt of many DEKs with up to max_in_flight requests on the wire at once.  In
 * rounds: every pending DEK's request goes through http_perform_many, signed as it
 * goes on the wire (aws_many_prepare); the DEKs whose answer calls for a retry (aws_retry_next, as for
 * one request) are sent again in the next round, after the longest backoff any of
 * them is due.  Every request takes its turn from the rate limit (kms_before_request)
 * and reports its answer to it (kms_after_answer), retries included, as the single
 * path's do.  A cancel stops the round at once (http.c abandons what is on the wire)
 * and leaves every DEK not done with KMS_ERR_CANCELED.
 */
static KmsStatus
aws_reencrypt_many(const KmsConfig *cfg, const char *dest_key_id, KmsRewrapItem *items,
				   int n, int max_in_flight)
{
	const char *op = "ReEncrypt";
	AwsEndpoint ep;
	AwsManyItem *st;
	AwsManyRound round;
	AwsManyPrepare prepare;
	KmsError	eperr;
	KmsStatus	result = KMS_OK;

	if (n <= 0)
		return KMS_OK;
	memset(&round, 0, sizeof(round));
	st = calloc(n, sizeof(AwsManyItem));
	for (int i = 0; i < n; i++)
		aws_reset_error(&items[i].err);
	if (st == NULL || !aws_many_round_alloc(&round, n))
	{
		for (int i = 0; i < n; i++)
			kms_set_error(&items[i].err, KMS_ERR_INTERNAL, "", "KMS %s failed: out of memory", op);
		free(st);
		aws_many_round_free(&round, n);
		return KMS_ERR_INTERNAL;
	}
	memset(&eperr, 0, sizeof(eperr));
	if (aws_endpoint_parse(cfg, &ep, &eperr) != KMS_OK)
	{
		for (int i = 0; i < n; i++)
			items[i].err = eperr;
		free(st);
		aws_many_round_free(&round, n);
		return eperr.status;
	}

	for (int i = 0; i < n; i++)
	{
		json_object *req = aws_reencrypt_request(cfg, items[i].source_key_id, dest_key_id,
												 &items[i].ec, items[i].wrapped,
												 items[i].wrapped_len, st[i].source_key,
												 st[i].dest_key, &items[i].err);

		aws_retry_init(&st[i].retry, cfg);
		if (req != NULL)
			st[i].body = aws_request_body(req, op, &st[i].body_len, &items[i].err);
	}

	prepare.cfg = cfg;
	prepare.ep = &ep;
	prepare.st = st;
	prepare.round = &round;
	for (;;)
	{
		int			m;
		int			backoff;

		if (cfg->interrupted && cfg->interrupted())
			break;
		m = aws_many_pending(st, n, &round);
		if (m == 0)
			break;
		http_perform_many(m, max_in_flight, aws_many_prepare, &prepare, round.resps,
						  round.statuses, round.errbufs, AWS_MANY_ERRLEN);
		backoff = aws_many_read(cfg, items, st, &round, m);
		if (backoff >= 0 && !kms_sleep_interruptible(cfg, kms_backoff_ms(backoff)))
			break;
	}

	for (int i = 0; i < n; i++)
	{
		if (st[i].body != NULL)
		{
			/* still pending: the cancel came first */
			aws_attempt_canceled(&st[i].last);
			free(st[i].body);
			st[i].body = NULL;
		}
		if (st[i].last.status != KMS_OK && items[i].err.status == KMS_OK)
			aws_operation_error(&st[i].last, &st[i].retry, op, &items[i].err);
		if (result == KMS_OK && items[i].err.status != KMS_OK)
			result = items[i].err.status;
	}
	free(st);
	aws_many_round_free(&round, n);
	return result;
}

const KmsProvider kms_aws_provider = {
	.api_version = KMS_PROVIDER_API_VERSION,
	.name = "aws",
	.generate_data_key = aws_generate_data_key,
	.decrypt = aws_decrypt,
	.reencrypt = aws_reencrypt,
	.reencrypt_many = aws_reencrypt_many,
};
