/*
 * pg_envelope.h — declarations shared by the backend-facing files (the ones that
 * include postgres.h): settings, the KMS glue, the key store and the key cache.
 */
#ifndef PG_ENVELOPE_H
#define PG_ENVELOPE_H

#include "compat.h"

#include "nodes/pg_list.h"

#include "cipher.h"
#include "kms.h"

/* Tenant names: 1 to 255 bytes, no control characters (see envelope_check_tenant). */
#define ENVELOPE_TENANT_MAX 255

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
extern int	envelope_kms_timeout;
extern int	envelope_kms_retries;
extern bool envelope_preloaded;

/* ---- KMS glue (kms_glue.c): a provider call with stats, and its error raised ---- */
typedef enum EnvelopeKmsOp
{
	ENVELOPE_KMS_GENERATE = 0,
	ENVELOPE_KMS_DECRYPT,
	ENVELOPE_KMS_REENCRYPT,
	ENVELOPE_KMS_NOPS
} EnvelopeKmsOp;

extern void envelope_kms_generate(const char *provider, const char *kms_key,
								  const char *tenant, uint32 version,
								  uint8 dek[KMS_DEK_LEN], bytea **wrapped, char **key_arn);
extern void envelope_kms_decrypt(const char *provider, const char *kms_key,
								 const char *tenant, uint32 version,
								 const bytea *wrapped, uint8 dek[KMS_DEK_LEN]);
extern bytea *envelope_kms_reencrypt(const char *provider, const char *source_key,
									 const char *dest_key, const char *tenant,
									 uint32 version, const bytea *wrapped,
									 char **dest_key_arn);
extern void envelope_kms_config(KmsConfig *cfg);
extern KmsStatus envelope_kms_probe(const char *provider, const char *kms_key, KmsError *err);

/* ---- key store (keystore.c): the tables, read and written as their owner ---- */
typedef enum TenantState
{
	TENANT_ACTIVE = 'a',
	TENANT_DISABLED = 'd',
	TENANT_DESTROYED = 'x'
} TenantState;

typedef enum KeyState
{
	KEY_ACTIVE = 'a',
	KEY_RETIRED = 'r',
	KEY_DESTROYED = 'x'
} KeyState;

typedef struct TenantRecord
{
	int32		tenant_id;
	TenantState state;
	int32		active_version;
	char	   *kms_provider;
	char	   *kms_key;
} TenantRecord;

typedef struct DataKeyRecord
{
	KeyState	state;
	char	   *kms_provider;
	char	   *kms_key;
	bytea	   *wrapped;		/* NULL once destroyed */
} DataKeyRecord;

extern bool keystore_get_tenant(const char *tenant, bool for_update, TenantRecord *out);
extern bool keystore_get_data_key(const char *tenant, int32 version, DataKeyRecord *out);
extern int32 keystore_create_tenant(const char *tenant, const char *kms_provider,
									const char *tenant_kms_key, const char *key_arn,
									const bytea *wrapped);
/* One stored DEK, as rewrap walks them. */
typedef struct StoredKey
{
	char	   *tenant;
	int32		version;
	char	   *kms_provider;
	char	   *kms_key;
	bytea	   *wrapped;
} StoredKey;

extern List *keystore_lock_keys_for_rewrap(const char *tenant);
extern void keystore_set_wrapping(const char *tenant, int32 version, const char *kms_key,
								  const bytea *wrapped);
extern void keystore_set_tenant_kms_key(const char *tenant, const char *kms_key);
extern int32 keystore_max_version(const char *tenant);
extern void keystore_add_version(const char *tenant, int32 version, const char *kms_provider,
								 const char *kms_key, const bytea *wrapped);
extern void keystore_set_tenant_state(const char *tenant, TenantState state);
extern void keystore_set_key_state(const char *tenant, int32 version, KeyState state);
extern void keystore_destroy_tenant(const char *tenant);
extern void keystore_forget_relations(void);
extern bool keystore_is_key_table(Oid relid);

/* ---- key cache (keycache.c) ---- */
typedef struct EnvelopeKeyRef
{
	const CipherKey *key;
	uint32		version;
} EnvelopeKeyRef;

extern void keycache_shmem_request(void);
extern void keycache_shmem_startup(void);
extern void keycache_init_backend(void);
extern EnvelopeKeyRef keycache_key_for_encrypt(const char *tenant, size_t tenant_len);
extern const CipherKey *keycache_key_for_decrypt(const char *tenant, size_t tenant_len,
												 uint32 version);
extern uint32 keycache_active_version(const char *tenant, size_t tenant_len);
extern void keycache_note_key_store_change(void);
extern void keycache_schedule_purge(int32 tenant_id, uint32 version);
extern void keycache_flush(void);
extern int	keycache_sweep(void);
extern void keycache_prime(int32 tenant_id, uint32 version, const bytea *wrapped,
						   const uint8 dek[KMS_DEK_LEN]);
extern void keycache_record_kms_call(EnvelopeKmsOp op, bool ok, double elapsed_ms);

typedef struct KeyCacheStats
{
	int64		capacity;
	int64		entries;
	int64		hits;
	int64		misses;
	int64		evictions;
	int64		kms_calls[ENVELOPE_KMS_NOPS];
	int64		kms_errors;
	double		kms_total_ms;
	double		kms_max_ms;
	bool		shared;
} KeyCacheStats;

extern void keycache_get_stats(KeyCacheStats *stats);

/* ---- sweeper.c ---- */
extern void envelope_register_sweeper(void);

/* ---- SQL surface (envelope_sql.c) ---- */
extern void envelope_check_tenant(const char *tenant, size_t len);

#endif							/* PG_ENVELOPE_H */
