/*
 * kms_rate.c — the cluster-wide limit on requests to the KMS (see kms_rate.h).
 *
 * Why cluster-wide.  A KMS quota counts the requests of an account (AWS: per account
 * and Region, shared by every client), so a per-backend limit would let 32 backends
 * send 32 times the limit after a restart, when every first read of every key asks
 * the KMS at once.  One bucket in shared memory paces them all, the background worker
 * (re-checks, prewarm) included.
 *
 * The bucket.  It holds at most ONE token and refills at the effective rate R, so two
 * requests are never sent less than 1/R apart and no one-second window holds more
 * than R of them.  The AWS SDKs let a bucket hold a second's worth (R tokens), which
 * allows 2R in the second after an idle period; a quota counted per second would
 * throttle exactly that burst, so there is none here: after a restart the first
 * requests go at R from the start.  A taker that finds no token computes when one
 * will be there, sleeps (at most 100 ms, so a rate raised meanwhile is noticed) and
 * tries again; the sleep polls cfg->interrupted every 10 ms (kms_sleep_interruptible),
 * so pg_cancel_backend, statement_timeout and shutdown end a wait.  Nobody holds a
 * place in a queue: a canceled waiter has taken nothing.
 *
 * The adaptive rate (the AWS SDKs' "adaptive" retry mode: botocore retries/adaptive.py,
 * bucket.py, cubic.py; aws-sdk-cpp AdaptiveRetryStrategy).  Every answer of the KMS is
 * counted into a measured send rate (answers per half-second time bucket, smoothed
 * 0.8 new / 0.2 old).  A throttling answer (AWS ThrottlingException, HTTP 429; KMIP has
 * no such answer, see doc/aws.md) engages the adaptive rate, CUBIC-shaped as in TCP:
 *
 *     on throttle:  W = the rate in use (measured, at most the current limit)
 *                   rate = 0.7 * W                     multiplicative decrease
 *                   K = cbrt(W * (1 - 0.7) / 0.4)
 *     on success:   rate = 0.4 * (t - K)^3 + W          t = seconds since the throttle
 *
 * so the rate drops by 30 %, climbs back to W in K seconds (concave, slowing as it
 * nears the rate that was throttled), and probes beyond it (convex).  As in the SDKs,
 * the rate never exceeds twice the measured rate (no credit for what was not sent) and
 * never goes below 0.5 requests per second.  One change to the SDKs: they keep the
 * adaptive rate for the life of the client; a server lives for months, so here it is
 * dropped once the curve has climbed back to envelope.kms_max_requests_per_second
 * (with no configured limit: to twice W, well past the rate the KMS pushed back at).
 * The effective rate is the lower of the configured and the adaptive one.
 *
 * Locking: one spinlock over the bucket, the adaptive state and the counters, held
 * for a few arithmetic steps, never across a sleep, a KMS call or an ereport.  The
 * configured rate is each process's own envelope.kms_max_requests_per_second
 * (PGC_SIGHUP: every process has the same value once it has read the reloaded file).
 * Without shared_preload_libraries each backend has a bucket of its own.
 */
#include "pg_envelope.h"

#include <math.h>
#include <time.h>

#include "kms_rate.h"

#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "storage/spin.h"

/* The AWS SDKs' constants for the adaptive rate. */
#define ADAPTIVE_BETA 0.7		/* multiplicative decrease on a throttle */
#define ADAPTIVE_SCALE 0.4		/* CUBIC's C: how fast the rate grows back */
#define ADAPTIVE_MIN_RATE 0.5	/* requests per second, the floor */
#define ADAPTIVE_MEASURED_CAP 2.0	/* never above this times the measured rate */
#define MEASURE_BUCKET_US 500000	/* time bucket of the measured rate */
#define MEASURE_SMOOTH 0.8		/* weight of the newest bucket */

/* A waiter looks at the bucket again at least this often. */
#define RATE_MAX_SLEEP_MS 100

typedef struct KmsRateBucket
{
	slock_t		mutex;
	/* the token bucket: capacity one token */
	double		tokens;
	int64		last_refill_us; /* 0: the bucket starts full on its next use */
	/* the adaptive rate */
	bool		adaptive;
	double		adaptive_rate;
	double		w_max;			/* rate in use at the last throttle */
	double		k;				/* seconds for the curve to climb back to w_max */
	int64		last_throttle_us;	/* 0: never */
	/* the measured rate */
	double		measured_rate;
	int64		measure_bucket; /* index of the current half-second, 0: none yet */
	int64		answers_in_bucket;
	/* for envelope.check() */
	int64		requests;
	int64		waits;
	double		wait_ms_total;
	double		wait_ms_max;
	int64		throttled;
} KmsRateBucket;

static KmsRateBucket *shared_bucket = NULL;
static KmsRateBucket local_bucket;	/* without preload: this backend's own */

void
kms_rate_shmem_request(void)
{
	RequestAddinShmemSpace(MAXALIGN(sizeof(KmsRateBucket)));
}

void
kms_rate_shmem_startup(void)
{
	bool		found;

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	shared_bucket = ShmemInitStruct("pg_envelope KMS rate limit", sizeof(KmsRateBucket),
									&found);
	if (!found)
	{
		memset(shared_bucket, 0, sizeof(*shared_bucket));
		SpinLockInit(&shared_bucket->mutex);
	}
	LWLockRelease(AddinShmemInitLock);
}

static KmsRateBucket *
bucket_lock(void)
{
	if (shared_bucket == NULL)
		return &local_bucket;
	SpinLockAcquire(&shared_bucket->mutex);
	return shared_bucket;
}

static void
bucket_unlock(KmsRateBucket *b)
{
	if (b == shared_bucket)
		SpinLockRelease(&shared_bucket->mutex);
}

/* One clock for every process: CLOCK_MONOTONIC is system-wide. */
static int64
monotonic_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64) ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* Requests per second the bucket fills at now; 0 means no limit. */
static double
effective_rate(const KmsRateBucket *b, double configured)
{
	if (!b->adaptive)
		return configured;
	if (configured > 0 && configured < b->adaptive_rate)
		return configured;
	return b->adaptive_rate;
}

/*
 * Under the lock: take a token if there is one (returns 0), or say how many
 * microseconds until there will be.
 */
static int64
take_token(KmsRateBucket *b, int64 now, double configured)
{
	double		rate = effective_rate(b, configured);

	if (rate <= 0)
	{
		b->last_refill_us = 0;	/* a limit set later starts with a full bucket */
		return 0;
	}
	if (b->last_refill_us == 0)
		b->tokens = 1.0;
	else if (now > b->last_refill_us)
		b->tokens = Min(1.0, b->tokens + (double) (now - b->last_refill_us) * rate / 1e6);
	b->last_refill_us = Max(b->last_refill_us, now);
	if (b->tokens >= 1.0)
	{
		b->tokens -= 1.0;
		return 0;
	}
	return (int64) ceil((1.0 - b->tokens) * 1e6 / rate);
}

bool
kms_rate_await_slot(const KmsConfig *cfg)
{
	double		configured = envelope_kms_max_requests_per_second;
	int64		started = 0;

	for (;;)
	{
		int64		now = monotonic_us();
		KmsRateBucket *b = bucket_lock();
		int64		wait_us = take_token(b, now, configured);
		int			sleep_ms;

		if (wait_us == 0)
		{
			b->requests++;
			if (started != 0)
			{
				double		waited_ms = (double) (now - started) / 1000.0;

				b->waits++;
				b->wait_ms_total += waited_ms;
				b->wait_ms_max = Max(b->wait_ms_max, waited_ms);
			}
			bucket_unlock(b);
			return true;
		}
		bucket_unlock(b);

		if (started == 0)
			started = now;
		sleep_ms = (int) Min((wait_us + 999) / 1000, RATE_MAX_SLEEP_MS);
		if (!kms_sleep_interruptible(cfg, sleep_ms))
			return false;
	}
}

/* Under the lock: count an answer into the measured rate (the SDKs' RateClocker). */
static void
measure_answer(KmsRateBucket *b, int64 now)
{
	int64		bucket = now / MEASURE_BUCKET_US;

	b->answers_in_bucket++;
	if (b->measure_bucket == 0)
		b->measure_bucket = bucket;
	else if (bucket > b->measure_bucket)
	{
		double		seconds = (double) (bucket - b->measure_bucket) * MEASURE_BUCKET_US / 1e6;
		double		current = (double) b->answers_in_bucket / seconds;

		b->measured_rate = current * MEASURE_SMOOTH + b->measured_rate * (1 - MEASURE_SMOOTH);
		b->answers_in_bucket = 0;
		b->measure_bucket = bucket;
	}
}

/* The CUBIC curve: the rate `now`, after the last throttle. */
static double
cubic_rate(const KmsRateBucket *b, int64 now)
{
	double		t = (double) (now - b->last_throttle_us) / 1e6 - b->k;

	return ADAPTIVE_SCALE * t * t * t + b->w_max;
}

void
kms_rate_note_answer(bool throttled)
{
	double		configured = envelope_kms_max_requests_per_second;
	int64		now = monotonic_us();
	KmsRateBucket *b = bucket_lock();
	double		new_rate;

	measure_answer(b, now);
	if (throttled)
	{
		double		in_use = b->measured_rate;
		double		limit = effective_rate(b, configured);

		if (limit > 0)
			in_use = Min(in_use, limit);
		/* before the first half second is measured the rate reads 0: use the floor */
		in_use = Max(in_use, ADAPTIVE_MIN_RATE);
		b->throttled++;
		b->w_max = in_use;
		b->k = cbrt(in_use * (1 - ADAPTIVE_BETA) / ADAPTIVE_SCALE);
		b->last_throttle_us = now;
		b->adaptive = true;
		new_rate = in_use * ADAPTIVE_BETA;
	}
	else if (b->adaptive)
	{
		double		release_at = configured > 0 ? configured : 2 * b->w_max;

		new_rate = cubic_rate(b, now);
		if (new_rate >= release_at)
			b->adaptive = false;
	}
	else
		new_rate = 0;

	if (b->adaptive)
		b->adaptive_rate = Max(ADAPTIVE_MIN_RATE,
							   Min(new_rate, ADAPTIVE_MEASURED_CAP * b->measured_rate));
	bucket_unlock(b);
}

void
kms_rate_get_status(KmsRateStatus *out)
{
	double		configured = envelope_kms_max_requests_per_second;
	int64		now = monotonic_us();
	KmsRateBucket *b = bucket_lock();

	out->shared = (b == shared_bucket);
	out->configured_rate = configured;
	out->effective_rate = effective_rate(b, configured);
	out->adaptive = b->adaptive;
	out->measured_rate = b->measured_rate;
	out->requests = b->requests;
	out->waits = b->waits;
	out->wait_ms_total = b->wait_ms_total;
	out->wait_ms_max = b->wait_ms_max;
	out->throttled = b->throttled;
	out->seconds_since_throttle = b->last_throttle_us == 0 ? -1 :
		(double) (now - b->last_throttle_us) / 1e6;
	bucket_unlock(b);
}
