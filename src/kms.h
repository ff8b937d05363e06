/*
 * kms.h — the KMS provider interface.
 *
 * A provider makes, unwraps and re-wraps data keys (DEKs) under a master key that it
 * never reveals.  Every call carries an encryption context (tenant, DEK version) that
 * the provider binds to the wrapped key, so a wrapped DEK copied to another tenant or
 * version fails to unwrap.
 *
 * This layer is plain C: no postgres.h, no ereport.  Providers return a KmsStatus and
 * fill a KmsError; src/kms_glue.c turns that into exactly one ereport.  Buffers are the
 * caller's, so a provider never allocates memory that outlives the call and every copy
 * of a key is the caller's to wipe.
 *
 * Adding a provider means one new file that defines a `const KmsProvider` and one line
 * in kms_registry.c.
 */
#ifndef PG_ENVELOPE_KMS_H
#define PG_ENVELOPE_KMS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define KMS_PROVIDER_API_VERSION 1

/* A DEK is an AES-256 key. */
#define KMS_DEK_LEN 32

/* AWS KMS ciphertext blobs are at most 6144 bytes; no provider may exceed it. */
#define KMS_WRAPPED_MAX 6144

/* Room for a KMS key ARN (AWS caps ARNs at 2048) in KmsError and outputs. */
#define KMS_KEY_ID_MAX 2048

typedef enum KmsStatus
{
	KMS_OK = 0,
	KMS_ERR_CONFIG,				/* provider not usable as configured (file, region, key id) */
	KMS_ERR_CREDENTIALS,		/* no credentials found, or they were refused/expired */
	KMS_ERR_ACCESS_DENIED,		/* credentials fine, but not allowed to use this key */
	KMS_ERR_NOT_FOUND,			/* master key does not exist */
	KMS_ERR_DISABLED,			/* master key disabled or pending deletion */
	KMS_ERR_INVALID_CIPHERTEXT, /* wrapped DEK does not unwrap under this key/context */
	KMS_ERR_THROTTLED,			/* rate-limited, still after all retries */
	KMS_ERR_UNAVAILABLE,		/* network failure or 5xx, still after all retries */
	KMS_ERR_TIMEOUT,			/* no answer within the configured timeout */
	KMS_ERR_CANCELED,			/* the interrupt callback asked to stop */
	KMS_ERR_PROTOCOL,			/* the answer made no sense (garbage, wrong size, wrong key) */
	KMS_ERR_INTERNAL,			/* out of memory, library failure */
	KMS_ERR_WRONG_REGION		/* a single-Region master key of another region than the
								 * configured one: only a multi-Region key has a replica here */
} KmsStatus;

/* What the KMS binds to every wrapped DEK, and logs in its audit trail. */
typedef struct KmsEncryptionContext
{
	const char *tenant;			/* NUL-terminated, validated by the caller */
	uint32_t	version;		/* DEK version, >= 1 */
} KmsEncryptionContext;

/*
 * Settings the SQL layer hands down on each call (from the envelope.* GUCs).  Strings
 * may be NULL or empty when unset.
 */
typedef struct KmsConfig KmsConfig;

struct KmsConfig
{
	const char *local_master_key_file;	/* local provider */
	const char *data_directory; /* refuse key files inside it */
	const char *aws_region;
	const char *aws_endpoint;	/* e.g. http://127.0.0.1:5000 for tests, VPC endpoints */
	bool		aws_use_fips_endpoint;	/* kms-fips.<region> when no endpoint is set */
	const char *aws_profile;
	const char *kmip_host;		/* kmip provider: server, port, TLS files */
	int			kmip_port;
	const char *kmip_ca_file;
	const char *kmip_cert_file;
	const char *kmip_key_file;
	int			timeout_ms;		/* per request */
	int			retries;		/* extra attempts on throttling/5xx/network only */

	/*
	 * Polled during any blocking I/O; returns true when the caller wants the call
	 * abandoned (query cancel, statement_timeout, shutdown).  May be NULL.
	 */
	bool		(*interrupted) (void);

	/*
	 * The cluster-wide request rate limit (kms_rate.c), for providers that send
	 * requests: kms_before_request and kms_after_answer below call these, either of
	 * which may be NULL (no limit).
	 */
	bool		(*await_request_slot) (const struct KmsConfig *cfg);
	void		(*note_answer) (bool throttled);
};

/*
 * The error of a failed call.  Nothing here may ever contain key bytes, a response
 * body, a header or a credential: `message` is a short human sentence built by the
 * provider from known-safe parts.
 */
typedef struct KmsError
{
	KmsStatus	status;
	char		error_type[64];	/* e.g. "AccessDeniedException"; "" if none */
	char		message[256];
	int			http_status;	/* 0 if none */
	int			attempts;		/* requests actually sent */
} KmsError;

/*
 * One DEK of a re-wrap batch (KmsProvider.reencrypt_many): what reencrypt takes, room
 * for what it gives back, and the item's own outcome.
 */
typedef struct KmsRewrapItem
{
	const char *source_key_id;	/* the master key recorded with the DEK */
	KmsEncryptionContext ec;
	const uint8_t *wrapped;
	size_t		wrapped_len;
	uint8_t    *new_wrapped;	/* room for KMS_WRAPPED_MAX bytes */
	size_t		new_wrapped_len;
	char	   *dest_key_arn;	/* room for KMS_KEY_ID_MAX bytes */
	KmsError	err;			/* status KMS_OK, or why this DEK was not re-wrapped */
} KmsRewrapItem;

typedef struct KmsProvider
{
	int			api_version;	/* KMS_PROVIDER_API_VERSION */
	const char *name;			/* value of envelope.kms_provider */

	/*
	 * Ask the KMS for a new DEK under master key `key_id`.  On success `dek` holds the
	 * plaintext key (caller wipes it) and `wrapped`/`*wrapped_len` the wrapped form to
	 * store.  `key_arn` (size KMS_KEY_ID_MAX) receives the canonical id of the master
	 * key the KMS used, to be recorded with the DEK.
	 */
	KmsStatus	(*generate_data_key) (const KmsConfig *cfg, const char *key_id,
									  const KmsEncryptionContext *ec,
									  uint8_t dek[KMS_DEK_LEN],
									  uint8_t *wrapped, size_t *wrapped_len,
									  char *key_arn, KmsError *err);

	/* Unwrap a stored DEK.  `key_id` is the master key recorded with it. */
	KmsStatus	(*decrypt) (const KmsConfig *cfg, const char *key_id,
							const KmsEncryptionContext *ec,
							const uint8_t *wrapped, size_t wrapped_len,
							uint8_t dek[KMS_DEK_LEN], KmsError *err);

	/*
	 * Re-wrap a stored DEK from `source_key_id` to `dest_key_id` without the plaintext
	 * DEK ever leaving the KMS.  `new_wrapped` has room for KMS_WRAPPED_MAX bytes;
	 * `dest_key_arn` (size KMS_KEY_ID_MAX) receives the canonical id used.
	 */
	KmsStatus	(*reencrypt) (const KmsConfig *cfg, const char *source_key_id,
							  const char *dest_key_id,
							  const KmsEncryptionContext *ec,
							  const uint8_t *wrapped, size_t wrapped_len,
							  uint8_t *new_wrapped, size_t *new_wrapped_len,
							  char *dest_key_arn, KmsError *err);

	/*
	 * Optional (NULL: callers call reencrypt for each DEK in turn).  reencrypt for
	 * every item, to the same `dest_key_id`, with up to `max_in_flight` requests to
	 * the KMS at once; retries and error classification per item as reencrypt's.
	 * Returns KMS_OK when every item succeeded, otherwise the status of the first item
	 * that did not (each item's err says how it went).  After a cancel, the items not
	 * done have KMS_ERR_CANCELED.
	 */
	KmsStatus	(*reencrypt_many) (const KmsConfig *cfg, const char *dest_key_id,
								   KmsRewrapItem *items, int nitems, int max_in_flight);
} KmsProvider;

/* kms_registry.c */
extern const KmsProvider *kms_find_provider(const char *name);
extern const char *kms_provider_names(void);	/* "aws, kmip, local", for hints */
extern const char *kms_status_name(KmsStatus status);

/*
 * Open a file that holds a secret (a master key, a TLS private key) for reading, after
 * checking that it is a regular file, not a symlink, unreadable by group and others,
 * and outside `data_directory` (so base backups never carry it).  Returns the file
 * descriptor, or -1 with *err filled (KMS_ERR_CONFIG; `setting` and `what` name the
 * setting and the file in the message).
 */
extern int	kms_open_secret_file(const char *path, const char *setting, const char *what,
								 const char *data_directory, KmsError *err);

/*
 * The retry pause of every provider: full jitter, uniform in [0, min(2 s, 50 ms *
 * 2^retry)], and a sleep that polls cfg->interrupted every 10 ms (false when it asked
 * to stop).
 */
extern int	kms_backoff_ms(int retry);
extern bool kms_sleep_interruptible(const KmsConfig *cfg, int ms);

/*
 * Every request a provider sends, retries included, goes through these: before it,
 * kms_before_request waits for the rate limit (false: interrupted while waiting, so
 * send nothing and return KMS_ERR_CANCELED); after an answer (an HTTP status, a KMIP
 * response), kms_after_answer says whether it was a throttling error.
 */
extern bool kms_before_request(const KmsConfig *cfg);
extern void kms_after_answer(const KmsConfig *cfg, bool throttled);

/* Fill *err; `fmt` must never be given a secret. */
extern KmsStatus kms_set_error(KmsError *err, KmsStatus status, const char *error_type,
							   const char *fmt,...)
			__attribute__((format(printf, 4, 5)));

#endif							/* PG_ENVELOPE_KMS_H */
