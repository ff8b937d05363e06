/*
 * rotation_sql.c — SQL functions the re-encryption procedures build their batches on.
 *
 * The batch engine (envelope.reencrypt, envelope.reencrypt_all) is PL/pgSQL in the
 * update script; it asks this file which stored values need to move, so that the value
 * formats stay known in one place (cipher.h) rather than as format bytes in SQL.
 * Randomized values move onto the tenant's active DEK version, deterministic values
 * onto its equality key version.
 */
#include "pg_envelope.h"
#include "encryption_count.h"

#include "fmgr.h"
#include "mb/pg_wchar.h"


/*
 * The AAD binding of a value, as envelope_sql.c's make_binding builds it: tenant and
 * context in UTF-8 whatever the database encoding; a NULL context is no context.
 */
static const char *
utf8_bytes(const char *s, size_t *len)
{
	const char *utf8 = pg_server_to_any(s, (int) *len, PG_UTF8);

	if (utf8 != s)
		*len = strlen(utf8);
	return utf8;
}

static CipherBinding
reencrypt_binding(text *tenant, text *context)
{
	CipherBinding b;

	b.tenant_len = VARSIZE_ANY_EXHDR(tenant);
	b.tenant = utf8_bytes(VARDATA_ANY(tenant), &b.tenant_len);
	b.context = NULL;
	b.context_len = 0;
	if (context != NULL)
	{
		b.context_len = VARSIZE_ANY_EXHDR(context);
		b.context = utf8_bytes(VARDATA_ANY(context), &b.context_len);
	}
	return b;
}

/* The version and plaintext length of a stored value; an error if it is not one. */
static void
stored_value_header(const uint8 *in, size_t in_len, uint32 *version, size_t *plain_len)
{
	if (cipher_peek_version(in, in_len, version) != CIPHER_OK ||
		cipher_plaintext_len(in, in_len, plain_len) != CIPHER_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_BINARY_REPRESENTATION),
				 errmsg("value is not a pg_envelope ciphertext"),
				 errdetail("It is too short or has an unknown format byte."),
				 errhidestmt(true)));
}

/*
 * Decrypt a stored value of either format into `plain` (room for its plaintext
 * length), with the errors of envelope.decrypt.
 */
static void
decrypt_into(text *tenant, const CipherBinding *binding, const uint8 *in, size_t in_len,
			 uint32 version, uint8 *plain)
{
	CipherStatus cs;

	cs = cipher_decrypt(keycache_key_for_decrypt(VARDATA_ANY(tenant), VARSIZE_ANY_EXHDR(tenant),
												 version,
												 in[0] == CIPHER_FORMAT_SIV_V1 ?
												 CIPHER_USE_DETERMINISTIC : CIPHER_USE_DECRYPT),
						binding, in, in_len, plain);
	if (cs == CIPHER_ERR_AUTH || cs == CIPHER_ERR_FORMAT)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_BINARY_REPRESENTATION),
				 errmsg("could not decrypt value for tenant \"%.*s\"",
						(int) VARSIZE_ANY_EXHDR(tenant), VARDATA_ANY(tenant)),
				 errdetail("The ciphertext does not authenticate: it was altered, or it belongs to another tenant or context."),
				 errhidestmt(true)));
	if (cs != CIPHER_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("decryption failed in OpenSSL"),
				 errhidestmt(true)));
}

/*
 * The tenant's current equality key version; an error if it is not live (retired or
 * destroyed), or first the error of a disabled or destroyed tenant, as every other
 * function gives it.
 */
static uint32
live_equality_version(text *tenant)
{
	uint32		target;

	if (equality_current_version(VARDATA_ANY(tenant), VARSIZE_ANY_EXHDR(tenant), &target))
		return target;
	if (keycache_active_version(VARDATA_ANY(tenant), VARSIZE_ANY_EXHDR(tenant)) == 0)
		(void) keycache_key_for_encrypt(VARDATA_ANY(tenant), VARSIZE_ANY_EXHDR(tenant));
	ereport(ERROR,
			(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
			 errmsg("equality key version %u of tenant \"%.*s\" is not active", target,
					(int) VARSIZE_ANY_EXHDR(tenant), VARDATA_ANY(tenant)),
			 errhint("Reactivate it with envelope.reactivate_key_version(), or make a new one with envelope.rotate_equality_key()."),
			 errhidestmt(true)));
	return 0;					/* not reached */
}

/*
 * A randomized value `in` (version `version`, plaintext length `plain_len`) decrypted
 * and encrypted again under the tenant's active version into `out`, which has room
 * for plain_len + CIPHER_OVERHEAD bytes.  The plaintext lives only in a buffer of this
 * function (on the stack for the usual short values: no allocation per row), wiped on
 * every path, never in a Datum.  The decryption finishes before the encryption key is
 * looked up: fetching a new version may move the tenant's array of cached keys.
 */
#define REENCRYPT_STACK_PLAIN 1024

static void
reencrypt_randomized_into(text *tenant, const CipherBinding *binding,
						  const uint8 *in, size_t in_len, uint32 version, size_t plain_len,
						  uint8 *out)
{
	uint8		stack_plain[REENCRYPT_STACK_PLAIN];
	uint8	   *plain = plain_len <= sizeof(stack_plain) ? stack_plain : palloc(plain_len);
	CipherStatus cs;

	PG_TRY();
	{
		EnvelopeKeyRef active;
		uint8		nonce[CIPHER_NONCE_LEN];

		decrypt_into(tenant, binding, in, in_len, version, plain);
		active = encryption_counted_key(VARDATA_ANY(tenant), VARSIZE_ANY_EXHDR(tenant));
		cs = cipher_next_nonce(nonce);
		if (cs == CIPHER_OK)
			cs = cipher_encrypt(active.key, active.version, nonce, binding,
								plain, plain_len, out);
		if (cs != CIPHER_OK)
			ereport(ERROR,
					(errcode(ERRCODE_INTERNAL_ERROR),
					 errmsg("AES-256-GCM failed in OpenSSL"),
					 errhidestmt(true)));
	}
	PG_FINALLY();
	{
		explicit_bzero(plain, plain_len);
		if (plain != stack_plain)
			pfree(plain);
	}
	PG_END_TRY();
}

/*
 * envelope.reencrypt_value(tenant, ciphertext, context): a randomized value decrypted
 * and encrypted again under the tenant's active version, in one call: the batch
 * engine's SET clause, each key looked up once per row.
 */
static Datum
reencrypt_randomized(FunctionCallInfo fcinfo)
{
	text	   *tenant;
	text	   *context;
	bytea	   *ciphertext;
	CipherBinding binding;
	const uint8 *in;
	size_t		in_len;
	size_t		plain_len;
	uint32		version;
	bytea	   *result;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		PG_RETURN_NULL();
	tenant = PG_GETARG_TEXT_PP(0);
	ciphertext = PG_GETARG_BYTEA_PP(1);
	context = PG_ARGISNULL(2) ? NULL : PG_GETARG_TEXT_PP(2);
	in = (const uint8 *) VARDATA_ANY(ciphertext);
	in_len = VARSIZE_ANY_EXHDR(ciphertext);

	stored_value_header(in, in_len, &version, &plain_len);
	if (in[0] != CIPHER_FORMAT_GCM_V1)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("only randomized values are re-encrypted"),
				 errdetail("Deterministic values stay under their equality key."),
				 errhidestmt(true)));
	binding = reencrypt_binding(tenant, context);
	result = palloc(VARHDRSZ + plain_len + CIPHER_OVERHEAD);
	SET_VARSIZE(result, VARHDRSZ + plain_len + CIPHER_OVERHEAD);
	reencrypt_randomized_into(tenant, &binding, in, in_len, version, plain_len,
							  (uint8 *) VARDATA(result));
	PG_RETURN_BYTEA_P(result);
}

PG_FUNCTION_INFO_V1(envelope_needs_reencryption);

/*
 * envelope.needs_reencryption(ciphertext, tenant): true for a randomized value under
 * a DEK version other than the tenant's active one, and for a deterministic value
 * under an equality version other than its current one, when that one is live.  False
 * for the values of a disabled or destroyed tenant and for anything that is not a
 * pg_envelope value, never an error, so one stray value cannot stop a fleet-wide run
 * (an unknown tenant is an error, as for every function that takes a tenant).
 */
Datum
envelope_needs_reencryption(PG_FUNCTION_ARGS)
{
	bytea	   *ciphertext = PG_GETARG_BYTEA_PP(0);
	text	   *tenant = PG_GETARG_TEXT_PP(1);
	const uint8 *bytes = (const uint8 *) VARDATA_ANY(ciphertext);
	size_t		len = VARSIZE_ANY_EXHDR(ciphertext);
	uint32		version;
	uint32		target;

	if (cipher_peek_version(bytes, len, &version) != CIPHER_OK)
		PG_RETURN_BOOL(false);
	target = keycache_active_version(VARDATA_ANY(tenant), VARSIZE_ANY_EXHDR(tenant));
	if (target == 0)
		PG_RETURN_BOOL(false);	/* disabled or destroyed: nothing can move */
	if (bytes[0] == CIPHER_FORMAT_SIV_V1 &&
		!equality_current_version(VARDATA_ANY(tenant), VARSIZE_ANY_EXHDR(tenant), &target))
		PG_RETURN_BOOL(false);	/* no live equality key to move onto */
	PG_RETURN_BOOL(version != target);
}

PG_FUNCTION_INFO_V1(envelope_reencrypt_value);

/*
 * envelope.reencrypt_value(tenant, ciphertext, context): a randomized value as
 * reencrypt_randomized does it; a deterministic value decrypted and encrypted again
 * under the tenant's current equality key version, the plaintext likewise only in a
 * buffer of this function, wiped on every path.
 */
Datum
envelope_reencrypt_value(PG_FUNCTION_ARGS)
{
	text	   *tenant;
	bytea	   *ciphertext;
	CipherBinding binding;
	const uint8 *in;
	size_t		in_len;
	size_t		plain_len;
	uint32		version;
	uint32		target;
	uint8	   *plain;
	bytea	   *volatile result = NULL;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		PG_RETURN_NULL();
	ciphertext = PG_GETARG_BYTEA_PP(1);
	in = (const uint8 *) VARDATA_ANY(ciphertext);
	in_len = VARSIZE_ANY_EXHDR(ciphertext);
	if (in_len == 0 || in[0] != CIPHER_FORMAT_SIV_V1)
		return reencrypt_randomized(fcinfo);	/* randomized, or its errors */

	tenant = PG_GETARG_TEXT_PP(0);
	binding = reencrypt_binding(tenant, PG_ARGISNULL(2) ? NULL : PG_GETARG_TEXT_PP(2));
	stored_value_header(in, in_len, &version, &plain_len);
	target = live_equality_version(tenant);
	plain = palloc(plain_len > 0 ? plain_len : 1);
	PG_TRY();
	{
		decrypt_into(tenant, &binding, in, in_len, version, plain);
		/* Arguments 0 and 2 are the tenant and the context, as the encryption wants. */
		result = envelope_encrypt_deterministic_under(fcinfo, target, (const char *) plain,
													  plain_len);
	}
	PG_FINALLY();
	{
		explicit_bzero(plain, plain_len > 0 ? plain_len : 1);
		pfree(plain);
	}
	PG_END_TRY();
	PG_RETURN_BYTEA_P(result);
}

/* ---------------------------------------------------------------------------
 * Stored blind indexes
 *
 * A blind index is a keyed hash of a plaintext that the database holds only encrypted,
 * so moving it onto a new equality key version needs that plaintext: a registered
 * blind-index column names the encrypted column it indexes (its source, see
 * envelope.register_blind_index), and the batch engine recomputes the index from the
 * source's value, decrypted in a buffer of this file and wiped on every path.
 */


PG_FUNCTION_INFO_V1(envelope_blind_index_needs_recompute);

/*
 * envelope.blind_index_needs_recompute(blind_index, tenant): true for a stored blind
 * index under an equality key version other than the tenant's current one, when that
 * one is live.  False for a disabled or destroyed tenant and for anything that is not
 * a blind index, as needs_reencryption does for values (and like it, an unknown
 * tenant is an error).
 */
Datum
envelope_blind_index_needs_recompute(PG_FUNCTION_ARGS)
{
	bytea	   *stored = PG_GETARG_BYTEA_PP(0);
	text	   *tenant = PG_GETARG_TEXT_PP(1);
	uint32		version;
	uint32		target;

	if (cipher_blind_index_version((const uint8 *) VARDATA_ANY(stored),
								   VARSIZE_ANY_EXHDR(stored), &version) != CIPHER_OK)
		PG_RETURN_BOOL(false);
	if (keycache_active_version(VARDATA_ANY(tenant), VARSIZE_ANY_EXHDR(tenant)) == 0)
		PG_RETURN_BOOL(false);	/* disabled or destroyed */
	if (!equality_current_version(VARDATA_ANY(tenant), VARSIZE_ANY_EXHDR(tenant), &target))
		PG_RETURN_BOOL(false);	/* no live equality key to move onto */
	PG_RETURN_BOOL(version != target);
}

PG_FUNCTION_INFO_V1(envelope_blind_index_recompute);

/*
 * envelope.blind_index_recompute(tenant, source, context): the blind index of the
 * plaintext of `source` (a value of either format, encrypted with `context`) under
 * the tenant's current equality key version; the same bytes as
 * envelope.blind_index(tenant, envelope.decrypt_text(tenant, source, context)),
 * without the plaintext ever becoming a Datum.  NULL when the source is NULL.
 */
Datum
envelope_blind_index_recompute(PG_FUNCTION_ARGS)
{
	text	   *tenant;
	bytea	   *source;
	CipherBinding value_binding;
	CipherBinding index_binding;
	const uint8 *in;
	size_t		in_len;
	size_t		plain_len;
	uint32		version;
	uint32		target;
	uint8	   *plain;
	bytea	   *volatile result = NULL;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		PG_RETURN_NULL();
	tenant = PG_GETARG_TEXT_PP(0);
	source = PG_GETARG_BYTEA_PP(1);
	value_binding = reencrypt_binding(tenant, PG_ARGISNULL(2) ? NULL : PG_GETARG_TEXT_PP(2));
	/* A blind index binds the tenant only, as envelope.blind_index makes it. */
	index_binding = reencrypt_binding(tenant, NULL);
	in = (const uint8 *) VARDATA_ANY(source);
	in_len = VARSIZE_ANY_EXHDR(source);
	stored_value_header(in, in_len, &version, &plain_len);
	target = live_equality_version(tenant);

	plain = palloc(plain_len > 0 ? plain_len : 1);
	PG_TRY();
	{
		const CipherKey *index_key;
		size_t		index_len;

		decrypt_into(tenant, &value_binding, in, in_len, version, plain);
		/* What blind_index(tenant, decrypt_text(...)) would refuse, so must this. */
		if (!pg_verifymbstr((const char *) plain, (int) plain_len, true))
			ereport(ERROR,
					(errcode(ERRCODE_CHARACTER_NOT_IN_REPERTOIRE),
					 errmsg("decrypted value is not valid text in encoding \"%s\"",
							GetDatabaseEncodingName()),
					 errdetail("A blind index is made from text; this source value was encrypted from bytes."),
					 errhidestmt(true)));
		index_key = keycache_key_for_decrypt(VARDATA_ANY(tenant), VARSIZE_ANY_EXHDR(tenant),
											 target, CIPHER_USE_INDEX);
		result = palloc(VARHDRSZ + CIPHER_INDEX_VERSIONED_MAX_LEN);
		if (cipher_blind_index_versioned(index_key, target, &index_binding, plain, plain_len,
										 (uint8 *) VARDATA(result), &index_len) != CIPHER_OK)
			ereport(ERROR,
					(errcode(ERRCODE_INTERNAL_ERROR),
					 errmsg("HMAC-SHA256 failed in OpenSSL"),
					 errhidestmt(true)));
		SET_VARSIZE(result, VARHDRSZ + index_len);
	}
	PG_FINALLY();
	{
		explicit_bzero(plain, plain_len > 0 ? plain_len : 1);
		pfree(plain);
	}
	PG_END_TRY();
	PG_RETURN_BYTEA_P(result);
}
