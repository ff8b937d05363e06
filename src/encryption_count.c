/*
 * encryption_count.c — counts of randomized encryptions per DEK version, reserved
 * ahead in the key store as sequences are, and the automatic rotation of a tenant's
 * key when its count reaches envelope.max_encryptions_per_key (encryption_count.h).
 *
 * Where the count lives: envelope.data_key_encryptions has one row per (tenant_id,
 * version), whose first column is the number of encryptions reserved so far under
 * that key.  A backend that has none left reserves a block by rewriting that number in
 * place under the buffer's exclusive lock, WAL-logged as heap_inplace_update() logs
 * its writes, much as nextval() advances a sequence: the write is not transactional (a
 * rollback keeps it), it reaches a standby by replay, and it needs no row lock.  The
 * block is then used up in backend memory: per row, one compare and one increment in
 * the backend's budget of the key, which the key cache keeps beside the key's cipher
 * contexts, or for a tenant its first level serves through the transient entry in a
 * slot of the tenant's id (no lookup, no lock, no shared memory).
 *
 * Why the stored figure never under-counts: a count is handed out only from a block
 * whose reservation is WAL-logged, and WAL is replayed in order, so a crash that keeps
 * a row encrypted under a count keeps the reservation too (its WAL precedes the row's).
 * Values returned to a client by a transaction that writes nothing are covered by a
 * flush of the reservation's WAL when the transaction ends, before its commit and at
 * its abort alike (a ROLLBACK may follow a SELECT that returned ciphertexts).  One
 * window remains: values a statement has already streamed to its client when the
 * server crashes while that statement or its transaction is still running, before the
 * WAL writer has flushed the reservation on its own (it writes out whole WAL pages as
 * they fill, within wal_writer_delay).  Such values reached no committed row, and the
 * client saw the crash end its transaction.  Flushing at each reservation would close
 * it, at one WAL flush per first block of every (tenant, key) a backend touches.  Blocks
 * reserved in a row the transaction itself inserted (a key it created) are given up if
 * it aborts, as the row is gone and may come back at 0.  What a crash loses
 * is the unused rest of each backend's blocks, and so does a backend that exits: the
 * figure is an upper bound, higher than the truth by at most one block per backend
 * that encrypted under the key (blocks grow from ENCRYPTION_BLOCK_FIRST to
 * ENCRYPTION_BLOCK_MAX as a backend keeps encrypting under one key).
 *
 * Where counting is impossible: a standby cannot write the key store, so it refuses
 * to encrypt (decryption works); a database whose extension is still 0.1.0 has no
 * count table, and encrypts uncounted, as 0.1.0 did.
 *
 * The limit: blocks are never reserved past envelope.max_encryptions_per_key, so no
 * encryption under a key ever goes beyond it, whatever the number of backends.  From
 * 90 % of the limit on, blocks shrink to a 64th of the last tenth, so the end is
 * approached closely, and the backend that reserves the first block past 90 % warns
 * (once per key per backend).  The encryption that finds its key spent rotates the
 * tenant's key in its own transaction, under the tenant's row lock (a concurrent one
 * waits and then uses the new version); if that transaction rolls back, the rotation
 * goes with it and the next encryption rotates again: the spent key stays spent.
 */
#include "pg_envelope.h"
#include "encryption_count.h"

#include <limits.h>

#include "access/genam.h"
#include "access/heapam_xlog.h"
#include "access/htup_details.h"
#include "access/parallel.h"
#include "access/stratnum.h"
#include "access/table.h"
#include "access/xact.h"
#include "access/xlog.h"
#include "access/xloginsert.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "lib/ilist.h"
#include "miscadmin.h"
#include "storage/bufmgr.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/guc.h"
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/relcache.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"

extern Datum envelope_rotate_tenant_key(PG_FUNCTION_ARGS);

int			envelope_max_encryptions_per_key = 1 << 30;

#ifdef ENVELOPE_BENCH_TOGGLE
/*
 * Only in the library test/bench/counts_equality.sh builds: lets one session time
 * encrypt with and without the count, query by query.  Never in a real build.
 */
static bool bench_count_encryptions = true;
#endif

/*
 * A backend's first block under a key is small, so that a session encrypting a few
 * values overstates the count by little; each further block is 8 times larger, up to
 * a size whose reservation (one buffer write and one WAL record, about 10 µs) costs
 * well under 1 % of the encryptions it covers.
 */
#define ENCRYPTION_BLOCK_FIRST	64
#define ENCRYPTION_BLOCK_MAX	65536

/* The count table's layout, which the in-place update relies on (checked per write). */
#define COUNT_TABLE_NAME		"data_key_encryptions"
#define COUNT_ATTNUM_TENANT_ID	2
#define COUNT_ATTNUM_VERSION	3
#define COUNT_NATTS				3
#define COUNT_DATA_LEN			(sizeof(int64) + 2 * sizeof(int32))

typedef struct BudgetKey
{
	int32		tenant_id;
	uint32		version;
} BudgetKey;

/* This backend's reservation under one key. */
typedef struct EncryptionBudget
{
	BudgetKey	key;			/* hash key */
	int64		next;			/* the number of this backend's next encryption */
	int64		end;			/* first number past its reservation */
	int64		block;			/* size of its next reservation */
	bool		warned;			/* the 90 % warning was given in this backend */
	bool		row_uncommitted;	/* its row was inserted by this transaction */
	bool		tid_valid;		/* tid: where its row was last found, in file */
	ItemPointerData tid;
	Oid			tid_file;		/* relfilenode (VACUUM FULL makes a new one) */
	dlist_node	by_reservation;	/* place in budgets_by_reservation */
} EncryptionBudget;

/*
 * The budgets live in a pool of slots, allocated in chunks as they are first needed
 * and never freed: the key cache keeps pointers to them (LocalVersion.budget, and its
 * transient entry's slots by tenant id), which must never dangle.  When the pool is
 * full, the slot least recently reserved in is given to the new key; its unused rest
 * is lost, which is always safe (the stored count stays an upper bound), and a key
 * cache entry still pointing at it sees another key in it and looks its own up again
 * (count_encryption).  The hash maps a key to its slot.
 *
 * The pool holds as many keys as the shared key cache (envelope.cache_size), at
 * least BUDGET_POOL_MIN_SLOTS and at most BUDGET_POOL_MAX_SLOTS: a scan that cycles
 * through more keys than the pool holds gives up every slot before its key comes
 * back, so each of its rows would reserve a new block (an index scan of the count
 * table and a WAL record, about 5 µs); sized like the shared cache, the pool covers
 * every key that can be served without the KMS.  About 110 bytes a slot with its hash
 * entry: at most 2 MB per backend at the minimum, 14 MB at the maximum, however many
 * (tenant, version) the backend has encrypted under.
 */
#define BUDGET_CHUNK_SLOTS		256

typedef struct BudgetHashEntry
{
	BudgetKey	key;			/* hash key */
	EncryptionBudget *slot;
} BudgetHashEntry;

static MemoryContext budget_context = NULL;
static HTAB *budgets = NULL;
static EncryptionBudget *budget_chunks[BUDGET_POOL_MAX_SLOTS / BUDGET_CHUNK_SLOTS];
static int	budget_slots_used = 0;
/* The pool's size, fixed when the backend first counts (see above). */
static int	budget_pool_slots = 0;
/* Every slot in use, least recently reserved in first. */
static dlist_head budgets_by_reservation = DLIST_STATIC_INIT(budgets_by_reservation);

#define BUDGET_SLOT(i)	(&budget_chunks[(i) / BUDGET_CHUNK_SLOTS][(i) % BUDGET_CHUNK_SLOTS])

/*
 * WAL of reservations not yet known to be flushed; flushed when this backend's
 * transaction ends, committed or not.
 */
static XLogRecPtr unflushed_reservation = InvalidXLogRecPtr;
static bool xact_callback_registered = false;

/* Budgets whose row this transaction inserted (budget->row_uncommitted). */
static int	budgets_on_uncommitted_rows = 0;

/*
 * The count table the budgets' blocks were reserved in.  DROP EXTENSION and CREATE
 * EXTENSION make a new one whose rows start at 0, and may give a new key the
 * (tenant_id, version) of an old one: a block of the old table must then never be
 * used.  A relcache invalidation of the table (or of every relation) sets the flag,
 * and the next row that finds it set looks the table up again.
 */
static Oid	budgets_count_table = InvalidOid;
static bool count_table_recheck = false;

/* ---------------------------------------------------------------------------
 * The setting
 */

/* Every budget's unused rest is given up (always safe: the stored count stays an upper bound). */
static void
give_up_all_blocks(void)
{
	for (int i = 0; i < budget_slots_used; i++)
		BUDGET_SLOT(i)->end = BUDGET_SLOT(i)->next;
}

/* A changed limit applies to the next row: every block is given up (the rest is lost). */
static void
assign_max_encryptions(int newval, void *extra)
{
	give_up_all_blocks();
}

void
encryption_count_define_settings(void)
{
	DefineCustomIntVariable("envelope.max_encryptions_per_key",
							"Randomized encryptions under one data key after which the tenant's key is rotated.",
							"AES-GCM with random nonces must stay under 2^32 encryptions per key.  "
							"The encryption that finds the key spent rotates it; a WARNING appears at 90 %.",
							&envelope_max_encryptions_per_key,
							1 << 30, 1, INT_MAX,
							PGC_SIGHUP, 0,
							NULL, assign_max_encryptions, NULL);
#ifdef ENVELOPE_BENCH_TOGGLE
	DefineCustomBoolVariable("envelope.bench_count_encryptions",
							 "Benchmark builds only: count encryptions (off measures encrypt without).",
							 NULL, &bench_count_encryptions, true,
							 PGC_USERSET, GUC_NOT_IN_SAMPLE, NULL, NULL, NULL);
#endif
}

/* ---------------------------------------------------------------------------
 * The count table
 */

/* envelope.data_key_encryptions, or InvalidOid while the extension is 0.1.0. */
static Oid
count_table(void)
{
	Oid			nsp = get_namespace_oid("envelope", true);

	return OidIsValid(nsp) ? get_relname_relid(COUNT_TABLE_NAME, nsp) : InvalidOid;
}

static void
count_table_invalidated(Datum arg, Oid relid)
{
	if (!OidIsValid(relid) || relid == budgets_count_table)
		count_table_recheck = true;
}

/*
 * The blocks of every budget were reserved in `relid`'s rows, or are given up now:
 * a count table other than the one they came from (the extension was dropped and
 * created again, or updated from 0.1.0) has its own rows, starting at 0.
 */
static void
budgets_reserve_in(Oid relid)
{
	static bool callback_registered = false;

	if (!callback_registered)
	{
		CacheRegisterRelcacheCallback(count_table_invalidated, (Datum) 0);
		callback_registered = true;
	}
	if (relid == budgets_count_table)
		return;
	for (int i = 0; i < budget_slots_used; i++)
	{
		EncryptionBudget *b = BUDGET_SLOT(i);

		b->end = b->next;
		b->tid_valid = false;
		b->row_uncommitted = false;
		b->block = ENCRYPTION_BLOCK_FIRST;
	}
	budgets_on_uncommitted_rows = 0;
	budgets_count_table = relid;
}

/*
 * The row of `key`, including one this transaction inserted (*ours is then true);
 * false if there is none.
 */
static bool
find_count_row(Relation rel, BudgetKey key, ItemPointer tid, bool *ours)
{
	ScanKeyData skey[2];
	SysScanDesc scan;
	HeapTuple	tuple;
	Oid			pkey = RelationGetPrimaryKeyIndex(rel);
	bool		found = false;

	ScanKeyInit(&skey[0], COUNT_ATTNUM_TENANT_ID, BTEqualStrategyNumber, F_INT4EQ,
				Int32GetDatum(key.tenant_id));
	ScanKeyInit(&skey[1], COUNT_ATTNUM_VERSION, BTEqualStrategyNumber, F_INT4EQ,
				Int32GetDatum((int32) key.version));
	scan = systable_beginscan(rel, pkey, OidIsValid(pkey), SnapshotSelf, 2, skey);
	if ((tuple = systable_getnext(scan)) != NULL)
	{
		*tid = tuple->t_self;
		*ours = TransactionIdIsCurrentTransactionId(HeapTupleHeaderGetRawXmin(tuple->t_data));
		found = true;
	}
	systable_endscan(scan);
	return found;
}

/*
 * The count row of `key` at `tid` in a locked page, or NULL if it is not there.  With
 * `current_only`, also NULL for a row version someone has updated or deleted (by hand:
 * the extension never does), so that a remembered tid is looked up again.
 */
static HeapTupleHeader
count_tuple_in_page(Page page, ItemPointer tid, BudgetKey key, bool current_only)
{
	OffsetNumber off = ItemPointerGetOffsetNumber(tid);
	ItemId		lp;
	HeapTupleHeader htup;
	char	   *data;
	int32		tenant_id;
	int32		version;

	if (off < FirstOffsetNumber || off > PageGetMaxOffsetNumber(page))
		return NULL;
	lp = PageGetItemId(page, off);
	if (!ItemIdIsNormal(lp))
		return NULL;
	htup = (HeapTupleHeader) PageGetItem(page, lp);
	if (HeapTupleHeaderGetNatts(htup) != COUNT_NATTS || (htup->t_infomask & HEAP_HASNULL) ||
		ItemIdGetLength(lp) != htup->t_hoff + COUNT_DATA_LEN)
		return NULL;
	if (current_only && !(htup->t_infomask & HEAP_XMAX_INVALID) &&
		!HEAP_XMAX_IS_LOCKED_ONLY(htup->t_infomask) &&
		TransactionIdIsValid(HeapTupleHeaderGetRawXmax(htup)))
		return NULL;
	data = (char *) htup + htup->t_hoff;
	memcpy(&tenant_id, data + sizeof(int64), sizeof(int32));
	memcpy(&version, data + sizeof(int64) + sizeof(int32), sizeof(int32));
	if (tenant_id != key.tenant_id || (uint32) version != key.version)
		return NULL;
	return htup;
}

/*
 * How many encryptions to reserve now, reserved already being `reserved`: up to the
 * 90 % mark in growing blocks, then in small ones, never past the limit.
 */
static int64
block_to_grant(const EncryptionBudget *b, int64 reserved, int64 limit)
{
	int64		warn_mark = limit - limit / 10;
	int64		grant = b->block;

	if (reserved < warn_mark)
		grant = Min(grant, warn_mark - reserved);
	else
		grant = Min(grant, Max(1, (limit - warn_mark) / 64));
	return Min(grant, limit - reserved);
}

typedef enum ReserveResult
{
	RESERVED,
	KEY_SPENT,
	ROW_NOT_THERE
} ReserveResult;

/*
 * Reserve this backend's next block under b->key in the row at `tid`: read, advance
 * and WAL-log the stored count under the buffer's exclusive lock, so concurrent
 * reservations never overlap.  The WAL record is the one heap_inplace_update() writes
 * (PostgreSQL's own non-transactional update of a tuple, replayed on standbys and
 * after a crash); heap_inplace_update() itself cannot serve, as it writes a value read
 * before its lock and refuses parallel mode, and generic WAL costs a page diff.
 */
static ReserveResult
reserve_in_place(Relation rel, ItemPointer tid, bool remembered, EncryptionBudget *b,
				 int64 limit, int64 *start, XLogRecPtr *lsn)
{
	Buffer		buf = ReadBuffer(rel, ItemPointerGetBlockNumber(tid));
	Page		page;
	HeapTupleHeader htup;
	int64		reserved;
	int64		granted;

	LockBuffer(buf, BUFFER_LOCK_EXCLUSIVE);
	page = BufferGetPage(buf);
	htup = count_tuple_in_page(page, tid, b->key, remembered);
	if (htup == NULL)
	{
		UnlockReleaseBuffer(buf);
		return ROW_NOT_THERE;
	}
	/* t_hoff is MAXALIGNed: the bigint is aligned. */
	memcpy(&reserved, (char *) htup + htup->t_hoff, sizeof(int64));
	if (reserved >= limit)
	{
		UnlockReleaseBuffer(buf);
		return KEY_SPENT;
	}
	granted = reserved + block_to_grant(b, reserved, limit);

	START_CRIT_SECTION();
	memcpy((char *) htup + htup->t_hoff, &granted, sizeof(int64));
	MarkBufferDirty(buf);
	*lsn = InvalidXLogRecPtr;
	if (RelationNeedsWAL(rel))
	{
		xl_heap_inplace xlrec;

		/* Later versions add fields (invalidations): none here. */
		memset(&xlrec, 0, sizeof(xlrec));
		xlrec.offnum = ItemPointerGetOffsetNumber(tid);
		XLogBeginInsert();
		XLogRegisterData((char *) &xlrec, SizeOfHeapInplace);
		XLogRegisterBuffer(0, buf, REGBUF_STANDARD);
		XLogRegisterBufData(0, (char *) htup + htup->t_hoff, COUNT_DATA_LEN);
		*lsn = XLogInsert(RM_HEAP_ID, XLOG_HEAP_INPLACE);
		PageSetLSN(page, *lsn);
	}
	END_CRIT_SECTION();
	UnlockReleaseBuffer(buf);

	*start = reserved;
	b->end = granted;
	return RESERVED;
}

/*
 * A row this transaction inserted (a key it created, or a row added on first use) is
 * gone if it aborts, and the same (tenant id, version) may be stored again later with
 * a new row at 0: blocks reserved in the dead row must not be used.  At commit they
 * become ordinary blocks.  A subtransaction's abort may have taken the row too, so it
 * gives them up as well.
 */
static void
forget_uncommitted_rows(bool give_up_blocks)
{
	if (budgets_on_uncommitted_rows == 0)
		return;
	for (int i = 0; i < budget_slots_used; i++)
	{
		EncryptionBudget *b = BUDGET_SLOT(i);

		if (b->row_uncommitted)
		{
			if (give_up_blocks)
			{
				b->end = b->next;
				b->tid_valid = false;	/* the row may be dead */
			}
			b->row_uncommitted = false;
		}
	}
	budgets_on_uncommitted_rows = 0;
}

/* Make the reservations this backend handed counts out of durable. */
static void
flush_reservation_wal(void)
{
	if (!XLogRecPtrIsInvalid(unflushed_reservation))
	{
		XLogRecPtr	lsn = unflushed_reservation;

		/* Cleared first: an error in the flush must not be retried forever. */
		unflushed_reservation = InvalidXLogRecPtr;
		XLogFlush(lsn);
	}
}

static void
count_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_PRE_COMMIT:
		case XACT_EVENT_PRE_PREPARE:
			flush_reservation_wal();
			break;
		case XACT_EVENT_COMMIT:
			forget_uncommitted_rows(false);
			break;
		case XACT_EVENT_ABORT:
			/*
			 * A rolled-back transaction may have returned ciphertexts to its client
			 * (a SELECT of encrypt() before ROLLBACK): their counts must outlive a
			 * crash as much as a committed transaction's do.
			 */
			flush_reservation_wal();
			forget_uncommitted_rows(true);
			break;
		case XACT_EVENT_PREPARE:
			/* A prepared transaction may yet roll back. */
			forget_uncommitted_rows(true);
			break;
		default:
			break;
	}
}

static void
count_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
					   SubTransactionId parentSubid, void *arg)
{
	if (event == SUBXACT_EVENT_ABORT_SUB)
		forget_uncommitted_rows(true);
}

static void
register_callbacks(void)
{
	if (xact_callback_registered)
		return;
	RegisterXactCallback(count_xact_callback, NULL);
	RegisterSubXactCallback(count_subxact_callback, NULL);
	xact_callback_registered = true;
}

/*
 * The reservation at `lsn` must be on disk before a value encrypted under it leaves
 * with a commit.  A transaction that writes flushes it with its commit record anyway;
 * one that only returns values does it in the callback.  A parallel worker cannot know
 * when its leader commits, so it flushes at once.
 */
static void
note_reservation_wal(XLogRecPtr lsn)
{
	if (IsParallelWorker())
	{
		XLogFlush(lsn);
		return;
	}
	if (lsn > unflushed_reservation)
		unflushed_reservation = lsn;
}

/* ---------------------------------------------------------------------------
 * Per row
 */

/*
 * A slot for a key that has none: a new one while the pool has room, else the one
 * least recently reserved in, taken from its key.  A slot on a row this transaction
 * inserted may be taken too: its blocks go with it, and if the key comes back in this
 * transaction, its new slot finds the row its own again (find_count_row).
 */
static EncryptionBudget *
budget_slot_for_new_key(void)
{
	EncryptionBudget *b;
	BudgetHashEntry *entry;

	if (budget_slots_used < budget_pool_slots)
	{
		int			chunk = budget_slots_used / BUDGET_CHUNK_SLOTS;

		if (budget_chunks[chunk] == NULL)
			budget_chunks[chunk] = MemoryContextAllocZero(budget_context,
														  BUDGET_CHUNK_SLOTS * sizeof(EncryptionBudget));
		b = BUDGET_SLOT(budget_slots_used);
		budget_slots_used++;
		dlist_push_tail(&budgets_by_reservation, &b->by_reservation);
		return b;
	}
	b = dlist_container(EncryptionBudget, by_reservation,
						dlist_head_node(&budgets_by_reservation));
	entry = hash_search(budgets, &b->key, HASH_FIND, NULL);
	if (entry != NULL && entry->slot == b)
		hash_search(budgets, &b->key, HASH_REMOVE, NULL);
	if (b->row_uncommitted)
		budgets_on_uncommitted_rows--;
	dlist_move_tail(&budgets_by_reservation, &b->by_reservation);
	return b;
}

static EncryptionBudget *
budget_entry(int32 tenant_id, uint32 version)
{
	BudgetKey	key;
	BudgetHashEntry *entry;
	EncryptionBudget *b;
	bool		found;

	if (budgets == NULL)
	{
		HASHCTL		info;

		budget_context = AllocSetContextCreate(TopMemoryContext,
											   "pg_envelope encryption counts",
											   ALLOCSET_DEFAULT_SIZES);
		memset(&info, 0, sizeof(info));
		info.keysize = sizeof(BudgetKey);
		info.entrysize = sizeof(BudgetHashEntry);
		info.hcxt = budget_context;
		budgets = hash_create("pg_envelope encryption budgets by key", 256, &info,
							  HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
		/* Once per backend: without preload cache_size may change, the pool may not. */
		budget_pool_slots = Min(Max(envelope_cache_size, BUDGET_POOL_MIN_SLOTS),
								BUDGET_POOL_MAX_SLOTS);
	}
	memset(&key, 0, sizeof(key));
	key.tenant_id = tenant_id;
	key.version = version;
	entry = hash_search(budgets, &key, HASH_FIND, NULL);
	if (entry != NULL)
		return entry->slot;

	/* The slot first, as taking one removes its old key from the hash. */
	b = budget_slot_for_new_key();
	/* Version 0 is no key's: the slot is nobody's until the hash has it. */
	b->key.tenant_id = 0;
	b->key.version = 0;
	b->next = b->end = 0;
	b->block = ENCRYPTION_BLOCK_FIRST;
	b->warned = false;
	b->row_uncommitted = false;
	b->tid_valid = false;
	entry = hash_search(budgets, &key, HASH_ENTER, &found);
	Assert(!found);
	entry->slot = b;
	b->key = key;
	return b;
}

static void
warn_near_limit(const char *tenant, size_t tenant_len, uint32 version, int64 used, int64 limit)
{
	ereport(WARNING,
			(errcode(ERRCODE_WARNING),
			 errmsg("data key version %u of tenant \"%s\" has made %lld of its %lld encryptions",
					version, pnstrdup(tenant, tenant_len), (long long) used, (long long) limit),
			 errdetail("At envelope.max_encryptions_per_key the tenant's key is rotated by the encryption that reaches it."),
			 errhint("Rotate it sooner with envelope.rotate_tenant_key(), at a moment of your choosing."),
			 errhidestmt(true)));
}

/* The block under b->key is used up: reserve the next one.  False when the key is spent. */
static bool
reserve_block(EncryptionBudget *b, const char *tenant, size_t tenant_len)
{
	int64		limit = envelope_max_encryptions_per_key;
	Oid			relid = count_table();
	Relation	rel;
	bool		ours = false;
	ReserveResult result;
	int64		start = 0;
	XLogRecPtr	lsn = InvalidXLogRecPtr;

	budgets_reserve_in(relid);
	if (!OidIsValid(relid))
	{
		/*
		 * Extension 0.1.0: nothing to count in.  Look again after a short block, so a
		 * session that lives through ALTER EXTENSION ... UPDATE starts counting soon.
		 */
		b->next = 0;
		b->end = 1024;
		return true;
	}
	if (RecoveryInProgress())
		ereport(ERROR,
				(errcode(ERRCODE_READ_ONLY_SQL_TRANSACTION),
				 errmsg("cannot encrypt on a standby"),
				 errdetail("Every encryption under a data key is counted in the key store, which a standby cannot write."),
				 errhint("Encrypt on the primary; decryption works here."),
				 errhidestmt(true)));

	register_callbacks();
	dlist_move_tail(&budgets_by_reservation, &b->by_reservation);
	rel = table_open(relid, RowExclusiveLock);
	result = ROW_NOT_THERE;
	if (b->tid_valid && b->tid_file == rel->rd_node.relNode)
		result = reserve_in_place(rel, &b->tid, true, b, limit, &start, &lsn);
	if (result == ROW_NOT_THERE)
	{
		b->tid_valid = false;
		if (!find_count_row(rel, b->key, &b->tid, &ours))
		{
			/* A key stored without its row (a Citus worker's own table): add it now. */
			encryption_count_add_key(b->key.tenant_id, b->key.version);
			if (!find_count_row(rel, b->key, &b->tid, &ours))
				elog(ERROR, "pg_envelope: no count row for tenant id %d version %u",
					 b->key.tenant_id, b->key.version);
		}
		result = reserve_in_place(rel, &b->tid, false, b, limit, &start, &lsn);
		if (result == ROW_NOT_THERE)
			elog(ERROR, "pg_envelope: the count row of tenant id %d version %u moved",
				 b->key.tenant_id, b->key.version);
		b->tid_valid = true;
		b->tid_file = rel->rd_node.relNode;
		if (ours && !b->row_uncommitted)
		{
			b->row_uncommitted = true;
			budgets_on_uncommitted_rows++;
		}
	}
	table_close(rel, NoLock);
	if (result == KEY_SPENT)
		return false;
	note_reservation_wal(lsn);

	b->next = start;
	b->block = Min(b->block * 8, ENCRYPTION_BLOCK_MAX);
	if (start >= limit - limit / 10 && !b->warned)
	{
		b->warned = true;
		warn_near_limit(tenant, tenant_len, b->key.version, start, limit);
	}
	return true;
}

/*
 * Count one encryption under ref's key.  Per row: the backend's budget of the key,
 * which the key cache keeps beside the key, and one compare.  The slot is written
 * before anything that could run invalidations (and so move the key cache's entries).
 */
static inline bool
count_encryption(const char *tenant, size_t tenant_len, EnvelopeKeyRef ref)
{
	EncryptionBudget *b = *ref.budget;

	if (likely(b != NULL && b->next < b->end && !count_table_recheck &&
			   b->key.tenant_id == ref.tenant_id && b->key.version == ref.version))
	{
		b->next++;
		return true;
	}
	if (count_table_recheck)
	{
		count_table_recheck = false;
		budgets_reserve_in(count_table());
	}
	b = budget_entry(ref.tenant_id, ref.version);
	*ref.budget = b;
	if (b->next >= b->end && !reserve_block(b, tenant, tenant_len))
		return false;
	b->next++;
	return true;
}

/* ---------------------------------------------------------------------------
 * Key management
 */

static void
raise_key_spent(const char *tenant, uint32 version, const char *why)
{
	ereport(ERROR,
			(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
			 errmsg("data key version %u of tenant \"%s\" has reached envelope.max_encryptions_per_key",
					version, tenant),
			 errdetail("Nothing more is encrypted under it, and it cannot be rotated here: %s.", why),
			 errhint("An envelope_admin can run envelope.rotate_tenant_key().  The next encryption in a read-write transaction on the primary rotates it too."),
			 errhidestmt(true)));
}

void
encryption_count_rotate_spent(const char *tenant, size_t tenant_len, uint32 spent)
{
	char	   *name = pnstrdup(tenant, tenant_len);
	TenantRecord rec;
	int32		version;

	if (IsInParallelMode())
		raise_key_spent(name, spent, "a parallel query cannot write the key store");
	if (XactReadOnly)
		raise_key_spent(name, spent, "the transaction is read-only");

	/* Concurrent encryptions that find the key spent wait here for the first one. */
	rec = envelope_lock_tenant(name);
	if (rec.state != TENANT_ACTIVE || (uint32) rec.active_version != spent)
		return;					/* rotated (or disabled) meanwhile: look the key up again */
	version = DatumGetInt32(DirectFunctionCall1(envelope_rotate_tenant_key,
												CStringGetTextDatum(name)));
	ereport(NOTICE,
			(errmsg("data key of tenant \"%s\" rotated to version %d", name, version),
			 errdetail("Version %u reached envelope.max_encryptions_per_key (%d encryptions).",
					   spent, envelope_max_encryptions_per_key),
			 errhidestmt(true)));
}

EnvelopeKeyRef
encryption_counted_key(const char *tenant, size_t tenant_len)
{
	EnvelopeKeyRef ref = keycache_key_for_encrypt(tenant, tenant_len);

#ifdef ENVELOPE_BENCH_TOGGLE
	if (!bench_count_encryptions)
		return ref;
#endif
	if (likely(count_encryption(tenant, tenant_len, ref)))
		return ref;
	encryption_count_rotate_spent(tenant, tenant_len, ref.version);
	ref = keycache_key_for_encrypt(tenant, tenant_len);
	if (!count_encryption(tenant, tenant_len, ref))
		raise_key_spent(pnstrdup(tenant, tenant_len), ref.version,
						"its newest version is spent too");
	return ref;
}

void
encryption_count_add_key(int32 tenant_id, uint32 version)
{
	Oid			relid = count_table();
	Oid			saved_userid;
	int			saved_sec_context;
	Oid			argtypes[2] = {INT4OID, INT4OID};
	Datum		values[2];
	HeapTuple	tuple;
	Oid			owner;

	if (!OidIsValid(relid))
		return;
	tuple = SearchSysCache1(RELOID, ObjectIdGetDatum(relid));
	if (!HeapTupleIsValid(tuple))
		elog(ERROR, "cache lookup failed for relation %u", relid);
	owner = ((Form_pg_class) GETSTRUCT(tuple))->relowner;
	ReleaseSysCache(tuple);

	values[0] = Int32GetDatum(tenant_id);
	values[1] = Int32GetDatum((int32) version);
	/* As the table's owner: the caller has no privilege on it. */
	GetUserIdAndSecContext(&saved_userid, &saved_sec_context);
	SetUserIdAndSecContext(owner, saved_sec_context | SECURITY_LOCAL_USERID_CHANGE |
						   SECURITY_RESTRICTED_OPERATION);
	PG_TRY();
	{
		if (SPI_connect() != SPI_OK_CONNECT)
			elog(ERROR, "SPI_connect failed");
		if (SPI_execute_with_args("INSERT INTO envelope." COUNT_TABLE_NAME " (tenant_id, version)"
								  " VALUES ($1, $2) ON CONFLICT DO NOTHING",
								  2, argtypes, values, NULL, false, 0) != SPI_OK_INSERT)
			elog(ERROR, "pg_envelope: could not add the count row of a data key");
		SPI_finish();
	}
	PG_FINALLY();
	{
		SetUserIdAndSecContext(saved_userid, saved_sec_context);
	}
	PG_END_TRY();
}
