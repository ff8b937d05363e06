/*
 * keycache_index.h — the shared tenant index: one cache line per tenant, in front of
 * the tenant hash of the key cache's shared level (keycache_shared.c), the only user.
 *
 * A backend that misses its first level for a tenant it has not seen lately looks the
 * tenant up in shared memory.  Through the hash that takes three dependent cache misses
 * (the bucket, the 520-byte tenant entry, then the DEK's slot); through this index it
 * takes one line for the tenant's state, active version and the slot of that version's
 * DEK, then the slot's line.
 *
 * The index is a cache of the tenant hash, never the only copy: an entry holds what
 * the hash entry of the same (database, key store, name) held at `generation`, for
 * tenants without granted roles whose name fits in the line (others are simply not
 * indexed, and are looked up in the hash).  A reader uses an entry only at that exact
 * generation, after comparing the whole name, and a DEK only if its slot still carries
 * the sequence number of the hint (as for the hash's hints).
 *
 * Locking: the key cache's LWLock, held exclusively by every writer of an entry (put,
 * forget) and in either mode by a reader; the DEK hint is two atomics, written under the
 * shared lock as the tenant hash's hints are.
 */
#ifndef PG_ENVELOPE_KEYCACHE_INDEX_H
#define PG_ENVELOPE_KEYCACHE_INDEX_H

#include "port/atomics.h"

#include "keystore.h"

/* Longest tenant name an entry holds (the rest of its line). */
#define TENANT_INDEX_NAME_MAX 13

/* Which tenant: its database, its key store's tenant table and its name. */
typedef struct TenantIndexKey
{
	Oid			dbid;
	Oid			tenant_relid;
	uint64		name_hash;		/* hash_any_extended(name, seed 0), as the tenant hash's */
	const char *name;
	size_t		name_len;
} TenantIndexKey;

/* One tenant, one cache line.  name_len 0: a free entry. */
typedef struct TenantIndexEntry
{
	uint64		generation;		/* the shared generation its state was read at */
	uint64		wrapped_hash;	/* of the active version's DEK */
	pg_atomic_uint64 dek_seq;	/* hint: the DEK's slot and that slot's number (0: none) */
	Oid			dbid;
	Oid			tenant_relid;
	int32		tenant_id;
	uint32		active_version;
	pg_atomic_uint32 dek_slot;
	int32		hash_slot;		/* the caller's: where the tenant's hash entry is */
	char		state;			/* TenantState */
	char		version_state;	/* KeyState of the active version */
	uint8		name_len;
	char		name[TENANT_INDEX_NAME_MAX];
} TenantIndexEntry;

/* What a writer stores for a tenant (the hint may be 0: not known). */
typedef struct TenantIndexState
{
	uint64		generation;
	int32		tenant_id;
	TenantState state;
	uint32		active_version;
	KeyState	version_state;
	uint64		wrapped_hash;
	uint32		dek_slot;
	uint64		dek_seq;
	int32		hash_slot;
} TenantIndexState;

/* Shared memory for the index of a cache of `capacity` tenants (the cache line included). */
extern Size tenant_index_shmem_size(int capacity);

/* Use `area` (tenant_index_shmem_size bytes) as the index; `init`: it is new, clear it. */
extern void tenant_index_attach(void *area, int capacity, bool init);

/* Can `key` be indexed at all?  (Its name fits.)  No lock needed. */
extern bool tenant_index_holds_name(size_t name_len);

/* The entry of `key`, or NULL.  Lock in either mode; the caller checks the generation. */
extern TenantIndexEntry *tenant_index_find(const TenantIndexKey *key);

/* Enter or overwrite the entry of `key` (its name must fit).  Exclusive lock. */
extern void tenant_index_put(const TenantIndexKey *key, const TenantIndexState *state);

/* Remove the entry of `key`, if any.  Exclusive lock. */
extern void tenant_index_forget(const TenantIndexKey *key);

#endif							/* PG_ENVELOPE_KEYCACHE_INDEX_H */
