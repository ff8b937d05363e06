/*
 * health.c — envelope.check(): one row per thing a DBA should know is right or wrong,
 * with a status (ok, warning, error), a detail and a hint.
 *
 * It makes at most one KMS request (a data key made and thrown away), reads the master
 * key file's metadata but never its contents, and reads the inventory and usage views
 * as the caller.  Settings are reported by name and value; nothing secret is printed.
 */
#include "pg_envelope.h"

#include <sys/stat.h>
#include <unistd.h>

#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/tuplestore.h"

#include "aws_credentials.h"
#include "kms_rate.h"
#include "kms_recheck.h"

PG_FUNCTION_INFO_V1(envelope_check);

typedef struct CheckOutput
{
	Tuplestorestate *store;
	TupleDesc	desc;
} CheckOutput;

static void
report(CheckOutput *out, const char *name, const char *status, const char *detail,
	   const char *hint)
{
	Datum		values[4];
	bool		nulls[4] = {false, false, detail == NULL, hint == NULL};

	values[0] = CStringGetTextDatum(name);
	values[1] = CStringGetTextDatum(status);
	values[2] = detail ? CStringGetTextDatum(detail) : (Datum) 0;
	values[3] = hint ? CStringGetTextDatum(hint) : (Datum) 0;
	tuplestore_putvalues(out->store, out->desc, values, nulls);
}

static void
check_preload(CheckOutput *out)
{
	if (envelope_preloaded)
		report(out, "preload", "ok", "pg_envelope is in shared_preload_libraries.", NULL);
	else
		report(out, "preload", "error",
			   "pg_envelope is not in shared_preload_libraries: every backend caches and unwraps keys on its own, and the sweeper that wipes expired keys does not run.",
			   "Add pg_envelope to shared_preload_libraries and restart the server.");
}

/* The master key the probe asks for: the default one, or else any tenant's. */
static char *
probe_master_key(void)
{
	char	   *key = NULL;

	if (envelope_kms_key != NULL && envelope_kms_key[0] != '\0')
		return pstrdup(envelope_kms_key);
	if (SPI_execute("SELECT kms_key FROM envelope.tenant_keys WHERE state = 'active'"
					" ORDER BY created_at DESC LIMIT 1", true, 1) == SPI_OK_SELECT &&
		SPI_processed == 1)
	{
		/* SPI's memory lasts until envelope_check's SPI_finish, after the probe. */
		key = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
	}
	return key;
}

static void
check_kms(CheckOutput *out)
{
	const char *provider = envelope_kms_provider;
	char	   *key;
	KmsError	err;
	KmsStatus	status;

	report(out, "kms_provider", "ok", psprintf("envelope.kms_provider is \"%s\".", provider), NULL);
	key = probe_master_key();
	if (key == NULL && strcmp(provider, "local") != 0)
	{
		report(out, "kms_reachable", "warning",
			   "No master key to test: envelope.kms_key is empty and there are no active tenants.",
			   "Set envelope.kms_key.");
		return;
	}
	status = envelope_kms_probe(provider, key ? key : "", &err);
	if (status == KMS_OK)
		report(out, "kms_reachable", "ok",
			   psprintf("The %s KMS made a data key in %d attempt(s).", provider, Max(err.attempts, 1)),
			   NULL);
	else
		report(out, "kms_reachable", "error",
			   psprintf("The %s KMS failed (%s): %s", provider, kms_status_name(status), err.message),
			   "Check the provider settings, the network path to the KMS and the key policy.");
}

static void
check_aws_credentials(CheckOutput *out)
{
	KmsConfig	cfg;
	AwsCredentials creds;
	KmsError	err;
	KmsStatus	status;

	if (strcmp(envelope_kms_provider, "aws") != 0)
		return;
	envelope_kms_config(&cfg);
	memset(&err, 0, sizeof(err));
	status = aws_credentials_get(&cfg, &creds, &err);
	if (status == KMS_OK)
	{
		char	   *detail = creds.expiration == 0
			? psprintf("Credentials come from %s and do not expire.", creds.source)
			: psprintf("Credentials come from %s and expire in %ld s.", creds.source,
					   (long) (creds.expiration - time(NULL)));

		report(out, "aws_credentials", "ok", detail,
			   strcmp(creds.source, "environment") == 0 || strcmp(creds.source, "shared-file") == 0
			   ? "Long-lived keys in the environment or a file work; an instance or task role rotates itself."
			   : NULL);
	}
	else
		report(out, "aws_credentials", "error", psprintf("No usable credentials: %s", err.message),
			   "Give the server an instance role, or set envelope.aws_profile.");
	aws_credentials_wipe(&creds);
}

static bool
path_inside(const char *path, const char *dir)
{
	size_t		n = strlen(dir);

	return strncmp(path, dir, n) == 0 && (path[n] == '/' || path[n] == '\0');
}

static void
check_local_key_file(CheckOutput *out)
{
	const char *path = envelope_local_master_key_file;
	struct stat st;

	if (strcmp(envelope_kms_provider, "local") != 0)
		return;
	if (path == NULL || path[0] == '\0')
	{
		report(out, "local_master_key_file", "error", "envelope.local_master_key_file is not set.",
			   "Point it at a file of 32 random bytes, mode 0600, outside the data directory.");
		return;
	}
	if (lstat(path, &st) != 0)
	{
		report(out, "local_master_key_file", "error",
			   psprintf("The master key file cannot be examined: %s.", strerror(errno)), NULL);
		return;
	}
	if (!S_ISREG(st.st_mode))
		report(out, "local_master_key_file", "error", "The master key file is not a regular file.", NULL);
	else if ((st.st_mode & (S_IRWXG | S_IRWXO)) != 0)
		report(out, "local_master_key_file", "error",
			   psprintf("The master key file has mode %04o: group or others can reach it.",
						(unsigned int) (st.st_mode & 07777)),
			   "chmod 0600 (or 0400) the file.");
	else if (st.st_uid != geteuid())
		report(out, "local_master_key_file", "warning",
			   "The master key file is not owned by the server's operating system user.", NULL);
	else if (DataDir != NULL && path_inside(path, DataDir))
		report(out, "local_master_key_file", "error",
			   "The master key file is inside the data directory, so backups of the data carry the key.",
			   "Move it outside the data directory.");
	else
		report(out, "local_master_key_file", "ok",
			   psprintf("Mode %04o, owned by the server user, outside the data directory. The local provider is for development: use a real KMS in production.",
						(unsigned int) (st.st_mode & 07777)),
			   NULL);
}

static void
check_cache(CheckOutput *out)
{
	KeyCacheStats s;
	char	   *detail;

	keycache_get_stats(&s);
	detail = psprintf("%lld of %lld keys cached (%s), envelope.cache_ttl = %d s, %lld evictions (expiries included), %lld keys unwrapped again within envelope.cache_ttl of their eviction.",
					  (long long) s.entries, (long long) s.capacity,
					  s.shared ? "shared" : "per backend", envelope_cache_ttl,
					  (long long) s.evictions, (long long) s.evicted_reloads);
	/* Evicting keys nobody uses is the cache working; evicting keys in use costs KMS calls. */
	if (s.evicted_reloads > 0)
		report(out, "key_cache", "warning", detail,
			   "Keys still in use were evicted to make room and unwrapped again: raise envelope.cache_size (needs a restart).");
	else if (!s.shared)
		report(out, "key_cache", "warning", detail, "Preload pg_envelope to share one cache.");
	else
		report(out, "key_cache", "ok", detail, NULL);
}

/*
 * The request rate limit: its setting, the rate in force (lower after throttling
 * answers), and what it cost (waits) and met (throttling answers).
 */
static void
check_kms_rate(CheckOutput *out)
{
	KmsRateStatus r;
	StringInfoData detail;
	const char *hint = NULL;
	const char *status = "ok";

	kms_rate_get_status(&r);
	initStringInfo(&detail);
	if (r.configured_rate > 0)
		appendStringInfo(&detail, "envelope.kms_max_requests_per_second = %.0f", r.configured_rate);
	else
		appendStringInfoString(&detail, "envelope.kms_max_requests_per_second = 0 (no limit)");
	if (r.adaptive)
		appendStringInfo(&detail, "; lowered to %.1f requests/s after throttling answers of the KMS",
						 r.effective_rate);
	appendStringInfo(&detail, "; %s bucket; measured rate %.1f requests/s; %lld requests, %lld of which waited (%.0f ms in all, at most %.0f ms); %lld throttling answers",
					 r.shared ? "one shared" : "this backend's own",
					 r.measured_rate, (long long) r.requests, (long long) r.waits,
					 r.wait_ms_total, r.wait_ms_max, (long long) r.throttled);
	if (r.seconds_since_throttle >= 0)
		appendStringInfo(&detail, ", the last %.0f s ago", r.seconds_since_throttle);
	appendStringInfoChar(&detail, '.');
	if (strcmp(envelope_kms_provider, "local") == 0)
		appendStringInfoString(&detail, " The local provider sends no requests: the limit does not apply to it.");

	if (r.adaptive)
	{
		status = "warning";
		hint = "The KMS is throttling this server's requests: raise the KMS request quota, or set envelope.kms_max_requests_per_second below it.";
	}
	else if (!r.shared)
	{
		status = "warning";
		hint = "Preload pg_envelope: without it every backend has a bucket of its own and the limit is per backend.";
	}
	report(out, "kms_rate_limit", status, detail.data, hint);
}

/*
 * The background worker's re-checks of the master keys in use (kms_recheck.c): on or
 * off, keys the KMS refuses now, the latest answer, and keys the table had no room for.
 */
static void
check_kms_recheck(CheckOutput *out)
{
	KmsRecheckStatus r;
	StringInfoData detail;
	int			cached_for = envelope_cache_ttl + envelope_cache_grace;

	if (envelope_kms_recheck_interval == 0)
	{
		report(out, "kms_recheck", "warning",
			   psprintf("envelope.kms_recheck_interval = 0: a master key disabled or revoked in the KMS keeps decrypting through its cached data keys until they expire (envelope.cache_ttl = %d s).",
						envelope_cache_ttl),
			   "Set envelope.kms_recheck_interval (300 s by default) so that a revocation stops decryption within that time.");
		return;
	}
	kms_recheck_get_status(&r);
	if (!r.available)
	{
		report(out, "kms_recheck", "warning",
			   "Master keys are not re-checked: the re-check runs in the background worker, which needs pg_envelope in shared_preload_libraries.",
			   "Add pg_envelope to shared_preload_libraries and restart the server.");
		return;
	}

	initStringInfo(&detail);
	appendStringInfo(&detail, "envelope.kms_recheck_interval = %d s; %d of at most %d master keys tracked",
					 envelope_kms_recheck_interval, r.tracked, KMS_RECHECK_MAX_KEYS);
	if (r.seconds_since_check < 0)
		appendStringInfoString(&detail, "; no re-check yet");
	else
		appendStringInfo(&detail, "; the latest re-check, %.0f s ago, of \"%s\": %s",
						 r.seconds_since_check, r.last_key,
						 r.last_status == KMS_OK ? "usable" : r.last_error);
	appendStringInfo(&detail, "; %lld re-checks answered (%lld refusals), %lld unanswered",
					 (long long) r.checks, (long long) r.refusals, (long long) r.unanswered);
	if (r.untracked > 0)
		appendStringInfo(&detail, "; %lld loads under keys beyond the table, the latest %.0f s ago",
						 (long long) r.untracked, r.seconds_since_untracked);
	appendStringInfoChar(&detail, '.');

	if (r.refused > 0)
		report(out, "kms_recheck", "error",
			   psprintf("The KMS refuses master key%s %s: their cached data keys are evicted and every decrypt under them fails. %s",
						r.refused > 1 ? "s" : "", r.refused_keys, detail.data),
			   "Enable the key in the KMS again (or restore its key policy or grant), or, if it was revoked on purpose, the data under it stays unreadable.");
	else if (r.untracked > 0 && r.seconds_since_untracked < cached_for)
		report(out, "kms_recheck", "warning", detail.data,
			   psprintf("The table of master keys was full: a revocation of a key beyond its %d is noticed only when the key's cached data keys expire (envelope.cache_ttl). Use fewer master keys per server.",
						KMS_RECHECK_MAX_KEYS));
	else if (r.seconds_since_check >= 0 && r.last_status != KMS_OK)
		report(out, "kms_recheck", "warning", detail.data,
			   "The latest re-check got no answer from the KMS: check the network path to it and the kms_rate_limit row.");
	else
		report(out, "kms_recheck", "ok", detail.data, NULL);
}

/* Run a query that returns one text column; the rows joined with ", ", or NULL. */
static char *
joined_rows(const char *sql)
{
	StringInfoData buf;

	if (SPI_execute(sql, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "SPI_execute failed for health check query");
	if (SPI_processed == 0)
		return NULL;
	initStringInfo(&buf);
	for (uint64 i = 0; i < SPI_processed; i++)
		appendStringInfo(&buf, "%s%s", i > 0 ? ", " : "",
						 SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1));
	return buf.data;
}

static void
check_inventory(CheckOutput *out)
{
	char	   *broken = joined_rows("SELECT pg_catalog.format('%s.%I', relation, column_name)"
									 "  FROM envelope.encrypted_columns WHERE tenant_column IS NULL"
									 " ORDER BY 1");
	char	   *uncounted;
	char	   *stranded;
	char	   *plain;

	if (broken)
		report(out, "registered_columns", "error",
			   psprintf("Registered columns whose tenant column no longer exists: %s.", broken),
			   "Register them again with envelope.register_column() naming the tenant column, or unregister them.");
	else
		report(out, "registered_columns", "ok",
			   psprintf("%s registered columns, each with its table and tenant column.",
						joined_rows("SELECT pg_catalog.count(*)::text FROM envelope.encrypted_columns")),
			   NULL);

	uncounted = joined_rows("SELECT pg_catalog.format('%s.%I', relation, column_name)"
							"  FROM envelope.encrypted_columns WHERE counted_at IS NULL ORDER BY 1");
	stranded = joined_rows("SELECT pg_catalog.format('%s.%I: %s values of tenant %L under %s version %s',"
						   "       u.relation, u.column_name, u.value_count, u.tenant, k.state, u.version)"
						   "  FROM envelope.column_key_usage u"
						   "  JOIN envelope.tenant_keys k USING (tenant, version)"
						   " WHERE k.state IN ('retired', 'destroyed') AND u.value_count > 0"
						   " ORDER BY 1");
	if (stranded)
		report(out, "values_under_retired_versions", "error",
			   psprintf("Per the last usage count: %s.", stranded),
			   "Reactivate the version and re-encrypt those values, or accept that they are lost.");
	else if (uncounted)
		report(out, "values_under_retired_versions", "warning",
			   psprintf("Never counted: %s.", uncounted),
			   "CALL envelope.count_key_usage();");
	else
		report(out, "values_under_retired_versions", "ok",
			   "Per the last usage count, no value is under a retired or destroyed version.", NULL);

	plain = joined_rows("SELECT pg_catalog.format('%s.%I: %s', relation, column_name, value_count)"
						"  FROM envelope.column_key_usage WHERE value_kind = 'not encrypted'"
						" ORDER BY 1");
	if (plain)
		report(out, "unencrypted_values", "warning",
			   psprintf("Per the last usage count, values that are not pg_envelope ciphertexts: %s.", plain),
			   "Encrypt them, or unregister columns that are not meant to be encrypted.");
	else
		report(out, "unencrypted_values", "ok",
			   "Per the last usage count, every value in the registered columns is a pg_envelope ciphertext.",
			   NULL);
}

static const char *
setting(const char *name)
{
	return GetConfigOption(name, true, false);
}

static bool
setting_is(const char *name, const char *value)
{
	const char *v = setting(name);

	return v != NULL && pg_strcasecmp(v, value) == 0;
}

static bool
library_loaded(const char *lib)
{
	const char *lists[] = {"shared_preload_libraries", "session_preload_libraries",
	"local_preload_libraries"};

	for (int i = 0; i < lengthof(lists); i++)
	{
		const char *v = setting(lists[i]);

		if (v != NULL && strstr(v, lib) != NULL)
			return true;
	}
	return setting(psprintf("%s.%s", lib, strcmp(lib, "auto_explain") == 0 ? "log_min_duration" : "max")) != NULL;
}

/* Settings that write statement text, with the literal plaintexts in it, to the log. */
static void
check_logging(CheckOutput *out)
{
	const char *hint = "Pass plaintexts as bind parameters, never as literals, and keep statements with plaintext out of the log.";
	const char *v;

	v = setting("log_statement");
	if (setting_is("log_statement", "all") || setting_is("log_statement", "mod"))
		report(out, "log_statement", "warning",
			   psprintf("log_statement = %s logs statements with their literals.", v),
			   "Set log_statement = 'ddl' or 'none'.");
	else
		report(out, "log_statement", "ok", psprintf("log_statement = %s.", v ? v : "none"), NULL);

	v = setting("log_min_duration_statement");
	if (v != NULL && strcmp(v, "-1") != 0)
		report(out, "log_min_duration_statement", "warning",
			   psprintf("log_min_duration_statement = %s logs slow statements with their literals (and parameters up to log_parameter_max_length).", v),
			   hint);
	else
		report(out, "log_min_duration_statement", "ok", "log_min_duration_statement = -1.", NULL);

	v = setting("log_min_error_statement");
	if (v != NULL && pg_strcasecmp(v, "panic") != 0)
		report(out, "log_min_error_statement", "warning",
			   psprintf("log_min_error_statement = %s logs the statement of a failing query (a constraint violation, a syntax error) with its literals; pg_envelope's own errors hide it.", v),
			   "Set log_min_error_statement = panic where statements may carry plaintext literals.");
	else
		report(out, "log_min_error_statement", "ok", "log_min_error_statement = panic.", NULL);

	if (library_loaded("auto_explain"))
		report(out, "auto_explain", "warning",
			   "auto_explain is loaded: it logs the plans (and with log_verbose, the expressions and literals) of slow statements.",
			   "Do not load auto_explain on servers that encrypt, or keep auto_explain.log_min_duration = -1.");
	else
		report(out, "auto_explain", "ok", "auto_explain is not loaded.", NULL);

	if (library_loaded("pg_stat_statements") && !setting_is("pg_stat_statements.track_utility", "off"))
		report(out, "pg_stat_statements", "warning",
			   "pg_stat_statements keeps utility statements (CALL, DO, PREPARE ... with literals) as written.",
			   "Set pg_stat_statements.track_utility = off.");
	else
		report(out, "pg_stat_statements", "ok",
			   library_loaded("pg_stat_statements")
			   ? "pg_stat_statements replaces literals with placeholders and does not track utility statements."
			   : "pg_stat_statements is not loaded.", NULL);
}

Datum
envelope_check(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	MemoryContext per_query;
	MemoryContext old;
	CheckOutput out;

	if (rsinfo == NULL || !IsA(rsinfo, ReturnSetInfo) ||
		!(rsinfo->allowedModes & SFRM_Materialize))
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("envelope.check() must be called in a FROM clause")));
	per_query = rsinfo->econtext->ecxt_per_query_memory;
	old = MemoryContextSwitchTo(per_query);
	if (get_call_result_type(fcinfo, NULL, &out.desc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	out.desc = CreateTupleDescCopy(out.desc);
	out.store = tuplestore_begin_heap(true, false, work_mem);
	MemoryContextSwitchTo(old);

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	check_preload(&out);
	check_kms(&out);
	check_aws_credentials(&out);
	check_local_key_file(&out);
	check_cache(&out);
	check_kms_rate(&out);
	check_kms_recheck(&out);
	check_inventory(&out);
	check_logging(&out);
	SPI_finish();

	rsinfo->returnMode = SFRM_Materialize;
	rsinfo->setResult = out.store;
	rsinfo->setDesc = out.desc;
	return (Datum) 0;
}
