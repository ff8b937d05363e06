/*
 * keystore.h — the key store: envelope.tenant and envelope.data_key, read and written
 * through SPI as the tables' owner (keystore.c), except the key cache's miss path,
 * which reads them through their indexes (keystore_read.c).
 *
 * Every SPI access runs as the tables' owner in a restricted security context, raises
 * its errors itself, and allocates what it returns in the caller's memory context.
 * Reads on behalf of the key cache see the latest committed state, so a revocation
 * committed a moment ago stops a REPEATABLE READ transaction too.
 */
#ifndef PG_ENVELOPE_KEYSTORE_H
#define PG_ENVELOPE_KEYSTORE_H

#include "compat.h"

#include "nodes/pg_list.h"

/* Tenant names: 1 to 255 bytes, no control characters (see envelope_check_tenant). */
#define ENVELOPE_TENANT_MAX 255

typedef enum TenantState
{
	TENANT_ACTIVE = 'a',
	TENANT_DISABLED = 'd',
	TENANT_DESTROYED = 'x'
} TenantState;

typedef enum KeyState
{
	KEY_ACTIVE = 'a',
	KEY_RETIRED = 'r',
	KEY_DESTROYED = 'x'
} KeyState;

typedef struct TenantRecord
{
	int32		tenant_id;
	TenantState state;
	int32		active_version;
	char	   *kms_provider;
	char	   *kms_key;
} TenantRecord;

typedef struct DataKeyRecord
{
	KeyState	state;
	char	   *kms_provider;
	char	   *kms_key;
	bytea	   *wrapped;		/* NULL once destroyed */
} DataKeyRecord;

/* One DEK version of a tenant, as the key cache reads them on a miss. */
typedef struct VersionKeyRecord
{
	int32		version;
	DataKeyRecord key;
	uint64		wrapped_hash;	/* the key cache's name of key.wrapped (0: none); set by it */
} VersionKeyRecord;

/*
 * One tenant and every one of its versions, as the key cache reads them on a miss:
 * the versions are few, and a re-encryption needs two of them (the old for decrypting,
 * the active one for encrypting) right after a look at the tenant's state, so one read
 * answers all three.  `key` is the version asked for (a copy of its entry in versions).
 */
typedef struct TenantKeyRecord
{
	int32		tenant_id;
	TenantState state;
	int32		active_version;
	int32		version;		/* the version asked for, or the active one */
	bool		key_found;		/* false: the tenant has no such version */
	DataKeyRecord key;
	int			ngrants;		/* roles granted the tenant (0: open to envelope_user) */
	Oid		   *grant_roles;	/* ngrants role oids, ascending; NULL when none */
	int			nversions;		/* every DEK version of the tenant, ascending */
	VersionKeyRecord *versions;
} TenantKeyRecord;

/* One stored DEK, as rewrap walks them. */
typedef struct StoredKey
{
	char	   *tenant;
	int32		version;
	char	   *kms_provider;
	char	   *kms_key;
	bytea	   *wrapped;
} StoredKey;

/* Raises 22023/42622 unless `tenant` is 1 to 255 bytes without control characters. */
extern void envelope_check_tenant(const char *tenant, size_t len);

/* The tenant's row (locked FOR UPDATE if asked); false if there is none. */
extern bool keystore_get_tenant(const char *tenant, bool for_update, TenantRecord *out);

/*
 * The tenant, its `version` (0: the active one) and all its other versions, latest
 * committed state, read through the tables' indexes (through a plan prepared once per backend where that
 * cannot be right, as under Citus); false if the tenant does not exist.
 */
extern bool keystore_read_tenant_key(const char *tenant, int32 version, TenantKeyRecord *out);

/* One DEK version's row; false if there is none. */
extern bool keystore_get_data_key(const char *tenant, int32 version, DataKeyRecord *out);

/*
 * The OID of envelope.tenant as this backend knows it (looked up again after an
 * invalidation of the key tables); raises an error if the extension is not installed.
 */
extern Oid	keystore_tenant_relid(void);

/* Insert a new tenant with its version 1; returns the tenant id. */
extern int32 keystore_create_tenant(const char *tenant, const char *kms_provider,
									const char *tenant_kms_key, const char *key_arn,
									const bytea *wrapped);

/* Every stored DEK (of one tenant, or all if NULL), locked until the transaction ends. */
extern List *keystore_lock_keys_for_rewrap(const char *tenant);

/* Record a new wrapping of the same DEK version. */
extern void keystore_set_wrapping(const char *tenant, int32 version, const char *kms_key,
								  const bytea *wrapped);

/* The master key the tenant's new DEKs are made under. */
extern void keystore_set_tenant_kms_key(const char *tenant, const char *kms_key);

/* The tenant's highest DEK version, 0 if it has none. */
extern int32 keystore_max_version(const char *tenant);

/* Add DEK `version` and make it the active one. */
extern void keystore_add_version(const char *tenant, int32 version, const char *kms_provider,
								 const char *kms_key, const bytea *wrapped);

extern void keystore_set_tenant_state(const char *tenant, TenantState state);
extern void keystore_set_key_state(const char *tenant, int32 version, KeyState state);

/* Erase every wrapped DEK of the tenant and mark it destroyed. */
extern void keystore_destroy_tenant(const char *tenant);

/*
 * The tenant's equality key version, and its live equality versions (active DEK
 * versions up to it) newest first, palloc'd in the caller's context; false if the
 * tenant does not exist.  Latest committed state, like keystore_read_tenant_key.
 */
extern bool keystore_read_equality(const char *tenant, int32 *equality_version,
								   int32 **live, int *nlive);
/* Make DEK `version` the tenant's equality key version. */
extern void keystore_set_equality_version(const char *tenant, int32 version);
/* Forget the tables' OIDs and owner (called on invalidation of the key tables). */
extern void keystore_forget_relations(void);

/*
 * Grant `role` access to the tenant's keys (envelope.tenant_grant); false if it already
 * had it.  Revoke it; false if it had none.  The caller locks the tenant row first.
 */
extern bool keystore_add_tenant_grant(const char *tenant, Oid role);
extern bool keystore_remove_tenant_grant(const char *tenant, Oid role);
/* How many roles are granted the tenant, as this transaction sees it. */
extern int64 keystore_count_tenant_grants(const char *tenant);

/* Could an invalidation of `relid` concern the key store?  True while unknown. */
extern bool keystore_is_key_table(Oid relid);

/* A DEK version named by its tenant, as the cache prewarm walks them. */
typedef struct KeyVersionRef
{
	char	   *tenant;
	int32		version;
} KeyVersionRef;

/*
 * The DEK versions worth loading into the cache at start (KeyVersionRef, palloc'd in
 * the caller's context): each active tenant's active version first, then, with
 * all_versions, the other active versions; at most `limit`.
 */
extern List *keystore_prewarm_candidates(bool all_versions, int64 limit);

#endif							/* PG_ENVELOPE_KEYSTORE_H */
