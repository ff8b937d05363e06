/*
 * prewarm.c — envelope.cache_prewarm: after a start, unwrap the DEKs that clients will
 * ask for first into the shared key cache, before they ask.
 *
 * Without it, the first read of every key after a restart goes to the KMS, all at
 * once, on the clients' time, against the KMS's request quota (shared per account and
 * region by every client of the KMS).  With `active`, each active tenant's active DEK
 * version (the one new values use) is loaded; with `all`, every version that still
 * decrypts (not retired, not destroyed, tenant active), active versions first.  At most
 * envelope.cache_size keys in all, so that the prewarm never evicts what it loaded.
 *
 * Who does it.  The sweeper (sweeper.c) has no database connection, and a process
 * can connect to one database only.  So at its start (once per start of shared
 * memory: a restarted sweeper does not do it twice, a crash-restart, whose shared
 * memory and cache are new, does it again) the sweeper launches a dynamic worker,
 * "pg_envelope cache prewarm", that connects to no database, lists the databases that
 * accept connections, and for each launches one more worker connected to it, one after
 * another.  That one reads the key store (SPI, in a transaction of its own; a
 * database without the extension is skipped) and loads each key the way a lookup that
 * misses would (keycache_prewarm): key store at the latest snapshot, single-flight
 * load, the entry doomed in flight by a purge or by the refusal of its master key,
 * and, after the load, the key store read once more, so that a key disabled, retired
 * or destroyed during the prewarm never stays cached.  No lock is held across SPI or
 * the KMS: the cache's own functions take theirs for a few copies.  Workers start when
 * the server is consistent, so a hot standby prewarms too.
 *
 * The rate.  Loads are made one at a time, and at most envelope.cache_prewarm_rate
 * (default 100) of them per second reach the KMS, on a schedule of one per 1/rate
 * (see prewarm_database); keys found already cached do not count.  AWS KMS allows 5,500 to 100,000 symmetric requests per second per account
 * and region, depending on the region, shared with every other application of the
 * account: 100 a second is under 2% of the smallest quota, leaves clients the rest,
 * and still loads the default envelope.cache_size (32,768 keys) in under six minutes.
 * The KMS calls go through the KMS glue like every other, so they also obey
 * envelope.kms_max_requests_per_second, the cluster-wide limit (kms_rate.c).
 *
 * Progress: envelope.cache_stats shows prewarm_state (off, starting, running, done,
 * failed) and prewarm_total (listed so far; it grows as each database is listed),
 * prewarm_loaded and prewarm_failed (KMS errors, and keys no longer usable once
 * loaded), which add up to the total when it is done.  The counters live in a small
 * shared struct under a spinlock.
 */
#include "pg_envelope.h"

#include "prewarm.h"

#include "access/heapam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/pg_database.h"
#include "commands/extension.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "storage/spin.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

PGDLLEXPORT void envelope_prewarm_main(Datum arg);

static int	prewarm_mode = PREWARM_OFF;
static int	prewarm_rate = 100;

static const struct config_enum_entry prewarm_mode_options[] = {
	{"off", PREWARM_OFF, false},
	{"active", PREWARM_ACTIVE, false},
	{"all", PREWARM_ALL, false},
	{NULL, 0, false}
};

typedef struct PrewarmShared
{
	slock_t		mutex;
	bool		launched;		/* the sweeper launched this start's prewarm */
	bool		database_finished;	/* the current database's worker got to its end */
	PrewarmProgress progress;
} PrewarmShared;

static PrewarmShared *prewarm_shared = NULL;

void
prewarm_define_settings(void)
{
	DefineCustomEnumVariable("envelope.cache_prewarm",
							 "Which data keys the background worker loads into the shared key cache after a start.",
							 "off: none; active: each active tenant's active key version; all: every key version that still decrypts.",
							 &prewarm_mode,
							 PREWARM_OFF, prewarm_mode_options,
							 PGC_SIGHUP, 0,
							 NULL, NULL, NULL);
	DefineCustomIntVariable("envelope.cache_prewarm_rate",
							"At most this many KMS requests per second for the cache prewarm.",
							"Keys already cached cost no request.  Keep it a small part of the KMS's request quota, which clients share.",
							&prewarm_rate,
							100, 1, 100000,
							PGC_SIGHUP, 0,
							NULL, NULL, NULL);
}

void
prewarm_shmem_request(void)
{
	RequestAddinShmemSpace(MAXALIGN(sizeof(PrewarmShared)));
}

void
prewarm_shmem_startup(void)
{
	bool		found;

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	prewarm_shared = ShmemInitStruct("pg_envelope cache prewarm", sizeof(PrewarmShared), &found);
	if (!found)
	{
		memset(prewarm_shared, 0, sizeof(*prewarm_shared));
		SpinLockInit(&prewarm_shared->mutex);
	}
	LWLockRelease(AddinShmemInitLock);
}

void
prewarm_get_progress(PrewarmProgress *out)
{
	if (prewarm_shared == NULL)
	{
		memset(out, 0, sizeof(*out));
		return;
	}
	SpinLockAcquire(&prewarm_shared->mutex);
	*out = prewarm_shared->progress;
	SpinLockRelease(&prewarm_shared->mutex);
}

const char *
prewarm_state_name(PrewarmState state)
{
	switch (state)
	{
		case PREWARM_STATE_OFF:
			return "off";
		case PREWARM_STATE_STARTING:
			return "starting";
		case PREWARM_STATE_RUNNING:
			return "running";
		case PREWARM_STATE_DONE:
			return "done";
		case PREWARM_STATE_FAILED:
			return "failed";
	}
	return "unknown";
}

static void
set_state(PrewarmState state)
{
	SpinLockAcquire(&prewarm_shared->mutex);
	prewarm_shared->progress.state = state;
	SpinLockRelease(&prewarm_shared->mutex);
}

/* A worker of ours: `dboid` InvalidOid is the one that walks the databases. */
static bool
launch_worker(Oid dboid, pid_t notify_pid, BackgroundWorkerHandle **handle)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_ConsistentState;
	worker.bgw_restart_time = BGW_NEVER_RESTART;
	worker.bgw_main_arg = ObjectIdGetDatum(dboid);
	worker.bgw_notify_pid = notify_pid;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "pg_envelope");
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "envelope_prewarm_main");
	if (OidIsValid(dboid))
		snprintf(worker.bgw_name, BGW_MAXLEN, "pg_envelope cache prewarm of database %u", dboid);
	else
		snprintf(worker.bgw_name, BGW_MAXLEN, "pg_envelope cache prewarm");
	snprintf(worker.bgw_type, BGW_MAXLEN, "pg_envelope cache prewarm");
	return RegisterDynamicBackgroundWorker(&worker, handle);
}

void
prewarm_launch_once(void)
{
	BackgroundWorkerHandle *handle;
	bool		launch;

	if (prewarm_shared == NULL)
		return;
	SpinLockAcquire(&prewarm_shared->mutex);
	launch = !prewarm_shared->launched && prewarm_mode != PREWARM_OFF;
	if (launch)
	{
		prewarm_shared->launched = true;
		prewarm_shared->progress.state = PREWARM_STATE_STARTING;
	}
	SpinLockRelease(&prewarm_shared->mutex);
	if (launch && !launch_worker(InvalidOid, 0, &handle))
	{
		set_state(PREWARM_STATE_FAILED);
		ereport(LOG,
				(errmsg("could not start the pg_envelope cache prewarm"),
				 errhint("Raise max_worker_processes.")));
	}
}

/* ---------------------------------------------------------------------------
 * The worker that walks the databases
 */

/* The databases a worker may connect to, in `cxt`. */
static List *
connectable_databases(MemoryContext cxt)
{
	List	   *dbs = NIL;
	Relation	rel;
	TableScanDesc scan;
	HeapTuple	tuple;

	StartTransactionCommand();
	(void) GetTransactionSnapshot();
	rel = table_open(DatabaseRelationId, AccessShareLock);
	scan = table_beginscan_catalog(rel, 0, NULL);
	while ((tuple = heap_getnext(scan, ForwardScanDirection)) != NULL)
	{
		Form_pg_database db = (Form_pg_database) GETSTRUCT(tuple);
		MemoryContext old;

		/* -2: a database whose DROP was interrupted (15.4 and later), not usable */
		if (!db->datallowconn || db->datistemplate || db->datconnlimit == -2)
			continue;
		old = MemoryContextSwitchTo(cxt);
		dbs = lappend_oid(dbs, db->oid);
		MemoryContextSwitchTo(old);
	}
	table_endscan(scan);
	table_close(rel, AccessShareLock);
	CommitTransactionCommand();
	return dbs;
}

/* One database's worker, waited for; false if it could not start or did not finish. */
static bool
prewarm_one_database(Oid dboid)
{
	BackgroundWorkerHandle *handle;
	bool		finished;

	SpinLockAcquire(&prewarm_shared->mutex);
	prewarm_shared->database_finished = false;
	SpinLockRelease(&prewarm_shared->mutex);
	if (!launch_worker(dboid, MyProcPid, &handle))
	{
		ereport(LOG,
				(errmsg("could not start the pg_envelope cache prewarm of database %u", dboid),
				 errhint("Raise max_worker_processes.")));
		return false;
	}
	if (WaitForBackgroundWorkerShutdown(handle) == BGWH_POSTMASTER_DIED)
		proc_exit(1);
	SpinLockAcquire(&prewarm_shared->mutex);
	finished = prewarm_shared->database_finished;
	SpinLockRelease(&prewarm_shared->mutex);
	return finished;
}

/* A prewarm stopped half-way (pg_terminate_backend, an error) says so in cache_stats. */
static void
prewarm_exit(int code, Datum arg)
{
	SpinLockAcquire(&prewarm_shared->mutex);
	if (prewarm_shared->progress.state == PREWARM_STATE_RUNNING)
		prewarm_shared->progress.state = PREWARM_STATE_FAILED;
	SpinLockRelease(&prewarm_shared->mutex);
}

static void
prewarm_all_databases(void)
{
	MemoryContext cxt = AllocSetContextCreate(TopMemoryContext, "pg_envelope prewarm",
											  ALLOCSET_DEFAULT_SIZES);
	ListCell   *lc;
	bool		all_finished = true;

	BackgroundWorkerInitializeConnection(NULL, NULL, 0);
	before_shmem_exit(prewarm_exit, (Datum) 0);
	set_state(PREWARM_STATE_RUNNING);
	foreach(lc, connectable_databases(cxt))
	{
		CHECK_FOR_INTERRUPTS();
		if (!prewarm_one_database(lfirst_oid(lc)))
			all_finished = false;
	}
	set_state(all_finished ? PREWARM_STATE_DONE : PREWARM_STATE_FAILED);
	if (!all_finished)
		ereport(LOG,
				(errmsg("the pg_envelope cache prewarm did not finish in every database"),
				 errdetail("Keys not loaded are unwrapped when they are first used, as without the prewarm.")));
}

/* ---------------------------------------------------------------------------
 * The worker of one database
 */

typedef enum PrewarmOutcome
{
	PREWARM_LOADED,
	PREWARM_NOT_LOADED			/* a KMS error, or the key may no longer be used */
} PrewarmOutcome;

/* The keys to load in this database, in `cxt`; none without the extension. */
static List *
database_candidates(MemoryContext cxt, int64 limit)
{
	List	   *refs = NIL;

	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	if (limit > 0 && OidIsValid(get_extension_oid("pg_envelope", true)))
	{
		MemoryContext old = MemoryContextSwitchTo(cxt);

		refs = keystore_prewarm_candidates(prewarm_mode == PREWARM_ALL, limit);
		MemoryContextSwitchTo(old);
	}
	PopActiveSnapshot();
	CommitTransactionCommand();
	return refs;
}

/*
 * Load one key in a transaction of its own.  A failure (the KMS's error, a cancel) is
 * logged and the prewarm goes on; a shutdown request ends the worker.
 */
/* A refused master key fails every key under it: log the first few, then count. */
#define PREWARM_FAILURES_LOGGED 10
static int64 failures_logged = 0;

static PrewarmOutcome
prewarm_key(const KeyVersionRef *ref, MemoryContext cxt)
{
	volatile PrewarmOutcome outcome = PREWARM_NOT_LOADED;

	StartTransactionCommand();
	SetCurrentStatementStartTimestamp();
	PushActiveSnapshot(GetTransactionSnapshot());
	PG_TRY();
	{
		if (keycache_prewarm(ref->tenant, (uint32) ref->version))
			outcome = PREWARM_LOADED;
		PopActiveSnapshot();
		CommitTransactionCommand();
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		FlushErrorState();
		AbortCurrentTransaction();
		/* the KMS glue's message and detail: tenant, version, KMS error, no secret */
		if (++failures_logged <= PREWARM_FAILURES_LOGGED)
			ereport(LOG,
					(errmsg("cache prewarm could not load key version %d of tenant \"%s\": %s",
							ref->version, ref->tenant, edata->message),
					 edata->detail ? errdetail("%s", edata->detail) : 0));
		FreeErrorData(edata);
		outcome = PREWARM_NOT_LOADED;
	}
	PG_END_TRY();
	return outcome;
}

/* Sleep until `until`, waking for interrupts and configuration reloads. */
static void
wait_until(TimestampTz until)
{
	for (;;)
	{
		long		ms;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}
		ms = (long) ((until - GetCurrentTimestamp() + 999) / 1000);
		if (ms <= 0)
			return;
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 ms, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
}

static int64
kms_decrypt_calls(void)
{
	KmsCallStats stats;

	kms_glue_get_stats(&stats);
	return stats.calls[ENVELOPE_KMS_DECRYPT];
}

static void
prewarm_database(Oid dboid)
{
	MemoryContext cxt = AllocSetContextCreate(TopMemoryContext, "pg_envelope prewarm",
											  ALLOCSET_DEFAULT_SIZES);
	TimestampTz next_request;
	List	   *refs;
	ListCell   *lc;
	int64		limit;

	BackgroundWorkerInitializeConnectionByOid(dboid, InvalidOid, 0);
	SpinLockAcquire(&prewarm_shared->mutex);
	limit = (int64) envelope_cache_size - prewarm_shared->progress.total;
	SpinLockRelease(&prewarm_shared->mutex);

	refs = database_candidates(cxt, limit);
	SpinLockAcquire(&prewarm_shared->mutex);
	prewarm_shared->progress.total += list_length(refs);
	SpinLockRelease(&prewarm_shared->mutex);

	next_request = GetCurrentTimestamp();
	foreach(lc, refs)
	{
		int64		calls_before;
		TimestampTz started;
		PrewarmOutcome outcome;

		wait_until(next_request);
		started = GetCurrentTimestamp();
		calls_before = kms_decrypt_calls();
		outcome = prewarm_key(lfirst(lc), cxt);

		/*
		 * The pace: the requests keep to a schedule of one per 1/rate, so that a
		 * sleep that ran long (a busy machine wakes us late) is made up by the next
		 * gap and the rate holds on average; but a request that started more than one
		 * slot late (a slow KMS answer) moves the schedule, so that no burst ever
		 * catches up on lost time.  Keys found in the cache need no request and take
		 * no slot; other backends' calls, counted here too, can only slow the pace.
		 */
		if (kms_decrypt_calls() != calls_before)
		{
			TimestampTz interval = USECS_PER_SEC / prewarm_rate;

			next_request = Max(next_request, started - interval) + interval;
		}
		SpinLockAcquire(&prewarm_shared->mutex);
		if (outcome == PREWARM_LOADED)
			prewarm_shared->progress.loaded++;
		else
			prewarm_shared->progress.failed++;
		SpinLockRelease(&prewarm_shared->mutex);
	}
	if (failures_logged > PREWARM_FAILURES_LOGGED)
		ereport(LOG,
				(errmsg("cache prewarm could not load %lld more keys of database %u",
						(long long) (failures_logged - PREWARM_FAILURES_LOGGED), dboid),
				 errdetail("Only the first %d failures are logged one by one.",
						   PREWARM_FAILURES_LOGGED)));
	SpinLockAcquire(&prewarm_shared->mutex);
	prewarm_shared->database_finished = true;
	SpinLockRelease(&prewarm_shared->mutex);
	MemoryContextDelete(cxt);
}

void
envelope_prewarm_main(Datum arg)
{
	Oid			dboid = DatumGetObjectId(arg);

	/* die, not the default: a KMS call in flight sees the request and stops */
	pqsignal(SIGTERM, die);
	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	BackgroundWorkerUnblockSignals();
	if (prewarm_shared == NULL)
		proc_exit(0);
	if (OidIsValid(dboid))
		prewarm_database(dboid);
	else
		prewarm_all_databases();
	proc_exit(0);
}
