/*
 * plaintext_guard.c — keep plaintext out of the catalog and the server log.
 *
 * The server log: every error that may carry a literal plaintext (a failed encrypt,
 * decrypt or KMS call) is raised with errhidestmt(true), which keeps the STATEMENT line
 * out of the log.  Raised inside PL/pgSQL, or inside any SQL function, the same error
 * also gets a CONTEXT line quoting the inner statement with its literals, added by the
 * caller's error-context callbacks after we raised it.  An emit_log_hook marks such an
 * error's context as hidden too (errhidecontext): the client, which sent the text,
 * still sees it; the server log does not.
 *
 * The catalog:
 * decrypt and decrypt_text are STABLE, never IMMUTABLE, and that alone keeps them out
 * of every place where PostgreSQL evaluates an expression on its own and stores the
 * result: index expressions and predicates, generated columns and (through
 * IMMUTABLE-only rules) everything derived from those.  One place does not ask for
 * immutability: the expressions of an extended-statistics object
 * (CREATE STATISTICS ... ON (expr)).  ANALYZE would evaluate decrypt over a sample of
 * the table and keep most-common values and histogram bounds of the plaintext in
 * pg_statistic_ext_data, where pg_stats_ext_exprs shows them and every physical
 * backup carries them.  So such an object is refused when it is created.
 *
 * Places that persist an expression's value only because the user wrote that value
 * there are left alone: a materialized view, a partition bound, a column default, a
 * table filled by INSERT ... SELECT.  So is a function of the user's own that wraps
 * decrypt: declaring it is asking for its results.
 *
 * The check runs in the object-access hook after the statistics row is inserted; the
 * row is read with SnapshotSelf, since the command has not made it visible yet, and an
 * error rolls the creation back.  It needs the library loaded in the backend that runs
 * CREATE STATISTICS, which shared_preload_libraries (where pg_envelope belongs) makes
 * sure of.
 */
#include "compat.h"

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "catalog/objectaccess.h"
#include "catalog/pg_language.h"
#include "catalog/pg_proc.h"
#include "catalog/pg_statistic_ext.h"
#include "catalog/namespace.h"
#include "nodes/nodeFuncs.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"

#include "plaintext_guard.h"

static object_access_hook_type prev_object_access_hook = NULL;
static emit_log_hook_type prev_emit_log_hook = NULL;

/*
 * An error whose statement is hidden from the server log has its context hidden
 * there too: the context of a nested statement quotes that statement.
 */
static void
plaintext_guard_emit_log(ErrorData *edata)
{
	if (edata->hide_stmt)
		edata->hide_ctx = true;
	if (prev_emit_log_hook)
		prev_emit_log_hook(edata);
}

/*
 * Whether a function returns plaintext: a C function of the extension's schema whose
 * symbol is one of the decrypting entry points (every overload and any future
 * envelope_decrypt_* symbol included).
 */
static bool
function_decrypts(Oid funcid, void *context)
{
	Oid			envelope_schema = *(Oid *) context;
	HeapTuple	tuple;
	Form_pg_proc proc;
	bool		decrypts = false;

	tuple = SearchSysCache1(PROCOID, ObjectIdGetDatum(funcid));
	if (!HeapTupleIsValid(tuple))
		return false;
	proc = (Form_pg_proc) GETSTRUCT(tuple);
	if (proc->pronamespace == envelope_schema && proc->prolang == ClanguageId)
	{
		bool		isnull;
		Datum		src = SysCacheGetAttr(PROCOID, tuple, Anum_pg_proc_prosrc, &isnull);

		if (!isnull)
		{
			char	   *symbol = TextDatumGetCString(src);

			decrypts = strncmp(symbol, "envelope_decrypt", strlen("envelope_decrypt")) == 0;
			pfree(symbol);
		}
	}
	ReleaseSysCache(tuple);
	return decrypts;
}

static bool
expression_decrypts_walker(Node *node, void *context)
{
	if (node == NULL)
		return false;
	if (check_functions_in_node(node, function_decrypts, context))
		return true;
	return expression_tree_walker(node, expression_decrypts_walker, context);
}

#ifdef ENVELOPE_HAS_STATISTICS_EXPRESSIONS
static void
refuse_decrypting_statistics(Oid statoid)
{
	/* The control file fixes the schema (the extension is not relocatable). */
	Oid			envelope_schema = get_namespace_oid("envelope", true);
	Relation	rel;
	ScanKeyData key;
	SysScanDesc scan;
	HeapTuple	tuple;
	Node	   *exprs = NULL;
	char	   *name = NULL;

	if (!OidIsValid(envelope_schema))
		return;

	rel = table_open(StatisticExtRelationId, AccessShareLock);
	ScanKeyInit(&key, Anum_pg_statistic_ext_oid, BTEqualStrategyNumber, F_OIDEQ,
				ObjectIdGetDatum(statoid));
	scan = systable_beginscan(rel, StatisticExtOidIndexId, true, SnapshotSelf, 1, &key);
	tuple = systable_getnext(scan);
	if (HeapTupleIsValid(tuple))
	{
		bool		isnull;
		Datum		datum = heap_getattr(tuple, Anum_pg_statistic_ext_stxexprs,
										 RelationGetDescr(rel), &isnull);

		if (!isnull)
		{
			char	   *node_text = TextDatumGetCString(datum);

			exprs = stringToNode(node_text);
			pfree(node_text);
		}
		name = pstrdup(NameStr(((Form_pg_statistic_ext) GETSTRUCT(tuple))->stxname));
	}
	systable_endscan(scan);
	table_close(rel, AccessShareLock);

	if (exprs != NULL && expression_decrypts_walker(exprs, &envelope_schema))
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("statistics object \"%s\" would store decrypted values", name),
				 errdetail("ANALYZE keeps most-common values and histogram bounds of statistics expressions in the catalog, where they would be plaintext."),
				 errhint("Build statistics on the ciphertext column, or on a blind index, instead.")));
}
#endif

static void
plaintext_guard_object_access(ObjectAccessType access, Oid classId, Oid objectId,
							  int subId, void *arg)
{
	if (prev_object_access_hook)
		prev_object_access_hook(access, classId, objectId, subId, arg);

#ifdef ENVELOPE_HAS_STATISTICS_EXPRESSIONS
	if (access == OAT_POST_CREATE && classId == StatisticExtRelationId)
		refuse_decrypting_statistics(objectId);
#endif
}

void
plaintext_guard_install(void)
{
	prev_object_access_hook = object_access_hook;
	object_access_hook = plaintext_guard_object_access;
	prev_emit_log_hook = emit_log_hook;
	emit_log_hook = plaintext_guard_emit_log;
}
