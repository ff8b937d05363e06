/*
 * keycache.c — where plaintext data keys live: a shared-memory cache of DEKs, and in
 * each backend a first level of ready cipher contexts.
 *
 * Two levels:
 *
 *   L1 (per backend, no locks): tenant name -> {tenant record, per version a ready
 *      CipherKey}.  The per-row path of encrypt/decrypt touches only this level plus
 *      one atomic read of the shared generation counter.
 *
 *   L2 (shared memory, envelope.cache_size entries): (database, tenant id, version) ->
 *      the 32-byte DEK.  One KMS Decrypt per key per cluster, not per backend.  The
 *      DEK bytes sit in a separate page-aligned array marked MADV_DONTDUMP and locked
 *      in memory where RLIMIT_MEMLOCK allows.
 *
 * Locking protocol of L2 (one LWLock of tranche "pg_envelope"):
 *   - lookups take the lock in LW_SHARED mode, copy the DEK out and release it; the
 *     LRU clock of the entry is bumped with an atomic write, which is harmless to race;
 *   - inserts, removals, eviction, expiry and flush take it LW_EXCLUSIVE;
 *   - the lock is never held across SPI, KMS or any other I/O, nor across an ereport.
 *   - single-flight: the first backend to miss a key inserts a LOADING entry, releases
 *     the lock and asks the KMS; others that find the LOADING entry sleep on a
 *     condition variable (interruptibly) until it becomes READY or FAILED.  A FAILED
 *     load is reported to the backends that waited for it and retried by the next
 *     caller.
 *
 * Revocation: the key store tables carry statement triggers that call
 * keycache_note_key_store_change().  At commit (never at rollback) that bumps the
 * shared generation counter, so every backend's next row sees its L1 is stale and
 * re-reads states from the key store; destroyed and retired keys are also wiped from
 * L2 at that moment.  The trigger also queues a relcache invalidation of the table,
 * which is WAL-logged with the commit: on a hot standby the callback below marks each
 * backend's L1 stale when the commit is replayed.
 *
 * Every slot that is evicted, expires, is flushed or invalidated is zeroed.  Expired
 * keys are zeroed by the next lookup that meets them, and at the latest by the
 * "pg_envelope key cache sweeper" background worker, which wakes at least once per
 * tenth of envelope.cache_ttl: a key nobody uses any more does not linger.  After a
 * crash-restart shared memory is re-created, so the cache starts empty.
 */
#include "pg_envelope.h"

#include <sys/mman.h>

#include "access/xact.h"
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
	int32		slot;			/* index into the DEK array */
	SharedKeyState state;
	bool		doomed;			/* purged or flushed while loading: drop on arrival */
	uint32		load_seq;		/* which load attempt this state belongs to */
	int			failed_sqlstate;
	TimestampTz loaded_at;
	pg_atomic_uint64 last_used; /* LRU clock value */
} SharedKeyEntry;

typedef struct KeyCacheShared
{
	LWLock	   *lock;
	ConditionVariable loaded_cv;
	pg_atomic_uint64 generation;
	pg_atomic_uint64 lru_clock;
	int			capacity;
	int			nfree_slots;
	slock_t		stats_mutex;
	KeyCacheStats stats;		/* under stats_mutex */
	/* followed by int32 free_slots[capacity] */
} KeyCacheShared;

static KeyCacheShared *shared = NULL;
static HTAB *shared_hash = NULL;
static int32 *shared_free_slots = NULL;
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
	KeyState	state;
	bool		has_key;
	CipherKey	key;
	TimestampTz expires_at;
} LocalVersion;

typedef struct LocalTenant
{
	char		name[ENVELOPE_TENANT_MAX + 1];	/* hash key */
	uint64		generation;		/* generation at which `record` was read */
	bool		valid;
	int32		tenant_id;
	TenantState state;
	uint32		active_version;
	int			nversions;
	int			maxversions;
	LocalVersion *versions;
} LocalTenant;

/* At most this many tenants in one backend's L1; beyond it, one entry makes room. */
#define L1_MAX_TENANTS 8192

static HTAB *local_tenants = NULL;
static MemoryContext local_cxt = NULL;
static LocalTenant *last_tenant = NULL;
static size_t last_tenant_len = 0;

/*
 * In front of the hash table, a direct-mapped array indexed by a hash of the tenant's
 * bytes: rows that switch tenant every row find theirs with one short hash and one
 * compare, without copying the name into a 256-byte key or checking it again (a name
 * in L1 was checked when it entered).  Cleared whenever L1 entries are freed.
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
static uint64 l1_seen_generation = 0;
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
current_generation(void)
{
	uint64		g = l1_local_generation;

	if (shared != NULL)
		g += pg_atomic_read_u64(&shared->generation);
	else
		g += local_generation;
	return g;
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
 * Shared memory set-up
 */
static Size
dek_area_size(int capacity)
{
	/* Page-aligned start and end, so madvise/mlock cover exactly this array. */
	return (Size) capacity * KMS_DEK_LEN + 2 * (Size) sysconf(_SC_PAGESIZE);
}

static Size
keycache_shmem_size(void)
{
	Size		size;

	size = MAXALIGN(sizeof(KeyCacheShared) + sizeof(int32) * envelope_cache_size);
	size = add_size(size, hash_estimate_size(envelope_cache_size, sizeof(SharedKeyEntry)));
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
	char	   *area;

	shared = NULL;
	shared_hash = NULL;

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);

	shared = ShmemInitStruct("pg_envelope key cache",
							 MAXALIGN(sizeof(KeyCacheShared) + sizeof(int32) * envelope_cache_size),
							 &found);
	shared_free_slots = (int32 *) ((char *) shared + sizeof(KeyCacheShared));
	area = ShmemInitStruct("pg_envelope key cache keys", dek_area_size(envelope_cache_size), &found);
	shared_deks = (uint8 (*)[KMS_DEK_LEN]) TYPEALIGN(pagesize, area);

	if (!found)
	{
		shared->lock = &(GetNamedLWLockTranche("pg_envelope"))->lock;
		ConditionVariableInit(&shared->loaded_cv);
		pg_atomic_init_u64(&shared->generation, 0);
		pg_atomic_init_u64(&shared->lru_clock, 0);
		shared->capacity = envelope_cache_size;
		shared->nfree_slots = envelope_cache_size;
		for (int i = 0; i < envelope_cache_size; i++)
			shared_free_slots[i] = envelope_cache_size - 1 - i;
		SpinLockInit(&shared->stats_mutex);
		memset(&shared->stats, 0, sizeof(shared->stats));
		memset(shared_deks, 0, (Size) envelope_cache_size * KMS_DEK_LEN);
		protect_dek_area(shared_deks,
						 TYPEALIGN(pagesize, (Size) envelope_cache_size * KMS_DEK_LEN));
	}

	memset(&info, 0, sizeof(info));
	info.keysize = sizeof(SharedKeyTag);
	info.entrysize = sizeof(SharedKeyEntry);
	shared_hash = ShmemInitHash("pg_envelope key cache hash",
								envelope_cache_size, envelope_cache_size,
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
		shared_free_slots[shared->nfree_slots++] = entry->slot;
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

/*
 * Make room for one entry: drop expired entries, else the least recently used READY
 * one.  Caller holds the lock exclusively.  Returns false when every slot is busy
 * loading (the caller then goes to the KMS without caching).
 */
static bool
shared_make_room(TimestampTz now)
{
	HASH_SEQ_STATUS scan;
	SharedKeyEntry *entry;
	SharedKeyEntry *victim = NULL;
	uint64		oldest = PG_UINT64_MAX;
	int64		evicted = 0;

	if (shared->nfree_slots > 0)
		return true;

	hash_seq_init(&scan, shared_hash);
	while ((entry = hash_seq_search(&scan)) != NULL)
	{
		if (entry->state == SKEY_LOADING)
			continue;
		if (entry->state == SKEY_FAILED || entry_expired(entry, now))
		{
			shared_remove_entry(entry);
			evicted++;
			continue;
		}
		if (pg_atomic_read_u64(&entry->last_used) < oldest)
		{
			oldest = pg_atomic_read_u64(&entry->last_used);
			victim = entry;
		}
	}
	if (shared->nfree_slots == 0 && victim != NULL)
	{
		shared_remove_entry(victim);
		evicted++;
	}
	if (evicted > 0)
	{
		KeyCacheStats *s = stats_begin();

		s->evictions += evicted;
		stats_end();
	}
	return shared->nfree_slots > 0;
}

typedef enum LookupResult
{
	LOOKUP_HIT,
	LOOKUP_MUST_LOAD,			/* we inserted a LOADING entry: our job to fill it */
	LOOKUP_UNCACHED				/* cache full of loads in flight: load without caching */
} LookupResult;

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
		if (entry != NULL && entry->state == SKEY_READY && !entry_expired(entry, now))
		{
			memcpy(dek, shared_deks[entry->slot], KMS_DEK_LEN);
			*loaded_at = entry->loaded_at;
			pg_atomic_write_u64(&entry->last_used,
								pg_atomic_fetch_add_u64(&shared->lru_clock, 1));
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
		if (entry != NULL && entry->state == SKEY_READY && !entry_expired(entry, now))
		{
			/* Loaded by another backend between our two looks. */
			memcpy(dek, shared_deks[entry->slot], KMS_DEK_LEN);
			*loaded_at = entry->loaded_at;
			pg_atomic_write_u64(&entry->last_used,
								pg_atomic_fetch_add_u64(&shared->lru_clock, 1));
			LWLockRelease(shared->lock);
			return LOOKUP_HIT;
		}
		if (entry != NULL)
			shared_remove_entry(entry);
		if (!shared_make_room(now))
		{
			LWLockRelease(shared->lock);
			return LOOKUP_UNCACHED;
		}
		entry = hash_search(shared_hash, tag, HASH_ENTER, &found);
		entry->slot = shared_free_slots[--shared->nfree_slots];
		entry->state = SKEY_LOADING;
		entry->doomed = false;
		entry->load_seq = ++my_load_seq + (uint32) MyProcPid * 7919;
		entry->failed_sqlstate = 0;
		entry->loaded_at = 0;
		pg_atomic_init_u64(&entry->last_used, pg_atomic_fetch_add_u64(&shared->lru_clock, 1));
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

static void
make_tag(SharedKeyTag *tag, int32 tenant_id, uint32 version, const bytea *wrapped)
{
	memset(tag, 0, sizeof(*tag));
	tag->dbid = MyDatabaseId;
	tag->tenant_id = tenant_id;
	tag->version = version;
	tag->wrapped_hash = DatumGetUInt64(hash_any_extended((const unsigned char *) VARDATA_ANY(wrapped),
														 VARSIZE_ANY_EXHDR(wrapped), 0));
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
	make_tag(&tag, tenant_id, version, wrapped);
	LWLockAcquire(shared->lock, LW_EXCLUSIVE);
	entry = hash_search(shared_hash, &tag, HASH_FIND, NULL);
	if (entry == NULL && shared_make_room(GetCurrentTimestamp()))
	{
		entry = hash_search(shared_hash, &tag, HASH_ENTER, &found);
		entry->slot = shared_free_slots[--shared->nfree_slots];
		memcpy(shared_deks[entry->slot], dek, KMS_DEK_LEN);
		entry->state = SKEY_READY;
		entry->doomed = false;
		entry->load_seq = 0;
		entry->failed_sqlstate = 0;
		entry->loaded_at = GetCurrentTimestamp();
		pg_atomic_init_u64(&entry->last_used, pg_atomic_fetch_add_u64(&shared->lru_clock, 1));
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
 * The DEK of (tenant, version) into `dek`; *loaded_at says when it was unwrapped, so
 * the backend's copy expires with the shared one and never outlives it.
 */
static void
obtain_dek(const LocalTenant *lt, uint32 version, const DataKeyRecord *rec,
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
		envelope_kms_decrypt(rec->kms_provider, rec->kms_key, lt->name, version,
							 rec->wrapped, dek);
		return;
	}

	make_tag(&tag, lt->tenant_id, version, rec->wrapped);

	lr = shared_lookup(&tag, dek, &seq, loaded_at);
	load_seq = seq;
	record_lookup(lr == LOOKUP_HIT);
	if (lr == LOOKUP_HIT)
		return;

	if (lr == LOOKUP_UNCACHED)
	{
		envelope_kms_decrypt(rec->kms_provider, rec->kms_key, lt->name, version,
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
		envelope_kms_decrypt(rec->kms_provider, rec->kms_key, lt->name, version,
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
l1_free_tenant(LocalTenant *lt)
{
	for (int i = 0; i < lt->nversions; i++)
		if (lt->versions[i].has_key)
		{
			cipher_key_free(&lt->versions[i].key);
			lt->versions[i].has_key = false;
		}
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
			l1_free_tenant(lt);
		hash_destroy(local_tenants);
		local_tenants = NULL;
	}
	if (local_cxt != NULL)
		MemoryContextReset(local_cxt);
	last_tenant = NULL;
	last_tenant_len = 0;
	l1_front_clear();
}

/*
 * Drop one tenant other than `keep` from a full L1.  Not LRU: a cheap victim is enough
 * to avoid the cliff of emptying the whole level when a scan cycles through more
 * tenants than it holds.
 */
static void
l1_evict_one(const char *keep)
{
	HASH_SEQ_STATUS scan;
	LocalTenant *victim;

	hash_seq_init(&scan, local_tenants);
	while ((victim = hash_seq_search(&scan)) != NULL)
	{
		if (strcmp(victim->name, keep) != 0)
		{
			hash_seq_term(&scan);
			l1_free_tenant(victim);
			if (victim->versions)
				pfree(victim->versions);
			hash_search(local_tenants, victim->name, HASH_REMOVE, NULL);
			break;
		}
	}
	last_tenant = NULL;
	l1_front_clear();
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

/*
 * The L1 entry of a tenant, valid at the current generation, or an error if the tenant
 * does not exist or is not active.
 */
static LocalTenant *
l1_tenant_entry(const char *tenant, size_t tenant_len, bool must_be_active)
{
	uint64		generation = current_generation();
	L1FrontSlot *front;
	char		key[ENVELOPE_TENANT_MAX + 1];
	LocalTenant *lt;
	bool		found;
	TenantRecord rec;

	if (generation != l1_seen_generation)
	{
		/* Something changed in the key store: re-read every state before use. */
		if (local_tenants != NULL)
		{
			HASH_SEQ_STATUS scan;

			hash_seq_init(&scan, local_tenants);
			while ((lt = hash_seq_search(&scan)) != NULL)
				lt->valid = false;
		}
		l1_seen_generation = generation;
	}

	/* The hot path: the same tenant as the previous row. */
	if (last_tenant != NULL && last_tenant->valid && last_tenant_len == tenant_len &&
		(last_tenant->state == TENANT_ACTIVE || !must_be_active) &&
		memcmp(last_tenant->name, tenant, tenant_len) == 0)
		return last_tenant;

	/* Next hottest: a tenant this backend has seen, through the front array. */
	front = &l1_front[l1_front_index(tenant, tenant_len)];
	if (front->lt != NULL && front->name_len == tenant_len && front->lt->valid &&
		(front->lt->state == TENANT_ACTIVE || !must_be_active) &&
		memcmp(front->lt->name, tenant, tenant_len) == 0)
	{
		last_tenant = front->lt;
		last_tenant_len = tenant_len;
		return front->lt;
	}

	envelope_check_tenant(tenant, tenant_len);
	memcpy(key, tenant, tenant_len);
	key[tenant_len] = '\0';

	l1_ensure();
	lt = hash_search(local_tenants, key, HASH_FIND, NULL);
	if (lt == NULL || !lt->valid)
	{
		bool		exists;

		/* SPI may process invalidations; no pointer into the hash survives it. */
		last_tenant = NULL;
		exists = keystore_get_tenant(key, false, &rec);
		if (!exists)
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_OBJECT),
					 errmsg("tenant \"%s\" does not exist", key),
					 errhint("An envelope_admin can create it with envelope.create_tenant()."),
					 errhidestmt(true)));

		l1_ensure();
		if (hash_get_num_entries(local_tenants) >= L1_MAX_TENANTS)
			l1_evict_one(key);
		lt = hash_search(local_tenants, key, HASH_ENTER, &found);
		if (!found)
		{
			lt->nversions = lt->maxversions = 0;
			lt->versions = NULL;
		}
		else if (lt->tenant_id != rec.tenant_id)
			l1_free_tenant(lt); /* dropped and re-created under the same name */
		lt->tenant_id = rec.tenant_id;
		lt->state = rec.state;
		lt->active_version = (uint32) rec.active_version;
		/* Versions must be re-checked against the key store too. */
		for (int i = 0; i < lt->nversions; i++)
			lt->versions[i].state = (KeyState) 0;
		lt->valid = true;
	}

	if (lt->state != TENANT_ACTIVE && must_be_active)
	{
		/*
		 * The committing backend wiped a destroyed tenant's keys from L2; a standby, or
		 * a key store edited by hand, has no such backend, so the first to notice wipes.
		 */
		if (lt->state == TENANT_DESTROYED)
			shared_purge(lt->tenant_id, 0);
		raise_tenant_unusable(lt);
	}

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

/* A ready key for (tenant, version), loading it through L2 and the KMS on a miss. */
static const CipherKey *
l1_key(LocalTenant *lt, uint32 version)
{
	LocalVersion *lv = l1_find_version(lt, version);
	DataKeyRecord rec;
	TimestampTz loaded_at;
	uint8		dek[KMS_DEK_LEN];
	CipherStatus cs;
	char		tenant[ENVELOPE_TENANT_MAX + 1];
	int32		tenant_id = lt->tenant_id;

	if (lv != NULL && lv->state == KEY_ACTIVE && lv->has_key &&
		lv->expires_at > GetCurrentStatementStartTimestamp())
		return &lv->key;

	/*
	 * Slow path.  SPI below may run invalidation callbacks that mark `lt` stale; it
	 * stays allocated (only l1_reset frees entries, and that runs only from l1_tenant
	 * or a flush), so re-find it by name afterwards rather than trusting pointers.
	 */
	strlcpy(tenant, lt->name, sizeof(tenant));
	if (!keystore_get_data_key(tenant, (int32) version, &rec))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("key version %u of tenant \"%s\" does not exist", version, tenant),
				 errdetail("The value was encrypted with a key this database does not hold."),
				 errhidestmt(true)));
	if (rec.state != KEY_ACTIVE || rec.wrapped == NULL)
		shared_purge(tenant_id, version);	/* as for destroyed tenants above */
	if (rec.state == KEY_RETIRED)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("key version %u of tenant \"%s\" is retired", version, tenant),
				 errhint("Values still under a retired version must be re-encrypted under the active version before it is retired."),
				 errhidestmt(true)));
	if (rec.state == KEY_DESTROYED || rec.wrapped == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("key version %u of tenant \"%s\" has been destroyed", version, tenant),
				 errhidestmt(true)));

	obtain_dek(lt, version, &rec, dek, &loaded_at);
	lt = hash_search(local_tenants, tenant, HASH_FIND, NULL);
	if (lt == NULL || lt->tenant_id != tenant_id)
	{
		explicit_bzero(dek, sizeof(dek));
		elog(ERROR, "pg_envelope key cache entry of tenant \"%s\" vanished", tenant);
	}

	lv = l1_find_version(lt, version);
	if (lv == NULL)
	{
		if (lt->nversions == lt->maxversions)
		{
			int			newmax = lt->maxversions == 0 ? 4 : lt->maxversions * 2;

			lt->versions = lt->versions == NULL ?
				MemoryContextAllocZero(local_cxt, sizeof(LocalVersion) * newmax) :
				repalloc(lt->versions, sizeof(LocalVersion) * newmax);
			lt->maxversions = newmax;
		}
		lv = &lt->versions[lt->nversions++];
		memset(lv, 0, sizeof(*lv));
		lv->version = version;
	}
	/* Always from the key just obtained: a re-created tenant may reuse a version. */
	if (lv->has_key)
	{
		cipher_key_free(&lv->key);
		lv->has_key = false;
	}
	cs = cipher_key_init(&lv->key, dek);
	explicit_bzero(dek, sizeof(dek));
	if (cs != CIPHER_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not initialize AES-256-GCM"),
				 errhidestmt(true)));
	lv->has_key = true;
	lv->state = KEY_ACTIVE;
	lv->expires_at = loaded_at + (TimestampTz) envelope_cache_ttl * USECS_PER_SEC;
	last_tenant = lt;
	return &lv->key;
}

EnvelopeKeyRef
keycache_key_for_encrypt(const char *tenant, size_t tenant_len)
{
	LocalTenant *lt = l1_tenant_entry(tenant, tenant_len, true);
	EnvelopeKeyRef ref;

	ref.version = lt->active_version;
	ref.key = l1_key(lt, ref.version);
	return ref;
}

/* The version new values use; 0 when the tenant is disabled or destroyed. */
uint32
keycache_active_version(const char *tenant, size_t tenant_len)
{
	LocalTenant *lt = l1_tenant_entry(tenant, tenant_len, false);

	return lt->state == TENANT_ACTIVE ? lt->active_version : 0;
}

const CipherKey *
keycache_key_for_decrypt(const char *tenant, size_t tenant_len, uint32 version)
{
	return l1_key(l1_tenant_entry(tenant, tenant_len, true), version);
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
 */
static void
keycache_relcache_callback(Datum arg, Oid relid)
{
	if (relid == InvalidOid)
	{
		l1_local_generation++;
		keystore_forget_relations();
	}
	else if (keystore_is_key_table(relid))
	{
		l1_local_generation++;
		/* A dropped and re-created extension has new tables: look them up again. */
		keystore_forget_relations();
	}
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
		LWLockRelease(shared->lock);
		out->shared = true;
	}
	else
	{
		out->capacity = L1_MAX_TENANTS;
		out->entries = local_tenants ? hash_get_num_entries(local_tenants) : 0;
		out->shared = false;
	}
}
