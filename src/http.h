/*
 * http.h — a small, careful HTTP client on libcurl.
 *
 * Plain C: no postgres.h, no ereport.  One request at a time per process over one
 * reused easy handle (keep-alive to the KMS), or a set of requests with several on
 * the wire at once (http_perform_many).  TLS verification is always on, redirects
 * are never followed, proxies from the environment are ignored, and the caller's
 * `interrupted` callback is polled while a request is in flight so a query cancel
 * stops it within a couple of hundred milliseconds.  Error texts never carry a header
 * or a body: those may hold credentials or keys.
 */
#ifndef PG_ENVELOPE_HTTP_H
#define PG_ENVELOPE_HTTP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum HttpStatus
{
	HTTP_OK = 0,
	HTTP_ERR_CONNECT,			/* could not resolve or connect */
	HTTP_ERR_TIMEOUT,			/* timeout_ms elapsed, or the server went silent */
	HTTP_ERR_CANCELED,			/* interrupted() returned true */
	HTTP_ERR_TOO_LARGE,			/* response body above max_response */
	HTTP_ERR_TLS,				/* handshake or certificate verification failed */
	HTTP_ERR_NETWORK,			/* connection reset, bad answer, other transfer error */
	HTTP_ERR_INTERNAL			/* out of memory, libcurl misuse */
} HttpStatus;

typedef struct HttpRequest
{
	const char *method;			/* "GET", "PUT", "POST" */
	const char *url;
	const char *const *headers; /* "Name: value" lines */
	int			nheaders;
	const char *body;
	size_t		body_len;
	int			timeout_ms;		/* total; connect timeout = min(timeout, 10s); low-speed
								 * limit too; <= 0 means 30 s, never unbounded */
	size_t		max_response;	/* body larger than this -> HTTP_ERR_TOO_LARGE */
	bool		(*interrupted) (void);	/* polled about every 100 ms while in flight;
										 * true -> HTTP_ERR_CANCELED */
	bool		sensitive;		/* the request or its answer carries a secret (a
								 * signature, a token, a data key, credentials): when
								 * the transfer ends, libcurl's copies are freed, and
								 * so wiped, instead of kept for the next request */
} HttpRequest;

/* After HTTP_OK, body is malloc'd and NUL-terminated, never NULL (possibly ""). */
typedef struct HttpResponse
{
	long		status;
	char	   *body;
	size_t		body_len;
} HttpResponse;

/*
 * curl_global_init_mem once per process, with an allocator that wipes what libcurl
 * frees; called from _PG_init in the postmaster, before any other use of libcurl.
 */
extern int	http_global_init(void);

/*
 * Perform one request.  On HTTP_OK, *resp holds the status and body whatever the
 * HTTP status code (4xx/5xx are the caller's to interpret); on any other status *resp
 * is empty.  Always call http_response_free afterwards.
 */
extern HttpStatus http_perform(const HttpRequest *req, HttpResponse *resp,
							   char *errbuf, size_t errlen);

/*
 * Request i of http_perform_many, made just before it goes on the wire (so that a
 * signature is fresh and a rate limit can be waited for at that moment): fill *req,
 * which must stay valid until the transfer ends (libcurl copies the URL and the
 * header lines, not the body).  Return HTTP_OK to send it, HTTP_ERR_CANCELED to stop
 * the whole set as an interrupt would, or another status to skip request i (that
 * status becomes its own; the caller knows why).
 */
typedef HttpStatus (*HttpPrepare) (void *arg, int i, HttpRequest *req);

/*
 * Perform `n` requests, at most `max_in_flight` of them on the wire at once: the next
 * one is prepared and started as soon as one finishes, over the connections
 * http_perform keeps.  resps[i], statuses[i] and the error text at errbufs + i *
 * errlen (errbufs may be NULL) are what http_perform would have given for request i.
 * When a request's `interrupted` callback asks to stop, every transfer still on the
 * wire is abandoned (its connection closed) and it, and every request not yet
 * started, gets HTTP_ERR_CANCELED.  Always call http_response_free on every resps[i]
 * afterwards.
 */
extern void http_perform_many(int n, int max_in_flight, HttpPrepare prepare, void *arg,
							  HttpResponse *resps, HttpStatus *statuses,
							  char *errbufs, size_t errlen);

/* Wipes the body (OPENSSL_cleanse) before freeing: it may hold keys. */
extern void http_response_free(HttpResponse *resp);

/*
 * For the unit tests only.  The hook sees every block libcurl releases through the
 * wiping allocator twice: before the wipe (wiped = false) and after it, just before
 * it goes back to libc.  The counter is the number of easy handles created so far;
 * http_test_tls_hardening reports the SSL_CTX options and mode the last TLS
 * connection was given (both 0 until one was made, or when libcurl's TLS backend is
 * not OpenSSL).
 */
extern void http_test_set_free_hook(void (*hook) (const void *p, size_t len, bool wiped));
extern unsigned long http_test_easy_handles_created(void);
extern void http_test_tls_hardening(uint64_t *options, long *mode);

#endif							/* PG_ENVELOPE_HTTP_H */
