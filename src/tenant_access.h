/*
 * tenant_access.h — per-tenant access: may the current user use a tenant's keys?
 *
 * A tenant with no row in envelope.tenant_grant is open to every role that may run the
 * data functions (envelope_user's members), as before 0.2.0.  Once it has one, only
 * roles with the privileges of a granted role (pg_has_role(..., 'USAGE'): membership
 * through inheritance, not a mere right to SET ROLE) and of envelope_admin (and
 * superusers) may encrypt, decrypt, or compute deterministic values and blind indexes
 * with its keys.  The check is against current_user at the moment of the call: after
 * SET ROLE, the role set; inside a SECURITY DEFINER function, its owner.
 *
 * The key cache keeps the granted roles in each tenant's state (read with it from the
 * key store, held in shared memory with it, stale with it when any key-store change
 * commits).  Beside them it keeps the last verdict: for which user, at which role
 * epoch.  The epoch moves whenever this backend learns of a change to pg_auth_members
 * or pg_authid (GRANT role TO ..., REVOKE, ALTER ROLE, DROP ROLE), so a membership
 * change committed by any session is seen by this backend's next statement.
 */
#ifndef PG_ENVELOPE_TENANT_ACCESS_H
#define PG_ENVELOPE_TENANT_ACCESS_H

#include "compat.h"

#include "miscadmin.h"

typedef struct TenantAccess
{
	int			nroles;			/* roles granted the tenant; 0: not restricted */
	Oid		   *roles;			/* nroles oids, in the key cache's memory */
	Oid			allowed_user;	/* the user last allowed; InvalidOid: none */
	uint64		allowed_epoch;	/* tenant_access_role_epoch when it was */
} TenantAccess;

/* Moves on every change of roles or role membership this backend learns of. */
extern uint64 tenant_access_role_epoch;

/* Register the role invalidation callbacks (once per process). */
extern void tenant_access_init_backend(void);

/* An access of a tenant not seen yet: unrestricted, nothing allocated. */
extern void tenant_access_init(TenantAccess *access);

/*
 * Set the granted roles (`nroles` oids, ascending) as just read from the key store;
 * the verdict survives only if they did not change.  Allocates in `cxt`.
 */
extern void tenant_access_set(TenantAccess *access, const Oid *roles, int nroles,
							  MemoryContext cxt);

/* Free what tenant_access_set allocated, and forget the verdict. */
extern void tenant_access_free(TenantAccess *access);

/* Slow path of tenant_access_require: decide, remember an allowance, or raise 42501. */
extern void tenant_access_check(TenantAccess *access, const char *tenant);

/*
 * Raise 42501 unless current_user may use the keys of `tenant` (whose cached access
 * is `access`).  Per row: one load and branch for an unrestricted tenant; for a
 * restricted one, a compare with the user and epoch of the last allowance.
 */
static inline void
tenant_access_require(TenantAccess *access, const char *tenant)
{
	if (likely(access->nroles == 0))
		return;
	if (likely(access->allowed_user == GetUserId() &&
			   access->allowed_epoch == tenant_access_role_epoch))
		return;
	tenant_access_check(access, tenant);
}

#endif							/* PG_ENVELOPE_TENANT_ACCESS_H */
