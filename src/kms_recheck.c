/*
 * kms_recheck.c — bounded revocation from the KMS side: a table in shared memory of
 * the master keys that cached DEKs were unwrapped under, and the background worker's
 * periodic check that each still works (see kms_recheck.h).
 *
 * What the check is: a Decrypt of one wrapped DEK that was unwrapped under the key
 * before (the latest one a backend loaded), with its encryption context.  Not
 * DescribeKey: a key can be Enabled while its key policy or a grant no longer lets
 * this server's identity use it, and DescribeKey is a separate permission that a
 * least-privilege role often lacks.  A successful Decrypt proves exactly what the row
 * path needs — this identity may still unwrap data keys under this key — for the price
 * of the call the row path would make itself.  The plaintext that comes back is wiped
 * at once.  The same check works for every provider (local: the key file still holds
 * the same key; kmip: the server still hands it out), so the interface needs no new
 * operation.
 *
 * Locking: one LWLock of tranche "pg_envelope master keys" guards the table.  Backends
 * take it exclusively for a few copies when they note a key; the worker takes it to
 * copy a due key out, releases it, asks the KMS, and takes it again to record the
 * answer.  It is never held across the KMS call, nor across an ereport.
 *
 * A key is forgotten when no DEK has been unwrapped or generated under it for
 * idle_after (longer than any cached copy can live), so a key nobody uses is not
 * asked about forever, and its sample (a wrapped DEK, useless without the KMS) leaves
 * shared memory.
 */
#include "pg_envelope.h"

#include "kms_recheck.h"

#include "lib/stringinfo.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "utils/timestamp.h"

/* UTF-8 of a tenant name: up to 4 bytes per character of at most 255 bytes, and a NUL. */
#define RECHECK_TENANT_MAX (4 * ENVELOPE_TENANT_MAX + 1)
#define RECHECK_PROVIDER_MAX 32

typedef struct MasterKeySlot
{
	bool		in_use;
	char		provider[RECHECK_PROVIDER_MAX];
	char		key_id[KMS_KEY_ID_MAX];
	TimestampTz last_noted;		/* last DEK unwrapped or generated under it */
	TimestampTz next_check;		/* worker's: when to ask the KMS again */
	bool		refused;		/* the last check was a refusal */
	TimestampTz refused_at;		/* when it was recorded */
	/* the sample: a wrapped DEK the KMS unwrapped under this key, and its context */
	char		tenant_utf8[RECHECK_TENANT_MAX];
	uint32		version;
	uint32		sample_len;
	uint8		sample[KMS_WRAPPED_MAX];
} MasterKeySlot;

typedef struct MasterKeyTable
{
	LWLock	   *lock;
	MasterKeySlot slots[KMS_RECHECK_MAX_KEYS];
	/* for envelope.check(), under the lock */
	int64		checks;
	int64		refusals;
	int64		unanswered;
	TimestampTz last_check;		/* 0: none yet */
	KmsStatus	last_status;
	char		last_key[KMS_KEY_ID_MAX];
	char		last_error[64];
	int64		untracked;
	TimestampTz last_untracked; /* 0: never */
} MasterKeyTable;

static MasterKeyTable *table = NULL;

void
kms_recheck_shmem_request(void)
{
	RequestAddinShmemSpace(MAXALIGN(sizeof(MasterKeyTable)));
	RequestNamedLWLockTranche("pg_envelope master keys", 1);
}

void
kms_recheck_shmem_startup(void)
{
	bool		found;

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	table = ShmemInitStruct("pg_envelope master keys", sizeof(MasterKeyTable), &found);
	if (!found)
	{
		memset(table, 0, sizeof(*table));
		table->lock = &(GetNamedLWLockTranche("pg_envelope master keys"))->lock;
	}
	LWLockRelease(AddinShmemInitLock);
}

static int
find_slot(const char *provider, const char *key_id)
{
	for (int i = 0; i < KMS_RECHECK_MAX_KEYS; i++)
	{
		MasterKeySlot *s = &table->slots[i];

		if (s->in_use && strcmp(s->provider, provider) == 0 && strcmp(s->key_id, key_id) == 0)
			return i;
	}
	return KMS_RECHECK_NO_SLOT;
}

static int
take_free_slot(void)
{
	for (int i = 0; i < KMS_RECHECK_MAX_KEYS; i++)
		if (!table->slots[i].in_use)
			return i;
	return KMS_RECHECK_NO_SLOT;
}

int
kms_recheck_track(const char *provider, const char *key_id, const char *tenant,
				  uint32 version, const uint8 *wrapped, size_t wrapped_len)
{
	const char *tenant_utf8;
	TimestampTz now = GetCurrentTimestamp();
	MasterKeySlot *s;
	int			slot;
	static bool warned_full = false;

	if (table == NULL || provider == NULL || key_id == NULL ||
		strlen(provider) >= RECHECK_PROVIDER_MAX || strlen(key_id) >= KMS_KEY_ID_MAX ||
		wrapped_len == 0 || wrapped_len > KMS_WRAPPED_MAX)
		return KMS_RECHECK_NO_SLOT;
	/* The KMS binds the context as JSON, so UTF-8; converted here, in a database. */
	tenant_utf8 = pg_server_to_any(tenant, strlen(tenant), PG_UTF8);
	if (strlen(tenant_utf8) >= RECHECK_TENANT_MAX)
		return KMS_RECHECK_NO_SLOT;

	LWLockAcquire(table->lock, LW_EXCLUSIVE);
	slot = find_slot(provider, key_id);
	if (slot == KMS_RECHECK_NO_SLOT && (slot = take_free_slot()) != KMS_RECHECK_NO_SLOT)
	{
		s = &table->slots[slot];
		memset(s, 0, offsetof(MasterKeySlot, sample));
		s->in_use = true;
		strlcpy(s->provider, provider, sizeof(s->provider));
		strlcpy(s->key_id, key_id, sizeof(s->key_id));
		s->next_check = 0;		/* the worker schedules it */
	}
	if (slot == KMS_RECHECK_NO_SLOT)
	{
		table->untracked++;
		table->last_untracked = now;
	}
	else
	{
		s = &table->slots[slot];
		s->last_noted = now;
		strlcpy(s->tenant_utf8, tenant_utf8, sizeof(s->tenant_utf8));
		s->version = version;
		memcpy(s->sample, wrapped, wrapped_len);
		s->sample_len = (uint32) wrapped_len;
	}
	LWLockRelease(table->lock);

	if (tenant_utf8 != tenant)
		pfree((char *) tenant_utf8);
	if (slot == KMS_RECHECK_NO_SLOT && !warned_full)
	{
		warned_full = true;
		ereport(WARNING,
				(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
				 errmsg("pg_envelope tracks at most %d master keys for envelope.kms_recheck_interval",
						KMS_RECHECK_MAX_KEYS),
				 errdetail("Data keys under the others are evicted whenever the KMS refuses any master key, but a revocation of theirs is only noticed when their cached copies expire."),
				 errhidestmt(true)));
	}
	return slot;
}

/* What the worker copies out of a slot before asking the KMS, without the lock. */
typedef struct DueCheck
{
	int			slot;
	char		provider[RECHECK_PROVIDER_MAX];
	char		key_id[KMS_KEY_ID_MAX];
	char		tenant_utf8[RECHECK_TENANT_MAX];
	uint32		version;
	uint32		sample_len;
	uint8		sample[KMS_WRAPPED_MAX];
} DueCheck;

/*
 * Under the lock: forget idle keys, schedule new ones, and copy out the first one that
 * is due.  *next_due_ms is the wait until the earliest key not yet due.
 */
static bool
take_due(DueCheck *due, TimestampTz now, long interval_ms, long idle_after_ms,
		 long *next_due_ms)
{
	bool		found = false;

	*next_due_ms = -1;
	LWLockAcquire(table->lock, LW_EXCLUSIVE);
	for (int i = 0; i < KMS_RECHECK_MAX_KEYS; i++)
	{
		MasterKeySlot *s = &table->slots[i];
		long		wait_ms;

		if (!s->in_use)
			continue;
		if (now - s->last_noted > (TimestampTz) idle_after_ms * 1000)
		{
			explicit_bzero(s, sizeof(*s));
			continue;
		}
		if (s->next_check == 0)
			s->next_check = now + (TimestampTz) interval_ms * 1000;
		if (!found && s->next_check <= now)
		{
			due->slot = i;
			strlcpy(due->provider, s->provider, sizeof(due->provider));
			strlcpy(due->key_id, s->key_id, sizeof(due->key_id));
			strlcpy(due->tenant_utf8, s->tenant_utf8, sizeof(due->tenant_utf8));
			due->version = s->version;
			due->sample_len = s->sample_len;
			memcpy(due->sample, s->sample, s->sample_len);
			s->next_check = now + (TimestampTz) interval_ms * 1000;
			found = true;
		}
		wait_ms = (long) ((s->next_check - now) / 1000);
		if (*next_due_ms < 0 || wait_ms < *next_due_ms)
			*next_due_ms = Max(wait_ms, 0);
	}
	LWLockRelease(table->lock);
	return found;
}

/* The statuses that say the key may no longer be used, as opposed to "cannot ask now". */
static bool
is_refusal(KmsStatus status)
{
	return status == KMS_ERR_ACCESS_DENIED || status == KMS_ERR_NOT_FOUND ||
		status == KMS_ERR_DISABLED || status == KMS_ERR_INVALID_CIPHERTEXT;
}

/* Record the answer; returns whether the key was usable before (for the log). */
static bool
record_answer(const DueCheck *due, bool refused)
{
	MasterKeySlot *s = &table->slots[due->slot];
	bool		was_refused = false;

	LWLockAcquire(table->lock, LW_EXCLUSIVE);
	if (s->in_use && strcmp(s->key_id, due->key_id) == 0 &&
		strcmp(s->provider, due->provider) == 0)
	{
		was_refused = s->refused;
		s->refused = refused;
		if (refused)
			s->refused_at = GetCurrentTimestamp();
	}
	LWLockRelease(table->lock);
	return was_refused;
}

/* Remember the latest re-check and count it, for envelope.check(). */
static void
record_outcome(const DueCheck *due, KmsStatus status, const KmsError *err, bool refused)
{
	LWLockAcquire(table->lock, LW_EXCLUSIVE);
	if (status == KMS_OK || refused)
		table->checks++;
	else
		table->unanswered++;
	if (refused)
		table->refusals++;
	table->last_check = GetCurrentTimestamp();
	table->last_status = status;
	strlcpy(table->last_key, due->key_id, sizeof(table->last_key));
	strlcpy(table->last_error,
			status == KMS_OK ? "" : err->error_type[0] ? err->error_type : kms_status_name(status),
			sizeof(table->last_error));
	LWLockRelease(table->lock);
}

static void
check_one(const DueCheck *due, KmsRefusedCallback on_refused, bool (*interrupted) (void))
{
	KmsError	err;
	KmsStatus	status;
	bool		was_refused;

	status = envelope_kms_check_decrypt(due->provider, due->key_id, due->tenant_utf8,
										due->version, due->sample, due->sample_len,
										interrupted, &err);
	if (status == KMS_ERR_CANCELED)
		return;
	record_outcome(due, status, &err, is_refusal(status));
	if (is_refusal(status))
	{
		was_refused = record_answer(due, true);
		if (!was_refused)
			ereport(LOG,
					(errmsg("KMS refused master key \"%s\": %s; its cached data keys are evicted",
							due->key_id,
							err.error_type[0] ? err.error_type : kms_status_name(status)),
					 err.message[0] ? errdetail("%s provider: %s.", due->provider, err.message) : 0));
		on_refused(due->slot, !was_refused);
		return;
	}
	if (status != KMS_OK)
	{
		/* Unreachable, throttled, no credentials: no answer about the key. */
		ereport(LOG,
				(errmsg("could not re-check master key \"%s\" with the KMS: %s",
						due->key_id,
						err.error_type[0] ? err.error_type : kms_status_name(status)),
				 err.message[0] ? errdetail("%s provider: %s.", due->provider, err.message) : 0));
		return;
	}
	if (record_answer(due, false))
		ereport(LOG,
				(errmsg("KMS accepts master key \"%s\" again", due->key_id)));
}

long
kms_recheck_run(KmsRefusedCallback on_refused, bool (*interrupted) (void),
				long idle_after_ms)
{
	long		interval_ms = (long) envelope_kms_recheck_interval * 1000L;
	long		next_due_ms = -1;
	DueCheck   *due;

	if (table == NULL || interval_ms <= 0)
		return -1;
	due = palloc(sizeof(DueCheck));
	while (!interrupted() &&
		   take_due(due, GetCurrentTimestamp(), interval_ms, idle_after_ms, &next_due_ms))
	{
		check_one(due, on_refused, interrupted);
		explicit_bzero(due, sizeof(*due));
	}
	pfree(due);
	return next_due_ms;
}

/* How many refused keys check() names before it says "and N more". */
#define STATUS_REFUSED_LISTED 5

static double
seconds_since(TimestampTz then, TimestampTz now)
{
	return then == 0 ? -1 : (double) (now - then) / 1e6;
}

void
kms_recheck_get_status(KmsRecheckStatus *out)
{
	TimestampTz now = GetCurrentTimestamp();
	/* Copied under the lock, formatted after it: nothing that allocates is held. */
	char		refused_ids[STATUS_REFUSED_LISTED][KMS_KEY_ID_MAX];
	char		last_key[KMS_KEY_ID_MAX];
	char		last_error[sizeof(table->last_error)];
	StringInfoData refused;

	memset(out, 0, sizeof(*out));
	out->seconds_since_check = -1;
	out->seconds_since_untracked = -1;
	out->last_status = KMS_OK;
	out->refused_keys = out->last_key = out->last_error = "";
	if (table == NULL)
		return;
	out->available = true;
	LWLockAcquire(table->lock, LW_SHARED);
	for (int i = 0; i < KMS_RECHECK_MAX_KEYS; i++)
	{
		MasterKeySlot *s = &table->slots[i];

		if (!s->in_use)
			continue;
		out->tracked++;
		/* a DEK unwrapped under it since the refusal says the key works again */
		if (s->refused && s->last_noted <= s->refused_at)
		{
			if (out->refused < STATUS_REFUSED_LISTED)
				memcpy(refused_ids[out->refused], s->key_id, KMS_KEY_ID_MAX);
			out->refused++;
		}
	}
	out->checks = table->checks;
	out->refusals = table->refusals;
	out->unanswered = table->unanswered;
	out->seconds_since_check = seconds_since(table->last_check, now);
	out->last_status = table->last_status;
	memcpy(last_key, table->last_key, sizeof(last_key));
	memcpy(last_error, table->last_error, sizeof(last_error));
	out->untracked = table->untracked;
	out->seconds_since_untracked = seconds_since(table->last_untracked, now);
	LWLockRelease(table->lock);

	initStringInfo(&refused);
	for (int i = 0; i < Min(out->refused, STATUS_REFUSED_LISTED); i++)
		appendStringInfo(&refused, "%s\"%.*s\"", i > 0 ? ", " : "",
						 KMS_KEY_ID_MAX, refused_ids[i]);
	if (out->refused > STATUS_REFUSED_LISTED)
		appendStringInfo(&refused, " and %d more", out->refused - STATUS_REFUSED_LISTED);
	out->refused_keys = refused.data;
	out->last_key = pnstrdup(last_key, sizeof(last_key));
	out->last_error = pnstrdup(last_error, sizeof(last_error));
}
