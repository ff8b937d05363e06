/*
 * kms_rate.h — the cluster-wide limit on requests to the KMS (kms_rate.c): one token
 * bucket in shared memory, shared by every backend and the background worker, filled
 * at envelope.kms_max_requests_per_second, and lowered further while the KMS answers
 * with throttling errors (the AWS SDKs' "adaptive" retry mode, CUBIC-shaped).
 *
 * Providers call kms_rate_await_slot (through KmsConfig.await_request_slot) before
 * every request they send, retries included, and kms_rate_note_answer (through
 * KmsConfig.note_answer) after every answer.  Neither takes an LWLock: the bucket is
 * under a spinlock held for a few arithmetic steps, and the wait is a sleep outside
 * it that a cancel, statement_timeout or shutdown interrupts.
 */
#ifndef PG_ENVELOPE_KMS_RATE_H
#define PG_ENVELOPE_KMS_RATE_H

#include "compat.h"

#include "kms.h"

/* Reserve, then create or attach, the shared bucket (shmem request/startup hooks). */
extern void kms_rate_shmem_request(void);
extern void kms_rate_shmem_startup(void);

/*
 * Wait until the bucket has a token and take it.  Returns false, with no token taken,
 * when cfg->interrupted asked to stop during the wait.  Returns at once when there is
 * no limit (envelope.kms_max_requests_per_second = 0 and no throttling seen).
 */
extern bool kms_rate_await_slot(const KmsConfig *cfg);

/*
 * The KMS answered a request (any answer with an HTTP status or a KMIP response):
 * `throttled` says whether it was a throttling error.  Feeds the measured send rate
 * and the adaptive rate.
 */
extern void kms_rate_note_answer(bool throttled);

/* What envelope.check() shows of the limiter. */
typedef struct KmsRateStatus
{
	bool		shared;			/* one bucket for the cluster (false: this backend's) */
	double		configured_rate;	/* envelope.kms_max_requests_per_second, 0: none */
	double		effective_rate; /* the bucket's fill rate now, 0: unlimited */
	bool		adaptive;		/* lowered after throttling answers */
	double		measured_rate;	/* requests answered per second, smoothed */
	int64		requests;		/* tokens taken */
	int64		waits;			/* of which had to wait */
	double		wait_ms_total;
	double		wait_ms_max;
	int64		throttled;		/* throttling answers */
	double		seconds_since_throttle; /* -1: none yet */
} KmsRateStatus;

extern void kms_rate_get_status(KmsRateStatus *out);

#endif							/* PG_ENVELOPE_KMS_RATE_H */
