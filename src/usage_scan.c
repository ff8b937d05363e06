/*
 * usage_scan.c — envelope.scan_key_usage(): how many values of one column use each
 * (tenant, DEK version, format), read straight from the table.
 *
 * count_key_usage() calls this once per block range of every registered column.  A
 * query doing the same (GROUP BY tenant, key_version(col)) costs several times a
 * count(*) of the table; here each row costs a deform up to the two columns, a peek at
 * the 5-byte header (toasted values fetch only that slice), and a hash probe that is
 * skipped while consecutive rows have the same tenant.  Nothing is decrypted, and no
 * key is needed.
 *
 * The scan runs as the caller with the caller's snapshot and privileges (SELECT on
 * both columns).  It reads the heap directly, so it cannot apply row-level security:
 * a table whose policies apply to the caller is refused rather than counted past them.
 */
#include "pg_envelope.h"

#include "access/detoast.h"
#include "access/heapam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/tableam.h"
#include "catalog/pg_class.h"
#include "catalog/pg_type.h"
#include "common/hashfn.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "storage/bufmgr.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/rls.h"
#include "utils/snapmgr.h"
#include "utils/tuplestore.h"

PG_FUNCTION_INFO_V1(envelope_scan_key_usage);

/* Versions of one tenant seen so far: few (rotations), so a short list suffices. */
typedef struct VersionCount
{
	int32		version;		/* 0 for values that are not pg_envelope ciphertexts */
	int16		format;			/* 1 randomized, 2 deterministic, 0 not a ciphertext */
	int64		count;
} VersionCount;

typedef struct TenantCounts
{
	uint32		hash;
	int			len;			/* bytes of name; names longer than a tenant's are cut */
	char		name[ENVELOPE_TENANT_MAX + 1];
	int			nversions;
	int			capacity;
	VersionCount *versions;
} TenantCounts;

/*
 * Tenants seen by one scan: open addressing on (length, bytes), so a probe hashes the
 * name in place, without copying it or measuring it again.
 */
typedef struct TenantTable
{
	TenantCounts **slots;
	uint32		mask;			/* capacity - 1, capacity a power of two */
	uint32		used;
	MemoryContext cxt;
} TenantTable;

/* Tenant names are short: an inline loop beats a call to memcmp for them. */
static inline bool
same_name(const TenantCounts *tc, const char *name, int len)
{
	if (tc->len != len)
		return false;
	for (int i = 0; i < len; i++)
		if (tc->name[i] != name[i])
			return false;
	return true;
}

static void
tenant_table_init(TenantTable *tt, MemoryContext cxt)
{
	tt->mask = 255;
	tt->used = 0;
	tt->cxt = cxt;
	tt->slots = MemoryContextAllocZero(cxt, sizeof(TenantCounts *) * (tt->mask + 1));
}

static void
tenant_table_grow(TenantTable *tt)
{
	TenantCounts **old = tt->slots;
	uint32		old_capacity = tt->mask + 1;

	tt->mask = old_capacity * 2 - 1;
	tt->slots = MemoryContextAllocZero(tt->cxt, sizeof(TenantCounts *) * (tt->mask + 1));
	for (uint32 i = 0; i < old_capacity; i++)
		if (old[i] != NULL)
		{
			uint32		j = old[i]->hash & tt->mask;

			while (tt->slots[j] != NULL)
				j = (j + 1) & tt->mask;
			tt->slots[j] = old[i];
		}
	pfree(old);
}

static TenantCounts *
tenant_table_get(TenantTable *tt, const char *name, int len)
{
	uint32		hash = hash_bytes((const unsigned char *) name, len);
	uint32		i = hash & tt->mask;
	TenantCounts *tc;

	for (; tt->slots[i] != NULL; i = (i + 1) & tt->mask)
	{
		tc = tt->slots[i];
		if (tc->hash == hash && same_name(tc, name, len))
			return tc;
	}
	tc = MemoryContextAllocZero(tt->cxt, sizeof(TenantCounts));
	tc->hash = hash;
	tc->len = len;
	memcpy(tc->name, name, len);
	tt->slots[i] = tc;
	if (++tt->used * 2 > tt->mask)
		tenant_table_grow(tt);
	return tc;
}

static void
count_value(TenantCounts *tc, int32 version, int16 format, MemoryContext cxt)
{
	for (int i = 0; i < tc->nversions; i++)
		if (tc->versions[i].version == version && tc->versions[i].format == format)
		{
			tc->versions[i].count++;
			return;
		}
	if (tc->nversions == tc->capacity)
	{
		tc->capacity = tc->capacity ? tc->capacity * 2 : 4;
		tc->versions = tc->versions
			? repalloc(tc->versions, sizeof(VersionCount) * tc->capacity)
			: MemoryContextAlloc(cxt, sizeof(VersionCount) * tc->capacity);
	}
	tc->versions[tc->nversions].version = version;
	tc->versions[tc->nversions].format = format;
	tc->versions[tc->nversions].count = 1;
	tc->nversions++;
}

/*
 * The format and version of a stored value from its first five bytes; (0, 0) when it
 * is not a pg_envelope ciphertext.  Only the header of a toasted value is fetched.
 */
static void
classify_value(Datum value, int16 *format, int32 *version)
{
	struct varlena *v = (struct varlena *) DatumGetPointer(value);
	Size		len = toast_raw_datum_size(value) - VARHDRSZ;
	/* Short (1-byte) headers count as "extended" but need no detoasting. */
	bool		stored_away = VARATT_IS_EXTERNAL(v) || VARATT_IS_COMPRESSED(v);
	struct varlena *head = stored_away ? detoast_attr_slice(v, 0, 5) : v;
	uint32		peeked;

	*format = 0;
	*version = 0;
	if (VARSIZE_ANY_EXHDR(head) < 5)
		return;
	/* cipher_peek_version reads the five header bytes and checks len against the format. */
	if (cipher_peek_version((const uint8 *) VARDATA_ANY(head), len, &peeked) == CIPHER_OK &&
		peeked <= PG_INT32_MAX)
	{
		*format = ((const uint8 *) VARDATA_ANY(head))[0];
		*version = (int32) peeked;
	}
	if (head != v)
		pfree(head);
}

static AttrNumber
readable_column(Relation rel, Name column)
{
	AttrNumber	attnum = get_attnum(RelationGetRelid(rel), NameStr(*column));

	if (attnum <= 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_COLUMN),
				 errmsg("column \"%s\" of relation \"%s\" does not exist",
						NameStr(*column), RelationGetRelationName(rel))));
	if (pg_class_aclcheck(RelationGetRelid(rel), GetUserId(), ACL_SELECT) != ACLCHECK_OK &&
		pg_attribute_aclcheck(RelationGetRelid(rel), attnum, GetUserId(), ACL_SELECT) != ACLCHECK_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied for column \"%s\" of relation \"%s\"",
						NameStr(*column), RelationGetRelationName(rel))));
	return attnum;
}

static Relation
open_scanned_table(Oid relid)
{
	Relation	rel = table_open(relid, AccessShareLock);

	if (rel->rd_rel->relkind != RELKIND_RELATION && rel->rd_rel->relkind != RELKIND_MATVIEW)
		ereport(ERROR,
				(errcode(ERRCODE_WRONG_OBJECT_TYPE),
				 errmsg("cannot scan \"%s\" for key usage", RelationGetRelationName(rel)),
				 errdetail("Only tables with storage can be scanned; scan each partition of a partitioned table."),
				 errhint("envelope.count_key_usage() walks the partitions itself.")));
	if (check_enable_rls(relid, InvalidOid, false) == RLS_ENABLED)
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("cannot count key usage in \"%s\": row-level security applies to the current role",
						RelationGetRelationName(rel)),
				 errhint("Count as the table's owner or as a role with BYPASSRLS.")));
	return rel;
}

static void
scan_range(Relation rel, AttrNumber value_att, AttrNumber tenant_att, int64 first_block,
		   int64 nblocks, TenantTable *tenants)
{
	ItemPointerData mintid;
	ItemPointerData maxtid;
	TableScanDesc scan;
	TupleTableSlot *slot = table_slot_create(rel, NULL);
	TenantCounts *last = NULL;
	int64		last_block = Min(first_block + nblocks, (int64) MaxBlockNumber) - 1;

	ItemPointerSet(&mintid, (BlockNumber) first_block, 0);
	ItemPointerSet(&maxtid, (BlockNumber) last_block, MaxOffsetNumber);
	scan = table_beginscan_tidrange(rel, GetActiveSnapshot(), &mintid, &maxtid);
	while (table_scan_getnextslot_tidrange(scan, ForwardScanDirection, slot))
	{
		bool		isnull;
		Datum		value;
		text	   *stored;
		text	   *tenant;
		const char *name;
		int			len;
		int16		format;
		int32		version;

		CHECK_FOR_INTERRUPTS();
		value = slot_getattr(slot, value_att, &isnull);
		if (isnull)
			continue;
		stored = (text *) DatumGetPointer(slot_getattr(slot, tenant_att, &isnull));
		if (isnull)
			continue;
		/* Compressed or out of line only for names far longer than a tenant's. */
		tenant = VARATT_IS_EXTERNAL(stored) || VARATT_IS_COMPRESSED(stored)
			? DatumGetTextPP(PointerGetDatum(stored)) : stored;
		name = VARDATA_ANY(tenant);
		len = Min(VARSIZE_ANY_EXHDR(tenant), ENVELOPE_TENANT_MAX);
		/* Rows of one tenant often come together: skip the probe for them. */
		if (last == NULL || !same_name(last, name, len))
			last = tenant_table_get(tenants, name, len);
		classify_value(value, &format, &version);
		count_value(last, version, format, tenants->cxt);
		if (tenant != stored)
			pfree(tenant);
	}
	table_endscan(scan);
	ExecDropSingleTupleTableSlot(slot);
}

/*
 * envelope.scan_key_usage(rel, column, tenant_column, first_block, nblocks): one row
 * per (tenant, version, format) among the non-null values of `column` with a non-null
 * tenant, in blocks [first_block, first_block + nblocks) (the whole table when both
 * are NULL).
 */
Datum
envelope_scan_key_usage(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	MemoryContext per_query;
	MemoryContext old;
	TupleDesc	desc;
	Tuplestorestate *store;
	Relation	rel;
	AttrNumber	value_att;
	AttrNumber	tenant_att;
	int64		first_block = PG_ARGISNULL(3) ? 0 : PG_GETARG_INT64(3);
	int64		nblocks = PG_ARGISNULL(4) ? (int64) MaxBlockNumber + 1 : PG_GETARG_INT64(4);
	TenantTable tenants;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1) || PG_ARGISNULL(2))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("relation, column and tenant column must not be null")));
	if (first_block < 0 || nblocks < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("block range must not be negative")));
	if (rsinfo == NULL || !IsA(rsinfo, ReturnSetInfo) ||
		!(rsinfo->allowedModes & SFRM_Materialize))
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("envelope.scan_key_usage() must be called in a FROM clause")));

	rel = open_scanned_table(PG_GETARG_OID(0));
	value_att = readable_column(rel, PG_GETARG_NAME(1));
	tenant_att = readable_column(rel, PG_GETARG_NAME(2));

	tenant_table_init(&tenants, CurrentMemoryContext);
	if (nblocks > 0 && first_block < RelationGetNumberOfBlocks(rel))
		scan_range(rel, value_att, tenant_att, first_block, nblocks, &tenants);
	table_close(rel, AccessShareLock);

	per_query = rsinfo->econtext->ecxt_per_query_memory;
	old = MemoryContextSwitchTo(per_query);
	if (get_call_result_type(fcinfo, NULL, &desc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	desc = CreateTupleDescCopy(desc);
	store = tuplestore_begin_heap(true, false, work_mem);
	MemoryContextSwitchTo(old);

	for (uint32 slot = 0; slot <= tenants.mask; slot++)
	{
		TenantCounts *tc = tenants.slots[slot];

		for (int i = 0; tc != NULL && i < tc->nversions; i++)
		{
			Datum		values[4];
			bool		nulls[4] = {false, false, false, false};

			values[0] = PointerGetDatum(cstring_to_text_with_len(tc->name, tc->len));
			values[1] = Int32GetDatum(tc->versions[i].version);
			values[2] = Int16GetDatum(tc->versions[i].format);
			values[3] = Int64GetDatum(tc->versions[i].count);
			tuplestore_putvalues(store, desc, values, nulls);
		}
	}
	rsinfo->returnMode = SFRM_Materialize;
	rsinfo->setResult = store;
	rsinfo->setDesc = desc;
	return (Datum) 0;
}
