/*
 * keycache_shared.c — the shared level (L2) of the key cache: plaintext DEKs and
 * tenant states in shared memory, for every backend of the cluster.  The per-backend
 * level is keycache.c; keycache_shared.h is the interface between the two.
 *
 *   keys: (database, tenant id, version, hash of the wrapped DEK) -> the 32-byte DEK.
 *      One KMS Decrypt per key per cluster, not per backend.  The DEK bytes sit in a
 *      separate page-aligned array marked MADV_DONTDUMP and locked in memory where
 *      RLIMIT_MEMLOCK allows, one cache line per slot with what serving them needs.
 *   tenants: (database, key store incarnation, tenant name) -> tenant id, state,
 *      active version and the states of a few versions, as read from the key store at
 *      a given generation, each version with a hint to its DEK's slot.  A backend whose
 *      own level misses a key that is here reads all it needs here, the DEK included,
 *      in one lookup: no SPI, no parse, no walk of any table.
 *
 * envelope.cache_size entries of each.  Both evict the least recently used of a window
 * of slots that a hand moves along (bounded work per eviction, exact LRU for caches up
 * to the window's size, and never a walk of the whole table).
 *
 * Locking protocol (one LWLock of tranche "pg_envelope"):
 *   - lookups take the lock in LW_SHARED mode, copy what they need out and release it;
 *     the entry's last-use time is set with an atomic write, which is harmless to race,
 *     and so is a tenant version's hint to the slot of its DEK (two atomic writes, of
 *     a slot and of a sequence number unique to one assignment of that slot: a hint
 *     mixed from two lookups matches no slot, see SharedVersionState);
 *   - inserts, removals, eviction, expiry and flush take it LW_EXCLUSIVE;
 *   - the statistics live under their own spinlock (stats_mutex).  It is taken while
 *     the LWLock is held, exclusively (eviction and reload counts), and on its own
 *     (hits and misses), never the other way round: nothing is done under the spinlock
 *     but a few additions;
 *   - the lock is never held across SPI, KMS or any other I/O, nor across an ereport.
 *   - single-flight: the first backend to miss a key inserts a LOADING entry, releases
 *     the lock and asks the KMS; others that find the LOADING entry sleep on a
 *     condition variable (interruptibly) until it becomes READY or FAILED.  A FAILED
 *     load is reported to the backends that waited for it and retried by the next
 *     caller.
 *   - the shared generation is an atomic counter read without the lock; see
 *     keycache.c for who bumps it.  So is the revocation epoch, bumped (before the
 *     generation) when the worker evicts the DEKs of a master key the KMS refused;
 *     the table of master keys in use has a lock of its own (kms_recheck.c), never
 *     taken together with this one.
 *
 * Every slot that is evicted, expires, is flushed or invalidated is zeroed.  Expired
 * keys are zeroed by the next lookup that meets them (with envelope.cache_grace, that
 * lookup keeps them in their slot while it asks the KMS, and puts them back for a
 * while if the KMS cannot be reached), and at the latest by the
 * "pg_envelope key cache sweeper" background worker, which wakes every tenth of
 * envelope.cache_ttl, but never more often than once a second nor less often than once
 * a minute: a key nobody uses any more does not linger.  After a crash-restart shared
 * memory is re-created, so the cache starts empty.
 */
#include "pg_envelope.h"

#include <sys/mman.h>
#include <time.h>

#include "keycache_shared.h"
#include "keycache_index.h"
#include "kms_recheck.h"

#include "miscadmin.h"
#include "pgstat.h"
#include "port/atomics.h"
#include "storage/condition_variable.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/pg_shmem.h"
#include "storage/shmem.h"
#include "storage/spin.h"
#include "common/hashfn.h"
#include "utils/hsearch.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

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
	int32		master_key;		/* kms_recheck slot of its master key, or NO_SLOT */
	bool		has_stale;		/* LOADING again, its expired DEK kept for grace */
	bool		grace_warned;	/* the WARNING of its grace has been raised */
	TimestampTz grace_until;	/* READY past cache_ttl: served until then (0: no) */
	TimestampTz loaded_at;
} SharedKeyEntry;

/*
 * The slot of a DEK: its bytes and what a lookup needs to serve them, in one cache
 * line, so that a tenant entry that knows its key's slot reaches the bytes with one
 * memory access instead of a walk of the key hash (see SharedVersionState.dek_seq).
 * Every field is written under the exclusive lock, except last_used (atomic).
 */
typedef struct SharedDekSlot
{
	uint8		dek[KMS_DEK_LEN];
	uint64		seq;			/* unique per assignment of the slot to a key; 0: free */
	TimestampTz serve_until;	/* READY: entry_expires_at(); 0 otherwise */
	pg_atomic_uint64 last_used; /* TimestampTz of the last lookup */
	uint64		unused;			/* pads the slot to a cache line */
} SharedDekSlot;

StaticAssertDecl(sizeof(SharedDekSlot) == 64, "a DEK slot is one cache line");

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

typedef struct SharedVersionState
{
	uint32		version;
	KeyState	state;
	uint64		wrapped_hash;

	/*
	 * Where this version's DEK was last found: its slot, and the sequence number the
	 * slot had then.  A hint, written under the shared lock by any lookup that found
	 * the DEK; it is used only if the slot still carries that number, which is unique
	 * to one assignment of one slot to the key (tenant_id, version, wrapped_hash),
	 * so a stale hint, or one whose two halves were written by different lookups,
	 * can only fail to match.  0: no hint.
	 */
	pg_atomic_uint32 dek_slot;
	pg_atomic_uint64 dek_seq;
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
	int			ngrants;		/* > SHARED_TENANT_GRANTS: not held, read it again */
	Oid			grant_roles[SHARED_TENANT_GRANTS];
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
	pg_atomic_uint64 revocation_epoch;	/* bumped when a master key is refused */
	pg_atomic_uint64 purge_seq; /* written under the exclusive lock: l2_purge_sequence() */
	int			capacity;
	uint64		last_dek_seq;	/* under the exclusive lock: numbers DEK slot assignments */
	SlotRing	key_ring;
	SlotRing	tenant_ring;
	slock_t		stats_mutex;
	KeyCacheStats stats;		/* under stats_mutex */
} KeyCacheShared;

static KeyCacheShared *shared = NULL;
static HTAB *shared_hash = NULL;
static HTAB *shared_tenants = NULL;
static EvictionGhost *shared_ghosts = NULL;
static SharedDekSlot *shared_slots = NULL;

/* Without preload there is no shared memory; these stand in for the shared counters. */
static KeyCacheStats local_stats;
static uint64 local_generation = 0;

static uint32 my_load_seq = 0;

/*
 * The load this backend has in flight, if any.  A FATAL error (pg_terminate_backend,
 * shutdown) during the KMS call exits without unwinding through PG_CATCH, so an exit
 * callback must publish the failure, or waiters would sleep on a LOADING entry forever.
 */
static bool inflight_active = false;
static SharedKeyTag inflight_tag;
static uint32 inflight_seq = 0;

bool
l2_available(void)
{
	return shared != NULL;
}

uint64
l2_generation(void)
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

uint64
l2_revocation_epoch(void)
{
	if (shared == NULL)
		return 0;
	/* Read after the generation that announced it (see l2_evict_master_key). */
	pg_read_barrier();
	return pg_atomic_read_u64(&shared->revocation_epoch);
}

void
l2_bump_generation(void)
{
	if (shared != NULL)
		pg_atomic_fetch_add_u64(&shared->generation, 1);
	else
		local_generation++;
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
/* The system's default huge page size (Hugepagesize in /proc/meminfo); 0 if none. */
static Size
default_huge_page_size(void)
{
	FILE	   *f = fopen("/proc/meminfo", "r");
	char		line[128];
	unsigned long kb = 0;

	if (f == NULL)
		return 0;
	while (fgets(line, sizeof(line), f) != NULL)
		if (sscanf(line, "Hugepagesize: %lu kB", &kb) == 1)
			break;
	fclose(f);
	return (Size) kb * 1024;
}

/*
 * The boundary the DEK array starts and ends on, so that madvise and mlock cover
 * exactly this array.  A segment in huge pages can be marked only in whole huge pages:
 * aligned to the base page alone, MADV_DONTDUMP fails there (EINVAL) and the keys
 * would be in core dumps.  With huge_pages = try (the default) the segment may or may
 * not get them, so anything but huge_pages = off aligns to the huge page size, at the
 * price of at most two huge pages of padding.  Both settings are fixed at server start,
 * so the size requested and the layout at start-up agree.
 */
static Size
dek_area_alignment(void)
{
	static Size alignment = 0;

	if (alignment == 0)
	{
		Size		huge = 0;

		alignment = (Size) sysconf(_SC_PAGESIZE);
		if (huge_pages != HUGE_PAGES_OFF)
			huge = huge_page_size > 0 ? (Size) huge_page_size * 1024 : default_huge_page_size();
		if (huge > alignment)
			alignment = huge;
	}
	return alignment;
}

static Size
dek_area_size(int capacity)
{
	Size		alignment = dek_area_alignment();

	/* Room to align the start, and the array rounded up to whole (huge) pages. */
	return TYPEALIGN(alignment, (Size) capacity * sizeof(SharedDekSlot)) + alignment;
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
	size = add_size(size, tenant_index_shmem_size(envelope_cache_size));
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
	Size		alignment = dek_area_alignment();
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
	shared_slots = (SharedDekSlot *) TYPEALIGN(alignment, area);
	{
		bool		index_found;
		void	   *index_area = ShmemInitStruct("pg_envelope key cache tenant index",
												 tenant_index_shmem_size(capacity),
												 &index_found);

		tenant_index_attach(index_area, capacity, !index_found);
	}

	if (!found)
	{
		shared->lock = &(GetNamedLWLockTranche("pg_envelope"))->lock;
		ConditionVariableInit(&shared->loaded_cv);
		pg_atomic_init_u64(&shared->generation, 0);
		pg_atomic_init_u64(&shared->revocation_epoch, 0);
		pg_atomic_init_u64(&shared->purge_seq, 0);
		shared->capacity = capacity;
		ring_init(&shared->key_ring, capacity);
		ring_init(&shared->tenant_ring, capacity);
		memset(shared_ghosts, 0, sizeof(EvictionGhost) * capacity);
		SpinLockInit(&shared->stats_mutex);
		memset(&shared->stats, 0, sizeof(shared->stats));
		shared->last_dek_seq = 0;
		memset(shared_slots, 0, (Size) capacity * sizeof(SharedDekSlot));
		protect_dek_area(shared_slots, TYPEALIGN(alignment, (Size) capacity * sizeof(SharedDekSlot)));
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
		SharedDekSlot *ds = &shared_slots[entry->slot];

		explicit_bzero(ds->dek, KMS_DEK_LEN);
		ds->seq = 0;
		ds->serve_until = 0;
		ring_give_back(&shared->key_ring, entry->slot);
		entry->slot = -1;
	}
	hash_search(shared_hash, &entry->tag, HASH_REMOVE, NULL);
}

/*
 * The time a lookup serves DEK copies by and stamps their last use with: the kernel's
 * coarse real-time clock, which is read from memory it keeps up to date (about 5 ns
 * here) where GetCurrentTimestamp() reads the precise clock (about 25 ns, and a lookup
 * runs for every row that misses the first level: the read showed in its profile).
 * It lags real time by at most a tick (1 to 10 ms): a key may be served that long
 * past its expiry, and its last use looks that much older, both negligible against
 * envelope.cache_ttl and the windows that compare last uses.  The statement's start
 * time, free to read, would not do: a statement running longer than the window in
 * which a key counts as in use (store_new_key) would see the keys it is using
 * evicted as unused.  Loads (and so grace), eviction and the sweeper read the precise
 * clock.
 */
static inline TimestampTz
lookup_time(void)
{
#ifdef CLOCK_REALTIME_COARSE
	struct timespec ts;

	if (clock_gettime(CLOCK_REALTIME_COARSE, &ts) == 0)
		return (TimestampTz) (ts.tv_sec - ((POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * SECS_PER_DAY)) *
			USECS_PER_SEC + ts.tv_nsec / 1000;
#endif
	return GetCurrentTimestamp();
}

static TimestampTz
ttl_usec(void)
{
	return (TimestampTz) envelope_cache_ttl * USECS_PER_SEC;
}

/* How long past its TTL a DEK may still be served while the KMS is unreachable. */
static TimestampTz
grace_usec(void)
{
	return (TimestampTz) envelope_cache_grace * USECS_PER_SEC;
}

/* Its bytes may still be served under envelope.cache_grace (if the KMS is down). */
static bool
within_grace(const SharedKeyEntry *entry, TimestampTz now)
{
	return envelope_cache_grace > 0 && now - entry->loaded_at < ttl_usec() + grace_usec();
}

/*
 * While graced, the KMS is asked again every tenth of envelope.cache_grace, at least
 * every second and at most every minute: one backend asks, the others are served.
 */
static TimestampTz
grace_retry_at(const SharedKeyEntry *entry, TimestampTz now)
{
	TimestampTz retry = Max(USECS_PER_SEC, Min(60 * USECS_PER_SEC, grace_usec() / 10));

	return Min(now + retry, entry->loaded_at + ttl_usec() + grace_usec());
}

/* A READY entry that may not be served: past cache_ttl and not (or no longer) graced. */
static bool
entry_expired(SharedKeyEntry *entry, TimestampTz now)
{
	if (entry->state != SKEY_READY || now - entry->loaded_at < ttl_usec())
		return false;
	return !(entry->grace_until != 0 && now < entry->grace_until);
}

/* When a copy handed out now must be given back (the caller's own copies expire then). */
static TimestampTz
entry_expires_at(const SharedKeyEntry *entry)
{
	if (entry->grace_until != 0)
		return entry->grace_until;
	return entry->loaded_at + ttl_usec();
}

/*
 * Give `entry` a free DEK slot under a new sequence number (slot_sync() says when it
 * may be served).  Caller holds the lock exclusively and has made room.
 */
static void
key_slot_take(SharedKeyEntry *entry, TimestampTz now)
{
	SharedDekSlot *ds;

	entry->slot = ring_take(&shared->key_ring, entry);
	ds = &shared_slots[entry->slot];
	ds->seq = ++shared->last_dek_seq;
	ds->serve_until = 0;
	pg_atomic_init_u64(&ds->last_used, (uint64) now);
}

/* After any change of the entry's state: until when its slot may be served. */
static void
slot_sync(const SharedKeyEntry *entry)
{
	shared_slots[entry->slot].serve_until =
		entry->state == SKEY_READY ? entry_expires_at(entry) : 0;
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

	*last_used = pg_atomic_read_u64(&shared_slots[entry->slot].last_used);
	if (entry->state == SKEY_LOADING)
		return EVICT_NEVER;
	if (entry->state == SKEY_FAILED || entry_expired(entry, now))
		return EVICT_AT_ONCE;
	return EVICT_IF_OLDEST;
}

static void shared_evict(SharedKeyEntry *victim, TimestampTz now);

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
	shared_evict(victim, now);
	return true;
}

/* Remove `victim` to make room, counting it.  Caller holds the lock exclusively. */
static void
shared_evict(SharedKeyEntry *victim, TimestampTz now)
{
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

/*
 * Copy a READY, unexpired DEK out; caller holds the lock (either mode).  A graced DEK
 * that one backend is trying to re-load is served to the others meanwhile: the KMS
 * already failed once, and they need not all wait for it to fail again.
 */
static bool
shared_copy_ready(SharedKeyEntry *entry, TimestampTz now, uint8 dek[KMS_DEK_LEN],
				  TimestampTz *expires_at)
{
	if (entry == NULL)
		return false;
	if (entry->state == SKEY_LOADING && entry->has_stale && entry->grace_until != 0 &&
		within_grace(entry, now))
	{
		memcpy(dek, shared_slots[entry->slot].dek, KMS_DEK_LEN);
		*expires_at = grace_retry_at(entry, now);
		return true;
	}
	if (entry->state != SKEY_READY || entry_expired(entry, now))
		return false;
	memcpy(dek, shared_slots[entry->slot].dek, KMS_DEK_LEN);
	*expires_at = entry_expires_at(entry);
	pg_atomic_write_u64(&shared_slots[entry->slot].last_used, (uint64) now);
	return true;
}

static void make_tag(SharedKeyTag *tag, int32 tenant_id, uint32 version, uint64 hash);

bool
l2_peek_key(int32 tenant_id, uint32 version, uint64 wrapped_hash, uint8 dek[KMS_DEK_LEN],
			TimestampTz *expires_at)
{
	SharedKeyTag tag;
	bool		hit;

	make_tag(&tag, tenant_id, version, wrapped_hash);
	LWLockAcquire(shared->lock, LW_SHARED);
	hit = shared_copy_ready(hash_search(shared_hash, &tag, HASH_FIND, NULL),
							lookup_time(), dek, expires_at);
	LWLockRelease(shared->lock);
	return hit;
}

/*
 * Find the DEK of `tag` in L2, waiting for a load in flight.  On LOOKUP_MUST_LOAD the
 * caller must call shared_finish_load() on every path, errors included.
 */
static LookupResult
shared_lookup(const SharedKeyTag *tag, uint8 dek[KMS_DEK_LEN], uint32 *load_seq,
			  TimestampTz *expires_at)
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
		if (shared_copy_ready(entry, now, dek, expires_at))
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
					 errmsg("could not obtain key version %u: the KMS call of another backend failed",
							tag->version),
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
		if (shared_copy_ready(entry, now, dek, expires_at))
		{
			/* Loaded by another backend between our two looks. */
			LWLockRelease(shared->lock);
			return LOOKUP_HIT;
		}
		note_reload(tag, now);
		if (entry != NULL && entry->state == SKEY_READY && within_grace(entry, now))
		{
			/* Expired, but within grace: keep its bytes in case the KMS is down. */
			entry->state = SKEY_LOADING;
			entry->has_stale = true;
			entry->doomed = false;
			entry->load_seq = ++my_load_seq + (uint32) MyProcPid * 7919;
			entry->failed_sqlstate = 0;
			slot_sync(entry);
			*load_seq = entry->load_seq;
			LWLockRelease(shared->lock);
			return LOOKUP_MUST_LOAD;
		}
		if (entry != NULL)
			shared_remove_entry(entry);
		if (!shared_make_room(now))
		{
			LWLockRelease(shared->lock);
			return LOOKUP_UNCACHED;
		}
		entry = hash_search(shared_hash, tag, HASH_ENTER, &found);
		key_slot_take(entry, now);
		entry->state = SKEY_LOADING;
		entry->doomed = false;
		entry->load_seq = ++my_load_seq + (uint32) MyProcPid * 7919;
		entry->failed_sqlstate = 0;
		entry->master_key = KMS_RECHECK_NO_SLOT;
		entry->has_stale = false;
		entry->grace_warned = false;
		entry->grace_until = 0;
		entry->loaded_at = 0;
		*load_seq = entry->load_seq;
		LWLockRelease(shared->lock);
		return LOOKUP_MUST_LOAD;
	}
}

/*
 * The SQLSTATEs of a KMS that could not be asked (network errors, 5xx, timeouts,
 * throttling: see kms_glue.c), as opposed to one that answered no.  Only these are
 * graced; a refusal never is.
 */
static bool
is_kms_outage(int sqlstate)
{
	return sqlstate == ERRCODE_SYSTEM_ERROR || sqlstate == ERRCODE_CONFIGURATION_LIMIT_EXCEEDED;
}

/* How our load ended for us. */
typedef enum FinishResult
{
	FINISH_PUBLISHED,			/* the DEK or the failure is published */
	FINISH_GRACED,				/* failed, KMS down: *stale_dek is the expired copy */
	FINISH_GRACED_FIRST			/* the same, and the first time for this key: warn */
} FinishResult;

/*
 * Publish the outcome of our load: the DEK, or the SQLSTATE of the failure.  A load
 * that was purged or flushed meanwhile is dropped instead of published, and so is one
 * that ended because *this* backend was canceled or terminated: that is no answer about
 * the key, so a waiter takes over the load rather than inherit our cancel.  A load
 * that failed because the KMS is unreachable, of a key whose expired copy is still
 * within envelope.cache_grace, puts that copy back instead, served until the next
 * retry (FINISH_GRACED; the copy and its expiry in *stale_dek, *expires_at).
 */
static FinishResult
shared_finish_load(const SharedKeyTag *tag, uint32 load_seq, const uint8 *dek, int sqlstate,
				   int32 master_key, uint8 *stale_dek, TimestampTz *expires_at)
{
	SharedKeyEntry *entry;
	FinishResult result = FINISH_PUBLISHED;
	TimestampTz now = GetCurrentTimestamp();

	LWLockAcquire(shared->lock, LW_EXCLUSIVE);
	entry = hash_search(shared_hash, tag, HASH_FIND, NULL);
	if (entry != NULL && entry->load_seq == load_seq && entry->state == SKEY_LOADING)
	{
		bool		not_an_answer = dek == NULL &&
			(sqlstate == ERRCODE_QUERY_CANCELED || sqlstate == ERRCODE_ADMIN_SHUTDOWN);

		if (entry->doomed)
			shared_remove_entry(entry);
		else if (not_an_answer && entry->has_stale)
		{
			entry->state = SKEY_READY;	/* as it was: expired, and a waiter reloads */
			entry->has_stale = false;
			slot_sync(entry);
		}
		else if (not_an_answer)
			shared_remove_entry(entry);
		else if (dek != NULL)
		{
			memcpy(shared_slots[entry->slot].dek, dek, KMS_DEK_LEN);
			entry->state = SKEY_READY;
			entry->master_key = master_key;
			entry->has_stale = false;
			entry->grace_warned = false;
			entry->grace_until = 0;
			entry->loaded_at = now;
			slot_sync(entry);
		}
		else if (entry->has_stale && is_kms_outage(sqlstate) && within_grace(entry, now))
		{
			KeyCacheStats *s;

			entry->state = SKEY_READY;
			entry->has_stale = false;
			entry->grace_until = grace_retry_at(entry, now);
			memcpy(stale_dek, shared_slots[entry->slot].dek, KMS_DEK_LEN);
			*expires_at = entry->grace_until;
			slot_sync(entry);
			result = entry->grace_warned ? FINISH_GRACED : FINISH_GRACED_FIRST;
			entry->grace_warned = true;
			s = stats_begin();
			s->graced_loads++;
			stats_end();
		}
		else
		{
			explicit_bzero(shared_slots[entry->slot].dek, KMS_DEK_LEN);
			entry->state = SKEY_FAILED;
			slot_sync(entry);
			entry->has_stale = false;
			entry->grace_until = 0;
			entry->failed_sqlstate = sqlstate;
			entry->loaded_at = now;
		}
	}
	LWLockRelease(shared->lock);
	ConditionVariableBroadcast(&shared->loaded_cv);
	return result;
}

uint64
l2_purge_sequence(void)
{
	if (shared == NULL)
		return 0;
	return pg_atomic_read_u64(&shared->purge_seq);
}

/* Caller holds the lock exclusively and is about to remove keys. */
static inline void
purge_sequence_bump(void)
{
	pg_atomic_fetch_add_u64(&shared->purge_seq, 1);
}

void
l2_purge(int32 tenant_id, uint32 version)
{
	HASH_SEQ_STATUS scan;
	SharedKeyEntry *entry;

	if (shared == NULL)
		return;
	LWLockAcquire(shared->lock, LW_EXCLUSIVE);
	purge_sequence_bump();
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

void
l2_purge_key(int32 tenant_id, uint32 version, uint64 wrapped_hash)
{
	SharedKeyTag tag;
	bool		cached;

	if (shared == NULL)
		return;
	make_tag(&tag, tenant_id, version, wrapped_hash);
	/* Usually not there: look under the shared lock before taking the exclusive one. */
	LWLockAcquire(shared->lock, LW_SHARED);
	cached = hash_search(shared_hash, &tag, HASH_FIND, NULL) != NULL;
	LWLockRelease(shared->lock);
	if (!cached)
		return;
	LWLockAcquire(shared->lock, LW_EXCLUSIVE);
	purge_sequence_bump();
	{
		SharedKeyEntry *entry = hash_search(shared_hash, &tag, HASH_FIND, NULL);

		if (entry != NULL && entry->state == SKEY_LOADING)
			entry->doomed = true;
		else if (entry != NULL)
			shared_remove_entry(entry);
	}
	LWLockRelease(shared->lock);
}

uint64
l2_wrapped_hash(const bytea *wrapped)
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
 * DEKs the KMS generated in a transaction that has just committed go into the shared
 * cache (the first use then needs no Decrypt), keyed like any other and expiring
 * cache_ttl after they were made (their master key was noted in use then: a key must
 * not outlive its master key's re-check).  Called from the commit callback, where
 * nothing may raise an ERROR: nothing here allocates (HASH_ENTER_NULL) or waits but
 * for the lock.  A key takes a free slot, or one whose key has expired or failed, or
 * the least recently used of the eviction window if that key was not used within the
 * last NEW_KEY_RECENT_USE; else the store gives up: a rotation of 50,000 tenants must
 * not evict the keys the other sessions are working with for keys that may not be
 * used for hours, whose first use can still unwrap them.  A key already there
 * (another backend loaded it since the commit) is left as it is.
 *
 * Two removals may have run since the keys were made, and must not be undone: the
 * eviction of a refused master key's keys (the revocation epoch moved, compared here
 * under the lock, which that eviction bumps it under), and a purge or flush (the purge
 * sequence moved since PRE_COMMIT: a destroy_tenant committed after this transaction
 * became visible may have found nothing to purge).  Either keeps the key out, at the
 * cost of one unwrap at its first use.
 */
static TimestampTz
new_key_recent_use(void)
{
	/* As often as the sweeper wakes: a tenth of cache_ttl, between 1 s and 1 min. */
	return Max(USECS_PER_SEC, Min(60 * USECS_PER_SEC, ttl_usec() / 10));
}

/* One new key; false when there was no room.  Caller holds the lock exclusively. */
static bool
store_new_key(const NewDataKey *key, TimestampTz now)
{
	SharedKeyTag tag;
	SharedKeyEntry *entry;
	bool		found;

	if (pg_atomic_read_u64(&shared->revocation_epoch) != key->revocation_epoch ||
		now - key->made_at >= ttl_usec())
		return true;			/* refused since, or expired: not this one */
	make_tag(&tag, key->tenant_id, key->version, key->wrapped_hash);
	if (hash_search(shared_hash, &tag, HASH_FIND, NULL) != NULL)
		return true;
	if (shared->key_ring.nfree == 0)
	{
		SharedKeyEntry *victim = ring_victim(&shared->key_ring, key_victim_verdict, now);

		if (victim == NULL ||
			(victim->state == SKEY_READY && !entry_expired(victim, now) &&
			 (TimestampTz) pg_atomic_read_u64(&shared_slots[victim->slot].last_used) >
			 now - new_key_recent_use()))
			return false;
		shared_evict(victim, now);
	}
	entry = hash_search(shared_hash, &tag, HASH_ENTER_NULL, &found);
	if (entry == NULL)
		return false;
	key_slot_take(entry, now);
	memcpy(shared_slots[entry->slot].dek, key->dek, KMS_DEK_LEN);
	entry->state = SKEY_READY;
	entry->doomed = false;
	entry->load_seq = 0;
	entry->failed_sqlstate = 0;
	entry->master_key = key->master_key;
	entry->has_stale = false;
	entry->grace_warned = false;
	entry->grace_until = 0;
	entry->loaded_at = key->made_at;
	slot_sync(entry);
	return true;
}

bool
l2_store_new_keys(const NewDataKey *const *keys, int n, uint64 purge_seq)
{
	TimestampTz now = GetCurrentTimestamp();
	bool		room = true;

	Assert(n <= L2_NEW_KEYS_PER_LOCK);
	if (shared == NULL)
		return false;
	LWLockAcquire(shared->lock, LW_EXCLUSIVE);
	if (pg_atomic_read_u64(&shared->purge_seq) != purge_seq)
		room = false;
	for (int i = 0; room && i < n; i++)
		room = store_new_key(keys[i], now);
	LWLockRelease(shared->lock);
	return room;
}

/* ---------------------------------------------------------------------------
 * Tenant states
 */
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
 * Copy the DEK in `slot` if the slot still carries sequence number `seq` (the number
 * is the slot's only while it holds that one key: key_slot_take) and may be served at
 * `now`.  Caller holds the lock in either mode.
 */
static bool
slot_copy_if_still(uint32 slot, uint64 seq, TimestampTz now, SharedDekCopy *out)
{
	SharedDekSlot *ds;

	if (seq == 0 || slot >= (uint32) shared->capacity)
		return false;
	ds = &shared_slots[slot];
	if (ds->seq != seq || now >= ds->serve_until)
		return false;
	memcpy(out->dek, ds->dek, KMS_DEK_LEN);
	out->expires_at = ds->serve_until;
	pg_atomic_write_u64(&ds->last_used, (uint64) now);
	return true;
}

/*
 * Copy the DEK of (tenant_id, version, wrapped_hash) if it is ready: from the slot the
 * hint (slot, seq, read by the caller from hint_slot and hint_seq) names while the
 * slot still holds it (one cache line), else through the key hash, leaving a new hint
 * for the next lookup.  Caller holds the lock in either mode.
 */
static bool
copy_dek_through_hint(pg_atomic_uint32 *hint_slot, pg_atomic_uint64 *hint_seq,
					  uint32 slot, uint64 seq, int32 tenant_id, uint32 version,
					  uint64 wrapped_hash, TimestampTz now, SharedDekCopy *out)
{
	SharedKeyTag tag;
	SharedKeyEntry *entry;

	if (slot_copy_if_still(slot, seq, now, out))
		return true;
	make_tag(&tag, tenant_id, version, wrapped_hash);
	entry = hash_search(shared_hash, &tag, HASH_FIND, NULL);
	if (!shared_copy_ready(entry, now, out->dek, &out->expires_at))
		return false;
	pg_atomic_write_u32(hint_slot, (uint32) entry->slot);
	pg_atomic_write_u64(hint_seq, shared_slots[entry->slot].seq);
	return true;
}

/* ---------------------------------------------------------------------------
 * The tenant index (keycache_index.h), in step with the tenant hash: every write of a
 * tenant entry rewrites or removes its index entry, under the same exclusive lock.
 */
static void
index_key_of(TenantIndexKey *key, const SharedTenantTag *tag, const char *name,
			 size_t name_len)
{
	key->dbid = tag->dbid;
	key->tenant_relid = tag->tenant_relid;
	key->name_hash = tag->name_hash;
	key->name = name;
	key->name_len = name_len;
}

/* The tenant `entry` holds leaves the hash, or its entry another name: unindex it. */
static void
tenant_index_forget_entry(const SharedTenantEntry *entry)
{
	TenantIndexKey key;

	index_key_of(&key, &entry->tag, entry->name, entry->name_len);
	tenant_index_forget(&key);
}

/*
 * `entry` was written: index what it now says of the tenant and its active version,
 * or unindex it where the index cannot say it all (granted roles, the active
 * version's state not held).
 */
static void
tenant_index_sync(const SharedTenantEntry *entry)
{
	TenantIndexKey key;
	TenantIndexState st;
	const SharedVersionState *vs = NULL;

	index_key_of(&key, &entry->tag, entry->name, entry->name_len);
	if (!tenant_index_holds_name(entry->name_len))
		return;
	for (int i = 0; i < entry->nversions; i++)
		if (entry->versions[i].version == entry->active_version)
			vs = &entry->versions[i];
	if (entry->ngrants != 0 || vs == NULL)
	{
		tenant_index_forget(&key);
		return;
	}
	st.generation = entry->generation;
	st.tenant_id = entry->tenant_id;
	st.state = entry->state;
	st.active_version = entry->active_version;
	st.version_state = vs->state;
	st.wrapped_hash = vs->wrapped_hash;
	st.dek_slot = pg_atomic_read_u32(unconstify(pg_atomic_uint32 *, &vs->dek_slot));
	st.dek_seq = pg_atomic_read_u64(unconstify(pg_atomic_uint64 *, &vs->dek_seq));
	st.hash_slot = entry->slot;
	tenant_index_put(&key, &st);
}

/*
 * l2_find_tenant() for the active version (`version` 0 or the active one) of a tenant
 * the index holds at `generation`: its state and DEK from one line, plus the DEK's.
 * False when the index cannot answer (then the hash is looked at).  Caller holds the
 * lock in shared mode.
 */
static bool
find_tenant_indexed(const SharedTenantTag *tag, const char *name, size_t name_len,
					uint64 generation, uint32 version, TimestampTz now, TenantView *view,
					SharedDekCopy *dek)
{
	TenantIndexKey key;
	TenantIndexEntry *ie;
	uint32		slot;
	uint64		seq;
	SharedTenantEntry *owner;

	index_key_of(&key, tag, name, name_len);
	ie = tenant_index_find(&key);
	if (ie == NULL || ie->generation != generation ||
		(version != 0 && version != ie->active_version))
		return false;
	seq = pg_atomic_read_u64(&ie->dek_seq);
	slot = pg_atomic_read_u32(&ie->dek_slot);

	view->ngrants = 0;
	view->tenant_id = ie->tenant_id;
	view->state = (TenantState) ie->state;
	view->active_version = ie->active_version;
	view->version = ie->active_version;
	view->has_version = true;
	view->version_state = (KeyState) ie->version_state;
	view->wrapped_hash = ie->wrapped_hash;
	if (ie->version_state == KEY_ACTIVE && ie->state == TENANT_ACTIVE)
		dek->found = copy_dek_through_hint(&ie->dek_slot, &ie->dek_seq, slot, seq,
										   ie->tenant_id, ie->active_version,
										   ie->wrapped_hash, now, dek);
	view->nversions = 1;
	view->versions[0].version = ie->active_version;
	view->versions[0].state = view->version_state;
	view->versions[0].wrapped_hash = ie->wrapped_hash;
	view->versions[0].hint.seq = pg_atomic_read_u64(&ie->dek_seq);
	view->versions[0].hint.slot = pg_atomic_read_u32(&ie->dek_slot);

	/* The tenant's last use, for the tenant ring's eviction (a store: nothing waits). */
	owner = shared->tenant_ring.owner[ie->hash_slot];
	if (owner != NULL)
		pg_atomic_write_u64(&owner->last_used, (uint64) now);
	return true;
}

bool
l2_find_tenant(const char *name, size_t name_len, uint64 generation, uint32 version,
			   TenantView *view, SharedDekCopy *dek)
{
	SharedTenantTag tag;
	SharedTenantEntry *entry;
	bool		found = false;
	TimestampTz now = lookup_time();

	if (dek != NULL)
		dek->found = false;
	make_tenant_tag(&tag, name, name_len);
	LWLockAcquire(shared->lock, LW_SHARED);
	/* A tenant new to a backend's first level, for its active key: the index answers. */
	if (dek != NULL &&
		find_tenant_indexed(&tag, name, name_len, generation, version, now, view, dek))
	{
		LWLockRelease(shared->lock);
		if (dek->found)
			l2_count_lookup(true);
		return true;
	}
	entry = hash_search(shared_tenants, &tag, HASH_FIND, NULL);
	if (entry != NULL && entry->generation == generation &&
		entry->ngrants <= SHARED_TENANT_GRANTS &&
		tenant_entry_matches(entry, name, name_len))
	{
		found = true;
		view->ngrants = entry->ngrants;
		memcpy(view->grant_roles, entry->grant_roles, sizeof(Oid) * entry->ngrants);
		view->tenant_id = entry->tenant_id;
		view->state = entry->state;
		view->active_version = entry->active_version;
		if (version == 0)
			version = entry->active_version;
		view->version = version;
		view->has_version = false;
		view->nversions = entry->nversions;
		for (int i = 0; i < entry->nversions; i++)
		{
			SharedVersionState *vs = &entry->versions[i];
			VersionView *vv = &view->versions[i];

			vv->version = vs->version;
			vv->state = vs->state;
			vv->wrapped_hash = vs->wrapped_hash;
			if (vs->version == version)
			{
				view->has_version = true;
				view->version_state = vs->state;
				view->wrapped_hash = vs->wrapped_hash;
				if (dek != NULL && vs->state == KEY_ACTIVE && entry->state == TENANT_ACTIVE)
					dek->found = copy_dek_through_hint(&vs->dek_slot, &vs->dek_seq,
													   pg_atomic_read_u32(&vs->dek_slot),
													   pg_atomic_read_u64(&vs->dek_seq),
													   entry->tenant_id, vs->version,
													   vs->wrapped_hash, now, dek);
			}
			/* After the copy, which may have just left a hint. */
			vv->hint.seq = pg_atomic_read_u64(&vs->dek_seq);
			vv->hint.slot = pg_atomic_read_u32(&vs->dek_slot);
		}
		pg_atomic_write_u64(&entry->last_used, (uint64) now);
	}
	LWLockRelease(shared->lock);
	if (dek != NULL && dek->found)
		l2_count_lookup(true);
	return found;
}

bool
l2_copy_hinted_dek(DekHint hint, SharedDekCopy *dek)
{
	TimestampTz now = lookup_time();

	dek->found = false;
	if (hint.seq == 0 || hint.slot >= (uint32) shared->capacity)
		return false;
	LWLockAcquire(shared->lock, LW_SHARED);
	dek->found = slot_copy_if_still(hint.slot, hint.seq, now, dek);
	LWLockRelease(shared->lock);
	if (dek->found)
		l2_count_lookup(true);
	return dek->found;
}

static EvictVerdict
tenant_victim_verdict(void *owner, TimestampTz now, uint64 *last_used)
{
	*last_used = pg_atomic_read_u64(&((SharedTenantEntry *) owner)->last_used);
	return EVICT_IF_OLDEST;
}

/*
 * The versions of `rec` that shared memory holds with the tenant, best first: the one
 * asked for, the active one, then the others newest first; at most
 * SHARED_TENANT_VERSIONS.  Returns how many.
 */
static int
versions_to_publish(const TenantKeyRecord *rec, const VersionKeyRecord **out)
{
	int			n = 0;

	if (rec->key_found)
		for (int i = 0; i < rec->nversions; i++)
			if (rec->versions[i].version == rec->version)
				out[n++] = &rec->versions[i];
	for (int i = 0; i < rec->nversions && n < SHARED_TENANT_VERSIONS; i++)
		if (rec->versions[i].version == rec->active_version &&
			!(rec->key_found && rec->version == rec->active_version))
			out[n++] = &rec->versions[i];
	for (int i = rec->nversions - 1; i >= 0 && n < SHARED_TENANT_VERSIONS; i--)
		if (rec->versions[i].version != rec->active_version &&
			!(rec->key_found && rec->versions[i].version == rec->version))
			out[n++] = &rec->versions[i];
	return n;
}

/* Hold the state of version `vr` in a slot of `entry`: its own, a free one, or round robin. */
static void
publish_version(SharedTenantEntry *entry, const VersionKeyRecord *vr)
{
	SharedVersionState *vs = NULL;
	uint64		hash = vr->wrapped_hash;	/* read_key_store computed it */
	KeyState	state = vr->key.wrapped ? vr->key.state : KEY_DESTROYED;

	for (int i = 0; i < entry->nversions; i++)
		if (entry->versions[i].version == (uint32) vr->version)
			vs = &entry->versions[i];
	if (vs == NULL && entry->nversions < SHARED_TENANT_VERSIONS)
		vs = &entry->versions[entry->nversions++];
	else if (vs == NULL)
	{
		vs = &entry->versions[entry->next_version_slot];
		entry->next_version_slot = (entry->next_version_slot + 1) % SHARED_TENANT_VERSIONS;
	}
	else if (vs->wrapped_hash == hash && vs->state == state)
		return;					/* as held: keep the hint to its DEK */
	vs->version = (uint32) vr->version;
	vs->state = state;
	vs->wrapped_hash = hash;
	/* The hint named the DEK of what the version was: found again on next use. */
	pg_atomic_init_u32(&vs->dek_slot, 0);
	pg_atomic_init_u64(&vs->dek_seq, 0);
}

void
l2_publish_tenant(const char *name, size_t name_len, uint64 generation,
				  const TenantKeyRecord *rec)
{
	SharedTenantTag tag_buf;
	SharedTenantTag *tag = &tag_buf;
	SharedTenantEntry *entry;
	bool		found;
	const VersionKeyRecord *publish[SHARED_TENANT_VERSIONS + 1];
	int			npublish = versions_to_publish(rec, publish);

	make_tenant_tag(tag, name, name_len);
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
			tenant_index_forget_entry(victim);
			ring_give_back(&shared->tenant_ring, victim->slot);
			hash_search(shared_tenants, &victim->tag, HASH_REMOVE, NULL);
		}
		entry = hash_search(shared_tenants, tag, HASH_ENTER, &found);
		/* A recycled element: the name it held is not this entry's, and in no index. */
		entry->name_len = 0;
		entry->slot = ring_take(&shared->tenant_ring, entry);
		pg_atomic_init_u64(&entry->last_used, (uint64) GetCurrentTimestamp());
		entry->generation = generation + 1;	/* anything but `generation`: reset below */
	}
	if (entry->generation != generation || !tenant_entry_matches(entry, name, name_len) ||
		entry->tenant_id != rec->tenant_id)
	{
		/* Older news, another name with the same hash, or another tenant: start over. */
		if (!tenant_entry_matches(entry, name, name_len))
			tenant_index_forget_entry(entry);	/* the name this entry held */
		entry->generation = generation;
		entry->name_len = (uint32) name_len;
		memcpy(entry->name, name, name_len);
		entry->nversions = 0;
		entry->next_version_slot = 0;
	}
	entry->tenant_id = rec->tenant_id;
	entry->state = rec->state;
	entry->active_version = (uint32) rec->active_version;
	entry->ngrants = rec->ngrants;
	if (rec->ngrants > 0 && rec->ngrants <= SHARED_TENANT_GRANTS)
		memcpy(entry->grant_roles, rec->grant_roles, sizeof(Oid) * rec->ngrants);
	/*
	 * Best last: the round robin takes each slot at most once in one publish, so what
	 * it replaces is older news or a version worse than the one written.
	 */
	for (int i = npublish - 1; i >= 0; i--)
		publish_version(entry, publish[i]);
	tenant_index_sync(entry);
	LWLockRelease(shared->lock);
}

/* ---------------------------------------------------------------------------
 * Loading a DEK: from shared memory, else from the KMS, once per cluster.
 */
void
l2_count_lookup(bool hit)
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
		uint8		unused[KMS_DEK_LEN];
		TimestampTz unused_expiry;

		inflight_active = false;
		shared_finish_load(&inflight_tag, inflight_seq, NULL, ERRCODE_ADMIN_SHUTDOWN,
						   KMS_RECHECK_NO_SLOT, unused, &unused_expiry);
	}
}

/* The master key of a DEK the KMS just unwrapped: to be re-checked by the worker. */
static int32
track_master_key(const char *tenant, uint32 version, const DataKeyRecord *rec)
{
	return kms_recheck_track(rec->kms_provider, rec->kms_key, tenant, version,
							 (const uint8 *) VARDATA_ANY(rec->wrapped),
							 VARSIZE_ANY_EXHDR(rec->wrapped));
}

/* The first expired key served under envelope.cache_grace since it was last loaded. */
static void
warn_grace(const char *tenant, uint32 version, const char *kms_error)
{
	ereport(WARNING,
			(errcode(ERRCODE_SYSTEM_ERROR),
			 errmsg("key version %u of tenant \"%s\" is used past envelope.cache_ttl because the KMS cannot be reached",
					version, tenant),
			 errdetail("%s", kms_error),	/* the KMS glue's message and detail: no secret */
			 errhint("envelope.cache_grace allows this for up to %d s past the key's expiry; a key revoked in the KMS meanwhile keeps decrypting until then.",
					 envelope_cache_grace),
			 errhidestmt(true)));
}

void
l2_load_key(const char *tenant, int32 tenant_id, uint32 version, const DataKeyRecord *rec,
		 uint8 dek[KMS_DEK_LEN], TimestampTz *expires_at)
{
	SharedKeyTag tag;
	volatile uint32 load_seq = 0;
	uint32		seq = 0;
	MemoryContext volatile caller_cxt = CurrentMemoryContext;
	LookupResult lr;
	volatile FinishResult finish = FINISH_PUBLISHED;
	char	   *volatile kms_error = NULL;

	*expires_at = GetCurrentTimestamp() + ttl_usec();

	if (shared == NULL)
	{
		l2_count_lookup(false);
		envelope_kms_decrypt(rec->kms_provider, rec->kms_key, tenant, version,
							 rec->wrapped, dek);
		return;
	}

	make_tag(&tag, tenant_id, version, l2_wrapped_hash(rec->wrapped));

	lr = shared_lookup(&tag, dek, &seq, expires_at);
	load_seq = seq;
	l2_count_lookup(lr == LOOKUP_HIT);
	if (lr == LOOKUP_HIT)
		return;

	if (lr == LOOKUP_UNCACHED)
	{
		envelope_kms_decrypt(rec->kms_provider, rec->kms_key, tenant, version,
							 rec->wrapped, dek);
		(void) track_master_key(tenant, version, rec);
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
		finish = shared_finish_load(&tag, load_seq, NULL, edata->sqlerrcode,
									KMS_RECHECK_NO_SLOT, dek, expires_at);
		if (finish == FINISH_PUBLISHED)
		{
			FreeErrorData(edata);
			PG_RE_THROW();
		}

		/*
		 * Graced: the error was the KMS glue's report of a failed call, raised with
		 * no lock held and nothing else to undo, so it can be dropped here.
		 */
		kms_error = psprintf("%s.%s%s", edata->message, edata->detail ? " " : "",
							 edata->detail ? edata->detail : "");
		FreeErrorData(edata);
		FlushErrorState();
	}
	PG_END_TRY();
	inflight_active = false;
	if (finish == FINISH_PUBLISHED)
	{
		TimestampTz unused_expiry;

		(void) shared_finish_load(&tag, load_seq, dek, 0, track_master_key(tenant, version, rec),
								  NULL, &unused_expiry);
		return;
	}
	if (finish == FINISH_GRACED_FIRST)
		warn_grace(tenant, version, kms_error);
	pfree(kms_error);
}

/* Zero every key of the current database; loads in flight are dropped on arrival. */
void
l2_flush_database(void)
{
	HASH_SEQ_STATUS scan;
	SharedKeyEntry *entry;

	if (shared == NULL)
	{
		local_generation++;
		return;
	}
	LWLockAcquire(shared->lock, LW_EXCLUSIVE);
	purge_sequence_bump();
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
 * The KMS refused the master key of kms_recheck slot `master_key`: zero every DEK under
 * it, in every database, and those whose master key is not tracked (to be safe); loads
 * in flight are dropped on arrival.  Then every backend's next row sees a new
 * generation and, with it, a new revocation epoch, and drops its first-level copies.
 * Exclusive lock, no I/O.  The epoch moves before the lock is released: a new key
 * stored at commit after this eviction (l2_store_new_keys compares the epoch under the
 * lock) would otherwise escape it.  The generation is bumped after the epoch (both
 * full barriers), so a backend that sees the new generation sees the new epoch.
 */
void
l2_evict_master_key(int master_key, bool newly_refused)
{
	HASH_SEQ_STATUS scan;
	SharedKeyEntry *entry;
	int			removed = 0;

	if (shared == NULL)
		return;
	LWLockAcquire(shared->lock, LW_EXCLUSIVE);
	purge_sequence_bump();
	hash_seq_init(&scan, shared_hash);
	while ((entry = hash_seq_search(&scan)) != NULL)
	{
		if (entry->state == SKEY_LOADING)
			entry->doomed = true;
		else if (entry->state == SKEY_READY &&
				 (entry->master_key == master_key || entry->master_key == KMS_RECHECK_NO_SLOT))
		{
			shared_remove_entry(entry);
			removed++;
		}
	}
	if (removed > 0 || newly_refused)
	{
		pg_atomic_fetch_add_u64(&shared->revocation_epoch, 1);
		pg_atomic_fetch_add_u64(&shared->generation, 1);
	}
	LWLockRelease(shared->lock);
	if (removed > 0)
	{
		KeyCacheStats *s = stats_begin();

		s->evictions += removed;
		stats_end();
	}
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
		/* An expired key within envelope.cache_grace stays, for an outage of the KMS. */
		if ((entry_expired(entry, now) && !within_grace(entry, now)) ||
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
bool
l2_get_stats(KeyCacheStats *out)
{
	KeyCacheStats *s = stats_begin();

	*out = *s;
	stats_end();
	if (shared == NULL)
		return false;
	out->capacity = shared->capacity;
	LWLockAcquire(shared->lock, LW_SHARED);
	out->entries = hash_get_num_entries(shared_hash);
	out->tenant_entries = hash_get_num_entries(shared_tenants);
	LWLockRelease(shared->lock);
	out->shared = true;
	return true;
}
