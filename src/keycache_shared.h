/*
 * keycache_shared.h — the interface between the key cache's two levels: what the
 * per-backend level (keycache.c) asks of the shared level (keycache_shared.c).  Not
 * for other files: they use keycache.h.
 *
 * Without shared_preload_libraries there is no shared memory: l2_available() is false,
 * the generation and the counters are this backend's, and only the functions that say
 * so may be called.
 */
#ifndef PG_ENVELOPE_KEYCACHE_SHARED_H
#define PG_ENVELOPE_KEYCACHE_SHARED_H

#include "datatype/timestamp.h"

#include "keycache.h"
#include "keystore.h"

/*
 * Roles granted a tenant that shared memory holds with its state; a tenant with more
 * is not held there (each backend reads it from the key store once per generation).
 */
#define SHARED_TENANT_GRANTS 8

/* Versions whose state shared memory holds with a tenant's; others are read on demand. */
#define SHARED_TENANT_VERSIONS 4

/*
 * Where shared memory last found a version's DEK: a DEK slot and the sequence number
 * that slot had then, unique to one assignment of the slot to one key (see
 * l2_copy_hinted_dek).  seq 0: no hint.
 */
typedef struct DekHint
{
	uint32		slot;
	uint64		seq;
} DekHint;

/* A version's state as shared memory holds it with its tenant's. */
typedef struct VersionView
{
	uint32		version;
	KeyState	state;
	uint64		wrapped_hash;
	DekHint		hint;
} VersionView;

/* What shared memory holds of a tenant and one of its versions at one generation. */
typedef struct TenantView
{
	int32		tenant_id;
	TenantState state;
	uint32		active_version;
	uint32		version;		/* the version asked for (the active one for 0) */
	bool		has_version;	/* its state is known: */
	KeyState	version_state;
	uint64		wrapped_hash;
	int			ngrants;		/* roles granted the tenant (0: not restricted) */
	Oid			grant_roles[SHARED_TENANT_GRANTS];
	/* Every version held with the tenant (`version` among them if has_version). */
	int			nversions;
	VersionView versions[SHARED_TENANT_VERSIONS];
} TenantView;

/* Is the cache in shared memory?  Any call. */
extern bool l2_available(void);

/* The shared generation (this backend's without preload): one atomic read.  Any call. */
extern uint64 l2_generation(void);

/*
 * Bumped (before the generation) whenever a master key is refused and its DEKs are
 * evicted: a backend that sees it change drops every first-level copy.  Any call.
 */
extern uint64 l2_revocation_epoch(void);

/* Make every tenant state read before now stale, in every backend.  Any call. */
extern void l2_bump_generation(void);

/* A DEK copied out of shared memory, and until when copies of it may be used. */
typedef struct SharedDekCopy
{
	bool		found;
	uint8		dek[KMS_DEK_LEN];
	TimestampTz expires_at;
} SharedDekCopy;

/*
 * The state of tenant `name`, its granted roles, and the state of its `version` (0:
 * the active one) as read from the key store at shared generation `generation`; false
 * if not held for that generation (has_version is false if the tenant is held but not
 * that version).  With `dek`, also the version's DEK (dek->found) when the tenant and
 * the version are active and the DEK is ready in shared memory: state and key in one
 * look, under one lock.  The caller wipes dek->dek.
 */
extern bool l2_find_tenant(const char *name, size_t name_len, uint64 generation,
						   uint32 version, TenantView *view, SharedDekCopy *dek);

/*
 * Hold what the key store said of a tenant and of up to SHARED_TENANT_VERSIONS of its
 * versions (rec->version if key_found and the active one first, then the newest),
 * read after observing shared generation `generation` with the latest snapshot.
 */
extern void l2_publish_tenant(const char *name, size_t name_len, uint64 generation,
							  const TenantKeyRecord *rec);

/* The hash of a wrapped DEK that, with tenant id and version, names its plaintext. */
extern uint64 l2_wrapped_hash(const bytea *wrapped);

/*
 * Copy the DEK of (tenant_id, version, wrapped_hash) if it is cached, ready and not
 * expired; *expires_at says until when a copy of it may be used (its TTL, or the next
 * retry of a key served under envelope.cache_grace).  No waiting, no loading.
 */
extern bool l2_peek_key(int32 tenant_id, uint32 version, uint64 wrapped_hash,
						uint8 dek[KMS_DEK_LEN], TimestampTz *expires_at);

/*
 * The DEK of `rec` (the key store's record of (tenant, version)), from shared memory or
 * else unwrapped by the KMS once for the whole cluster (single-flight); *expires_at
 * says until when, so that copies expire with the shared one.  Without shared memory,
 * always the KMS.  Raises the KMS's error, or that of the backend whose call we waited
 * for; except that when the KMS cannot be reached (never when it refuses) and the
 * expired shared copy is within envelope.cache_grace, that copy is returned, with a
 * WARNING the first time for the key.
 */
extern void l2_load_key(const char *tenant, int32 tenant_id, uint32 version,
						const DataKeyRecord *rec, uint8 dek[KMS_DEK_LEN],
						TimestampTz *expires_at);

/*
 * Copy the DEK a hint from a TenantView names, if its slot still holds that key (the
 * same sequence number) ready and unexpired: one lock, one cache line, no lookup.
 * False otherwise (the caller then looks the tenant up again).  Counts the hit.
 */
extern bool l2_copy_hinted_dek(DekHint hint, SharedDekCopy *dek);

/* Count a lookup that reached shared memory (hit or miss).  Any call. */
extern void l2_count_lookup(bool hit);

/*
 * A DEK the KMS generated in the current transaction, waiting for its commit to enter
 * shared memory (l2_store_new_keys).  Plaintext key bytes: the owner wipes them.
 */
typedef struct NewDataKey
{
	int32		tenant_id;
	uint32		version;
	uint64		wrapped_hash;
	int32		master_key;		/* kms_recheck slot of its master key */
	uint64		revocation_epoch;	/* l2_revocation_epoch() before the KMS was asked */
	TimestampTz made_at;		/* before its master key was noted in use: expires from then */
	uint8		dek[KMS_DEK_LEN];
} NewDataKey;

/* How many keys l2_store_new_keys stores under one acquisition of the lock. */
#define L2_NEW_KEYS_PER_LOCK 64

/*
 * Counts every removal of keys from shared memory (purge, flush, eviction of a refused
 * master key's keys).  Read at PRE_COMMIT by a transaction with new keys: if it has
 * moved when they are stored, a purge may have run after this transaction's rows
 * became visible, and may have missed keys this transaction is about to store.  Any call.
 */
extern uint64 l2_purge_sequence(void);

/*
 * Put the n (at most L2_NEW_KEYS_PER_LOCK) DEKs the KMS generated in a transaction
 * that has just committed into shared memory, under one acquisition of the lock, each
 * if there is room without evicting a key in use, it has not expired since made_at,
 * and no master key was refused since its revocation_epoch.  False (the caller stops)
 * when a key found no room or the purge sequence is no longer `purge_seq`.  Raises no
 * ERROR: for the commit callback.
 */
extern bool l2_store_new_keys(const NewDataKey *const *keys, int n, uint64 purge_seq);

/* Zero the DEKs of (tenant_id, version) (0: every version) of this database.  Any call. */
extern void l2_purge(int32 tenant_id, uint32 version);

/* Zero the one DEK of (tenant_id, version, wrapped_hash) if it is cached.  Any call. */
extern void l2_purge_key(int32 tenant_id, uint32 version, uint64 wrapped_hash);

/* Zero every DEK of this database and bump the generation.  Any call. */
extern void l2_flush_database(void);

/* The counters; false (and no capacity or entries) without shared memory.  Any call. */
extern bool l2_get_stats(KeyCacheStats *out);

#endif							/* PG_ENVELOPE_KEYCACHE_SHARED_H */
