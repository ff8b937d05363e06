/*
 * keycache.c — the key cache's per-backend level (L1) and its public interface
 * (keycache.h): ready cipher contexts per tenant and version, in front of the shared
 * level (keycache_shared.c, which holds the locking protocol).
 *
 * L1 (per backend, no locks): tenant name -> {tenant state, per version a CipherKey
 * whose contexts are set up as values need them}.  At most L1_MAX_TENANTS tenants,
 * evicted least recently used first (a list, O(1)); once full, it admits a tenant
 * only on its second miss, and serves the others through one transient entry
 * (l1_admit).  The per-row path of encrypt/decrypt touches only this level plus one
 * atomic read of the shared generation counter.  A miss is answered from shared
 * memory (tenant state and DEK, in one lookup) when it holds them, else from the key
 * store (its indexes, or SQL where they cannot answer: keystore_read_tenant_key) and
 * the KMS.
 *
 * Revocation: the key store tables carry statement triggers that call
 * keycache_note_key_store_change().  At commit (never at rollback) that bumps the
 * shared generation counter, so every backend's next row sees its L1 is stale, and
 * every tenant state in shared memory too: states are re-read from the key store
 * before use.  Destroyed and retired keys are also wiped from shared memory at that
 * moment.  The trigger also queues a relcache invalidation of the table, which is
 * WAL-logged with the commit: on a hot standby the callback below marks each
 * backend's L1, and the tenant states in shared memory, stale when the commit is
 * replayed.
 *
 * Per-tenant access: each tenant's state carries the roles granted its keys (none:
 * open to every envelope_user), read and invalidated with the rest of the state; the
 * key functions check current_user against them (tenant_access.h) before a key is
 * handed out, at the cost of one branch per row for a tenant without grants.
 *
 * Revocation in the KMS: when the background worker finds a master key refused
 * (kms_recheck.c), it evicts the key's DEKs from L2 and bumps the shared revocation
 * epoch and then the generation.  The next row of every backend misses on the
 * generation; on that slow path a changed epoch expires every key in L1, so each is
 * fetched again from L2 or the KMS, which refuses it.  The per-row path reads nothing
 * more than before.
 */
#include "pg_envelope.h"

#include "keycache_shared.h"
#include "citus_support.h"
#include "encryption_count.h"
#include "kms_recheck.h"
#include "tenant_access.h"

#include "access/parallel.h"
#include "access/xact.h"
#include "access/xlog.h"
#include "common/hashfn.h"
#include "lib/ilist.h"
#include "miscadmin.h"
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

/* ---------------------------------------------------------------------------
 * Backend level (L1)
 */
typedef struct LocalVersion
{
	uint32		version;
	KeyState	state;			/* as of the tenant's generation; 0: not checked since */
	uint64		wrapped_hash;	/* with tenant id and version, names the DEK in L2 */
	TimestampTz expires_at;		/* of the shared copy the contexts came from */
	DekHint		hint;			/* where L2 last found the DEK (seq 0: not known) */
	CipherKey	key;			/* contexts set up as values need them */
	struct EncryptionBudget *budget;	/* see EnvelopeKeyRef */
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
	TenantAccess access;		/* its granted roles, as of `generation` */
} LocalTenant;

/*
 * At most this many tenants in one backend's L1; beyond it the least recently used
 * one makes room.  Each holds a name and one or two OpenSSL contexts (about 2 KB), so
 * a backend's L1 stays under about 16 MB however many tenants its scans cycle through;
 * past the limit each row that switches to an evicted tenant costs one look into L2
 * and a re-key of the evicted tenant's context.
 */
#define L1_MAX_TENANTS 8192

/*
 * At most this many versions of one tenant in L1: the active one, and the few that
 * values and re-encryption ask for.  A tenant rotated every month for years has
 * dozens; noting them all would cost each backend memory per tenant and each row a
 * longer walk.
 */
#define L1_MAX_VERSIONS 8

static HTAB *local_tenants = NULL;
static MemoryContext local_cxt = NULL;
static dlist_head l1_lru = DLIST_STATIC_INIT(l1_lru);
static LocalTenant *last_tenant = NULL;
static size_t last_tenant_len = 0;

/*
 * The contexts of the tenant evicted last (or that the transient entry served last),
 * waiting to be re-keyed for the tenant that took its place: cheaper than allocating
 * new ones.  A row that needs both directions (reencrypt_value: decrypt under the old
 * version, encrypt under the new) takes one context in each of its two set-ups, so
 * what the first does not take stays here for the second.  Freed (which cleanses its
 * key schedule) when the next tenant's contexts come, and at the end of every
 * transaction, so that no context of a key lingers here past it.
 */
static CipherKey l1_spare;

/*
 * In front of the hash table, an array of sets indexed by a hash of the tenant's
 * bytes: rows that switch tenant every row find theirs with one short hash and one
 * cache line, without copying the name into a 256-byte key or checking it again (a
 * name in L1 was checked when it entered).  A slot is cleared when its tenant is
 * evicted, and the whole array when L1 is emptied.
 *
 * Four slots per set, one cache line, rather than one slot per hash: with one, the
 * tenants of a scan that share a slot (a quarter of 1,000 tenants in 4,096 slots, by
 * the birthday bound) took each other's place on every row when their rows alternated,
 * and each such row went the slow way (name check, key copy, filter line, hash bucket
 * and chain); with four, a set overflows for well under 1 % of 1,000 tenants, and the
 * look still reads one line.
 */
#define L1_FRONT_SETS 1024
#define L1_FRONT_WAYS 4

typedef struct L1FrontSlot
{
	LocalTenant *lt;
	uint32		name_len;
	uint32		name_hash;		/* l1_name_hash(): a different tenant rarely costs a look at lt */
} L1FrontSlot;

typedef struct L1FrontSet
{
	L1FrontSlot way[L1_FRONT_WAYS];
} L1FrontSet;

StaticAssertDecl(sizeof(L1FrontSet) == 64, "a front set is one cache line");

static L1FrontSet l1_front[L1_FRONT_SETS] pg_attribute_aligned(64);

/* FNV-1a: tenant names are short, and this runs per row. */
static inline uint32
l1_name_hash(const char *tenant, size_t tenant_len)
{
	uint32		h = 2166136261u;

	for (size_t i = 0; i < tenant_len; i++)
		h = (h ^ (unsigned char) tenant[i]) * 16777619u;
	return h ^ (h >> 16);
}

static inline L1FrontSet *
l1_front_set(uint32 name_hash)
{
	return &l1_front[name_hash & (L1_FRONT_SETS - 1)];
}

/*
 * Remember `lt` in its set: in the slot it has, else a free one, else the one its hash
 * picks.  A full set is rare (4 of 1,000 tenants overflow theirs); a tenant displaced
 * there finds its way back through the slow path, at the cost of one row's look.
 */
static void
l1_front_remember(L1FrontSet *set, LocalTenant *lt, uint32 name_len, uint32 name_hash)
{
	L1FrontSlot *slot = NULL;

	for (int w = 0; w < L1_FRONT_WAYS; w++)
		if (set->way[w].lt == lt)
		{
			slot = &set->way[w];
			break;
		}
	for (int w = 0; slot == NULL && w < L1_FRONT_WAYS; w++)
		if (set->way[w].lt == NULL)
			slot = &set->way[w];
	if (slot == NULL)
		slot = &set->way[(name_hash >> 16) % L1_FRONT_WAYS];
	slot->lt = lt;
	slot->name_len = name_len;
	slot->name_hash = name_hash;
}

/*
 * Forget `lt` (being evicted) in its set.  A slot left behind would not serve a wrong
 * entry (the hash table hands the evicted entry's memory to the tenant entering in its
 * place, whose name the look compares), but it would keep a way from a tenant that
 * could use it.
 */
static void
l1_front_forget(L1FrontSet *set, const LocalTenant *lt)
{
	for (int w = 0; w < L1_FRONT_WAYS; w++)
		if (set->way[w].lt == lt)
			memset(&set->way[w], 0, sizeof(set->way[w]));
}

/*
 * What L1 holds, and which tenants missed it lately, in one cache line per bucket of
 * name hashes: a scan cycling through more tenants than L1 holds asks both questions
 * on most rows, of a tenant L1 does not hold, and this answers them with one line
 * instead of the hash table's bucket, a presence count and an admission slot.
 *
 * held: a 16-bit fingerprint (l1_fingerprint) of each tenant in L1, where it has room;
 * `overflow` counts the tenants of the bucket whose fingerprint found none.  Exact as
 * a multiset: every insertion into L1 adds one fingerprint or one overflow, every
 * removal takes back one fingerprint equal to its own (whichever tenant it was noted
 * for: they cannot be told apart) or else one overflow.  So a tenant whose fingerprint
 * is not there, in a bucket without overflow, is not in L1 and the hash table need not
 * be searched; with L1 full (8 tenants per bucket on average) a tenant it does not
 * hold is searched for in about 1 in 8,000 cases, plus the rare buckets past 16.
 *
 * Admission to a full L1.  When a scan cycles through more tenants than L1 holds,
 * least-recently-used replacement evicts every tenant before its next row comes:
 * each row would then pay for an eviction, an insertion, and a re-key of the evicted
 * tenant's contexts, all in memory that has gone cold.  So a tenant missing from a
 * full L1 gets in only on its second miss within a while: `seen` remembers the
 * fingerprints of the last L1_FILTER_SEEN tenants of the bucket that were turned
 * away (14,336 in all); until then its row is served by the transient entry below,
 * whose contexts are re-keyed in place and stay in the CPU's caches.  Tenants that
 * come back soon enough still get in, and L1 keeps what it has.
 *
 * 1,024 buckets of 64 bytes: 64 KB per backend.
 */
#define L1_FILTER_BUCKETS 1024
#define L1_FILTER_HELD 16
#define L1_FILTER_SEEN 14

typedef struct L1FilterBucket
{
	uint16		held[L1_FILTER_HELD];	/* fingerprints of tenants in L1; 0: free */
	uint16		seen[L1_FILTER_SEEN];	/* of tenants lately turned away; 0: none */
	uint16		overflow;		/* tenants in L1 whose fingerprint is not in held */
	uint16		seen_next;		/* where the next one turned away is noted */
} L1FilterBucket;

StaticAssertDecl(sizeof(L1FilterBucket) == 64, "a filter bucket is one cache line");

static L1FilterBucket l1_filter[L1_FILTER_BUCKETS] pg_attribute_aligned(64);

static inline L1FilterBucket *
l1_filter_bucket(uint32 name_hash)
{
	return &l1_filter[name_hash & (L1_FILTER_BUCKETS - 1)];
}

/* Bits of the name hash that the bucket number does not use; never 0 (a free slot). */
static inline uint16
l1_fingerprint(uint32 name_hash)
{
	uint16		fp = (uint16) (name_hash >> 10);

	return fp != 0 ? fp : 1;
}

/* Could L1 hold the tenant of this hash?  False: it does not. */
static inline bool
l1_filter_may_hold(uint32 name_hash)
{
	const L1FilterBucket *b = l1_filter_bucket(name_hash);
	uint16		fp = l1_fingerprint(name_hash);
	bool		match = false;

	for (int i = 0; i < L1_FILTER_HELD; i++)
		match |= b->held[i] == fp;
	return match || b->overflow != 0;
}

static void
l1_filter_add(uint32 name_hash)
{
	L1FilterBucket *b = l1_filter_bucket(name_hash);

	for (int i = 0; i < L1_FILTER_HELD; i++)
		if (b->held[i] == 0)
		{
			b->held[i] = l1_fingerprint(name_hash);
			return;
		}
	b->overflow++;
}

static void
l1_filter_remove(uint32 name_hash)
{
	L1FilterBucket *b = l1_filter_bucket(name_hash);
	uint16		fp = l1_fingerprint(name_hash);

	for (int i = 0; i < L1_FILTER_HELD; i++)
		if (b->held[i] == fp)
		{
			b->held[i] = 0;
			return;
		}
	Assert(b->overflow > 0);
	b->overflow--;
}

/* May the tenant of this hash, missing from a full L1, enter it? */
static bool
l1_admit(uint32 name_hash)
{
	L1FilterBucket *b = l1_filter_bucket(name_hash);
	uint16		fp = l1_fingerprint(name_hash);

	for (int i = 0; i < L1_FILTER_SEEN; i++)
		if (b->seen[i] == fp)
			return true;
	b->seen[b->seen_next] = fp;
	b->seen_next = (b->seen_next + 1) % L1_FILTER_SEEN;
	return false;
}

/*
 * The tenant of the row being served without a place in L1: not in the hash table,
 * the LRU list or the front array; valid like any entry (name, tenant id,
 * generation), and taken over by the next tenant that is not admitted.
 */
static LocalTenant l1_transient;

static void l1_versions_to_spare(LocalTenant *victim);

/* Make the transient entry `tenant`'s, keeping its contexts if it already is. */
static LocalTenant *
l1_transient_for(const char *tenant, size_t tenant_len, int32 tenant_id)
{
	LocalTenant *lt = &l1_transient;

	if (lt->name_len != tenant_len || lt->tenant_id != tenant_id ||
		memcmp(lt->name, tenant, tenant_len) != 0)
	{
		l1_versions_to_spare(lt);
		memcpy(lt->name, tenant, tenant_len);
		lt->name[tenant_len] = '\0';
		lt->name_len = (uint32) tenant_len;
		lt->tenant_id = tenant_id;
		lt->generation = 0;
	}
	return lt;
}

/*
 * Where the transient entry keeps the encryption budgets (encryption_count.c) of the
 * tenants it serves: direct-mapped by tenant id, so that a tenant coming back to it
 * finds the budget it had, as an L1 entry does in its LocalVersion.  A scan cycling
 * through more tenants than L1 holds serves a new tenant on every row: without this,
 * each of its rows looked its key up in the budgets' hash (the bucket, the entry and
 * the budget: three cold lines).  Tenant ids are given out in sequence, so the ids of
 * the tenants a scan cycles through rarely share a slot up to the array's size.
 *
 * What a slot holds is only a hint: count_encryption() uses a budget only if it
 * carries the key (tenant id, version) being counted, and looks that key up otherwise;
 * budgets are never freed, so a slot never dangles.  Sized like the budget pool
 * (envelope.cache_size, BUDGET_POOL_MIN_SLOTS to BUDGET_POOL_MAX_SLOTS), 128 KB to
 * 1 MB, allocated once, by the first encryption served by the transient entry.
 */

static struct EncryptionBudget **l1_transient_budgets = NULL;
static uint32 l1_transient_budgets_mask = 0;

static struct EncryptionBudget **
l1_transient_budget_slot(int32 tenant_id)
{
	if (l1_transient_budgets == NULL)
	{
		uint32		n = BUDGET_POOL_MIN_SLOTS;

		while (n < (uint32) envelope_cache_size && n < BUDGET_POOL_MAX_SLOTS)
			n *= 2;
		l1_transient_budgets = MemoryContextAllocZero(TopMemoryContext,
													  n * sizeof(struct EncryptionBudget *));
		l1_transient_budgets_mask = n - 1;
	}
	return &l1_transient_budgets[(uint32) tenant_id & l1_transient_budgets_mask];
}

/*
 * The entry of `tenant` (L1's or the transient one) if it is still that of the tenant
 * with id `tenant_id`; for callers that read the key store, which processes
 * invalidations (opening a table, or SPI).
 */
static LocalTenant *
l1_refind(const char *tenant, size_t tenant_len, int32 tenant_id)
{
	LocalTenant *lt = local_tenants ? hash_search(local_tenants, tenant, HASH_FIND, NULL) : NULL;

	if (lt == NULL && l1_transient.name_len == tenant_len &&
		memcmp(l1_transient.name, tenant, tenant_len) == 0)
		lt = &l1_transient;
	return lt != NULL && lt->tenant_id == tenant_id ? lt : NULL;
}

static void
l1_front_clear(void)
{
	memset(l1_front, 0, sizeof(l1_front));
}

/*
 * The DEK that the look into L2 for a tenant missing from L1 brought with its state
 * (same lock, same lookup), for the l1_fill() that follows to set up its context
 * from; wiped as soon as it is used, or when the row is done without it.
 */
static SharedDekCopy l1_prefetch;
static int32 l1_prefetch_tenant_id;
static uint32 l1_prefetch_version;
static uint64 l1_prefetch_hash;

static inline void
l1_prefetch_wipe(void)
{
	if (l1_prefetch.found)
	{
		explicit_bzero(l1_prefetch.dek, sizeof(l1_prefetch.dek));
		l1_prefetch.found = false;
	}
}

/* The shared revocation epoch this backend's L1 copies were checked against. */
static uint64 l1_revocation_epoch = 0;

/* Bumped by invalidation callbacks; combined with the shared generation. */
static uint64 l1_local_generation = 0;
static bool l1_synced_with_standby = false;
/* This transaction changed the key store: bump at commit, and read it, not L2, meanwhile. */
static bool l1_pending_bump = false;

/*
 * A key store read made in parallel mode uses the statement's snapshot, which may
 * predate the generation it is noted at: a change committed after the statement began
 * would look not yet made.  Good for the rest of that statement, whose rows all see
 * that snapshot; the first look outside it makes every L1 entry stale
 * (l1_forget_parallel_reads).
 */
static bool l1_parallel_reads = false;
static TimestampTz l1_parallel_reads_statement;

/* Keys to wipe from L2 when the current transaction commits. */
typedef struct PendingPurge
{
	int32		tenant_id;
	uint32		version;		/* 0: every version */
} PendingPurge;

static List *pending_purges = NIL;

/*
 * DEKs the KMS generated in the current transaction (create_tenant, rotate_tenant_key),
 * waiting for its commit to enter the shared cache (keycache_prime).  Plaintext key
 * bytes: held in one array of TopMemoryContext, never in transaction memory, and
 * wiped at commit (once stored), at abort and PREPARE, at the abort of the
 * subtransaction that made them, and before the array is moved to grow.  A chained
 * hash on (tenant id, version) finds one in O(1): a transaction that rotates 50,000
 * tenants and then re-encrypts their values looks each up once.
 */
typedef struct PendingNewKey
{
	NewDataKey	key;
	SubTransactionId subid;		/* the subtransaction that made it */
	int			next;			/* next in its hash chain, -1: none */
} PendingNewKey;

static PendingNewKey *pending_new_keys = NULL;
static int	n_pending_new_keys = 0;
static int	max_pending_new_keys = 0;
static int *pending_new_key_heads = NULL;	/* max_pending_new_keys chains, -1: empty */

/* l2_purge_sequence() at PRE_COMMIT of a transaction with new keys. */
static uint64 pending_new_keys_purge_seq = 0;

static inline int
pending_new_key_chain(int32 tenant_id, uint32 version)
{
	/* max_pending_new_keys is a power of two */
	return (int) (hash_combine((uint32) tenant_id, version) & (max_pending_new_keys - 1));
}

/* Chain every pending key again (after the array grew or was compacted). */
static void
pending_new_keys_rechain(void)
{
	for (int c = 0; c < max_pending_new_keys; c++)
		pending_new_key_heads[c] = -1;
	for (int i = 0; i < n_pending_new_keys; i++)
	{
		PendingNewKey *p = &pending_new_keys[i];
		int			c = pending_new_key_chain(p->key.tenant_id, p->key.version);

		p->next = pending_new_key_heads[c];
		pending_new_key_heads[c] = i;
	}
}

/*
 * The DEK of (tenant_id, version, wrapped_hash) if this transaction generated it: a
 * tenant created or rotated and used in the same transaction needs no KMS Decrypt,
 * though its key enters shared memory only at commit.  The copy expires as the shared
 * one will, cache_ttl after the key was made.
 */
static bool
pending_new_key_copy(int32 tenant_id, uint32 version, uint64 wrapped_hash,
					 uint8 dek[KMS_DEK_LEN], TimestampTz *expires_at)
{
	if (n_pending_new_keys == 0)
		return false;
	for (int i = pending_new_key_heads[pending_new_key_chain(tenant_id, version)]; i >= 0;
		 i = pending_new_keys[i].next)
	{
		const NewDataKey *k = &pending_new_keys[i].key;

		if (k->tenant_id == tenant_id && k->version == version &&
			k->wrapped_hash == wrapped_hash)
		{
			memcpy(dek, k->dek, KMS_DEK_LEN);
			*expires_at = k->made_at + (TimestampTz) envelope_cache_ttl * USECS_PER_SEC;
			return true;
		}
	}
	return false;
}

static inline bool
l1_prefetch_matches(int32 tenant_id, uint32 version, uint64 wrapped_hash)
{
	return l1_prefetch.found && l1_prefetch_tenant_id == tenant_id &&
		l1_prefetch_version == version && l1_prefetch_hash == wrapped_hash;
}

/*
 * What L2 holds of `tenant` and its `version` (0: active) at shared generation
 * `shared_gen`, and with want_dek the version's DEK, into l1_prefetch: one look, one
 * lock.  False when L2 cannot answer (not there, stale, or this transaction changed
 * the key store).
 */
static bool
l1_look_in_l2(const char *tenant, size_t tenant_len, uint64 shared_gen, uint32 version,
			  bool want_dek, TenantView *view)
{
	l1_prefetch_wipe();
	if (!l2_available() || l1_pending_bump ||
		!l2_find_tenant(tenant, tenant_len, shared_gen, version, view,
						want_dek ? &l1_prefetch : NULL))
		return false;
	l1_prefetch_tenant_id = view->tenant_id;
	l1_prefetch_version = view->version;
	l1_prefetch_hash = view->wrapped_hash;
	return true;
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

/*
 * Make every key in L1 expired, as if its shared copy had: the next use of each frees
 * its contexts and fetches the DEK again (l1_fill).  Entries and pointers stay valid.
 */
static void
l1_expire_all(void)
{
	HASH_SEQ_STATUS scan;
	LocalTenant *lt;

	if (local_tenants == NULL)
		return;
	hash_seq_init(&scan, local_tenants);
	while ((lt = hash_seq_search(&scan)) != NULL)
		for (int i = 0; i < lt->nversions; i++)
			lt->versions[i].expires_at = 0;
	for (int i = 0; i < l1_transient.nversions; i++)
		l1_transient.versions[i].expires_at = 0;
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
	memset(l1_filter, 0, sizeof(l1_filter));
	l1_free_versions(&l1_transient);
	memset(&l1_transient, 0, sizeof(l1_transient));	/* its versions go with local_cxt */
	cipher_key_free(&l1_spare);
	l1_prefetch_wipe();
	if (local_cxt != NULL)
		MemoryContextReset(local_cxt);
	dlist_init(&l1_lru);
	last_tenant = NULL;
	last_tenant_len = 0;
	l1_front_clear();
}

/*
 * Empty a tenant's versions: its first contexts become the spare that the next set-up
 * re-keys; the rest are freed.
 */
static void
l1_versions_to_spare(LocalTenant *victim)
{
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
}

/* Drop the least recently used tenant from a full L1, in O(1). */
static void
l1_evict_one(void)
{
	LocalTenant *victim = dlist_container(LocalTenant, lru, dlist_tail_node(&l1_lru));
	uint32		name_hash = l1_name_hash(victim->name, victim->name_len);

	l1_versions_to_spare(victim);
	if (victim->versions)
		pfree(victim->versions);
	tenant_access_free(&victim->access);
	dlist_delete(&victim->lru);
	l1_filter_remove(name_hash);
	l1_front_forget(l1_front_set(name_hash), victim);
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

/* ---------------------------------------------------------------------------
 * The last key store read
 *
 * What read_key_store() read last, kept until the next read: the tenant and every one
 * of its versions with their wrapped DEKs, and the L1 generation it was read at.  A
 * re-encryption looks at a tenant's state (its active version), then decrypts under an
 * old version and encrypts under the active one; when neither DEK is in shared memory
 * (after a rotation, or in a cluster just started) each needs its wrapped DEK for the
 * KMS.  The read that checked the states had them: l1_fill takes them from here rather
 * than reading the key store again, as long as the generation has not moved (so L1
 * still trusts the states read with them) and the wrapped DEK is the one L1 noted.
 * Wrapped DEKs are not secret: the context is reset, not wiped, at the next read.
 */
static MemoryContext last_read_cxt = NULL;
static bool last_read_valid = false;
static uint64 last_read_generation;
static char last_read_tenant[ENVELOPE_TENANT_MAX + 1];
static TenantKeyRecord last_read;

/* Forget the last read and make room for the next (its record goes with the context). */
static MemoryContext
last_read_reset(void)
{
	last_read_valid = false;
	if (last_read_cxt == NULL)
		last_read_cxt = AllocSetContextCreate(TopMemoryContext,
											  "pg_envelope last key store read",
											  ALLOCSET_SMALL_SIZES);
	MemoryContextReset(last_read_cxt);
	return last_read_cxt;
}

/*
 * The wrapped DEK of `version` of tenant `tenant_id` (named `tenant`) as the last read
 * found it, if that read was made at L1 generation `generation`, and the version was
 * active with the wrapped DEK whose hash is `wrapped_hash`; NULL otherwise.
 */
static const DataKeyRecord *
last_read_key(const char *tenant, int32 tenant_id, uint64 generation, uint32 version,
			  uint64 wrapped_hash)
{
	if (!last_read_valid || last_read.tenant_id != tenant_id ||
		last_read_generation != generation || strcmp(last_read_tenant, tenant) != 0)
		return NULL;
	for (int i = 0; i < last_read.nversions; i++)
	{
		const VersionKeyRecord *vr = &last_read.versions[i];

		if (vr->version == (int32) version && vr->key.state == KEY_ACTIVE &&
			vr->key.wrapped != NULL && vr->wrapped_hash == wrapped_hash)
			return &vr->key;
	}
	return NULL;
}

/*
 * Wipe from L2 the DEKs of versions the read found unusable: the one asked for (all
 * its keys).  On a standby, where no committing backend wipes what a replayed change
 * destroyed or retired, the other versions the read names too: a destroyed one
 * entirely (its wrapped DEK is gone, and a rewrap may have left an older hash), a
 * retired one by its exact key.  On a primary the commit of the change did that.
 */
static void
read_key_store_purge_unusable(const TenantKeyRecord *rec)
{
	if (rec->key_found && (rec->key.state != KEY_ACTIVE || rec->key.wrapped == NULL))
		l2_purge(rec->tenant_id, (uint32) rec->version);
	if (!RecoveryInProgress())
		return;
	for (int i = 0; i < rec->nversions; i++)
	{
		const VersionKeyRecord *vr = &rec->versions[i];

		if (vr->version == rec->version)
			continue;
		if (vr->key.wrapped == NULL)
			l2_purge(rec->tenant_id, (uint32) vr->version);
		else if (vr->key.state != KEY_ACTIVE)
			l2_purge_key(rec->tenant_id, (uint32) vr->version, vr->wrapped_hash);
	}
}

/*
 * Read tenant `name`, its `version` (0: active) and its other versions from the key
 * store, keep the answer as the last read, and tell L2.  `generation` is the shared
 * generation seen before reading: a change that commits after it bumps the generation,
 * so what is published here is never taken for newer.  A parallel query reads with
 * its statement's snapshot, which may be older than the generation, and a transaction
 * that has changed the key store reads its own uncommitted changes: what they read is
 * theirs alone, never published.  A destroyed tenant or key seen here is wiped from
 * L2: the committing backend does that, but a standby or a key store edited by hand
 * has no such backend.  *rec lives until the next read.
 */
static void
read_key_store(const char *name, size_t name_len, uint32 version, uint64 generation,
			   TenantKeyRecord *rec)
{
	uint64		l1_generation = l1_local_generation + generation;
	MemoryContext old = MemoryContextSwitchTo(last_read_reset());
	bool		found = keystore_read_tenant_key(name, (int32) version, rec);

	MemoryContextSwitchTo(old);
	if (!found)
		raise_no_tenant(name);
	/* Each version's name in L2, once per read. */
	for (int i = 0; i < rec->nversions; i++)
	{
		VersionKeyRecord *vr = &rec->versions[i];

		vr->wrapped_hash = vr->key.wrapped ? l2_wrapped_hash(vr->key.wrapped) : 0;
	}
	if (rec->state == TENANT_DESTROYED)
		l2_purge(rec->tenant_id, 0);
	else
		read_key_store_purge_unusable(rec);
	if (IsInParallelMode())
	{
		l1_parallel_reads = true;
		l1_parallel_reads_statement = GetCurrentStatementStartTimestamp();
	}
	else if (l2_available() && !l1_pending_bump)
		l2_publish_tenant(name, name_len, generation, rec);
	last_read = *rec;
	last_read_generation = l1_generation;
	memcpy(last_read_tenant, name, name_len);
	last_read_tenant[name_len] = '\0';
	last_read_valid = true;
}

static LocalVersion *l1_find_version(LocalTenant *lt, uint32 version);
static LocalVersion *l1_add_version(LocalTenant *lt, uint32 version);
/* A version's DEK slot not known (slot sequence numbers start at 1). */
static const DekHint no_dek_hint = {0, 0};

static LocalVersion *l1_note_version(LocalTenant *lt, uint32 version, KeyState state,
									  uint64 wrapped_hash, DekHint hint);
static void l1_note_read_versions(LocalTenant *lt, const TenantKeyRecord *rec);

/*
 * The L1 entry of a tenant, valid at the current generation, or an error if the tenant
 * does not exist or (with must_be_active) is not active.  When the state has to be
 * looked up, that of `version` (0: the active one) is looked up with it, and with
 * want_key, for a tenant new to L1, its DEK too (into l1_prefetch).
 */
/* Outside the statement whose parallel-mode reads L1 holds: make them stale. */
static void
l1_forget_parallel_reads(void)
{
	if (IsInParallelMode() &&
		GetCurrentStatementStartTimestamp() == l1_parallel_reads_statement)
		return;
	l1_parallel_reads = false;
	l1_local_generation++;
}

static LocalTenant *
l1_tenant_entry(const char *tenant, size_t tenant_len, bool must_be_active, uint32 version,
				bool want_key)
{
	uint64		local_gen;
	uint64		shared_gen;
	uint64		generation;
	L1FrontSet *front;
	uint32		name_hash;
	char		key[ENVELOPE_TENANT_MAX + 1];
	LocalTenant *lt;
	bool		found;
	TenantView	view;
	const Oid  *grant_roles = view.grant_roles;
	bool		from_l2 = true;
	TenantKeyRecord rec;

	if (unlikely(l1_parallel_reads))
		l1_forget_parallel_reads();
	local_gen = l1_local_generation;
	shared_gen = l2_generation();
	generation = local_gen + shared_gen;

	/* The hot path: the same tenant as the previous row. */
	if (last_tenant != NULL && last_tenant->generation == generation &&
		last_tenant_len == tenant_len &&
		(last_tenant->state == TENANT_ACTIVE || !must_be_active) &&
		memcmp(last_tenant->name, tenant, tenant_len) == 0)
		return last_tenant;

	/* Next hottest: a tenant this backend has seen, through the front array. */
	name_hash = l1_name_hash(tenant, tenant_len);
	front = l1_front_set(name_hash);
	for (int w = 0; w < L1_FRONT_WAYS; w++)
	{
		const L1FrontSlot *slot = &front->way[w];

		if (slot->name_hash == name_hash && slot->lt != NULL && slot->name_len == tenant_len &&
			slot->lt->generation == generation &&
			(slot->lt->state == TENANT_ACTIVE || !must_be_active) &&
			memcmp(slot->lt->name, tenant, tenant_len) == 0)
		{
			lt = slot->lt;
			dlist_move_head(&l1_lru, &lt->lru);
			last_tenant = lt;
			last_tenant_len = tenant_len;
			return lt;
		}
	}

	/*
	 * The generation changed.  If a master key was refused meanwhile (the epoch is
	 * bumped before the generation), no copy in L1 may be used again: each must come
	 * from L2 or the KMS, which now refuses it.
	 */
	if (l2_revocation_epoch() != l1_revocation_epoch)
	{
		l1_revocation_epoch = l2_revocation_epoch();
		l1_expire_all();
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
		if (l2_available() && (RecoveryInProgress() || citus_is_loaded()))
		{
			l2_bump_generation();
			shared_gen = l2_generation();
			generation = local_gen + shared_gen;
		}
	}

	l1_ensure();
	l1_prefetch_wipe();
	lt = !l1_filter_may_hold(name_hash) ? NULL :
		hash_search(local_tenants, key, HASH_FIND, NULL);
	if (lt == NULL || lt->generation != generation)
	{
		last_tenant = NULL;
		/* A tenant new to L1 needs its key too: L2 hands it out with the state. */
		if (!l1_look_in_l2(key, tenant_len, shared_gen, version, want_key && lt == NULL,
						   &view))
		{
			from_l2 = false;

			/* Not in L2 at this generation: ask the key store. */
			read_key_store(key, tenant_len, version, shared_gen, &rec);
			view.tenant_id = rec.tenant_id;
			view.state = rec.state;
			view.active_version = (uint32) rec.active_version;
			view.version = (uint32) rec.version;
			view.has_version = rec.key_found;
			view.version_state = rec.key.wrapped ? rec.key.state : KEY_DESTROYED;
			view.wrapped_hash = rec.key.wrapped ? l2_wrapped_hash(rec.key.wrapped) : 0;
			view.ngrants = rec.ngrants;
			grant_roles = rec.grant_roles;	/* may be more than a view holds */

			/*
			 * Reading the key store processes invalidations (opening a table, SPI): no
			 * pointer into the hash survives it.
			 */
			l1_ensure();
			lt = hash_search(local_tenants, key, HASH_FIND, NULL);
		}

		if (lt == NULL && hash_get_num_entries(local_tenants) >= L1_MAX_TENANTS &&
			!l1_admit(name_hash))
			lt = l1_transient_for(key, tenant_len, view.tenant_id);
		else if (lt == NULL)
		{
			if (hash_get_num_entries(local_tenants) >= L1_MAX_TENANTS)
				l1_evict_one();
			lt = hash_search(local_tenants, key, HASH_ENTER, &found);
			Assert(!found);
			l1_filter_add(name_hash);
			lt->name_len = (uint32) tenant_len;
			lt->nversions = lt->maxversions = 0;
			lt->versions = NULL;
			tenant_access_init(&lt->access);
			lt->tenant_id = view.tenant_id;
			dlist_push_head(&l1_lru, &lt->lru);
		}
		else if (lt->tenant_id != view.tenant_id)
			l1_free_versions(lt);	/* dropped and re-created under the same name */
		lt->tenant_id = view.tenant_id;
		lt->state = view.state;
		lt->active_version = view.active_version;
		tenant_access_set(&lt->access, grant_roles, view.ngrants, local_cxt);
		/* Versions must be re-checked at this generation too. */
		for (int i = 0; i < lt->nversions; i++)
			lt->versions[i].state = (KeyState) 0;
		if (from_l2 && !want_key)
		{
			/*
			 * A look at the state alone (needs_reencryption) is usually followed by
			 * keys of other versions of the same tenant (reencrypt_value decrypts
			 * under the old one and encrypts under the active one): note every
			 * version L2 holds, with where its DEK was found, so that each of those
			 * keys is copied through its hint without looking the tenant up again.
			 */
			for (int i = 0; i < view.nversions; i++)
				l1_note_version(lt, view.versions[i].version, view.versions[i].state,
								view.versions[i].wrapped_hash, view.versions[i].hint);
		}
		else if (!from_l2)
			l1_note_read_versions(lt, &rec);	/* the likely next ones: no second read */
		else if (view.has_version)
			l1_note_version(lt, view.version, view.version_state, view.wrapped_hash,
							no_dek_hint);
		lt->generation = generation;
		lt->shared_generation = shared_gen;
	}

	if (lt->state != TENANT_ACTIVE && must_be_active)
		raise_tenant_unusable(lt);

	last_tenant = lt;
	last_tenant_len = tenant_len;
	if (lt != &l1_transient)
	{
		dlist_move_head(&l1_lru, &lt->lru);
		l1_front_remember(front, lt, (uint32) tenant_len, name_hash);
	}
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

/*
 * A new version entry of `lt`.  At most L1_MAX_VERSIONS: past that, one not checked at
 * the tenant's generation makes room (else any but the active version), so that a
 * tenant rotated many times costs neither memory nor a long walk per row.  Every
 * LocalVersion pointer into lt->versions is invalid afterwards.
 */
static LocalVersion *
l1_add_version(LocalTenant *lt, uint32 version)
{
	LocalVersion *lv;

	if (lt->nversions == L1_MAX_VERSIONS)
	{
		int			victim = -1;

		for (int i = lt->nversions - 1; i >= 0; i--)
		{
			if (lt->versions[i].version == lt->active_version)
				continue;
			if (victim < 0 || lt->versions[i].state == (KeyState) 0)
				victim = i;
			if (lt->versions[i].state == (KeyState) 0)
				break;
		}
		lv = &lt->versions[victim];
		cipher_key_free(&lv->key);
	}
	else
	{
		if (lt->nversions == lt->maxversions)
		{
			int			newmax = lt->maxversions == 0 ? 2 : lt->maxversions * 2;

			lt->versions = lt->versions == NULL ?
				MemoryContextAllocZero(local_cxt, sizeof(LocalVersion) * newmax) :
				repalloc(lt->versions, sizeof(LocalVersion) * newmax);
			lt->maxversions = newmax;
		}
		lv = &lt->versions[lt->nversions++];
	}
	memset(lv, 0, sizeof(*lv));
	lv->version = version;
	return lv;
}

/*
 * Record a version's state at the tenant's generation, and where L2 found its DEK (a
 * zero hint: nowhere known, since the slot it names may hold what the version was).
 */
static LocalVersion *
l1_note_version(LocalTenant *lt, uint32 version, KeyState state, uint64 wrapped_hash,
				DekHint hint)
{
	LocalVersion *lv = l1_find_version(lt, version);

	if (lv == NULL)
		lv = l1_add_version(lt, version);
	if (lv->wrapped_hash != wrapped_hash)
	{
		cipher_key_free(&lv->key);	/* another key under the same number */
		lv->wrapped_hash = wrapped_hash;
	}
	lv->state = state;
	lv->hint = hint;
	return lv;
}

/* Move the active version to the front, where the per-row walk finds it first. */
static void
l1_active_version_first(LocalTenant *lt)
{
	for (int i = 1; i < lt->nversions; i++)
	{
		if (lt->versions[i].version == lt->active_version)
		{
			LocalVersion tmp = lt->versions[0];

			lt->versions[0] = lt->versions[i];
			lt->versions[i] = tmp;
			return;
		}
	}
}

/*
 * Record what a key store read found of the versions the next rows are likely to ask
 * for (no DEK slot known): the active version, the one asked for, and other active
 * versions (a re-encryption reads the old ones), newest first, up to
 * L1_MAX_VERSIONS in all.  Retired and destroyed versions other than the one asked
 * for are not noted: a value under one fails anyway, after a look of its own.
 */
static void
l1_note_read_versions(LocalTenant *lt, const TenantKeyRecord *rec)
{
	int			noted = 0;

	for (int pass = 0; pass < 3; pass++)
	{
		for (int i = rec->nversions - 1; i >= 0 && noted < L1_MAX_VERSIONS; i--)
		{
			const VersionKeyRecord *vr = &rec->versions[i];
			bool		asked = rec->key_found && vr->version == rec->version;
			bool		active = vr->version == rec->active_version;

			if (pass == 0 ? !active :
				pass == 1 ? !asked || active :
				active || asked || vr->key.state != KEY_ACTIVE || vr->key.wrapped == NULL)
				continue;
			l1_note_version(lt, (uint32) vr->version,
							vr->key.wrapped ? vr->key.state : KEY_DESTROYED,
							vr->wrapped_hash, no_dek_hint);
			noted++;
		}
	}
	l1_active_version_first(lt);
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
	uint64		generation = lt->generation;
	LocalVersion *lv = l1_find_version(lt, version);
	TenantKeyRecord rec;
	bool		have_rec = false;
	KeyState	state;
	uint64		hash;
	uint8		dek[KMS_DEK_LEN];
	TimestampTz expires_at;
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

		if (l1_look_in_l2(tenant, tenant_len, shared_gen, version, true, &view) &&
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
			hash = rec.key.wrapped ? l2_wrapped_hash(rec.key.wrapped) : 0;
			if (rec.key.wrapped == NULL)
				state = KEY_DESTROYED;
		}
		/* The key store read may have run invalidation callbacks: find the entry again. */
		if (have_rec && (lt = l1_refind(tenant, tenant_len, tenant_id)) == NULL)
		{
			l1_prefetch_wipe();
			elog(ERROR, "pg_envelope key cache entry of tenant \"%s\" vanished", tenant);
		}
		lv = l1_note_version(lt, version, state, hash, no_dek_hint);
	}
	if (state != KEY_ACTIVE)
		raise_key_unusable(tenant, version, state, true);

	/* 2. The context `use` needs, from the shared copy of the DEK. */
	if (lv->expires_at <= now)
		cipher_key_free(&lv->key);	/* the shared copy it came from has expired */
	if (cipher_key_ready(&lv->key, use))
		return &lv->key;

	if (!l1_prefetch_matches(tenant_id, version, hash) && lv->hint.seq != 0 &&
		!l1_pending_bump && l2_available())
	{
		/* Where L2 found it when this tenant was looked up: its slot, if still its. */
		l1_prefetch_wipe();
		if (l2_copy_hinted_dek(lv->hint, &l1_prefetch))
		{
			l1_prefetch_tenant_id = tenant_id;
			l1_prefetch_version = version;
			l1_prefetch_hash = hash;
		}
		else
			lv->hint.seq = 0;
	}
	if (!l1_prefetch_matches(tenant_id, version, hash))
	{
		TenantView	view;

		/* Through the tenant's entry in L2, which this row has just read. */
		(void) l1_look_in_l2(tenant, tenant_len, shared_gen, version, true, &view);
	}
	if (l1_prefetch_matches(tenant_id, version, hash))
	{
		/* L2 gave it out with the tenant's state (and counted the hit). */
		memcpy(dek, l1_prefetch.dek, sizeof(dek));
		expires_at = l1_prefetch.expires_at;
		have_dek = true;
	}
	l1_prefetch_wipe();
	if (!have_dek && l2_available())
	{
		have_dek = l2_peek_key(tenant_id, version, hash, dek, &expires_at);
		if (have_dek)
			l2_count_lookup(true);
	}
	if (!have_dek)
		have_dek = pending_new_key_copy(tenant_id, version, hash, dek, &expires_at);
	if (!have_dek)
	{
		const DataKeyRecord *kept = have_rec ? NULL :
			last_read_key(tenant, tenant_id, generation, version, hash);

		if (kept != NULL)
			rec.key = *kept;	/* read with the state checked above: no second read */
		else if (!have_rec)
		{
			read_key_store(tenant, tenant_len, version, shared_gen, &rec);
			if (rec.tenant_id != tenant_id || !rec.key_found || rec.key.wrapped == NULL ||
				rec.key.state != KEY_ACTIVE || l2_wrapped_hash(rec.key.wrapped) != hash)
				elog(ERROR, "key version %u of tenant \"%s\" changed while it was read",
					 version, tenant);
		}
		l2_load_key(tenant, tenant_id, version, &rec.key, dek, &expires_at);
		lt = l1_refind(tenant, tenant_len, tenant_id);
		if (lt == NULL || (lv = l1_find_version(lt, version)) == NULL)
		{
			explicit_bzero(dek, sizeof(dek));
			elog(ERROR, "pg_envelope key cache entry of tenant \"%s\" vanished", tenant);
		}
	}

	cs = cipher_key_add(&lv->key, use, dek, &l1_spare);
	explicit_bzero(dek, sizeof(dek));
	if (cs != CIPHER_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not set up a cipher context for a data key"),
				 errhidestmt(true)));
	/* Several contexts may come from several shared copies: the earliest expiry rules. */
	if (lv->expires_at == 0 || lv->expires_at <= now || expires_at < lv->expires_at)
		lv->expires_at = expires_at;
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
	LocalTenant *lt = l1_tenant_entry(tenant, tenant_len, true, 0, true);
	EnvelopeKeyRef ref;
	bool		transient;

	if (lt->access.nroles != 0)
		l1_prefetch_wipe();		/* no copy of a DEK waits through a check that may raise */
	tenant_access_require(&lt->access, lt->name);
	ref.version = lt->active_version;
	ref.tenant_id = lt->tenant_id;
	transient = lt == &l1_transient;
	if (transient)
	{
		/* Fetched while the key is set up, which takes longer than a miss. */
		ref.budget = l1_transient_budget_slot(ref.tenant_id);
		if (*ref.budget != NULL)
			__builtin_prefetch(*ref.budget, 1);
	}
	ref.key = l1_key(lt, ref.version, CIPHER_USE_ENCRYPT);
	l1_prefetch_wipe();
	/* l1_key returns the key inside its LocalVersion (lt may have moved meanwhile). */
	if (!transient)
		ref.budget = &((LocalVersion *) ((char *) ref.key - offsetof(LocalVersion, key)))->budget;
	return ref;
}

/* The version new values use; 0 when the tenant is disabled or destroyed. */
uint32
keycache_active_version(const char *tenant, size_t tenant_len)
{
	LocalTenant *lt = l1_tenant_entry(tenant, tenant_len, false, 0, false);

	l1_prefetch_wipe();
	return lt->state == TENANT_ACTIVE ? lt->active_version : 0;
}

const CipherKey *
keycache_key_for_decrypt(const char *tenant, size_t tenant_len, uint32 version,
						 CipherUse use)
{
	LocalTenant *lt = l1_tenant_entry(tenant, tenant_len, true, version, true);
	const CipherKey *key;

	if (lt->access.nroles != 0)
		l1_prefetch_wipe();		/* no copy of a DEK waits through a check that may raise */
	tenant_access_require(&lt->access, lt->name);
	key = l1_key(lt, version, use);
	l1_prefetch_wipe();
	return key;
}

/* ---------------------------------------------------------------------------
 * Invalidation
 */
uint64
keycache_generation(void)
{
	return l1_local_generation + l2_generation();
}

bool
keycache_key_store_changed_here(void)
{
	return l1_pending_bump;
}

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

/* Wipe and forget every pending new DEK. */
static void
pending_new_keys_wipe(void)
{
	if (pending_new_keys == NULL)
		return;
	explicit_bzero(pending_new_keys, sizeof(PendingNewKey) * max_pending_new_keys);
	pfree(pending_new_keys);
	pfree(pending_new_key_heads);
	pending_new_keys = NULL;
	pending_new_key_heads = NULL;
	n_pending_new_keys = max_pending_new_keys = 0;
}

/*
 * Room for one more pending DEK.  Grown by hand, not repalloc: the old array is wiped
 * before it is freed.  An allocation failure raises before anything moved.
 */
static PendingNewKey *
pending_new_key_slot(void)
{
	if (n_pending_new_keys == max_pending_new_keys)
	{
		int			newmax = Max(16, max_pending_new_keys * 2);
		PendingNewKey *grown = MemoryContextAllocZero(TopMemoryContext,
													  sizeof(PendingNewKey) * newmax);
		int		   *heads = MemoryContextAlloc(TopMemoryContext, sizeof(int) * newmax);

		if (pending_new_keys != NULL)
		{
			memcpy(grown, pending_new_keys, sizeof(PendingNewKey) * n_pending_new_keys);
			explicit_bzero(pending_new_keys, sizeof(PendingNewKey) * max_pending_new_keys);
			pfree(pending_new_keys);
			pfree(pending_new_key_heads);
		}
		pending_new_keys = grown;
		pending_new_key_heads = heads;
		max_pending_new_keys = newmax;
		pending_new_keys_rechain();
	}
	return &pending_new_keys[n_pending_new_keys++];
}

/*
 * The transaction committed: its new DEKs enter the shared cache, under one lock
 * acquisition per L2_NEW_KEYS_PER_LOCK of them, until one finds no room (the rest
 * would not either) or a purge has run since PRE_COMMIT (l2_store_new_keys).  No
 * ERROR here.
 */
static void
pending_new_keys_store(void)
{
	const NewDataKey *batch[L2_NEW_KEYS_PER_LOCK];

	for (int i = 0; i < n_pending_new_keys;)
	{
		int			n = 0;

		while (n < L2_NEW_KEYS_PER_LOCK && i < n_pending_new_keys)
			batch[n++] = &pending_new_keys[i++].key;
		if (!l2_store_new_keys(batch, n, pending_new_keys_purge_seq))
			break;
	}
	pending_new_keys_wipe();
}

uint64
keycache_new_key_epoch(void)
{
	return l2_revocation_epoch();
}

void
keycache_prime(const char *tenant, int32 tenant_id, uint32 version, const char *provider,
			   const char *key_arn, const bytea *wrapped, const uint8 dek[KMS_DEK_LEN],
			   uint64 epoch)
{
	PendingNewKey *p;
	int32		master_key;
	TimestampTz made_at;
	int			chain;

	if (!l2_available())
		return;

	/*
	 * Before the master key is noted in use: the key must expire no later than the
	 * re-checks of its master key go on (they stop a cache_ttl after its last use).
	 */
	made_at = GetCurrentTimestamp();
	master_key = kms_recheck_track(provider, key_arn, tenant, version,
								   (const uint8 *) VARDATA_ANY(wrapped),
								   VARSIZE_ANY_EXHDR(wrapped));
	p = pending_new_key_slot();
	p->key.tenant_id = tenant_id;
	p->key.version = version;
	p->key.wrapped_hash = l2_wrapped_hash(wrapped);
	p->key.master_key = master_key;
	p->key.revocation_epoch = epoch;
	p->key.made_at = made_at;
	p->subid = GetCurrentSubTransactionId();
	memcpy(p->key.dek, dek, KMS_DEK_LEN);
	chain = pending_new_key_chain(tenant_id, version);
	p->next = pending_new_key_heads[chain];
	pending_new_key_heads[chain] = (int) (p - pending_new_keys);
}

/*
 * A subtransaction ended: the DEKs of one that aborted are wiped (its key store rows
 * are gone); those of one that committed now belong to its parent.
 */
static void
keycache_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
						  SubTransactionId parentSubid, void *arg)
{
	int			kept = 0;

	if (event != SUBXACT_EVENT_ABORT_SUB && event != SUBXACT_EVENT_COMMIT_SUB)
		return;
	for (int i = 0; i < n_pending_new_keys; i++)
	{
		PendingNewKey *p = &pending_new_keys[i];

		if (p->subid == mySubid && event == SUBXACT_EVENT_ABORT_SUB)
		{
			explicit_bzero(p, sizeof(*p));
			continue;
		}
		if (p->subid == mySubid)
			p->subid = parentSubid;
		if (kept != i)
		{
			pending_new_keys[kept] = *p;
			explicit_bzero(p, sizeof(*p));
		}
		kept++;
	}
	if (kept != n_pending_new_keys)
	{
		n_pending_new_keys = kept;
		pending_new_keys_rechain();
	}
}

static void
keycache_xact_callback(XactEvent event, void *arg)
{
	ListCell   *lc;

	switch (event)
	{
		case XACT_EVENT_PRE_COMMIT:

			/*
			 * Before this transaction's rows become visible: a purge that runs after
			 * them (a destroy_tenant that waited for this transaction) may find none
			 * of its new keys in shared memory yet, and they must not go in after it.
			 */
			if (n_pending_new_keys > 0)
				pending_new_keys_purge_seq = l2_purge_sequence();
			return;
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
			/* Before the purges: a tenant destroyed after its rotation goes too. */
			pending_new_keys_store();
			foreach(lc, pending_purges)
			{
				PendingPurge *p = lfirst(lc);

				l2_purge(p->tenant_id, p->version);
			}
			if (l1_pending_bump)
				l2_bump_generation();
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
	/* Not stored at abort or PREPARE (a prepared transaction commits elsewhere). */
	pending_new_keys_wipe();
	/* The list lived in TopTransactionContext, which is going away. */
	pending_purges = NIL;
	l1_pending_bump = false;
	/* No context of a key waits as the spare past its transaction. */
	cipher_key_free(&l1_spare);
}

/*
 * A relcache invalidation of a key table (sent at commit by the key store trigger, and
 * replayed from WAL on a standby), or of everything: mark L1 stale.  Other relations'
 * invalidations, frequent under DDL, are ignored.
 *
 * On a primary the committing backend has already bumped the shared generation, so
 * the tenant states in L2 are stale already.  A standby has no committing backend:
 * there each backend that replays such an invalidation bumps the shared generation
 * too (a few bumps for one change, which only costs a re-read).  So does every
 * backend under Citus, where key changes commit on the nodes' copies of the key tables
 * with two-phase commit and no backend bumps at commit (see citus_support.c).
 */
static void
keycache_relcache_callback(Datum arg, Oid relid)
{
	if (relid != InvalidOid && !keystore_is_key_table(relid))
		return;
	l1_local_generation++;
	/* A dropped and re-created extension has new tables: look them up again. */
	keystore_forget_relations();
	if (l2_available() && (RecoveryInProgress() || citus_is_loaded()))
		l2_bump_generation();
}

void
keycache_init_backend(void)
{
	static bool registered = false;

	if (registered)
		return;
	RegisterXactCallback(keycache_xact_callback, NULL);
	RegisterSubXactCallback(keycache_subxact_callback, NULL);
	CacheRegisterRelcacheCallback(keycache_relcache_callback, (Datum) 0);
	registered = true;
}

void
keycache_flush(void)
{
	l1_reset();
	l2_flush_database();
}

/* Could a lookup use this record's key?  Tenant and version active, key stored. */
static bool
prewarm_usable(const TenantKeyRecord *rec)
{
	return rec->state == TENANT_ACTIVE && rec->key_found &&
		rec->key.state == KEY_ACTIVE && rec->key.wrapped != NULL;
}

/*
 * The prewarm's load: what a lookup that misses does (key store at the latest
 * snapshot, then the single-flight load, whose entry a purge or a refused master key
 * dooms while it is in flight), minus this backend's copy.  A revocation that commits
 * after the key store was read purges at commit, but possibly before our entry
 * existed, and bumps the generation only after that: so the key store is read again
 * once the key is in, and the key purged if it may no longer be used.
 */
bool
keycache_prewarm(const char *tenant, uint32 version)
{
	TenantKeyRecord rec;
	TenantKeyRecord again;
	uint8		dek[KMS_DEK_LEN];
	TimestampTz expires_at;
	uint64		hash;

	if (!l2_available() || !keystore_read_tenant_key(tenant, (int32) version, &rec) ||
		!prewarm_usable(&rec))
		return false;
	hash = l2_wrapped_hash(rec.key.wrapped);
	l2_load_key(tenant, rec.tenant_id, version, &rec.key, dek, &expires_at);
	explicit_bzero(dek, sizeof(dek));
	if (!keystore_read_tenant_key(tenant, (int32) version, &again) || !prewarm_usable(&again) ||
		again.tenant_id != rec.tenant_id || l2_wrapped_hash(again.key.wrapped) != hash)
	{
		l2_purge(rec.tenant_id, version);
		return false;
	}
	return true;
}

/* ---------------------------------------------------------------------------
 * Statistics
 */
void
keycache_get_stats(KeyCacheStats *out)
{
	if (l2_get_stats(out))
		return;
	/* Without shared memory the counters are this backend's, and so is the limit. */
	out->capacity = L1_MAX_TENANTS;
	out->entries = local_tenants ? hash_get_num_entries(local_tenants) : 0;
	out->tenant_entries = out->entries;
	out->shared = false;
}
