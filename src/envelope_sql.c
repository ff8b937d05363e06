/*
 * envelope_sql.c — the SQL surface: fmgr glue for envelope.* functions.
 *
 * Turns arguments into calls on the key cache, key store and cipher, and cipher
 * statuses into errors.  Errors raised on behalf of encrypt/decrypt hide the statement
 * (errhidestmt) because its text may hold a literal plaintext, and never include a
 * value or a key byte.
 */
#include "pg_envelope.h"
#include "tenant_name.h"

#include "access/htup_details.h"
#include "commands/trigger.h"
#include "fmgr.h"
#include "funcapi.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"

#include "audit.h"
#include "citus_support.h"
#include "encryption_count.h"
#include "prewarm.h"

PG_FUNCTION_INFO_V1(envelope_encrypt_text);
PG_FUNCTION_INFO_V1(envelope_encrypt_bytea);
PG_FUNCTION_INFO_V1(envelope_decrypt);
PG_FUNCTION_INFO_V1(envelope_encrypt_deterministic_text);
PG_FUNCTION_INFO_V1(envelope_encrypt_deterministic_bytea);
PG_FUNCTION_INFO_V1(envelope_blind_index);
PG_FUNCTION_INFO_V1(envelope_decrypt_text);
PG_FUNCTION_INFO_V1(envelope_key_version);
PG_FUNCTION_INFO_V1(envelope_active_key_version);
PG_FUNCTION_INFO_V1(envelope_create_tenant);
PG_FUNCTION_INFO_V1(envelope_rotate_tenant_key);
PG_FUNCTION_INFO_V1(envelope_disable_tenant);
PG_FUNCTION_INFO_V1(envelope_enable_tenant);
PG_FUNCTION_INFO_V1(envelope_retire_key_version);
PG_FUNCTION_INFO_V1(envelope_destroy_tenant);
PG_FUNCTION_INFO_V1(envelope_rewrap);
PG_FUNCTION_INFO_V1(envelope_cache_flush);
PG_FUNCTION_INFO_V1(envelope_cache_stats);
PG_FUNCTION_INFO_V1(envelope_cache_stats_v2);
PG_FUNCTION_INFO_V1(envelope_cache_stats_v3);
PG_FUNCTION_INFO_V1(envelope_key_store_changed);

/*
 * Bind to the logical names in UTF-8, whatever the database encoding, so a value
 * restored into a database of another encoding still authenticates.  In a UTF-8 (or
 * SQL_ASCII) database this is a pointer comparison per row.
 */
static const char *
binding_bytes(const char *s, size_t *len)
{
	const char *utf8 = pg_server_to_any(s, (int) *len, PG_UTF8);

	if (utf8 != s)
		*len = strlen(utf8);
	return utf8;
}

static CipherBinding
make_binding(FunctionCallInfo fcinfo, text *tenant, int context_arg)
{
	CipherBinding b;

	b.tenant_len = VARSIZE_ANY_EXHDR(tenant);
	b.tenant = binding_bytes(VARDATA_ANY(tenant), &b.tenant_len);
	if (PG_NARGS() > context_arg && !PG_ARGISNULL(context_arg))
	{
		text	   *context = PG_GETARG_TEXT_PP(context_arg);

		b.context_len = VARSIZE_ANY_EXHDR(context);
		b.context = binding_bytes(VARDATA_ANY(context), &b.context_len);
	}
	else
	{
		b.context = NULL;
		b.context_len = 0;
	}
	return b;
}

static void
raise_cipher_internal(CipherStatus status)
{
	ereport(ERROR,
			(errcode(ERRCODE_INTERNAL_ERROR),
			 errmsg("%s", status == CIPHER_ERR_RANDOM ?
					"could not generate a random nonce" :
					"a cipher operation (AES-256-GCM, AES-256-SIV or HMAC-SHA256) failed in OpenSSL"),
			 errhidestmt(true)));
}

static bytea *
encrypt_bytes(FunctionCallInfo fcinfo, const char *data, size_t len)
{
	text	   *tenant = PG_GETARG_TEXT_PP(0);
	CipherBinding binding = make_binding(fcinfo, tenant, 2);
	EnvelopeKeyRef ref;
	uint8		nonce[CIPHER_NONCE_LEN];
	bytea	   *result;
	CipherStatus cs;

	if (len > MaxAllocSize - VARHDRSZ - CIPHER_OVERHEAD)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("value is too large to encrypt"),
				 errdetail("Encrypted values may be at most %zu bytes.",
						   (size_t) (MaxAllocSize - VARHDRSZ - CIPHER_OVERHEAD)),
				 errhidestmt(true)));

	ref = encryption_counted_key(VARDATA_ANY(tenant), VARSIZE_ANY_EXHDR(tenant));
	result = palloc(VARHDRSZ + len + CIPHER_OVERHEAD);
	SET_VARSIZE(result, VARHDRSZ + len + CIPHER_OVERHEAD);
	cs = cipher_next_nonce(nonce);
	if (cs == CIPHER_OK)
		cs = cipher_encrypt(ref.key, ref.version, nonce, &binding,
							(const uint8 *) data, len, (uint8 *) VARDATA(result));
	if (cs != CIPHER_OK)
		raise_cipher_internal(cs);
	return result;
}

Datum
envelope_encrypt_text(PG_FUNCTION_ARGS)
{
	text	   *plaintext;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		PG_RETURN_NULL();
	plaintext = PG_GETARG_TEXT_PP(1);
	PG_RETURN_BYTEA_P(encrypt_bytes(fcinfo, VARDATA_ANY(plaintext), VARSIZE_ANY_EXHDR(plaintext)));
}

Datum
envelope_encrypt_bytea(PG_FUNCTION_ARGS)
{
	bytea	   *plaintext;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		PG_RETURN_NULL();
	plaintext = PG_GETARG_BYTEA_PP(1);
	PG_RETURN_BYTEA_P(encrypt_bytes(fcinfo, VARDATA_ANY(plaintext), VARSIZE_ANY_EXHDR(plaintext)));
}

/*
 * 0.1.0's deterministic values and blind indexes use the tenant's first DEK version,
 * so that they stay equal across rotations of the DEK.  0.2.0's SQL calls the
 * functions of equality_sql.c instead, which use the tenant's equality key version
 * (1 until envelope.rotate_equality_key() moves it); these symbols stay for databases
 * not yet updated, whose key store has no equality version.
 */
#define ENVELOPE_EQUALITY_VERSION 1

static bytea *
encrypt_deterministic_bytes(FunctionCallInfo fcinfo, const char *data, size_t len)
{
	return envelope_encrypt_deterministic_under(fcinfo, ENVELOPE_EQUALITY_VERSION, data, len);
}

/*
 * The deterministic value of (data, len) for the tenant in argument 0 and the context
 * in argument 2, under equality key `version` (a DEK version of the tenant).
 */
bytea *
envelope_encrypt_deterministic_under(FunctionCallInfo fcinfo, uint32 version,
									 const char *data, size_t len)
{
	text	   *tenant = PG_GETARG_TEXT_PP(0);
	CipherBinding binding = make_binding(fcinfo, tenant, 2);
	const CipherKey *key;
	bytea	   *result;
	CipherStatus cs;

	if (len > MaxAllocSize - VARHDRSZ - CIPHER_SIV_OVERHEAD)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("value is too large to encrypt"),
				 errhidestmt(true)));
	key = keycache_key_for_decrypt(VARDATA_ANY(tenant), VARSIZE_ANY_EXHDR(tenant),
								   version, CIPHER_USE_DETERMINISTIC);
	result = palloc(VARHDRSZ + len + CIPHER_SIV_OVERHEAD);
	SET_VARSIZE(result, VARHDRSZ + len + CIPHER_SIV_OVERHEAD);
	cs = cipher_encrypt_deterministic(key, version, &binding,
									  (const uint8 *) data, len, (uint8 *) VARDATA(result));
	if (cs != CIPHER_OK)
		raise_cipher_internal(cs);
	return result;
}

Datum
envelope_encrypt_deterministic_text(PG_FUNCTION_ARGS)
{
	text	   *plaintext;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		PG_RETURN_NULL();
	plaintext = PG_GETARG_TEXT_PP(1);
	PG_RETURN_BYTEA_P(encrypt_deterministic_bytes(fcinfo, VARDATA_ANY(plaintext),
												  VARSIZE_ANY_EXHDR(plaintext)));
}

Datum
envelope_encrypt_deterministic_bytea(PG_FUNCTION_ARGS)
{
	bytea	   *plaintext;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		PG_RETURN_NULL();
	plaintext = PG_GETARG_BYTEA_PP(1);
	PG_RETURN_BYTEA_P(encrypt_deterministic_bytes(fcinfo, VARDATA_ANY(plaintext),
												  VARSIZE_ANY_EXHDR(plaintext)));
}

Datum
envelope_blind_index(PG_FUNCTION_ARGS)
{
	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		PG_RETURN_NULL();
	PG_RETURN_BYTEA_P(envelope_blind_index_under(fcinfo, ENVELOPE_EQUALITY_VERSION));
}

/*
 * The blind index of the value in argument 1 for the tenant in argument 0 under
 * equality key `version`, in the versioned layout (version 1: the 32 bytes of 0.1.0).
 */
bytea *
envelope_blind_index_under(FunctionCallInfo fcinfo, uint32 version)
{
	bytea	   *result = palloc(VARHDRSZ + CIPHER_INDEX_VERSIONED_MAX_LEN);

	envelope_blind_index_into(fcinfo, version, result);
	return result;
}

void
envelope_blind_index_into(FunctionCallInfo fcinfo, uint32 version, bytea *result)
{
	text	   *tenant = PG_GETARG_TEXT_PP(0);
	text	   *value = PG_GETARG_TEXT_PP(1);
	CipherBinding binding = make_binding(fcinfo, tenant, 2);
	const CipherKey *key;
	size_t		len;

	key = keycache_key_for_decrypt(VARDATA_ANY(tenant), VARSIZE_ANY_EXHDR(tenant),
								   version, CIPHER_USE_INDEX);
	if (cipher_blind_index_versioned(key, version, &binding,
									 (const uint8 *) VARDATA_ANY(value), VARSIZE_ANY_EXHDR(value),
									 (uint8 *) VARDATA(result), &len) != CIPHER_OK)
		raise_cipher_internal(CIPHER_ERR_INTERNAL);
	SET_VARSIZE(result, VARHDRSZ + len);
}

/* Decrypt a value of either format into a varlena of the same layout as bytea/text. */
static struct varlena *
decrypt_bytes(FunctionCallInfo fcinfo)
{
	text	   *tenant = PG_GETARG_TEXT_PP(0);
	bytea	   *ciphertext = PG_GETARG_BYTEA_PP(1);
	CipherBinding binding = make_binding(fcinfo, tenant, 2);
	const uint8 *in = (const uint8 *) VARDATA_ANY(ciphertext);
	size_t		in_len = VARSIZE_ANY_EXHDR(ciphertext);
	size_t		out_len;
	uint32		version;
	const CipherKey *key;
	struct varlena *result;
	CipherStatus cs;

	if (cipher_peek_version(in, in_len, &version) != CIPHER_OK ||
		cipher_plaintext_len(in, in_len, &out_len) != CIPHER_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_BINARY_REPRESENTATION),
				 errmsg("value is not a pg_envelope ciphertext"),
				 errdetail("It is too short or has an unknown format byte."),
				 errhidestmt(true)));

	key = keycache_key_for_decrypt(VARDATA_ANY(tenant), VARSIZE_ANY_EXHDR(tenant), version,
								   in[0] == CIPHER_FORMAT_SIV_V1 ?
								   CIPHER_USE_DETERMINISTIC : CIPHER_USE_DECRYPT);
	result = palloc(VARHDRSZ + out_len);
	SET_VARSIZE(result, VARHDRSZ + out_len);
	cs = cipher_decrypt(key, &binding, in, in_len, (uint8 *) VARDATA(result));
	if (cs == CIPHER_ERR_AUTH || cs == CIPHER_ERR_FORMAT)
	{
		pfree(result);
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_BINARY_REPRESENTATION),
				 errmsg("could not decrypt value for tenant \"%.*s\"",
						(int) VARSIZE_ANY_EXHDR(tenant), VARDATA_ANY(tenant)),
				 errdetail("The ciphertext does not authenticate: it was altered, or it belongs to another tenant or context."),
				 errhidestmt(true)));
	}
	if (cs != CIPHER_OK)
		raise_cipher_internal(cs);
	return result;
}

Datum
envelope_decrypt(PG_FUNCTION_ARGS)
{
	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		PG_RETURN_NULL();
	PG_RETURN_BYTEA_P(decrypt_bytes(fcinfo));
}

Datum
envelope_decrypt_text(PG_FUNCTION_ARGS)
{
	struct varlena *result;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		PG_RETURN_NULL();
	result = decrypt_bytes(fcinfo);
	/* A value encrypted from bytea may not be text in this database's encoding. */
	if (!pg_verifymbstr(VARDATA(result), VARSIZE(result) - VARHDRSZ, true))
	{
		explicit_bzero(VARDATA(result), VARSIZE(result) - VARHDRSZ);
		ereport(ERROR,
				(errcode(ERRCODE_CHARACTER_NOT_IN_REPERTOIRE),
				 errmsg("decrypted value is not valid text in encoding \"%s\"",
						GetDatabaseEncodingName()),
				 errhint("Use envelope.decrypt() to get the value as bytea."),
				 errhidestmt(true)));
	}
	PG_RETURN_TEXT_P(result);
}

Datum
envelope_key_version(PG_FUNCTION_ARGS)
{
	bytea	   *ciphertext = PG_GETARG_BYTEA_PP(0);
	uint32		version;

	if (cipher_peek_version((const uint8 *) VARDATA_ANY(ciphertext),
							VARSIZE_ANY_EXHDR(ciphertext), &version) != CIPHER_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_BINARY_REPRESENTATION),
				 errmsg("value is not a pg_envelope ciphertext"),
				 errhidestmt(true)));
	if (version > PG_INT32_MAX)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_BINARY_REPRESENTATION),
				 errmsg("value is not a pg_envelope ciphertext"),
				 errdetail("Its key version is out of range."),
				 errhidestmt(true)));
	PG_RETURN_INT32((int32) version);
}

Datum
envelope_active_key_version(PG_FUNCTION_ARGS)
{
	text	   *tenant = PG_GETARG_TEXT_PP(0);

	uint32		version = keycache_active_version(VARDATA_ANY(tenant), VARSIZE_ANY_EXHDR(tenant));

	if (version == 0)
		PG_RETURN_NULL();		/* disabled or destroyed: no version for new values */
	PG_RETURN_INT32((int32) version);
}

/* ---------------------------------------------------------------------------
 * Key management
 */
char *
envelope_tenant_arg(FunctionCallInfo fcinfo, int argno)
{
	text	   *t;

	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("tenant name must not be null")));
	t = PG_GETARG_TEXT_PP(argno);
	envelope_check_tenant(VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t));
	return text_to_cstring(t);
}

/* The tenant's row, locked against concurrent key management; errors if absent. */
TenantRecord
envelope_lock_tenant(const char *tenant)
{
	TenantRecord rec;

	if (!keystore_get_tenant(tenant, true, &rec))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("tenant \"%s\" does not exist", tenant)));
	if (rec.state == TENANT_DESTROYED)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("tenant \"%s\" has been destroyed", tenant)));
	return rec;
}

/*
 * Ask the KMS for DEK `version` of `tenant`, store it with `store` (which returns the
 * tenant id), and have the plaintext DEK put in the shared cache when the transaction
 * commits (keycache_prime keeps its own copy); this one is wiped on every path.
 */
typedef int32 (*StoreNewKey) (const char *tenant, int32 version, const char *provider,
							  const char *tenant_kms_key, const char *key_arn,
							  const bytea *wrapped, int32 tenant_id);

static void
new_data_key(const char *tenant, int32 version, const char *provider, const char *kms_key,
			 int32 tenant_id, StoreNewKey store)
{
	uint8		dek[KMS_DEK_LEN];
	bytea	   *wrapped;
	char	   *key_arn;
	uint64		epoch = keycache_new_key_epoch();

	PG_TRY();
	{
		envelope_kms_generate(provider, kms_key, tenant, (uint32) version, dek, &wrapped, &key_arn);
		tenant_id = store(tenant, version, provider, kms_key, key_arn, wrapped, tenant_id);
		encryption_count_add_key(tenant_id, (uint32) version);
		keycache_prime(tenant, tenant_id, (uint32) version, provider, key_arn, wrapped, dek,
					   epoch);
	}
	PG_FINALLY();
	{
		explicit_bzero(dek, sizeof(dek));
	}
	PG_END_TRY();
}

static int32
store_first_key(const char *tenant, int32 version, const char *provider,
				const char *tenant_kms_key, const char *key_arn, const bytea *wrapped,
				int32 tenant_id)
{
	return keystore_create_tenant(tenant, provider,
								  tenant_kms_key[0] ? tenant_kms_key : key_arn,
								  key_arn, wrapped);
}

static int32
store_next_key(const char *tenant, int32 version, const char *provider,
			   const char *tenant_kms_key, const char *key_arn, const bytea *wrapped,
			   int32 tenant_id)
{
	keystore_add_version(tenant, version, provider, key_arn, wrapped);
	return tenant_id;
}

Datum
envelope_create_tenant(PG_FUNCTION_ARGS)
{
	char	   *tenant = envelope_tenant_arg(fcinfo, 0);
	const char *provider = envelope_kms_provider;
	const char *kms_key = PG_ARGISNULL(1) ? envelope_kms_key : text_to_cstring(PG_GETARG_TEXT_PP(1));
	TenantRecord existing;

	tenant_name_check_new(tenant, strlen(tenant));
	/*
	 * One creation of a name at a time: a concurrent creator waits here until the
	 * first commits, then finds the tenant below (the key store is read at the latest
	 * snapshot) and fails with 42710, before any KMS call.
	 */
	tenant_name_lock_for_create(tenant, strlen(tenant));
	/* The setting's check hook admits only registered providers. */
	if (strcmp(provider, "local") != 0 && (kms_key == NULL || kms_key[0] == '\0'))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("no master key given for tenant \"%s\"", tenant),
				 errhint("Pass kms_key to envelope.create_tenant() or set envelope.kms_key.")));
	if (keystore_get_tenant(tenant, false, &existing))
		ereport(ERROR,
				(errcode(ERRCODE_DUPLICATE_OBJECT),
				 errmsg("tenant \"%s\" already exists", tenant)));

	/* A concurrent create of the same name fails on the primary key when storing. */
	new_data_key(tenant, 1, provider, kms_key, 0, store_first_key);
	audit_log_key_action("create", tenant, 1, kms_key, NULL);
	PG_RETURN_INT32(1);
}

Datum
envelope_rotate_tenant_key(PG_FUNCTION_ARGS)
{
	char	   *tenant = envelope_tenant_arg(fcinfo, 0);
	TenantRecord rec = envelope_lock_tenant(tenant);
	int32		version;

	if (rec.state != TENANT_ACTIVE)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("tenant \"%s\" is disabled", tenant),
				 errhint("Enable it before rotating its key.")));
	version = keystore_max_version(tenant) + 1;
	new_data_key(tenant, version, rec.kms_provider, rec.kms_key, rec.tenant_id, store_next_key);
	audit_log_key_action("rotate", tenant, version, rec.kms_key, NULL);
	PG_RETURN_INT32(version);
}

Datum
envelope_disable_tenant(PG_FUNCTION_ARGS)
{
	char	   *tenant = envelope_tenant_arg(fcinfo, 0);

	(void) envelope_lock_tenant(tenant);
	keystore_set_tenant_state(tenant, TENANT_DISABLED);
	audit_log_key_action("disable", tenant, 0, NULL, NULL);
	PG_RETURN_VOID();
}

Datum
envelope_enable_tenant(PG_FUNCTION_ARGS)
{
	char	   *tenant = envelope_tenant_arg(fcinfo, 0);

	(void) envelope_lock_tenant(tenant);
	keystore_set_tenant_state(tenant, TENANT_ACTIVE);
	audit_log_key_action("enable", tenant, 0, NULL, NULL);
	PG_RETURN_VOID();
}

Datum
envelope_retire_key_version(PG_FUNCTION_ARGS)
{
	char	   *tenant = envelope_tenant_arg(fcinfo, 0);
	int32		version = PG_GETARG_INT32(1);
	TenantRecord rec = envelope_lock_tenant(tenant);
	DataKeyRecord key;

	if (!keystore_get_data_key(tenant, version, &key))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("key version %d of tenant \"%s\" does not exist", version, tenant)));
	if (version == rec.active_version)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("cannot retire key version %d of tenant \"%s\": it is the active version",
						version, tenant),
				 errhint("Rotate the key with envelope.rotate_tenant_key() first.")));
	keystore_set_key_state(tenant, version, KEY_RETIRED);
	keycache_schedule_purge(rec.tenant_id, (uint32) version);
	PG_RETURN_VOID();
}

Datum
envelope_destroy_tenant(PG_FUNCTION_ARGS)
{
	char	   *tenant = envelope_tenant_arg(fcinfo, 0);
	TenantRecord rec = envelope_lock_tenant(tenant);

	keystore_destroy_tenant(tenant);
	keycache_schedule_purge(rec.tenant_id, 0);
	PG_RETURN_VOID();
}

/*
 * Move stored DEKs under another master key with the KMS's ReEncrypt: the DEKs (and so
 * every stored value) stay the same, only their wrapping changes, and the plaintext DEK
 * never leaves the KMS.  The tenants' master key for new DEKs becomes `new_kms_key` too.
 * Returns how many DEKs changed master key; running it again moves nothing more, so an
 * interrupted run is simply run again (per tenant, for large estates).
 */
Datum
envelope_rewrap(PG_FUNCTION_ARGS)
{
	char	   *new_kms_key;
	char	   *only_tenant = NULL;
	char	   *dest_arn = NULL;
	List	   *keys;
	ListCell   *lc;
	int64		moved = 0;
	char	   *last_tenant = NULL;

	if (PG_ARGISNULL(0) || VARSIZE_ANY_EXHDR(PG_GETARG_TEXT_PP(0)) == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("new master key must not be empty")));
	new_kms_key = text_to_cstring(PG_GETARG_TEXT_PP(0));
	if (!PG_ARGISNULL(1))
	{
		only_tenant = envelope_tenant_arg(fcinfo, 1);
		(void) envelope_lock_tenant(only_tenant);
	}

	keys = keystore_lock_keys_for_rewrap(only_tenant);
	foreach(lc, keys)
	{
		StoredKey  *key = lfirst(lc);
		bytea	   *new_wrapped;
		char	   *arn;

		CHECK_FOR_INTERRUPTS();
		/* Already there: nothing to do (an alias is only known after one call). */
		if (strcmp(key->kms_key, new_kms_key) == 0 ||
			(dest_arn != NULL && strcmp(key->kms_key, dest_arn) == 0))
			continue;
		new_wrapped = envelope_kms_reencrypt(key->kms_provider, key->kms_key, new_kms_key,
											 key->tenant, (uint32) key->version,
											 key->wrapped, &arn);
		dest_arn = arn;
		if (strcmp(arn, key->kms_key) != 0)
		{
			keystore_set_wrapping(key->tenant, key->version, arn, new_wrapped);
			audit_log_key_action("rewrap", key->tenant, key->version, arn, NULL);
			moved++;
		}
		if (last_tenant == NULL || strcmp(last_tenant, key->tenant) != 0)
		{
			keystore_set_tenant_kms_key(key->tenant, new_kms_key);
			last_tenant = key->tenant;
		}
	}
	if (only_tenant != NULL)
		keystore_set_tenant_kms_key(only_tenant, new_kms_key);
	PG_RETURN_INT64(moved);
}

Datum
envelope_cache_flush(PG_FUNCTION_ARGS)
{
	keycache_flush();
	PG_RETURN_VOID();
}

/*
 * The columns of envelope.cache_stats: the first twelve are those of 0.1.0
 * (envelope_cache_stats); envelope_cache_stats_v2 adds tenant_entries,
 * evicted_reloads, hint and graced_loads, and envelope_cache_stats_v3 (0.2.0's) the
 * progress of envelope.cache_prewarm: prewarm_state, prewarm_total, prewarm_loaded,
 * prewarm_failed.
 */
#define CACHE_STATS_COLUMNS_V1 12
#define CACHE_STATS_COLUMNS_V2 16
#define CACHE_STATS_COLUMNS_V3 20

static Datum
cache_stats_row(FunctionCallInfo fcinfo, int ncolumns)
{
	TupleDesc	tupdesc;
	KeyCacheStats s;
	KmsCallStats k;
	Datum		values[CACHE_STATS_COLUMNS_V3];
	bool		nulls[CACHE_STATS_COLUMNS_V3] = {0};
	int64		calls;

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	if (tupdesc->natts != ncolumns)
		elog(ERROR, "envelope.cache_stats() returns %d columns, expected %d",
			 tupdesc->natts, ncolumns);
	keycache_get_stats(&s);
	kms_glue_get_stats(&k);
	calls = k.calls[ENVELOPE_KMS_GENERATE] + k.calls[ENVELOPE_KMS_DECRYPT] +
		k.calls[ENVELOPE_KMS_REENCRYPT];
	values[0] = Int64GetDatum(s.capacity);
	values[1] = Int64GetDatum(s.entries);
	values[2] = Int64GetDatum(s.hits);
	values[3] = Int64GetDatum(s.misses);
	values[4] = Int64GetDatum(s.evictions);
	values[5] = Int64GetDatum(k.calls[ENVELOPE_KMS_GENERATE]);
	values[6] = Int64GetDatum(k.calls[ENVELOPE_KMS_DECRYPT]);
	values[7] = Int64GetDatum(k.calls[ENVELOPE_KMS_REENCRYPT]);
	values[8] = Int64GetDatum(k.errors);
	values[9] = Float8GetDatum(calls > 0 ? k.total_ms / calls : 0.0);
	values[10] = Float8GetDatum(k.max_ms);
	values[11] = BoolGetDatum(s.shared);
	if (ncolumns > CACHE_STATS_COLUMNS_V1)
	{
		values[12] = Int64GetDatum(s.tenant_entries);
		values[13] = Int64GetDatum(s.evicted_reloads);
		if (s.shared && s.evicted_reloads > 0)
			values[14] = CStringGetTextDatum(psprintf("%lld keys were unwrapped again within envelope.cache_ttl of their eviction: the keys in use do not fit in envelope.cache_size (%lld). Raise envelope.cache_size.",
													  (long long) s.evicted_reloads,
													  (long long) s.capacity));
		else
			nulls[14] = true;
		values[15] = Int64GetDatum(s.graced_loads);
	}
	if (ncolumns > CACHE_STATS_COLUMNS_V2)
	{
		PrewarmProgress p;

		prewarm_get_progress(&p);
		values[16] = CStringGetTextDatum(prewarm_state_name(p.state));
		values[17] = Int64GetDatum(p.total);
		values[18] = Int64GetDatum(p.loaded);
		values[19] = Int64GetDatum(p.failed);
	}
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

/* envelope.cache_stats() of 0.1.0. */
Datum
envelope_cache_stats(PG_FUNCTION_ARGS)
{
	return cache_stats_row(fcinfo, CACHE_STATS_COLUMNS_V1);
}

/* envelope.cache_stats() before the prewarm columns. */
Datum
envelope_cache_stats_v2(PG_FUNCTION_ARGS)
{
	return cache_stats_row(fcinfo, CACHE_STATS_COLUMNS_V2);
}

/* envelope.cache_stats() of 0.2.0. */
Datum
envelope_cache_stats_v3(PG_FUNCTION_ARGS)
{
	return cache_stats_row(fcinfo, CACHE_STATS_COLUMNS_V3);
}

/*
 * Statement trigger on the key store tables: whatever changed, every backend must
 * re-read states once this transaction commits.  The relcache invalidation is sent at
 * commit and written to WAL, which is how hot standbys learn of it.
 */
Datum
envelope_key_store_changed(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;

	if (!CALLED_AS_TRIGGER(fcinfo))
		elog(ERROR, "envelope_key_store_changed: not called by trigger manager");
	if (citus_is_key_table_placement(trigdata->tg_relation))
	{
		/* Citus may commit this change with PREPARE: see citus_support.c. */
		citus_invalidate_key_tables();
		return PointerGetDatum(NULL);
	}
	CacheInvalidateRelcacheByRelid(RelationGetRelid(trigdata->tg_relation));
	keycache_note_key_store_change();
	return PointerGetDatum(NULL);
}
