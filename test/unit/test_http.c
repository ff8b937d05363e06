/*
 * test_http.c — http.c against a local stub server (test/kms/http_test_server.py).
 *
 * The test starts the stub itself (python3, port 0, on 127.0.0.1) and stops it at the
 * end.  It checks status and body, the response cap, that redirects are not followed,
 * timeouts, that an interrupt callback stops a hung request well under a second, error
 * mapping, that no header or body reaches an error message, that proxies from the
 * environment are ignored, keep-alive, and that no file descriptor leaks.  A missing
 * stub is a failure, never a skip.
 *
 * Secrets in libcurl's and OpenSSL's memory: every block libcurl frees (or moves on
 * realloc) is wiped whole; a sensitive request's answer leaves libcurl's memory, wiped,
 * before http_perform returns, and its connection is still reused; every TLS context
 * gets SSL_OP_CLEANSE_PLAINTEXT and SSL_MODE_RELEASE_BUFFERS; CURLOPT_NOSIGNAL stays
 * set (libcurl would otherwise ignore SIGPIPE while it works, which the interrupt
 * callback, called from inside libcurl, can see).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE			/* the Makefile defines it too */
#endif
#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <stdbool.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <netinet/in.h>
#include <time.h>
#include <unistd.h>

#include <curl/curl.h>
#include <openssl/ssl.h>

#include "http.h"
#include "unit.h"

#define STUB_SCRIPT "test/kms/http_test_server.py"

/* What /secret answers with; it appears in no request. */
#define SECRET_MARKER "answer-only-secret-4f1c9a7e"

#define MAX_STUBS 2

static pid_t stub_pids[MAX_STUBS];
static int	nstubs = 0;
static int	stub_port = 0;		/* the plain-HTTP stub every test talks to */
static char tls_dir[64] = "";

static void
stop_stubs(void)
{
	for (int s = 0; s < nstubs; s++)
	{
		int			status;
		pid_t		pid = stub_pids[s];

		if (pid <= 0)
			continue;
		kill(pid, SIGTERM);
		for (int i = 0; i < 50; i++)
		{
			if (waitpid(pid, &status, WNOHANG) == pid)
			{
				pid = 0;
				break;
			}
			usleep(100 * 1000);
		}
		if (pid > 0)
		{
			kill(pid, SIGKILL);
			waitpid(pid, &status, 0);
		}
		stub_pids[s] = 0;
	}
	nstubs = 0;
}

/*
 * Start a stub (extra arguments appended) and read its port from the first line of
 * its stdout.  Returns the port, or 0.
 */
static int
start_stub(const char *cert, const char *key)
{
	int			fds[2];
	FILE	   *f;
	char		line[64];
	pid_t		pid;

	if (nstubs >= MAX_STUBS || access(STUB_SCRIPT, R_OK) != 0 || pipe(fds) != 0)
		return 0;
	pid = fork();
	if (pid < 0)
		return 0;
	if (pid == 0)
	{
		dup2(fds[1], STDOUT_FILENO);
		close(fds[0]);
		close(fds[1]);
		if (cert)
			execlp("python3", "python3", STUB_SCRIPT, "--port", "0", "--lifetime", "120",
				   "--tls-cert", cert, "--tls-key", key, (char *) NULL);
		else
			execlp("python3", "python3", STUB_SCRIPT, "--port", "0", "--lifetime", "120",
				   (char *) NULL);
		_exit(127);
	}
	close(fds[1]);
	if (nstubs == 0)
		atexit(stop_stubs);
	stub_pids[nstubs++] = pid;
	f = fdopen(fds[0], "r");
	if (f == NULL || fgets(line, sizeof(line), f) == NULL)
	{
		if (f)
			fclose(f);
		return 0;
	}
	fclose(f);
	return atoi(line);
}

static double
now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000.0 + ts.tv_nsec / 1e6;
}

static double cancel_start;
static int	cancel_calls;

static bool
cancel_after_300ms(void)
{
	cancel_calls++;
	return now_ms() - cancel_start >= 300;
}

static bool
always_interrupted(void)
{
	return true;
}

static int
count_fds(void)
{
	DIR		   *d = opendir("/proc/self/fd");
	struct dirent *e;
	int			n = 0;

	if (d == NULL)
		return -1;
	while ((e = readdir(d)) != NULL)
		if (e->d_name[0] != '.')
			n++;
	closedir(d);
	return n;
}

static HttpStatus
do_request(const char *method, const char *path, const char *const *headers,
		   int nheaders, const char *body, int timeout_ms, size_t max_response,
		   bool (*interrupted) (void), HttpResponse *resp, char *err, size_t errlen)
{
	char		url[256];
	HttpRequest req;

	snprintf(url, sizeof(url), "http://127.0.0.1:%d%s", stub_port, path);
	memset(&req, 0, sizeof(req));
	req.method = method;
	req.url = url;
	req.headers = headers;
	req.nheaders = nheaders;
	req.body = body;
	req.body_len = body ? strlen(body) : 0;
	req.timeout_ms = timeout_ms;
	req.max_response = max_response;
	req.interrupted = interrupted;
	return http_perform(&req, resp, err, errlen);
}

/* Number of TCP connections the stub has accepted so far. */
static int
stub_connections(void)
{
	HttpResponse resp;
	char		err[256];
	int			n = -1;

	if (do_request("GET", "/_connections", NULL, 0, NULL, 2000, 1024, NULL, &resp,
				   err, sizeof(err)) == HTTP_OK && resp.status == 200)
	{
		const char *p = strstr(resp.body, "\"connections\":");

		if (p)
			n = atoi(p + strlen("\"connections\":"));
	}
	http_response_free(&resp);
	return n;
}

static void
test_basic(void)
{
	HttpResponse resp;
	char		err[256];
	const char *hdrs[] = {"Content-Type: application/x-amz-json-1.1",
	"X-Amz-Target: TrentService.Decrypt"};
	HttpStatus st;

	st = do_request("GET", "/ok", NULL, 0, NULL, 2000, 1024, NULL, &resp, err, sizeof(err));
	CHECK(st == HTTP_OK, "GET /ok: %d %s", st, err);
	CHECK(resp.status == 200, "GET /ok status %ld", resp.status);
	CHECK(resp.body && resp.body_len == 5 && strcmp(resp.body, "hello") == 0,
		  "GET /ok body");
	http_response_free(&resp);
	CHECK(resp.body == NULL && resp.body_len == 0, "response freed");

	st = do_request("POST", "/echo", hdrs, 2, "{\"k\":1}", 2000, 65536, NULL, &resp,
					err, sizeof(err));
	CHECK(st == HTTP_OK && resp.status == 200, "POST /echo: %d %s", st, err);
	CHECK(resp.body && strstr(resp.body, "\"method\": \"POST\""), "POST method sent");
	CHECK(resp.body && strstr(resp.body, "\"x-amz-target\": \"TrentService.Decrypt\""),
		  "header sent");
	CHECK(resp.body && strstr(resp.body, "\"content-type\": \"application/x-amz-json-1.1\""),
		  "content type sent");
	CHECK(resp.body && strstr(resp.body, "\"body\": \"{\\\"k\\\":1}\""), "body sent: %s",
		  resp.body ? resp.body : "");
	CHECK(resp.body && strstr(resp.body, "\"expect\"") == NULL, "no Expect header");
	http_response_free(&resp);

	st = do_request("PUT", "/echo", hdrs, 1, NULL, 2000, 65536, NULL, &resp, err, sizeof(err));
	CHECK(st == HTTP_OK && resp.body && strstr(resp.body, "\"method\": \"PUT\"") &&
		  strstr(resp.body, "\"content-length\": \"0\""), "PUT with empty body");
	http_response_free(&resp);

	st = do_request("GET", "/echo", NULL, 0, NULL, 2000, 65536, NULL, &resp, err, sizeof(err));
	CHECK(st == HTTP_OK && resp.body && strstr(resp.body, "\"method\": \"GET\""),
		  "GET after PUT is a GET again (options reset)");
	http_response_free(&resp);

	/* An HTTP error status is a successful transfer: the caller interprets it. */
	st = do_request("POST", "/status/503", NULL, 0, "", 2000, 1024, NULL, &resp, err,
					sizeof(err));
	CHECK(st == HTTP_OK && resp.status == 503 && strcmp(resp.body, "status body") == 0,
		  "503 returned as is");
	http_response_free(&resp);

	st = do_request("GET", "/status/204", NULL, 0, NULL, 2000, 1024, NULL, &resp, err,
					sizeof(err));
	CHECK(st == HTTP_OK && resp.status == 204 && resp.body && resp.body[0] == '\0' &&
		  resp.body_len == 0, "empty body is \"\" not NULL");
	http_response_free(&resp);

	/* Never follow a redirect. */
	st = do_request("GET", "/redirect", NULL, 0, NULL, 2000, 1024, NULL, &resp, err,
					sizeof(err));
	CHECK(st == HTTP_OK && resp.status == 302 && resp.body_len == 0,
		  "redirect not followed: %d %ld %s", st, resp.status, err);
	http_response_free(&resp);
}

static void
test_cap(void)
{
	HttpResponse resp;
	char		err[256];
	HttpStatus	st;

	st = do_request("GET", "/bytes/5000", NULL, 0, NULL, 2000, 5000, NULL, &resp, err,
					sizeof(err));
	CHECK(st == HTTP_OK && resp.body_len == 5000 && resp.body[5000] == '\0',
		  "body exactly at cap accepted: %d %s", st, err);
	http_response_free(&resp);

	st = do_request("GET", "/bytes/5001", NULL, 0, NULL, 2000, 5000, NULL, &resp, err,
					sizeof(err));
	CHECK(st == HTTP_ERR_TOO_LARGE && resp.body == NULL, "one byte over cap: %d %s", st, err);

	st = do_request("GET", "/huge", NULL, 0, NULL, 5000, 65536, NULL, &resp, err,
					sizeof(err));
	CHECK(st == HTTP_ERR_TOO_LARGE && resp.body == NULL, "huge with length: %d %s", st, err);

	st = do_request("GET", "/huge-stream", NULL, 0, NULL, 5000, 65536, NULL, &resp, err,
					sizeof(err));
	CHECK(st == HTTP_ERR_TOO_LARGE && resp.body == NULL, "huge stream: %d %s", st, err);

	/* And the handle still works afterwards. */
	st = do_request("GET", "/ok", NULL, 0, NULL, 2000, 1024, NULL, &resp, err, sizeof(err));
	CHECK(st == HTTP_OK && resp.status == 200, "ok after too large: %d %s", st, err);
	http_response_free(&resp);
}

static void
test_timeouts_and_cancel(void)
{
	HttpResponse resp;
	char		err[256];
	HttpStatus	st;
	double		t0;
	double		elapsed;

	t0 = now_ms();
	st = do_request("GET", "/hang", NULL, 0, NULL, 500, 1024, NULL, &resp, err, sizeof(err));
	elapsed = now_ms() - t0;
	CHECK(st == HTTP_ERR_TIMEOUT, "hang with 500 ms timeout: %d %s", st, err);
	CHECK(elapsed >= 450 && elapsed < 1500, "timeout took %.0f ms", elapsed);

	/* A hung server, a long timeout, and a cancel after 300 ms. */
	cancel_calls = 0;
	cancel_start = t0 = now_ms();
	st = do_request("POST", "/hang", NULL, 0, "{}", 30000, 1024, cancel_after_300ms, &resp,
					err, sizeof(err));
	elapsed = now_ms() - t0;
	CHECK(st == HTTP_ERR_CANCELED, "cancel: %d %s", st, err);
	CHECK(elapsed >= 300 && elapsed < 1000, "cancel took %.0f ms", elapsed);
	CHECK(elapsed < 600, "cancel latency %.0f ms exceeds 300 ms by more than 300 ms", elapsed);
	/* Polled while the server was silent, not just once. */
	CHECK(cancel_calls >= 3, "interrupt callback polled %d times while waiting", cancel_calls);
	printf("cancel: stopped after %.0f ms, callback polled %d times\n", elapsed, cancel_calls);

	/* Already interrupted: no request at all. */
	t0 = now_ms();
	st = do_request("GET", "/ok", NULL, 0, NULL, 2000, 1024, always_interrupted, &resp,
					err, sizeof(err));
	CHECK(st == HTTP_ERR_CANCELED && now_ms() - t0 < 100, "pre-canceled: %d", st);

	/* A cancel during a large transfer (through the progress callback). */
	cancel_calls = 0;
	cancel_start = now_ms() - 300;
	st = do_request("GET", "/huge", NULL, 0, NULL, 5000, 64 * 1024 * 1024, cancel_after_300ms,
					&resp, err, sizeof(err));
	CHECK(st == HTTP_ERR_CANCELED && resp.body == NULL, "cancel during body: %d", st);
}

static void
test_errors(void)
{
	HttpResponse resp;
	char		err[256];
	char		url[128];
	HttpStatus	st;
	HttpRequest req;
	const char *secret_hdrs[] = {"Authorization: AWS4-HMAC-SHA256 topsecret-signature",
	"X-Amz-Security-Token: topsecret-token"};
	const char *bad_hdrs[] = {"X-Evil: a\r\nHost: elsewhere"};
	int			s;
	struct sockaddr_in sa;
	socklen_t	salen = sizeof(sa);
	int			closed_port;

	st = do_request("POST", "/reset", secret_hdrs, 2, "{\"Plaintext\":\"topsecret-body\"}",
					2000, 1024, NULL, &resp, err, sizeof(err));
	CHECK(st == HTTP_ERR_NETWORK, "reset: %d %s", st, err);
	CHECK(err[0] != '\0', "reset has a message");
	CHECK(strstr(err, "topsecret") == NULL, "no header or body in error: %s", err);
	printf("reset error text: %s\n", err);

	st = do_request("POST", "/hang", secret_hdrs, 2, "{\"Plaintext\":\"topsecret-body\"}",
					300, 1024, NULL, &resp, err, sizeof(err));
	CHECK(st == HTTP_ERR_TIMEOUT && strstr(err, "topsecret") == NULL,
		  "no secret in timeout error: %s", err);

	/* A port nobody listens on. */
	s = socket(AF_INET, SOCK_STREAM, 0);
	memset(&sa, 0, sizeof(sa));
	sa.sin_family = AF_INET;
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	bind(s, (struct sockaddr *) &sa, sizeof(sa));
	getsockname(s, (struct sockaddr *) &sa, &salen);
	closed_port = ntohs(sa.sin_port);
	close(s);

	memset(&req, 0, sizeof(req));
	snprintf(url, sizeof(url), "http://127.0.0.1:%d/ok", closed_port);
	req.method = "GET";
	req.url = url;
	req.timeout_ms = 2000;
	req.max_response = 1024;
	st = http_perform(&req, &resp, err, sizeof(err));
	CHECK(st == HTTP_ERR_CONNECT, "connection refused: %d %s", st, err);

	/* TLS spoken to a plain-HTTP server fails as a TLS error. */
	snprintf(url, sizeof(url), "https://127.0.0.1:%d/ok", stub_port);
	st = http_perform(&req, &resp, err, sizeof(err));
	CHECK(st == HTTP_ERR_TLS, "https to plain http: %d %s", st, err);

	/* Only http and https. */
	req.url = "file:///etc/passwd";
	st = http_perform(&req, &resp, err, sizeof(err));
	CHECK(st == HTTP_ERR_CONNECT && resp.body == NULL, "file:// refused: %d %s", st, err);

	st = do_request("GET", "/ok", bad_hdrs, 1, NULL, 2000, 1024, NULL, &resp, err, sizeof(err));
	CHECK(st == HTTP_ERR_INTERNAL, "CR/LF in a header refused: %d", st);
	st = do_request("DELETE", "/ok", NULL, 0, NULL, 2000, 1024, NULL, &resp, err, sizeof(err));
	CHECK(st == HTTP_ERR_INTERNAL, "unsupported method refused: %d", st);

	/* An environment proxy (pointing nowhere) must be ignored. */
	snprintf(url, sizeof(url), "http://127.0.0.1:%d", closed_port);
	setenv("http_proxy", url, 1);
	setenv("HTTP_PROXY", url, 1);
	setenv("https_proxy", url, 1);
	setenv("ALL_PROXY", url, 1);
	setenv("all_proxy", url, 1);
	st = do_request("GET", "/ok", NULL, 0, NULL, 2000, 1024, NULL, &resp, err, sizeof(err));
	CHECK(st == HTTP_OK && resp.status == 200, "environment proxy ignored: %d %s", st, err);
	http_response_free(&resp);
	unsetenv("http_proxy");
	unsetenv("HTTP_PROXY");
	unsetenv("https_proxy");
	unsetenv("ALL_PROXY");
	unsetenv("all_proxy");
}

/* Keep-alive: many requests, one connection; and no descriptor leaks on any path. */
static void
test_reuse_and_leaks(void)
{
	HttpResponse resp;
	char		err[256];
	int			before;
	int			after;
	int			fds0;
	int			fds1;
	HttpStatus	st;

	st = do_request("GET", "/ok", NULL, 0, NULL, 2000, 1024, NULL, &resp, err, sizeof(err));
	http_response_free(&resp);
	before = stub_connections();
	for (int i = 0; i < 20; i++)
	{
		st = do_request("POST", "/echo", NULL, 0, "{}", 2000, 65536, NULL, &resp, err,
						sizeof(err));
		CHECK(st == HTTP_OK && resp.status == 200, "keep-alive request %d: %d", i, st);
		http_response_free(&resp);
	}
	after = stub_connections();
	CHECK(before > 0 && after == before, "20 requests used %d new connections", after - before);

	fds0 = count_fds();
	for (int i = 0; i < 10; i++)
	{
		do_request("GET", "/ok", NULL, 0, NULL, 2000, 1024, NULL, &resp, err, sizeof(err));
		http_response_free(&resp);
		do_request("GET", "/reset", NULL, 0, NULL, 2000, 1024, NULL, &resp, err, sizeof(err));
		do_request("GET", "/bytes/3000", NULL, 0, NULL, 2000, 100, NULL, &resp, err,
				   sizeof(err));
		do_request("GET", "/hang", NULL, 0, NULL, 150, 100, NULL, &resp, err, sizeof(err));
		do_request("GET", "/redirect", NULL, 0, NULL, 2000, 100, NULL, &resp, err, sizeof(err));
		http_response_free(&resp);
	}
	do_request("GET", "/ok", NULL, 0, NULL, 2000, 1024, NULL, &resp, err, sizeof(err));
	http_response_free(&resp);
	fds1 = count_fds();
	CHECK(fds0 > 0 && fds1 <= fds0, "file descriptors %d -> %d after 50 requests", fds0, fds1);
}

/* ------------------------------------------------------------------------ */
/* What libcurl frees                                                        */
/* ------------------------------------------------------------------------ */

static const char *free_marker;		/* looked for in blocks before they are wiped */
static int	freed_blocks;
static int	freed_with_marker;
static int	freed_unwiped;

static bool
contains(const void *p, size_t len, const char *needle)
{
	return memmem(p, len, needle, strlen(needle)) != NULL;
}

static void
free_hook(const void *p, size_t len, bool wiped)
{
	const unsigned char *b = p;

	if (!wiped)
	{
		freed_blocks++;
		if (free_marker && contains(p, len, free_marker))
			freed_with_marker++;
		return;
	}
	for (size_t i = 0; i < len; i++)
	{
		if (b[i] != 0)
		{
			freed_unwiped++;
			break;
		}
	}
}

static void
free_hook_arm(const char *marker)
{
	free_marker = marker;
	freed_blocks = freed_with_marker = freed_unwiped = 0;
	http_test_set_free_hook(free_hook);
}

/*
 * The allocator, through libcurl's own public functions: curl_easy_escape grows its
 * result with realloc, curl_free and curl_slist_free_all free.  Each old block of the
 * growing result must reach the wiping free (a plain realloc would move it without
 * freeing through us, or grow it in place), and every block must be all zeros after.
 */
static void
test_wiping_allocator(void)
{
	char		input[3000];
	char	   *escaped;
	struct curl_slist *list;
	int			during_escape;

	for (size_t i = 0; i < sizeof(input); i += 10)
		memcpy(input + i, "WIPEME pq ", 10);

	free_hook_arm("WIPEME");
	escaped = curl_easy_escape(NULL, input, (int) sizeof(input));
	CHECK(escaped != NULL && strstr(escaped, "WIPEME%20pq%20") != NULL, "curl_easy_escape");
	during_escape = freed_with_marker;
	CHECK(during_escape >= 4,
		  "realloc: %d old blocks holding the text went through the wiping free",
		  during_escape);
	curl_free(escaped);
	CHECK(freed_with_marker == during_escape + 1, "curl_free went through the wiping free");

	list = curl_slist_append(NULL, "X-Amz-Security-Token: WIPEME-token");
	CHECK(list != NULL, "curl_slist_append");
	curl_slist_free_all(list);
	CHECK(freed_with_marker == during_escape + 2, "curl_slist_free_all wiped the line");

	CHECK(freed_blocks >= 6 && freed_unwiped == 0,
		  "%d of %d freed blocks not all zeros", freed_unwiped, freed_blocks);
	printf("wiping allocator: %d blocks freed, %d held the text, all wiped\n",
		   freed_blocks, freed_with_marker);
	http_test_set_free_hook(NULL);
}

static HttpStatus
do_sensitive(const char *path, const char *const *headers, int nheaders,
			 HttpResponse *resp, char *err, size_t errlen)
{
	char		url[256];
	HttpRequest req;

	snprintf(url, sizeof(url), "http://127.0.0.1:%d%s", stub_port, path);
	memset(&req, 0, sizeof(req));
	req.method = "GET";
	req.url = url;
	req.headers = headers;
	req.nheaders = nheaders;
	req.timeout_ms = 2000;
	req.max_response = 4096;
	req.sensitive = true;
	return http_perform(&req, resp, err, errlen);
}

/*
 * A sensitive answer leaves libcurl's memory, wiped, before http_perform returns, each
 * sensitive request recycles the easy handle, and the recycled handles still reuse the
 * one keep-alive connection.  (Which buffer held the answer depends on the libcurl
 * version: 7.88 frees its receive buffer when a transfer is done, the handle's other
 * buffers go with the handle; a libcurl that kept the answer anywhere past
 * http_perform would fail here.)
 */
static void
test_sensitive_recycles(void)
{
	HttpResponse resp;
	char		err[256];
	HttpStatus	st;
	const char *token_hdr[] = {"X-Amz-Security-Token: request-only-token-77d2"};
	unsigned long handles0;
	unsigned long handles1;
	int			conns0;
	int			conns1;

	conns0 = stub_connections();
	handles0 = http_test_easy_handles_created();

	free_hook_arm(SECRET_MARKER);
	st = do_sensitive("/secret", token_hdr, 1, &resp, err, sizeof(err));
	CHECK(st == HTTP_OK && resp.status == 200 && strstr(resp.body, SECRET_MARKER),
		  "sensitive GET /secret: %d %s", st, err);
	CHECK(freed_with_marker >= 1,
		  "the sensitive answer left libcurl's memory before http_perform returned");
	CHECK(freed_unwiped == 0, "%d freed blocks not wiped", freed_unwiped);
	http_response_free(&resp);

	/* The request's secret header too, once libcurl is done with it. */
	free_hook_arm("request-only-token-77d2");
	st = do_sensitive("/echo", token_hdr, 1, &resp, err, sizeof(err));
	CHECK(st == HTTP_OK && resp.status == 200, "sensitive GET /echo: %d %s", st, err);
	CHECK(freed_unwiped == 0, "%d freed blocks not wiped", freed_unwiped);
	http_response_free(&resp);
	http_test_set_free_hook(NULL);

	for (int i = 0; i < 3; i++)
	{
		st = do_sensitive("/secret", NULL, 0, &resp, err, sizeof(err));
		CHECK(st == HTTP_OK && resp.status == 200, "sensitive request %d: %d", i, st);
		http_response_free(&resp);
	}
	/* An ordinary request after them makes a handle once, and keeps it. */
	for (int i = 0; i < 2; i++)
	{
		st = do_request("GET", "/ok", NULL, 0, NULL, 2000, 1024, NULL, &resp, err,
						sizeof(err));
		CHECK(st == HTTP_OK && resp.status == 200, "ordinary request %d: %d", i, st);
		http_response_free(&resp);
	}
	handles1 = http_test_easy_handles_created();
	CHECK(handles1 - handles0 == 5, "5 sensitive requests made %lu new easy handles",
		  handles1 - handles0);

	conns1 = stub_connections();
	CHECK(conns0 > 0 && conns1 == conns0,
		  "recycled handles opened %d new connections", conns1 - conns0);
	printf("sensitive requests: %lu easy handles made, %d new connections\n",
		   handles1 - handles0, conns1 - conns0);
}

static int	sigpipe_polls;
static int	sigpipe_ignored;

static bool
check_sigpipe(void)
{
	struct sigaction sa;

	sigaction(SIGPIPE, NULL, &sa);
	sigpipe_polls++;
	if (sa.sa_handler == SIG_IGN)
		sigpipe_ignored++;
	return false;
}

/*
 * Without CURLOPT_NOSIGNAL, libcurl (built with OpenSSL) sets SIGPIPE to SIG_IGN
 * around its work in curl_multi_perform and puts it back afterwards; the interrupt
 * callback, called from the progress callback inside that, would see SIG_IGN.
 */
static void
test_nosignal(void)
{
	struct sigaction dfl;
	struct sigaction old;
	HttpResponse resp;
	char		err[256];
	HttpStatus	st;

	memset(&dfl, 0, sizeof(dfl));
	dfl.sa_handler = SIG_DFL;
	sigaction(SIGPIPE, &dfl, &old);
	sigpipe_polls = sigpipe_ignored = 0;
	st = do_request("GET", "/bytes/200000", NULL, 0, NULL, 2000, 300000, check_sigpipe,
					&resp, err, sizeof(err));
	CHECK(st == HTTP_OK && resp.status == 200, "GET /bytes/200000: %d %s", st, err);
	http_response_free(&resp);
	CHECK(sigpipe_polls >= 2, "interrupt callback polled %d times", sigpipe_polls);
	CHECK(sigpipe_ignored == 0,
		  "libcurl touched SIGPIPE during %d of %d polls: CURLOPT_NOSIGNAL is off",
		  sigpipe_ignored, sigpipe_polls);
	sigaction(SIGPIPE, &old, NULL);
}

/*
 * TLS verification is always on: a server with a self-signed certificate (made here
 * with the openssl command) is refused, for all that it is the right host.
 */
static void
test_tls_verification(void)
{
	char		cmd[512];
	char		cert[128];
	char		key[128];
	char		url[128];
	int			port;
	HttpRequest req;
	HttpResponse resp;
	char		err[256];
	HttpStatus	st;

	snprintf(tls_dir, sizeof(tls_dir), "/tmp/pg_envelope_tls_XXXXXX");
	if (mkdtemp(tls_dir) == NULL)
	{
		CHECK(false, "mkdtemp for TLS test");
		tls_dir[0] = '\0';
		return;
	}
	snprintf(cert, sizeof(cert), "%s/cert.pem", tls_dir);
	snprintf(key, sizeof(key), "%s/key.pem", tls_dir);
	snprintf(cmd, sizeof(cmd),
			 "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes "
			 "-days 1 -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 "
			 "-keyout %s -out %s >/dev/null 2>&1", key, cert);
	CHECK(system(cmd) == 0, "could not make a self-signed certificate with openssl");
	port = start_stub(cert, key);
	CHECK(port > 0, "could not start the TLS stub");
	if (port <= 0)
		return;

	memset(&req, 0, sizeof(req));
	snprintf(url, sizeof(url), "https://127.0.0.1:%d/ok", port);
	req.method = "GET";
	req.url = url;
	req.timeout_ms = 3000;
	req.max_response = 1024;
	st = http_perform(&req, &resp, err, sizeof(err));
	CHECK(st == HTTP_ERR_TLS && resp.body == NULL, "self-signed certificate refused: %d %s",
		  st, err);
	printf("self-signed peer: %s\n", err);

	/* The handshake was refused, but the TLS context was made, and hardened. */
	{
		const curl_version_info_data *vi = curl_version_info(CURLVERSION_NOW);
		bool		openssl = vi->ssl_version && strncmp(vi->ssl_version, "OpenSSL/", 8) == 0;
		uint64_t	options;
		long		mode;

		http_test_tls_hardening(&options, &mode);
		if (openssl)
		{
#ifdef SSL_OP_CLEANSE_PLAINTEXT
			CHECK((options & SSL_OP_CLEANSE_PLAINTEXT) != 0,
				  "SSL_OP_CLEANSE_PLAINTEXT set on the TLS context");
#endif
			CHECK((mode & SSL_MODE_RELEASE_BUFFERS) != 0,
				  "SSL_MODE_RELEASE_BUFFERS set on the TLS context");
		}
		else
		{
			CHECK(options == 0 && mode == 0, "TLS context left alone for %s",
				  vi->ssl_version ? vi->ssl_version : "no TLS");
			printf("libcurl's TLS backend is %s: OpenSSL options not applicable\n",
				   vi->ssl_version ? vi->ssl_version : "none");
		}
	}
}

/* The requests of test_perform_many: one path each, or NULL to skip it. */
typedef struct ManyRequests
{
	const char *paths[16];
	char		urls[16][256];
	int			prepared;
	bool		(*interrupted) (void);
} ManyRequests;

static HttpStatus
prepare_many(void *arg, int i, HttpRequest *req)
{
	ManyRequests *m = arg;

	m->prepared++;
	if (m->paths[i] == NULL)
		return HTTP_ERR_INTERNAL;
	snprintf(m->urls[i], sizeof(m->urls[i]), "http://127.0.0.1:%d%s", stub_port, m->paths[i]);
	req->method = "GET";
	req->url = m->urls[i];
	req->timeout_ms = 30000;
	req->max_response = 1024;
	req->interrupted = m->interrupted;
	req->sensitive = true;
	return HTTP_OK;
}

static void
test_perform_many(void)
{
	ManyRequests m;
	HttpResponse resps[16];
	HttpStatus	sts[16];
	char		errs[16][128];
	char		path[16][32];
	int			fds_before;
	double		t0;
	double		elapsed;

	/* Answers land at their own index, whatever order they finish in; a skip is kept. */
	memset(&m, 0, sizeof(m));
	for (int i = 0; i < 10; i++)
	{
		snprintf(path[i], sizeof(path[i]), "/bytes/%d", 10 - i);
		m.paths[i] = path[i];
	}
	m.paths[4] = NULL;
	http_perform_many(10, 3, prepare_many, &m, resps, sts, &errs[0][0], sizeof(errs[0]));
	for (int i = 0; i < 10; i++)
	{
		if (i == 4)
			CHECK(sts[i] == HTTP_ERR_INTERNAL && resps[i].body == NULL, "skipped request: %d", sts[i]);
		else
			CHECK(sts[i] == HTTP_OK && resps[i].status == 200 && resps[i].body_len == (size_t) (10 - i),
				  "request %d: %d %ld %zu %s", i, sts[i], resps[i].status, resps[i].body_len, errs[i]);
		http_response_free(&resps[i]);
	}
	CHECK(m.prepared == 10, "every request prepared once: %d", m.prepared);

	/*
	 * Three hung requests and one that answers, four in flight: the answer comes back
	 * although the hung ones went first (one at a time, it never would), and a cancel
	 * then stops the hung ones within the poll interval, leaving no fd behind.
	 */
	fds_before = count_fds();
	memset(&m, 0, sizeof(m));
	m.paths[0] = m.paths[1] = m.paths[2] = "/hang";
	m.paths[3] = "/ok";
	m.paths[4] = "/ok";			/* never started: canceled */
	m.interrupted = cancel_after_300ms;
	cancel_calls = 0;
	cancel_start = t0 = now_ms();
	http_perform_many(5, 4, prepare_many, &m, resps, sts, &errs[0][0], sizeof(errs[0]));
	elapsed = now_ms() - t0;
	CHECK(sts[3] == HTTP_OK && resps[3].status == 200, "the answering request, behind three hung ones: %d %s",
		  sts[3], errs[3]);
	for (int i = 0; i < 3; i++)
		CHECK(sts[i] == HTTP_ERR_CANCELED && resps[i].body == NULL, "hung request %d: %d", i, sts[i]);
	CHECK(sts[4] == HTTP_ERR_CANCELED || sts[4] == HTTP_OK, "the fifth request: %d", sts[4]);
	CHECK(elapsed >= 300 && elapsed < 1000, "cancel of a set took %.0f ms", elapsed);
	for (int i = 0; i < 5; i++)
		http_response_free(&resps[i]);
	CHECK(count_fds() <= fds_before, "fds after a canceled set: %d, before %d", count_fds(), fds_before);
	printf("perform_many: cancel of 3 hung transfers after %.0f ms\n", elapsed);

	/* Canceled before anything starts: nothing is prepared, everything is canceled. */
	memset(&m, 0, sizeof(m));
	m.paths[0] = m.paths[1] = "/ok";
	m.interrupted = always_interrupted;
	http_perform_many(2, 2, prepare_many, &m, resps, sts, NULL, 0);
	CHECK(sts[0] == HTTP_ERR_CANCELED && sts[1] == HTTP_ERR_CANCELED, "pre-canceled set: %d %d",
		  sts[0], sts[1]);
	for (int i = 0; i < 2; i++)
		http_response_free(&resps[i]);
}

int
main(void)
{
	CHECK(http_global_init() == 0, "http_global_init");
	CHECK(http_global_init() == 0, "http_global_init twice");
	stub_port = start_stub(NULL, NULL);
	if (stub_port <= 0)
	{
		CHECK(false, "could not start %s (run from the repository root)", STUB_SCRIPT);
		return unit_finish("test_http");
	}
	test_wiping_allocator();
	test_basic();
	test_cap();
	test_timeouts_and_cancel();
	test_perform_many();
	test_errors();
	test_reuse_and_leaks();
	test_sensitive_recycles();
	test_nosignal();
	test_tls_verification();
	stop_stubs();
	if (tls_dir[0])
	{
		char		cmd[128];

		snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tls_dir);
		if (system(cmd) != 0)
			fprintf(stderr, "could not remove %s\n", tls_dir);
	}
	return unit_finish("test_http");
}
