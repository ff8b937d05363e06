/*
 * rewrap_sql.c — envelope.rewrap_tenants: what envelope.rewrap does for one tenant,
 * for a list of tenants at once, with their KMS requests in flight together.
 *
 * The batch of envelope.rewrap_keys.  The tenants' rows and DEKs are locked first (in
 * name order, so two batches never deadlock), then every DEK not yet under the new
 * master key goes to the KMS (envelope_kms_reencrypt_many: with the aws provider up
 * to envelope.kms_max_concurrent_requests ReEncrypt requests in flight, other
 * providers one after another), and only when all of them are back are the new
 * wrappings written, in the calling transaction.  A cancel, statement_timeout, an
 * error or a crash before the commit leaves every DEK as it was, under its old master
 * key (ReEncrypt leaves the old wrapping valid), so still readable; after the commit
 * every one is under the new key.
 */
#include "pg_envelope.h"

#include "catalog/pg_type.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"

#include "audit.h"

static int
compare_names(const void *a, const void *b)
{
	return strcmp(*(char *const *) a, *(char *const *) b);
}

/* The tenants of argument `argno`, checked, sorted, without duplicates; *n of them. */
static char **
tenant_list_arg(FunctionCallInfo fcinfo, int argno, int *n)
{
	ArrayType  *array;
	Datum	   *elems;
	bool	   *nulls;
	int			nelems;
	char	  **names;
	int			kept = 0;

	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("tenants must not be null")));
	array = PG_GETARG_ARRAYTYPE_P(argno);
	if (ARR_NDIM(array) > 1)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("tenants must be a one-dimensional array")));
	deconstruct_array(array, TEXTOID, -1, false, TYPALIGN_INT, &elems, &nulls, &nelems);
	names = palloc(Max(nelems, 1) * sizeof(char *));
	for (int i = 0; i < nelems; i++)
	{
		text	   *t;

		if (nulls[i])
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("tenants must not contain NULL")));
		t = DatumGetTextPP(elems[i]);
		envelope_check_tenant(VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t));
		names[i] = text_to_cstring(t);
	}
	qsort(names, nelems, sizeof(char *), compare_names);
	for (int i = 0; i < nelems; i++)
		if (kept == 0 || strcmp(names[i], names[kept - 1]) != 0)
			names[kept++] = names[i];
	*n = kept;
	return names;
}

PG_FUNCTION_INFO_V1(envelope_rewrap_tenants);

/*
 * envelope.rewrap_tenants(new_kms_key, tenants): every stored DEK of the tenants
 * moved under new_kms_key with the KMS's ReEncrypt, and the tenants' master key for
 * new DEKs set to it; returns how many DEKs changed master key.  As envelope.rewrap,
 * one audit row per DEK moved.
 */
Datum
envelope_rewrap_tenants(PG_FUNCTION_ARGS)
{
	char	   *new_kms_key;
	char	  **tenants;
	int			ntenants;
	List	   *keys = NIL;
	ListCell   *lc;
	EnvelopeRewrap *batch;
	int			n = 0;
	int64		moved = 0;

	if (PG_ARGISNULL(0) || VARSIZE_ANY_EXHDR(PG_GETARG_TEXT_PP(0)) == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("new master key must not be empty")));
	new_kms_key = text_to_cstring(PG_GETARG_TEXT_PP(0));
	tenants = tenant_list_arg(fcinfo, 1, &ntenants);

	for (int i = 0; i < ntenants; i++)
	{
		(void) envelope_lock_tenant(tenants[i]);
		keys = list_concat(keys, keystore_lock_keys_for_rewrap(tenants[i]));
	}

	batch = palloc0(Max(list_length(keys), 1) * sizeof(EnvelopeRewrap));
	foreach(lc, keys)
	{
		StoredKey  *key = lfirst(lc);

		if (strcmp(key->kms_key, new_kms_key) == 0)
			continue;			/* already there */
		batch[n].provider = key->kms_provider;
		batch[n].source_key = key->kms_key;
		batch[n].tenant = key->tenant;
		batch[n].version = (uint32) key->version;
		batch[n].wrapped = key->wrapped;
		n++;
	}

	envelope_kms_reencrypt_many(batch, n, new_kms_key);

	for (int i = 0; i < n; i++)
	{
		/* An alias may name the key a DEK is already under: nothing changed then. */
		if (strcmp(batch[i].dest_key_arn, batch[i].source_key) == 0)
			continue;
		keystore_set_wrapping(batch[i].tenant, (int32) batch[i].version,
							  batch[i].dest_key_arn, batch[i].new_wrapped);
		audit_log_key_action("rewrap", batch[i].tenant, (int32) batch[i].version,
							 batch[i].dest_key_arn, NULL);
		moved++;
	}
	for (int i = 0; i < ntenants; i++)
		keystore_set_tenant_kms_key(tenants[i], new_kms_key);
	PG_RETURN_INT64(moved);
}
