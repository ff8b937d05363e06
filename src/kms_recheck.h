/*
 * kms_recheck.h — bounded revocation from the KMS side (kms_recheck.c): the master
 * keys whose data keys are cached, and the background worker's periodic proof that
 * each of them still works.
 *
 * Backends note every master key they unwrap (or generate) a DEK under, with that
 * wrapped DEK as a sample; the worker asks the KMS, once per key per
 * envelope.kms_recheck_interval, to Decrypt the sample.  A refusal (disabled, pending
 * deletion, not found, access denied, a ciphertext the key no longer opens) makes the
 * worker evict every cached DEK under that key (the callback below), so decryption
 * stops within one interval and one KMS round trip of the revocation.
 */
#ifndef PG_ENVELOPE_KMS_RECHECK_H
#define PG_ENVELOPE_KMS_RECHECK_H

#include "compat.h"

#include "kms.h"

/* Master keys tracked at once; DEKs under a key beyond this are evicted on any refusal. */
#define KMS_RECHECK_MAX_KEYS 128

/* No slot: the key could not be tracked (table full, or no shared memory). */
#define KMS_RECHECK_NO_SLOT (-1)

/* Reserve, then create or attach, the shared table (shmem request/startup hooks). */
extern void kms_recheck_shmem_request(void);
extern void kms_recheck_shmem_startup(void);

/*
 * A DEK of (tenant, version), wrapped as `wrapped`, was just unwrapped or generated
 * under master key `key_id` of `provider`: track the key, keep this wrapped DEK as its
 * sample.  Returns the key's slot (KMS_RECHECK_NO_SLOT if it cannot be tracked).  No
 * I/O; a short exclusive lock of the table.
 */
extern int	kms_recheck_track(const char *provider, const char *key_id, const char *tenant,
							  uint32 version, const uint8 *wrapped, size_t wrapped_len);

/* Called by the worker for a master key the KMS refused (slot, whether it just began). */
typedef void (*KmsRefusedCallback) (int slot, bool newly_refused);

/*
 * The worker's step: re-check every tracked key that is due, one KMS call each, never
 * under a lock; `interrupted` stops a call in flight (shutdown).  Forgets keys under
 * which nothing has been loaded for `idle_after_ms`.  Returns the milliseconds until
 * the next key is due (-1: none tracked or rechecks are off).
 */
extern long kms_recheck_run(KmsRefusedCallback on_refused, bool (*interrupted) (void),
							long idle_after_ms);

/* What envelope.check() shows of the re-checks (strings palloc'd, never NULL). */
typedef struct KmsRecheckStatus
{
	bool		available;		/* the shared table exists (preload) */
	int			tracked;		/* master keys in the table */
	int			refused;		/* of which the KMS refused at their latest answered
								 * re-check, with no DEK unwrapped under them since */
	char	   *refused_keys;	/* their ids, quoted, comma-separated (the first few) */
	int64		checks;			/* re-checks that got an answer from the KMS */
	int64		refusals;		/* of which refusals */
	int64		unanswered;		/* re-checks that got none (unreachable, throttled) */
	double		seconds_since_check;	/* -1: none yet */
	KmsStatus	last_status;	/* of the latest re-check */
	char	   *last_key;		/* its master key, "" if none */
	char	   *last_error;		/* its error type or status name, "" if ok */
	int64		untracked;		/* notes of a key that found the table full */
	double		seconds_since_untracked;	/* -1: never */
} KmsRecheckStatus;

extern void kms_recheck_get_status(KmsRecheckStatus *out);

#endif							/* PG_ENVELOPE_KMS_RECHECK_H */
