/*
 * keycache.h — the key cache: plaintext DEKs and tenant states in shared memory
 * (keycache_shared.c) and ready cipher contexts in each backend (keycache.c).
 *
 * What it promises: a key handed out belongs to a tenant that was active, and to a
 * version that was active, at the latest key store generation this backend has seen;
 * a revocation committed by any session is seen by every backend's next row.  A DEK
 * is unwrapped by the KMS once per cluster (single-flight), and every copy of it is
 * zeroed when it is evicted, expires, is flushed or revoked.
 */
#ifndef PG_ENVELOPE_KEYCACHE_H
#define PG_ENVELOPE_KEYCACHE_H

#include "compat.h"

#include "cipher.h"
#include "kms.h"

struct EncryptionBudget;

/* A key ready for encrypting, with the version new values carry. */
typedef struct EnvelopeKeyRef
{
	const CipherKey *key;
	uint32		version;
	int32		tenant_id;		/* names the key with version (encryption counts) */
	/*
	 * This backend's encryption count of the key (encryption_count.c), kept beside the
	 * key's contexts so the row path finds it without a lookup (for a tenant served
	 * by the first level's transient entry, in a slot of its tenant id that other
	 * tenants may share: check the key it carries); NULL until set, and valid only
	 * until the next call into the key cache.
	 */
	struct EncryptionBudget **budget;
} EnvelopeKeyRef;

typedef struct KeyCacheStats
{
	int64		capacity;		/* DEKs the shared cache holds (per-backend tenants without preload) */
	int64		entries;		/* DEKs cached now */
	int64		tenant_entries; /* tenant states held */
	int64		hits;			/* lookups that reached shared memory and found the DEK */
	int64		misses;
	int64		evictions;		/* DEKs removed to make room, or expired */
	int64		evicted_reloads;	/* unwrapped again within cache_ttl of an eviction */
	int64		graced_loads;	/* KMS unreachable: an expired key served (cache_grace) */
	bool		shared;			/* false without shared_preload_libraries */
} KeyCacheStats;

/* Reserve, then create or attach, the shared cache (shmem request/startup hooks). */
extern void keycache_shmem_request(void);
extern void keycache_shmem_startup(void);

/* Register this process's transaction and invalidation callbacks (once). */
extern void keycache_init_backend(void);

/*
 * The key new values of `tenant` are encrypted with, and its version; raises an error
 * if the tenant does not exist or is not active, or (42501) if current_user may not use
 * its keys (tenant_access.h).
 */
extern EnvelopeKeyRef keycache_key_for_encrypt(const char *tenant, size_t tenant_len);

/*
 * The key of (tenant, version) with the context `use` needs set up; raises an error if
 * the tenant or the version does not exist or is not active, or (42501) if current_user
 * may not use the tenant's keys (checked before any KMS call).
 */
extern const CipherKey *keycache_key_for_decrypt(const char *tenant, size_t tenant_len,
												 uint32 version, CipherUse use);

/* The tenant's active version, 0 when it is disabled or destroyed. */
extern uint32 keycache_active_version(const char *tenant, size_t tenant_len);

/*
 * A number that changes whenever what this backend knows of the key store may be
 * stale (a change committed anywhere, or made by this transaction's last command), for
 * per-backend caches of key store state beside this one.
 */
extern uint64 keycache_generation(void);
/* Has this transaction changed the key store?  Then nothing it reads may be cached. */
extern bool keycache_key_store_changed_here(void);
/* The key store changed in this transaction: every backend re-reads states at commit. */
extern void keycache_note_key_store_change(void);

/* Wipe (tenant, version) (0: every version) from shared memory when this commits. */
extern void keycache_schedule_purge(int32 tenant_id, uint32 version);

/* Zero every cached DEK of the current database, and this backend's contexts. */
extern void keycache_flush(void);

/* Zero expired DEKs and forget failed loads; returns how many went.  No I/O. */
extern int	keycache_sweep(void);

/*
 * Read before the KMS is asked to generate a DEK, and handed to keycache_prime with
 * it: a master key refused after this (the epoch moved) keeps the DEK out of shared
 * memory, even if the KMS answered before the refusal reached this backend.
 */
extern uint64 keycache_new_key_epoch(void);

/*
 * A DEK the KMS just generated under `key_arn` of `provider`: have its master key
 * re-checked, and keep a copy (wiped on every path) that enters the shared cache when
 * the transaction commits (saves the first Decrypt), if there is room without evicting
 * a key in use and `epoch` (keycache_new_key_epoch() before the KMS call) still
 * holds; nothing is cached if it aborts.
 */
extern void keycache_prime(const char *tenant, int32 tenant_id, uint32 version,
						   const char *provider, const char *key_arn,
						   const bytea *wrapped, const uint8 dek[KMS_DEK_LEN],
						   uint64 epoch);

/*
 * For the cache prewarm: load the DEK of (tenant, version) into the shared cache as a
 * lookup would (the same key store checks, single-flight load and revocation checks),
 * keeping no copy in this backend.  False, and nothing cached, if the tenant or the
 * version may no longer be used, also when that changed during the load; raises the
 * KMS's error.  Needs shared memory (false without).
 */
extern bool keycache_prewarm(const char *tenant, uint32 version);

/*
 * The KMS refused a master key (kms_recheck slot): evict its DEKs from shared memory
 * and from every backend's first level before its next row.  No I/O; for the worker.
 */
extern void l2_evict_master_key(int master_key, bool newly_refused);

/* A consistent copy of the cache's counters. */
extern void keycache_get_stats(KeyCacheStats *stats);

#endif							/* PG_ENVELOPE_KEYCACHE_H */
