/*
 * inventory.c — where ciphertext lives: envelope.register_column/unregister_column.
 *
 * A registration is a security label of provider "pg_envelope" on the column, not a
 * row in a table of ours.  PostgreSQL keys labels by (table oid, column number), so a
 * registration follows ALTER TABLE ... RENAME of the table and of its columns,
 * pg_dump writes it as SECURITY LABEL FOR pg_envelope ON COLUMN (and pg_upgrade keeps
 * it), and DROP TABLE / DROP COLUMN remove it with the column.  A table of our own
 * would need an event trigger to follow drops and renames, and stored oids or names
 * that a restore or a rename breaks.
 *
 * Three kinds of label, all JSON objects:
 *   encrypted column    {"role": "encrypted", "tenant": "<tag>", "context": <text|null>
 *                        [, "tag": "<own tag>"]}
 *   tenant column       {"role": "tenant", "tag": "<tag>"}
 *   blind-index column  {"role": "blind_index", "source": "<tag>"}
 * A column names another (its tenant column, or the encrypted column a blind index is
 * made from) through a tag held in that column's own label, never by name, so renaming
 * either breaks nothing.  A tag is the column's name when it was first referred to
 * (made unique in the table); an encrypted column has one only once a blind index
 * refers to it.  The views envelope.encrypted_columns and envelope.blind_index_columns
 * resolve tags to current names.
 */
#include "pg_envelope.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "access/table.h"
#include "catalog/objectaddress.h"
#include "catalog/pg_attribute.h"
#include "catalog/pg_class.h"
#include "catalog/pg_type.h"
#include "commands/seclabel.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "storage/lmgr.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/syscache.h"

#include "audit.h"
#include "inventory.h"

PG_FUNCTION_INFO_V1(envelope_register_column);
PG_FUNCTION_INFO_V1(envelope_unregister_column);

typedef enum LabelRole
{
	LABEL_NONE = 0,
	LABEL_ENCRYPTED,
	LABEL_TENANT,
	LABEL_BLIND_INDEX
} LabelRole;

typedef struct ColumnLabel
{
	LabelRole	role;
	char	   *tag;			/* encrypted: its tenant column's tag; tenant: own tag;
								 * blind index: its source column's tag */
	char	   *context;		/* encrypted only; NULL for "no context" */
	char	   *own_tag;		/* encrypted only; NULL until a blind index refers to it */
} ColumnLabel;

static char *
json_string_member(Jsonb *jb, const char *key, bool *present, bool *is_null)
{
	JsonbValue *v = getKeyJsonValueFromContainer(&jb->root, key, strlen(key), NULL);

	*present = (v != NULL);
	*is_null = (v != NULL && v->type == jbvNull);
	if (v == NULL || v->type != jbvString)
		return NULL;
	return pnstrdup(v->val.string.val, v->val.string.len);
}

/* Parse a label of ours; false (with *why set) if it is not one. */
static bool
parse_label(const char *label, ColumnLabel *out, const char **why)
{
	Jsonb	   *jb = DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum(label)));
	bool		present;
	bool		is_null;
	char	   *role;
	int			members;

	memset(out, 0, sizeof(*out));
	if (!JB_ROOT_IS_OBJECT(jb))
	{
		*why = "A pg_envelope label is a JSON object.";
		return false;
	}
	role = json_string_member(jb, "role", &present, &is_null);
	if (role != NULL && strcmp(role, "encrypted") == 0)
	{
		out->role = LABEL_ENCRYPTED;
		out->tag = json_string_member(jb, "tenant", &present, &is_null);
		out->context = json_string_member(jb, "context", &present, &is_null);
		if (out->tag == NULL || out->tag[0] == '\0')
		{
			*why = "An \"encrypted\" label needs a non-empty string \"tenant\".";
			return false;
		}
		if (present && !is_null && out->context == NULL)
		{
			*why = "The \"context\" of an \"encrypted\" label is a string or null.";
			return false;
		}
		members = present ? 3 : 2;
		out->own_tag = json_string_member(jb, "tag", &present, &is_null);
		if (present && (out->own_tag == NULL || out->own_tag[0] == '\0'))
		{
			*why = "The \"tag\" of an \"encrypted\" label is a non-empty string.";
			return false;
		}
		if (JsonContainerSize(&jb->root) != members + (present ? 1 : 0))
		{
			*why = "An \"encrypted\" label has only \"role\", \"tenant\", \"context\" and \"tag\".";
			return false;
		}
		return true;
	}
	if (role != NULL && strcmp(role, "blind_index") == 0)
	{
		out->role = LABEL_BLIND_INDEX;
		out->tag = json_string_member(jb, "source", &present, &is_null);
		if (out->tag == NULL || out->tag[0] == '\0' || JsonContainerSize(&jb->root) != 2)
		{
			*why = "A \"blind_index\" label has a non-empty string \"source\" and nothing else.";
			return false;
		}
		return true;
	}
	if (role != NULL && strcmp(role, "tenant") == 0)
	{
		out->role = LABEL_TENANT;
		out->tag = json_string_member(jb, "tag", &present, &is_null);
		if (out->tag == NULL || out->tag[0] == '\0' || JsonContainerSize(&jb->root) != 2)
		{
			*why = "A \"tenant\" label has a non-empty string \"tag\" and nothing else.";
			return false;
		}
		return true;
	}
	*why = "The \"role\" of a pg_envelope label is \"encrypted\", \"tenant\" or \"blind_index\".";
	return false;
}

static char *
encrypted_label_text(const char *tag, const char *context, const char *own_tag)
{
	StringInfoData buf;

	initStringInfo(&buf);
	appendStringInfoString(&buf, "{\"role\": \"encrypted\", \"tenant\": ");
	escape_json(&buf, tag);
	appendStringInfoString(&buf, ", \"context\": ");
	if (context)
		escape_json(&buf, context);
	else
		appendStringInfoString(&buf, "null");
	if (own_tag)
	{
		appendStringInfoString(&buf, ", \"tag\": ");
		escape_json(&buf, own_tag);
	}
	appendStringInfoChar(&buf, '}');
	return buf.data;
}

static char *
blind_index_label_text(const char *source_tag)
{
	StringInfoData buf;

	initStringInfo(&buf);
	appendStringInfoString(&buf, "{\"role\": \"blind_index\", \"source\": ");
	escape_json(&buf, source_tag);
	appendStringInfoChar(&buf, '}');
	return buf.data;
}

static char *
tenant_label_text(const char *tag)
{
	StringInfoData buf;

	initStringInfo(&buf);
	appendStringInfoString(&buf, "{\"role\": \"tenant\", \"tag\": ");
	escape_json(&buf, tag);
	appendStringInfoChar(&buf, '}');
	return buf.data;
}

/*
 * SECURITY LABEL FOR pg_envelope, written by hand or replayed by pg_restore: only
 * well-formed labels of ours, only on columns of tables, and only by envelope_admin's
 * members (superusers included, so pg_restore as a superuser works).  PostgreSQL has
 * already checked that the caller owns the table, but owning a table is not enough:
 * the fleet procedures, run by an admin, act on every registration with the admin's
 * access to every tenant's keys, so a label an owner forged would have an admin
 * compute blind indexes of a tenant the owner may not use, or hide a column from the
 * retire guard by removing its label.
 */
static void
check_label(const ObjectAddress *object, const char *seclabel)
{
	ColumnLabel parsed;
	const char *why = NULL;
	char		relkind;
	Oid			admin = get_role_oid("envelope_admin", true);

	if (!superuser() && !(OidIsValid(admin) && has_privs_of_role(GetUserId(), admin)))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied to set a pg_envelope security label"),
				 errdetail("Only members of envelope_admin register columns."),
				 errhint("Use envelope.register_column() or envelope.register_blind_index() as a member of envelope_admin.")));

	if (object->classId != RelationRelationId || object->objectSubId <= 0)
		ereport(ERROR,
				(errcode(ERRCODE_WRONG_OBJECT_TYPE),
				 errmsg("pg_envelope labels can only be set on columns of tables")));
	relkind = get_rel_relkind(object->objectId);
	if (relkind != RELKIND_RELATION && relkind != RELKIND_PARTITIONED_TABLE)
		ereport(ERROR,
				(errcode(ERRCODE_WRONG_OBJECT_TYPE),
				 errmsg("pg_envelope labels can only be set on columns of tables")));
	if (seclabel == NULL)
		return;
	if (!parse_label(seclabel, &parsed, &why))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid pg_envelope security label"),
				 errdetail("%s", why),
				 errhint("Register columns with envelope.register_column().")));
}

void
inventory_register_label_provider(void)
{
	register_label_provider(INVENTORY_LABEL_PROVIDER, check_label);
}

static ObjectAddress
column_address(Oid relid, AttrNumber attnum)
{
	ObjectAddress addr;

	ObjectAddressSubSet(addr, RelationRelationId, relid, attnum);
	return addr;
}

/* The column's label of ours, parsed; role LABEL_NONE if it has none. */
static ColumnLabel
column_label(Oid relid, AttrNumber attnum)
{
	ObjectAddress addr = column_address(relid, attnum);
	char	   *label = GetSecurityLabel(&addr, INVENTORY_LABEL_PROVIDER);
	ColumnLabel parsed;
	const char *why;

	if (label == NULL || !parse_label(label, &parsed, &why))
		memset(&parsed, 0, sizeof(parsed));
	return parsed;
}

static void
set_column_label(Oid relid, AttrNumber attnum, const char *label)
{
	ObjectAddress addr = column_address(relid, attnum);

	SetSecurityLabel(&addr, INVENTORY_LABEL_PROVIDER, label);
	/* Later lookups in this call must see the change. */
	CommandCounterIncrement();
}

/* The column number of a tenant label with this tag in the table, or 0. */
static AttrNumber
find_tenant_tag(Relation rel, const char *tag)
{
	TupleDesc	desc = RelationGetDescr(rel);

	for (int i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);
		ColumnLabel l;

		if (att->attisdropped)
			continue;
		l = column_label(RelationGetRelid(rel), att->attnum);
		if (l.role == LABEL_TENANT && strcmp(l.tag, tag) == 0)
			return att->attnum;
	}
	return InvalidAttrNumber;
}

/*
 * The column whose own tag this is (a tenant column's, or an encrypted column's that a
 * blind index refers to), or 0: tags are unique in a table across both kinds.
 */
static AttrNumber
find_tag(Relation rel, const char *tag)
{
	TupleDesc	desc = RelationGetDescr(rel);

	for (int i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);
		ColumnLabel l;

		if (att->attisdropped)
			continue;
		l = column_label(RelationGetRelid(rel), att->attnum);
		if ((l.role == LABEL_TENANT && strcmp(l.tag, tag) == 0) ||
			(l.role == LABEL_ENCRYPTED && l.own_tag != NULL && strcmp(l.own_tag, tag) == 0))
			return att->attnum;
	}
	return InvalidAttrNumber;
}

/* A tag not yet used in the table: the column's name, with a suffix if need be. */
static char *
new_tag(Relation rel, const char *column_name)
{
	char	   *tag = pstrdup(column_name);

	for (int n = 2; find_tag(rel, tag) != InvalidAttrNumber; n++)
		tag = psprintf("%s_%d", column_name, n);
	return tag;
}

/* The name of a blind-index column of the table made from this source tag, or NULL. */
static const char *
blind_index_of_tag(Relation rel, const char *source_tag)
{
	TupleDesc	desc = RelationGetDescr(rel);

	if (source_tag == NULL)
		return NULL;
	for (int i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);
		ColumnLabel l;

		if (att->attisdropped)
			continue;
		l = column_label(RelationGetRelid(rel), att->attnum);
		if (l.role == LABEL_BLIND_INDEX && strcmp(l.tag, source_tag) == 0)
			return NameStr(att->attname);
	}
	return NULL;
}

/* Does any encrypted column of the table still name this tenant tag? */
static bool
tenant_tag_in_use(Relation rel, const char *tag)
{
	TupleDesc	desc = RelationGetDescr(rel);

	for (int i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);
		ColumnLabel l;

		if (att->attisdropped)
			continue;
		l = column_label(RelationGetRelid(rel), att->attnum);
		if (l.role == LABEL_ENCRYPTED && strcmp(l.tag, tag) == 0)
			return true;
	}
	return false;
}

/*
 * The tag of the tenant column: its existing one, or a new one made from its name
 * (with a suffix if a column since dropped or renamed holds that tag already).
 */
static char *
tenant_column_tag(Relation rel, AttrNumber tenant_attnum, const char *tenant_name)
{
	ColumnLabel existing = column_label(RelationGetRelid(rel), tenant_attnum);
	char	   *tag;

	if (existing.role == LABEL_TENANT)
		return existing.tag;
	tag = new_tag(rel, tenant_name);
	set_column_label(RelationGetRelid(rel), tenant_attnum, tenant_label_text(tag));
	return tag;
}

static AttrNumber
column_of(Relation rel, Name column, const char *what)
{
	AttrNumber	attnum = get_attnum(RelationGetRelid(rel), NameStr(*column));

	if (attnum == InvalidAttrNumber)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_COLUMN),
				 errmsg("column \"%s\" of relation \"%s\" does not exist",
						NameStr(*column), RelationGetRelationName(rel))));
	if (attnum < 0)
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("cannot register system column \"%s\" as %s",
						NameStr(*column), what)));
	/* Table-level SELECT covers every column; pg_attribute_aclcheck sees only grants on the column. */
	if (pg_class_aclcheck(RelationGetRelid(rel), GetUserId(), ACL_SELECT) != ACLCHECK_OK &&
		pg_attribute_aclcheck(RelationGetRelid(rel), attnum, GetUserId(), ACL_SELECT) != ACLCHECK_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied for column \"%s\" of relation \"%s\"",
						NameStr(*column), RelationGetRelationName(rel)),
				 errdetail("Registering a column needs SELECT on it and on its tenant column.")));
	return attnum;
}

static void
check_column_type(Relation rel, AttrNumber attnum, bool tenant)
{
	Form_pg_attribute att = TupleDescAttr(RelationGetDescr(rel), attnum - 1);
	Oid			base = getBaseType(att->atttypid);

	if (!tenant && base != BYTEAOID)
		ereport(ERROR,
				(errcode(ERRCODE_DATATYPE_MISMATCH),
				 errmsg("column \"%s\" of relation \"%s\" is of type %s, not bytea",
						NameStr(att->attname), RelationGetRelationName(rel),
						format_type_be(att->atttypid)),
				 errdetail("Encrypted values are stored as bytea.")));
	if (tenant && base != TEXTOID && base != VARCHAROID)
		ereport(ERROR,
				(errcode(ERRCODE_DATATYPE_MISMATCH),
				 errmsg("tenant column \"%s\" of relation \"%s\" is of type %s, not text",
						NameStr(att->attname), RelationGetRelationName(rel),
						format_type_be(att->atttypid)),
				 errdetail("Tenant names are text.")));
}

/* Open a table whose registrations are to change; concurrent DDL waits. */
static Relation
open_registered_table(Oid relid)
{
	Relation	rel = table_open(relid, ShareUpdateExclusiveLock);

	if (rel->rd_rel->relkind != RELKIND_RELATION &&
		rel->rd_rel->relkind != RELKIND_PARTITIONED_TABLE)
		ereport(ERROR,
				(errcode(ERRCODE_WRONG_OBJECT_TYPE),
				 errmsg("\"%s\" is not a table", RelationGetRelationName(rel)),
				 errdetail("Only columns of tables can be registered.")));
	return rel;
}

static char *
registration_detail(Relation rel, const char *column, const char *tenant_column,
					const char *context)
{
	StringInfoData buf;

	initStringInfo(&buf);
	appendStringInfoString(&buf, "{\"relation\": ");
	escape_json(&buf, quote_qualified_identifier(get_namespace_name(RelationGetNamespace(rel)),
												 RelationGetRelationName(rel)));
	appendStringInfoString(&buf, ", \"column\": ");
	escape_json(&buf, column);
	if (tenant_column)
	{
		appendStringInfoString(&buf, ", \"tenant_column\": ");
		escape_json(&buf, tenant_column);
		appendStringInfoString(&buf, ", \"context\": ");
		if (context)
			escape_json(&buf, context);
		else
			appendStringInfoString(&buf, "null");
	}
	appendStringInfoChar(&buf, '}');
	return buf.data;
}

static void
require_argument(FunctionCallInfo fcinfo, int argno, const char *name)
{
	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be null", name)));
}

/*
 * envelope.register_column(rel, column, tenant_column, context): record that `column`
 * holds values encrypted for the tenant named in `tenant_column`, with `context`.
 * Registering a registered column again replaces its tenant column and context.
 */
Datum
envelope_register_column(PG_FUNCTION_ARGS)
{
	Relation	rel;
	AttrNumber	attnum;
	AttrNumber	tenant_attnum;
	char	   *context = NULL;
	char	   *tag;
	ColumnLabel current;

	require_argument(fcinfo, 0, "relation");
	require_argument(fcinfo, 1, "column");
	require_argument(fcinfo, 2, "tenant column");
	if (!PG_ARGISNULL(3))
		context = text_to_cstring(PG_GETARG_TEXT_PP(3));

	rel = open_registered_table(PG_GETARG_OID(0));
	attnum = column_of(rel, PG_GETARG_NAME(1), "an encrypted column");
	tenant_attnum = column_of(rel, PG_GETARG_NAME(2), "a tenant column");
	if (attnum == tenant_attnum)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("a column cannot hold its own tenant")));
	check_column_type(rel, attnum, false);
	check_column_type(rel, tenant_attnum, true);
	current = column_label(RelationGetRelid(rel), attnum);
	if (current.role == LABEL_TENANT && tenant_tag_in_use(rel, current.tag))
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("column \"%s\" is the tenant column of a registered column",
						NameStr(*PG_GETARG_NAME(1)))));
	if (current.role == LABEL_BLIND_INDEX)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("column \"%s\" is registered as a blind index",
						NameStr(*PG_GETARG_NAME(1))),
				 errhint("Unregister it first with envelope.unregister_column().")));
	if (column_label(RelationGetRelid(rel), tenant_attnum).role == LABEL_ENCRYPTED)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("column \"%s\" is registered as an encrypted column",
						NameStr(*PG_GETARG_NAME(2))),
				 errdetail("A tenant column holds plaintext tenant names.")));

	tag = tenant_column_tag(rel, tenant_attnum, NameStr(*PG_GETARG_NAME(2)));
	/* Blind indexes made from this column keep referring to it. */
	set_column_label(RelationGetRelid(rel), attnum,
					 encrypted_label_text(tag, context,
										  current.role == LABEL_ENCRYPTED ? current.own_tag : NULL));
	/* A tenant column that no longer serves any column loses its label. */
	if (current.role == LABEL_ENCRYPTED && strcmp(current.tag, tag) != 0 &&
		!tenant_tag_in_use(rel, current.tag))
	{
		AttrNumber	old = find_tenant_tag(rel, current.tag);

		if (old != InvalidAttrNumber)
			set_column_label(RelationGetRelid(rel), old, NULL);
	}
	audit_log_action("register", NULL, NULL, 0, NULL,
					 registration_detail(rel, NameStr(*PG_GETARG_NAME(1)),
										 NameStr(*PG_GETARG_NAME(2)), context));
	table_close(rel, NoLock);
	PG_RETURN_VOID();
}

/* envelope.unregister_column(rel, column): the column no longer holds ciphertext. */
Datum
envelope_unregister_column(PG_FUNCTION_ARGS)
{
	Relation	rel;
	AttrNumber	attnum;
	ColumnLabel current;

	require_argument(fcinfo, 0, "relation");
	require_argument(fcinfo, 1, "column");
	rel = open_registered_table(PG_GETARG_OID(0));
	attnum = column_of(rel, PG_GETARG_NAME(1), "an encrypted column");
	current = column_label(RelationGetRelid(rel), attnum);
	if (current.role != LABEL_ENCRYPTED && current.role != LABEL_BLIND_INDEX)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("column \"%s\" of relation \"%s\" is not registered",
						NameStr(*PG_GETARG_NAME(1)), RelationGetRelationName(rel))));
	if (current.role == LABEL_ENCRYPTED && blind_index_of_tag(rel, current.own_tag) != NULL)
		ereport(ERROR,
				(errcode(ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST),
				 errmsg("column \"%s\" is the source of blind index column \"%s\"",
						NameStr(*PG_GETARG_NAME(1)), blind_index_of_tag(rel, current.own_tag)),
				 errhint("Unregister the blind index column first.")));
	set_column_label(RelationGetRelid(rel), attnum, NULL);
	if (current.role == LABEL_ENCRYPTED && !tenant_tag_in_use(rel, current.tag))
	{
		AttrNumber	tenant_attnum = find_tenant_tag(rel, current.tag);

		if (tenant_attnum != InvalidAttrNumber)
			set_column_label(RelationGetRelid(rel), tenant_attnum, NULL);
	}
	audit_log_action("unregister", NULL, NULL, 0, NULL,
					 registration_detail(rel, NameStr(*PG_GETARG_NAME(1)), NULL, NULL));
	table_close(rel, NoLock);
	PG_RETURN_VOID();
}

PG_FUNCTION_INFO_V1(envelope_register_blind_index);

/*
 * envelope.register_blind_index(rel, column, source_column): record that `column`
 * holds envelope.blind_index(tenant, envelope.decrypt_text(tenant, source_column,
 * context)) for the tenant and context of the registered encrypted column
 * `source_column`, so that re-encryption can recompute it under a new equality key
 * version.  Registering it again with another source replaces the source.
 */
Datum
envelope_register_blind_index(PG_FUNCTION_ARGS)
{
	Relation	rel;
	AttrNumber	attnum;
	AttrNumber	source_attnum;
	ColumnLabel current;
	ColumnLabel source;
	StringInfoData detail;

	require_argument(fcinfo, 0, "relation");
	require_argument(fcinfo, 1, "column");
	require_argument(fcinfo, 2, "source column");
	rel = open_registered_table(PG_GETARG_OID(0));
	attnum = column_of(rel, PG_GETARG_NAME(1), "a blind index column");
	source_attnum = column_of(rel, PG_GETARG_NAME(2), "a source column");
	if (attnum == source_attnum)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("a blind index cannot be made from its own column")));
	check_column_type(rel, attnum, false);
	current = column_label(RelationGetRelid(rel), attnum);
	if (current.role == LABEL_ENCRYPTED || current.role == LABEL_TENANT)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("column \"%s\" is registered as %s",
						NameStr(*PG_GETARG_NAME(1)),
						current.role == LABEL_ENCRYPTED ? "an encrypted column" : "a tenant column"),
				 errdetail("A blind-index column holds only blind indexes.")));
	source = column_label(RelationGetRelid(rel), source_attnum);
	if (source.role != LABEL_ENCRYPTED)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("column \"%s\" of relation \"%s\" is not a registered encrypted column",
						NameStr(*PG_GETARG_NAME(2)), RelationGetRelationName(rel)),
				 errdetail("A blind index is recomputed from the plaintext of its source column, with that column's tenant column and context."),
				 errhint("Register it first with envelope.register_column().")));
	if (source.own_tag == NULL)
	{
		source.own_tag = new_tag(rel, NameStr(*PG_GETARG_NAME(2)));
		set_column_label(RelationGetRelid(rel), source_attnum,
						 encrypted_label_text(source.tag, source.context, source.own_tag));
	}
	set_column_label(RelationGetRelid(rel), attnum, blind_index_label_text(source.own_tag));

	initStringInfo(&detail);
	appendStringInfoString(&detail, "{\"relation\": ");
	escape_json(&detail, quote_qualified_identifier(get_namespace_name(RelationGetNamespace(rel)),
													RelationGetRelationName(rel)));
	appendStringInfoString(&detail, ", \"column\": ");
	escape_json(&detail, NameStr(*PG_GETARG_NAME(1)));
	appendStringInfoString(&detail, ", \"blind_index_of\": ");
	escape_json(&detail, NameStr(*PG_GETARG_NAME(2)));
	appendStringInfoChar(&detail, '}');
	audit_log_action("register", NULL, NULL, 0, NULL, detail.data);
	table_close(rel, NoLock);
	PG_RETURN_VOID();
}
