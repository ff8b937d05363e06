/*
 * keystore_read.c — the key cache's miss path: one tenant, every one of its DEK
 * versions and its granted roles, read straight from envelope.tenant, envelope.data_key
 * and envelope.tenant_grant through their own indexes.
 *
 * Why not SPI, as the rest of keystore.c does.  Every key store change anywhere bumps
 * one shared generation at commit, after which every backend re-reads every tenant it
 * meets; through SPI each re-read paid for a user switch, a GUC nest level and
 * search_path, SPI's memory contexts, plan revalidation and an executor start-up
 * (14.6-18.2 µs of CPU per re-read, against 4.8-6.2 µs here: test/bench/RESULTS.md,
 * "The key cache's miss path without SPI"), which made it a visible part of
 * reencrypt_all after rotate_keys.  Here it is three short index scans, the way
 * PostgreSQL's catalog code reads catalogs: table_open, systable_beginscan with
 * ScanKeys, heap_getattr.
 *
 * Why this is as safe as the SQL path.  The SQL path runs as the tables' owner with a
 * pinned search_path so that no object of the caller's choosing runs; here nothing
 * runs but the btree and equality functions of the tables' own indexes and columns,
 * and no privilege is checked (table_open checks none), so there is nobody to switch
 * to.  The snapshot rule is the same: the latest committed state, so that a revocation
 * committed a moment ago stops a REPEATABLE READ transaction too, and the statement's
 * snapshot in parallel mode, which may take no new one.  The latest snapshot carries
 * the current command id, so a transaction that changed the key store reads its own
 * changes, as the SQL path does.
 *
 * Nothing is hard-coded about the tables' shape: attribute numbers are looked up by
 * column name (a key store still at 0.1.0 has no tenant_grant, and ALTER EXTENSION
 * UPDATE adds columns), and each index is found in the table's index list by its key
 * columns.  The layout is cached per backend and forgotten on any invalidation of the
 * key tables (keystore_forget_relations, from the key cache's relcache callback).
 * The tables' locks are kept until the transaction ends, as the executor keeps them,
 * so the tables cannot be dropped under a layout in use, nor their indexes (dropping
 * an index locks its table too).  The index locks themselves are released by
 * systable_endscan after each scan; find_index keeps its own until the end.  Where a
 * column is missing or of another type, or the tables are shaped otherwise than the
 * reader expects (row security, inheritance, non-deterministic collations), the SQL
 * path answers instead; a missing or unfit index only means a heap scan.
 */
#include "pg_envelope.h"
#include "citus_support.h"
#include "keystore_read.h"

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/relation.h"
#include "access/stratnum.h"
#include "access/xact.h"
#include "catalog/pg_am.h"
#include "catalog/pg_class.h"
#include "catalog/pg_index.h"
#include "catalog/pg_opfamily.h"
#include "catalog/pg_type.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/rls.h"
#include "utils/snapmgr.h"

/* Where each column the reader needs is, and which index finds rows by it. */
typedef struct KeyTableLayout
{
	KeyStoreTables tables;		/* the relations described */

	/* envelope.tenant, found by name */
	AttrNumber	tenant_name;
	AttrNumber	tenant_id;
	AttrNumber	tenant_state;
	AttrNumber	tenant_active_version;
	Oid			tenant_name_collation;
	Oid			tenant_index;	/* InvalidOid: scan the heap */

	/* envelope.data_key, found by (tenant, version) */
	AttrNumber	key_tenant;
	AttrNumber	key_version;
	AttrNumber	key_state;
	AttrNumber	key_kms_provider;
	AttrNumber	key_kms_key;
	AttrNumber	key_wrapped;
	Oid			key_tenant_collation;
	Oid			key_index;

	/* envelope.tenant_grant, found by tenant; unused while tables.tenant_grant is unset */
	AttrNumber	grant_tenant;
	AttrNumber	grant_role;
	Oid			grant_tenant_collation;
	Oid			grant_index;
} KeyTableLayout;

/* The key tables, opened and locked for one read. */
typedef struct KeyTableRelations
{
	Relation	tenant;
	Relation	data_key;
	Relation	tenant_grant;	/* NULL at 0.1.0 */
} KeyTableRelations;

static KeyTableLayout cached_layout;
static bool cached_layout_valid = false;
/* The cached layout's tables lack what the reader needs: the SQL path answers. */
static bool cached_layout_unusable = false;

/*
 * Counts keystore_direct_forget calls: a layout described while an invalidation
 * arrived (opening an index accepts invalidations) is used once but not kept.
 */
static uint64 layout_forget_count = 0;

/* Everything a read allocates besides its results; reset after every read. */
static MemoryContext read_cxt = NULL;

void
keystore_direct_forget(void)
{
	cached_layout_valid = false;
	layout_forget_count++;
}

TenantState
keystore_tenant_state_of(const char *word, size_t len)
{
	if (len == 6 && memcmp(word, "active", 6) == 0)
		return TENANT_ACTIVE;
	if (len == 8 && memcmp(word, "disabled", 8) == 0)
		return TENANT_DISABLED;
	return TENANT_DESTROYED;
}

KeyState
keystore_key_state_of(const char *word, size_t len)
{
	if (len == 6 && memcmp(word, "active", 6) == 0)
		return KEY_ACTIVE;
	if (len == 7 && memcmp(word, "retired", 7) == 0)
		return KEY_RETIRED;
	return KEY_DESTROYED;
}

/* ---------------------------------------------------------------------------
 * The tables' layout
 */

/* The number of column `name` if it exists with type `type` (its collation in *collation). */
static AttrNumber
column_number(Relation rel, const char *name, Oid type, Oid *collation)
{
	TupleDesc	desc = RelationGetDescr(rel);

	for (int i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);

		if (att->attisdropped || strcmp(NameStr(att->attname), name) != 0)
			continue;
		if (att->atttypid != type)
			return InvalidAttrNumber;
		if (collation != NULL)
			*collation = att->attcollation;
		return att->attnum;
	}
	return InvalidAttrNumber;
}

static bool
collation_is_deterministic(Oid collation)
{
	return !OidIsValid(collation) || get_collation_isdeterministic(collation);
}

/*
 * The btree operator family whose equality is the one the reader's ScanKeys use
 * (texteq, int4eq) for a column of type `type`; InvalidOid for any other type.
 */
static Oid
equality_opfamily(Oid type)
{
	switch (type)
	{
		case TEXTOID:
			return TEXT_BTREE_FAM_OID;
		case INT4OID:
			return INTEGER_BTREE_FAM_OID;
		default:
			return InvalidOid;
	}
}

/*
 * Can `index` find rows by equality on `keys` (its leading key columns, in order)?  A
 * valid btree on plain columns, without predicate, usable by every snapshot (no
 * indcheckxmin), whose key columns are compared by the type's own default operator
 * family (text_ops, integer_ops) in the columns' own, deterministic collations.
 * Anything else could order rows the ScanKey's equality tells apart as equal (bpchar_ops
 * on text makes 'acme' and 'acme ' equal, so a scan would stop early and miss rows, a
 * missed grant opening a restricted tenant), and would run a support function of
 * somebody's choosing as the caller.
 */
static bool
index_leads_with(Relation heap, Relation index, const AttrNumber *keys, int nkeys)
{
	Form_pg_index form = index->rd_index;

	if (index->rd_rel->relam != BTREE_AM_OID || !form->indisvalid || form->indcheckxmin ||
		IndexRelationGetNumberOfKeyAttributes(index) < nkeys ||
		!heap_attisnull(index->rd_indextuple, Anum_pg_index_indexprs, NULL) ||
		!heap_attisnull(index->rd_indextuple, Anum_pg_index_indpred, NULL))
		return false;
	for (int i = 0; i < nkeys; i++)
	{
		Form_pg_attribute att = TupleDescAttr(RelationGetDescr(heap), keys[i] - 1);
		Oid			opfamily = equality_opfamily(att->atttypid);

		if (form->indkey.values[i] != keys[i] || !OidIsValid(opfamily) ||
			index->rd_opfamily[i] != opfamily ||
			index->rd_opcintype[i] != att->atttypid ||
			index->rd_indcollation[i] != att->attcollation ||
			!collation_is_deterministic(att->attcollation))
			return false;
	}
	return true;
}

/* An index of `heap` that finds rows by equality on `keys`; InvalidOid if none. */
static Oid
find_index(Relation heap, const AttrNumber *keys, int nkeys)
{
	List	   *indexes = RelationGetIndexList(heap);
	ListCell   *lc;
	Oid			found = InvalidOid;

	foreach(lc, indexes)
	{
		Oid			indexoid = lfirst_oid(lc);
		Relation	index = index_open(indexoid, AccessShareLock);
		bool		fits = index_leads_with(heap, index, keys, nkeys);

		/*
		 * Kept locked until the transaction ends.  The scans' own index locks are
		 * released by systable_endscan: what keeps an index in place under a layout in
		 * use is the lock on its table, which any DROP INDEX waits for.
		 */
		index_close(index, NoLock);
		if (fits)
		{
			found = indexoid;
			break;
		}
	}
	list_free(indexes);
	return found;
}

/* Describe the opened key tables; false if a column the reader needs is missing. */
static bool
describe_key_tables(const KeyTableRelations *rels, const KeyStoreTables *tables,
					KeyTableLayout *layout)
{
	AttrNumber	keys[2];

	memset(layout, 0, sizeof(*layout));
	layout->tables = *tables;

	layout->tenant_name = column_number(rels->tenant, "tenant", TEXTOID, &layout->tenant_name_collation);
	layout->tenant_id = column_number(rels->tenant, "tenant_id", INT4OID, NULL);
	layout->tenant_state = column_number(rels->tenant, "state", TEXTOID, NULL);
	layout->tenant_active_version = column_number(rels->tenant, "active_version", INT4OID, NULL);

	layout->key_tenant = column_number(rels->data_key, "tenant", TEXTOID, &layout->key_tenant_collation);
	layout->key_version = column_number(rels->data_key, "version", INT4OID, NULL);
	layout->key_state = column_number(rels->data_key, "state", TEXTOID, NULL);
	layout->key_kms_provider = column_number(rels->data_key, "kms_provider", TEXTOID, NULL);
	layout->key_kms_key = column_number(rels->data_key, "kms_key", TEXTOID, NULL);
	layout->key_wrapped = column_number(rels->data_key, "wrapped_dek", BYTEAOID, NULL);

	if (layout->tenant_name == InvalidAttrNumber || layout->tenant_id == InvalidAttrNumber ||
		layout->tenant_state == InvalidAttrNumber ||
		layout->tenant_active_version == InvalidAttrNumber ||
		layout->key_tenant == InvalidAttrNumber || layout->key_version == InvalidAttrNumber ||
		layout->key_state == InvalidAttrNumber || layout->key_kms_provider == InvalidAttrNumber ||
		layout->key_kms_key == InvalidAttrNumber || layout->key_wrapped == InvalidAttrNumber)
		return false;

	if (rels->tenant_grant != NULL)
	{
		layout->grant_tenant = column_number(rels->tenant_grant, "tenant", TEXTOID,
											 &layout->grant_tenant_collation);
		layout->grant_role = column_number(rels->tenant_grant, "role", REGROLEOID, NULL);
		if (layout->grant_tenant == InvalidAttrNumber || layout->grant_role == InvalidAttrNumber)
			return false;
	}

	/*
	 * A non-deterministic collation makes texteq compare by collation rules, which a
	 * heap scan would follow but which this reader was not written for: SQL answers.
	 */
	if (!collation_is_deterministic(layout->tenant_name_collation) ||
		!collation_is_deterministic(layout->key_tenant_collation) ||
		(rels->tenant_grant != NULL &&
		 !collation_is_deterministic(layout->grant_tenant_collation)))
		return false;

	keys[0] = layout->tenant_name;
	layout->tenant_index = find_index(rels->tenant, keys, 1);
	keys[0] = layout->key_tenant;
	keys[1] = layout->key_version;
	layout->key_index = find_index(rels->data_key, keys, 2);
	if (rels->tenant_grant != NULL)
	{
		keys[0] = layout->grant_tenant;
		layout->grant_index = find_index(rels->tenant_grant, keys, 1);
	}
	return true;
}

/*
 * The layout of the opened tables, from the cache or described now; false: unusable.
 * An unusable layout is cached too (until the same invalidation), so that a key store
 * the reader cannot read costs one description, not one per miss.
 */
static bool
key_table_layout(const KeyTableRelations *rels, const KeyStoreTables *tables,
				 KeyTableLayout *layout)
{
	uint64		forget_count = layout_forget_count;
	bool		usable;

	if (cached_layout_valid &&
		memcmp(&cached_layout.tables, tables, sizeof(KeyStoreTables)) == 0)
	{
		*layout = cached_layout;
		return !cached_layout_unusable;
	}
	usable = describe_key_tables(rels, tables, layout);
	if (forget_count == layout_forget_count)
	{
		cached_layout = *layout;
		cached_layout_unusable = !usable;
		cached_layout_valid = true;
	}
	return usable;
}

/* ---------------------------------------------------------------------------
 * Opening the tables
 */

/*
 * Open and lock a key table; NULL if it has gone (the extension dropped, and perhaps
 * created again, since this backend looked its tables up).
 */
static Relation
open_key_table(Oid relid)
{
	return try_relation_open(relid, AccessShareLock);
}

/*
 * Is a key table a plain table holding all its rows itself?  A partitioned table, a
 * view or foreign table put in its place, or inheritance children (whose rows a query
 * on the parent returns) are read by the SQL path, which sees them all.
 */
static bool
key_table_is_plain(Relation rel)
{
	return rel->rd_rel->relkind == RELKIND_RELATION && !rel->rd_rel->relhassubclass;
}

/*
 * Could row security filter what the key store's owner, as whom the SQL path reads,
 * sees of a key table?  check_enable_rls answers RLS_NONE only where no policy can
 * apply at all; anything else (FORCE, an owner without BYPASSRLS under FORCE, the
 * row_security setting) is for the SQL path, whose executor applies the policies.
 */
static bool
row_security_may_apply(Relation rel, Oid owner)
{
	return rel->rd_rel->relrowsecurity &&
		check_enable_rls(RelationGetRelid(rel), owner, true) != RLS_NONE;
}

static void
close_key_tables(KeyTableRelations *rels)
{
	/* Locks are kept until the transaction ends, as the executor keeps them. */
	if (rels->tenant_grant != NULL)
		relation_close(rels->tenant_grant, NoLock);
	if (rels->data_key != NULL)
		relation_close(rels->data_key, NoLock);
	if (rels->tenant != NULL)
		relation_close(rels->tenant, NoLock);
}

/* ---------------------------------------------------------------------------
 * The three reads
 */

static int32
int4_attr(HeapTuple tuple, TupleDesc desc, AttrNumber attnum)
{
	bool		isnull;
	Datum		d = heap_getattr(tuple, attnum, desc, &isnull);

	return isnull ? 0 : DatumGetInt32(d);
}

/* A text column's words, detoasted (if ever needed) in the read's context. */
static text *
text_attr(HeapTuple tuple, TupleDesc desc, AttrNumber attnum)
{
	bool		isnull;
	Datum		d = heap_getattr(tuple, attnum, desc, &isnull);

	return isnull ? NULL : DatumGetTextPP(d);
}

/* A copy of a text column in `cxt`, NULL for NULL. */
static char *
copy_text_attr(HeapTuple tuple, TupleDesc desc, AttrNumber attnum, MemoryContext cxt)
{
	text	   *t = text_attr(tuple, desc, attnum);
	size_t		len;
	char	   *s;

	if (t == NULL)
		return NULL;
	len = VARSIZE_ANY_EXHDR(t);
	s = MemoryContextAlloc(cxt, len + 1);
	memcpy(s, VARDATA_ANY(t), len);
	s[len] = '\0';
	return s;
}

/* A copy of a bytea column in `cxt` (detoasted, with a 4-byte header), NULL for NULL. */
static bytea *
copy_bytea_attr(HeapTuple tuple, TupleDesc desc, AttrNumber attnum, MemoryContext cxt)
{
	bool		isnull;
	Datum		d = heap_getattr(tuple, attnum, desc, &isnull);
	MemoryContext old;
	bytea	   *copy;

	if (isnull)
		return NULL;
	old = MemoryContextSwitchTo(cxt);
	copy = DatumGetByteaPCopy(d);
	MemoryContextSwitchTo(old);
	return copy;
}

static TenantState
tenant_state_attr(HeapTuple tuple, TupleDesc desc, AttrNumber attnum)
{
	text	   *t = text_attr(tuple, desc, attnum);

	return t ? keystore_tenant_state_of(VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t)) : TENANT_DESTROYED;
}

static KeyState
key_state_attr(HeapTuple tuple, TupleDesc desc, AttrNumber attnum)
{
	text	   *t = text_attr(tuple, desc, attnum);

	return t ? keystore_key_state_of(VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t)) : KEY_DESTROYED;
}

/* An equality ScanKey on a column, compared in the column's collation. */
static void
equality_key(ScanKey key, AttrNumber attnum, RegProcedure eqproc, Oid collation, Datum value)
{
	ScanKeyEntryInitialize(key, 0, attnum, BTEqualStrategyNumber, InvalidOid,
						   collation, eqproc, value);
}

/* The tenant's row: id, state and active version; false if there is none. */
static bool
read_tenant_row(Relation rel, const KeyTableLayout *layout, Snapshot snapshot,
				Datum name, TenantKeyRecord *out)
{
	TupleDesc	desc = RelationGetDescr(rel);
	ScanKeyData key;
	SysScanDesc scan;
	HeapTuple	tuple;
	bool		found;

	equality_key(&key, layout->tenant_name, F_TEXTEQ, layout->tenant_name_collation, name);
	scan = systable_beginscan(rel, layout->tenant_index, OidIsValid(layout->tenant_index),
							  snapshot, 1, &key);
	tuple = systable_getnext(scan);
	found = HeapTupleIsValid(tuple);
	if (found)
	{
		out->tenant_id = int4_attr(tuple, desc, layout->tenant_id);
		out->state = tenant_state_attr(tuple, desc, layout->tenant_state);
		out->active_version = int4_attr(tuple, desc, layout->tenant_active_version);
	}
	systable_endscan(scan);
	return found;
}

static int
version_record_cmp(const void *a, const void *b)
{
	int32		va = ((const VersionKeyRecord *) a)->version;
	int32		vb = ((const VersionKeyRecord *) b)->version;

	return va < vb ? -1 : va > vb;
}

/*
 * Every DEK version of the tenant, ascending, into out->versions (copied into
 * `result_cxt`), and the one of `version` into out->key, if it exists: one range scan
 * of the (tenant, version) index by its first column.
 */
static void
read_data_key_rows(Relation rel, const KeyTableLayout *layout, Snapshot snapshot,
				   Datum name, int32 version, TenantKeyRecord *out, MemoryContext result_cxt)
{
	TupleDesc	desc = RelationGetDescr(rel);
	ScanKeyData key;
	SysScanDesc scan;
	HeapTuple	tuple;
	int			maxversions = 0;

	equality_key(&key, layout->key_tenant, F_TEXTEQ, layout->key_tenant_collation, name);
	scan = systable_beginscan(rel, layout->key_index, OidIsValid(layout->key_index),
							  snapshot, 1, &key);
	while (HeapTupleIsValid(tuple = systable_getnext(scan)))
	{
		VersionKeyRecord *vr;

		if (out->nversions == maxversions)
		{
			maxversions = Max(4, maxversions * 2);
			out->versions = out->versions == NULL ?
				MemoryContextAlloc(result_cxt, sizeof(VersionKeyRecord) * maxversions) :
				repalloc(out->versions, sizeof(VersionKeyRecord) * maxversions);
		}
		vr = &out->versions[out->nversions++];
		vr->version = int4_attr(tuple, desc, layout->key_version);
		vr->key.state = key_state_attr(tuple, desc, layout->key_state);
		vr->key.kms_provider = copy_text_attr(tuple, desc, layout->key_kms_provider, result_cxt);
		vr->key.kms_key = copy_text_attr(tuple, desc, layout->key_kms_key, result_cxt);
		vr->key.wrapped = copy_bytea_attr(tuple, desc, layout->key_wrapped, result_cxt);
	}
	systable_endscan(scan);

	/* A heap scan (no usable index) finds them in any order. */
	if (out->nversions > 1)
		qsort(out->versions, out->nversions, sizeof(VersionKeyRecord), version_record_cmp);
	for (int i = 0; i < out->nversions; i++)
		if (out->versions[i].version == version)
		{
			out->key_found = true;
			out->version = version;
			out->key = out->versions[i].key;
		}
}

/*
 * The roles granted the tenant, ascending, into out (copied into `result_cxt`); false
 * if a grant names no role (NOT NULL dropped from the column), which the SQL path
 * refuses with an error of its own: it answers then.
 */
static bool
read_grants(Relation rel, const KeyTableLayout *layout, Snapshot snapshot,
			Datum name, TenantKeyRecord *out, MemoryContext result_cxt)
{
	TupleDesc	desc = RelationGetDescr(rel);
	ScanKeyData key;
	SysScanDesc scan;
	HeapTuple	tuple;
	Oid		   *roles = NULL;
	int			nroles = 0;
	int			maxroles = 0;

	equality_key(&key, layout->grant_tenant, F_TEXTEQ, layout->grant_tenant_collation, name);
	scan = systable_beginscan(rel, layout->grant_index, OidIsValid(layout->grant_index),
							  snapshot, 1, &key);
	while (HeapTupleIsValid(tuple = systable_getnext(scan)))
	{
		bool		isnull;
		Datum		role = heap_getattr(tuple, layout->grant_role, desc, &isnull);

		if (isnull)
		{
			systable_endscan(scan);
			return false;
		}
		if (nroles == maxroles)
		{
			maxroles = Max(8, maxroles * 2);
			roles = roles ? repalloc(roles, sizeof(Oid) * maxroles) : palloc(sizeof(Oid) * maxroles);
		}
		roles[nroles++] = DatumGetObjectId(role);
	}
	systable_endscan(scan);

	if (nroles == 0)
		return true;
	qsort(roles, nroles, sizeof(Oid), oid_cmp);
	out->grant_roles = MemoryContextAlloc(result_cxt, sizeof(Oid) * nroles);
	memcpy(out->grant_roles, roles, sizeof(Oid) * nroles);
	out->ngrants = nroles;
	return true;
}

/* The three reads, in the read's context; results in `result_cxt`. */
static KeyStoreDirectRead
read_tenant_key(const KeyTableRelations *rels, const KeyTableLayout *layout,
				const char *tenant, int32 version, TenantKeyRecord *out,
				MemoryContext result_cxt)
{
	/* As the SQL path: a revocation committed a moment ago stops this reader too. */
	Snapshot	snapshot = RegisterSnapshot(IsInParallelMode() ? GetActiveSnapshot()
											: GetLatestSnapshot());
	Datum		name = CStringGetTextDatum(tenant);
	KeyStoreDirectRead result = KEYSTORE_READ_NO_TENANT;

	if (read_tenant_row(rels->tenant, layout, snapshot, name, out))
	{
		result = KEYSTORE_READ_FOUND;
		read_data_key_rows(rels->data_key, layout, snapshot, name,
						   version == 0 ? out->active_version : version, out, result_cxt);
		if (rels->tenant_grant != NULL &&
			!read_grants(rels->tenant_grant, layout, snapshot, name, out, result_cxt))
			result = KEYSTORE_READ_UNSUPPORTED;
	}
	UnregisterSnapshot(snapshot);
	return result;
}

KeyStoreDirectRead
keystore_direct_read_tenant_key(const KeyStoreTables *tables, const char *tenant,
								int32 version, TenantKeyRecord *out)
{
	MemoryContext caller_cxt = CurrentMemoryContext;
	KeyTableRelations rels = {0};
	KeyTableLayout layout;
	KeyStoreDirectRead result;

	memset(out, 0, sizeof(*out));

	/*
	 * Under Citus the key tables are reference tables: their rows live in shard
	 * placements (envelope.tenant_102008), and the tables named here are empty shells
	 * on every node.  Only a query planned by Citus finds the rows, so SQL it is.
	 */
	if (citus_is_loaded())
		return KEYSTORE_READ_UNSUPPORTED;

	rels.tenant = open_key_table(tables->tenant);
	rels.data_key = open_key_table(tables->data_key);
	if (OidIsValid(tables->tenant_grant))
		rels.tenant_grant = open_key_table(tables->tenant_grant);
	if (rels.tenant == NULL || rels.data_key == NULL ||
		(OidIsValid(tables->tenant_grant) && rels.tenant_grant == NULL))
	{
		close_key_tables(&rels);
		return KEYSTORE_READ_TABLES_GONE;
	}
	if (!key_table_is_plain(rels.tenant) || !key_table_is_plain(rels.data_key) ||
		(rels.tenant_grant != NULL && !key_table_is_plain(rels.tenant_grant)) ||
		row_security_may_apply(rels.tenant, tables->owner) ||
		row_security_may_apply(rels.data_key, tables->owner) ||
		(rels.tenant_grant != NULL && row_security_may_apply(rels.tenant_grant, tables->owner)) ||
		!key_table_layout(&rels, tables, &layout))
	{
		close_key_tables(&rels);
		return KEYSTORE_READ_UNSUPPORTED;
	}

	/*
	 * Scan descriptors and detoasted values go into a context of their own, reset
	 * after every read (and before, should the last one have failed): the miss path
	 * runs once per row in a long scan, so nothing may pile up in the caller's context.
	 */
	if (read_cxt == NULL)
		read_cxt = AllocSetContextCreate(TopMemoryContext, "pg_envelope key store read",
										 ALLOCSET_DEFAULT_SIZES);
	MemoryContextReset(read_cxt);
	MemoryContextSwitchTo(read_cxt);
	result = read_tenant_key(&rels, &layout, tenant, version, out, caller_cxt);
	MemoryContextSwitchTo(caller_cxt);
	MemoryContextReset(read_cxt);

	close_key_tables(&rels);
	if (result == KEYSTORE_READ_UNSUPPORTED)
		memset(out, 0, sizeof(*out));
	return result;
}
