/*
 * citus_support.h — what pg_envelope does differently on a Citus cluster.
 * See citus_support.c and doc/citus.md.
 */
#ifndef CITUS_SUPPORT_H
#define CITUS_SUPPORT_H

#include "utils/rel.h"

/* Is the citus library loaded in this backend? */
extern bool citus_is_loaded(void);

/*
 * Allow the key store's statements on its reference tables from inside a query on a
 * shard, in the GUC nest level *guc_nest_level (opened here when it is -1), which the
 * caller closes with AtEOXact_GUC().  Works in parallel workers too.  No-op without
 * Citus.
 */
extern void citus_allow_nested_key_store_reads(int *guc_nest_level);

/* Is `rel`, where a key-store trigger fired, a Citus shard placement of a key table? */
extern bool citus_is_key_table_placement(Relation rel);

/*
 * Queue relcache invalidations of both key tables, sent when the transaction commits,
 * also when it commits as a prepared transaction (COMMIT PREPARED).
 */
extern void citus_invalidate_key_tables(void);

/*
 * The key store was written through Citus: invalidate the key tables here too, since
 * a coordinator without a copy of them has no trigger that fires.  No-op without Citus.
 */
extern void citus_note_key_store_write(void);

#endif							/* CITUS_SUPPORT_H */
