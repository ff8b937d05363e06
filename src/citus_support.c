/*
 * citus_support.c — the two things the key store needs on a Citus cluster.
 *
 * With Citus, the key tables are reference tables (see the Citus section of the
 * update script): each node holds a copy, a shard placement named like
 * envelope.tenant_102008, beside the table Citus plans queries against.
 *
 * Reads.  A query pushed down to a worker runs encrypt/decrypt there; their SPI read
 * of envelope.tenant is then a distributed query inside a query on a shard, which
 * Citus refuses unless citus.allow_nested_distributed_execution is on.  The read of a
 * reference table is safe to nest: Citus answers it from the node's own placement.
 * So the setting is turned on for the key store's own statements only, inside the
 * GUC nest level the key store opens for its search_path (or one of its own in a
 * parallel worker, where search_path is left alone).
 *
 * Writes.  Citus writes every placement of a reference table, the workers' in a
 * prepared transaction (two-phase commit), and the key-store triggers fire on the
 * placements.  The key cache's commit-time generation bump belongs to a backend's own
 * commit and cannot follow a prepared transaction, so on a placement the trigger
 * takes another route: a relcache invalidation of the key tables.  PostgreSQL keeps
 * it with the prepared transaction and sends it at COMMIT PREPARED to every backend of
 * the node, whose key cache then re-reads states (keycache.c, the relcache callback),
 * the same way a hot standby learns of a change; and, as on a standby, each backend
 * that takes the invalidation bumps the shared generation, so the tenant states
 * cached in shared memory are re-read too (keycache.c).
 *
 * The extension's own writes also invalidate the key tables directly, for a
 * coordinator that holds no copy of them (see citus_note_key_store_write).
 *
 * Nothing here needs Citus's headers or library: the setting is looked up by name and
 * placements are told apart by their relation name.
 */
#include "pg_envelope.h"

#include "catalog/namespace.h"
#include "utils/guc.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"

#include "citus_support.h"

#define CITUS_NESTED_EXECUTION_GUC "citus.allow_nested_distributed_execution"

/* Citus defines its settings when its library is loaded. */
bool
citus_is_loaded(void)
{
	return GetConfigOption(CITUS_NESTED_EXECUTION_GUC, true, false) != NULL;
}

void
citus_allow_nested_key_store_reads(int *guc_nest_level)
{
	if (!citus_is_loaded())
		return;

	/*
	 * A parallel worker of a query on a shard reads the key store too.  Settings
	 * saved in a nest level may change in parallel mode (as a function's SET clause
	 * does): the change is this process's own and is undone when the level closes.
	 */
	if (*guc_nest_level < 0)
		*guc_nest_level = NewGUCNestLevel();
	(void) set_config_option(CITUS_NESTED_EXECUTION_GUC, "on",
							 PGC_SUSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
}

/*
 * The key-store triggers exist on envelope.tenant, envelope.data_key and
 * envelope.tenant_grant and, under Citus, on their placements, which carry a shard id
 * suffix.
 */
bool
citus_is_key_table_placement(Relation rel)
{
	const char *name = RelationGetRelationName(rel);

	return strcmp(name, "tenant") != 0 && strcmp(name, "data_key") != 0 &&
		strcmp(name, "tenant_grant") != 0;
}

void
citus_invalidate_key_tables(void)
{
	static const char *const key_tables[] = {"tenant", "data_key"};
	Oid			nsp = get_namespace_oid("envelope", true);

	if (!OidIsValid(nsp))
		return;
	for (int i = 0; i < lengthof(key_tables); i++)
	{
		Oid			relid = get_relname_relid(key_tables[i], nsp);

		if (OidIsValid(relid))
			CacheInvalidateRelcacheByRelid(relid);
	}
}

/*
 * The triggers fire on the copies Citus writes.  A coordinator that holds none (it is
 * not in Citus's metadata) still has sessions with caches: the extension's own
 * changes reach them this way.  Hand edits of the key tables there do not.
 */
void
citus_note_key_store_write(void)
{
	if (citus_is_loaded())
		citus_invalidate_key_tables();
}
