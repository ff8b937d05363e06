/*
 * lifecycle_sql.c — the guarded key lifecycle of 0.2.0: retire_key_version with its
 * check of stored values, reactivate_key_version, and destroy_tenant with a
 * confirmation.
 *
 * 0.1.0's SQL still names envelope_retire_key_version and envelope_destroy_tenant
 * (src/envelope_sql.c), so those symbols keep their behaviour; the functions here wrap
 * them, add the guards, and write the audit rows.
 */
#include "pg_envelope.h"

#include "executor/spi.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/json.h"

#include "audit.h"

PG_FUNCTION_INFO_V1(envelope_retire_key_version_guarded);
PG_FUNCTION_INFO_V1(envelope_reactivate_key_version);
PG_FUNCTION_INFO_V1(envelope_destroy_tenant_confirmed);

/* 0.1.0's entry points (src/envelope_sql.c). */
extern Datum envelope_retire_key_version(PG_FUNCTION_ARGS);
extern Datum envelope_destroy_tenant(PG_FUNCTION_ARGS);

static void
require_argument(FunctionCallInfo fcinfo, int argno, const char *name)
{
	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be null", name)));
}

/*
 * Values stored under DEK `version` of `tenant`, counted now in every registered
 * column (never from a stale usage count).  Runs as the caller, who must be able to
 * read the registered tables.  `columns` receives a JSON object of the columns that
 * hold any, with their counts.  A registered column whose tenant column is gone cannot
 * be attributed, so every value under `version` in it is counted: it might be this
 * tenant's.  Values that are not ciphertexts are never counted.
 */
static int64
count_values_under_version(const char *tenant, int32 version, StringInfo columns)
{
	Oid			argtypes[2] = {TEXTOID, INT4OID};
	Datum		values[2] = {CStringGetTextDatum(tenant), Int32GetDatum(version)};
	int64		total = 0;
	uint64		ncolumns;
	SPITupleTable *registered;

	appendStringInfoChar(columns, '{');
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	/*
	 * Per column, a query counting the values: scan_key_usage over the table (or the
	 * leaves of a partitioned one) when the tenant column exists, else every value
	 * under the version whoever its tenant, the header read inside a CASE so that a
	 * value too short to be a ciphertext is never given to key_version.
	 */
	if (SPI_execute("SELECT CASE WHEN e.tenant_column IS NOT NULL THEN pg_catalog.format("
					"  'SELECT COALESCE(pg_catalog.sum(u.value_count), 0)::bigint"
					"     FROM (SELECT %L::pg_catalog.regclass AS relid"
					"           UNION SELECT t.relid FROM pg_catalog.pg_partition_tree(%L) t WHERE t.isleaf) p"
					"     JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) p.relid AND c.relkind OPERATOR(pg_catalog.=) ''r'',"
					"          LATERAL envelope.scan_key_usage(p.relid, %L, %L) u"
					"    WHERE u.tenant OPERATOR(pg_catalog.=) $1 AND u.version OPERATOR(pg_catalog.=) $2',"
					"  e.relation, e.relation, e.column_name, e.tenant_column)"
					" ELSE pg_catalog.format("
					"  'SELECT pg_catalog.count(*) FROM %s t WHERE CASE"
					"     WHEN pg_catalog.octet_length(t.%I) OPERATOR(pg_catalog.<) 22 THEN NULL"
					"     WHEN pg_catalog.get_byte(t.%I, 0) OPERATOR(pg_catalog.=) 1"
					"      AND pg_catalog.octet_length(t.%I) OPERATOR(pg_catalog.>=) 33 THEN envelope.key_version(t.%I)"
					"     WHEN pg_catalog.get_byte(t.%I, 0) OPERATOR(pg_catalog.=) 2"
					"      AND pg_catalog.octet_length(t.%I) OPERATOR(pg_catalog.>=) 22 THEN envelope.key_version(t.%I)"
					"     END OPERATOR(pg_catalog.=) $2 AND $1 IS NOT NULL',"
					"  e.relation, e.column_name, e.column_name, e.column_name, e.column_name, e.column_name,"
					"  e.column_name, e.column_name) END,"
					"  pg_catalog.format('%s.%I', e.relation, e.column_name),"
					"  pg_catalog.has_column_privilege(e.relation, e.column_name, 'SELECT')"
					"  AND (e.tenant_column IS NULL"
					"       OR pg_catalog.has_column_privilege(e.relation, e.tenant_column, 'SELECT'))"
					"  FROM envelope.encrypted_columns e ORDER BY 2",
					true, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not list registered columns");
	registered = SPI_tuptable;
	ncolumns = SPI_processed;
	for (uint64 i = 0; i < ncolumns; i++)
	{
		char	   *query = SPI_getvalue(registered->vals[i], registered->tupdesc, 1);
		char	   *name = SPI_getvalue(registered->vals[i], registered->tupdesc, 2);
		bool		isnull;
		int64		n;

		CHECK_FOR_INTERRUPTS();
		if (strcmp(SPI_getvalue(registered->vals[i], registered->tupdesc, 3), "t") != 0)
			ereport(ERROR,
					(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
					 errmsg("cannot count the values of registered column %s", name),
					 errdetail("The current role cannot read it, so it cannot be shown that no value there still uses the key version."),
					 errhint("Grant SELECT on the table to the role that retires keys.")));
		if (SPI_execute_with_args(query, 2, argtypes, values, NULL, true, 0) != SPI_OK_SELECT)
			elog(ERROR, "could not count values in %s", name);
		n = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
		if (n == 0)
			continue;
		if (total > 0)
			appendStringInfoString(columns, ", ");
		escape_json(columns, name);
		appendStringInfo(columns, ": " INT64_FORMAT, n);
		total += n;
	}
	SPI_finish();
	appendStringInfoChar(columns, '}');
	return total;
}

/*
 * envelope.retire_key_version(tenant, version, force): retire a DEK version, unless a
 * registered column still holds values under it.  The retirement itself is 0.1.0's;
 * the values are counted after it, inside the same transaction, so an error undoes it.
 */
Datum
envelope_retire_key_version_guarded(PG_FUNCTION_ARGS)
{
	char	   *tenant = envelope_tenant_arg(fcinfo, 0);
	int32		version;
	bool		force;
	StringInfoData columns;
	StringInfoData detail;
	int64		remaining;

	require_argument(fcinfo, 1, "key version");
	require_argument(fcinfo, 2, "force");
	version = PG_GETARG_INT32(1);
	force = PG_GETARG_BOOL(2);

	(void) DirectFunctionCall2(envelope_retire_key_version,
							   PointerGetDatum(PG_GETARG_TEXT_PP(0)), Int32GetDatum(version));

	initStringInfo(&columns);
	remaining = count_values_under_version(tenant, version, &columns);
	if (remaining > 0 && !force)
		ereport(ERROR,
				(errcode(ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST),
				 errmsg("cannot retire key version %d of tenant \"%s\": " INT64_FORMAT " stored values still use it",
						version, tenant, remaining),
				 errdetail("Values per registered column: %s.", columns.data),
				 errhint("Re-encrypt them onto the active version first (envelope.reencrypt_all() or envelope.reencrypt()), or pass force => true to retire it anyway and leave those values unreadable.")));
	if (remaining > 0)
		ereport(WARNING,
				(errmsg("retired key version %d of tenant \"%s\" with " INT64_FORMAT " stored values still under it",
						version, tenant, remaining),
				 errdetail("Values per registered column: %s.", columns.data),
				 errhint("Those values cannot be decrypted until envelope.reactivate_key_version() is run.")));

	initStringInfo(&detail);
	appendStringInfo(&detail, "{\"force\": %s, \"remaining_values\": " INT64_FORMAT ", \"columns\": %s}",
					 force ? "true" : "false", remaining, columns.data);
	audit_log_key_action("retire", tenant, version, NULL,
						 detail.data);
	PG_RETURN_VOID();
}

/*
 * envelope.reactivate_key_version(tenant, version): undo a retirement.  Only a retired
 * version comes back; a destroyed one has no wrapped DEK left to come back with.
 */
Datum
envelope_reactivate_key_version(PG_FUNCTION_ARGS)
{
	char	   *tenant = envelope_tenant_arg(fcinfo, 0);
	int32		version;
	DataKeyRecord key;

	require_argument(fcinfo, 1, "key version");
	version = PG_GETARG_INT32(1);
	(void) envelope_lock_tenant(tenant);
	if (!keystore_get_data_key(tenant, version, &key))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("key version %d of tenant \"%s\" does not exist", version, tenant)));
	if (key.state == KEY_DESTROYED || key.wrapped == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("key version %d of tenant \"%s\" has been destroyed", version, tenant),
				 errdetail("Its wrapped data key is gone, so it cannot be reactivated.")));
	if (key.state != KEY_RETIRED)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("key version %d of tenant \"%s\" is not retired", version, tenant)));
	keystore_set_key_state(tenant, version, KEY_ACTIVE);
	audit_log_key_action("reactivate", tenant, version, key.kms_key, NULL);
	PG_RETURN_VOID();
}

/*
 * envelope.destroy_tenant(tenant, confirm): crypto-shred a tenant, only when `confirm`
 * repeats its name, so a slip of the finger or a wrong variable in a script cannot.
 */
Datum
envelope_destroy_tenant_confirmed(PG_FUNCTION_ARGS)
{
	char	   *tenant = envelope_tenant_arg(fcinfo, 0);
	TenantRecord rec;
	int32		max_version;
	int32	   *versions;

	if (PG_ARGISNULL(1) || strcmp(text_to_cstring(PG_GETARG_TEXT_PP(1)), tenant) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("destroy_tenant was not confirmed"),
				 errdetail("Destroying a tenant erases its data keys: every value stored for it becomes unreadable for good."),
				 errhint("Pass the tenant's name again as confirm: envelope.destroy_tenant(%s, %s).",
						 quote_literal_cstr(tenant), quote_literal_cstr(tenant))));
	rec = envelope_lock_tenant(tenant);
	max_version = keystore_max_version(tenant);
	(void) DirectFunctionCall1(envelope_destroy_tenant, PointerGetDatum(PG_GETARG_TEXT_PP(0)));

	versions = palloc(sizeof(int32) * Max(max_version, 1));
	for (int32 v = 1; v <= max_version; v++)
		versions[v - 1] = v;
	audit_log_action("destroy", tenant, versions, max_version, rec.kms_key, NULL);
	PG_RETURN_VOID();
}
