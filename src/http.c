/*
 * http.c — a small, careful HTTP client on libcurl.
 *
 * Plain C: no postgres.h, no ereport.  The transfer is driven through the multi
 * interface in our own loop instead of curl_easy_perform, because libcurl calls its
 * progress callback only about once a second while a server is silent; our loop wakes
 * every HTTP_POLL_MS and asks the caller's `interrupted` callback, so a query cancel
 * stops even a hung connect or a server that never answers within ~100 ms.  The
 * XFERINFOFUNCTION callback asks too, which aborts inside an active transfer.
 *
 * Policy, the same for every request:
 *   - TLS peer and host name verification always on;
 *   - redirects never followed (a 3xx is returned as is: a KMS never redirects, and a
 *     redirect could send a signed request or credentials somewhere else);
 *   - proxies from the environment ignored (CURLOPT_PROXY ""): http_proxy/https_proxy
 *     of the server process would otherwise route KMS traffic, which carries
 *     credentials and plaintext data keys, through a host nobody configured for it;
 *   - CURLOPT_NOSIGNAL, because a PostgreSQL backend owns its signal handlers;
 *   - the response body lives in a malloc'd buffer bounded by max_response and is
 *     wiped whenever it is discarded, since it may hold a data key or credentials.
 *
 * One easy handle and one multi handle per process, created lazily on first use and
 * reset per request, keep connections (and TLS sessions) alive between KMS calls.
 * http_perform_many puts several requests on the wire at once over the same multi
 * handle (and so the same connection cache), each with an easy handle of its own.  If
 * the process has forked since they were created, they are abandoned unclosed: closing
 * would shut down (and for TLS, send close_notify on) sockets the parent still uses.
 *
 * Secrets in memory that is not ours:
 *   - libcurl allocates through curl_global_init_mem with a free that wipes the whole
 *     block (malloc_usable_size bytes) and a realloc that never leaves an unwiped old
 *     block behind.  libcurl copies the request (Authorization, X-Amz-Security-Token)
 *     into its own buffers and reads every answer (data keys, credentials) into a
 *     receive buffer; those are freed without wiping otherwise.
 *   - libcurl keeps its receive buffer, among others, for the life of the easy handle,
 *     so the last answer would stay there until the next one overwrote it.  After a
 *     request marked `sensitive` the easy handle is therefore destroyed (its buffers go
 *     through the wiping free) and a new one made for the next request.  Connections
 *     live in the multi handle's connection cache, which is kept, so keep-alive
 *     survives; TLS session tickets cached in the old easy handle do not, which only
 *     costs a full handshake when a new connection has to be opened.
 *   - OpenSSL keeps decrypted records in its own read buffer, allocated outside
 *     libcurl.  When libcurl's TLS backend is OpenSSL, every SSL_CTX gets
 *     SSL_OP_CLEANSE_PLAINTEXT (OpenSSL 3.0+: plaintext is wiped once the application
 *     has read it) and SSL_MODE_RELEASE_BUFFERS (idle record buffers are freed, and
 *     with the option above wiped first, instead of kept for the life of the
 *     connection).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>
#ifdef __linux__
#include <malloc.h>				/* malloc_usable_size, in glibc and musl */
#define HTTP_WIPING_ALLOCATOR 1
#endif

#include <curl/curl.h>
#include <openssl/crypto.h>
#include <openssl/ssl.h>

#include "http.h"
#include "util.h"

/* How often the caller's interrupt callback is polled while a request is in flight. */
#define HTTP_POLL_MS 100

/* Used when a caller passes no timeout: a request must never wait forever. */
#define HTTP_DEFAULT_TIMEOUT_MS 30000

#define HTTP_MAX_CONNECT_TIMEOUT_MS 10000

typedef struct HttpTransfer
{
	char	   *buf;			/* body so far, NUL-terminated when non-NULL */
	size_t		len;
	size_t		cap;
	size_t		max;
	bool		too_large;
	bool		oom;
	bool		canceled;
	bool		(*interrupted) (void);
} HttpTransfer;

static bool http_global_done = false;
static CURL *http_easy = NULL;
static CURLM *http_multi = NULL;
static pid_t http_owner_pid = 0;
static unsigned long http_easy_created = 0;

/* -1 not yet known, 0 no, 1 yes: libcurl does TLS with the OpenSSL we link. */
static int	http_tls_openssl = -1;
static uint64_t http_tls_last_options = 0;
static long http_tls_last_mode = 0;

static void (*http_free_hook) (const void *p, size_t len, bool wiped) = NULL;

#ifdef HTTP_WIPING_ALLOCATOR
/*
 * libcurl's free: wipe the whole block, not just what was asked for, since libcurl
 * asks for no size when it frees and a block may have been written to its end.
 */
static void
wiping_free(void *p)
{
	size_t		n;

	if (p == NULL)
		return;
	n = malloc_usable_size(p);
	if (http_free_hook)
		http_free_hook(p, n, false);
	OPENSSL_cleanse(p, n);
	if (http_free_hook)
		http_free_hook(p, n, true);
	free(p);
}

/*
 * libcurl's realloc: libc's realloc may move a block and free the old one unwiped,
 * so always allocate, copy and wipe.  libcurl grows its buffers geometrically, so the
 * copies cost little.
 */
static void *
wiping_realloc(void *old, size_t size)
{
	void	   *p;
	size_t		oldn;

	if (old == NULL)
		return malloc(size);
	p = malloc(size > 0 ? size : 1);
	if (p == NULL)
		return NULL;			/* the old block stays valid, as realloc promises */
	oldn = malloc_usable_size(old);
	memcpy(p, old, oldn < size ? oldn : size);
	wiping_free(old);
	return p;
}
#endif

/*
 * With no wiping allocator (no malloc_usable_size on this platform) libcurl uses
 * libc's and its freed buffers are not wiped; handle recycling and the OpenSSL
 * options still apply.  If something else in the process initialised libcurl first,
 * curl_global_init_mem only counts one more user and keeps that allocator.
 */
int
http_global_init(void)
{
	CURLcode	rc;

	if (http_global_done)
		return 0;
#ifdef HTTP_WIPING_ALLOCATOR
	rc = curl_global_init_mem(CURL_GLOBAL_DEFAULT, malloc, wiping_free, wiping_realloc,
							  strdup, calloc);
#else
	rc = curl_global_init(CURL_GLOBAL_DEFAULT);
#endif
	if (rc != CURLE_OK)
		return -1;
	http_global_done = true;
	return 0;
}

void
http_test_set_free_hook(void (*hook) (const void *p, size_t len, bool wiped))
{
	http_free_hook = hook;
}

unsigned long
http_test_easy_handles_created(void)
{
	return http_easy_created;
}

void
http_test_tls_hardening(uint64_t *options, long *mode)
{
	*options = http_tls_last_options;
	*mode = http_tls_last_mode;
}

/*
 * SSL_CTX_* may only be called on libcurl's SSL_CTX when libcurl's TLS backend is
 * OpenSSL, and the same major version as ours (the same libssl in the process).
 */
static bool
tls_backend_is_our_openssl(void)
{
	if (http_tls_openssl < 0)
	{
		const curl_version_info_data *vi = curl_version_info(CURLVERSION_NOW);

		http_tls_openssl = vi != NULL && vi->ssl_version != NULL &&
			strncmp(vi->ssl_version, "OpenSSL/", 8) == 0 &&
			strtoul(vi->ssl_version + 8, NULL, 10) == (OpenSSL_version_num() >> 28);
	}
	return http_tls_openssl == 1;
}

/* Called by libcurl for each new TLS connection, before its SSL object is made. */
static CURLcode
tls_ctx_cb(CURL *curl, void *sslctx, void *arg)
{
	SSL_CTX    *ctx = sslctx;

#ifdef SSL_OP_CLEANSE_PLAINTEXT
	SSL_CTX_set_options(ctx, SSL_OP_CLEANSE_PLAINTEXT);
#endif
	SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
	http_tls_last_options = SSL_CTX_get_options(ctx);
	http_tls_last_mode = SSL_CTX_get_mode(ctx);
	return CURLE_OK;
}

static void
set_error(char *errbuf, size_t errlen, const char *what, const char *detail)
{
	if (errbuf == NULL || errlen == 0)
		return;
	if (detail && detail[0])
		snprintf(errbuf, errlen, "%s: %s", what, detail);
	else
		snprintf(errbuf, errlen, "%s", what);
}

static void
transfer_discard(HttpTransfer *t)
{
	util_wipe_free(t->buf, t->cap);
	t->buf = NULL;
	t->len = t->cap = 0;
}

/*
 * Append received bytes.  Grows by allocate-copy-wipe rather than realloc so no
 * partial copy of a key is left behind in freed memory; stops the transfer (returns a
 * short count) as soon as the body would exceed max_response.
 */
static size_t
write_cb(char *data, size_t size, size_t nmemb, void *arg)
{
	HttpTransfer *t = arg;
	size_t		n = size * nmemb;
	size_t		need;

	if (n == 0)
		return 0;
	if (t->len + n > t->max || t->len + n < t->len)
	{
		t->too_large = true;
		transfer_discard(t);
		return 0;
	}
	need = t->len + n + 1;
	if (need > t->cap)
	{
		size_t		newcap = t->cap ? t->cap * 2 : 4096;
		char	   *p;

		if (newcap < need)
			newcap = need;
		if (newcap > t->max + 1)
			newcap = t->max + 1;
		p = malloc(newcap);
		if (p == NULL)
		{
			t->oom = true;
			transfer_discard(t);
			return 0;
		}
		if (t->buf)
			memcpy(p, t->buf, t->len);
		util_wipe_free(t->buf, t->cap);
		t->buf = p;
		t->cap = newcap;
	}
	memcpy(t->buf + t->len, data, n);
	t->len += n;
	t->buf[t->len] = '\0';
	return n;
}

static int
xferinfo_cb(void *arg, curl_off_t dltotal, curl_off_t dlnow, curl_off_t ultotal,
			curl_off_t ulnow)
{
	HttpTransfer *t = arg;

	if (t->canceled)
		return 1;
	if (t->interrupted && t->interrupted())
	{
		t->canceled = true;
		return 1;
	}
	return 0;
}

/* Free a header list, wiping each line first: one is the Authorization header. */
static void
free_header_list(struct curl_slist *list)
{
	for (struct curl_slist *p = list; p; p = p->next)
		if (p->data)
			OPENSSL_cleanse(p->data, strlen(p->data));
	curl_slist_free_all(list);
}

/* Lazily create the per-process handles; abandon ones inherited across fork. */
static bool
ensure_handles(void)
{
	pid_t		me = getpid();

	if ((http_easy || http_multi) && http_owner_pid != me)
	{
		http_easy = NULL;
		http_multi = NULL;
	}
	if (http_easy && http_multi)
		return true;
	if (http_global_init() != 0)
		return false;
	if (http_easy == NULL)
	{
		http_easy = curl_easy_init();
		if (http_easy)
			http_easy_created++;
	}
	if (http_multi == NULL)
		http_multi = curl_multi_init();
	if (http_easy == NULL || http_multi == NULL)
	{
		if (http_easy)
			curl_easy_cleanup(http_easy);
		if (http_multi)
			curl_multi_cleanup(http_multi);
		http_easy = NULL;
		http_multi = NULL;
		return false;
	}
	http_owner_pid = me;
	return true;
}

static HttpStatus
map_curl_error(CURLcode code)
{
	switch (code)
	{
		case CURLE_OK:
			return HTTP_OK;
		case CURLE_OPERATION_TIMEDOUT:
			return HTTP_ERR_TIMEOUT;
		case CURLE_ABORTED_BY_CALLBACK:
			return HTTP_ERR_CANCELED;
		case CURLE_FILESIZE_EXCEEDED:
			return HTTP_ERR_TOO_LARGE;
		case CURLE_COULDNT_RESOLVE_HOST:
		case CURLE_COULDNT_RESOLVE_PROXY:
		case CURLE_COULDNT_CONNECT:
		case CURLE_URL_MALFORMAT:
			return HTTP_ERR_CONNECT;
		case CURLE_SSL_CONNECT_ERROR:
		case CURLE_PEER_FAILED_VERIFICATION:
		case CURLE_SSL_CERTPROBLEM:
		case CURLE_SSL_CIPHER:
		case CURLE_SSL_CACERT_BADFILE:
		case CURLE_SSL_ENGINE_NOTFOUND:
		case CURLE_SSL_ENGINE_SETFAILED:
		case CURLE_SSL_ENGINE_INITFAILED:
		case CURLE_SSL_SHUTDOWN_FAILED:
		case CURLE_SSL_CRL_BADFILE:
		case CURLE_SSL_ISSUER_ERROR:
		case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
		case CURLE_SSL_INVALIDCERTSTATUS:
		case CURLE_USE_SSL_FAILED:
			return HTTP_ERR_TLS;
		case CURLE_OUT_OF_MEMORY:
		case CURLE_FAILED_INIT:
		case CURLE_BAD_FUNCTION_ARGUMENT:
		case CURLE_UNKNOWN_OPTION:
		case CURLE_NOT_BUILT_IN:
			return HTTP_ERR_INTERNAL;
		default:
			return HTTP_ERR_NETWORK;
	}
}

static const char *
status_text(HttpStatus st)
{
	switch (st)
	{
		case HTTP_OK:
			return "ok";
		case HTTP_ERR_CONNECT:
			return "could not connect";
		case HTTP_ERR_TIMEOUT:
			return "request timed out";
		case HTTP_ERR_CANCELED:
			return "request canceled";
		case HTTP_ERR_TOO_LARGE:
			return "response too large";
		case HTTP_ERR_TLS:
			return "TLS failure";
		case HTTP_ERR_NETWORK:
			return "network error";
		case HTTP_ERR_INTERNAL:
			return "internal error";
	}
	return "unknown error";
}

/* A header line must be "Name: value" on one line: no CR/LF smuggling. */
static bool
valid_header_line(const char *h)
{
	const char *colon;

	if (h == NULL || h[0] == ':' || strpbrk(h, "\r\n") != NULL)
		return false;
	colon = strchr(h, ':');
	return colon != NULL;
}

/* Check what the caller asked for; HTTP_OK or the status to return (errbuf set). */
static HttpStatus
check_request(const HttpRequest *req, HttpResponse *resp, char *errbuf, size_t errlen)
{
	if (req == NULL || resp == NULL || req->url == NULL || req->method == NULL ||
		req->nheaders < 0 || (req->nheaders > 0 && req->headers == NULL) ||
		(req->body == NULL && req->body_len > 0))
	{
		set_error(errbuf, errlen, "http: invalid request", NULL);
		return HTTP_ERR_INTERNAL;
	}
	if (strcmp(req->method, "GET") != 0 && strcmp(req->method, "PUT") != 0 &&
		strcmp(req->method, "POST") != 0)
	{
		set_error(errbuf, errlen, "http: unsupported method", NULL);
		return HTTP_ERR_INTERNAL;
	}

	/*
	 * Checked here because libcurl reports a bad scheme and an HTTP/0.9 answer with
	 * the same code, and only the first is the caller's configuration.
	 */
	if (strncasecmp(req->url, "http://", 7) != 0 && strncasecmp(req->url, "https://", 8) != 0)
	{
		set_error(errbuf, errlen, "could not connect: URL scheme must be http or https", NULL);
		return HTTP_ERR_CONNECT;
	}
	for (int i = 0; i < req->nheaders; i++)
	{
		if (!valid_header_line(req->headers[i]))
		{
			set_error(errbuf, errlen, "http: malformed request header", NULL);
			return HTTP_ERR_INTERNAL;
		}
	}
	return HTTP_OK;
}

/*
 * The request's header lines, plus "Expect:", which stops curl waiting for
 * 100-continue on POST.  NULL when out of memory.  Free with free_header_list.
 */
static struct curl_slist *
build_header_list(const HttpRequest *req)
{
	struct curl_slist *headers = NULL;

	for (int i = 0; i <= req->nheaders; i++)
	{
		struct curl_slist *next;

		next = curl_slist_append(headers, i < req->nheaders ? req->headers[i] : "Expect:");
		if (next == NULL)
		{
			free_header_list(headers);
			return NULL;
		}
		headers = next;
	}
	return headers;
}

#define SETOPT(opt, val) \
	do { \
		if (rc == CURLE_OK) \
			rc = curl_easy_setopt(easy, (opt), (val)); \
	} while (0)

/*
 * Every option of the easy handle from scratch, so nothing of the previous request
 * carries over: the policy of the file header, the timeouts, the body and where the
 * answer goes.
 */
static CURLcode
set_request_options(CURL *easy, const HttpRequest *req, struct curl_slist *headers,
					HttpTransfer *t, char *curl_err)
{
	CURLcode	rc = CURLE_OK;
	long		timeout_ms = req->timeout_ms > 0 ? req->timeout_ms : HTTP_DEFAULT_TIMEOUT_MS;
	long		connect_ms = timeout_ms < HTTP_MAX_CONNECT_TIMEOUT_MS ? timeout_ms :
		HTTP_MAX_CONNECT_TIMEOUT_MS;

	curl_easy_reset(easy);
	curl_err[0] = '\0';
	SETOPT(CURLOPT_ERRORBUFFER, curl_err);
	SETOPT(CURLOPT_URL, req->url);
	SETOPT(CURLOPT_PROTOCOLS_STR, "http,https");
	SETOPT(CURLOPT_NOSIGNAL, 1L);
	SETOPT(CURLOPT_SSL_VERIFYPEER, 1L);
	SETOPT(CURLOPT_SSL_VERIFYHOST, 2L);
	if (tls_backend_is_our_openssl())
		SETOPT(CURLOPT_SSL_CTX_FUNCTION, tls_ctx_cb);
	SETOPT(CURLOPT_FOLLOWLOCATION, 0L);
	SETOPT(CURLOPT_PROXY, "");
	SETOPT(CURLOPT_TIMEOUT_MS, timeout_ms);
	SETOPT(CURLOPT_CONNECTTIMEOUT_MS, connect_ms);
	/* A server trickling less than a byte a second is as good as silent. */
	SETOPT(CURLOPT_LOW_SPEED_LIMIT, 1L);
	SETOPT(CURLOPT_LOW_SPEED_TIME, (connect_ms + 999) / 1000);
	SETOPT(CURLOPT_USERAGENT, "pg_envelope");
	SETOPT(CURLOPT_HTTPHEADER, headers);
	SETOPT(CURLOPT_WRITEFUNCTION, write_cb);
	SETOPT(CURLOPT_WRITEDATA, t);
	SETOPT(CURLOPT_NOPROGRESS, 0L);
	SETOPT(CURLOPT_XFERINFOFUNCTION, xferinfo_cb);
	SETOPT(CURLOPT_XFERINFODATA, t);
	/* Lets curl refuse a too-large body from its Content-Length before reading it. */
	SETOPT(CURLOPT_MAXFILESIZE_LARGE, (curl_off_t) req->max_response);
	if (strcmp(req->method, "GET") == 0)
		SETOPT(CURLOPT_HTTPGET, 1L);
	else
	{
		/* POST and PUT both send the body from memory, without copying it. */
		SETOPT(CURLOPT_POST, 1L);
		SETOPT(CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t) req->body_len);
		SETOPT(CURLOPT_POSTFIELDS, req->body ? req->body : "");
		if (strcmp(req->method, "PUT") == 0)
			SETOPT(CURLOPT_CUSTOMREQUEST, "PUT");
	}
	return rc;
}

#undef SETOPT

/*
 * Drive the transfer (already added to the multi handle) in our own loop, polling the
 * caller's interrupt callback every HTTP_POLL_MS, until it finishes or is canceled
 * (t->canceled).  Returns curl's result for the transfer.
 */
static CURLcode
run_transfer(HttpTransfer *t)
{
	CURLcode	result = CURLE_OK;
	bool		finished = false;
	int			running = 0;

	for (;;)
	{
		CURLMsg    *msg;
		int			left;

		if (curl_multi_perform(http_multi, &running) != CURLM_OK)
			return CURLE_FAILED_INIT;
		while ((msg = curl_multi_info_read(http_multi, &left)) != NULL)
		{
			if (msg->msg == CURLMSG_DONE && msg->easy_handle == http_easy)
			{
				result = msg->data.result;
				finished = true;
			}
		}
		if (finished || running == 0)
			break;
		if (t->canceled || (t->interrupted && t->interrupted()))
		{
			t->canceled = true;
			return CURLE_OK;
		}
		if (curl_multi_poll(http_multi, NULL, 0, HTTP_POLL_MS, NULL) != CURLM_OK)
			return CURLE_FAILED_INIT;
	}
	if (!finished && result == CURLE_OK)
		result = CURLE_GOT_NOTHING;
	return result;
}

/* What the request came to: our own verdicts first, then curl's. */
static HttpStatus
transfer_status(const HttpTransfer *t, CURLcode result)
{
	if (t->canceled)
		return HTTP_ERR_CANCELED;
	if (t->too_large)
		return HTTP_ERR_TOO_LARGE;
	if (t->oom)
		return HTTP_ERR_INTERNAL;
	return map_curl_error(result);
}

/*
 * Drop every pointer into the caller's stack frame and the header list.  After a
 * secret went through, destroy the handle instead: that frees, and so wipes, the
 * buffers a reset keeps (the receive buffer holds the answer).  Its connection stays
 * in the multi handle's cache for the next handle to reuse.
 */
static void
release_easy_handle(bool sensitive)
{
	if (sensitive)
	{
		curl_easy_cleanup(http_easy);
		http_easy = NULL;
	}
	else
		curl_easy_reset(http_easy);
}

/*
 * A failed transfer: discard what was received, and say why.  curl's own message
 * names the host and the failing step, never a header or the body; our own statuses
 * need no detail.
 */
static void
fail_transfer(HttpTransfer *t, HttpStatus st, CURLcode result, const char *curl_err,
			  char *errbuf, size_t errlen)
{
	transfer_discard(t);
	if (st == HTTP_ERR_CANCELED || st == HTTP_ERR_TOO_LARGE || t->oom)
		set_error(errbuf, errlen, status_text(st), NULL);
	else
		set_error(errbuf, errlen, status_text(st),
				  curl_err[0] ? curl_err : curl_easy_strerror(result));
}

/* Hand the received body to resp, always NUL-terminated, even an empty one. */
static HttpStatus
hand_over_body(HttpTransfer *t, long code, HttpResponse *resp, char *errbuf, size_t errlen)
{
	if (t->buf == NULL)
	{
		t->buf = malloc(1);
		if (t->buf == NULL)
		{
			set_error(errbuf, errlen, "http: out of memory", NULL);
			return HTTP_ERR_INTERNAL;
		}
		t->buf[0] = '\0';
		t->cap = 1;
	}
	resp->status = code;
	resp->body = t->buf;
	resp->body_len = t->len;
	return HTTP_OK;
}

HttpStatus
http_perform(const HttpRequest *req, HttpResponse *resp, char *errbuf, size_t errlen)
{
	HttpTransfer t;
	struct curl_slist *headers;
	char		curl_err[CURL_ERROR_SIZE];
	CURLcode	result;
	HttpStatus	st;
	bool		added = false;
	long		code = 0;

	if (errbuf && errlen > 0)
		errbuf[0] = '\0';
	if (resp)
		memset(resp, 0, sizeof(*resp));
	st = check_request(req, resp, errbuf, errlen);
	if (st != HTTP_OK)
		return st;

	memset(&t, 0, sizeof(t));
	t.max = req->max_response;
	t.interrupted = req->interrupted;
	if (t.interrupted && t.interrupted())
	{
		set_error(errbuf, errlen, "http: request canceled", NULL);
		return HTTP_ERR_CANCELED;
	}
	if (!ensure_handles())
	{
		set_error(errbuf, errlen, "http: could not initialize libcurl", NULL);
		return HTTP_ERR_INTERNAL;
	}
	headers = build_header_list(req);
	if (headers == NULL)
	{
		set_error(errbuf, errlen, "http: out of memory", NULL);
		return HTTP_ERR_INTERNAL;
	}

	result = set_request_options(http_easy, req, headers, &t, curl_err);
	if (result == CURLE_OK)
	{
		added = curl_multi_add_handle(http_multi, http_easy) == CURLM_OK;
		result = added ? run_transfer(&t) : CURLE_FAILED_INIT;
	}
	if (result == CURLE_OK && !t.canceled)
		curl_easy_getinfo(http_easy, CURLINFO_RESPONSE_CODE, &code);

	/* Removing an unfinished transfer closes its connection: no fd is left behind. */
	if (added)
		curl_multi_remove_handle(http_multi, http_easy);
	st = transfer_status(&t, result);
	release_easy_handle(req->sensitive);
	free_header_list(headers);

	if (st != HTTP_OK)
	{
		fail_transfer(&t, st, result, curl_err, errbuf, errlen);
		return st;
	}
	return hand_over_body(&t, code, resp, errbuf, errlen);
}

/*
 * One transfer of http_perform_many: its own easy handle (made for it and destroyed
 * after it, so libcurl's copies of a signature or an answer go through the wiping
 * free), over the process's multi handle and its connection cache.
 */
typedef struct HttpSlot
{
	CURL	   *easy;			/* NULL: the slot is free */
	int			index;			/* of the request it carries */
	HttpTransfer t;
	struct curl_slist *headers;
	char		curl_err[CURL_ERROR_SIZE];
} HttpSlot;

/* Put request `i` on the wire in a free slot; false with statuses[i] set if it cannot be. */
static bool
start_slot(HttpSlot *slot, const HttpRequest *req, int i, HttpResponse *resp,
		   HttpStatus *status, char *errbuf, size_t errlen)
{
	HttpStatus	st = check_request(req, resp, errbuf, errlen);
	CURLcode	rc;

	if (st != HTTP_OK)
	{
		*status = st;
		return false;
	}
	memset(&slot->t, 0, sizeof(slot->t));
	slot->t.max = req->max_response;
	slot->t.interrupted = req->interrupted;
	slot->index = i;
	slot->headers = build_header_list(req);
	slot->easy = slot->headers ? curl_easy_init() : NULL;
	if (slot->easy == NULL)
	{
		free_header_list(slot->headers);
		slot->headers = NULL;
		set_error(errbuf, errlen, "http: out of memory", NULL);
		*status = HTTP_ERR_INTERNAL;
		return false;
	}
	http_easy_created++;
	rc = set_request_options(slot->easy, req, slot->headers, &slot->t, slot->curl_err);
	if (rc != CURLE_OK || curl_multi_add_handle(http_multi, slot->easy) != CURLM_OK)
	{
		curl_easy_cleanup(slot->easy);
		slot->easy = NULL;
		free_header_list(slot->headers);
		slot->headers = NULL;
		set_error(errbuf, errlen, "http: could not start the request", NULL);
		*status = HTTP_ERR_INTERNAL;
		return false;
	}
	return true;
}

/*
 * The transfer in `slot` is over (finished, or abandoned when `abandon`): hand its
 * answer or its error over, and free the slot.  Removing an unfinished transfer
 * closes its connection: no fd is left behind.
 */
static void
finish_slot(HttpSlot *slot, CURLcode result, bool abandon, HttpResponse *resp,
			HttpStatus *status, char *errbuf, size_t errlen)
{
	long		code = 0;
	HttpStatus	st;

	if (abandon)
		slot->t.canceled = true;
	if (result == CURLE_OK && !slot->t.canceled)
		curl_easy_getinfo(slot->easy, CURLINFO_RESPONSE_CODE, &code);
	curl_multi_remove_handle(http_multi, slot->easy);
	st = transfer_status(&slot->t, result);
	curl_easy_cleanup(slot->easy);
	slot->easy = NULL;
	free_header_list(slot->headers);
	slot->headers = NULL;
	if (st != HTTP_OK)
		fail_transfer(&slot->t, st, result, slot->curl_err, errbuf, errlen);
	else
		st = hand_over_body(&slot->t, code, resp, errbuf, errlen);
	*status = st;
}

static bool
slots_interrupted(HttpSlot *slots, int nslots)
{
	for (int k = 0; k < nslots; k++)
		if (slots[k].easy != NULL && slots[k].t.interrupted && slots[k].t.interrupted())
			return true;
	return false;
}

void
http_perform_many(int n, int max_in_flight, HttpPrepare prepare, void *arg,
				  HttpResponse *resps, HttpStatus *statuses, char *errbufs, size_t errlen)
{
	HttpSlot   *slots;
	int			nslots = max_in_flight < 1 ? 1 : max_in_flight > n ? n : max_in_flight;
	int			next = 0;
	int			active = 0;
	bool		canceled = false;

#define ERRBUF(i) (errbufs ? errbufs + (size_t) (i) * errlen : NULL)
	for (int i = 0; i < n; i++)
	{
		memset(&resps[i], 0, sizeof(resps[i]));
		statuses[i] = HTTP_ERR_CANCELED;
		if (errbufs && errlen > 0)
			ERRBUF(i)[0] = '\0';
	}
	if (n <= 0)
		return;
	slots = calloc(nslots, sizeof(HttpSlot));
	if (slots == NULL || !ensure_handles())
	{
		for (int i = 0; i < n; i++)
		{
			statuses[i] = HTTP_ERR_INTERNAL;
			set_error(ERRBUF(i), errlen, "http: could not initialize libcurl", NULL);
		}
		free(slots);
		return;
	}

	for (;;)
	{
		int			running = 0;
		CURLMsg    *msg;
		int			left;
		int			free_slot = -1;

		/*
		 * Start at most one request per turn, and drive it onto the wire at once:
		 * preparing one may wait (for a rate limit), and a request started but not
		 * yet driven would go out in a burst with the next ones.
		 */
		for (int k = 0; k < nslots && free_slot < 0; k++)
			if (slots[k].easy == NULL)
				free_slot = k;
		while (free_slot >= 0 && next < n && !canceled)
		{
			int			i = next++;
			HttpRequest req;
			HttpStatus	ps;

			memset(&req, 0, sizeof(req));
			ps = prepare(arg, i, &req);
			if (ps == HTTP_ERR_CANCELED ||
				(ps == HTTP_OK && req.interrupted && req.interrupted()))
			{
				canceled = true;
				next--;
				break;
			}
			if (ps != HTTP_OK)
			{
				statuses[i] = ps;	/* skipped: the caller knows why */
				continue;
			}
			if (start_slot(&slots[free_slot], &req, i, &resps[i], &statuses[i],
						   ERRBUF(i), errlen))
			{
				active++;
				break;
			}
		}
		if (active == 0 && (next >= n || canceled))
			break;
		if (canceled)
			break;

		if (curl_multi_perform(http_multi, &running) != CURLM_OK)
			break;
		while ((msg = curl_multi_info_read(http_multi, &left)) != NULL)
		{
			if (msg->msg != CURLMSG_DONE)
				continue;
			for (int k = 0; k < nslots; k++)
			{
				if (slots[k].easy != msg->easy_handle)
					continue;
				finish_slot(&slots[k], msg->data.result, false, &resps[slots[k].index],
							&statuses[slots[k].index], ERRBUF(slots[k].index), errlen);
				active--;
				break;
			}
		}
		if (slots_interrupted(slots, nslots))
		{
			canceled = true;
			break;
		}
		/* no wait while there is a free slot and a request to put in it */
		if (active > 0 &&
			curl_multi_poll(http_multi, NULL, 0,
							active < nslots && next < n ? 0 : HTTP_POLL_MS, NULL) != CURLM_OK)
			break;
	}

	/*
	 * Whatever is still on the wire was canceled (or libcurl failed us): abandon it;
	 * requests never started keep HTTP_ERR_CANCELED.
	 */
	for (int k = 0; k < nslots; k++)
		if (slots[k].easy != NULL)
			finish_slot(&slots[k], canceled ? CURLE_ABORTED_BY_CALLBACK : CURLE_FAILED_INIT,
						canceled, &resps[slots[k].index], &statuses[slots[k].index],
						ERRBUF(slots[k].index), errlen);
	for (int i = next; i < n; i++)
		set_error(ERRBUF(i), errlen, status_text(HTTP_ERR_CANCELED), NULL);
	free(slots);
#undef ERRBUF
}

void
http_response_free(HttpResponse *resp)
{
	if (resp == NULL)
		return;
	if (resp->body)
	{
		/* The allocation may be larger than body_len; the tail was never written. */
		OPENSSL_cleanse(resp->body, resp->body_len + 1);
		free(resp->body);
	}
	resp->body = NULL;
	resp->body_len = 0;
	resp->status = 0;
}
