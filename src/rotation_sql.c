/*
 * rotation_sql.c — SQL functions the re-encryption procedures build their batches on.
 *
 * The batch engine (envelope.reencrypt, envelope.reencrypt_all) is PL/pgSQL in the
 * update script; it asks this file which stored values need to move, so that the value
 * formats stay known in one place (cipher.h) rather than as format bytes in SQL.
 */
#include "pg_envelope.h"

#include "fmgr.h"

PG_FUNCTION_INFO_V1(envelope_needs_reencryption);

/*
 * True when `ciphertext` is a randomized (AES-256-GCM) value under a DEK version other
 * than `active_version`.  Deterministic values follow their equality key, not the
 * active version, and anything that is not a pg_envelope value is left alone: false
 * for both, never an error, so one stray value cannot stop a fleet-wide run.
 */
Datum
envelope_needs_reencryption(PG_FUNCTION_ARGS)
{
	bytea	   *ciphertext = PG_GETARG_BYTEA_PP(0);
	int32		active_version = PG_GETARG_INT32(1);
	const uint8 *bytes = (const uint8 *) VARDATA_ANY(ciphertext);
	size_t		len = VARSIZE_ANY_EXHDR(ciphertext);
	uint32		version;

	if (cipher_peek_version(bytes, len, &version) != CIPHER_OK)
		PG_RETURN_BOOL(false);
	if (bytes[0] != CIPHER_FORMAT_GCM_V1)
		PG_RETURN_BOOL(false);
	PG_RETURN_BOOL(version != (uint32) active_version);
}
