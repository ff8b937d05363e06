/*
 * sweeper.c — the key cache sweeper, a background worker.
 *
 * Lookups zero the expired keys they meet, but a key that nobody asks for again would
 * stay in shared memory until the cache fills.  This worker wakes every tenth of
 * envelope.cache_ttl, but never more often than once a second nor less often than once
 * a minute, and zeroes what has expired.  It needs no database connection and does no
 * I/O while it holds the cache's lock.
 */
#include "pg_envelope.h"

#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "utils/guc.h"

PGDLLEXPORT void envelope_sweeper_main(Datum arg);

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

	for (;;)
	{
		long		interval_ms = Max(1000L, Min(60000L, envelope_cache_ttl * 100L));

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
