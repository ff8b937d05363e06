/*
 * prewarm.h — envelope.cache_prewarm (prewarm.c): after a start, background workers
 * unwrap the DEKs that clients will ask for first into the shared key cache, at a
 * bounded rate, and count their progress for envelope.cache_stats.
 */
#ifndef PG_ENVELOPE_PREWARM_H
#define PG_ENVELOPE_PREWARM_H

#include "compat.h"

/* Values of envelope.cache_prewarm. */
typedef enum PrewarmMode
{
	PREWARM_OFF = 0,
	PREWARM_ACTIVE,				/* each active tenant's active DEK version */
	PREWARM_ALL					/* every version that still decrypts */
} PrewarmMode;

/* Where the prewarm of this start is. */
typedef enum PrewarmState
{
	PREWARM_STATE_OFF = 0,		/* not asked for at this start */
	PREWARM_STATE_STARTING,		/* worker launched, not yet reading the key stores */
	PREWARM_STATE_RUNNING,
	PREWARM_STATE_DONE,
	PREWARM_STATE_FAILED		/* a worker could not be started or stopped early */
} PrewarmState;

/* What envelope.cache_stats shows of it. */
typedef struct PrewarmProgress
{
	PrewarmState state;
	int64		total;			/* DEK versions listed so far (grows per database) */
	int64		loaded;			/* of them, in the shared cache thanks to the prewarm */
	int64		failed;			/* KMS errors, and keys no longer usable when loaded */
} PrewarmProgress;

/* Define envelope.cache_prewarm and envelope.cache_prewarm_rate (from _PG_init). */
extern void prewarm_define_settings(void);

/* Reserve, then create or attach, the progress counters (shmem request/startup). */
extern void prewarm_shmem_request(void);
extern void prewarm_shmem_startup(void);

/*
 * From the sweeper at its start: launch the prewarm once per start of shared memory
 * (a restarted sweeper does not launch it again; a crash-restart does), if
 * envelope.cache_prewarm asks for it.  No I/O.
 */
extern void prewarm_launch_once(void);

/* A consistent copy of the progress (state OFF without shared memory). */
extern void prewarm_get_progress(PrewarmProgress *out);

/* The state's name in envelope.cache_stats: off, starting, running, done, failed. */
extern const char *prewarm_state_name(PrewarmState state);

#endif							/* PG_ENVELOPE_PREWARM_H */
