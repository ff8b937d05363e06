/*
 * sigv4.h — AWS Signature Version 4 request signing (header form).
 *
 * Plain C on OpenSSL (SHA-256, HMAC): no postgres.h, no ereport, no allocation that
 * outlives a call.  The caller builds the exact request it will send, hands every header
 * it wants signed (at least "host" and "x-amz-date"), and receives the value of the
 * Authorization header.  Every derived key and intermediate HMAC is wiped before
 * returning, on success and on error.
 *
 * Checked against the published AWS test suite (test/vectors/sigv4/v4) by
 * test/unit/test_sigv4.c.
 */
#ifndef PG_ENVELOPE_SIGV4_H
#define PG_ENVELOPE_SIGV4_H

#include <stdbool.h>
#include <stddef.h>
#include <time.h>

typedef struct Sigv4Header
{
	const char *name;
	const char *value;
} Sigv4Header;

typedef struct Sigv4Request
{
	const char *method;			/* "POST" */
	const char *uri;			/* path with optional "?query", as it will be sent */
	const Sigv4Header *headers; /* every header to sign, including "host" and
								 * "x-amz-date" */
	int			nheaders;
	const unsigned char *payload;
	size_t		payload_len;
} Sigv4Request;

typedef struct Sigv4Credentials
{
	const char *access_key_id;
	const char *secret_access_key;
	const char *session_token;	/* NULL or "" when none */
} Sigv4Credentials;

/* Filled only when non-NULL; for tests.  Never log it: it names the access key id. */
typedef struct Sigv4Debug
{
	char		canonical_request[8192];
	char		string_to_sign[1024];
	char		signature[65];
} Sigv4Debug;

/*
 * Writes the full Authorization header value
 * ("AWS4-HMAC-SHA256 Credential=..., SignedHeaders=..., Signature=...").
 *
 * amz_date is "YYYYMMDDTHHMMSSZ" and must equal the x-amz-date header sent.  When a
 * session token is given and sign_session_token is true, it is signed as
 * x-amz-security-token (the caller must also send that header).  normalize_path
 * applies RFC 3986 dot-segment removal and collapses repeated slashes, as every AWS
 * service except S3 expects.  Returns 0 on success, -1 with errbuf set.
 */
extern int	sigv4_sign(const Sigv4Request *req, const Sigv4Credentials *cred,
					   const char *region, const char *service,
					   const char *amz_date, bool normalize_path,
					   bool sign_session_token,
					   char *authorization, size_t authorization_len,
					   Sigv4Debug *debug, char *errbuf, size_t errlen);

/* Format t (UTC) as "YYYYMMDDTHHMMSSZ". */
extern void sigv4_format_amz_date(time_t t, char out[17]);

#endif							/* PG_ENVELOPE_SIGV4_H */
