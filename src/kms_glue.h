/*
 * kms_glue.h — calls into a KMS provider from a backend (kms_glue.c): a provider's
 * status becomes an ereport here, and only here; calls are counted and timed.
 *
 * No function here may be called with an LWLock held: each may wait on the network for
 * up to envelope.kms_timeout per attempt.  A cancel or statement_timeout interrupts
 * the call and is raised as PostgreSQL's own cancel.
 */
#ifndef PG_ENVELOPE_KMS_GLUE_H
#define PG_ENVELOPE_KMS_GLUE_H

#include "compat.h"

#include "kms.h"

typedef enum EnvelopeKmsOp
{
	ENVELOPE_KMS_GENERATE = 0,
	ENVELOPE_KMS_DECRYPT,
	ENVELOPE_KMS_REENCRYPT,
	ENVELOPE_KMS_NOPS
} EnvelopeKmsOp;

/* Calls made, by all backends together (by this backend alone without preload). */
typedef struct KmsCallStats
{
	int64		calls[ENVELOPE_KMS_NOPS];
	int64		errors;
	double		total_ms;
	double		max_ms;
} KmsCallStats;

/* Reserve, then attach, the shared counters (from the shmem request/startup hooks). */
extern void kms_glue_shmem_request(void);
extern void kms_glue_shmem_startup(void);

/* A consistent copy of the counters. */
extern void kms_glue_get_stats(KmsCallStats *out);

/*
 * A new DEK for (tenant, version) under `kms_key`: its plaintext into `dek` (wiped on
 * error), its wrapped form and the canonical id of the master key, palloc'd.
 */
extern void envelope_kms_generate(const char *provider, const char *kms_key,
								  const char *tenant, uint32 version,
								  uint8 dek[KMS_DEK_LEN], bytea **wrapped, char **key_arn);

/* Unwrap a stored DEK of (tenant, version) into `dek` (wiped on error). */
extern void envelope_kms_decrypt(const char *provider, const char *kms_key,
								 const char *tenant, uint32 version,
								 const bytea *wrapped, uint8 dek[KMS_DEK_LEN]);

/*
 * Re-wrap a stored DEK under `dest_key` inside the KMS (the DEK never reaches this
 * process); returns the new wrapped form and the canonical id of `dest_key`.
 */
extern bytea *envelope_kms_reencrypt(const char *provider, const char *source_key,
									 const char *dest_key, const char *tenant,
									 uint32 version, const bytea *wrapped,
									 char **dest_key_arn);

/* One stored DEK to re-wrap with envelope_kms_reencrypt_many: what goes in and out. */
typedef struct EnvelopeRewrap
{
	const char *provider;
	const char *source_key;
	const char *tenant;
	uint32		version;
	const bytea *wrapped;
	bytea	   *new_wrapped;	/* out, palloc'd */
	char	   *dest_key_arn;	/* out, palloc'd: the canonical id of dest_key */
} EnvelopeRewrap;

/*
 * envelope_kms_reencrypt for each of the `n` DEKs, all to `dest_key`: a provider that
 * can (aws) gets its DEKs as one batch with up to envelope.kms_max_concurrent_requests
 * requests in flight, the others one request after another.  Every DEK is tried; then
 * a cancel is raised as such, or else the error of the first DEK that failed, as
 * envelope_kms_reencrypt would have raised it.
 */
extern void envelope_kms_reencrypt_many(EnvelopeRewrap *keys, int n, const char *dest_key);

/*
 * Unwrap a stored DEK only to see whether the KMS still allows it, for the background
 * worker (no database, no ereport): `tenant_utf8` is already UTF-8, `interrupted`
 * stops the call (shutdown).  Returns the status with *err filled; the plaintext is
 * wiped before returning.  Counted as a Decrypt.
 */
extern KmsStatus envelope_kms_check_decrypt(const char *provider, const char *kms_key,
											const char *tenant_utf8, uint32 version,
											const uint8 *wrapped, size_t wrapped_len,
											bool (*interrupted) (void), KmsError *err);

/* The settings a provider call gets (for envelope.check). */
extern void envelope_kms_config(KmsConfig *cfg);

/*
 * One data key made under `kms_key` and thrown away (wiped), for envelope.check():
 * returns the status with *err filled instead of raising.
 */
extern KmsStatus envelope_kms_probe(const char *provider, const char *kms_key, KmsError *err);

#endif							/* PG_ENVELOPE_KMS_GLUE_H */
