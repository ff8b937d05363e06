/*
 * keystore.c — the key store: envelope.tenant and envelope.data_key, through SPI
 * (the key cache's miss path reads them directly: keystore_read.c).
 *
 * Callers of encrypt/decrypt hold no privilege on these tables, so every access here
 * runs as the tables' owner, in a restricted security context and with
 * search_path = pg_catalog, pg_temp, and every query names its operators' schema: a
 * caller cannot make the owner run an object of the caller's choosing.
 *
 * Rows are never updated in place for key material: a new DEK version is a new row.
 * Only states change, and destroy_tenant erases wrapped keys.  A statement trigger on
 * both tables (envelope_key_store_changed) tells every backend's key cache at commit.
 */
#include "pg_envelope.h"
#include "citus_support.h"
#include "keystore_read.h"

#include "access/parallel.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_class.h"
#include "catalog/pg_type.h"
#include "nodes/pg_list.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"

typedef struct KeystoreSession
{
	Oid			saved_userid;
	int			saved_sec_context;
	int			guc_nest_level;
} KeystoreSession;

static Oid	key_store_owner = InvalidOid;
static Oid	tenant_relid = InvalidOid;
static Oid	data_key_relid = InvalidOid;
/* envelope.tenant_grant (0.2.0 and later); InvalidOid in a database still at 0.1.0. */
static Oid	tenant_grant_relid = InvalidOid;

/* Forget what we looked up about the tables (DROP/CREATE EXTENSION may change it). */
void
keystore_forget_relations(void)
{
	key_store_owner = InvalidOid;
	tenant_relid = InvalidOid;
	data_key_relid = InvalidOid;
	tenant_grant_relid = InvalidOid;
	keystore_direct_forget();
}

/*
 * Could an invalidation of `relid` concern the key store?  Until the tables have been
 * looked up in this backend, any relation might be one of them.
 */
bool
keystore_is_key_table(Oid relid)
{
	if (!OidIsValid(tenant_relid) || !OidIsValid(data_key_relid))
		return true;
	return relid == tenant_relid || relid == data_key_relid ||
		(OidIsValid(tenant_grant_relid) && relid == tenant_grant_relid);
}

/*
 * Tenant names are bound into every ciphertext and sent to the KMS as encryption
 * context, and they appear in error messages: keep them printable and bounded.
 */
void
envelope_check_tenant(const char *tenant, size_t len)
{
	if (len == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("tenant name must not be empty"),
				 errhidestmt(true)));
	if (len > ENVELOPE_TENANT_MAX)
		ereport(ERROR,
				(errcode(ERRCODE_NAME_TOO_LONG),
				 errmsg("tenant name is too long"),
				 errdetail("Tenant names are at most %d bytes; this one has %zu.",
						   ENVELOPE_TENANT_MAX, len),
				 errhidestmt(true)));
	for (size_t i = 0; i < len; i++)
	{
		unsigned char c = (unsigned char) tenant[i];

		if (c < 0x20 || c == 0x7f)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("tenant name must not contain control characters"),
					 errhidestmt(true)));
	}
}

static Oid
lookup_key_store_owner(void)
{
	Oid			nsp;
	Oid			relid;
	HeapTuple	tuple;
	Oid			owner;

	nsp = get_namespace_oid("envelope", true);
	relid = OidIsValid(nsp) ? get_relname_relid("data_key", nsp) : InvalidOid;
	tenant_relid = OidIsValid(nsp) ? get_relname_relid("tenant", nsp) : InvalidOid;
	tenant_grant_relid = OidIsValid(nsp) ? get_relname_relid("tenant_grant", nsp) : InvalidOid;
	data_key_relid = relid;
	if (!OidIsValid(relid))
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("extension \"pg_envelope\" is not installed in this database"),
				 errhint("Run CREATE EXTENSION pg_envelope."),
				 errhidestmt(true)));
	tuple = SearchSysCache1(RELOID, ObjectIdGetDatum(relid));
	if (!HeapTupleIsValid(tuple))
		elog(ERROR, "cache lookup failed for relation %u", relid);
	owner = ((Form_pg_class) GETSTRUCT(tuple))->relowner;
	ReleaseSysCache(tuple);
	return owner;
}

static void
keystore_enter(KeystoreSession *session)
{
	if (!OidIsValid(key_store_owner))
		key_store_owner = lookup_key_store_owner();

	GetUserIdAndSecContext(&session->saved_userid, &session->saved_sec_context);
	SetUserIdAndSecContext(key_store_owner,
						   session->saved_sec_context |
						   SECURITY_LOCAL_USERID_CHANGE |
						   SECURITY_RESTRICTED_OPERATION);
	/*
	 * Pin search_path.  Settings cannot change in parallel mode; there the
	 * schema-qualified names of every query (tables, operators, functions) are the
	 * whole defence, and they suffice on their own.
	 */
	session->guc_nest_level = -1;
	if (!IsInParallelMode())
	{
		session->guc_nest_level = NewGUCNestLevel();
		(void) set_config_option("search_path", "pg_catalog, pg_temp",
								 PGC_USERSET, PGC_S_SESSION,
								 GUC_ACTION_SAVE, true, 0, false);
	}
	citus_allow_nested_key_store_reads(&session->guc_nest_level);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
}

/* On error the transaction (or subtransaction) abort restores all of this. */
static void
keystore_leave(KeystoreSession *session)
{
	SPI_finish();
	if (session->guc_nest_level >= 0)
		AtEOXact_GUC(true, session->guc_nest_level);
	SetUserIdAndSecContext(session->saved_userid, session->saved_sec_context);
}

/*
 * Run a read-only query against the latest committed state, not the caller's
 * transaction snapshot: a disable or retire committed a moment ago must stop a
 * REPEATABLE READ transaction that was already running too.  A parallel query may not
 * take new snapshots (leader and workers alike); there the statement's snapshot is
 * used, so revocation takes effect from the next statement.
 */
static void
execute_latest_rows(const char *sql, int nargs, Oid *argtypes, Datum *values, long max_rows);

static void
execute_latest(const char *sql, int nargs, Oid *argtypes, Datum *values)
{
	execute_latest_rows(sql, nargs, argtypes, values, 1);
}

static void
execute_latest_rows(const char *sql, int nargs, Oid *argtypes, Datum *values, long max_rows)
{
	SPIPlanPtr	plan = SPI_prepare(sql, nargs, argtypes);
	Snapshot	snapshot = IsInParallelMode() ? GetActiveSnapshot() : GetLatestSnapshot();
	int			ret;

	if (plan == NULL)
		elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
	ret = SPI_execute_snapshot(plan, values, NULL, snapshot, InvalidSnapshot,
							   true, false, max_rows);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "SPI_execute_snapshot failed: %s", SPI_result_code_string(ret));
	SPI_freeplan(plan);
}

static char *
copy_text_column(HeapTuple tuple, TupleDesc desc, int col, MemoryContext cxt)
{
	bool		isnull;
	Datum		d = SPI_getbinval(tuple, desc, col, &isnull);
	MemoryContext old;
	char	   *s;

	if (isnull)
		return NULL;
	old = MemoryContextSwitchTo(cxt);
	s = TextDatumGetCString(d);
	MemoryContextSwitchTo(old);
	return s;
}

static int32
int_column(HeapTuple tuple, TupleDesc desc, int col)
{
	bool		isnull;
	Datum		d = SPI_getbinval(tuple, desc, col, &isnull);

	return isnull ? 0 : DatumGetInt32(d);
}

static TenantState
tenant_state_from_text(const char *s)
{
	return keystore_tenant_state_of(s, strlen(s));
}

static const char *
tenant_state_text(TenantState state)
{
	switch (state)
	{
		case TENANT_ACTIVE:
			return "active";
		case TENANT_DISABLED:
			return "disabled";
		case TENANT_DESTROYED:
			return "destroyed";
	}
	return "destroyed";
}

static KeyState
key_state_from_text(const char *s)
{
	return keystore_key_state_of(s, strlen(s));
}

static const char *
key_state_text(KeyState state)
{
	switch (state)
	{
		case KEY_ACTIVE:
			return "active";
		case KEY_RETIRED:
			return "retired";
		case KEY_DESTROYED:
			return "destroyed";
	}
	return "destroyed";
}

bool
keystore_get_tenant(const char *tenant, bool for_update, TenantRecord *out)
{
	KeystoreSession session;
	MemoryContext caller_cxt = CurrentMemoryContext;
	Oid			argtypes[1] = {TEXTOID};
	Datum		values[1] = {CStringGetTextDatum(tenant)};
	bool		found = false;
	int			ret;

	keystore_enter(&session);
	if (for_update)
	{
		ret = SPI_execute_with_args("SELECT tenant_id, state, active_version, kms_provider, kms_key"
									"  FROM envelope.tenant WHERE tenant OPERATOR(pg_catalog.=) $1"
									"  FOR UPDATE",
									1, argtypes, values, NULL, false, 1);
		if (ret != SPI_OK_SELECT)
			elog(ERROR, "SPI_execute failed: %s", SPI_result_code_string(ret));
	}
	else
		execute_latest("SELECT tenant_id, state, active_version, kms_provider, kms_key"
					   "  FROM envelope.tenant WHERE tenant OPERATOR(pg_catalog.=) $1",
					   1, argtypes, values);
	if (SPI_processed == 1)
	{
		HeapTuple	tuple = SPI_tuptable->vals[0];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		char	   *state = copy_text_column(tuple, desc, 2, caller_cxt);

		out->tenant_id = int_column(tuple, desc, 1);
		out->state = tenant_state_from_text(state);
		out->active_version = int_column(tuple, desc, 3);
		out->kms_provider = copy_text_column(tuple, desc, 4, caller_cxt);
		out->kms_key = copy_text_column(tuple, desc, 5, caller_cxt);
		found = true;
	}
	keystore_leave(&session);
	return found;
}

bool
keystore_get_data_key(const char *tenant, int32 version, DataKeyRecord *out)
{
	KeystoreSession session;
	MemoryContext caller_cxt = CurrentMemoryContext;
	Oid			argtypes[2] = {TEXTOID, INT4OID};
	Datum		values[2] = {CStringGetTextDatum(tenant), Int32GetDatum(version)};
	bool		found = false;

	keystore_enter(&session);
	execute_latest("SELECT state, kms_provider, kms_key, wrapped_dek"
				   "  FROM envelope.data_key"
				   " WHERE tenant OPERATOR(pg_catalog.=) $1"
				   "   AND version OPERATOR(pg_catalog.=) $2",
				   2, argtypes, values);
	if (SPI_processed == 1)
	{
		HeapTuple	tuple = SPI_tuptable->vals[0];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		char	   *state = copy_text_column(tuple, desc, 1, caller_cxt);
		bool		isnull;
		Datum		wrapped = SPI_getbinval(tuple, desc, 4, &isnull);

		out->state = key_state_from_text(state);
		out->kms_provider = copy_text_column(tuple, desc, 2, caller_cxt);
		out->kms_key = copy_text_column(tuple, desc, 3, caller_cxt);
		if (isnull)
			out->wrapped = NULL;
		else
		{
			MemoryContext old = MemoryContextSwitchTo(caller_cxt);

			out->wrapped = DatumGetByteaPCopy(wrapped);
			MemoryContextSwitchTo(old);
		}
		found = true;
	}
	keystore_leave(&session);
	return found;
}

/*
 * The key cache's one question to the key store, through SQL where the direct read
 * (keystore_read.c) cannot answer it: a tenant and every one of its versions (one row
 * each, none if it has none), with the latest committed state, and the roles granted
 * the tenant.  It is the reference for what keystore_direct_read_tenant_key must
 * answer.  The plan is prepared once per backend and kept (SPI_keepplan), so a cache
 * miss parses nothing; the plan cache re-plans it by itself should the tables be
 * dropped and created again.  A database still at 0.1.0 has no envelope.tenant_grant:
 * its plan reads no grants, and is prepared again once the table appears (the update
 * invalidates envelope.tenant, which makes this backend look the tables up again).
 */
static SPIPlanPtr tenant_key_plan = NULL;
static bool tenant_key_plan_reads_grants = false;

static SPIPlanPtr
prepare_tenant_key_plan(bool read_grants)
{
	Oid			argtypes[1] = {TEXTOID};
	SPIPlanPtr	plan;

	plan = SPI_prepare(read_grants ?
					   "SELECT t.tenant_id, t.state, t.active_version,"
					   "       d.version, d.state, d.kms_provider, d.kms_key, d.wrapped_dek,"
					   "       (SELECT pg_catalog.array_agg(g.role::pg_catalog.oid ORDER BY g.role::pg_catalog.oid)"
					   "          FROM envelope.tenant_grant g"
					   "         WHERE g.tenant OPERATOR(pg_catalog.=) t.tenant)"
					   "  FROM envelope.tenant t"
					   "  LEFT JOIN envelope.data_key d"
					   "    ON d.tenant OPERATOR(pg_catalog.=) t.tenant"
					   " WHERE t.tenant OPERATOR(pg_catalog.=) $1"
					   " ORDER BY d.version" :
					   "SELECT t.tenant_id, t.state, t.active_version,"
					   "       d.version, d.state, d.kms_provider, d.kms_key, d.wrapped_dek"
					   "  FROM envelope.tenant t"
					   "  LEFT JOIN envelope.data_key d"
					   "    ON d.tenant OPERATOR(pg_catalog.=) t.tenant"
					   " WHERE t.tenant OPERATOR(pg_catalog.=) $1"
					   " ORDER BY d.version",
					   1, argtypes);
	if (plan == NULL)
		elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
	if (SPI_keepplan(plan) != 0)
		elog(ERROR, "SPI_keepplan failed");
	return plan;
}

/* Column `col` (an oid[] or NULL) as a palloc'd array in `cxt`; its length in *n. */
static Oid *
oid_array_column(HeapTuple tuple, TupleDesc desc, int col, MemoryContext cxt, int *n)
{
	bool		isnull;
	Datum		d = SPI_getbinval(tuple, desc, col, &isnull);
	ArrayType  *arr;
	Oid		   *oids;
	MemoryContext old;

	*n = 0;
	if (isnull)
		return NULL;
	arr = DatumGetArrayTypeP(d);
	if (ARR_NDIM(arr) != 1 || ARR_HASNULL(arr) || ARR_ELEMTYPE(arr) != OIDOID)
		elog(ERROR, "unexpected array of roles granted a tenant");
	*n = ArrayGetNItems(ARR_NDIM(arr), ARR_DIMS(arr));
	old = MemoryContextSwitchTo(cxt);
	oids = palloc(sizeof(Oid) * Max(*n, 1));
	MemoryContextSwitchTo(old);
	memcpy(oids, ARR_DATA_PTR(arr), sizeof(Oid) * *n);
	return oids;
}

/* Columns 4 to 8 of a row of the tenant key plan: one DEK version. */
static void
version_key_columns(HeapTuple tuple, TupleDesc desc, MemoryContext cxt, VersionKeyRecord *vr)
{
	bool		isnull;
	Datum		wrapped;

	vr->version = int_column(tuple, desc, 4);
	vr->key.state = key_state_from_text(copy_text_column(tuple, desc, 5, cxt));
	vr->key.kms_provider = copy_text_column(tuple, desc, 6, cxt);
	vr->key.kms_key = copy_text_column(tuple, desc, 7, cxt);
	wrapped = SPI_getbinval(tuple, desc, 8, &isnull);
	if (isnull)
		vr->key.wrapped = NULL;
	else
	{
		MemoryContext old = MemoryContextSwitchTo(cxt);

		vr->key.wrapped = DatumGetByteaPCopy(wrapped);
		MemoryContextSwitchTo(old);
	}
}

static bool
read_tenant_key_through_spi(const char *tenant, int32 version, TenantKeyRecord *out)
{
	KeystoreSession session;
	MemoryContext caller_cxt = CurrentMemoryContext;
	Datum		values[1] = {CStringGetTextDatum(tenant)};
	Snapshot	snapshot;
	bool		found = false;
	int			ret;

	memset(out, 0, sizeof(*out));
	keystore_enter(&session);
	if (tenant_key_plan != NULL && tenant_key_plan_reads_grants != OidIsValid(tenant_grant_relid))
	{
		SPI_freeplan(tenant_key_plan);
		tenant_key_plan = NULL;
	}
	if (tenant_key_plan == NULL)
	{
		tenant_key_plan = prepare_tenant_key_plan(OidIsValid(tenant_grant_relid));
		tenant_key_plan_reads_grants = OidIsValid(tenant_grant_relid);
	}
	/* As execute_latest(): a revocation committed a moment ago stops this reader too. */
	snapshot = IsInParallelMode() ? GetActiveSnapshot() : GetLatestSnapshot();
	ret = SPI_execute_snapshot(tenant_key_plan, values, NULL, snapshot, InvalidSnapshot,
							   true, false, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "SPI_execute_snapshot failed: %s", SPI_result_code_string(ret));
	if (SPI_processed >= 1)
	{
		HeapTuple	first = SPI_tuptable->vals[0];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		int32		wanted;
		bool		isnull;

		out->tenant_id = int_column(first, desc, 1);
		out->state = tenant_state_from_text(copy_text_column(first, desc, 2, caller_cxt));
		out->active_version = int_column(first, desc, 3);
		wanted = version == 0 ? out->active_version : version;
		(void) SPI_getbinval(first, desc, 4, &isnull);
		if (!isnull)			/* a tenant without versions has one row of NULLs */
		{
			out->versions = MemoryContextAlloc(caller_cxt,
											   sizeof(VersionKeyRecord) * SPI_processed);
			for (uint64 i = 0; i < SPI_processed; i++)
			{
				VersionKeyRecord *vr = &out->versions[out->nversions++];

				version_key_columns(SPI_tuptable->vals[i], desc, caller_cxt, vr);
				if (vr->version == wanted)
				{
					out->key_found = true;
					out->version = wanted;
					out->key = vr->key;
				}
			}
		}
		if (tenant_key_plan_reads_grants)
			out->grant_roles = oid_array_column(first, desc, 9, caller_cxt, &out->ngrants);
		found = true;
	}
	keystore_leave(&session);
	return found;
}

/*
 * The key cache's miss path: straight from the tables through their indexes
 * (keystore_read.c), which costs a few index probes where SPI cost a user switch, a
 * GUC nest level, plan revalidation and an executor start-up; through SPI where the
 * direct read cannot be right (Citus, a changed table shape).
 */
bool
keystore_read_tenant_key(const char *tenant, int32 version, TenantKeyRecord *out)
{
	KeyStoreTables tables;

	/*
	 * A table looked up before may have gone with a dropped extension; one created
	 * again since then has new tables, which the second look-up finds (and that of a
	 * dropped one raises that the extension is not installed).
	 */
	for (int attempt = 1;; attempt++)
	{
		if (!OidIsValid(tenant_relid) || !OidIsValid(key_store_owner))
			key_store_owner = lookup_key_store_owner();
		tables.tenant = tenant_relid;
		tables.data_key = data_key_relid;
		tables.tenant_grant = tenant_grant_relid;
		tables.owner = key_store_owner;
		switch (keystore_direct_read_tenant_key(&tables, tenant, version, out))
		{
			case KEYSTORE_READ_FOUND:
				return true;
			case KEYSTORE_READ_NO_TENANT:
				return false;
			case KEYSTORE_READ_UNSUPPORTED:
				return read_tenant_key_through_spi(tenant, version, out);
			case KEYSTORE_READ_TABLES_GONE:
				if (attempt > 1)
					ereport(ERROR,
							(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
							 errmsg("the key store of extension \"pg_envelope\" no longer exists"),
							 errdetail("A table of the key store was dropped."),
							 errhint("If the extension was dropped, run CREATE EXTENSION pg_envelope."),
							 errhidestmt(true)));
				keystore_forget_relations();
				break;
		}
	}
}

/*
 * The key store's tenant table as this backend knows it, looked up again after any
 * invalidation of the key tables (a dropped and re-created extension has new tables).
 * Names the incarnation of the key store, so that nothing cached for an older one is
 * ever taken for the current one.
 */
Oid
keystore_tenant_relid(void)
{
	if (!OidIsValid(tenant_relid) || !OidIsValid(key_store_owner))
		key_store_owner = lookup_key_store_owner();
	return tenant_relid;
}

/* Run a data-changing statement as the owner; returns rows affected. */
static uint64
keystore_modify(const char *sql, int nargs, Oid *argtypes, Datum *values, const char *nulls)
{
	KeystoreSession session;
	uint64		processed;
	int			ret;

	keystore_enter(&session);
	ret = SPI_execute_with_args(sql, nargs, argtypes, values, nulls, false, 0);
	if (ret != SPI_OK_INSERT && ret != SPI_OK_UPDATE && ret != SPI_OK_DELETE &&
		ret != SPI_OK_INSERT_RETURNING && ret != SPI_OK_UPDATE_RETURNING)
		elog(ERROR, "SPI_execute failed: %s", SPI_result_code_string(ret));
	processed = SPI_processed;
	keystore_leave(&session);
	citus_note_key_store_write();
	return processed;
}

/*
 * The tenant records the master key as it was given (an alias keeps following its
 * target for new DEKs); each DEK records the canonical key id the KMS actually used.
 */
int32
keystore_create_tenant(const char *tenant, const char *kms_provider,
					   const char *tenant_kms_key, const char *key_arn, const bytea *wrapped)
{
	Oid			argtypes[5] = {TEXTOID, TEXTOID, TEXTOID, BYTEAOID, TEXTOID};
	Datum		values[5] = {
		CStringGetTextDatum(tenant), CStringGetTextDatum(kms_provider),
		CStringGetTextDatum(key_arn), PointerGetDatum(wrapped),
		CStringGetTextDatum(tenant_kms_key)
	};

	KeystoreSession session;
	int32		tenant_id;
	int			ret;

	keystore_enter(&session);
	ret = SPI_execute_with_args("INSERT INTO envelope.tenant (tenant, active_version, kms_provider, kms_key)"
								" VALUES ($1, 1, $2, $5) RETURNING tenant_id",
								5, argtypes, values, NULL, false, 1);
	if (ret != SPI_OK_INSERT_RETURNING || SPI_processed != 1)
		elog(ERROR, "SPI_execute failed: %s", SPI_result_code_string(ret));
	tenant_id = int_column(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
	keystore_leave(&session);
	keystore_modify("INSERT INTO envelope.data_key (tenant, version, kms_provider, kms_key, wrapped_dek)"
					" VALUES ($1, 1, $2, $3, $4)",
					5, argtypes, values, NULL);
	return tenant_id;
}

int32
keystore_max_version(const char *tenant)
{
	KeystoreSession session;
	Oid			argtypes[1] = {TEXTOID};
	Datum		values[1] = {CStringGetTextDatum(tenant)};
	int32		version = 0;
	int			ret;

	keystore_enter(&session);
	ret = SPI_execute_with_args("SELECT pg_catalog.max(version) FROM envelope.data_key"
								" WHERE tenant OPERATOR(pg_catalog.=) $1",
								1, argtypes, values, NULL, false, 1);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "SPI_execute failed: %s", SPI_result_code_string(ret));
	if (SPI_processed == 1)
		version = int_column(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
	keystore_leave(&session);
	return version;
}

void
keystore_add_version(const char *tenant, int32 version, const char *kms_provider,
					 const char *kms_key, const bytea *wrapped)
{
	Oid			argtypes[5] = {TEXTOID, INT4OID, TEXTOID, TEXTOID, BYTEAOID};
	Datum		values[5] = {
		CStringGetTextDatum(tenant), Int32GetDatum(version),
		CStringGetTextDatum(kms_provider), CStringGetTextDatum(kms_key),
		PointerGetDatum(wrapped)
	};

	keystore_modify("INSERT INTO envelope.data_key (tenant, version, kms_provider, kms_key, wrapped_dek)"
					" VALUES ($1, $2, $3, $4, $5)",
					5, argtypes, values, NULL);
	keystore_modify("UPDATE envelope.tenant SET active_version = $2"
					" WHERE tenant OPERATOR(pg_catalog.=) $1",
					2, argtypes, values, NULL);
}

void
keystore_set_tenant_state(const char *tenant, TenantState state)
{
	Oid			argtypes[2] = {TEXTOID, TEXTOID};
	Datum		values[2] = {CStringGetTextDatum(tenant),
	CStringGetTextDatum(tenant_state_text(state))};

	keystore_modify("UPDATE envelope.tenant SET state = $2"
					" WHERE tenant OPERATOR(pg_catalog.=) $1",
					2, argtypes, values, NULL);
}

void
keystore_set_key_state(const char *tenant, int32 version, KeyState state)
{
	Oid			argtypes[3] = {TEXTOID, INT4OID, TEXTOID};
	Datum		values[3] = {CStringGetTextDatum(tenant), Int32GetDatum(version),
	CStringGetTextDatum(key_state_text(state))};

	keystore_modify("UPDATE envelope.data_key SET state = $3"
					" WHERE tenant OPERATOR(pg_catalog.=) $1 AND version OPERATOR(pg_catalog.=) $2",
					3, argtypes, values, NULL);
}

/*
 * Crypto-shredding: erase every wrapped DEK of the tenant.  The old row versions stay
 * in the heap until VACUUM, and old backups keep them; the documentation says so.
 */
void
keystore_destroy_tenant(const char *tenant)
{
	Oid			argtypes[1] = {TEXTOID};
	Datum		values[1] = {CStringGetTextDatum(tenant)};

	keystore_modify("UPDATE envelope.data_key SET state = 'destroyed', wrapped_dek = NULL"
					" WHERE tenant OPERATOR(pg_catalog.=) $1",
					1, argtypes, values, NULL);
	keystore_modify("UPDATE envelope.tenant SET state = 'destroyed'"
					" WHERE tenant OPERATOR(pg_catalog.=) $1",
					1, argtypes, values, NULL);
}

/*
 * Every stored (not destroyed) DEK of one tenant, or of all tenants when `tenant` is
 * NULL, locked against concurrent key management until the transaction ends.
 */
List *
keystore_lock_keys_for_rewrap(const char *tenant)
{
	KeystoreSession session;
	MemoryContext caller_cxt = CurrentMemoryContext;
	Oid			argtypes[1] = {TEXTOID};
	Datum		values[1];
	char		nulls[1] = {tenant ? ' ' : 'n'};
	List	   *keys = NIL;
	int			ret;

	values[0] = tenant ? CStringGetTextDatum(tenant) : (Datum) 0;
	keystore_enter(&session);
	ret = SPI_execute_with_args("SELECT d.tenant, d.version, d.kms_provider, d.kms_key, d.wrapped_dek"
								"  FROM envelope.data_key d"
								" WHERE d.wrapped_dek IS NOT NULL"
								"   AND ($1 IS NULL OR d.tenant OPERATOR(pg_catalog.=) $1)"
								" ORDER BY d.tenant, d.version"
								"   FOR UPDATE",
								1, argtypes, values, nulls, false, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "SPI_execute failed: %s", SPI_result_code_string(ret));
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tuple = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		MemoryContext old;
		StoredKey  *key;
		bool		isnull;
		Datum		wrapped;

		old = MemoryContextSwitchTo(caller_cxt);
		key = palloc0(sizeof(StoredKey));
		MemoryContextSwitchTo(old);
		key->tenant = copy_text_column(tuple, desc, 1, caller_cxt);
		key->version = int_column(tuple, desc, 2);
		key->kms_provider = copy_text_column(tuple, desc, 3, caller_cxt);
		key->kms_key = copy_text_column(tuple, desc, 4, caller_cxt);
		wrapped = SPI_getbinval(tuple, desc, 5, &isnull);
		old = MemoryContextSwitchTo(caller_cxt);
		key->wrapped = DatumGetByteaPCopy(wrapped);
		keys = lappend(keys, key);
		MemoryContextSwitchTo(old);
	}
	keystore_leave(&session);
	return keys;
}

/* Record a new wrapping of the same DEK: the key material itself does not change. */
void
keystore_set_wrapping(const char *tenant, int32 version, const char *kms_key,
					  const bytea *wrapped)
{
	Oid			argtypes[4] = {TEXTOID, INT4OID, TEXTOID, BYTEAOID};
	Datum		values[4] = {
		CStringGetTextDatum(tenant), Int32GetDatum(version),
		CStringGetTextDatum(kms_key), PointerGetDatum(wrapped)
	};

	keystore_modify("UPDATE envelope.data_key SET kms_key = $3, wrapped_dek = $4"
					" WHERE tenant OPERATOR(pg_catalog.=) $1 AND version OPERATOR(pg_catalog.=) $2",
					4, argtypes, values, NULL);
}

void
keystore_set_tenant_kms_key(const char *tenant, const char *kms_key)
{
	Oid			argtypes[2] = {TEXTOID, TEXTOID};
	Datum		values[2] = {CStringGetTextDatum(tenant), CStringGetTextDatum(kms_key)};

	keystore_modify("UPDATE envelope.tenant SET kms_key = $2"
					" WHERE tenant OPERATOR(pg_catalog.=) $1",
					2, argtypes, values, NULL);
}

/*
 * The tenant's equality key version and the DEK versions that are live equality
 * versions (active, and not newer than the equality version), newest first, read like
 * keystore_read_tenant_key at the latest committed state.  A tenant row written by a
 * 0.1.0 key store has no equality_version column: this is only called by 0.2.0's SQL.
 */
bool
keystore_read_equality(const char *tenant, int32 *equality_version,
					   int32 **live, int *nlive)
{
	MemoryContext caller_cxt = CurrentMemoryContext;
	KeystoreSession session;
	Oid			argtypes[1] = {TEXTOID};
	Datum		values[1] = {CStringGetTextDatum(tenant)};
	bool		found;

	keystore_enter(&session);
	execute_latest_rows("SELECT t.equality_version, k.version"
						" FROM envelope.tenant t"
						" LEFT JOIN envelope.data_key k"
						"   ON k.tenant OPERATOR(pg_catalog.=) t.tenant"
						"  AND k.state OPERATOR(pg_catalog.=) 'active'"
						"  AND k.version OPERATOR(pg_catalog.<=) t.equality_version"
						" WHERE t.tenant OPERATOR(pg_catalog.=) $1"
						" ORDER BY k.version DESC",
						1, argtypes, values, 0);
	found = SPI_processed > 0;
	*nlive = 0;
	*live = NULL;
	*equality_version = 0;
	if (found)
	{
		MemoryContext old = MemoryContextSwitchTo(caller_cxt);

		*live = palloc(sizeof(int32) * SPI_processed);
		MemoryContextSwitchTo(old);
		*equality_version = int_column(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
		for (uint64 i = 0; i < SPI_processed; i++)
		{
			int32		v = int_column(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 2);

			if (v > 0)
				(*live)[(*nlive)++] = v;
		}
	}
	keystore_leave(&session);
	return found;
}

void
keystore_set_equality_version(const char *tenant, int32 version)
{
	Oid			argtypes[2] = {TEXTOID, INT4OID};
	Datum		values[2] = {CStringGetTextDatum(tenant), Int32GetDatum(version)};

	keystore_modify("UPDATE envelope.tenant SET equality_version = $2"
					" WHERE tenant OPERATOR(pg_catalog.=) $1",
					2, argtypes, values, NULL);
}

/*
 * Per-tenant access (src/tenant_access.c): the roles granted a tenant.  Rows of
 * envelope.tenant_grant are key-store rows, so the key-store trigger makes a change
 * take effect in every session when it commits.
 */
bool
keystore_add_tenant_grant(const char *tenant, Oid role)
{
	Oid			argtypes[2] = {TEXTOID, OIDOID};
	Datum		values[2] = {CStringGetTextDatum(tenant), ObjectIdGetDatum(role)};

	return keystore_modify("INSERT INTO envelope.tenant_grant (tenant, role)"
						   " VALUES ($1, $2::pg_catalog.regrole) ON CONFLICT DO NOTHING",
						   2, argtypes, values, NULL) > 0;
}

bool
keystore_remove_tenant_grant(const char *tenant, Oid role)
{
	Oid			argtypes[2] = {TEXTOID, OIDOID};
	Datum		values[2] = {CStringGetTextDatum(tenant), ObjectIdGetDatum(role)};

	return keystore_modify("DELETE FROM envelope.tenant_grant"
						   " WHERE tenant OPERATOR(pg_catalog.=) $1"
						   "   AND role::pg_catalog.oid OPERATOR(pg_catalog.=) $2",
						   2, argtypes, values, NULL) > 0;
}

/* Not read-only: it must see the rows this statement has just changed. */
int64
keystore_count_tenant_grants(const char *tenant)
{
	KeystoreSession session;
	Oid			argtypes[1] = {TEXTOID};
	Datum		values[1] = {CStringGetTextDatum(tenant)};
	bool		isnull;
	int64		count;
	int			ret;

	keystore_enter(&session);
	ret = SPI_execute_with_args("SELECT pg_catalog.count(*) FROM envelope.tenant_grant"
								" WHERE tenant OPERATOR(pg_catalog.=) $1",
								1, argtypes, values, NULL, false, 1);
	if (ret != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "SPI_execute failed: %s", SPI_result_code_string(ret));
	count = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	keystore_leave(&session);
	return count;
}

/*
 * The DEK versions the cache prewarm loads, most useful first: the active version of
 * every active tenant, then (all_versions) their other active versions, newest first;
 * at most `limit` of them.  Retired and destroyed versions, and the versions of
 * disabled or destroyed tenants, never decrypt, so they are never listed.
 */
List *
keystore_prewarm_candidates(bool all_versions, int64 limit)
{
	KeystoreSession session;
	MemoryContext caller_cxt = CurrentMemoryContext;
	Oid			argtypes[2] = {BOOLOID, INT8OID};
	Datum		values[2] = {BoolGetDatum(all_versions), Int64GetDatum(limit)};
	List	   *keys = NIL;
	int			ret;

	keystore_enter(&session);
	ret = SPI_execute_with_args("SELECT d.tenant, d.version"
								"  FROM envelope.data_key d"
								"  JOIN envelope.tenant t ON t.tenant OPERATOR(pg_catalog.=) d.tenant"
								" WHERE t.state OPERATOR(pg_catalog.=) 'active'"
								"   AND d.state OPERATOR(pg_catalog.=) 'active'"
								"   AND d.wrapped_dek IS NOT NULL"
								"   AND ($1 OR d.version OPERATOR(pg_catalog.=) t.active_version)"
								" ORDER BY d.version OPERATOR(pg_catalog.<>) t.active_version,"
								"          t.tenant_id, d.version DESC"
								" LIMIT $2",
								2, argtypes, values, NULL, true, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "SPI_execute failed: %s", SPI_result_code_string(ret));
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tuple = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		MemoryContext old = MemoryContextSwitchTo(caller_cxt);
		KeyVersionRef *ref = palloc0(sizeof(KeyVersionRef));

		MemoryContextSwitchTo(old);
		ref->tenant = copy_text_column(tuple, desc, 1, caller_cxt);
		ref->version = int_column(tuple, desc, 2);
		old = MemoryContextSwitchTo(caller_cxt);
		keys = lappend(keys, ref);
		MemoryContextSwitchTo(old);
	}
	keystore_leave(&session);
	return keys;
}
