/*
 * audit.c — appends rows to envelope.audit_log.
 *
 * The row must name the role that *called* the key function.  A SECURITY DEFINER
 * function would see its owner as current_user, so the caller is captured here with
 * GetUserId() first, and only then do we switch to the audit table's owner (like the
 * key store does) to insert: callers hold no privilege on the table, and nobody but its
 * owner can write it.  The insert belongs to the caller's transaction, so the rows of a
 * rolled-back action vanish with it.
 */
#include "pg_envelope.h"

#include "access/htup_details.h"
#include "access/parallel.h"
#include "catalog/namespace.h"
#include "catalog/pg_class.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/syscache.h"

#include "audit.h"

PG_FUNCTION_INFO_V1(envelope_audit_record);

/* The audit table, or InvalidOid when this database's pg_envelope predates it. */
static Oid
audit_table_oid(void)
{
	Oid			nsp = get_namespace_oid("envelope", true);

	return OidIsValid(nsp) ? get_relname_relid("audit_log", nsp) : InvalidOid;
}

static Oid
relation_owner(Oid relid)
{
	HeapTuple	tuple = SearchSysCache1(RELOID, ObjectIdGetDatum(relid));
	Oid			owner;

	if (!HeapTupleIsValid(tuple))
		elog(ERROR, "cache lookup failed for relation %u", relid);
	owner = ((Form_pg_class) GETSTRUCT(tuple))->relowner;
	ReleaseSysCache(tuple);
	return owner;
}

static Datum
int4_array_datum(const int32 *versions, int nversions)
{
	Datum	   *elems = palloc(sizeof(Datum) * Max(nversions, 1));

	for (int i = 0; i < nversions; i++)
		elems[i] = Int32GetDatum(versions[i]);
	return PointerGetDatum(construct_array(elems, nversions, INT4OID, sizeof(int32),
										   true, TYPALIGN_INT));
}

static Datum
text_or_null(const char *s, char *null_flag)
{
	*null_flag = s ? ' ' : 'n';
	return s ? CStringGetTextDatum(s) : (Datum) 0;
}

void
audit_log_action(const char *action, const char *tenant, const int32 *versions,
				 int nversions, const char *kms_key, const char *detail_json)
{
	Oid			relid = audit_table_oid();
	Oid			caller = GetUserId();
	Oid			saved_userid;
	int			saved_sec_context;
	int			guc_nest_level;
	Oid			argtypes[7] = {NAMEOID, NAMEOID, TEXTOID, TEXTOID, INT4ARRAYOID, TEXTOID, TEXTOID};
	Datum		values[7];
	char		nulls[8] = "       ";
	int			ret;

	if (!OidIsValid(relid))
		return;
	if (IsInParallelMode())
		elog(ERROR, "key actions cannot be audited in parallel mode");

	values[0] = CStringGetDatum(GetUserNameFromId(GetSessionUserId(), false));
	values[1] = CStringGetDatum(GetUserNameFromId(caller, false));
	values[2] = CStringGetTextDatum(action);
	values[3] = text_or_null(tenant, &nulls[3]);
	values[4] = versions ? int4_array_datum(versions, nversions) : (Datum) 0;
	nulls[4] = versions ? ' ' : 'n';
	values[5] = text_or_null(kms_key && kms_key[0] ? kms_key : NULL, &nulls[5]);
	values[6] = text_or_null(detail_json, &nulls[6]);

	/* The name datums must be NameData, not C strings. */
	values[0] = DirectFunctionCall1(namein, values[0]);
	values[1] = DirectFunctionCall1(namein, values[1]);

	GetUserIdAndSecContext(&saved_userid, &saved_sec_context);
	SetUserIdAndSecContext(relation_owner(relid),
						   saved_sec_context | SECURITY_LOCAL_USERID_CHANGE |
						   SECURITY_RESTRICTED_OPERATION);
	guc_nest_level = NewGUCNestLevel();
	(void) set_config_option("search_path", "pg_catalog, pg_temp",
							 PGC_USERSET, PGC_S_SESSION, GUC_ACTION_SAVE, true, 0, false);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	ret = SPI_execute_with_args("INSERT INTO envelope.audit_log"
								" (\"session_user\", \"current_user\", action, tenant, versions,"
								"  kms_key, detail)"
								" VALUES ($1, $2, $3, $4, $5, $6, $7::pg_catalog.jsonb)",
								7, argtypes, values, nulls, false, 0);
	if (ret != SPI_OK_INSERT)
		elog(ERROR, "SPI_execute failed: %s", SPI_result_code_string(ret));
	SPI_finish();
	/* On error the transaction abort restores the user, context and settings. */
	AtEOXact_GUC(true, guc_nest_level);
	SetUserIdAndSecContext(saved_userid, saved_sec_context);
}

void
audit_log_key_action(const char *action, const char *tenant, int32 version,
					 const char *kms_key, const char *detail_json)
{
	audit_log_action(action, tenant, version > 0 ? &version : NULL, version > 0 ? 1 : 0,
					 kms_key, detail_json);
}

/*
 * envelope.audit_record(action, tenant, versions, kms_key, detail): lets procedures
 * written in SQL (and operators) add their own rows, attributed to their caller.
 */
Datum
envelope_audit_record(PG_FUNCTION_ARGS)
{
	char	   *action;
	char	   *tenant = NULL;
	int32	   *versions = NULL;
	int			nversions = 0;
	char	   *kms_key = NULL;
	char	   *detail = NULL;

	if (PG_ARGISNULL(0) || VARSIZE_ANY_EXHDR(PG_GETARG_TEXT_PP(0)) == 0)
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("audit action must not be null or empty")));
	action = text_to_cstring(PG_GETARG_TEXT_PP(0));
	if (!PG_ARGISNULL(1))
		tenant = text_to_cstring(PG_GETARG_TEXT_PP(1));
	if (!PG_ARGISNULL(2))
	{
		ArrayType  *arr = PG_GETARG_ARRAYTYPE_P(2);
		Datum	   *elems;
		bool	   *elem_nulls;

		if (ARR_NDIM(arr) > 1)
			ereport(ERROR,
					(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
					 errmsg("versions must be a one-dimensional array")));
		deconstruct_array(arr, INT4OID, sizeof(int32), true, TYPALIGN_INT,
						  &elems, &elem_nulls, &nversions);
		versions = palloc(sizeof(int32) * Max(nversions, 1));
		for (int i = 0; i < nversions; i++)
		{
			if (elem_nulls[i])
				ereport(ERROR,
						(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
						 errmsg("versions must not contain nulls")));
			versions[i] = DatumGetInt32(elems[i]);
		}
	}
	if (!PG_ARGISNULL(3))
		kms_key = text_to_cstring(PG_GETARG_TEXT_PP(3));
	if (!PG_ARGISNULL(4))
	{
		Jsonb	   *jb = PG_GETARG_JSONB_P(4);

		detail = JsonbToCString(NULL, &jb->root, VARSIZE(jb));
	}
	if (!OidIsValid(audit_table_oid()))
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("relation \"envelope.audit_log\" does not exist"),
				 errhint("Run ALTER EXTENSION pg_envelope UPDATE.")));
	audit_log_action(action, tenant, versions, nversions, kms_key, detail);
	PG_RETURN_VOID();
}
