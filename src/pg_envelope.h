/*
 * pg_envelope.h — what every backend-facing file (the ones that include postgres.h)
 * shares: the settings, and the headers of the three glue modules, each of which says
 * what its functions promise: keystore.h (the key tables), kms_glue.h (KMS calls from
 * a backend) and keycache.h (shared and per-backend key cache).
 */
#ifndef PG_ENVELOPE_H
#define PG_ENVELOPE_H

#include "compat.h"

#include "fmgr.h"
#include "nodes/pg_list.h"

#include "cipher.h"
#include "keycache.h"
#include "keystore.h"
#include "kms.h"
#include "kms_glue.h"

/* ---- settings (pg_envelope.c) ---- */
extern char *envelope_kms_provider;
extern char *envelope_kms_key;
extern char *envelope_aws_region;
extern char *envelope_aws_endpoint;
extern char *envelope_aws_profile;
extern bool envelope_aws_use_fips_endpoint;
extern char *envelope_local_master_key_file;
extern char *envelope_kmip_host;
extern int	envelope_kmip_port;
extern char *envelope_kmip_ca_file;
extern char *envelope_kmip_cert_file;
extern char *envelope_kmip_key_file;
extern int	envelope_cache_size;
extern int	envelope_cache_ttl;
extern int	envelope_cache_grace;
extern int	envelope_kms_timeout;
extern int	envelope_kms_retries;
extern int	envelope_kms_max_concurrent_requests;
extern int	envelope_kms_recheck_interval;
extern int	envelope_kms_max_requests_per_second;
extern bool envelope_preloaded;

/* ---- envelope_sql.c ---- */
/* Argument `argno` as a checked tenant name (palloc'd); an error if NULL or malformed. */
extern char *envelope_tenant_arg(FunctionCallInfo fcinfo, int argno);

/*
 * The tenant's row, locked against concurrent key management; an error if it does not
 * exist or was destroyed.
 */
extern TenantRecord envelope_lock_tenant(const char *tenant);

/*
 * The deterministic value of (data, len) for the tenant in argument 0 and the context
 * in argument 2 of the calling SQL function, under equality key `version`.
 */
extern bytea *envelope_encrypt_deterministic_under(FunctionCallInfo fcinfo, uint32 version,
												   const char *data, size_t len);

/*
 * The blind index of argument 1 for the tenant in argument 0 under equality key
 * `version`, in the versioned layout of cipher.h.
 */
extern bytea *envelope_blind_index_under(FunctionCallInfo fcinfo, uint32 version);
/* The same, written into `result` (room for CIPHER_INDEX_VERSIONED_MAX_LEN + VARHDRSZ). */
extern void envelope_blind_index_into(FunctionCallInfo fcinfo, uint32 version, bytea *result);

/* ---- equality_sql.c ---- */
/*
 * The tenant's current equality key version into *version; false if that version is
 * not live (retired or destroyed).  Raises an error if the tenant does not exist.
 */
extern bool equality_current_version(const char *tenant, size_t tenant_len, uint32 *version);

/* ---- sweeper.c ---- */
/* Register the background worker that zeroes expired keys (preload only). */
extern void envelope_register_sweeper(void);

#endif							/* PG_ENVELOPE_H */
