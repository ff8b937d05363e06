/*
 * pg_envelope.c — module initialisation: settings and hooks.
 *
 * The library is meant to be loaded with shared_preload_libraries, which lets it
 * reserve the shared key cache.  Loaded on demand instead, it still works with a cache
 * private to each backend, and says so once.
 */
#include "pg_envelope.h"

#include "fmgr.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "utils/guc.h"

#include "encryption_count.h"
#include "http.h"
#include "inventory.h"
#include "kms_recheck.h"
#include "kms_rate.h"
#include "plaintext_guard.h"
#include "prewarm.h"
#include "tenant_access.h"

PG_MODULE_MAGIC;

char	   *envelope_kms_provider = NULL;
char	   *envelope_kms_key = NULL;
char	   *envelope_aws_region = NULL;
char	   *envelope_aws_endpoint = NULL;
char	   *envelope_aws_profile = NULL;
bool		envelope_aws_use_fips_endpoint = false;
char	   *envelope_local_master_key_file = NULL;
char	   *envelope_kmip_host = NULL;
int			envelope_kmip_port = 5696;
char	   *envelope_kmip_ca_file = NULL;
char	   *envelope_kmip_cert_file = NULL;
char	   *envelope_kmip_key_file = NULL;
int			envelope_cache_size = 32768;
int			envelope_cache_ttl = 3600;
int			envelope_cache_grace = 0;
int			envelope_kms_timeout = 5000;
int			envelope_kms_retries = 3;
int			envelope_kms_max_concurrent_requests = 8;
int			envelope_kms_recheck_interval = 300;
int			envelope_kms_max_requests_per_second = 0;
bool		envelope_preloaded = false;

#ifdef ENVELOPE_HAS_SHMEM_REQUEST_HOOK
static shmem_request_hook_type prev_shmem_request_hook = NULL;
#endif
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

void		_PG_init(void);

static bool
check_kms_provider(char **newval, void **extra, GucSource source)
{
	if (*newval == NULL || kms_find_provider(*newval) == NULL)
	{
		GUC_check_errdetail("Available providers: %s.", kms_provider_names());
		return false;
	}
	return true;
}

#ifdef ENVELOPE_HAS_SHMEM_REQUEST_HOOK
static void
envelope_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	keycache_shmem_request();
	kms_glue_shmem_request();
	kms_recheck_shmem_request();
	prewarm_shmem_request();
	kms_rate_shmem_request();
}
#endif

static void
envelope_shmem_startup(void)
{
	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();
	keycache_shmem_startup();
	kms_glue_shmem_startup();
	kms_recheck_shmem_startup();
	prewarm_shmem_startup();
	kms_rate_shmem_startup();
}

static void
define_settings(void)
{
	DefineCustomStringVariable("envelope.kms_provider",
							   "KMS provider that makes and unwraps data keys (aws, kmip or local).",
							   NULL,
							   &envelope_kms_provider,
							   "local",
							   PGC_SUSET, 0,
							   check_kms_provider, NULL, NULL);
	DefineCustomStringVariable("envelope.kms_key",
							   "Default master key for new tenants: a KMS key id, ARN or alias.",
							   "Empty means the local provider's file key.",
							   &envelope_kms_key,
							   "",
							   PGC_SUSET, 0,
							   NULL, NULL, NULL);
	DefineCustomStringVariable("envelope.aws_region",
							   "AWS region of the KMS.",
							   NULL,
							   &envelope_aws_region,
							   "",
							   PGC_SUSET, GUC_SUPERUSER_ONLY,
							   NULL, NULL, NULL);
	DefineCustomStringVariable("envelope.aws_endpoint",
							   "KMS endpoint URL, overriding the region's public one.",
							   "For VPC endpoints and tests.",
							   &envelope_aws_endpoint,
							   "",
							   PGC_SUSET, GUC_SUPERUSER_ONLY,
							   NULL, NULL, NULL);
	DefineCustomStringVariable("envelope.aws_profile",
							   "Profile of the AWS shared credentials and config files.",
							   NULL,
							   &envelope_aws_profile,
							   "",
							   PGC_SUSET, GUC_SUPERUSER_ONLY,
							   NULL, NULL, NULL);
	DefineCustomBoolVariable("envelope.aws_use_fips_endpoint",
							 "Use the AWS KMS FIPS endpoint (kms-fips.<region>.amazonaws.com).",
							 "As the AWS SDKs' AWS_USE_FIPS_ENDPOINT; envelope.aws_endpoint, when set, wins.",
							 &envelope_aws_use_fips_endpoint,
							 false,
							 PGC_SUSET, GUC_SUPERUSER_ONLY,
							 NULL, NULL, NULL);
	DefineCustomStringVariable("envelope.local_master_key_file",
							   "File holding the local provider's 32-byte master key.",
							   "Must be outside the data directory and readable only by its owner.",
							   &envelope_local_master_key_file,
							   "",
							   PGC_SUSET, GUC_SUPERUSER_ONLY,
							   NULL, NULL, NULL);
	DefineCustomStringVariable("envelope.kmip_host",
							   "Host name or IP address of the KMIP server.",
							   "The server's certificate must name it.",
							   &envelope_kmip_host, "",
							   PGC_SUSET, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);
	DefineCustomIntVariable("envelope.kmip_port",
							"TCP port of the KMIP server.",
							NULL,
							&envelope_kmip_port, 5696, 1, 65535,
							PGC_SUSET, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);
	DefineCustomStringVariable("envelope.kmip_ca_file",
							   "PEM file of the CA certificates that verify the KMIP server.",
							   NULL,
							   &envelope_kmip_ca_file, "",
							   PGC_SUSET, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);
	DefineCustomStringVariable("envelope.kmip_cert_file",
							   "PEM file of the client certificate presented to the KMIP server.",
							   NULL,
							   &envelope_kmip_cert_file, "",
							   PGC_SUSET, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);
	DefineCustomStringVariable("envelope.kmip_key_file",
							   "PEM file of the private key of envelope.kmip_cert_file.",
							   "Must be outside the data directory and readable only by its owner.",
							   &envelope_kmip_key_file, "",
							   PGC_SUSET, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);
	DefineCustomIntVariable("envelope.cache_size",
							"Number of data keys the shared key cache holds.",
							NULL,
							&envelope_cache_size,
							32768, 16, 1024 * 1024,
							/* Only the postmaster may create a postmaster-context setting. */
							process_shared_preload_libraries_in_progress ? PGC_POSTMASTER : PGC_SUSET,
							0,
							NULL, NULL, NULL);
	DefineCustomIntVariable("envelope.cache_ttl",
							"How long a data key stays cached after it was unwrapped.",
							NULL,
							&envelope_cache_ttl,
							3600, 1, 7 * 24 * 3600,
							PGC_SIGHUP, GUC_UNIT_S,
							NULL, NULL, NULL);
	DefineCustomIntVariable("envelope.cache_grace",
							"How long past envelope.cache_ttl a cached data key may still be used while the KMS cannot be reached.",
							"Only network errors, 5xx answers, timeouts and throttling are graced, never a refusal.  0 turns it off.",
							&envelope_cache_grace,
							0, 0, 7 * 24 * 3600,
							PGC_SIGHUP, GUC_UNIT_S | GUC_SUPERUSER_ONLY,
							NULL, NULL, NULL);
	DefineCustomIntVariable("envelope.kms_timeout",
							"Time limit for one KMS request.",
							NULL,
							&envelope_kms_timeout,
							5000, 100, 600000,
							PGC_SUSET, GUC_UNIT_MS,
							NULL, NULL, NULL);
	DefineCustomIntVariable("envelope.kms_retries",
							"Extra attempts for a KMS request that was throttled or met a transient failure.",
							NULL,
							&envelope_kms_retries,
							3, 0, 10,
							PGC_SUSET, 0,
							NULL, NULL, NULL);
	DefineCustomIntVariable("envelope.kms_max_concurrent_requests",
							"How many KMS requests a bulk key operation keeps in flight at once.",
							"Used by envelope.rewrap_keys with the aws provider (ReEncrypt); other providers, and every other call, send one request at a time.",
							&envelope_kms_max_concurrent_requests,
							8, 1, 64,
							PGC_SUSET, 0,
							NULL, NULL, NULL);
	DefineCustomIntVariable("envelope.kms_recheck_interval",
							"How often the background worker checks that each master key in use still works.",
							"A key the KMS refuses (disabled, pending deletion, deleted, access denied) has its cached data keys evicted within this time plus one KMS request.  0 turns the check off.",
							&envelope_kms_recheck_interval,
							300, 0, 24 * 3600,
							PGC_SIGHUP, GUC_UNIT_S | GUC_SUPERUSER_ONLY,
							NULL, NULL, NULL);
	prewarm_define_settings();
	DefineCustomIntVariable("envelope.kms_max_requests_per_second",
							"Most requests per second that the whole server sends to the KMS.",
							"Shared by every backend and the background worker, retries included; throttling answers of the KMS lower the rate further for a while.  0 means no limit.",
							&envelope_kms_max_requests_per_second,
							0, 0, 1000000,
							PGC_SIGHUP, 0,
							NULL, NULL, NULL);
	encryption_count_define_settings();
	MarkGUCPrefixReserved("envelope");
}

void
_PG_init(void)
{
	define_settings();

	if (http_global_init() != 0)
		ereport(WARNING,
				(errmsg("pg_envelope could not initialize libcurl"),
				 errdetail("The aws KMS provider will fail until the server is restarted.")));

	if (process_shared_preload_libraries_in_progress)
	{
		envelope_preloaded = true;
#ifdef ENVELOPE_HAS_SHMEM_REQUEST_HOOK
		prev_shmem_request_hook = shmem_request_hook;
		shmem_request_hook = envelope_shmem_request;
#else
		keycache_shmem_request();
		kms_glue_shmem_request();
		kms_recheck_shmem_request();
		prewarm_shmem_request();
		kms_rate_shmem_request();
#endif
		prev_shmem_startup_hook = shmem_startup_hook;
		shmem_startup_hook = envelope_shmem_startup;
		envelope_register_sweeper();
	}
	else
		ereport(WARNING,
				(errmsg("pg_envelope is not in shared_preload_libraries"),
				 errdetail("Data keys are cached in each backend separately, so every backend unwraps each key with the KMS again."),
				 errhint("Add pg_envelope to shared_preload_libraries and restart the server to share one key cache.")));

	plaintext_guard_install();
	keycache_init_backend();
	tenant_access_init_backend();
	/* Registrations of encrypted columns are security labels of this provider. */
	inventory_register_label_provider();
}
