/*
 * kmip_conn.c — the KMIP provider's TLS connection (see kmip_conn.h).
 *
 * Plain C on OpenSSL 3 and POSIX sockets.  One connection per process, opened on first
 * use and kept until it fails, the settings change, or the process forks (a child
 * never writes on, or shuts down TLS on, a socket its parent still uses: it drops its
 * copies unannounced).
 *
 * Every wait is a poll() of at most KMIP_POLL_MS, followed by a call to the caller's
 * `interrupted` and a look at the deadline: the same scheme as http.c's transfer loop,
 * so pg_cancel_backend and statement_timeout stop a hung connect, handshake or answer
 * within about 100 ms.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "kmip_conn.h"
#include "kmip_ttlv.h"

typedef struct KmipConnection
{
	pid_t		owner;
	int			fd;
	SSL_CTX    *ctx;
	SSL		   *ssl;
	uint8_t		settings_digest[32];
} KmipConnection;

static KmipConnection conn = {.fd = -1};

static int64_t
now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t) ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static KmipIoStatus fail(KmipIoStatus st, char *detail, size_t detail_len, const char *fmt,...)
			__attribute__((format(printf, 4, 5)));

/* Set the failure's sentence (never given a secret) and return its status. */
static KmipIoStatus
fail(KmipIoStatus st, char *detail, size_t detail_len, const char *fmt,...)
{
	va_list		ap;

	va_start(ap, fmt);
	vsnprintf(detail, detail_len, fmt, ap);
	va_end(ap);
	return st;
}

/* The text of OpenSSL's last error (library reason strings only, never data). */
static const char *
openssl_reason(void)
{
	static char buf[160];
	unsigned long e = ERR_peek_last_error();

	if (e == 0)
		return "no detail from OpenSSL";
	ERR_error_string_n(e, buf, sizeof(buf));
	return buf;
}

/*
 * Wait until fd is ready for `events`, in slices that poll `interrupted`; the
 * deadline is absolute (now_ms clock).
 */
static KmipIoStatus
wait_fd(const KmipConnSettings *s, int fd, short events, int64_t deadline)
{
	for (;;)
	{
		struct pollfd p = {.fd = fd, .events = events};
		int64_t		left;
		int			r;

		if (s->interrupted && s->interrupted())
			return KMIP_IO_CANCELED;
		left = deadline - now_ms();
		if (left <= 0)
			return KMIP_IO_TIMEOUT;
		r = poll(&p, 1, left < KMIP_POLL_MS ? (int) left : KMIP_POLL_MS);
		if (r > 0)
			return KMIP_IO_OK;
		if (r < 0 && errno != EINTR)
			return KMIP_IO_INTERNAL;
	}
}

void
kmip_conn_close(void)
{
	if (conn.ssl)
		SSL_free(conn.ssl);		/* no close_notify: it could block, and is not needed */
	if (conn.ctx)
		SSL_CTX_free(conn.ctx);
	if (conn.fd >= 0)
		close(conn.fd);
	conn.ssl = NULL;
	conn.ctx = NULL;
	conn.fd = -1;
	memset(conn.settings_digest, 0, sizeof(conn.settings_digest));
}

/* A digest of everything a connection was made with, so a change forces a new one. */
static void
settings_digest(const KmipConnSettings *s, uint8_t out[32])
{
	EVP_MD_CTX *md = EVP_MD_CTX_new();
	unsigned int n = 0;
	char		port[16];
	const char *fields[] = {s->host, port, s->ca_file, s->cert_file};

	memset(out, 0, 32);
	if (md == NULL)
		return;
	snprintf(port, sizeof(port), "%d", s->port);
	EVP_DigestInit_ex(md, EVP_sha256(), NULL);
	for (size_t i = 0; i < sizeof(fields) / sizeof(fields[0]); i++)
		EVP_DigestUpdate(md, fields[i] ? fields[i] : "", fields[i] ? strlen(fields[i]) + 1 : 1);
	EVP_DigestUpdate(md, s->key_pem, s->key_pem_len);
	EVP_DigestFinal_ex(md, out, &n);
	EVP_MD_CTX_free(md);
}

/* No passphrase prompts: an encrypted key file is a configuration error. */
static int
no_passphrase(char *buf, int size, int rwflag, void *u)
{
	return -1;
}

static KmipIoStatus
make_context(const KmipConnSettings *s, SSL_CTX **out, char *detail, size_t dl)
{
	SSL_CTX    *ctx = SSL_CTX_new(TLS_client_method());
	BIO		   *bio = NULL;
	EVP_PKEY   *pkey = NULL;
	KmipIoStatus st = KMIP_IO_OK;

	*out = NULL;
	if (ctx == NULL)
		return fail(KMIP_IO_INTERNAL, detail, dl, "could not create a TLS context: %s", openssl_reason());
	SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
	SSL_CTX_set_options(ctx, SSL_OP_CLEANSE_PLAINTEXT | SSL_OP_NO_RENEGOTIATION |
						SSL_OP_NO_COMPRESSION);
	SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
	SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);

	if (SSL_CTX_load_verify_locations(ctx, s->ca_file, NULL) != 1)
		st = fail(KMIP_IO_CONFIG, detail, dl, "could not load envelope.kmip_ca_file: %s", openssl_reason());
	else if (SSL_CTX_use_certificate_chain_file(ctx, s->cert_file) != 1)
		st = fail(KMIP_IO_CONFIG, detail, dl, "could not load envelope.kmip_cert_file: %s", openssl_reason());
	else if ((bio = BIO_new_mem_buf(s->key_pem, (int) s->key_pem_len)) == NULL ||
			 (pkey = PEM_read_bio_PrivateKey(bio, NULL, no_passphrase, NULL)) == NULL)
		st = fail(KMIP_IO_CONFIG, detail, dl,
				  "envelope.kmip_key_file holds no usable unencrypted PEM private key");
	else if (SSL_CTX_use_PrivateKey(ctx, pkey) != 1 || SSL_CTX_check_private_key(ctx) != 1)
		st = fail(KMIP_IO_CONFIG, detail, dl,
				  "the private key in envelope.kmip_key_file does not match envelope.kmip_cert_file");
	EVP_PKEY_free(pkey);
	BIO_free(bio);
	if (st != KMIP_IO_OK)
	{
		SSL_CTX_free(ctx);
		return st;
	}
	*out = ctx;
	return KMIP_IO_OK;
}

static KmipIoStatus
tcp_connect(const KmipConnSettings *s, int64_t deadline, int *fd_out, char *detail, size_t dl)
{
	struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
	.ai_flags = AI_NUMERICSERV};
	struct addrinfo *res = NULL;
	char		port[16];
	int			rc;
	KmipIoStatus st = KMIP_IO_CONNECT;

	*fd_out = -1;
	snprintf(port, sizeof(port), "%d", s->port);
	rc = getaddrinfo(s->host, port, &hints, &res);
	if (rc != 0)
		return fail(KMIP_IO_CONNECT, detail, dl, "could not resolve the KMIP host: %s", gai_strerror(rc));

	snprintf(detail, dl, "could not connect to the KMIP server");
	for (struct addrinfo *ai = res; ai != NULL; ai = ai->ai_next)
	{
		int			fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
								ai->ai_protocol);
		int			one = 1;
		int			soerr = 0;
		socklen_t	sl = sizeof(soerr);

		if (fd < 0)
			continue;
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
		if (connect(fd, ai->ai_addr, ai->ai_addrlen) != 0)
		{
			if (errno != EINPROGRESS)
			{
				snprintf(detail, dl, "could not connect to the KMIP server: %s", strerror(errno));
				close(fd);
				continue;
			}
			st = wait_fd(s, fd, POLLOUT, deadline);
			if (st != KMIP_IO_OK)
			{
				close(fd);
				break;			/* canceled or out of time: no other address either */
			}
			if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) != 0 || soerr != 0)
			{
				snprintf(detail, dl, "could not connect to the KMIP server: %s", strerror(soerr));
				st = KMIP_IO_CONNECT;
				close(fd);
				continue;
			}
		}
		*fd_out = fd;
		st = KMIP_IO_OK;
		break;
	}
	freeaddrinfo(res);
	if (st == KMIP_IO_TIMEOUT)
		snprintf(detail, dl, "connecting to the KMIP server timed out");
	else if (st == KMIP_IO_CANCELED)
		snprintf(detail, dl, "canceled while connecting to the KMIP server");
	return st;
}

/* Is this handshake failure the server refusing us (a TLS alert about our side)? */
static bool
server_refused_client(unsigned long e)
{
	int			r = ERR_GET_REASON(e);

	if (ERR_GET_LIB(e) != ERR_LIB_SSL)
		return false;
	return r == SSL_R_SSLV3_ALERT_BAD_CERTIFICATE ||
		r == SSL_R_SSLV3_ALERT_CERTIFICATE_UNKNOWN ||
		r == SSL_R_SSLV3_ALERT_UNSUPPORTED_CERTIFICATE ||
		r == SSL_R_SSLV3_ALERT_CERTIFICATE_REVOKED ||
		r == SSL_R_SSLV3_ALERT_CERTIFICATE_EXPIRED ||
		r == SSL_R_TLSV1_ALERT_UNKNOWN_CA ||
		r == SSL_R_TLSV1_ALERT_ACCESS_DENIED ||
		r == SSL_R_TLSV1_ALERT_DECRYPT_ERROR ||
		r == SSL_R_SSLV3_ALERT_HANDSHAKE_FAILURE ||
		r == SSL_R_TLSV13_ALERT_CERTIFICATE_REQUIRED;
}

/* Drive an SSL call that may want to read or write until done, failed or out of time. */
static KmipIoStatus
ssl_wait(const KmipConnSettings *s, int ssl_error, int64_t deadline)
{
	if (ssl_error == SSL_ERROR_WANT_READ)
		return wait_fd(s, conn.fd, POLLIN, deadline);
	if (ssl_error == SSL_ERROR_WANT_WRITE)
		return wait_fd(s, conn.fd, POLLOUT, deadline);
	return KMIP_IO_TLS;
}

static KmipIoStatus
tls_handshake(const KmipConnSettings *s, int64_t deadline, char *detail, size_t dl)
{
	unsigned char addr[16];
	X509_VERIFY_PARAM *param;

	conn.ssl = SSL_new(conn.ctx);
	if (conn.ssl == NULL || SSL_set_fd(conn.ssl, conn.fd) != 1)
		return fail(KMIP_IO_INTERNAL, detail, dl, "could not set up TLS: %s", openssl_reason());

	/* The name to verify: an IP address is matched against the certificate's IP SANs. */
	param = SSL_get0_param(conn.ssl);
	X509_VERIFY_PARAM_set_hostflags(param, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
	if (inet_pton(AF_INET, s->host, addr) == 1 || inet_pton(AF_INET6, s->host, addr) == 1)
	{
		if (X509_VERIFY_PARAM_set1_ip_asc(param, s->host) != 1)
			return fail(KMIP_IO_INTERNAL, detail, dl, "could not set the address to verify");
	}
	else if (SSL_set_tlsext_host_name(conn.ssl, s->host) != 1 || SSL_set1_host(conn.ssl, s->host) != 1)
		return fail(KMIP_IO_INTERNAL, detail, dl, "could not set the host name to verify");

	for (;;)
	{
		int			r;
		int			e;
		KmipIoStatus st;

		ERR_clear_error();
		r = SSL_connect(conn.ssl);
		if (r == 1)
			break;
		e = SSL_get_error(conn.ssl, r);
		if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
		{
			st = ssl_wait(s, e, deadline);
			if (st == KMIP_IO_TIMEOUT)
				return fail(st, detail, dl, "the TLS handshake with the KMIP server timed out");
			if (st != KMIP_IO_OK)
				return fail(st, detail, dl, "canceled during the TLS handshake");
			continue;
		}
		if (SSL_get_verify_result(conn.ssl) != X509_V_OK)
			return fail(KMIP_IO_SERVER_CERT, detail, dl,
						"the KMIP server's certificate did not verify: %s",
						X509_verify_cert_error_string(SSL_get_verify_result(conn.ssl)));
		if (server_refused_client(ERR_peek_last_error()))
			return fail(KMIP_IO_CLIENT_REFUSED, detail, dl,
						"the KMIP server refused the client certificate: %s", openssl_reason());
		if (e == SSL_ERROR_SYSCALL || e == SSL_ERROR_ZERO_RETURN)
			return fail(KMIP_IO_CLOSED, detail, dl,
						"the KMIP server closed the connection during the TLS handshake");
		return fail(KMIP_IO_TLS, detail, dl, "the TLS handshake with the KMIP server failed: %s",
					openssl_reason());
	}
	return KMIP_IO_OK;
}

static KmipIoStatus
open_connection(const KmipConnSettings *s, int64_t deadline, char *detail, size_t dl)
{
	KmipIoStatus st = make_context(s, &conn.ctx, detail, dl);

	if (st == KMIP_IO_OK)
		st = tcp_connect(s, deadline, &conn.fd, detail, dl);
	if (st == KMIP_IO_OK)
		st = tls_handshake(s, deadline, detail, dl);
	if (st != KMIP_IO_OK)
	{
		kmip_conn_close();
		return st;
	}
	conn.owner = getpid();
	settings_digest(s, conn.settings_digest);
	return KMIP_IO_OK;
}

/* A kept connection is usable when nothing is waiting on it: the server sends nothing
 * unasked, so readable means closed (or garbage). */
static bool
kept_connection_alive(void)
{
	struct pollfd p = {.fd = conn.fd, .events = POLLIN};

	return SSL_pending(conn.ssl) == 0 && poll(&p, 1, 0) == 0;
}

static KmipIoStatus
io_failure(int e, const char *what, char *detail, size_t dl)
{
	if (e == SSL_ERROR_ZERO_RETURN || e == SSL_ERROR_SYSCALL)
		return fail(KMIP_IO_CLOSED, detail, dl, "the KMIP server closed the connection while %s", what);
	snprintf(detail, dl, "TLS failure while %s: %s", what, openssl_reason());
	return KMIP_IO_TLS;
}

static KmipIoStatus
write_all(const KmipConnSettings *s, const uint8_t *buf, size_t len, int64_t deadline,
		  char *detail, size_t dl)
{
	for (;;)
	{
		int			r;
		int			e;
		KmipIoStatus st;

		ERR_clear_error();
		r = SSL_write(conn.ssl, buf, (int) len);
		if (r > 0)
			return KMIP_IO_OK;	/* without partial writes, all or nothing */
		e = SSL_get_error(conn.ssl, r);
		st = ssl_wait(s, e, deadline);
		if (st == KMIP_IO_TLS)
			return io_failure(e, "sending the request", detail, dl);
		if (st == KMIP_IO_TIMEOUT)
			return fail(st, detail, dl, "sending the request to the KMIP server timed out");
		if (st != KMIP_IO_OK)
			return fail(st, detail, dl, "canceled while sending the request");
	}
}

static KmipIoStatus
read_exact(const KmipConnSettings *s, uint8_t *buf, size_t len, int64_t deadline,
		   char *detail, size_t dl)
{
	size_t		got = 0;

	while (got < len)
	{
		size_t		n = 0;
		int			e;
		KmipIoStatus st;

		ERR_clear_error();
		if (SSL_read_ex(conn.ssl, buf + got, len - got, &n) == 1)
		{
			got += n;
			continue;
		}
		e = SSL_get_error(conn.ssl, 0);
		st = ssl_wait(s, e, deadline);
		if (st == KMIP_IO_TLS)
			return io_failure(e, "waiting for the answer", detail, dl);
		if (st == KMIP_IO_TIMEOUT)
			return fail(st, detail, dl, "no answer from the KMIP server within envelope.kms_timeout");
		if (st != KMIP_IO_OK)
			return fail(st, detail, dl, "canceled while waiting for the KMIP server");
	}
	return KMIP_IO_OK;
}

static KmipIoStatus
exchange(const KmipConnSettings *s, const uint8_t *req, size_t req_len,
		 uint8_t *resp, size_t cap, size_t *resp_len, int64_t deadline,
		 char *detail, size_t dl)
{
	KmipIoStatus st;
	size_t		total;

	st = write_all(s, req, req_len, deadline, detail, dl);
	if (st == KMIP_IO_OK)
		st = read_exact(s, resp, TTLV_HEADER_LEN, deadline, detail, dl);
	if (st != KMIP_IO_OK)
		return st;
	total = ttlv_message_size(resp);
	if (total == 0 || total > cap)
		return fail(KMIP_IO_PROTOCOL, detail, dl,
					"the KMIP server's answer is not a TTLV message of acceptable size");
	st = read_exact(s, resp + TTLV_HEADER_LEN, total - TTLV_HEADER_LEN, deadline, detail, dl);
	if (st == KMIP_IO_OK)
		*resp_len = total;
	return st;
}

KmipIoStatus
kmip_conn_roundtrip(const KmipConnSettings *s, const uint8_t *req, size_t req_len,
					uint8_t *resp, size_t cap, size_t *resp_len, bool *reused,
					char *detail, size_t dl)
{
	int64_t		deadline = now_ms() + (s->timeout_ms > 0 ? s->timeout_ms : 30000);
	uint8_t		digest[32];
	KmipIoStatus st;

	*reused = false;
	*resp_len = 0;
	detail[0] = '\0';

	if (conn.ssl != NULL && conn.owner != getpid())
	{
		/* forked: forget the parent's connection without touching it */
		conn.ssl = NULL;
		conn.ctx = NULL;
		conn.fd = -1;
	}
	settings_digest(s, digest);
	if (conn.ssl != NULL &&
		(memcmp(digest, conn.settings_digest, sizeof(digest)) != 0 || !kept_connection_alive()))
		kmip_conn_close();

	if (conn.ssl != NULL)
	{
		*reused = true;
		st = exchange(s, req, req_len, resp, cap, resp_len, deadline, detail, dl);
		if (st != KMIP_IO_CLOSED)
		{
			if (st != KMIP_IO_OK)
			{
				kmip_conn_close();
				ERR_clear_error();
			}
			return st;
		}
		/* The server dropped an idle connection under us: one fresh try, same deadline. */
		kmip_conn_close();
		*reused = false;
	}

	st = open_connection(s, deadline, detail, dl);
	if (st == KMIP_IO_OK)
		st = exchange(s, req, req_len, resp, cap, resp_len, deadline, detail, dl);
	if (st != KMIP_IO_OK)
	{
		kmip_conn_close();
		ERR_clear_error();		/* leave no error of ours for other OpenSSL users */
	}
	return st;
}
