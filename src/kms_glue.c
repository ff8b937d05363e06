/*
 * kms_glue.c — calls into a KMS provider from a backend.
 *
 * The one place where a provider's KmsStatus becomes an ereport, where KMS calls are
 * counted and timed for envelope.cache_stats, and where a cancel or statement_timeout
 * reaches a provider blocked in I/O.  Every call's KmsConfig carries the cluster-wide
 * request rate limit (kms_rate.c), which providers consult before each request they
 * send and tell about each answer.  No LWLock is ever held here: callers release
 * theirs before asking the KMS anything.  The counters live in a small shared struct
 * of their own under a spinlock (in each backend without preload).
 */
#include "pg_envelope.h"

#include "miscadmin.h"
#include "portability/instr_time.h"
#include "mb/pg_wchar.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "storage/spin.h"
#include "utils/builtins.h"

#include "kms_rate.h"

typedef struct KmsGlueShared
{
	slock_t		mutex;
	KmsCallStats stats;			/* under mutex */
} KmsGlueShared;

static KmsGlueShared *glue_shared = NULL;
static KmsCallStats local_calls;	/* without preload */

void
kms_glue_shmem_request(void)
{
	RequestAddinShmemSpace(MAXALIGN(sizeof(KmsGlueShared)));
}

void
kms_glue_shmem_startup(void)
{
	bool		found;

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	glue_shared = ShmemInitStruct("pg_envelope KMS calls", sizeof(KmsGlueShared), &found);
	if (!found)
	{
		SpinLockInit(&glue_shared->mutex);
		memset(&glue_shared->stats, 0, sizeof(glue_shared->stats));
	}
	LWLockRelease(AddinShmemInitLock);
}

static void
record_kms_call(EnvelopeKmsOp op, bool ok, double elapsed_ms)
{
	KmsCallStats *s = &local_calls;

	if (glue_shared != NULL)
	{
		SpinLockAcquire(&glue_shared->mutex);
		s = &glue_shared->stats;
	}
	s->calls[op]++;
	if (!ok)
		s->errors++;
	s->total_ms += elapsed_ms;
	if (elapsed_ms > s->max_ms)
		s->max_ms = elapsed_ms;
	if (glue_shared != NULL)
		SpinLockRelease(&glue_shared->mutex);
}

void
kms_glue_get_stats(KmsCallStats *out)
{
	if (glue_shared == NULL)
	{
		*out = local_calls;
		return;
	}
	SpinLockAcquire(&glue_shared->mutex);
	*out = glue_shared->stats;
	SpinLockRelease(&glue_shared->mutex);
}

static const char *const op_names[ENVELOPE_KMS_NOPS] = {
	"GenerateDataKey", "Decrypt", "ReEncrypt"
};

/*
 * Polled by providers during I/O: a pending cancel or termination stops the call.
 * statement_timeout arrives as a query cancel (QueryCancelPending), so it is covered.
 */
static bool
backend_interrupted(void)
{
	return InterruptPending && (QueryCancelPending || ProcDiePending);
}

static const KmsProvider *
provider_or_error(const char *name)
{
	const KmsProvider *provider = kms_find_provider(name);

	if (provider == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("unknown KMS provider \"%s\"", name),
				 errhint("Available providers: %s.", kms_provider_names()),
				 errhidestmt(true)));
	return provider;
}

static void
fill_config(KmsConfig *cfg)
{
	memset(cfg, 0, sizeof(*cfg));
	cfg->local_master_key_file = envelope_local_master_key_file;
	cfg->data_directory = DataDir;
	cfg->aws_region = envelope_aws_region;
	cfg->aws_endpoint = envelope_aws_endpoint;
	cfg->aws_use_fips_endpoint = envelope_aws_use_fips_endpoint;
	cfg->aws_profile = envelope_aws_profile;
	cfg->kmip_host = envelope_kmip_host;
	cfg->kmip_port = envelope_kmip_port;
	cfg->kmip_ca_file = envelope_kmip_ca_file;
	cfg->kmip_cert_file = envelope_kmip_cert_file;
	cfg->kmip_key_file = envelope_kmip_key_file;
	cfg->timeout_ms = envelope_kms_timeout;
	cfg->retries = envelope_kms_retries;
	cfg->interrupted = backend_interrupted;
	cfg->await_request_slot = kms_rate_await_slot;
	cfg->note_answer = kms_rate_note_answer;
}

/*
 * The encryption context a KMS binds and logs is JSON, so always UTF-8: convert the
 * tenant from the database encoding (a no-op in UTF-8 databases and for ASCII).
 */
static KmsEncryptionContext
context_for(const char *tenant, uint32 version)
{
	KmsEncryptionContext ec;

	ec.tenant = pg_server_to_any(tenant, strlen(tenant), PG_UTF8);
	ec.version = version;
	return ec;
}

static int
status_errcode(KmsStatus status)
{
	switch (status)
	{
		case KMS_OK:
			break;
		case KMS_ERR_CONFIG:
		case KMS_ERR_WRONG_REGION:
			return ERRCODE_CONFIG_FILE_ERROR;
		case KMS_ERR_CREDENTIALS:
			return ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION;
		case KMS_ERR_ACCESS_DENIED:
			return ERRCODE_INSUFFICIENT_PRIVILEGE;
		case KMS_ERR_NOT_FOUND:
			return ERRCODE_UNDEFINED_OBJECT;
		case KMS_ERR_DISABLED:
			return ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE;
		case KMS_ERR_INVALID_CIPHERTEXT:
			return ERRCODE_DATA_CORRUPTED;
		case KMS_ERR_THROTTLED:
			return ERRCODE_CONFIGURATION_LIMIT_EXCEEDED;
			/*
			 * Class 58, errors outside PostgreSQL: class 08 would tell clients and
			 * drivers that their own database connection broke.
			 */
		case KMS_ERR_UNAVAILABLE:
		case KMS_ERR_TIMEOUT:
		case KMS_ERR_PROTOCOL:
			return ERRCODE_SYSTEM_ERROR;
		case KMS_ERR_CANCELED:
			return ERRCODE_QUERY_CANCELED;
		case KMS_ERR_INTERNAL:
			return ERRCODE_INTERNAL_ERROR;
	}
	return ERRCODE_INTERNAL_ERROR;
}

static const char *
status_hint(KmsStatus status)
{
	switch (status)
	{
		case KMS_ERR_CONFIG:
			return "Check the envelope.* settings of the KMS provider.";
		case KMS_ERR_CREDENTIALS:
			return "Check the credentials available to the server process (environment, shared files, web identity, container or instance role).";
		case KMS_ERR_ACCESS_DENIED:
			return "Grant the server's identity the KMS permissions on this key.";
		case KMS_ERR_DISABLED:
			return "The master key is disabled or pending deletion in the KMS.";
		case KMS_ERR_WRONG_REGION:
			return "Only a multi-Region key (a key id that begins with \"mrk-\") can be used from another region. Set envelope.aws_region to the key's region, or, with that region configured, move the data keys to a multi-Region key with envelope.rewrap.";
		case KMS_ERR_THROTTLED:
			return "The KMS is rate-limiting requests; retry later or raise envelope.kms_retries.";
		case KMS_ERR_UNAVAILABLE:
		case KMS_ERR_TIMEOUT:
			return "Check that the KMS endpoint is reachable; envelope.kms_timeout sets the time limit.";
		default:
			return NULL;
	}
}

/*
 * Raise the error of a failed provider call.  A cancel is served as PostgreSQL's own
 * cancel or termination, so statement_timeout and pg_cancel_backend read as usual.
 */
static void
report_kms_error(EnvelopeKmsOp op, const char *provider, const char *tenant,
				 uint32 version, const KmsError *err)
{
	const char *hint = status_hint(err->status);

	if (err->status == KMS_ERR_CANCELED)
		CHECK_FOR_INTERRUPTS();

	ereport(ERROR,
			(errcode(status_errcode(err->status)),
			 errmsg("KMS %s failed for key version %u of tenant \"%s\": %s",
					op_names[op], version, tenant,
					err->error_type[0] ? err->error_type : kms_status_name(err->status)),
			 err->message[0] ? errdetail("%s provider: %s.", provider, err->message) : 0,
			 hint ? errhint("%s", hint) : 0,
			 errhidestmt(true)));
}

static double
elapsed_ms(instr_time start)
{
	instr_time	now;

	INSTR_TIME_SET_CURRENT(now);
	INSTR_TIME_SUBTRACT(now, start);
	return INSTR_TIME_GET_MILLISEC(now);
}

/* A provider's wrapped key, from its buffer into a bytea; the length is checked. */
static bytea *
wrapped_to_bytea(const char *provider_name, uint8 *buf, size_t len)
{
	bytea	   *result;

	if (len == 0 || len > KMS_WRAPPED_MAX)
		elog(ERROR, "KMS provider %s returned a wrapped key of %zu bytes", provider_name, len);
	result = palloc(VARHDRSZ + len);
	SET_VARSIZE(result, VARHDRSZ + len);
	memcpy(VARDATA(result), buf, len);
	pfree(buf);
	return result;
}

/*
 * One provider call: what every operation sets up before it (provider, settings,
 * UTF-8 encryption context, room for a wrapped key and a key ARN, clock) and checks
 * after it.
 */
typedef struct KmsCall
{
	EnvelopeKmsOp op;
	const char *provider_name;
	const KmsProvider *provider;
	const char *tenant;
	uint32		version;
	KmsConfig	cfg;
	KmsError	err;
	KmsEncryptionContext ec;
	uint8	   *wrapped;		/* KMS_WRAPPED_MAX bytes, for generate and re-encrypt */
	size_t		wrapped_len;
	char	   *key_arn;		/* KMS_KEY_ID_MAX bytes, zeroed */
	instr_time	start;
} KmsCall;

static void
kms_call_begin(KmsCall *call, EnvelopeKmsOp op, const char *provider_name,
			   const char *tenant, uint32 version)
{
	call->op = op;
	call->provider_name = provider_name;
	call->provider = provider_or_error(provider_name);
	call->tenant = tenant;
	call->version = version;
	call->ec = context_for(tenant, version);
	fill_config(&call->cfg);
	memset(&call->err, 0, sizeof(call->err));
	call->wrapped = palloc(KMS_WRAPPED_MAX);
	call->wrapped_len = 0;
	call->key_arn = palloc0(KMS_KEY_ID_MAX);
	INSTR_TIME_SET_CURRENT(call->start);
}

/* Count the call; on failure wipe dek (when given) and raise the provider's error. */
static void
kms_call_end(KmsCall *call, KmsStatus status, uint8 *dek)
{
	record_kms_call(call->op, status == KMS_OK, elapsed_ms(call->start));
	if (status == KMS_OK)
		return;
	if (dek != NULL)
		explicit_bzero(dek, KMS_DEK_LEN);
	report_kms_error(call->op, call->provider_name, call->tenant, call->version, &call->err);
}

void
envelope_kms_generate(const char *provider_name, const char *kms_key,
					  const char *tenant, uint32 version,
					  uint8 dek[KMS_DEK_LEN], bytea **wrapped, char **key_arn)
{
	KmsCall		call;
	KmsStatus	status;

	kms_call_begin(&call, ENVELOPE_KMS_GENERATE, provider_name, tenant, version);
	status = call.provider->generate_data_key(&call.cfg, kms_key, &call.ec, dek,
											  call.wrapped, &call.wrapped_len,
											  call.key_arn, &call.err);
	kms_call_end(&call, status, dek);
	*wrapped = wrapped_to_bytea(provider_name, call.wrapped, call.wrapped_len);
	*key_arn = call.key_arn;
}

void
envelope_kms_decrypt(const char *provider_name, const char *kms_key,
					 const char *tenant, uint32 version,
					 const bytea *wrapped, uint8 dek[KMS_DEK_LEN])
{
	KmsCall		call;
	KmsStatus	status;

	kms_call_begin(&call, ENVELOPE_KMS_DECRYPT, provider_name, tenant, version);
	status = call.provider->decrypt(&call.cfg, kms_key, &call.ec,
									(const uint8 *) VARDATA_ANY(wrapped),
									VARSIZE_ANY_EXHDR(wrapped), dek, &call.err);
	kms_call_end(&call, status, dek);
}

KmsStatus
envelope_kms_check_decrypt(const char *provider_name, const char *kms_key,
						   const char *tenant_utf8, uint32 version,
						   const uint8 *wrapped, size_t wrapped_len,
						   bool (*interrupted) (void), KmsError *err)
{
	const KmsProvider *provider = kms_find_provider(provider_name);
	KmsConfig	cfg;
	KmsEncryptionContext ec;
	uint8		dek[KMS_DEK_LEN];
	KmsStatus	status;
	instr_time	start;

	memset(err, 0, sizeof(*err));
	if (provider == NULL)
		return kms_set_error(err, KMS_ERR_CONFIG, NULL, "unknown KMS provider");
	fill_config(&cfg);
	cfg.interrupted = interrupted;
	ec.tenant = tenant_utf8;
	ec.version = version;
	INSTR_TIME_SET_CURRENT(start);
	status = provider->decrypt(&cfg, kms_key, &ec, wrapped, wrapped_len, dek, err);
	record_kms_call(ENVELOPE_KMS_DECRYPT, status == KMS_OK, elapsed_ms(start));
	explicit_bzero(dek, sizeof(dek));
	return status;
}

/*
 * Re-wrap a stored DEK under another master key inside the KMS; the plaintext DEK never
 * reaches this process.  Returns the new wrapped DEK; *dest_key_arn receives the
 * canonical id of the master key that now wraps it.
 */
bytea *
envelope_kms_reencrypt(const char *provider_name, const char *source_key,
					   const char *dest_key, const char *tenant, uint32 version,
					   const bytea *wrapped, char **dest_key_arn)
{
	KmsCall		call;
	KmsStatus	status;

	kms_call_begin(&call, ENVELOPE_KMS_REENCRYPT, provider_name, tenant, version);
	status = call.provider->reencrypt(&call.cfg, source_key, dest_key, &call.ec,
									  (const uint8 *) VARDATA_ANY(wrapped),
									  VARSIZE_ANY_EXHDR(wrapped), call.wrapped,
									  &call.wrapped_len, call.key_arn, &call.err);
	kms_call_end(&call, status, NULL);
	*dest_key_arn = call.key_arn;
	return wrapped_to_bytea(provider_name, call.wrapped, call.wrapped_len);
}

/*
 * The DEKs of `keys` whose provider is keys[first].provider, as one reencrypt_many
 * batch; each gets its new wrapping, or the first failure is raised.  `done` marks
 * the DEKs handled.
 */
static void
reencrypt_batch(EnvelopeRewrap *keys, int n, int first, bool *done,
				const KmsProvider *provider, const char *dest_key)
{
	const char *provider_name = keys[first].provider;
	KmsRewrapItem *items = palloc0(n * sizeof(KmsRewrapItem));
	int		   *which = palloc(n * sizeof(int));
	int			m = 0;
	KmsConfig	cfg;
	instr_time	start;
	double		per_item_ms;

	for (int i = first; i < n; i++)
	{
		if (done[i] || strcmp(keys[i].provider, provider_name) != 0)
			continue;
		which[m] = i;
		items[m].source_key_id = keys[i].source_key;
		items[m].ec = context_for(keys[i].tenant, keys[i].version);
		items[m].wrapped = (const uint8 *) VARDATA_ANY(keys[i].wrapped);
		items[m].wrapped_len = VARSIZE_ANY_EXHDR(keys[i].wrapped);
		items[m].new_wrapped = palloc(KMS_WRAPPED_MAX);
		items[m].dest_key_arn = palloc0(KMS_KEY_ID_MAX);
		m++;
	}
	fill_config(&cfg);
	INSTR_TIME_SET_CURRENT(start);
	(void) provider->reencrypt_many(&cfg, dest_key, items, m,
									envelope_kms_max_concurrent_requests);
	/* the requests overlapped: each is counted with its share of the time */
	per_item_ms = m > 0 ? elapsed_ms(start) / m : 0;
	for (int k = 0; k < m; k++)
		record_kms_call(ENVELOPE_KMS_REENCRYPT, items[k].err.status == KMS_OK, per_item_ms);

	/* a cancel first, so that it reads as PostgreSQL's own */
	for (int k = 0; k < m; k++)
		if (items[k].err.status == KMS_ERR_CANCELED)
			report_kms_error(ENVELOPE_KMS_REENCRYPT, provider_name, keys[which[k]].tenant,
							 keys[which[k]].version, &items[k].err);
	for (int k = 0; k < m; k++)
		if (items[k].err.status != KMS_OK)
			report_kms_error(ENVELOPE_KMS_REENCRYPT, provider_name, keys[which[k]].tenant,
							 keys[which[k]].version, &items[k].err);
	for (int k = 0; k < m; k++)
	{
		EnvelopeRewrap *key = &keys[which[k]];

		key->new_wrapped = wrapped_to_bytea(provider_name, items[k].new_wrapped,
											items[k].new_wrapped_len);
		key->dest_key_arn = items[k].dest_key_arn;
		done[which[k]] = true;
	}
	pfree(items);
	pfree(which);
}

void
envelope_kms_reencrypt_many(EnvelopeRewrap *keys, int n, const char *dest_key)
{
	bool	   *done = palloc0(Max(n, 1) * sizeof(bool));

	for (int i = 0; i < n; i++)
	{
		const KmsProvider *provider;

		if (done[i])
			continue;
		provider = provider_or_error(keys[i].provider);
		if (provider->reencrypt_many != NULL)
		{
			reencrypt_batch(keys, n, i, done, provider, dest_key);
			continue;
		}
		CHECK_FOR_INTERRUPTS();
		keys[i].new_wrapped = envelope_kms_reencrypt(keys[i].provider, keys[i].source_key,
													 dest_key, keys[i].tenant,
													 keys[i].version, keys[i].wrapped,
													 &keys[i].dest_key_arn);
		done[i] = true;
	}
	pfree(done);
}

/* The settings a provider call gets, for callers outside this file (envelope.check). */
void
envelope_kms_config(KmsConfig *cfg)
{
	fill_config(cfg);
}

/*
 * One cheap call for envelope.check(): a data key under `kms_key`, made and thrown
 * away (wiped).  Returns the status with *err filled instead of raising, so the
 * caller can report it as a finding.
 */
KmsStatus
envelope_kms_probe(const char *provider_name, const char *kms_key, KmsError *err)
{
	const KmsProvider *provider = provider_or_error(provider_name);
	KmsConfig	cfg;
	KmsEncryptionContext ec = context_for("pg_envelope health check", 1);
	uint8		dek[KMS_DEK_LEN];
	uint8	   *buf = palloc(KMS_WRAPPED_MAX);
	char	   *arn = palloc0(KMS_KEY_ID_MAX);
	size_t		len = 0;
	KmsStatus	status;
	instr_time	start;

	fill_config(&cfg);
	memset(err, 0, sizeof(*err));
	INSTR_TIME_SET_CURRENT(start);
	status = provider->generate_data_key(&cfg, kms_key, &ec, dek, buf, &len, arn, err);
	record_kms_call(ENVELOPE_KMS_GENERATE, status == KMS_OK, elapsed_ms(start));
	explicit_bzero(dek, sizeof(dek));
	pfree(buf);
	pfree(arn);
	return status;
}
