/*
 * equality_sql.c — versioned equality keys: the SQL functions of 0.2.0 that make
 * deterministic values and blind indexes, and the rotation of the key they use.
 *
 * An equality key version is a DEK version of the tenant: its deterministic values
 * and blind indexes are made with the HKDF subkeys of that DEK (cipher.c), so no new
 * key material is stored and the KMS wraps it like any DEK.  The tenant's current
 * equality version is envelope.tenant.equality_version (1 for every tenant that
 * existed before 0.2.0, which is what 0.1.0 always used, so their values and indexes
 * keep matching).  The live equality versions are the tenant's active DEK versions up
 * to the current one: a retired or destroyed version no longer decrypts, nor matches.
 *
 * The row path reads the tenant's equality versions from a per-backend cache, checked
 * against the key cache's generation (which moves on any committed key store change,
 * and on this transaction's own), so a rotation committed anywhere is seen by the
 * next row, and costs one key store read per tenant after it.
 */
#include "pg_envelope.h"

#include "catalog/pg_type.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/hsearch.h"
#include "utils/memutils.h"

#include "audit.h"

PG_FUNCTION_INFO_V1(envelope_encrypt_deterministic_text_v2);
PG_FUNCTION_INFO_V1(envelope_encrypt_deterministic_bytea_v2);
PG_FUNCTION_INFO_V1(envelope_blind_index_v2);
PG_FUNCTION_INFO_V1(envelope_blind_index_all);
PG_FUNCTION_INFO_V1(envelope_encrypt_deterministic_all_text);
PG_FUNCTION_INFO_V1(envelope_encrypt_deterministic_all_bytea);
PG_FUNCTION_INFO_V1(envelope_equality_key_version);
PG_FUNCTION_INFO_V1(envelope_rotate_equality_key);

extern Datum envelope_rotate_tenant_key(PG_FUNCTION_ARGS);

/* ---------------------------------------------------------------------------
 * Per-backend cache of equality versions
 */
typedef struct EqualityVersions
{
	char		name[ENVELOPE_TENANT_MAX + 1];	/* hash key */
	uint64		generation;		/* keycache_generation() when read */
	bool		reusable;		/* false: read after this transaction changed the key store */
	uint32		current;		/* the version new values use */
	int			nlive;			/* live versions, newest first (current first) */
	uint32	   *live;			/* in equality_cxt */
} EqualityVersions;

/* Beyond this many tenants the cache is emptied and refilled as rows come. */
#define EQUALITY_CACHE_MAX 8192

static HTAB *equality_cache = NULL;
static MemoryContext equality_cxt = NULL;

/*
 * In front of the hash table, as in the key cache (keycache.c): a direct-mapped array
 * indexed by a hash of the tenant's bytes, so rows that switch tenant every row find
 * theirs with one short hash and one compare, without copying the name into a
 * 256-byte key and hashing and comparing it as a string.  Cleared with the table.
 */
#define EQUALITY_FRONT_SIZE 4096

typedef struct EqualityFrontSlot
{
	EqualityVersions *ev;
	uint32		name_len;
} EqualityFrontSlot;

static EqualityFrontSlot equality_front[EQUALITY_FRONT_SIZE];

/* FNV-1a: tenant names are short, and this runs per row. */
static inline uint32
equality_front_index(const char *tenant, size_t tenant_len)
{
	uint32		h = 2166136261u;

	for (size_t i = 0; i < tenant_len; i++)
		h = (h ^ (unsigned char) tenant[i]) * 16777619u;
	return (h ^ (h >> 16)) & (EQUALITY_FRONT_SIZE - 1);
}

static void
equality_cache_reset(void)
{
	HASHCTL		ctl;

	if (equality_cxt == NULL)
		equality_cxt = AllocSetContextCreate(TopMemoryContext, "pg_envelope equality versions",
											 ALLOCSET_SMALL_SIZES);
	else
		MemoryContextReset(equality_cxt);
	memset(equality_front, 0, sizeof(equality_front));
	ctl.keysize = ENVELOPE_TENANT_MAX + 1;
	ctl.entrysize = sizeof(EqualityVersions);
	ctl.hcxt = equality_cxt;
	equality_cache = hash_create("pg_envelope equality versions", 256, &ctl,
								 HASH_ELEM | HASH_STRINGS | HASH_CONTEXT);
}

/*
 * The tenant's equality versions, current at this row; raises an error if the tenant
 * does not exist.  Its current version may not be live (see equality_versions).
 */
static const EqualityVersions *
equality_lookup(const char *tenant, size_t tenant_len)
{
	char		key[ENVELOPE_TENANT_MAX + 1];
	uint64		generation = keycache_generation();
	EqualityFrontSlot *front = &equality_front[equality_front_index(tenant, tenant_len)];
	EqualityVersions *ev;
	bool		found;
	int32		current;
	int32	   *live;
	int			nlive;

	/* The hot path: a name in the cache was checked when it entered. */
	ev = front->ev;
	if (ev != NULL && front->name_len == tenant_len && ev->reusable &&
		ev->generation == generation && memcmp(ev->name, tenant, tenant_len) == 0)
		return ev;

	envelope_check_tenant(tenant, tenant_len);
	memcpy(key, tenant, tenant_len);
	key[tenant_len] = '\0';
	if (equality_cache == NULL)
		equality_cache_reset();
	ev = hash_search(equality_cache, key, HASH_FIND, NULL);
	if (ev != NULL && ev->reusable && ev->generation == generation)
	{
		front->ev = ev;
		front->name_len = (uint32) tenant_len;
		return ev;
	}

	/* SPI may process invalidations, which never touch this cache: ev stays valid. */
	if (!keystore_read_equality(key, &current, &live, &nlive))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("tenant \"%s\" does not exist", key),
				 errhint("An envelope_admin can create it with envelope.create_tenant()."),
				 errhidestmt(true)));

	if (ev == NULL)
	{
		if (hash_get_num_entries(equality_cache) >= EQUALITY_CACHE_MAX)
			equality_cache_reset();
		ev = hash_search(equality_cache, key, HASH_ENTER, &found);
		ev->live = NULL;
	}
	if (ev->live != NULL)
		pfree(ev->live);
	ev->live = MemoryContextAlloc(equality_cxt, sizeof(uint32) * nlive);
	for (int i = 0; i < nlive; i++)
		ev->live[i] = (uint32) live[i];
	ev->nlive = nlive;
	ev->current = (uint32) current;
	/* What this transaction changed may roll back: read it again next row. */
	ev->generation = generation;
	ev->reusable = !keycache_key_store_changed_here();
	pfree(live);
	/* The table may have been emptied above: the slot is set after. */
	front = &equality_front[equality_front_index(tenant, tenant_len)];
	front->ev = ev;
	front->name_len = (uint32) tenant_len;
	return ev;
}

static bool
current_is_live(const EqualityVersions *ev)
{
	return ev->nlive > 0 && ev->live[0] == ev->current;
}

/*
 * The tenant's equality versions, current at this row.  Raises an error if the tenant
 * does not exist, or if its current equality version is not live (retired or
 * destroyed): no new token can be made then.
 */
static const EqualityVersions *
equality_versions(const char *tenant, size_t tenant_len)
{
	const EqualityVersions *ev = equality_lookup(tenant, tenant_len);

	if (current_is_live(ev))
		return ev;
	/* A disabled or destroyed tenant: say that, as every other function does. */
	if (keycache_active_version(tenant, tenant_len) == 0)
		(void) keycache_key_for_encrypt(tenant, tenant_len);
	ereport(ERROR,
			(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
			 errmsg("equality key version %u of tenant \"%.*s\" is not active",
					ev->current, (int) tenant_len, tenant),
			 errdetail("Deterministic values and blind indexes are made with the equality key version, and it has been retired or destroyed."),
			 errhint("Reactivate it with envelope.reactivate_key_version(), or make a new one with envelope.rotate_equality_key()."),
			 errhidestmt(true)));
	return ev;					/* not reached */
}

bool
equality_current_version(const char *tenant, size_t tenant_len, uint32 *version)
{
	const EqualityVersions *ev = equality_lookup(tenant, tenant_len);

	*version = ev->current;
	return current_is_live(ev);
}

/* ---------------------------------------------------------------------------
 * Deterministic values and blind indexes
 */
static bytea *
encrypt_deterministic_current(FunctionCallInfo fcinfo, const char *data, size_t len)
{
	text	   *tenant = PG_GETARG_TEXT_PP(0);
	const EqualityVersions *ev = equality_versions(VARDATA_ANY(tenant), VARSIZE_ANY_EXHDR(tenant));

	return envelope_encrypt_deterministic_under(fcinfo, ev->current, data, len);
}

/* envelope.encrypt_deterministic(tenant, text, context) of 0.2.0. */
Datum
envelope_encrypt_deterministic_text_v2(PG_FUNCTION_ARGS)
{
	text	   *plaintext;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		PG_RETURN_NULL();
	plaintext = PG_GETARG_TEXT_PP(1);
	PG_RETURN_BYTEA_P(encrypt_deterministic_current(fcinfo, VARDATA_ANY(plaintext),
													VARSIZE_ANY_EXHDR(plaintext)));
}

/* envelope.encrypt_deterministic(tenant, bytea, context) of 0.2.0. */
Datum
envelope_encrypt_deterministic_bytea_v2(PG_FUNCTION_ARGS)
{
	bytea	   *plaintext;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		PG_RETURN_NULL();
	plaintext = PG_GETARG_BYTEA_PP(1);
	PG_RETURN_BYTEA_P(encrypt_deterministic_current(fcinfo, VARDATA_ANY(plaintext),
													VARSIZE_ANY_EXHDR(plaintext)));
}

/* envelope.blind_index(tenant, value) of 0.2.0: under the current equality version. */
Datum
envelope_blind_index_v2(PG_FUNCTION_ARGS)
{
	text	   *tenant;
	const EqualityVersions *ev;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		PG_RETURN_NULL();
	tenant = PG_GETARG_TEXT_PP(0);
	ev = equality_versions(VARDATA_ANY(tenant), VARSIZE_ANY_EXHDR(tenant));
	PG_RETURN_BYTEA_P(envelope_blind_index_under(fcinfo, ev->current));
}

static Datum
bytea_array(Datum *elems, int n)
{
	return PointerGetDatum(construct_array(elems, n, BYTEAOID, -1, false, TYPALIGN_INT));
}

/*
 * envelope.blind_index_all(tenant, value): one index per live equality version.  The
 * indexes are written straight into the array (one allocation per row, where
 * construct_array needs one per element and copies them): the array is most of what
 * this costs beyond the HMACs.
 */
Datum
envelope_blind_index_all(PG_FUNCTION_ARGS)
{
	text	   *tenant;
	const EqualityVersions *ev;
	uint32		versions_buf[8];
	uint32	   *versions;
	ArrayType  *result;
	Size		size;
	char	   *pos;
	int			n;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		PG_RETURN_NULL();
	tenant = PG_GETARG_TEXT_PP(0);
	ev = equality_versions(VARDATA_ANY(tenant), VARSIZE_ANY_EXHDR(tenant));
	/* Copy: a key cache miss below may run SPI, and the entry may be refreshed. */
	n = ev->nlive;
	if (n == 0)					/* not reached: the current version is live */
		PG_RETURN_ARRAYTYPE_P(construct_empty_array(BYTEAOID));
	versions = n <= lengthof(versions_buf) ? versions_buf : palloc(sizeof(uint32) * n);
	memcpy(versions, ev->live, sizeof(uint32) * n);

	/* Each element: a bytea of 32 bytes (version 1) or 36, int-aligned. */
	size = ARR_OVERHEAD_NONULLS(1);
	for (int i = 0; i < n; i++)
		size += INTALIGN(VARHDRSZ + (versions[i] >= 2 ? 4 : 0) + CIPHER_INDEX_LEN);
	result = (ArrayType *) palloc0(size);
	SET_VARSIZE(result, size);
	result->ndim = 1;
	result->dataoffset = 0;
	result->elemtype = BYTEAOID;
	ARR_DIMS(result)[0] = n;
	ARR_LBOUND(result)[0] = 1;
	pos = ARR_DATA_PTR(result);
	for (int i = 0; i < n; i++)
	{
		envelope_blind_index_into(fcinfo, versions[i], (bytea *) pos);
		pos += INTALIGN(VARSIZE((bytea *) pos));
	}
	PG_RETURN_ARRAYTYPE_P(result);
}

static Datum
encrypt_deterministic_all(FunctionCallInfo fcinfo, const char *data, size_t len)
{
	text	   *tenant = PG_GETARG_TEXT_PP(0);
	const EqualityVersions *ev = equality_versions(VARDATA_ANY(tenant), VARSIZE_ANY_EXHDR(tenant));
	int			n = ev->nlive;
	uint32	   *versions = palloc(sizeof(uint32) * n);
	Datum	   *elems = palloc(sizeof(Datum) * n);

	memcpy(versions, ev->live, sizeof(uint32) * n);
	for (int i = 0; i < n; i++)
		elems[i] = PointerGetDatum(envelope_encrypt_deterministic_under(fcinfo, versions[i],
																		data, len));
	return bytea_array(elems, n);
}

/* envelope.encrypt_deterministic_all(tenant, text, context). */
Datum
envelope_encrypt_deterministic_all_text(PG_FUNCTION_ARGS)
{
	text	   *plaintext;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		PG_RETURN_NULL();
	plaintext = PG_GETARG_TEXT_PP(1);
	return encrypt_deterministic_all(fcinfo, VARDATA_ANY(plaintext), VARSIZE_ANY_EXHDR(plaintext));
}

/* envelope.encrypt_deterministic_all(tenant, bytea, context). */
Datum
envelope_encrypt_deterministic_all_bytea(PG_FUNCTION_ARGS)
{
	bytea	   *plaintext;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		PG_RETURN_NULL();
	plaintext = PG_GETARG_BYTEA_PP(1);
	return encrypt_deterministic_all(fcinfo, VARDATA_ANY(plaintext), VARSIZE_ANY_EXHDR(plaintext));
}

/* ---------------------------------------------------------------------------
 * Key management
 */
static char *
checked_tenant_arg(FunctionCallInfo fcinfo)
{
	text	   *t;

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("tenant name must not be null")));
	t = PG_GETARG_TEXT_PP(0);
	envelope_check_tenant(VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t));
	return text_to_cstring(t);
}

/* envelope.equality_key_version(tenant): the version new equality values use. */
Datum
envelope_equality_key_version(PG_FUNCTION_ARGS)
{
	char	   *tenant = checked_tenant_arg(fcinfo);
	int32		current;
	int32	   *live;
	int			nlive;

	if (!keystore_read_equality(tenant, &current, &live, &nlive))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("tenant \"%s\" does not exist", tenant)));
	PG_RETURN_INT32(current);
}

/*
 * envelope.rotate_equality_key(tenant): rotate the tenant's DEK (a new version, made
 * by the KMS like any rotation) and make that version the equality key version.  A
 * fresh DEK every time, rather than reusing a newer DEK that already encrypts values:
 * the new equality key was never seen by anything before, and the live equality
 * versions stay those made by this function (plus the versions in between, which
 * never made an equality value and so match nothing).
 */
Datum
envelope_rotate_equality_key(PG_FUNCTION_ARGS)
{
	char	   *tenant = checked_tenant_arg(fcinfo);
	int32		version;

	/* Locks the tenant's row, checks it is active, audits the DEK rotation. */
	version = DatumGetInt32(DirectFunctionCall1(envelope_rotate_tenant_key,
												PointerGetDatum(PG_GETARG_TEXT_PP(0))));
	keystore_set_equality_version(tenant, version);
	audit_log_key_action("rotate_equality_key", tenant, version, NULL, NULL);
	PG_RETURN_INT32(version);
}
