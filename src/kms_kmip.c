/*
 * kms_kmip.c — the `kmip` KMS provider: master keys in a KMIP key manager or HSM.
 *
 * Layer: KMS provider (plain C, no postgres.h).  Messages are built and read by
 * kmip_msg.c (on kmip_ttlv.c) and carried by kmip_conn.c over TLS with a client
 * certificate.  The master key is a symmetric AES key in the key manager, named by its
 * KMIP Unique Identifier (envelope.kms_key or create_tenant's kms_key); it never leaves
 * the key manager.
 *
 * Data keys.  KMIP has no GenerateDataKey: the DEK comes from the OS CSPRNG in the
 * backend (getrandom(2), which blocks only until the kernel pool is first seeded) and
 * is sent to the key manager once, in an Encrypt request, to be wrapped.  Unwrapping is a Decrypt.
 * `rewrap` to another master key is Decrypt under the old key and Encrypt under the
 * new one: unlike AWS KMS's ReEncrypt, the plaintext DEK passes through this process
 * for that moment (it is wiped right after).
 *
 * Every request message carries two batch items: Get Attributes "State" of the master
 * key, then the Encrypt or Decrypt.  A key that is not Active (Deactivated,
 * Compromised, Destroyed, or still Pre-Active) is refused as KMS_ERR_DISABLED — the
 * same SQLSTATE as a disabled AWS key — even where a key manager would still decrypt
 * under a Deactivated key, and whatever error the key manager gave for the operation.
 *
 * Wrapped DEK, as stored:
 *
 *     0x01 | IV length (1 byte, 1..64) | IV | GCM tag (16) | AES-256-GCM ciphertext (32)
 *
 * with the key manager choosing the IV (Random IV) and the authenticated data
 *
 *     "pg_envelope kmip wrap v1" NUL | len(tenant) (4, big-endian) | tenant | version (4)
 *
 * so a wrapped DEK copied to another tenant or version does not unwrap.
 *
 * Secrets.  The DEK sits in: the Encrypt request buffer, the Decrypt response buffer,
 * OpenSSL's record buffers (SSL_OP_CLEANSE_PLAINTEXT, see kmip_conn.h) and the caller's
 * `dek`.  The client's private key sits in a buffer read from envelope.kmip_key_file.
 * Each of our buffers is wiped on every path.  Error messages are made of the operation,
 * the KMIP result reason, the key's state and our own sentences — never the server's
 * free text, which could echo a request.
 *
 * Retries: at most cfg->retries extra attempts, with jittered exponential backoff,
 * for failures another attempt can cure — no TCP connection, a connection closed or
 * reset, a timed-out attempt.  Never for TLS verification failures, a refused client
 * certificate, or any answer from the key manager.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include <openssl/rand.h>

#include "cipher.h"
#include "kmip_conn.h"
#include "kmip_msg.h"
#include "kms.h"

#define KMIP_WRAP_FORMAT	0x01
#define KMIP_IV_MAX			64
#define KMIP_UID_MAX		255
#define KMIP_KEY_PEM_MAX	16384
#define KMIP_REQUEST_MAX	4096
#define KMIP_MAX_RETRIES	10

static const char aad_label[] = "pg_envelope kmip wrap v1";

/* The connection settings of one call, with the private key read from its file. */
typedef struct KmipCallSettings
{
	KmipConnSettings conn;
	uint8_t		key_pem[KMIP_KEY_PEM_MAX];
} KmipCallSettings;

/* One call's response: the raw message (may hold a DEK) and what was read from it. */
typedef struct KmipCallResult
{
	uint8_t		buf[KMIP_MAX_RESPONSE];
	size_t		len;
	KmipResponse resp;
} KmipCallResult;

static const char *
op_name(uint32_t operation)
{
	return operation == KMIP_OP_ENCRYPT ? "Encrypt" : "Decrypt";
}

/* ---------------------------------------------------------------------------
 * Settings
 */

static KmsStatus
read_private_key(const KmsConfig *cfg, KmipCallSettings *cs, KmsError *err)
{
	int			fd;
	ssize_t		n;
	uint8_t		extra;

	if (cfg->kmip_key_file == NULL || cfg->kmip_key_file[0] == '\0')
		return kms_set_error(err, KMS_ERR_CONFIG, NULL, "envelope.kmip_key_file is not set");
	fd = kms_open_secret_file(cfg->kmip_key_file, "envelope.kmip_key_file", "KMIP client key file",
							  cfg->data_directory, err);
	if (fd < 0)
		return err->status;
	n = read(fd, cs->key_pem, sizeof(cs->key_pem));
	if (n == (ssize_t) sizeof(cs->key_pem) && read(fd, &extra, 1) > 0)
		n = -2;
	close(fd);
	if (n <= 0)
	{
		cipher_wipe(cs->key_pem, sizeof(cs->key_pem));
		return kms_set_error(err, KMS_ERR_CONFIG, NULL,
							 n == -2 ? "KMIP client key file \"%s\" is larger than 16 kB" :
							 "could not read KMIP client key file \"%s\"",
							 cfg->kmip_key_file);
	}
	cs->conn.key_pem = cs->key_pem;
	cs->conn.key_pem_len = (size_t) n;
	return KMS_OK;
}

static KmsStatus
load_settings(const KmsConfig *cfg, KmipCallSettings *cs, KmsError *err)
{
	memset(&cs->conn, 0, sizeof(cs->conn));
	if (cfg->kmip_host == NULL || cfg->kmip_host[0] == '\0')
		return kms_set_error(err, KMS_ERR_CONFIG, NULL, "envelope.kmip_host is not set");
	if (cfg->kmip_port < 1 || cfg->kmip_port > 65535)
		return kms_set_error(err, KMS_ERR_CONFIG, NULL, "envelope.kmip_port is not a TCP port");
	if (cfg->kmip_ca_file == NULL || cfg->kmip_ca_file[0] == '\0')
		return kms_set_error(err, KMS_ERR_CONFIG, NULL,
							 "envelope.kmip_ca_file is not set; the server's certificate must be verified");
	if (cfg->kmip_cert_file == NULL || cfg->kmip_cert_file[0] == '\0')
		return kms_set_error(err, KMS_ERR_CONFIG, NULL,
							 "envelope.kmip_cert_file is not set; KMIP servers require a client certificate");
	cs->conn.host = cfg->kmip_host;
	cs->conn.port = cfg->kmip_port;
	cs->conn.ca_file = cfg->kmip_ca_file;
	cs->conn.cert_file = cfg->kmip_cert_file;
	cs->conn.timeout_ms = cfg->timeout_ms;
	cs->conn.interrupted = cfg->interrupted;
	return read_private_key(cfg, cs, err);
}

/* A KMIP Unique Identifier: 1 to 255 printable ASCII characters. */
static KmsStatus
check_key_id(const char *key_id, KmsError *err)
{
	size_t		len = key_id ? strlen(key_id) : 0;

	if (len == 0)
		return kms_set_error(err, KMS_ERR_CONFIG, NULL,
							 "no master key given: set envelope.kms_key (or create_tenant's kms_key) to the Unique Identifier of an AES key on the KMIP server");
	if (len > KMIP_UID_MAX)
		return kms_set_error(err, KMS_ERR_CONFIG, NULL, "a KMIP Unique Identifier is at most %d bytes",
							 KMIP_UID_MAX);
	for (size_t i = 0; i < len; i++)
		if (key_id[i] < 0x20 || key_id[i] > 0x7e)
			return kms_set_error(err, KMS_ERR_CONFIG, NULL,
								 "a KMIP Unique Identifier must be printable ASCII");
	return KMS_OK;
}

/* ---------------------------------------------------------------------------
 * Retries (paced by kms_backoff_ms and kms_sleep_interruptible, as every provider's)
 */

static KmsStatus
io_status(KmipIoStatus st, bool *retryable)
{
	*retryable = false;
	switch (st)
	{
		case KMIP_IO_OK:
			return KMS_OK;
		case KMIP_IO_CONFIG:
			return KMS_ERR_CONFIG;
		case KMIP_IO_CONNECT:
		case KMIP_IO_CLOSED:
			*retryable = true;
			return KMS_ERR_UNAVAILABLE;
		case KMIP_IO_TIMEOUT:
			*retryable = true;
			return KMS_ERR_TIMEOUT;
		case KMIP_IO_SERVER_CERT:
		case KMIP_IO_TLS:
			return KMS_ERR_UNAVAILABLE;
		case KMIP_IO_CLIENT_REFUSED:
			return KMS_ERR_CREDENTIALS;
		case KMIP_IO_CANCELED:
			return KMS_ERR_CANCELED;
		case KMIP_IO_PROTOCOL:
			return KMS_ERR_PROTOCOL;
		case KMIP_IO_INTERNAL:
			return KMS_ERR_INTERNAL;
	}
	return KMS_ERR_INTERNAL;
}

/* Send `req` with retries; on KMS_OK the response is in `out`. */
static KmsStatus
roundtrip_with_retries(const KmsConfig *cfg, const KmipCallSettings *cs, uint32_t operation,
					   const uint8_t *req, size_t req_len, KmipCallResult *out, KmsError *err)
{
	int			retries = cfg->retries < 0 ? 0 :
		cfg->retries > KMIP_MAX_RETRIES ? KMIP_MAX_RETRIES : cfg->retries;
	char		detail[200];
	KmsStatus	status;
	int			attempts = 0;

	for (;;)
	{
		bool		reused;
		bool		retryable;
		KmipIoStatus io;

		if (cfg->interrupted && cfg->interrupted())
		{
			status = KMS_ERR_CANCELED;
			snprintf(detail, sizeof(detail), "request canceled");
			break;
		}
		if (!kms_before_request(cfg))
		{
			status = KMS_ERR_CANCELED;
			snprintf(detail, sizeof(detail), "request canceled");
			break;
		}
		attempts++;
		io = kmip_conn_roundtrip(&cs->conn, req, req_len, out->buf, sizeof(out->buf),
								 &out->len, &reused, detail, sizeof(detail));
		status = io_status(io, &retryable);
		/* KMIP defines no throttling answer: every response counts as a plain one */
		if (io == KMIP_IO_OK)
			kms_after_answer(cfg, false);
		if (io == KMIP_IO_CONFIG)
			attempts--;			/* the TLS files failed to load: nothing was sent */
		if (status == KMS_OK || !retryable || attempts > retries)
			break;
		if (!kms_sleep_interruptible(cfg, kms_backoff_ms(attempts - 1)))
		{
			status = KMS_ERR_CANCELED;
			snprintf(detail, sizeof(detail), "request canceled");
			break;
		}
	}
	err->attempts = attempts;
	if (status == KMS_OK)
		return KMS_OK;
	if (attempts > 1)
		return kms_set_error(err, status, NULL, "KMIP %s failed: %s, after %d attempts",
							 op_name(operation), detail, attempts);
	return kms_set_error(err, status, NULL, "KMIP %s failed: %s", op_name(operation), detail);
}

/* ---------------------------------------------------------------------------
 * One operation: request, answer, state check
 */

/*
 * The error of a failed batch item: `what` names its operation ("Get Attributes",
 * "Encrypt", "Decrypt").
 */
static KmsStatus
result_error(const KmipBatchResult *r, const char *what, const char *key_id, KmsError *err)
{
	const char *reason = kmip_reason_name(r->result_reason);
	KmsStatus	status;

	switch (r->result_reason)
	{
		case KMIP_REASON_ITEM_NOT_FOUND:
			return kms_set_error(err, KMS_ERR_NOT_FOUND, reason,
								 "KMIP %s failed: the KMIP server has no key \"%s\"", what, key_id);
		case KMIP_REASON_AUTHENTICATION_NOT_SUCCESSFUL:
			status = KMS_ERR_CREDENTIALS;
			break;
		case KMIP_REASON_PERMISSION_DENIED:
			status = KMS_ERR_ACCESS_DENIED;
			break;
		case KMIP_REASON_CRYPTOGRAPHIC_FAILURE:
		case KMIP_REASON_GENERAL_FAILURE:

			/*
			 * A wrong tag (another tenant's or version's wrapped key) is Cryptographic
			 * Failure by the specification; PyKMIP reports General Failure.
			 */
			if (strcmp(what, "Decrypt") == 0)
				return kms_set_error(err, KMS_ERR_INVALID_CIPHERTEXT, reason,
									 "KMIP Decrypt failed (%s): the wrapped data key does not unwrap under key \"%s\" for this tenant and version",
									 reason, key_id);
			status = KMS_ERR_UNAVAILABLE;
			break;
		case KMIP_REASON_INVALID_MESSAGE:
		case KMIP_REASON_INVALID_FIELD:
		case KMIP_REASON_OPERATION_NOT_SUPPORTED:
		case KMIP_REASON_FEATURE_NOT_SUPPORTED:
			return kms_set_error(err, KMS_ERR_PROTOCOL, reason,
								 "KMIP %s failed (%s): the server must support KMIP 1.4 %s with AES-GCM and authenticated data",
								 what, reason, what);
		default:
			status = KMS_ERR_UNAVAILABLE;
			break;
	}
	return kms_set_error(err, status, reason, "KMIP %s under key \"%s\" failed: %s",
						 what, key_id, reason);
}

/* The state item must say Active; anything else refuses the key. */
static KmsStatus
check_state(const KmipResponse *resp, const char *key_id, KmsError *err)
{
	const KmipBatchResult *r = &resp->state;
	uint32_t	state;

	if (!r->present)
		return kms_set_error(err, KMS_ERR_PROTOCOL, NULL,
							 "the KMIP server did not answer the key state query");
	if (r->result_status != KMIP_STATUS_SUCCESS)
		return result_error(r, "Get Attributes", key_id, err);
	if (!r->has_payload || !kmip_payload_state(&r->payload, &state))
		return kms_set_error(err, KMS_ERR_PROTOCOL, NULL,
							 "the KMIP server did not report the state of key \"%s\"", key_id);
	if (state != KMIP_STATE_ACTIVE)
		return kms_set_error(err, KMS_ERR_DISABLED, kmip_state_name(state),
							 "master key \"%s\" is %s on the KMIP server", key_id,
							 kmip_state_name(state));
	return KMS_OK;
}

/*
 * Run Encrypt or Decrypt under `key_id`.  On KMS_OK, out->resp.crypto has a successful
 * payload for the key that was asked for.  The request buffer (which holds the DEK for
 * an Encrypt) is wiped here; `out` is the caller's to wipe.
 */
static KmsStatus
kmip_operation(const KmsConfig *cfg, uint32_t operation, const char *key_id,
			   KmipCryptoRequest *creq, KmipCallResult *out, KmsError *err)
{
	KmipCallSettings cs;
	uint8_t		req[KMIP_REQUEST_MAX];
	size_t		req_len = 0;
	TtlvItem	msg;
	TtlvStatus	ts;
	char		why[128];
	KmsStatus	status;

	memset(out, 0, sizeof(*out));
	status = check_key_id(key_id, err);
	if (status == KMS_OK)
		status = load_settings(cfg, &cs, err);
	if (status != KMS_OK)
		return status;

	creq->unique_identifier = key_id;
	if (!kmip_build_crypto_request(operation, creq, req, sizeof(req), &req_len))
		status = kms_set_error(err, KMS_ERR_INTERNAL, NULL, "the KMIP %s request does not fit",
							   op_name(operation));
	else
		status = roundtrip_with_retries(cfg, &cs, operation, req, req_len, out, err);
	cipher_wipe(req, sizeof(req));
	cipher_wipe(cs.key_pem, sizeof(cs.key_pem));
	if (status != KMS_OK)
		return status;

	ts = ttlv_parse(out->buf, out->len, &msg);
	if (ts != TTLV_OK)
		return kms_set_error(err, KMS_ERR_PROTOCOL, NULL, "the KMIP server's answer is malformed: %s",
							 ttlv_status_message(ts));
	if (!kmip_read_response(&msg, &out->resp, why, sizeof(why)))
		return kms_set_error(err, KMS_ERR_PROTOCOL, NULL, "KMIP %s failed: %s", op_name(operation), why);

	status = check_state(&out->resp, key_id, err);
	if (status != KMS_OK)
		return status;
	if (!out->resp.crypto.present)
		return kms_set_error(err, KMS_ERR_PROTOCOL, NULL, "the KMIP server did not answer the %s",
							 op_name(operation));
	if (out->resp.crypto.result_status != KMIP_STATUS_SUCCESS)
		return result_error(&out->resp.crypto, op_name(operation), key_id, err);
	if (!out->resp.crypto.has_payload || !kmip_payload_uid_is(&out->resp.crypto.payload, key_id))
		return kms_set_error(err, KMS_ERR_PROTOCOL, NULL,
							 "the KMIP server's %s answer does not name key \"%s\"",
							 op_name(operation), key_id);
	return KMS_OK;
}

/* ---------------------------------------------------------------------------
 * Wrapping
 */

/* label || len(tenant) || tenant || version; at most 24 + 1 + 4 + 255 + 4 bytes. */
static size_t
build_aad(const KmsEncryptionContext *ec, uint8_t *aad, size_t cap)
{
	size_t		tenant_len = strlen(ec->tenant);
	size_t		pos = sizeof(aad_label);
	uint32_t	v = ec->version;

	if (pos + 4 + tenant_len + 4 > cap)
		return 0;
	memcpy(aad, aad_label, sizeof(aad_label));
	aad[pos++] = (uint8_t) (tenant_len >> 24);
	aad[pos++] = (uint8_t) (tenant_len >> 16);
	aad[pos++] = (uint8_t) (tenant_len >> 8);
	aad[pos++] = (uint8_t) tenant_len;
	memcpy(aad + pos, ec->tenant, tenant_len);
	pos += tenant_len;
	aad[pos++] = (uint8_t) (v >> 24);
	aad[pos++] = (uint8_t) (v >> 16);
	aad[pos++] = (uint8_t) (v >> 8);
	aad[pos++] = (uint8_t) v;
	return pos;
}

/* Wrap `dek` under `key_id` into `wrapped`. */
static KmsStatus
wrap_dek(const KmsConfig *cfg, const char *key_id, const KmsEncryptionContext *ec,
		 const uint8_t dek[KMS_DEK_LEN], uint8_t *wrapped, size_t *wrapped_len, KmsError *err)
{
	KmipCallResult *res = malloc(sizeof(KmipCallResult));
	KmipCryptoRequest creq;
	uint8_t		aad[512];
	const uint8_t *ct,
			   *iv,
			   *tag;
	size_t		ct_len,
				iv_len,
				tag_len;
	KmsStatus	status;

	if (res == NULL)
		return kms_set_error(err, KMS_ERR_INTERNAL, NULL, "out of memory");
	memset(&creq, 0, sizeof(creq));
	creq.data = dek;
	creq.data_len = KMS_DEK_LEN;
	creq.aad = aad;
	creq.aad_len = build_aad(ec, aad, sizeof(aad));
	if (creq.aad_len == 0)
		status = kms_set_error(err, KMS_ERR_INTERNAL, NULL, "tenant name too long for the KMIP context");
	else
		status = kmip_operation(cfg, KMIP_OP_ENCRYPT, key_id, &creq, res, err);
	if (status == KMS_OK &&
		!kmip_payload_encrypted(&res->resp.crypto.payload, &ct, &ct_len, &iv, &iv_len, &tag, &tag_len))
		status = kms_set_error(err, KMS_ERR_PROTOCOL, NULL,
							   "the KMIP Encrypt answer lacks the ciphertext, IV or tag (the server must speak KMIP 1.4)");
	if (status == KMS_OK &&
		(ct_len != KMS_DEK_LEN || tag_len != KMIP_GCM_TAG_LEN || iv_len == 0 || iv_len > KMIP_IV_MAX))
		status = kms_set_error(err, KMS_ERR_PROTOCOL, NULL,
							   "the KMIP Encrypt answer has a ciphertext of %zu, an IV of %zu or a tag of %zu bytes",
							   ct_len, iv_len, tag_len);
	if (status == KMS_OK)
	{
		size_t		pos = 0;

		wrapped[pos++] = KMIP_WRAP_FORMAT;
		wrapped[pos++] = (uint8_t) iv_len;
		memcpy(wrapped + pos, iv, iv_len);
		pos += iv_len;
		memcpy(wrapped + pos, tag, KMIP_GCM_TAG_LEN);
		pos += KMIP_GCM_TAG_LEN;
		memcpy(wrapped + pos, ct, KMS_DEK_LEN);
		pos += KMS_DEK_LEN;
		*wrapped_len = pos;
	}
	cipher_wipe(res, sizeof(*res));
	free(res);
	return status;
}

static KmsStatus
unwrap_dek(const KmsConfig *cfg, const char *key_id, const KmsEncryptionContext *ec,
		   const uint8_t *wrapped, size_t wrapped_len, uint8_t dek[KMS_DEK_LEN], KmsError *err)
{
	KmipCallResult *res;
	KmipCryptoRequest creq;
	uint8_t		aad[512];
	const uint8_t *pt;
	size_t		pt_len;
	size_t		iv_len;
	KmsStatus	status;

	if (wrapped_len < 2 || wrapped[0] != KMIP_WRAP_FORMAT ||
		(iv_len = wrapped[1]) == 0 || iv_len > KMIP_IV_MAX ||
		wrapped_len != 2 + iv_len + KMIP_GCM_TAG_LEN + KMS_DEK_LEN)
		return kms_set_error(err, KMS_ERR_INVALID_CIPHERTEXT, NULL,
							 "the wrapped data key is not in the kmip provider's format");
	res = malloc(sizeof(KmipCallResult));
	if (res == NULL)
		return kms_set_error(err, KMS_ERR_INTERNAL, NULL, "out of memory");
	memset(&creq, 0, sizeof(creq));
	creq.iv = wrapped + 2;
	creq.iv_len = iv_len;
	creq.tag = wrapped + 2 + iv_len;
	creq.data = wrapped + 2 + iv_len + KMIP_GCM_TAG_LEN;
	creq.data_len = KMS_DEK_LEN;
	creq.aad = aad;
	creq.aad_len = build_aad(ec, aad, sizeof(aad));
	if (creq.aad_len == 0)
		status = kms_set_error(err, KMS_ERR_INTERNAL, NULL, "tenant name too long for the KMIP context");
	else
		status = kmip_operation(cfg, KMIP_OP_DECRYPT, key_id, &creq, res, err);
	if (status == KMS_OK &&
		(!kmip_payload_decrypted(&res->resp.crypto.payload, &pt, &pt_len) || pt_len != KMS_DEK_LEN))
		status = kms_set_error(err, KMS_ERR_PROTOCOL, NULL,
							   "the KMIP Decrypt answer does not hold a 32-byte data key");
	if (status == KMS_OK)
		memcpy(dek, pt, KMS_DEK_LEN);
	cipher_wipe(res, sizeof(*res));
	free(res);
	return status;
}

/* ---------------------------------------------------------------------------
 * The provider
 */

static KmsStatus
kmip_generate_data_key(const KmsConfig *cfg, const char *key_id,
					   const KmsEncryptionContext *ec, uint8_t dek[KMS_DEK_LEN],
					   uint8_t *wrapped, size_t *wrapped_len, char *key_arn, KmsError *err)
{
	KmsStatus	status = KMS_OK;

	/* up to 256 bytes, getrandom returns all of them or fails: no short reads */
	if (getrandom(dek, KMS_DEK_LEN, 0) != KMS_DEK_LEN)
		status = kms_set_error(err, KMS_ERR_INTERNAL, NULL, "the OS random number generator failed");
	if (status == KMS_OK)
		status = wrap_dek(cfg, key_id, ec, dek, wrapped, wrapped_len, err);
	if (status == KMS_OK)
		snprintf(key_arn, KMS_KEY_ID_MAX, "%s", key_id);
	else
		cipher_wipe(dek, KMS_DEK_LEN);
	return status;
}

static KmsStatus
kmip_decrypt(const KmsConfig *cfg, const char *key_id, const KmsEncryptionContext *ec,
			 const uint8_t *wrapped, size_t wrapped_len, uint8_t dek[KMS_DEK_LEN], KmsError *err)
{
	KmsStatus	status = unwrap_dek(cfg, key_id, ec, wrapped, wrapped_len, dek, err);

	if (status != KMS_OK)
		cipher_wipe(dek, KMS_DEK_LEN);
	return status;
}

/*
 * KMIP has no ReEncrypt: Decrypt under the source key, Encrypt under the destination.
 * The DEK is in this process only between the two calls, in a stack buffer wiped
 * before returning.
 */
static KmsStatus
kmip_reencrypt(const KmsConfig *cfg, const char *source_key_id, const char *dest_key_id,
			   const KmsEncryptionContext *ec, const uint8_t *wrapped, size_t wrapped_len,
			   uint8_t *new_wrapped, size_t *new_wrapped_len, char *dest_key_arn, KmsError *err)
{
	uint8_t		dek[KMS_DEK_LEN];
	KmsStatus	status;

	status = unwrap_dek(cfg, source_key_id, ec, wrapped, wrapped_len, dek, err);
	if (status == KMS_OK)
		status = wrap_dek(cfg, dest_key_id, ec, dek, new_wrapped, new_wrapped_len, err);
	if (status == KMS_OK)
		snprintf(dest_key_arn, KMS_KEY_ID_MAX, "%s", dest_key_id);
	cipher_wipe(dek, sizeof(dek));
	return status;
}

const KmsProvider kms_kmip_provider = {
	.api_version = KMS_PROVIDER_API_VERSION,
	.name = "kmip",
	.generate_data_key = kmip_generate_data_key,
	.decrypt = kmip_decrypt,
	.reencrypt = kmip_reencrypt,
};
