/*
 * cipher.h — the value cipher: AES-256-GCM and pg_envelope's ciphertext format.
 *
 * Plain C over OpenSSL (EVP, and the provider's own AES-GCM functions: gcm_dispatch.h);
 * knows nothing of tenants' keys, SQL or KMSs.  Functions
 * return a CipherStatus; the SQL layer turns it into an error.
 *
 * Ciphertext format, version 1 (33 bytes of overhead):
 *
 *     offset  size  field
 *     0       1     format byte: 0x01 = AES-256-GCM with a random 96-bit nonce
 *     1       4     DEK version, big-endian, >= 1
 *     5       12    nonce
 *     17      n     ciphertext (same length as the plaintext)
 *     17+n    16    GCM tag
 *
 * The additional authenticated data is the 17-byte header followed by the tenant and
 * the caller's context, each length-prefixed (4 bytes, big-endian), the context behind
 * a presence byte so that "no context" and "empty context" differ:
 *
 *     header || len(tenant) || tenant || 0x00                          (no context)
 *     header || len(tenant) || tenant || 0x01 || len(context) || context
 *
 * Any change to the header, the tenant or the context makes the tag check fail.
 *
 * Deterministic format (format byte 0x02, 22 bytes of overhead), for equality lookups
 * and unique indexes: the same plaintext, tenant, context and key give the same bytes.
 *
 *     0       1     format byte: 0x02 = AES-256-SIV (RFC 5297)
 *     1       4     DEK version, big-endian
 *     5       16    synthetic IV
 *     21      n+1   ciphertext of 0x00 || plaintext
 *
 * The SIV key is derived from the DEK with HKDF-SHA256; the AAD is one S2V component
 * laid out as above with the 5-byte header.  The leading 0x00 keeps the SIV input
 * non-empty: OpenSSL 3.0 mishandles empty AES-SIV plaintexts.
 *
 * Blind index: HMAC-SHA256 under another HKDF-derived key over len(tenant) || tenant
 * || value; equal values give equal indexes, and nothing else can be learnt from them
 * without the key.
 *
 * Versioned blind index (cipher_blind_index_versioned): the equality key version is
 * the DEK version whose subkeys made the index.  Version 1 is the 32-byte HMAC above,
 * unchanged, so indexes stored before equality keys rotated stay valid; every later
 * version is prefixed with its version, so the two never collide and a stored index
 * says which key made it:
 *
 *     version 1:   HMAC (32 bytes)
 *     version >=2: version, big-endian (4 bytes) || HMAC (32 bytes)
 */
#ifndef PG_ENVELOPE_CIPHER_H
#define PG_ENVELOPE_CIPHER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define CIPHER_KEY_LEN		32
#define CIPHER_NONCE_LEN	12
#define CIPHER_TAG_LEN		16
#define CIPHER_HEADER_LEN	(1 + 4 + CIPHER_NONCE_LEN)
#define CIPHER_OVERHEAD		(CIPHER_HEADER_LEN + CIPHER_TAG_LEN)

#define CIPHER_FORMAT_GCM_V1	0x01
#define CIPHER_FORMAT_SIV_V1	0x02

#define CIPHER_SIV_KEY_LEN		64
#define CIPHER_SIV_TAG_LEN		16
#define CIPHER_SIV_HEADER_LEN	(1 + 4)
#define CIPHER_SIV_OVERHEAD		(CIPHER_SIV_HEADER_LEN + CIPHER_SIV_TAG_LEN + 1)
#define CIPHER_INDEX_LEN		32
#define CIPHER_INDEX_VERSIONED_MAX_LEN	(4 + CIPHER_INDEX_LEN)

typedef enum CipherStatus
{
	CIPHER_OK = 0,
	CIPHER_ERR_FORMAT,			/* too short, or a format byte we do not know */
	CIPHER_ERR_AUTH,			/* authentication failed: wrong key, tenant, context or tampered */
	CIPHER_ERR_RANDOM,			/* the CSPRNG failed */
	CIPHER_ERR_INTERNAL			/* OpenSSL failed or out of memory */
} CipherStatus;

/*
 * A ready key: up to four OpenSSL contexts whose key schedules are computed once, so
 * each value costs only an IV reset.  Each context is set up when a value first needs
 * it (cipher_key_add): a scan that only decrypts GCM values never pays for the SIV and
 * HMAC subkeys.  The raw key is not kept.
 */
typedef struct CipherKey
{
	void	   *enc;			/* AES-256-GCM encryption context (cipher.c) */
	void	   *dec;			/* AES-256-GCM decryption context (cipher.c) */
	void	   *siv;			/* AES-SIV contexts (cipher.c), re-initialised per value */
	void	   *mac;			/* EVP_MAC_CTX *, keyed HMAC template for the blind index */
} CipherKey;

/* What a key is about to be used for: each use needs its own context. */
typedef enum CipherUse
{
	CIPHER_USE_ENCRYPT,			/* cipher_encrypt, cipher_gcm_seal */
	CIPHER_USE_DECRYPT,			/* cipher_decrypt of a GCM value, cipher_gcm_open */
	CIPHER_USE_DETERMINISTIC,	/* cipher_encrypt_deterministic, cipher_decrypt of a SIV value */
	CIPHER_USE_INDEX			/* cipher_blind_index */
} CipherUse;

/* What a value is bound to besides its header. */
typedef struct CipherBinding
{
	const char *tenant;
	size_t		tenant_len;
	const char *context;		/* NULL: no context */
	size_t		context_len;
} CipherBinding;

/*
 * The two implementations of the GCM contexts: the provider's dispatch functions (the
 * default; src/gcm_dispatch.h says why and when it falls back to EVP) or OpenSSL's EVP.
 */
typedef enum CipherGcmPath
{
	CIPHER_GCM_DISPATCH,
	CIPHER_GCM_EVP
} CipherGcmPath;

/*
 * For tests: the implementation GCM contexts set up from now on ask for (contexts
 * already set up keep theirs).  CIPHER_GCM_DISPATCH still falls back to EVP when the
 * provider's functions cannot be used.
 */
extern void cipher_gcm_set_path(CipherGcmPath path);

/* The implementation of `key`'s GCM context for `use` (CIPHER_USE_ENCRYPT or _DECRYPT). */
extern CipherGcmPath cipher_key_gcm_path(const CipherKey *key, CipherUse use);

/* Every context of `raw` into a zeroed `key`; on failure nothing is left allocated. */
extern CipherStatus cipher_key_init(CipherKey *key, const uint8_t raw[CIPHER_KEY_LEN]);

/* Only the two GCM contexts (encrypt and decrypt), for plain AES-256-GCM use. */
extern CipherStatus cipher_key_init_gcm(CipherKey *key, const uint8_t raw[CIPHER_KEY_LEN]);

/* Is the context `use` needs set up? */
extern bool cipher_key_ready(const CipherKey *key, CipherUse use);

/*
 * Set up the context `use` needs from `raw`, if it is not there yet.  `spare` (may be
 * NULL) is a key being discarded: its GCM context of the same direction, if any, is
 * taken over and re-keyed instead of allocating a new one, and set to NULL in `spare`.
 * On failure `key` keeps the contexts it had.
 */
extern CipherStatus cipher_key_add(CipherKey *key, CipherUse use,
								   const uint8_t raw[CIPHER_KEY_LEN], CipherKey *spare);

/* Free every context (OpenSSL cleanses their key schedules). */
extern void cipher_key_free(CipherKey *key);

/* Parse the header of a stored value (either format) without decrypting it. */
extern CipherStatus cipher_peek_version(const uint8_t *in, size_t in_len, uint32_t *version);

/* Length of the plaintext inside a stored value of either format. */
extern CipherStatus cipher_plaintext_len(const uint8_t *in, size_t in_len, size_t *len);

/* Deterministic encryption into `out` (room for plain_len + CIPHER_SIV_OVERHEAD). */
extern CipherStatus cipher_encrypt_deterministic(const CipherKey *key, uint32_t version,
												 const CipherBinding *binding,
												 const uint8_t *plain, size_t plain_len,
												 uint8_t *out);

/* Blind index of `value` for `tenant` (binding->context is ignored). */
extern CipherStatus cipher_blind_index(const CipherKey *key, const CipherBinding *binding,
									   const uint8_t *value, size_t value_len,
									   uint8_t out[CIPHER_INDEX_LEN]);

/*
 * Blind index under equality key `version` (>= 1) in the versioned layout above; the
 * index made with `key` (the subkeys of DEK `version`).  `out` has room for
 * CIPHER_INDEX_VERSIONED_MAX_LEN bytes; *out_len receives 32 or 36.
 */
extern CipherStatus cipher_blind_index_versioned(const CipherKey *key, uint32_t version,
												 const CipherBinding *binding,
												 const uint8_t *value, size_t value_len,
												 uint8_t *out, size_t *out_len);

/* The equality key version of a stored blind index; CIPHER_ERR_FORMAT if it is none. */
extern CipherStatus cipher_blind_index_version(const uint8_t *in, size_t in_len,
											   uint32_t *version);

/*
 * Plain AES-256-SIV with one AAD component, for published test vectors.  `out` of seal
 * receives SIV || ciphertext.
 */
extern CipherStatus cipher_siv_seal(const uint8_t key[CIPHER_SIV_KEY_LEN],
									const uint8_t *aad, size_t aad_len,
									const uint8_t *plain, size_t plain_len, uint8_t *out);
extern CipherStatus cipher_siv_open(const uint8_t key[CIPHER_SIV_KEY_LEN],
									const uint8_t *aad, size_t aad_len,
									const uint8_t *in, size_t in_len, uint8_t *out);

/*
 * Encrypt `plain` into `out`, which has room for plain_len + CIPHER_OVERHEAD bytes.
 * `nonce` must come from cipher_next_nonce() (or a test vector).
 */
extern CipherStatus cipher_encrypt(const CipherKey *key, uint32_t version,
								   const uint8_t nonce[CIPHER_NONCE_LEN],
								   const CipherBinding *binding,
								   const uint8_t *plain, size_t plain_len,
								   uint8_t *out);

/*
 * Decrypt a stored value of either format into `out` (room for the length given by
 * cipher_plaintext_len).  On any failure `out` is wiped: not a byte of unauthenticated
 * plaintext is released.
 */
extern CipherStatus cipher_decrypt(const CipherKey *key, const CipherBinding *binding,
								   const uint8_t *in, size_t in_len, uint8_t *out);

/*
 * Plain AES-256-GCM with a 96-bit nonce and a 128-bit tag, for the key wrapping of the
 * local provider and for published test vectors.
 */
extern CipherStatus cipher_gcm_seal(const CipherKey *key, const uint8_t nonce[CIPHER_NONCE_LEN],
									const uint8_t *aad, size_t aad_len,
									const uint8_t *plain, size_t plain_len,
									uint8_t *out, uint8_t tag[CIPHER_TAG_LEN]);
extern CipherStatus cipher_gcm_open(const CipherKey *key, const uint8_t nonce[CIPHER_NONCE_LEN],
									const uint8_t *aad, size_t aad_len,
									const uint8_t *in, size_t in_len,
									const uint8_t tag[CIPHER_TAG_LEN], uint8_t *out);

/*
 * A fresh random nonce.  Drawn from a per-process buffer of CSPRNG output refilled in
 * bulk (one RAND_bytes per few hundred values); the buffer is discarded when the
 * process id changes, so a forked child never reuses its parent's nonces.
 */
extern CipherStatus cipher_next_nonce(uint8_t nonce[CIPHER_NONCE_LEN]);

/* Fill with CSPRNG bytes. */
extern CipherStatus cipher_random_bytes(uint8_t *buf, size_t len);

/* Wipe memory in a way the compiler cannot optimise away. */
extern void cipher_wipe(void *buf, size_t len);

#endif							/* PG_ENVELOPE_CIPHER_H */
