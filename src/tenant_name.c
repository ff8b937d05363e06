/*
 * tenant_name.c — the grammar of new tenant names.
 *
 * A tenant name is bound into every ciphertext, sent to the KMS as encryption context,
 * written to the audit trail and printed in error messages and logs.  Names that look
 * like something else there are refused when a tenant is created:
 *
 *  - control characters: C0, DEL and C1 (U+0080..U+009F, e.g. U+0085 NEXT LINE and
 *    U+009B, the 8-bit CSI that terminals obey);
 *  - format characters (Unicode general category Cf): bidirectional overrides and
 *    isolates (U+202A..U+202E, U+2066..U+2069), zero-width characters (U+200B..U+200F,
 *    U+2060..U+2064), the byte order mark U+FEFF, soft hyphen, tags and the rest;
 *  - line and paragraph separators (U+2028, U+2029);
 *  - in a UTF-8 database, names not in Unicode normalization form NFC, so that "café"
 *    typed precomposed and decomposed cannot become two tenants that print the same.
 *    Refused, not normalised: a tenant is the exact bytes the application sends with
 *    every row, and silently normalising at creation would create a tenant that the
 *    application's own (non-NFC) name then fails to find.
 *
 * In another encoding the name is checked through its UTF-8 form (the form that is
 * bound into ciphertexts).  In SQL_ASCII the bytes have no declared encoding: they are
 * checked as UTF-8 when they are valid UTF-8, and otherwise only for C0 and DEL.
 *
 * The Cf list follows Unicode 15.0 (DerivedGeneralCategory.txt); PostgreSQL 15 has no
 * general-category lookup of its own.
 */
#include "compat.h"

#include "common/hashfn.h"
#include "common/unicode_norm.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "storage/lock.h"

#include "tenant_name.h"

typedef struct CodePointRange
{
	pg_wchar	first;
	pg_wchar	last;
} CodePointRange;

/* Cc, Cf, Zl and Zp, sorted. */
static const CodePointRange refused_code_points[] = {
	{0x0000, 0x001F}, {0x007F, 0x009F}, {0x00AD, 0x00AD}, {0x0600, 0x0605},
	{0x061C, 0x061C}, {0x06DD, 0x06DD}, {0x070F, 0x070F}, {0x0890, 0x0891},
	{0x08E2, 0x08E2}, {0x180E, 0x180E}, {0x200B, 0x200F}, {0x2028, 0x202E},
	{0x2060, 0x2064}, {0x2066, 0x206F}, {0xFEFF, 0xFEFF}, {0xFFF9, 0xFFFB},
	{0x110BD, 0x110BD}, {0x110CD, 0x110CD}, {0x13430, 0x1343F}, {0x1BCA0, 0x1BCA3},
	{0x1D173, 0x1D17A}, {0xE0001, 0xE0001}, {0xE0020, 0xE007F},
};

static bool
code_point_refused(pg_wchar c)
{
	int			lo = 0;
	int			hi = lengthof(refused_code_points) - 1;

	while (lo <= hi)
	{
		int			mid = (lo + hi) / 2;

		if (c < refused_code_points[mid].first)
			hi = mid - 1;
		else if (c > refused_code_points[mid].last)
			lo = mid + 1;
		else
			return true;
	}
	return false;
}

static void
refuse(const char *why)
{
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("tenant name must not contain %s", why),
			 errdetail("Tenant names are bound into every value and printed in logs; characters that are invisible or change how text is shown are refused."),
			 errhidestmt(true)));
}

/*
 * Decode valid UTF-8 into a zero-terminated code-point array, refusing control,
 * format and separator characters on the way.
 */
static pg_wchar *
decode_and_check_utf8(const unsigned char *s, size_t len)
{
	pg_wchar   *cps = palloc((len + 1) * sizeof(pg_wchar));
	size_t		n = 0;

	for (size_t i = 0; i < len;)
	{
		int			l = pg_utf_mblen(s + i);
		pg_wchar	c = utf8_to_unicode(s + i);

		if (code_point_refused(c))
			refuse(c < 0x20 || (c >= 0x7F && c <= 0x9F) ? "control characters"
				   : "format or separator characters");
		cps[n++] = c;
		i += l;
	}
	cps[n] = 0;
	return cps;
}

static bool
is_nfc(const pg_wchar *cps)
{
	UnicodeNormalizationQC qc = unicode_is_normalized_quickcheck(UNICODE_NFC, cps);
	pg_wchar   *normalized;
	bool		same = true;
	size_t		i;

	if (qc != UNICODE_NORM_QC_MAYBE)
		return qc == UNICODE_NORM_QC_YES;
	normalized = unicode_normalize(UNICODE_NFC, cps);
	for (i = 0; cps[i] != 0 && normalized[i] != 0; i++)
		if (cps[i] != normalized[i])
			same = false;
	same = same && cps[i] == 0 && normalized[i] == 0;
	pfree(normalized);
	return same;
}

void
tenant_name_check_new(const char *name, size_t len)
{
	int			encoding = GetDatabaseEncoding();
	const unsigned char *utf8 = (const unsigned char *) name;
	pg_wchar   *cps;

	if (encoding == PG_SQL_ASCII)
	{
		if (!pg_verify_mbstr(PG_UTF8, name, (int) len, true))
			return;				/* opaque bytes: C0 and DEL were checked on lookup */
	}
	else if (encoding != PG_UTF8)
		utf8 = (const unsigned char *) pg_server_to_any(name, (int) len, PG_UTF8);
	if (utf8 != (const unsigned char *) name)
		len = strlen((const char *) utf8);

	cps = decode_and_check_utf8(utf8, len);
	if (encoding == PG_UTF8 && !is_nfc(cps))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("tenant name must be in Unicode normalization form NFC"),
				 errdetail("Two spellings of one name (precomposed and decomposed) would otherwise be two tenants."),
				 errhint("Create the tenant as normalize(name, NFC), and send that form with every row."),
				 errhidestmt(true)));
	pfree(cps);
}

/*
 * Advisory locks taken from SQL use field4 1 and 2; this one is pg_envelope's own
 * space ("en"), so no application lock can collide with it.  Two names with the same
 * 64-bit hash only serialise their creations, which costs nothing but a wait.
 */
#define TENANT_CREATE_LOCK_SPACE 0x656E

void
tenant_name_lock_for_create(const char *name, size_t len)
{
	uint64		h = hash_bytes_extended((const unsigned char *) name, (int) len, 0);
	LOCKTAG		tag;

	SET_LOCKTAG_ADVISORY(tag, MyDatabaseId, (uint32) (h >> 32), (uint32) h,
						 TENANT_CREATE_LOCK_SPACE);
	(void) LockAcquire(&tag, ExclusiveLock, false, false);
}
