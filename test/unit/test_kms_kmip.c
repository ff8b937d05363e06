/*
 * test_kms_kmip.c — the kmip provider's checks, timeouts and cancellation, without a
 * KMIP server.
 *
 * Certificates are made with the openssl command in a temporary directory.  The
 * "servers" are sockets of this process: a port nobody listens on (connection refused,
 * retried), and a listening socket that never accepts, so the TCP connection completes
 * from the backlog and the TLS handshake waits forever (hung server).  Checked: every
 * missing or unsafe setting is KMS_ERR_CONFIG before any connection; malformed wrapped
 * keys are refused before any connection; a refused connection is retried exactly
 * `retries` times; a hung server ends at the timeout; the interrupt callback ends a
 * hung call within about one poll slice.  The real protocol runs in
 * test/tap/050_kmip.pl against PyKMIP.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "kms.h"
#include "unit.h"

extern const KmsProvider kms_kmip_provider;

static char dir[] = "/tmp/test_kms_kmip.XXXXXX";
static char ca_file[128],
			cert_file[128],
			key_file[128];
static double interrupt_at;

static double
now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static bool
interrupt_after_deadline(void)
{
	return interrupt_at > 0 && now_s() >= interrupt_at;
}

static bool
make_pki(void)
{
	char		cmd[2048];

	if (mkdtemp(dir) == NULL)
		return false;
	snprintf(ca_file, sizeof(ca_file), "%s/ca.crt", dir);
	snprintf(cert_file, sizeof(cert_file), "%s/client.crt", dir);
	snprintf(key_file, sizeof(key_file), "%s/client.key", dir);
	snprintf(cmd, sizeof(cmd),
			 "cd %s && openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt "
			 "-subj /CN=ca -days 1 >/dev/null 2>&1 && "
			 "openssl req -newkey rsa:2048 -nodes -keyout client.key -out client.csr "
			 "-subj /CN=client >/dev/null 2>&1 && "
			 "openssl x509 -req -in client.csr -CA ca.crt -CAkey ca.key -CAcreateserial "
			 "-days 1 -out client.crt >/dev/null 2>&1 && chmod 600 client.key", dir);
	return system(cmd) == 0;
}

static void
base_config(KmsConfig *cfg, int port)
{
	memset(cfg, 0, sizeof(*cfg));
	cfg->kmip_host = "127.0.0.1";
	cfg->kmip_port = port;
	cfg->kmip_ca_file = ca_file;
	cfg->kmip_cert_file = cert_file;
	cfg->kmip_key_file = key_file;
	cfg->data_directory = "/nonexistent-data-directory";
	cfg->timeout_ms = 2000;
	cfg->retries = 0;
	cfg->interrupted = interrupt_after_deadline;
}

/* A loopback port with nothing listening (bound, then closed). */
static int
closed_port(void)
{
	struct sockaddr_in a = {.sin_family = AF_INET};
	socklen_t	len = sizeof(a);
	int			fd = socket(AF_INET, SOCK_STREAM, 0);
	int			port;

	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	bind(fd, (struct sockaddr *) &a, sizeof(a));
	getsockname(fd, (struct sockaddr *) &a, &len);
	port = ntohs(a.sin_port);
	close(fd);
	return port;
}

/* A loopback listener that never accepts: connect succeeds, nothing ever answers. */
static int
silent_listener(int *port)
{
	struct sockaddr_in a = {.sin_family = AF_INET};
	socklen_t	len = sizeof(a);
	int			fd = socket(AF_INET, SOCK_STREAM, 0);

	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	bind(fd, (struct sockaddr *) &a, sizeof(a));
	listen(fd, 8);
	getsockname(fd, (struct sockaddr *) &a, &len);
	*port = ntohs(a.sin_port);
	return fd;
}

static KmsStatus
generate(const KmsConfig *cfg, const char *key_id, KmsError *err)
{
	KmsEncryptionContext ec = {"acme", 1};
	uint8_t		dek[KMS_DEK_LEN];
	uint8_t		wrapped[KMS_WRAPPED_MAX];
	size_t		wrapped_len = 0;
	char		arn[KMS_KEY_ID_MAX];
	KmsStatus	st;

	memset(err, 0, sizeof(*err));
	memset(dek, 0x5a, sizeof(dek));
	st = kms_kmip_provider.generate_data_key(cfg, key_id, &ec, dek, wrapped, &wrapped_len, arn, err);
	if (st != KMS_OK)
	{
		uint8_t		zero[KMS_DEK_LEN] = {0};

		CHECK(memcmp(dek, zero, sizeof(dek)) == 0, "the DEK buffer is wiped after a failure");
	}
	return st;
}

static void
test_settings(void)
{
	KmsConfig	cfg;
	KmsError	err;
	int			port = closed_port();
	char		path[256];

#define REFUSED(setup, pattern) \
	do { \
		base_config(&cfg, port); \
		setup; \
		CHECK(generate(&cfg, "1", &err) == KMS_ERR_CONFIG && strstr(err.message, pattern) != NULL && \
			  err.attempts == 0, "%s: %s", #setup, err.message); \
	} while (0)

	REFUSED(cfg.kmip_host = "", "envelope.kmip_host is not set");
	REFUSED(cfg.kmip_port = 0, "envelope.kmip_port");
	REFUSED(cfg.kmip_ca_file = NULL, "envelope.kmip_ca_file is not set");
	REFUSED(cfg.kmip_cert_file = "", "envelope.kmip_cert_file is not set");
	REFUSED(cfg.kmip_key_file = "", "envelope.kmip_key_file is not set");
	REFUSED(cfg.kmip_key_file = "relative.key", "must be an absolute path");
	snprintf(path, sizeof(path), "%s/missing.key", dir);
	REFUSED(cfg.kmip_key_file = path, "could not open KMIP client key file");
	REFUSED(cfg.kmip_key_file = dir, "not a regular file");
	REFUSED(cfg.data_directory = dir, "is inside the data directory");
	chmod(key_file, 0640);
	REFUSED((void) 0, "is accessible by group or others (mode 0640)");
	chmod(key_file, 0600);
	chmod(ca_file, 0600);
	REFUSED(cfg.kmip_key_file = ca_file, "holds no usable unencrypted PEM private key");
	snprintf(path, sizeof(path), "%s/ca.key", dir);
	chmod(path, 0600);
	REFUSED(cfg.kmip_key_file = path, "does not match envelope.kmip_cert_file");
	snprintf(path, sizeof(path), "%s/nothing.pem", dir);
	REFUSED(cfg.kmip_ca_file = path, "could not load envelope.kmip_ca_file");

	base_config(&cfg, port);
	CHECK(generate(&cfg, "", &err) == KMS_ERR_CONFIG && strstr(err.message, "no master key"),
		  "empty key id refused");
	CHECK(generate(&cfg, "bad\nid", &err) == KMS_ERR_CONFIG && strstr(err.message, "printable ASCII"),
		  "control character in the key id refused");
#undef REFUSED
}

static void
test_wrapped_format(void)
{
	KmsConfig	cfg;
	KmsError	err;
	KmsEncryptionContext ec = {"acme", 1};
	uint8_t		dek[KMS_DEK_LEN];
	uint8_t		wrapped[2 + 16 + 16 + 32];

	base_config(&cfg, closed_port());
	memset(wrapped, 0, sizeof(wrapped));
	wrapped[0] = 0x01;
	wrapped[1] = 16;

#define MALFORMED(len, what) \
	do { \
		memset(&err, 0, sizeof(err)); \
		CHECK(kms_kmip_provider.decrypt(&cfg, "1", &ec, wrapped, len, dek, &err) == KMS_ERR_INVALID_CIPHERTEXT && \
			  err.attempts == 0, "%s refused before any request", what); \
	} while (0)

	MALFORMED(0, "an empty wrapped key");
	MALFORMED(1, "a one-byte wrapped key");
	MALFORMED(sizeof(wrapped) - 1, "a wrapped key one byte short");
	wrapped[0] = 0x02;
	MALFORMED(sizeof(wrapped), "another format byte");
	wrapped[0] = 0x01;
	wrapped[1] = 0;
	MALFORMED(sizeof(wrapped), "an IV of length 0");
	wrapped[1] = 65;
	MALFORMED(sizeof(wrapped), "an IV longer than 64");
#undef MALFORMED
}

/* The rate limit's hooks, as the backend's kms_rate.c would be called. */
static int	slots_asked;
static int	answers_noted;
static bool refuse_slots;

static bool
count_slot(const KmsConfig *cfg)
{
	(void) cfg;
	slots_asked++;
	return !refuse_slots;
}

static void
count_answer(bool throttled)
{
	(void) throttled;
	answers_noted++;
}

static void
test_network(void)
{
	KmsConfig	cfg;
	KmsError	err;
	int			port;
	int			listener;
	double		t0,
				took;

	/* refused: retried exactly `retries` times */
	base_config(&cfg, closed_port());
	cfg.retries = 2;
	CHECK(generate(&cfg, "1", &err) == KMS_ERR_UNAVAILABLE && err.attempts == 3 &&
		  strstr(err.message, "after 3 attempts"), "refused connection retried twice: %s (%d)",
		  err.message, err.attempts);

	/* each attempt waits for a slot of the rate limit; no answer, nothing noted */
	cfg.await_request_slot = count_slot;
	cfg.note_answer = count_answer;
	CHECK(generate(&cfg, "1", &err) == KMS_ERR_UNAVAILABLE && slots_asked == 3 &&
		  answers_noted == 0, "a slot per attempt: %d slots, %d answers", slots_asked,
		  answers_noted);
	/* an interrupted wait for a slot sends nothing */
	refuse_slots = true;
	CHECK(generate(&cfg, "1", &err) == KMS_ERR_CANCELED && err.attempts == 0,
		  "an interrupted wait: %s (%d attempts)", err.message, err.attempts);
	refuse_slots = false;

	/* hung: the TLS handshake never completes; the timeout ends it, once per attempt */
	listener = silent_listener(&port);
	base_config(&cfg, port);
	cfg.timeout_ms = 300;
	cfg.retries = 1;
	t0 = now_s();
	CHECK(generate(&cfg, "1", &err) == KMS_ERR_TIMEOUT && err.attempts == 2,
		  "hung server: timeout after two attempts: %s", err.message);
	took = now_s() - t0;
	CHECK(took >= 0.6 && took < 1.5, "two attempts of 300 ms took %.2f s", took);

	/* hung, with a long timeout: the interrupt ends it within about one poll slice */
	base_config(&cfg, port);
	cfg.timeout_ms = 60000;
	cfg.retries = 3;
	t0 = now_s();
	interrupt_at = t0 + 0.3;
	CHECK(generate(&cfg, "1", &err) == KMS_ERR_CANCELED && err.attempts == 1,
		  "hung server: the interrupt cancels: %s", err.message);
	took = now_s() - interrupt_at;
	CHECK(took < 0.25, "canceled %.3f s after the interrupt", took);
	interrupt_at = 0;
	close(listener);
}

int
main(void)
{
	char		cmd[256];

	if (!make_pki())
	{
		fprintf(stderr, "FAIL: could not make test certificates with the openssl command\n");
		return 1;
	}
	test_settings();
	test_wrapped_format();
	test_network();
	snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
	if (system(cmd) != 0)
		fprintf(stderr, "could not remove %s\n", dir);
	return unit_finish("test_kms_kmip");
}
