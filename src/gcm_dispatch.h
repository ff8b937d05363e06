/*
 * gcm_dispatch.h — AES-GCM straight through the provider's dispatch functions.
 *
 * Why: OpenSSL 3.0's EVP layer costs per value what the cipher itself barely does for
 * short values: every EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, iv) asks the provider
 * for the IV length through a parameter round trip, every update and final goes
 * through checks and an indirection, and the tag is a parameter exchange by name.  On
 * a re-encrypted row that plumbing was about 2,300 of the 5,980 instructions of its
 * two GCM operations (test/bench/RESULTS.md).  OpenSSL 3.2+ trims much of this; on 3.0
 * this layer calls the same implementation without it.
 *
 * What it relies on: only the documented provider interface of provider-cipher(7),
 * and only in OpenSSL's own providers, "default" and "fips" (OSSL_PROVIDER_get0_name):
 * this layer drives the provider without EVP's checks, so it depends on what their
 * AES-GCM (providers/implementations/ciphers/cipher_aes_gcm.c) does and another
 * provider's need not: freectx is OPENSSL_clear_free of the whole context (key schedule
 * and GHASH key cleansed), and update writes exactly its input's length, so the output
 * buffers sized here are never overrun.  The implementation is exactly the one
 * EVP_CIPHER_fetch() chose for the EVP_CIPHER the caller passes: its provider
 * (EVP_CIPHER_get0_provider), the one algorithm of that provider whose names include
 * the cipher's name (EVP_CIPHER_get0_name), and that provider's context
 * (OSSL_PROVIDER_get0_provider_ctx).  Before the table is used, a known-answer
 * self-test runs through it (a Wycheproof vector sealed to its ciphertext and tag,
 * opened back, and refused, its output wiped, under a tag with one bit flipped): it
 * shows that the name found AES-256-GCM and that the layer's checks hold on it.  The
 * EVP_CIPHER holds the provider loaded; this layer takes its own reference to it, so
 * the function pointers stay valid for the life of the process.
 *
 * When it is not used (the caller falls back to EVP): a provider other than OpenSSL's
 * own; no algorithm, or more than one, matches the fetched cipher in its provider; a
 * function this layer calls is missing from the table; the self-test fails; or any
 * set-up step (new context, first key) fails.  The first three and the self-test
 * decide for the whole process.
 *
 * Plain C, no PostgreSQL headers.  The look-up is done once per process image, lazily:
 * a child of fork() keeps its parent's (same image, same addresses), and the table is
 * never written again once usable.  Not thread-safe, like the rest of cipher.c's
 * per-process state.
 */
#ifndef PG_ENVELOPE_GCM_DISPATCH_H
#define PG_ENVELOPE_GCM_DISPATCH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <openssl/evp.h>

/*
 * The only IV and tag lengths this layer takes (pg_envelope's format, cipher.h).  The
 * provider accepts IVs of any length and tags of 1 to 16 bytes: a shorter tag given
 * to open would be checked on its bytes only, so anything else is refused here.
 */
#define GCM_DISPATCH_KEY_LEN	32		/* AES-256: the only key length the layer takes */
#define GCM_DISPATCH_IV_LEN		12
#define GCM_DISPATCH_TAG_LEN	16

/* The provider's functions for one cipher (gcm_dispatch.c). */
typedef struct GcmDispatchTable GcmDispatchTable;

/* One keyed provider context and the direction it was initialised for. */
typedef struct GcmDispatchCtx
{
	const GcmDispatchTable *fns;
	void	   *algctx;			/* the provider's own context (its key schedule) */
	bool		encrypting;
} GcmDispatchCtx;

/*
 * A new provider context of `cipher` keyed with `key` for one direction, into `ctx`.
 * False (and `ctx` zeroed) when the dispatch path cannot be used: the caller uses EVP.
 * A failed attempt leaves OpenSSL's error queue as it found it.
 */
extern bool gcm_dispatch_new(GcmDispatchCtx *ctx, const EVP_CIPHER *cipher,
							 const uint8_t *key, size_t key_len, bool encrypting);

/*
 * Re-key an existing context (its old key schedule is overwritten).  A key_len other
 * than GCM_DISPATCH_KEY_LEN is refused without reaching the provider (so without an
 * error queued).
 */
extern bool gcm_dispatch_rekey(GcmDispatchCtx *ctx, const uint8_t *key, size_t key_len,
							   bool encrypting);

/*
 * Start a value: a fresh IV (the key is kept).  GCM refuses to reuse a finished IV.
 * False unless iv_len is GCM_DISPATCH_IV_LEN.
 */
extern bool gcm_dispatch_start(GcmDispatchCtx *ctx, const uint8_t *iv, size_t iv_len);

/* Feed additional authenticated data (may be called several times, before update). */
extern bool gcm_dispatch_aad(GcmDispatchCtx *ctx, const uint8_t *aad, size_t len);

/* Encrypt or decrypt `len` bytes of `in` into `out`; true only if all `len` came out. */
extern bool gcm_dispatch_update(GcmDispatchCtx *ctx, const uint8_t *in, size_t len,
								uint8_t *out);

/* Finish an encryption and take its tag; false unless tag_len is GCM_DISPATCH_TAG_LEN. */
extern bool gcm_dispatch_seal_final(GcmDispatchCtx *ctx, uint8_t *tag, size_t tag_len);

/* How a decryption ended. */
typedef enum GcmDispatchOpenResult
{
	GCM_DISPATCH_OPENED,		/* the tag verified: the output is the plaintext */
	GCM_DISPATCH_TAG_MISMATCH,	/* the tag did not verify (altered value or binding, wrong key) */
	GCM_DISPATCH_OPEN_FAILED	/* anything else: overlapping buffers, a refused tag length */
} GcmDispatchOpenResult;

/*
 * Decrypt `len` bytes of `in` into `out` (after start and aad) and check `tag`, of
 * GCM_DISPATCH_TAG_LEN bytes.  Unless the result is GCM_DISPATCH_OPENED, `out` is
 * wiped: not a byte of unauthenticated plaintext is left there.
 */
extern GcmDispatchOpenResult gcm_dispatch_open(GcmDispatchCtx *ctx, const uint8_t *in,
											   size_t len, const uint8_t *tag,
											   size_t tag_len, uint8_t *out);

/* Free the provider context (AES-GCM's freectx cleanses it); `ctx` is zeroed. */
extern void gcm_dispatch_free(GcmDispatchCtx *ctx);

/*
 * For tests only: a fault the process's look-up meets, to show that it then refuses
 * the dispatch path for the process (the caller uses EVP).  It counts only when set
 * before the process's first gcm_dispatch_new, which does the look-up.
 */
typedef enum GcmDispatchFault
{
	GCM_DISPATCH_FAULT_NONE,
	GCM_DISPATCH_FAULT_FOREIGN_PROVIDER,	/* the provider reads as neither default nor fips */
	GCM_DISPATCH_FAULT_CIPHERTEXT,	/* the self-test expects another ciphertext */
	GCM_DISPATCH_FAULT_TAG,			/* the self-test expects another tag */
	GCM_DISPATCH_FAULT_TAG_NOT_FLIPPED	/* the self-test's flipped tag is the right one */
} GcmDispatchFault;

extern void gcm_dispatch_inject_fault(GcmDispatchFault fault);

#endif							/* PG_ENVELOPE_GCM_DISPATCH_H */
