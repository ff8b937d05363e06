/*
 * keycache_index.c — the shared tenant index (keycache_index.h): an open-addressing
 * array of one-cache-line entries in front of the shared level's tenant hash.
 *
 * Twice as many entries as the cache holds tenants (rounded up to a power of two), so
 * that a tenant nearly always finds its entry at its home position.  A tenant's entry
 * lives within TENANT_INDEX_PROBES entries of its home; a lookup compares each of them
 * (no early stop at a free one, so removing an entry is just clearing it), and a put
 * that finds no free one in the window takes the home entry: its tenant leaves the
 * index and is looked up in the hash until it is written again.  Nothing is lost but a
 * shortcut, as the index is never the only copy of what it holds.
 */
#include "pg_envelope.h"

#include "keycache_index.h"

#include "storage/shmem.h"

#define TENANT_INDEX_PROBES 4

/* The CPU's line (PG_CACHE_LINE_SIZE is PostgreSQL's padding, 128). */
#define TENANT_INDEX_LINE 64

StaticAssertDecl(sizeof(TenantIndexEntry) == TENANT_INDEX_LINE,
				 "a tenant index entry is one cache line");

static TenantIndexEntry *index_entries = NULL;
static uint32 index_mask = 0;

static uint32
index_entries_for(int capacity)
{
	uint32		n = 1;

	while (n < (uint32) capacity * 2)
		n *= 2;
	return n;
}

Size
tenant_index_shmem_size(int capacity)
{
	return add_size(mul_size(index_entries_for(capacity), sizeof(TenantIndexEntry)),
					TENANT_INDEX_LINE);
}

void
tenant_index_attach(void *area, int capacity, bool init)
{
	uint32		n = index_entries_for(capacity);

	index_entries = (TenantIndexEntry *) TYPEALIGN(TENANT_INDEX_LINE, area);
	index_mask = n - 1;
	if (init)
	{
		memset(index_entries, 0, (Size) n * sizeof(TenantIndexEntry));
		for (uint32 i = 0; i < n; i++)
		{
			pg_atomic_init_u64(&index_entries[i].dek_seq, 0);
			pg_atomic_init_u32(&index_entries[i].dek_slot, 0);
		}
	}
}

bool
tenant_index_holds_name(size_t name_len)
{
	return name_len > 0 && name_len <= TENANT_INDEX_NAME_MAX;
}

/* The first entry of `key`'s window: its name hash's low half, mixed with its database. */
static inline uint32
index_home(const TenantIndexKey *key)
{
	uint32		h = (uint32) key->name_hash ^
		(key->dbid * 0x9E3779B1u) ^ (key->tenant_relid * 0x85EBCA77u);

	return h & index_mask;
}

/* The whole name and where it belongs: names that share a home differ here. */
static inline bool
index_entry_is(const TenantIndexEntry *e, const TenantIndexKey *key)
{
	return e->name_len == key->name_len &&
		e->dbid == key->dbid && e->tenant_relid == key->tenant_relid &&
		memcmp(e->name, key->name, key->name_len) == 0;
}

TenantIndexEntry *
tenant_index_find(const TenantIndexKey *key)
{
	uint32		home;

	if (index_entries == NULL || !tenant_index_holds_name(key->name_len))
		return NULL;
	home = index_home(key);
	for (int i = 0; i < TENANT_INDEX_PROBES; i++)
	{
		TenantIndexEntry *e = &index_entries[(home + i) & index_mask];

		if (index_entry_is(e, key))
			return e;
	}
	return NULL;
}

void
tenant_index_put(const TenantIndexKey *key, const TenantIndexState *state)
{
	uint32		home;
	TenantIndexEntry *e = NULL;

	if (index_entries == NULL || !tenant_index_holds_name(key->name_len))
		return;
	home = index_home(key);
	e = tenant_index_find(key);
	for (int i = 0; e == NULL && i < TENANT_INDEX_PROBES; i++)
	{
		TenantIndexEntry *free_one = &index_entries[(home + i) & index_mask];

		if (free_one->name_len == 0)
			e = free_one;
	}
	if (e == NULL)
		e = &index_entries[home];	/* its tenant leaves the index */
	e->generation = state->generation;
	e->wrapped_hash = state->wrapped_hash;
	e->dbid = key->dbid;
	e->tenant_relid = key->tenant_relid;
	e->tenant_id = state->tenant_id;
	e->active_version = state->active_version;
	e->hash_slot = state->hash_slot;
	e->state = (char) state->state;
	e->version_state = (char) state->version_state;
	e->name_len = (uint8) key->name_len;
	memcpy(e->name, key->name, key->name_len);
	pg_atomic_write_u32(&e->dek_slot, state->dek_slot);
	pg_atomic_write_u64(&e->dek_seq, state->dek_seq);
}

void
tenant_index_forget(const TenantIndexKey *key)
{
	TenantIndexEntry *e = tenant_index_find(key);

	if (e == NULL)
		return;
	e->name_len = 0;
	e->generation = 0;
	pg_atomic_write_u64(&e->dek_seq, 0);
	pg_atomic_write_u32(&e->dek_slot, 0);
}
