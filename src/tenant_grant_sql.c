/*
 * tenant_grant_sql.c — envelope.grant_tenant and envelope.revoke_tenant: which roles
 * may use a tenant's keys (the rules and the check are in tenant_access.h).
 *
 * Both run as envelope_admin's members (EXECUTE is granted to nobody else), lock the
 * tenant's row like every key action, write envelope.tenant_grant through the key
 * store (whose trigger makes the change take effect everywhere at commit) and leave an
 * audit row when something changed.
 */
#include "pg_envelope.h"

#include "fmgr.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/syscache.h"

#include "audit.h"

PG_FUNCTION_INFO_V1(envelope_grant_tenant);
PG_FUNCTION_INFO_V1(envelope_revoke_tenant);

static Oid
role_arg(FunctionCallInfo fcinfo, int argno)
{
	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("role must not be null")));
	return PG_GETARG_OID(argno);
}

/* {"role": name} for the audit row; a dropped role by its oid. */
static char *
role_detail(Oid role)
{
	const char *name = GetUserNameFromId(role, true);
	StringInfoData buf;

	initStringInfo(&buf);
	appendStringInfoString(&buf, "{\"role\": ");
	if (name != NULL)
		escape_json(&buf, name);
	else
		appendStringInfo(&buf, "\"%u\"", role);
	appendStringInfoChar(&buf, '}');
	return buf.data;
}

/*
 * envelope.grant_tenant(tenant, role): from now on (at commit) the tenant's keys serve
 * only the roles granted them and envelope_admin.  True if the grant is new.
 */
Datum
envelope_grant_tenant(PG_FUNCTION_ARGS)
{
	char	   *tenant = envelope_tenant_arg(fcinfo, 0);
	Oid			role = role_arg(fcinfo, 1);
	bool		added;

	/* A regrole given as a number is not checked by its input function. */
	if (!SearchSysCacheExists1(AUTHOID, ObjectIdGetDatum(role)))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("role with OID %u does not exist", role)));
	(void) envelope_lock_tenant(tenant);
	added = keystore_add_tenant_grant(tenant, role);
	if (added)
		audit_log_key_action("grant", tenant, 0, NULL, role_detail(role));
	PG_RETURN_BOOL(added);
}

/*
 * envelope.revoke_tenant(tenant, role): true if the role had a grant.  Revoking the
 * last grant opens the tenant to every envelope_user again.  A dropped role's grant is
 * revoked by its oid; the tenant may be destroyed.
 */
Datum
envelope_revoke_tenant(PG_FUNCTION_ARGS)
{
	char	   *tenant = envelope_tenant_arg(fcinfo, 0);
	Oid			role = role_arg(fcinfo, 1);
	TenantRecord rec;
	bool		removed;

	if (!keystore_get_tenant(tenant, true, &rec))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("tenant \"%s\" does not exist", tenant)));
	removed = keystore_remove_tenant_grant(tenant, role);
	if (!removed)
		PG_RETURN_BOOL(false);
	audit_log_key_action("revoke", tenant, 0, NULL, role_detail(role));
	/* No grant left means no restriction: say so, it may not be what was meant. */
	if (rec.state != TENANT_DESTROYED && keystore_count_tenant_grants(tenant) == 0)
		ereport(WARNING,
				(errmsg("tenant \"%s\" has no grants left: every envelope_user can use its keys again", tenant),
				 errhint("To stop all use of its keys, run envelope.disable_tenant().")));
	PG_RETURN_BOOL(true);
}
