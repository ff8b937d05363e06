/*
 * keystore_read.h — the key cache's miss path read straight from the key tables
 * (keystore_read.c), below keystore.c, which is its only caller.
 */
#ifndef PG_ENVELOPE_KEYSTORE_READ_H
#define PG_ENVELOPE_KEYSTORE_READ_H

#include "keystore.h"

/* The key tables of the key store's current incarnation, as keystore.c looked them up. */
typedef struct KeyStoreTables
{
	Oid			tenant;
	Oid			data_key;
	Oid			tenant_grant;	/* InvalidOid in a key store still at 0.1.0 */
	Oid			owner;			/* their owner, as whom the SQL path reads them */
} KeyStoreTables;

typedef enum KeyStoreDirectRead
{
	KEYSTORE_READ_FOUND,		/* *out filled in */
	KEYSTORE_READ_NO_TENANT,	/* no such tenant */
	KEYSTORE_READ_UNSUPPORTED,	/* nothing read: ask the SQL path (keystore.c) */
	KEYSTORE_READ_TABLES_GONE	/* a table of `tables` no longer exists: look them up again */
} KeyStoreDirectRead;

/*
 * What keystore_read_tenant_key answers (the tenant, its `version` or, for 0, its
 * active one, every one of its versions, and its granted roles), read from the tables through their indexes at
 * the latest committed state (the active snapshot in parallel mode), with no user
 * switch, setting change or SPI.  Results are palloc'd in the caller's context and
 * nothing else outlives the call.  KEYSTORE_READ_UNSUPPORTED when the tables are not
 * shaped as this reader expects (a column missing or renamed) or must be read through
 * SQL (Citus, forced row security); an error if a table has gone (extension dropped).
 */
extern KeyStoreDirectRead keystore_direct_read_tenant_key(const KeyStoreTables *tables,
														  const char *tenant, int32 version,
														  TenantKeyRecord *out);

/* Forget the tables' layout (called with keystore_forget_relations on invalidation). */
extern void keystore_direct_forget(void);

/* The key store's state words as enums; unknown words read as destroyed. */
extern TenantState keystore_tenant_state_of(const char *word, size_t len);
extern KeyState keystore_key_state_of(const char *word, size_t len);

#endif							/* PG_ENVELOPE_KEYSTORE_READ_H */
