/*
 * citus_support.h — what pg_envelope does differently on a Citus cluster.
 * See citus_support.c and doc/citus.md.
 */
#ifndef CITUS_SUPPORT_H
#define CITUS_SUPPORT_H

#include "utils/rel.h"

/*
 * Allow the key store's reads of its reference tables from inside a query on a shard;
 * call after NewGUCNestLevel(), whose AtEOXact_GUC() undoes it.  No-op without Citus.
 */
extern void citus_allow_nested_key_store_reads(void);

/* Is `rel`, where a key-store trigger fired, a Citus shard placement of a key table? */
extern bool citus_is_key_table_placement(Relation rel);

/*
 * Queue relcache invalidations of both key tables, sent when the transaction commits,
 * also when it commits as a prepared transaction (COMMIT PREPARED).
 */
extern void citus_invalidate_key_tables(void);

#endif							/* CITUS_SUPPORT_H */
