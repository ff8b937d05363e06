/*
 * kmip_conn.h — one TLS connection to a KMIP server, interruptible, kept open.
 *
 * Plain C on OpenSSL and POSIX sockets: no postgres.h.  KMIP servers listen on TLS
 * (port 5696) and read one TTLV request message, answer one TTLV response message,
 * and keep the connection for the next request.  This layer moves whole messages:
 * kmip_conn_roundtrip sends a request and returns the response bytes, opening (or
 * re-opening) the connection as needed.
 *
 * Policy, for every connection:
 *   - TLS 1.2 or newer; the server certificate is verified against kmip_ca_file and
 *     its name against the configured host (DNS name or IP address); the client
 *     presents kmip_cert_file with the private key the caller hands in as PEM bytes
 *     (read by the provider, which checks the file's mode and location first);
 *   - every socket is non-blocking; connect, handshake, write and read wait in poll
 *     slices of KMIP_POLL_MS and ask `interrupted` between slices, so a query cancel
 *     is served within about that long; the whole round trip has one deadline;
 *   - OpenSSL's record buffers hold request and response plaintext (a DEK): the
 *     context sets SSL_OP_CLEANSE_PLAINTEXT and SSL_MODE_RELEASE_BUFFERS, and our own
 *     buffers are the caller's to wipe.
 *
 * Writes go through OpenSSL's socket BIO (write(2)), so a peer that closed the
 * connection would raise SIGPIPE: PostgreSQL backends ignore it; other callers must too.
 *
 * Name resolution (getaddrinfo) is not interruptible; configure an address or a
 * name the resolver answers quickly (see doc/kmip.md).
 */
#ifndef PG_ENVELOPE_KMIP_CONN_H
#define PG_ENVELOPE_KMIP_CONN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define KMIP_POLL_MS 100

typedef enum KmipIoStatus
{
	KMIP_IO_OK = 0,
	KMIP_IO_CONFIG,				/* CA, certificate or key not loadable */
	KMIP_IO_CONNECT,			/* no TCP connection (refused, unreachable, resolver) */
	KMIP_IO_CLOSED,				/* the server closed or reset the connection */
	KMIP_IO_SERVER_CERT,		/* the server's certificate or name did not verify */
	KMIP_IO_CLIENT_REFUSED,		/* the server refused our certificate (TLS alert) */
	KMIP_IO_TLS,				/* another TLS failure */
	KMIP_IO_TIMEOUT,
	KMIP_IO_CANCELED,
	KMIP_IO_PROTOCOL,			/* the answer is not one TTLV message within bounds */
	KMIP_IO_INTERNAL
} KmipIoStatus;

typedef struct KmipConnSettings
{
	const char *host;
	int			port;
	const char *ca_file;
	const char *cert_file;
	const uint8_t *key_pem;		/* private key, PEM, not NUL-terminated */
	size_t		key_pem_len;
	int			timeout_ms;		/* whole round trip, connect included */
	bool		(*interrupted) (void);
} KmipConnSettings;

/*
 * Send `req` and read one response message into resp[0..cap).  Reuses the open
 * connection when the settings are the same as last time (compared by a digest, so no
 * key material is kept), otherwise connects anew.  `reused` tells whether the
 * request went over a connection opened by an earlier call.  On failure the
 * connection is closed and `detail` holds a short sentence without secrets.
 */
extern KmipIoStatus kmip_conn_roundtrip(const KmipConnSettings *s,
										const uint8_t *req, size_t req_len,
										uint8_t *resp, size_t cap, size_t *resp_len,
										bool *reused, char *detail, size_t detail_len);

/* Close the kept connection (if any). */
extern void kmip_conn_close(void);

#endif							/* PG_ENVELOPE_KMIP_CONN_H */
