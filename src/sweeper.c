/*
 * sweeper.c — the key cache sweeper, a background worker.
 *
 * Lookups zero the expired keys they meet, but a key that nobody asks for again would
 * stay in shared memory until the cache fills.  This worker wakes every tenth of
 * envelope.cache_ttl, but never more often than once a second nor less often than once
 * a minute, and zeroes what has expired.  It needs no database connection and does no
 * I/O while it holds the cache's lock.
 *
 * It also re-checks, once per envelope.kms_recheck_interval, each master key that
 * cached DEKs were unwrapped under (kms_recheck.c), and evicts the DEKs of a key the
 * KMS refuses.  That is a KMS call, made with no lock held; a shutdown request
 * interrupts it, so the worker never holds up a shutdown for longer than a poll.
 *
 * At its start it launches the cache prewarm (prewarm.c), once per start of shared
 * memory.
 */
#include "pg_envelope.h"

#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "utils/guc.h"

#include "kms_recheck.h"
#include "prewarm.h"

PGDLLEXPORT void envelope_sweeper_main(Datum arg);

/* Polled by a provider during a re-check's I/O: stop at once on shutdown. */
static bool
shutdown_requested(void)
{
	return ShutdownRequestPending;
}

/*
 * Nothing has been loaded under a key for longer than a cached copy lives: forget it.
 * Twice the TTL plus a minute leaves room for a copy loaded just before the last note.
 */
static long
recheck_idle_after_ms(void)
{
	return 2L * envelope_cache_ttl * 1000L + 60000L;
}

void
envelope_register_sweeper(void)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS;
	worker.bgw_start_time = BgWorkerStart_PostmasterStart;
	worker.bgw_restart_time = 10;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "pg_envelope");
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "envelope_sweeper_main");
	snprintf(worker.bgw_name, BGW_MAXLEN, "pg_envelope key cache sweeper");
	snprintf(worker.bgw_type, BGW_MAXLEN, "pg_envelope key cache sweeper");
	RegisterBackgroundWorker(&worker);
}

void
envelope_sweeper_main(Datum arg)
{
	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, SignalHandlerForShutdownRequest);
	BackgroundWorkerUnblockSignals();
	/* envelope.cache_prewarm: its own workers, since this one has no database */
	prewarm_launch_once();

	for (;;)
	{
		long		interval_ms = Max(1000L, Min(60000L, envelope_cache_ttl * 100L));
		long		recheck_due_ms;

		recheck_due_ms = kms_recheck_run(l2_evict_master_key, shutdown_requested,
										 recheck_idle_after_ms());
		if (ShutdownRequestPending)
			break;
		/* A key not yet scheduled is scheduled on the next pass: come back soon. */
		if (recheck_due_ms >= 0)
			interval_ms = Min(interval_ms, Max(recheck_due_ms, 50L));
		else if (envelope_kms_recheck_interval > 0)
			interval_ms = Min(interval_ms, 1000L);

		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 interval_ms, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		if (ShutdownRequestPending)
			break;
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}
		(void) keycache_sweep();
	}
	proc_exit(0);
}
