/*
 * keycache.c — where plaintext data keys live: a shared-memory cache of DEKs and of
 * tenants' states, and in each backend a first level of ready cipher contexts.
 *
 * Two levels:
 *
 *   L1 (per backend, no locks): tenant name -> {tenant state, per version a CipherKey
 *      whose contexts are set up as values need them}.  At most L1_MAX_TENANTS
 *      tenants, evicted least recently used first (a list, O(1)).  The per-row path of
 *      encrypt/decrypt touches only this level plus one atomic read of the shared
 *      generation counter.
 *
 *   L2 (shared memory, envelope.cache_size entries of each kind):
 *      - keys: (database, tenant id, version, hash of the wrapped DEK) -> the 32-byte
 *        DEK.  One KMS Decrypt per key per cluster, not per backend.  The DEK bytes sit
 *        in a separate page-aligned array marked MADV_DONTDUMP and locked in memory
 *        where RLIMIT_MEMLOCK allows.
 *      - tenants: (database, key store incarnation, tenant name) -> tenant id, state,
 *        active version and the states of a few versions, as read from the key store
 *        at a given generation.  An L1 miss for a key in L2 is answered from here: no
 *        SPI, no parse, no walk of any table.
 *      Both evict the least recently used of a window of slots that a hand moves
 *      along (bounded work per eviction, exact LRU for caches up to the window's size,
 *      and never a walk of the whole table).
 *
 * Locking protocol of L2 (one LWLock of tranche "pg_envelope"):
 *   - lookups take the lock in LW_SHARED mode, copy what they need out and release it;
 *     the entry's last-use time is set with an atomic write, which is harmless to race;
 *   - inserts, removals, eviction, expiry and flush take it LW_EXCLUSIVE;
 *   - the statistics live under their own spinlock (stats_mutex), which is taken
 *     while the LWLock is held exclusively (eviction counts) and never the other way
 *     round; nothing else is done under the spinlock;
 *   - the lock is never held across SPI, KMS or any other I/O, nor across an ereport.
 *   - single-flight: the first backend to miss a key inserts a LOADING entry, releases
 *     the lock and asks the KMS; others that find the LOADING entry sleep on a
 *     condition variable (interruptibly) until it becomes READY or FAILED.  A FAILED
 *     load is reported to the backends that waited for it and retried by the next
 *     caller.
 *
 * Revocation: the key store tables carry statement triggers that call
 * keycache_note_key_store_change().  At commit (never at rollback) that bumps the
 * shared generation counter, so every backend's next row sees its L1 is stale, and
 * every tenant state in L2 too: states are re-read from the key store before use.
 * Destroyed and retired keys are also wiped from L2 at that moment.  The trigger also
 * queues a relcache invalidation of the table, which is WAL-logged with the commit: on
 * a hot standby the callback below marks each backend's L1, and the tenant states in
 * L2, stale when the commit is replayed.
 *
 * Every slot that is evicted, expires, is flushed or invalidated is zeroed.  Expired
 * keys are zeroed by the next lookup that meets them, and at the latest by the
 * "pg_envelope key cache sweeper" background worker, which wakes every tenth of
 * envelope.cache_ttl, but never more often than once a second nor less often than once
 * a minute: a key nobody uses any more does not linger.  After a crash-restart shared
 * memory is re-created, so the cache starts empty.
 */
#include "pg_envelope.h"

#include <sys/mman.h>

#include "access/parallel.h"
#include "access/xact.h"
#include "access/xlog.h"
#include "lib/ilist.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "port/atomics.h"
#include "storage/condition_variable.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "storage/spin.h"
#include "common/hashfn.h"
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

/* ---------------------------------------------------------------------------
 * Shared level (L2)
 */
/*
 * A DEK is named by its database, tenant id and version, and by a hash of its wrapped
 * form: tenant ids restart when the extension is re-created or a dump is restored, and
 * the hash keeps such a re-used id from ever finding another key's bytes.
 */
typedef struct SharedKeyTag
{
	Oid			dbid;
	int32		tenant_id;
	uint32		version;
	uint64		wrapped_hash;
} SharedKeyTag;

typedef enum SharedKeyState
{
	SKEY_LOADING = 0,
	SKEY_READY,
	SKEY_FAILED
} SharedKeyState;

typedef struct SharedKeyEntry
{
	SharedKeyTag tag;			/* hash key: must be first */
	int32		slot;			/* index into the DEK array and the key ring */
	SharedKeyState state;
	bool		doomed;			/* purged or flushed while loading: drop on arrival */
	uint32		load_seq;		/* which load attempt this state belongs to */
	int			failed_sqlstate;
	TimestampTz loaded_at;
	pg_atomic_uint64 last_used; /* TimestampTz of the last lookup */
} SharedKeyEntry;

/*
 * A tenant's state as read from the key store at `generation`.  Named by a hash of the
 * name (the name itself is compared too: two names with the same hash simply take
 * turns in the entry) and by the key store's tenant table, so that a dropped and
 * re-created extension never meets the states of its predecessor.
 */
typedef struct SharedTenantTag
{
	Oid			dbid;
	Oid			tenant_relid;
	uint64		name_hash;
} SharedTenantTag;

/* Versions whose state a shared tenant entry remembers; others are read on demand. */
#define SHARED_TENANT_VERSIONS 4

typedef struct SharedVersionState
{
	uint32		version;
	KeyState	state;
	uint64		wrapped_hash;
} SharedVersionState;

typedef struct SharedTenantEntry
{
	SharedTenantTag tag;		/* hash key: must be first */
	int32		slot;			/* index into the tenant ring */
	pg_atomic_uint64 last_used; /* TimestampTz of the last lookup */
	uint64		generation;		/* shared generation the states below were read at */
	int32		tenant_id;
	TenantState state;
	uint32		active_version;
	int			nversions;
	int			next_version_slot;	/* round robin once versions[] is full */
	SharedVersionState versions[SHARED_TENANT_VERSIONS];
	uint32		name_len;
	char		name[ENVELOPE_TENANT_MAX];
} SharedTenantEntry;

/*
 * A fixed number of slots: a stack of free ones, the entry that owns each busy one,
 * and a hand.  An eviction looks at the next EVICTION_WINDOW busy slots from the hand
 * and takes the least recently used of them: bounded work, exact LRU while the cache
 * is no larger than the window, a close approximation beyond.
 */
#define EVICTION_WINDOW 32

typedef struct SlotRing
{
	int			capacity;
	int			nfree;
	int			hand;
	int32	   *free_slots;
	void	  **owner;
} SlotRing;

/*
 * Keys evicted to make room are remembered here (a hash of the tag and the time, in a
 * direct-mapped array the size of the cache) for one cache_ttl: a key unwrapped again
 * while its ghost is fresh was evicted while still in use, a sign that the working set
 * is larger than envelope.cache_size.
 */
typedef struct EvictionGhost
{
	uint64		tag_hash;
	TimestampTz evicted_at;
} EvictionGhost;

typedef struct KeyCacheShared
{
	LWLock	   *lock;
	ConditionVariable loaded_cv;
	pg_atomic_uint64 generation;
	int			capacity;
	SlotRing	key_ring;
	SlotRing	tenant_ring;
	slock_t		stats_mutex;
	KeyCacheStats stats;		/* under stats_mutex */
} KeyCacheShared;

static KeyCacheShared *shared = NULL;
static HTAB *shared_hash = NULL;
static HTAB *shared_tenants = NULL;
static EvictionGhost *shared_ghosts = NULL;
static uint8 (*shared_deks)[KMS_DEK_LEN] = NULL;

/* Without preload there is no L2; these stand in for the shared counters. */
static KeyCacheStats local_stats;
static uint64 local_generation = 0;

/* ---------------------------------------------------------------------------
 * Backend level (L1)
 */
typedef struct LocalVersion
{
	uint32		version;
	KeyState	state;			/* as of the tenant's generation; 0: not checked since */
	uint64		wrapped_hash;	/* with tenant id and version, names the DEK in L2 */
	TimestampTz expires_at;		/* of the shared copy the contexts came from */
	CipherKey	key;			/* contexts set up as values need them */
} LocalVersion;

typedef struct LocalTenant
{
	char		name[ENVELOPE_TENANT_MAX + 1];	/* hash key */
	uint32		name_len;
	dlist_node	lru;			/* in l1_lru, most recently used first */
	uint64		generation;		/* generation at which the state was read */
	uint64		shared_generation;	/* its shared part */
	int32		tenant_id;
	TenantState state;
	uint32		active_version;
	int			nversions;
	int			maxversions;
	LocalVersion *versions;
} LocalTenant;

/*
 * At most this many tenants in one backend's L1; beyond it the least recently used
 * one makes room.  Each holds a name and one or two OpenSSL contexts (about 2 KB), so
 * a backend's L1 stays under about 16 MB however many tenants its scans cycle through;
 * past the limit each row that switches to an evicted tenant costs one look into L2
 * and a re-key of the evicted tenant's context.
 */
#define L1_MAX_TENANTS 8192

static HTAB *local_tenants = NULL;
static MemoryContext local_cxt = NULL;
static dlist_head l1_lru = DLIST_STATIC_INIT(l1_lru);
static LocalTenant *last_tenant = NULL;
static size_t last_tenant_len = 0;

/*
 * The contexts of the tenant evicted last, waiting to be re-keyed for the tenant that
 * took its place (cheaper than allocating new ones); whatever the new tenant does not
 * take is freed at once.
 */
static CipherKey l1_spare;

/*
 * In front of the hash table, a direct-mapped array indexed by a hash of the tenant's
 * bytes: rows that switch tenant every row find theirs with one short hash and one
 * compare, without copying the name into a 256-byte key or checking it again (a name
 * in L1 was checked when it entered).  A slot is cleared when its tenant is evicted,
 * and the whole array when L1 is emptied.
 */
#define L1_FRONT_SIZE 4096

typedef struct L1FrontSlot
{
	LocalTenant *lt;
	uint32		name_len;
} L1FrontSlot;

static L1FrontSlot l1_front[L1_FRONT_SIZE];

/* FNV-1a: tenant names are short, and this runs per row. */
static inline uint32
l1_front_index(const char *tenant, size_t tenant_len)
{
	uint32		h = 2166136261u;

	for (size_t i = 0; i < tenant_len; i++)
		h = (h ^ (unsigned char) tenant[i]) * 16777619u;
	return (h ^ (h >> 16)) & (L1_FRONT_SIZE - 1);
}

static void
l1_front_clear(void)
{
	memset(l1_front, 0, sizeof(l1_front));
}

/* Bumped by invalidation callbacks; combined with the shared generation. */
static uint64 l1_local_generation = 0;
static bool l1_synced_with_standby = false;
static bool l1_pending_bump = false;

/* Keys to wipe from L2 when the current transaction commits. */
typedef struct PendingPurge
{
	int32		tenant_id;
	uint32		version;		/* 0: every version */
} PendingPurge;

static List *pending_purges = NIL;

static uint32 my_load_seq = 0;

/*
 * The load this backend has in flight, if any.  A FATAL error (pg_terminate_backend,
 * shutdown) during the KMS call exits without unwinding through PG_CATCH, so an exit
 * callback must publish the failure, or waiters would sleep on a LOADING entry forever.
 */
static bool inflight_active = false;
static SharedKeyTag inflight_tag;
static uint32 inflight_seq = 0;

static inline uint64
shared_generation(void)
{
	if (shared != NULL)
		return pg_atomic_read_u64(&shared->generation);
	return local_generation;
}

static KeyCacheStats *
stats_begin(void)
{
	if (shared == NULL)
		return &local_stats;
	SpinLockAcquire(&shared->stats_mutex);
	return &shared->stats;
}

static void
stats_end(void)
{
	if (shared != NULL)
		SpinLockRelease(&shared->stats_mutex);
}

/* ---------------------------------------------------------------------------
 * Slot rings.  The caller holds the lock exclusively.
 */
static Size
ring_arrays_size(int capacity)
{
	return MAXALIGN(sizeof(int32) * capacity) + MAXALIGN(sizeof(void *) * capacity);
}

static void
ring_attach(SlotRing *ring, char *arrays, int capacity)
{
	ring->free_slots = (int32 *) arrays;
	ring->owner = (void **) (arrays + MAXALIGN(sizeof(int32) * capacity));
}

static void
ring_init(SlotRing *ring, int capacity)
{
	ring->capacity = capacity;
	ring->nfree = capacity;
	ring->hand = 0;
	for (int i = 0; i < capacity; i++)
	{
		ring->free_slots[i] = capacity - 1 - i;
		ring->owner[i] = NULL;
	}
}

/* A free slot for `owner`, or -1 when every slot is busy. */
static int32
ring_take(SlotRing *ring, void *owner)
{
	int32		slot;

	if (ring->nfree == 0)
		return -1;
	slot = ring->free_slots[--ring->nfree];
	ring->owner[slot] = owner;
	return slot;
}

static void
ring_give_back(SlotRing *ring, int32 slot)
{
	ring->owner[slot] = NULL;
	ring->free_slots[ring->nfree++] = slot;
}

typedef enum EvictVerdict
{
	EVICT_NEVER,				/* not now (a load in flight) */
	EVICT_IF_OLDEST,			/* the least recently used of the window goes */
	EVICT_AT_ONCE				/* expired or failed: goes first */
} EvictVerdict;

/*
 * The owner to evict: the first EVICT_AT_ONCE met, else the least recently used of
 * the next EVICTION_WINDOW candidates from the hand; NULL when no slot is a candidate.
 */
static void *
ring_victim(SlotRing *ring, EvictVerdict (*verdict) (void *owner, TimestampTz now,
													   uint64 *last_used),
			TimestampTz now)
{
	void	   *victim = NULL;
	uint64		oldest = PG_UINT64_MAX;
	int			candidates = 0;

	for (int step = 0; step < ring->capacity && candidates < EVICTION_WINDOW; step++)
	{
		void	   *owner = ring->owner[ring->hand];
		uint64		last_used;

		ring->hand = (ring->hand + 1) % ring->capacity;
		if (owner == NULL)
			continue;
		switch (verdict(owner, now, &last_used))
		{
			case EVICT_NEVER:
				break;
			case EVICT_AT_ONCE:
				return owner;
			case EVICT_IF_OLDEST:
				candidates++;
				if (last_used < oldest)
				{
					oldest = last_used;
					victim = owner;
				}
				break;
		}
	}
	return victim;
}

/* ---------------------------------------------------------------------------
 * Shared memory set-up
 */
static Size
dek_area_size(int capacity)
{
	/* Page-aligned start and end, so madvise/mlock cover exactly this array. */
	return (Size) capacity * KMS_DEK_LEN + 2 * (Size) sysconf(_SC_PAGESIZE);
}

static Size
control_size(int capacity)
{
	Size		size = MAXALIGN(sizeof(KeyCacheShared));

	size = add_size(size, mul_size(2, ring_arrays_size(capacity)));
	size = add_size(size, mul_size(capacity, sizeof(EvictionGhost)));
	return size;
}

static Size
keycache_shmem_size(void)
{
	Size		size;

	size = control_size(envelope_cache_size);
	size = add_size(size, hash_estimate_size(envelope_cache_size, sizeof(SharedKeyEntry)));
	size = add_size(size, hash_estimate_size(envelope_cache_size, sizeof(SharedTenantEntry)));
	size = add_size(size, dek_area_size(envelope_cache_size));
	return size;
}

void
keycache_shmem_request(void)
{
	RequestAddinShmemSpace(keycache_shmem_size());
	RequestNamedLWLockTranche("pg_envelope", 1);
}

/* Keep key pages out of core dumps and, where the limit allows, out of swap. */
static void
protect_dek_area(void *start, Size len)
{
#ifdef MADV_DONTDUMP
	if (madvise(start, len, MADV_DONTDUMP) != 0)
		ereport(WARNING,
				(errmsg("pg_envelope could not exclude its key cache from core dumps: %m")));
#endif
	if (mlock(start, len) != 0)
		ereport(WARNING,
				(errmsg("pg_envelope could not lock its key cache in memory: %m"),
				 errdetail("Cached data keys may be written to swap."),
				 errhint("Raise the memory lock limit (RLIMIT_MEMLOCK, LimitMEMLOCK) of the server.")));
}

void
keycache_shmem_startup(void)
{
	bool		found;
	HASHCTL		info;
	Size		pagesize = (Size) sysconf(_SC_PAGESIZE);
	int			capacity = envelope_cache_size;
	char	   *area;
	char	   *arrays;

	shared = NULL;
	shared_hash = NULL;
	shared_tenants = NULL;

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);

	shared = ShmemInitStruct("pg_envelope key cache", control_size(capacity), &found);
	arrays = (char *) shared + MAXALIGN(sizeof(KeyCacheShared));
	ring_attach(&shared->key_ring, arrays, capacity);
	arrays += ring_arrays_size(capacity);
	ring_attach(&shared->tenant_ring, arrays, capacity);
	arrays += ring_arrays_size(capacity);
	shared_ghosts = (EvictionGhost *) arrays;
	area = ShmemInitStruct("pg_envelope key cache keys", dek_area_size(capacity), &found);
	shared_deks = (uint8 (*)[KMS_DEK_LEN]) TYPEALIGN(pagesize, area);

	if (!found)
	{
		shared->lock = &(GetNamedLWLockTranche("pg_envelope"))->lock;
		ConditionVariableInit(&shared->loaded_cv);
		pg_atomic_init_u64(&shared->generation, 0);
		shared->capacity = capacity;
		ring_init(&shared->key_ring, capacity);
		ring_init(&shared->tenant_ring, capacity);
		memset(shared_ghosts, 0, sizeof(EvictionGhost) * capacity);
		SpinLockInit(&shared->stats_mutex);
		memset(&shared->stats, 0, sizeof(shared->stats));
		memset(shared_deks, 0, (Size) capacity * KMS_DEK_LEN);
		protect_dek_area(shared_deks, TYPEALIGN(pagesize, (Size) capacity * KMS_DEK_LEN));
	}

	memset(&info, 0, sizeof(info));
	info.keysize = sizeof(SharedKeyTag);
	info.entrysize = sizeof(SharedKeyEntry);
	shared_hash = ShmemInitHash("pg_envelope key cache hash", capacity, capacity,
								&info, HASH_ELEM | HASH_BLOBS);
	memset(&info, 0, sizeof(info));
	info.keysize = sizeof(SharedTenantTag);
	info.entrysize = sizeof(SharedTenantEntry);
	shared_tenants = ShmemInitHash("pg_envelope key cache tenants", capacity, capacity,
								   &info, HASH_ELEM | HASH_BLOBS);

	LWLockRelease(AddinShmemInitLock);
}

/* Zero a slot's key and hand the slot back.  Caller holds the lock exclusively. */
static void
shared_remove_entry(SharedKeyEntry *entry)
{
	if (entry->slot >= 0)
	{
		explicit_bzero(shared_deks[entry->slot], KMS_DEK_LEN);
		ring_give_back(&shared->key_ring, entry->slot);
		entry->slot = -1;
	}
	hash_search(shared_hash, &entry->tag, HASH_REMOVE, NULL);
}

static bool
entry_expired(SharedKeyEntry *entry, TimestampTz now)
{
	return entry->state == SKEY_READY &&
		now - entry->loaded_at >= (TimestampTz) envelope_cache_ttl * USECS_PER_SEC;
}

static uint64
tag_hash64(const SharedKeyTag *tag)
{
	return DatumGetUInt64(hash_any_extended((const unsigned char *) tag, sizeof(*tag), 1));
}

static EvictVerdict
key_victim_verdict(void *owner, TimestampTz now, uint64 *last_used)
{
	SharedKeyEntry *entry = owner;

	*last_used = pg_atomic_read_u64(&entry->last_used);
	if (entry->state == SKEY_LOADING)
		return EVICT_NEVER;
	if (entry->state == SKEY_FAILED || entry_expired(entry, now))
		return EVICT_AT_ONCE;
	return EVICT_IF_OLDEST;
}

/*
 * Make room for one entry: expired and failed entries first, else the least recently
 * used of the window at the ring's hand.  Caller holds the lock exclusively.  Returns
 * false when every slot is busy loading (the caller then goes to the KMS without
 * caching).
 */
static bool
shared_make_room(TimestampTz now)
{
	SharedKeyEntry *victim;

	if (shared->key_ring.nfree > 0)
		return true;
	victim = ring_victim(&shared->key_ring, key_victim_verdict, now);
	if (victim == NULL)
		return false;
	if (victim->state == SKEY_READY && !entry_expired(victim, now))
	{
		/* Evicted while still valid: remember it, to notice if it is needed again. */
		uint64		h = tag_hash64(&victim->tag);
		EvictionGhost *ghost = &shared_ghosts[h % shared->capacity];

		ghost->tag_hash = h;
		ghost->evicted_at = now;
	}
	shared_remove_entry(victim);
	{
		KeyCacheStats *s = stats_begin();

		s->evictions++;
		stats_end();
	}
	return true;
}

/*
 * About to unwrap `tag` with the KMS: was it evicted to make room within the last
 * cache_ttl?  Caller holds the lock exclusively.
 */
static void
note_reload(const SharedKeyTag *tag, TimestampTz now)
{
	uint64		h = tag_hash64(tag);
	EvictionGhost *ghost = &shared_ghosts[h % shared->capacity];

	if (ghost->tag_hash == h && ghost->evicted_at != 0 &&
		now - ghost->evicted_at < (TimestampTz) envelope_cache_ttl * USECS_PER_SEC)
	{
		KeyCacheStats *s = stats_begin();

		s->evicted_reloads++;
		stats_end();
		ghost->evicted_at = 0;
	}
}

typedef enum LookupResult
{
	LOOKUP_HIT,
	LOOKUP_MUST_LOAD,			/* we inserted a LOADING entry: our job to fill it */
	LOOKUP_UNCACHED				/* cache full of loads in flight: load without caching */
} LookupResult;

/* Copy a READY, unexpired DEK out; caller holds the lock (either mode). */
static bool
shared_copy_ready(SharedKeyEntry *entry, TimestampTz now, uint8 dek[KMS_DEK_LEN],
				  TimestampTz *loaded_at)
{
	if (entry == NULL || entry->state != SKEY_READY || entry_expired(entry, now))
		return false;
	memcpy(dek, shared_deks[entry->slot], KMS_DEK_LEN);
	*loaded_at = entry->loaded_at;
	pg_atomic_write_u64(&entry->last_used, (uint64) now);
	return true;
}

/*
 * The DEK of `tag` if L2 holds it ready: one look under the shared lock, no waiting,
 * no loading.
 */
static bool
shared_peek(const SharedKeyTag *tag, uint8 dek[KMS_DEK_LEN], TimestampTz *loaded_at)
{
	bool		hit;

	LWLockAcquire(shared->lock, LW_SHARED);
	hit = shared_copy_ready(hash_search(shared_hash, tag, HASH_FIND, NULL),
							GetCurrentTimestamp(), dek, loaded_at);
	LWLockRelease(shared->lock);
	return hit;
}

/*
 * Find the DEK of `tag` in L2, waiting for a load in flight.  On LOOKUP_MUST_LOAD the
 * caller must call shared_finish_load() on every path, errors included.
 */
static LookupResult
shared_lookup(const SharedKeyTag *tag, uint8 dek[KMS_DEK_LEN], uint32 *load_seq,
			  TimestampTz *loaded_at)
{
	SharedKeyEntry *entry;
	bool		found;
	uint32		waited_for = 0;
	bool		waiting = false;

	for (;;)
	{
		TimestampTz now = GetCurrentTimestamp();

		LWLockAcquire(shared->lock, LW_SHARED);
		entry = hash_search(shared_hash, tag, HASH_FIND, NULL);
		if (shared_copy_ready(entry, now, dek, loaded_at))
		{
			LWLockRelease(shared->lock);
			if (waiting)
				ConditionVariableCancelSleep();
			return LOOKUP_HIT;
		}
		if (entry != NULL && entry->state == SKEY_FAILED && waiting &&
			entry->load_seq == waited_for)
		{
			int			sqlstate = entry->failed_sqlstate;

			LWLockRelease(shared->lock);
			ConditionVariableCancelSleep();
			ereport(ERROR,
					(errcode(sqlstate),
					 errmsg("could not obtain key version %u of tenant %d: the KMS call of another backend failed",
							tag->version, tag->tenant_id),
					 errhint("The error is in the server log of the backend that made the call."),
					 errhidestmt(true)));
		}
		if (entry != NULL && entry->state == SKEY_LOADING)
		{
			/* Someone is asking the KMS right now: wait for their answer. */
			waited_for = entry->load_seq;
			LWLockRelease(shared->lock);
			if (!waiting)
			{
				ConditionVariablePrepareToSleep(&shared->loaded_cv);
				waiting = true;
			}
			else
				ConditionVariableSleep(&shared->loaded_cv, PG_WAIT_EXTENSION);
			continue;
		}
		LWLockRelease(shared->lock);
		if (waiting)
		{
			ConditionVariableCancelSleep();
			waiting = false;
		}

		/* Miss (or expired, or a failed load nobody waits for): become the loader. */
		LWLockAcquire(shared->lock, LW_EXCLUSIVE);
		entry = hash_search(shared_hash, tag, HASH_FIND, NULL);
		if (entry != NULL && entry->state == SKEY_LOADING)
		{
			LWLockRelease(shared->lock);
			continue;			/* someone beat us to it */
		}
		if (shared_copy_ready(entry, now, dek, loaded_at))
		{
			/* Loaded by another backend between our two looks. */
			LWLockRelease(shared->lock);
			return LOOKUP_HIT;
		}
		note_reload(tag, now);
		if (entry != NULL)
			shared_remove_entry(entry);
		if (!shared_make_room(now))
		{
			LWLockRelease(shared->lock);
			return LOOKUP_UNCACHED;
		}
		entry = hash_search(shared_hash, tag, HASH_ENTER, &found);
		entry->slot = ring_take(&shared->key_ring, entry);
		pg_atomic_init_u64(&entry->last_used, (uint64) now);
		entry->state = SKEY_LOADING;
		entry->doomed = false;
		entry->load_seq = ++my_load_seq + (uint32) MyProcPid * 7919;
		entry->failed_sqlstate = 0;
		entry->loaded_at = 0;
		*load_seq = entry->load_seq;
		LWLockRelease(shared->lock);
		return LOOKUP_MUST_LOAD;
	}
}

/*
 * Publish the outcome of our load: the DEK, or the SQLSTATE of the failure.  A load
 * that was purged or flushed meanwhile is dropped instead of published, and so is one
 * that ended because *this* backend was canceled or terminated: that is no answer about
 * the key, so a waiter takes over the load rather than inherit our cancel.
 */
static void
shared_finish_load(const SharedKeyTag *tag, uint32 load_seq, const uint8 *dek, int sqlstate)
{
	SharedKeyEntry *entry;

	LWLockAcquire(shared->lock, LW_EXCLUSIVE);
	entry = hash_search(shared_hash, tag, HASH_FIND, NULL);
	if (entry != NULL && entry->load_seq == load_seq && entry->state == SKEY_LOADING)
	{
		bool		not_an_answer = dek == NULL &&
			(sqlstate == ERRCODE_QUERY_CANCELED || sqlstate == ERRCODE_ADMIN_SHUTDOWN);

		if (entry->doomed || not_an_answer)
			shared_remove_entry(entry);
		else if (dek != NULL)
		{
			memcpy(shared_deks[entry->slot], dek, KMS_DEK_LEN);
			entry->state = SKEY_READY;
			entry->loaded_at = GetCurrentTimestamp();
		}
		else
		{
			explicit_bzero(shared_deks[entry->slot], KMS_DEK_LEN);
			entry->state = SKEY_FAILED;
			entry->failed_sqlstate = sqlstate;
			entry->loaded_at = GetCurrentTimestamp();
		}
	}
	LWLockRelease(shared->lock);
	ConditionVariableBroadcast(&shared->loaded_cv);
}

/* Wipe the L2 entries of one tenant (version 0: all versions) in this database. */
static void
shared_purge(int32 tenant_id, uint32 version)
{
	HASH_SEQ_STATUS scan;
	SharedKeyEntry *entry;

	if (shared == NULL)
		return;
	LWLockAcquire(shared->lock, LW_EXCLUSIVE);
	hash_seq_init(&scan, shared_hash);
	while ((entry = hash_seq_search(&scan)) != NULL)
	{
		if (entry->tag.dbid == MyDatabaseId && entry->tag.tenant_id == tenant_id &&
			(version == 0 || entry->tag.version == version))
		{
			if (entry->state == SKEY_LOADING)
				entry->doomed = true;
			else
				shared_remove_entry(entry);
		}
	}
	LWLockRelease(shared->lock);
}

static uint64
wrapped_hash(const bytea *wrapped)
{
	return DatumGetUInt64(hash_any_extended((const unsigned char *) VARDATA_ANY(wrapped),
											VARSIZE_ANY_EXHDR(wrapped), 0));
}

static void
make_tag(SharedKeyTag *tag, int32 tenant_id, uint32 version, uint64 hash)
{
	memset(tag, 0, sizeof(*tag));
	tag->dbid = MyDatabaseId;
	tag->tenant_id = tenant_id;
	tag->version = version;
	tag->wrapped_hash = hash;
}

/*
 * A DEK the KMS just generated goes straight into the shared cache, saving the first
 * Decrypt.  Should the creating transaction roll back, the entry names a tenant id
 * that is never used again and simply ages out.
 */
void
keycache_prime(int32 tenant_id, uint32 version, const bytea *wrapped,
			   const uint8 dek[KMS_DEK_LEN])
{
	SharedKeyTag tag;
	SharedKeyEntry *entry;
	bool		found;

	if (shared == NULL)
		return;
	make_tag(&tag, tenant_id, version, wrapped_hash(wrapped));
	LWLockAcquire(shared->lock, LW_EXCLUSIVE);
	entry = hash_search(shared_hash, &tag, HASH_FIND, NULL);
	if (entry == NULL && shared_make_room(GetCurrentTimestamp()))
	{
		entry = hash_search(shared_hash, &tag, HASH_ENTER, &found);
		entry->slot = ring_take(&shared->key_ring, entry);
		pg_atomic_init_u64(&entry->last_used, (uint64) GetCurrentTimestamp());
		memcpy(shared_deks[entry->slot], dek, KMS_DEK_LEN);
		entry->state = SKEY_READY;
		entry->doomed = false;
		entry->load_seq = 0;
		entry->failed_sqlstate = 0;
		entry->loaded_at = GetCurrentTimestamp();
	}
	LWLockRelease(shared->lock);
}

/* ---------------------------------------------------------------------------
 * Tenant states in L2
 */
typedef struct TenantView
{
	int32		tenant_id;
	TenantState state;
	uint32		active_version;
	uint32		version;		/* the version asked for (the active one for 0) */
	bool		has_version;	/* its state is known: */
	KeyState	version_state;
	uint64		wrapped_hash;
} TenantView;

static void
make_tenant_tag(SharedTenantTag *tag, const char *name, size_t name_len)
{
	memset(tag, 0, sizeof(*tag));
	tag->dbid = MyDatabaseId;
	tag->tenant_relid = keystore_tenant_relid();
	tag->name_hash = DatumGetUInt64(hash_any_extended((const unsigned char *) name,
													  (int) name_len, 0));
}

static inline bool
tenant_entry_matches(const SharedTenantEntry *entry, const char *name, size_t name_len)
{
	return entry->name_len == name_len && memcmp(entry->name, name, name_len) == 0;
}

/*
 * The state of tenant `name` and of its `version` (0: the active one) as L2 holds them
 * for shared generation `generation`.  False when L2 does not know the tenant at that
 * generation; has_version is false when it knows the tenant but not that version.
 */
static bool
shared_tenant_find(const SharedTenantTag *tag, const char *name, size_t name_len,
				   uint64 generation, uint32 version, TenantView *view)
{
	SharedTenantEntry *entry;
	bool		found = false;

	LWLockAcquire(shared->lock, LW_SHARED);
	entry = hash_search(shared_tenants, tag, HASH_FIND, NULL);
	if (entry != NULL && entry->generation == generation &&
		tenant_entry_matches(entry, name, name_len))
	{
		found = true;
		view->tenant_id = entry->tenant_id;
		view->state = entry->state;
		view->active_version = entry->active_version;
		if (version == 0)
			version = entry->active_version;
		view->version = version;
		view->has_version = false;
		for (int i = 0; i < entry->nversions; i++)
			if (entry->versions[i].version == version)
			{
				view->has_version = true;
				view->version_state = entry->versions[i].state;
				view->wrapped_hash = entry->versions[i].wrapped_hash;
				break;
			}
		pg_atomic_write_u64(&entry->last_used, (uint64) GetCurrentTimestamp());
	}
	LWLockRelease(shared->lock);
	return found;
}

static EvictVerdict
tenant_victim_verdict(void *owner, TimestampTz now, uint64 *last_used)
{
	*last_used = pg_atomic_read_u64(&((SharedTenantEntry *) owner)->last_used);
	return EVICT_IF_OLDEST;
}

/*
 * Record what the key store said at shared generation `generation`: the tenant's state
 * and, if `rec->key_found`, that of one version.  Exclusive lock, no I/O.
 */
static void
shared_tenant_publish(const SharedTenantTag *tag, const char *name, size_t name_len,
					  uint64 generation, const TenantKeyRecord *rec)
{
	SharedTenantEntry *entry;
	bool		found;

	LWLockAcquire(shared->lock, LW_EXCLUSIVE);
	entry = hash_search(shared_tenants, tag, HASH_FIND, NULL);
	if (entry == NULL)
	{
		if (shared->tenant_ring.nfree == 0)
		{
			SharedTenantEntry *victim = ring_victim(&shared->tenant_ring,
													tenant_victim_verdict, 0);

			if (victim == NULL)
			{
				LWLockRelease(shared->lock);
				return;
			}
			ring_give_back(&shared->tenant_ring, victim->slot);
			hash_search(shared_tenants, &victim->tag, HASH_REMOVE, NULL);
		}
		entry = hash_search(shared_tenants, tag, HASH_ENTER, &found);
		entry->slot = ring_take(&shared->tenant_ring, entry);
		pg_atomic_init_u64(&entry->last_used, (uint64) GetCurrentTimestamp());
		entry->generation = generation + 1;	/* anything but `generation`: reset below */
	}
	if (entry->generation != generation || !tenant_entry_matches(entry, name, name_len))
	{
		/* Older news, or another name with the same hash: start over. */
		entry->generation = generation;
		entry->name_len = (uint32) name_len;
		memcpy(entry->name, name, name_len);
		entry->nversions = 0;
		entry->next_version_slot = 0;
	}
	entry->tenant_id = rec->tenant_id;
	entry->state = rec->state;
	entry->active_version = (uint32) rec->active_version;
	if (rec->key_found)
	{
		SharedVersionState *vs = NULL;

		for (int i = 0; i < entry->nversions; i++)
			if (entry->versions[i].version == (uint32) rec->version)
				vs = &entry->versions[i];
		if (vs == NULL && entry->nversions < SHARED_TENANT_VERSIONS)
			vs = &entry->versions[entry->nversions++];
		else if (vs == NULL)
		{
			vs = &entry->versions[entry->next_version_slot];
			entry->next_version_slot = (entry->next_version_slot + 1) % SHARED_TENANT_VERSIONS;
		}
		vs->version = (uint32) rec->version;
		vs->state = rec->key.state;
		vs->wrapped_hash = rec->key.wrapped ? wrapped_hash(rec->key.wrapped) : 0;
	}
	LWLockRelease(shared->lock);
}

/* ---------------------------------------------------------------------------
 * Loading a DEK: L2, else the key store and the KMS.
 */
static void
record_lookup(bool hit)
{
	KeyCacheStats *s = stats_begin();

	if (hit)
		s->hits++;
	else
		s->misses++;
	stats_end();
}

static bool exit_callback_registered = false;

static void
keycache_backend_exit(int code, Datum arg)
{
	if (inflight_active && shared != NULL)
	{
		inflight_active = false;
		shared_finish_load(&inflight_tag, inflight_seq, NULL, ERRCODE_ADMIN_SHUTDOWN);
	}
}

/*
 * Unwrap through L2 with single-flight: `rec` is the key store's record of the key.
 * *loaded_at says when it was unwrapped, so the backend's copy expires with the
 * shared one and never outlives it.
 */
static void
load_dek(const char *tenant, int32 tenant_id, uint32 version, const DataKeyRecord *rec,
		 uint8 dek[KMS_DEK_LEN], TimestampTz *loaded_at)
{
	SharedKeyTag tag;
	volatile uint32 load_seq = 0;
	uint32		seq = 0;
	MemoryContext volatile caller_cxt = CurrentMemoryContext;
	LookupResult lr;

	*loaded_at = GetCurrentTimestamp();

	if (shared == NULL)
	{
		record_lookup(false);
		envelope_kms_decrypt(rec->kms_provider, rec->kms_key, tenant, version,
							 rec->wrapped, dek);
		return;
	}

	make_tag(&tag, tenant_id, version, wrapped_hash(rec->wrapped));

	lr = shared_lookup(&tag, dek, &seq, loaded_at);
	load_seq = seq;
	record_lookup(lr == LOOKUP_HIT);
	if (lr == LOOKUP_HIT)
		return;

	if (lr == LOOKUP_UNCACHED)
	{
		envelope_kms_decrypt(rec->kms_provider, rec->kms_key, tenant, version,
							 rec->wrapped, dek);
		return;
	}

	if (!exit_callback_registered)
	{
		before_shmem_exit(keycache_backend_exit, (Datum) 0);
		exit_callback_registered = true;
	}
	inflight_tag = tag;
	inflight_seq = seq;
	inflight_active = true;
	caller_cxt = CurrentMemoryContext;
	PG_TRY();
	{
		envelope_kms_decrypt(rec->kms_provider, rec->kms_key, tenant, version,
							 rec->wrapped, dek);
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		/* CopyErrorData must not run in ErrorContext. */
		MemoryContextSwitchTo(caller_cxt);
		edata = CopyErrorData();
		inflight_active = false;
		shared_finish_load(&tag, load_seq, NULL, edata->sqlerrcode);
		FreeErrorData(edata);
		PG_RE_THROW();
	}
	PG_END_TRY();
	inflight_active = false;
	shared_finish_load(&tag, load_seq, dek, 0);
}

/* ---------------------------------------------------------------------------
 * L1
 */
static void
l1_free_versions(LocalTenant *lt)
{
	for (int i = 0; i < lt->nversions; i++)
		cipher_key_free(&lt->versions[i].key);
	lt->nversions = 0;
}

static void
l1_reset(void)
{
	if (local_tenants != NULL)
	{
		HASH_SEQ_STATUS scan;
		LocalTenant *lt;

		hash_seq_init(&scan, local_tenants);
		while ((lt = hash_seq_search(&scan)) != NULL)
			l1_free_versions(lt);
		hash_destroy(local_tenants);
		local_tenants = NULL;
	}
	cipher_key_free(&l1_spare);
	if (local_cxt != NULL)
		MemoryContextReset(local_cxt);
	dlist_init(&l1_lru);
	last_tenant = NULL;
	last_tenant_len = 0;
	l1_front_clear();
}

/*
 * Drop the least recently used tenant from a full L1, in O(1).  Its first contexts
 * become the spare that the next set-up re-keys; the rest are freed.
 */
static void
l1_evict_one(void)
{
	LocalTenant *victim = dlist_container(LocalTenant, lru, dlist_tail_node(&l1_lru));
	L1FrontSlot *front = &l1_front[l1_front_index(victim->name, victim->name_len)];

	cipher_key_free(&l1_spare);
	for (int i = 0; i < victim->nversions; i++)
	{
		CipherKey  *key = &victim->versions[i].key;

		if (l1_spare.enc == NULL && key->enc != NULL)
		{
			l1_spare.enc = key->enc;
			key->enc = NULL;
		}
		if (l1_spare.dec == NULL && key->dec != NULL)
		{
			l1_spare.dec = key->dec;
			key->dec = NULL;
		}
		cipher_key_free(key);
	}
	victim->nversions = 0;
	if (victim->versions)
		pfree(victim->versions);
	dlist_delete(&victim->lru);
	if (front->lt == victim)
		front->lt = NULL;
	if (last_tenant == victim)
		last_tenant = NULL;
	hash_search(local_tenants, victim->name, HASH_REMOVE, NULL);
}

static void
l1_ensure(void)
{
	HASHCTL		info;

	if (local_tenants != NULL)
		return;
	if (local_cxt == NULL)
		local_cxt = AllocSetContextCreate(TopMemoryContext, "pg_envelope key cache",
										  ALLOCSET_SMALL_SIZES);
	memset(&info, 0, sizeof(info));
	info.keysize = ENVELOPE_TENANT_MAX + 1;
	info.entrysize = sizeof(LocalTenant);
	info.hcxt = local_cxt;
	local_tenants = hash_create("pg_envelope tenants", 64, &info,
								HASH_ELEM | HASH_STRINGS | HASH_CONTEXT);
	dlist_init(&l1_lru);
}

static void
raise_tenant_unusable(const LocalTenant *lt)
{
	if (lt->state == TENANT_DISABLED)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("tenant \"%s\" is disabled", lt->name),
				 errhint("An envelope_admin can run envelope.enable_tenant()."),
				 errhidestmt(true)));
	ereport(ERROR,
			(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
			 errmsg("tenant \"%s\" has been destroyed", lt->name),
			 errdetail("Its data keys were erased; its data can no longer be decrypted."),
			 errhidestmt(true)));
}

static void
raise_no_tenant(const char *name)
{
	ereport(ERROR,
			(errcode(ERRCODE_UNDEFINED_OBJECT),
			 errmsg("tenant \"%s\" does not exist", name),
			 errhint("An envelope_admin can create it with envelope.create_tenant()."),
			 errhidestmt(true)));
}

/*
 * Read tenant `name` and its `version` (0: active) from the key store, and tell L2.
 * `generation` is the shared generation seen before reading: a change that commits
 * after it bumps the generation, so what is published here is never taken for newer.
 * A parallel query reads with its statement's snapshot, which may be older than the
 * generation: what it reads is used by this statement only, never published.
 * A destroyed tenant or key seen here is wiped from L2: the committing backend does
 * that, but a standby or a key store edited by hand has no such backend.
 */
static void
read_key_store(const char *name, size_t name_len, uint32 version, uint64 generation,
			   TenantKeyRecord *rec)
{
	if (!keystore_read_tenant_key(name, (int32) version, rec))
		raise_no_tenant(name);
	if (rec->state == TENANT_DESTROYED)
		shared_purge(rec->tenant_id, 0);
	else if (rec->key_found && (rec->key.state != KEY_ACTIVE || rec->key.wrapped == NULL))
		shared_purge(rec->tenant_id, (uint32) rec->version);
	if (shared != NULL && !IsInParallelMode())
	{
		SharedTenantTag tag;

		make_tenant_tag(&tag, name, name_len);
		shared_tenant_publish(&tag, name, name_len, generation, rec);
	}
}

static LocalVersion *l1_find_version(LocalTenant *lt, uint32 version);
static LocalVersion *l1_add_version(LocalTenant *lt, uint32 version);

/*
 * The L1 entry of a tenant, valid at the current generation, or an error if the tenant
 * does not exist or (with must_be_active) is not active.  When the state has to be
 * looked up, that of `version` (0: the active one) is looked up with it.
 */
static LocalTenant *
l1_tenant_entry(const char *tenant, size_t tenant_len, bool must_be_active, uint32 version)
{
	uint64		local_gen = l1_local_generation;
	uint64		shared_gen = shared_generation();
	uint64		generation = local_gen + shared_gen;
	L1FrontSlot *front;
	char		key[ENVELOPE_TENANT_MAX + 1];
	LocalTenant *lt;
	bool		found;
	TenantView	view;

	/* The hot path: the same tenant as the previous row. */
	if (last_tenant != NULL && last_tenant->generation == generation &&
		last_tenant_len == tenant_len &&
		(last_tenant->state == TENANT_ACTIVE || !must_be_active) &&
		memcmp(last_tenant->name, tenant, tenant_len) == 0)
		return last_tenant;

	/* Next hottest: a tenant this backend has seen, through the front array. */
	front = &l1_front[l1_front_index(tenant, tenant_len)];
	if (front->lt != NULL && front->name_len == tenant_len &&
		front->lt->generation == generation &&
		(front->lt->state == TENANT_ACTIVE || !must_be_active) &&
		memcmp(front->lt->name, tenant, tenant_len) == 0)
	{
		lt = front->lt;
		dlist_move_head(&l1_lru, &lt->lru);
		last_tenant = lt;
		last_tenant_len = tenant_len;
		return lt;
	}

	envelope_check_tenant(tenant, tenant_len);
	memcpy(key, tenant, tenant_len);
	key[tenant_len] = '\0';

	/*
	 * A session that starts on a standby has missed the invalidations replayed before
	 * it, and other sessions may not have processed them yet: the tenant states in L2
	 * may predate a replayed revocation.  Its first look therefore makes them stale.
	 */
	if (!l1_synced_with_standby)
	{
		l1_synced_with_standby = true;
		if (shared != NULL && RecoveryInProgress())
		{
			pg_atomic_fetch_add_u64(&shared->generation, 1);
			shared_gen = shared_generation();
			generation = local_gen + shared_gen;
		}
	}

	l1_ensure();
	lt = hash_search(local_tenants, key, HASH_FIND, NULL);
	if (lt == NULL || lt->generation != generation)
	{
		SharedTenantTag tag;

		/* SPI may process invalidations; no pointer into the hash survives it. */
		last_tenant = NULL;
		if (shared != NULL)
			make_tenant_tag(&tag, key, tenant_len);
		if (shared == NULL ||
			!shared_tenant_find(&tag, key, tenant_len, shared_gen, version, &view))
		{
			TenantKeyRecord rec;

			/* Not in L2 at this generation: ask the key store (prepared plan). */
			read_key_store(key, tenant_len, version, shared_gen, &rec);
			view.tenant_id = rec.tenant_id;
			view.state = rec.state;
			view.active_version = (uint32) rec.active_version;
			view.version = (uint32) rec.version;
			view.has_version = rec.key_found;
			view.version_state = rec.key.wrapped ? rec.key.state : KEY_DESTROYED;
			view.wrapped_hash = rec.key.wrapped ? wrapped_hash(rec.key.wrapped) : 0;
		}

		l1_ensure();
		lt = hash_search(local_tenants, key, HASH_FIND, NULL);
		if (lt == NULL)
		{
			if (hash_get_num_entries(local_tenants) >= L1_MAX_TENANTS)
				l1_evict_one();
			lt = hash_search(local_tenants, key, HASH_ENTER, &found);
			lt->name_len = (uint32) tenant_len;
			lt->nversions = lt->maxversions = 0;
			lt->versions = NULL;
			lt->tenant_id = view.tenant_id;
			dlist_push_head(&l1_lru, &lt->lru);
		}
		else if (lt->tenant_id != view.tenant_id)
			l1_free_versions(lt);	/* dropped and re-created under the same name */
		lt->tenant_id = view.tenant_id;
		lt->state = view.state;
		lt->active_version = view.active_version;
		/* Versions must be re-checked at this generation too. */
		for (int i = 0; i < lt->nversions; i++)
			lt->versions[i].state = (KeyState) 0;
		if (view.has_version)
		{
			LocalVersion *lv = l1_find_version(lt, view.version);

			if (lv == NULL)
				lv = l1_add_version(lt, view.version);
			if (lv->wrapped_hash != view.wrapped_hash)
			{
				cipher_key_free(&lv->key);	/* another key under the same number */
				lv->wrapped_hash = view.wrapped_hash;
			}
			lv->state = view.version_state;
		}
		lt->generation = generation;
		lt->shared_generation = shared_gen;
	}
	dlist_move_head(&l1_lru, &lt->lru);

	if (lt->state != TENANT_ACTIVE && must_be_active)
		raise_tenant_unusable(lt);

	last_tenant = lt;
	last_tenant_len = tenant_len;
	front->lt = lt;
	front->name_len = (uint32) tenant_len;
	return lt;
}

static LocalVersion *
l1_find_version(LocalTenant *lt, uint32 version)
{
	for (int i = 0; i < lt->nversions; i++)
		if (lt->versions[i].version == version)
			return &lt->versions[i];
	return NULL;
}

static LocalVersion *
l1_add_version(LocalTenant *lt, uint32 version)
{
	LocalVersion *lv;

	if (lt->nversions == lt->maxversions)
	{
		int			newmax = lt->maxversions == 0 ? 2 : lt->maxversions * 2;

		lt->versions = lt->versions == NULL ?
			MemoryContextAllocZero(local_cxt, sizeof(LocalVersion) * newmax) :
			repalloc(lt->versions, sizeof(LocalVersion) * newmax);
		lt->maxversions = newmax;
	}
	lv = &lt->versions[lt->nversions++];
	memset(lv, 0, sizeof(*lv));
	lv->version = version;
	return lv;
}

static void
raise_key_unusable(const char *tenant, uint32 version, KeyState state, bool exists)
{
	if (!exists)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("key version %u of tenant \"%s\" does not exist", version, tenant),
				 errdetail("The value was encrypted with a key this database does not hold."),
				 errhidestmt(true)));
	if (state == KEY_RETIRED)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("key version %u of tenant \"%s\" is retired", version, tenant),
				 errhint("Values still under a retired version must be re-encrypted under the active version before it is retired."),
				 errhidestmt(true)));
	ereport(ERROR,
			(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
			 errmsg("key version %u of tenant \"%s\" has been destroyed", version, tenant),
			 errhidestmt(true)));
}

/*
 * Slow path of l1_key: check the version's state at the tenant's generation and set up
 * the context `use` needs.  L2 answers when it holds the key (no SPI, no KMS); the key
 * store is read only for what L2 does not know, and the KMS asked only for a key that
 * is not in L2.
 */
static const CipherKey *
l1_fill(LocalTenant *lt, uint32 version, CipherUse use)
{
	char		tenant[ENVELOPE_TENANT_MAX + 1];
	size_t		tenant_len = lt->name_len;
	int32		tenant_id = lt->tenant_id;
	uint64		shared_gen = lt->shared_generation;
	LocalVersion *lv = l1_find_version(lt, version);
	TenantKeyRecord rec;
	bool		have_rec = false;
	KeyState	state;
	uint64		hash;
	uint8		dek[KMS_DEK_LEN];
	TimestampTz loaded_at;
	TimestampTz now = GetCurrentStatementStartTimestamp();
	bool		have_dek = false;
	CipherStatus cs;

	strlcpy(tenant, lt->name, sizeof(tenant));

	/* 1. The version's state and which DEK it is, at the tenant's generation. */
	if (lv != NULL && lv->state != 0)
	{
		state = lv->state;
		hash = lv->wrapped_hash;
	}
	else
	{
		TenantView	view;
		SharedTenantTag tag;

		if (shared != NULL)
			make_tenant_tag(&tag, tenant, tenant_len);
		if (shared != NULL &&
			shared_tenant_find(&tag, tenant, tenant_len, shared_gen, version, &view) &&
			view.has_version && view.tenant_id == tenant_id)
		{
			state = view.version_state;
			hash = view.wrapped_hash;
		}
		else
		{
			read_key_store(tenant, tenant_len, version, shared_gen, &rec);
			if (rec.tenant_id != tenant_id)
				elog(ERROR, "tenant \"%s\" changed while its key was read", tenant);
			if (!rec.key_found)
				raise_key_unusable(tenant, version, 0, false);
			have_rec = true;
			state = rec.key.state;
			hash = rec.key.wrapped ? wrapped_hash(rec.key.wrapped) : 0;
			if (rec.key.wrapped == NULL)
				state = KEY_DESTROYED;
		}
		/* SPI may have run invalidation callbacks: find the entry again. */
		lt = hash_search(local_tenants, tenant, HASH_FIND, NULL);
		if (lt == NULL || lt->tenant_id != tenant_id)
			elog(ERROR, "pg_envelope key cache entry of tenant \"%s\" vanished", tenant);
		lv = l1_find_version(lt, version);
		if (lv == NULL)
			lv = l1_add_version(lt, version);
		if (lv->wrapped_hash != hash)
		{
			cipher_key_free(&lv->key);	/* another key under the same number */
			lv->wrapped_hash = hash;
		}
		lv->state = state;
	}
	if (state != KEY_ACTIVE)
		raise_key_unusable(tenant, version, state, true);

	/* 2. The context `use` needs, from the shared copy of the DEK. */
	if (lv->expires_at <= now)
		cipher_key_free(&lv->key);	/* the shared copy it came from has expired */
	if (cipher_key_ready(&lv->key, use))
		return &lv->key;

	if (shared != NULL)
	{
		SharedKeyTag tag;

		make_tag(&tag, tenant_id, version, hash);
		have_dek = shared_peek(&tag, dek, &loaded_at);
		if (have_dek)
			record_lookup(true);
	}
	if (!have_dek)
	{
		if (!have_rec)
		{
			read_key_store(tenant, tenant_len, version, shared_gen, &rec);
			if (rec.tenant_id != tenant_id || !rec.key_found || rec.key.wrapped == NULL ||
				rec.key.state != KEY_ACTIVE || wrapped_hash(rec.key.wrapped) != hash)
				elog(ERROR, "key version %u of tenant \"%s\" changed while it was read",
					 version, tenant);
		}
		load_dek(tenant, tenant_id, version, &rec.key, dek, &loaded_at);
		lt = hash_search(local_tenants, tenant, HASH_FIND, NULL);
		if (lt == NULL || lt->tenant_id != tenant_id ||
			(lv = l1_find_version(lt, version)) == NULL)
		{
			explicit_bzero(dek, sizeof(dek));
			elog(ERROR, "pg_envelope key cache entry of tenant \"%s\" vanished", tenant);
		}
	}

	cs = cipher_key_add(&lv->key, use, dek, &l1_spare);
	explicit_bzero(dek, sizeof(dek));
	cipher_key_free(&l1_spare);
	if (cs != CIPHER_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not set up a cipher context for a data key"),
				 errhidestmt(true)));
	/* Several contexts may come from several shared copies: the earliest expiry rules. */
	{
		TimestampTz expires = loaded_at + (TimestampTz) envelope_cache_ttl * USECS_PER_SEC;

		if (lv->expires_at == 0 || lv->expires_at <= now || expires < lv->expires_at)
			lv->expires_at = expires;
	}
	last_tenant = lt;
	last_tenant_len = tenant_len;
	return &lv->key;
}

/* A ready key for (tenant, version) and `use`, through L2 and the KMS on a miss. */
static inline const CipherKey *
l1_key(LocalTenant *lt, uint32 version, CipherUse use)
{
	LocalVersion *lv = l1_find_version(lt, version);

	if (lv != NULL && lv->state == KEY_ACTIVE && cipher_key_ready(&lv->key, use) &&
		lv->expires_at > GetCurrentStatementStartTimestamp())
		return &lv->key;
	return l1_fill(lt, version, use);
}

EnvelopeKeyRef
keycache_key_for_encrypt(const char *tenant, size_t tenant_len)
{
	LocalTenant *lt = l1_tenant_entry(tenant, tenant_len, true, 0);
	EnvelopeKeyRef ref;

	ref.version = lt->active_version;
	ref.key = l1_key(lt, ref.version, CIPHER_USE_ENCRYPT);
	return ref;
}

/* The version new values use; 0 when the tenant is disabled or destroyed. */
uint32
keycache_active_version(const char *tenant, size_t tenant_len)
{
	LocalTenant *lt = l1_tenant_entry(tenant, tenant_len, false, 0);

	return lt->state == TENANT_ACTIVE ? lt->active_version : 0;
}

const CipherKey *
keycache_key_for_decrypt(const char *tenant, size_t tenant_len, uint32 version,
						 CipherUse use)
{
	return l1_key(l1_tenant_entry(tenant, tenant_len, true, version), version, use);
}

/* ---------------------------------------------------------------------------
 * Invalidation
 */
void
keycache_note_key_store_change(void)
{
	l1_pending_bump = true;
}

void
keycache_schedule_purge(int32 tenant_id, uint32 version)
{
	MemoryContext old = MemoryContextSwitchTo(TopTransactionContext);
	PendingPurge *p = palloc(sizeof(PendingPurge));

	p->tenant_id = tenant_id;
	p->version = version;
	pending_purges = lappend(pending_purges, p);
	MemoryContextSwitchTo(old);
}

static void
keycache_xact_callback(XactEvent event, void *arg)
{
	ListCell   *lc;

	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
			foreach(lc, pending_purges)
			{
				PendingPurge *p = lfirst(lc);

				shared_purge(p->tenant_id, p->version);
			}
			if (l1_pending_bump)
			{
				if (shared != NULL)
					pg_atomic_fetch_add_u64(&shared->generation, 1);
				else
					local_generation++;
			}
			break;
		case XACT_EVENT_PRE_PREPARE:

			/*
			 * The purge and the generation bump belong to this backend's commit; a
			 * prepared transaction commits elsewhere, later.  Refuse rather than let
			 * a revocation take effect late or not at all.
			 */
			if (pending_purges != NIL || l1_pending_bump)
				ereport(ERROR,
						(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
						 errmsg("cannot PREPARE a transaction that has changed the pg_envelope key store")));
			return;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
		case XACT_EVENT_PREPARE:
			break;
		default:
			return;
	}
	/* The list lived in TopTransactionContext, which is going away. */
	pending_purges = NIL;
	l1_pending_bump = false;
}

/*
 * A relcache invalidation of a key table (sent at commit by the key store trigger, and
 * replayed from WAL on a standby), or of everything: mark L1 stale.  Other relations'
 * invalidations, frequent under DDL, are ignored.
 *
 * On a primary the committing backend has already bumped the shared generation, so
 * the tenant states in L2 are stale already.  A standby has no committing backend:
 * there each backend that replays such an invalidation bumps the shared generation
 * too (a few bumps for one change, which only costs a re-read).
 */
static void
keycache_relcache_callback(Datum arg, Oid relid)
{
	if (relid != InvalidOid && !keystore_is_key_table(relid))
		return;
	l1_local_generation++;
	/* A dropped and re-created extension has new tables: look them up again. */
	keystore_forget_relations();
	if (shared != NULL && RecoveryInProgress())
		pg_atomic_fetch_add_u64(&shared->generation, 1);
}

void
keycache_init_backend(void)
{
	static bool registered = false;

	if (registered)
		return;
	RegisterXactCallback(keycache_xact_callback, NULL);
	CacheRegisterRelcacheCallback(keycache_relcache_callback, (Datum) 0);
	registered = true;
}

void
keycache_flush(void)
{
	HASH_SEQ_STATUS scan;
	SharedKeyEntry *entry;

	l1_reset();
	if (shared == NULL)
	{
		local_generation++;
		return;
	}
	LWLockAcquire(shared->lock, LW_EXCLUSIVE);
	hash_seq_init(&scan, shared_hash);
	while ((entry = hash_seq_search(&scan)) != NULL)
	{
		if (entry->tag.dbid != MyDatabaseId)
			continue;
		if (entry->state == SKEY_LOADING)
			entry->doomed = true;
		else
			shared_remove_entry(entry);
	}
	LWLockRelease(shared->lock);
	pg_atomic_fetch_add_u64(&shared->generation, 1);
}

/*
 * Zero every expired key, and forget loads that failed.  Exclusive lock, no I/O.
 * Returns how many entries were removed.
 */
int
keycache_sweep(void)
{
	HASH_SEQ_STATUS scan;
	SharedKeyEntry *entry;
	TimestampTz now = GetCurrentTimestamp();
	int			removed = 0;

	if (shared == NULL)
		return 0;
	LWLockAcquire(shared->lock, LW_EXCLUSIVE);
	hash_seq_init(&scan, shared_hash);
	while ((entry = hash_seq_search(&scan)) != NULL)
	{
		if (entry_expired(entry, now) ||
			(entry->state == SKEY_FAILED && now - entry->loaded_at > USECS_PER_SEC))
		{
			shared_remove_entry(entry);
			removed++;
		}
	}
	LWLockRelease(shared->lock);
	if (removed > 0)
	{
		KeyCacheStats *s = stats_begin();

		s->evictions += removed;
		stats_end();
	}
	return removed;
}

/* ---------------------------------------------------------------------------
 * Statistics
 */
void
keycache_record_kms_call(EnvelopeKmsOp op, bool ok, double elapsed_ms)
{
	KeyCacheStats *s = stats_begin();

	s->kms_calls[op]++;
	if (!ok)
		s->kms_errors++;
	s->kms_total_ms += elapsed_ms;
	if (elapsed_ms > s->kms_max_ms)
		s->kms_max_ms = elapsed_ms;
	stats_end();
}

void
keycache_get_stats(KeyCacheStats *out)
{
	KeyCacheStats *s = stats_begin();

	*out = *s;
	stats_end();
	if (shared != NULL)
	{
		out->capacity = shared->capacity;
		LWLockAcquire(shared->lock, LW_SHARED);
		out->entries = hash_get_num_entries(shared_hash);
		out->tenant_entries = hash_get_num_entries(shared_tenants);
		LWLockRelease(shared->lock);
		out->shared = true;
	}
	else
	{
		out->capacity = L1_MAX_TENANTS;
		out->entries = local_tenants ? hash_get_num_entries(local_tenants) : 0;
		out->tenant_entries = out->entries;
		out->shared = false;
	}
}
