/*
 * tenant_access.c — per-tenant access: the check the key cache makes before it hands
 * out a key of a tenant that has grants (see tenant_access.h for the rules).
 *
 * Why has_privs_of_role (pg_has_role's USAGE): it is what a privilege granted to a
 * role means everywhere else in PostgreSQL.  A NOINHERIT member must SET ROLE to the
 * granted role first, as it would to read a table granted to that role.  Superusers
 * pass, as they do every privilege check.
 *
 * Why the check is against current_user (GetUserId), not session_user: it is the role
 * whose privileges the statement runs with, so SET ROLE narrows or widens access as it
 * does for tables, and a SECURITY DEFINER function owned by a granted role can serve
 * callers who are not (the function's owner decides who may call it).
 *
 * The verdict is remembered only when it allows: a denied call raises an error anyway,
 * and recomputing a denial costs nothing on a path that ends in an error.
 */
#include "pg_envelope.h"

#include "tenant_access.h"

#include "utils/acl.h"
#include "utils/inval.h"
#include "utils/memutils.h"
#include "utils/syscache.h"

uint64		tenant_access_role_epoch = 1;

/*
 * A role or role membership changed (this backend processed the invalidation, which
 * happens at the latest when its next statement starts): every verdict is stale.
 * acl.c's own cache of role memberships is reset by the same invalidations.
 */
static void
tenant_access_roles_changed(Datum arg, int cacheid, uint32 hashvalue)
{
	tenant_access_role_epoch++;
}

void
tenant_access_init_backend(void)
{
	static bool registered = false;

	if (registered)
		return;
	CacheRegisterSyscacheCallback(AUTHMEMROLEMEM, tenant_access_roles_changed, (Datum) 0);
	CacheRegisterSyscacheCallback(AUTHOID, tenant_access_roles_changed, (Datum) 0);
	registered = true;
}

void
tenant_access_init(TenantAccess *access)
{
	access->nroles = 0;
	access->roles = NULL;
	access->allowed_user = InvalidOid;
	access->allowed_epoch = 0;
}

void
tenant_access_free(TenantAccess *access)
{
	if (access->roles != NULL)
		pfree(access->roles);
	tenant_access_init(access);
}

void
tenant_access_set(TenantAccess *access, const Oid *roles, int nroles, MemoryContext cxt)
{
	if (nroles == access->nroles &&
		(nroles == 0 || memcmp(roles, access->roles, sizeof(Oid) * nroles) == 0))
		return;					/* the same grants: the verdict still holds */
	tenant_access_free(access);
	if (nroles == 0)
		return;
	access->roles = MemoryContextAlloc(cxt, sizeof(Oid) * nroles);
	memcpy(access->roles, roles, sizeof(Oid) * nroles);
	access->nroles = nroles;
}

static bool
user_may_use(Oid user, const TenantAccess *access)
{
	Oid			admin = get_role_oid("envelope_admin", true);

	if (OidIsValid(admin) && has_privs_of_role(user, admin))
		return true;
	for (int i = 0; i < access->nroles; i++)
		if (has_privs_of_role(user, access->roles[i]))
			return true;
	return false;
}

void
tenant_access_check(TenantAccess *access, const char *tenant)
{
	Oid			user = GetUserId();

	/*
	 * The epoch is read before the catalogs: a change that arrives while they are read
	 * leaves the allowance stale, to be decided again on the next call.
	 */
	uint64		epoch = tenant_access_role_epoch;

	if (!user_may_use(user, access))
	{
		const char *user_name = GetUserNameFromId(user, true);

		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied for tenant \"%s\"", tenant),
				 errdetail("The tenant's keys are granted to some roles only, and role \"%s\" has the privileges of none of them.",
						   user_name ? user_name : "?"),
				 errhint("An envelope_admin can grant access with envelope.grant_tenant()."),
				 errhidestmt(true)));
	}
	access->allowed_user = user;
	access->allowed_epoch = epoch;
}
