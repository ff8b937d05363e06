/*
 * tenant_name.h — the grammar of new tenant names.
 */
#ifndef PG_ENVELOPE_TENANT_NAME_H
#define PG_ENVELOPE_TENANT_NAME_H

#include <stddef.h>

/*
 * Raises 22023 unless a name that is about to become a tenant follows the tenant-name
 * grammar (README, "Tenant names"): no Unicode control, format or line/paragraph
 * separator characters, and NFC in a UTF-8 database.  Lookups of existing tenants do
 * not apply it, so tenants created before it keep working.
 */
extern void tenant_name_check_new(const char *name, size_t len);

/*
 * Takes a transaction-level lock on a tenant name, so that concurrent creations of one
 * name run one at a time: the second waits until the first commits or aborts, then
 * finds the tenant (or not) before it asks the KMS for anything.
 */
extern void tenant_name_lock_for_create(const char *name, size_t len);

#endif							/* PG_ENVELOPE_TENANT_NAME_H */
