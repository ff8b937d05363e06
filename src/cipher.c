/*
 * cipher.c — pg_envelope's value formats over OpenSSL: AES-256-GCM, AES-256-SIV and
 * the HMAC blind index.
 *
 * Plain C: no PostgreSQL headers, no error reporting beyond a CipherStatus.  See
 * cipher.h for the format.  Every OpenSSL context is owned by a CipherKey, which keeps
 * the AES key schedule so that encrypting a value costs an IV reset, not a re-key.
 * The GCM contexts go through the provider's dispatch functions (gcm_dispatch.c), EVP
 * when those cannot be used; everything else through EVP.
 */
#include <string.h>
#include <unistd.h>

#include <pthread.h>
#include <stdlib.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <openssl/rand.h>

#include "cipher.h"
#include "gcm_dispatch.h"

/* Nonces drawn per RAND_bytes call: one syscall-free refill per this many values. */
#define NONCE_POOL_SIZE (CIPHER_NONCE_LEN * 512)

static uint8_t nonce_pool[NONCE_POOL_SIZE];
static size_t nonce_pool_used = NONCE_POOL_SIZE;
static bool nonce_pool_fork_handler = false;

/*
 * A child of fork() inherits the pool: empty it there, or parent and child would hand
 * out the same nonces under the same keys.  An atfork handler does this without a
 * getpid() system call per value.
 */
static void
nonce_pool_after_fork(void)
{
	memset(nonce_pool, 0, sizeof(nonce_pool));
	nonce_pool_used = NONCE_POOL_SIZE;
}

void
cipher_wipe(void *buf, size_t len)
{
	if (buf != NULL && len > 0)
		OPENSSL_cleanse(buf, len);
}

CipherStatus
cipher_random_bytes(uint8_t *buf, size_t len)
{
	if (RAND_bytes(buf, (int) len) != 1)
		return CIPHER_ERR_RANDOM;
	return CIPHER_OK;
}

CipherStatus
cipher_next_nonce(uint8_t nonce[CIPHER_NONCE_LEN])
{
	if (!nonce_pool_fork_handler)
	{
		if (pthread_atfork(NULL, NULL, nonce_pool_after_fork) != 0)
			return CIPHER_ERR_RANDOM;
		nonce_pool_fork_handler = true;
	}
	if (nonce_pool_used + CIPHER_NONCE_LEN > NONCE_POOL_SIZE)
	{
		if (RAND_bytes(nonce_pool, NONCE_POOL_SIZE) != 1)
		{
			nonce_pool_used = NONCE_POOL_SIZE;
			return CIPHER_ERR_RANDOM;
		}
		nonce_pool_used = 0;
	}
	memcpy(nonce, nonce_pool + nonce_pool_used, CIPHER_NONCE_LEN);
	/* A nonce is public, but the pool must never hand the same bytes out twice. */
	memset(nonce_pool + nonce_pool_used, 0, CIPHER_NONCE_LEN);
	nonce_pool_used += CIPHER_NONCE_LEN;
	return CIPHER_OK;
}

static const char siv_label[] = "pg_envelope deterministic v1";
static const char index_label[] = "pg_envelope blind index v1";

/* HKDF-SHA256 of the DEK with a label: independent subkeys for each use of one DEK. */
static int
derive_subkey(const uint8_t raw[CIPHER_KEY_LEN], const char *label,
			  uint8_t *out, size_t out_len)
{
	EVP_PKEY_CTX *pctx = EVP_PKEY_CTX_new_id(EVP_PKEY_HKDF, NULL);
	size_t		len = out_len;
	int			ok;

	ok = pctx != NULL &&
		EVP_PKEY_derive_init(pctx) == 1 &&
		EVP_PKEY_CTX_set_hkdf_md(pctx, EVP_sha256()) == 1 &&
		EVP_PKEY_CTX_set1_hkdf_key(pctx, raw, CIPHER_KEY_LEN) == 1 &&
		EVP_PKEY_CTX_add1_hkdf_info(pctx, (const unsigned char *) label, (int) strlen(label)) == 1 &&
		EVP_PKEY_derive(pctx, out, &len) == 1 && len == out_len;
	EVP_PKEY_CTX_free(pctx);
	return ok;
}

/* HMAC through OpenSSL 3's EVP_MAC; fetched once per process. */
static EVP_MAC *
hmac_algorithm(void)
{
	static EVP_MAC *hmac = NULL;

	if (hmac == NULL)
		hmac = EVP_MAC_fetch(NULL, "HMAC", NULL);
	return hmac;
}

/* A keyed HMAC-SHA256 context, re-initialised per value so the key is set up only once. */
static EVP_MAC_CTX *
new_index_mac(const uint8_t *key, size_t key_len)
{
	EVP_MAC_CTX *ctx = hmac_algorithm() ? EVP_MAC_CTX_new(hmac_algorithm()) : NULL;
	OSSL_PARAM	params[2];

	if (ctx == NULL)
		return NULL;
	params[0] = OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, (char *) "SHA256", 0);
	params[1] = OSSL_PARAM_construct_end();
	if (EVP_MAC_init(ctx, key, key_len, params) != 1)
	{
		EVP_MAC_CTX_free(ctx);
		return NULL;
	}
	return ctx;
}

/*
 * AES-256-SIV (RFC 5297) built from two OpenSSL contexts that are keyed once per DEK
 * and re-initialised per value: CMAC-AES-256 for S2V and AES-256-CTR.  OpenSSL's own
 * AES-SIV cipher cannot be reset without its key set-up, so each value would need a
 * copy of a keyed context (several allocations, and a CMAC context duplicated per
 * S2V step), which made a deterministic value cost 4 times a GCM one.  Only the S2V
 * chaining (dbl, xor) is written here; the block cipher work is OpenSSL's.  The
 * Wycheproof vectors (test/unit) and the format vectors check it against OpenSSL's
 * AES-SIV and the stored values.
 */
typedef struct SivKey
{
	EVP_MAC_CTX *cmac;			/* CMAC-AES-256 under K1 (the first half of the key) */
	EVP_CIPHER_CTX *ctr;		/* AES-256-CTR under K2 (the second half) */
	uint8_t		d0[16];			/* S2V's first step, CMAC(K1, 0^128), the same for every value */
} SivKey;

#define SIV_BLOCK 16

static EVP_MAC *
cmac_algorithm(void)
{
	static EVP_MAC *cmac = NULL;

	if (cmac == NULL)
		cmac = EVP_MAC_fetch(NULL, "CMAC", NULL);
	return cmac;
}

static const EVP_CIPHER *
aes_ctr(void)
{
	static EVP_CIPHER *cipher = NULL;

	if (cipher == NULL)
		cipher = EVP_CIPHER_fetch(NULL, "AES-256-CTR", NULL);
	return cipher;
}

/* One CMAC under K1 of a || b (b may be empty), from the re-initialised context. */
static bool
siv_cmac(SivKey *sk, const uint8_t *a, size_t a_len, const uint8_t *b, size_t b_len,
		 uint8_t out[SIV_BLOCK])
{
	size_t		outl = 0;

	return EVP_MAC_init(sk->cmac, NULL, 0, NULL) == 1 &&
		(a_len == 0 || EVP_MAC_update(sk->cmac, a, a_len) == 1) &&
		(b_len == 0 || EVP_MAC_update(sk->cmac, b, b_len) == 1) &&
		EVP_MAC_final(sk->cmac, out, &outl, SIV_BLOCK) == 1 && outl == SIV_BLOCK;
}

/* RFC 5297's dbl(): multiply by x in GF(2^128). */
static void
siv_dbl(uint8_t block[SIV_BLOCK])
{
	uint8_t		carry = block[0] >> 7;

	for (int i = 0; i < SIV_BLOCK - 1; i++)
		block[i] = (uint8_t) ((block[i] << 1) | (block[i + 1] >> 7));
	block[SIV_BLOCK - 1] = (uint8_t) ((block[SIV_BLOCK - 1] << 1) ^ (carry ? 0x87 : 0));
}

static void
siv_key_free(SivKey *sk)
{
	if (sk == NULL)
		return;
	EVP_MAC_CTX_free(sk->cmac);
	EVP_CIPHER_CTX_free(sk->ctr);
	cipher_wipe(sk, sizeof(*sk));
	free(sk);
}

static SivKey *
siv_key_new(const uint8_t key[CIPHER_SIV_KEY_LEN])
{
	SivKey	   *sk = calloc(1, sizeof(SivKey));
	OSSL_PARAM	params[2];
	static const uint8_t zero[SIV_BLOCK];
	bool		ok;

	if (sk == NULL)
		return NULL;
	params[0] = OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_CIPHER, (char *) "AES-256-CBC", 0);
	params[1] = OSSL_PARAM_construct_end();
	ok = cmac_algorithm() != NULL && aes_ctr() != NULL &&
		(sk->cmac = EVP_MAC_CTX_new(cmac_algorithm())) != NULL &&
		EVP_MAC_init(sk->cmac, key, CIPHER_SIV_KEY_LEN / 2, params) == 1 &&
		(sk->ctr = EVP_CIPHER_CTX_new()) != NULL &&
		EVP_CipherInit_ex(sk->ctr, aes_ctr(), NULL, key + CIPHER_SIV_KEY_LEN / 2, NULL, 1) == 1 &&
		siv_cmac(sk, zero, SIV_BLOCK, NULL, 0, sk->d0);
	if (!ok)
	{
		siv_key_free(sk);
		return NULL;
	}
	return sk;
}

/* S2V(K1, aad, text) of RFC 5297 with exactly one AAD component, into v. */
static bool
siv_s2v(SivKey *sk, const uint8_t *aad, size_t aad_len, const uint8_t *text, size_t text_len,
		uint8_t v[SIV_BLOCK])
{
	uint8_t		d[SIV_BLOCK];
	uint8_t		mac[SIV_BLOCK];
	bool		ok;

	memcpy(d, sk->d0, SIV_BLOCK);
	siv_dbl(d);
	ok = siv_cmac(sk, aad, aad_len, NULL, 0, mac);
	for (int i = 0; i < SIV_BLOCK; i++)
		d[i] ^= mac[i];
	if (ok && text_len >= SIV_BLOCK)
	{
		/* T = text xorend D: only its last block changes. */
		for (int i = 0; i < SIV_BLOCK; i++)
			d[i] ^= text[text_len - SIV_BLOCK + i];
		ok = siv_cmac(sk, text, text_len - SIV_BLOCK, d, SIV_BLOCK, v);
	}
	else if (ok)
	{
		/* T = dbl(D) xor pad(text), pad being text || 0x80 || 0...0. */
		siv_dbl(d);
		for (size_t i = 0; i < text_len; i++)
			d[i] ^= text[i];
		d[text_len] ^= 0x80;
		ok = siv_cmac(sk, d, SIV_BLOCK, NULL, 0, v);
	}
	cipher_wipe(d, sizeof(d));
	cipher_wipe(mac, sizeof(mac));
	return ok;
}

/* AES-CTR under K2 from the counter block of v (bits 31 and 63 cleared: RFC 5297). */
static bool
siv_ctr(SivKey *sk, const uint8_t v[SIV_BLOCK], const uint8_t *in, size_t len, uint8_t *out)
{
	uint8_t		q[SIV_BLOCK];
	int			outl = 0;

	memcpy(q, v, SIV_BLOCK);
	q[8] &= 0x7f;
	q[12] &= 0x7f;
	return EVP_CipherInit_ex(sk->ctr, NULL, NULL, NULL, q, 1) == 1 &&
		(len == 0 || (EVP_CipherUpdate(sk->ctr, out, &outl, in, (int) len) == 1 &&
					  (size_t) outl == len));
}

static CipherStatus
siv_seal(SivKey *sk, const uint8_t *aad, size_t aad_len, const uint8_t *in, size_t in_len,
		 uint8_t *out, uint8_t tag[SIV_BLOCK])
{
	if (!siv_s2v(sk, aad, aad_len, in, in_len, tag) || !siv_ctr(sk, tag, in, in_len, out))
		return CIPHER_ERR_INTERNAL;
	return CIPHER_OK;
}

/* Decrypt into out; CIPHER_ERR_AUTH (out wiped) unless the tag matches. */
static CipherStatus
siv_open(SivKey *sk, const uint8_t *aad, size_t aad_len, const uint8_t *in, size_t in_len,
		 uint8_t *out, const uint8_t tag[SIV_BLOCK])
{
	uint8_t		v[SIV_BLOCK];

	if (!siv_ctr(sk, tag, in, in_len, out) || !siv_s2v(sk, aad, aad_len, out, in_len, v))
	{
		cipher_wipe(out, in_len);
		return CIPHER_ERR_INTERNAL;
	}
	if (CRYPTO_memcmp(v, tag, SIV_BLOCK) != 0)
	{
		cipher_wipe(out, in_len);
		return CIPHER_ERR_AUTH;
	}
	return CIPHER_OK;
}

/* AES-256-GCM, fetched once per process rather than looked up on every set-up. */
static const EVP_CIPHER *
aes_gcm(void)
{
	static EVP_CIPHER *cipher = NULL;

	if (cipher == NULL)
		cipher = EVP_CIPHER_fetch(NULL, "AES-256-GCM", NULL);
	return cipher;
}

/*
 * A GCM context of one direction.  By default the provider's own context, driven
 * through its dispatch functions (gcm_dispatch.h: about 40 % of a short value's GCM
 * instructions on OpenSSL 3.0 are EVP's plumbing); an EVP context when that path is
 * not available for the fetched cipher, or when a test asks for EVP.
 */
typedef struct GcmContext
{
	GcmDispatchCtx dispatch;	/* in use when dispatch.algctx != NULL */
	EVP_CIPHER_CTX *evp;		/* otherwise this */
	bool		encrypting;
} GcmContext;

/* The implementation new GCM contexts use (cipher_gcm_set_path, for tests). */
static CipherGcmPath gcm_path = CIPHER_GCM_DISPATCH;

void
cipher_gcm_set_path(CipherGcmPath path)
{
	gcm_path = path;
}

static void
gcm_context_free(GcmContext *ctx)
{
	if (ctx == NULL)
		return;
	/* Both kinds cleanse their key schedules when freed. */
	gcm_dispatch_free(&ctx->dispatch);
	EVP_CIPHER_CTX_free(ctx->evp);
	free(ctx);
}

static bool
gcm_context_is_dispatch(const GcmContext *ctx)
{
	return ctx->dispatch.algctx != NULL;
}

/* Key an EVP context, new or re-keyed; the default IV length is the 96 bits we use. */
static bool
gcm_evp_key(GcmContext *ctx, const uint8_t raw[CIPHER_KEY_LEN])
{
	if (ctx->evp != NULL)
		return EVP_CipherInit_ex(ctx->evp, NULL, NULL, raw, NULL, ctx->encrypting ? 1 : 0) == 1;
	ctx->evp = EVP_CIPHER_CTX_new();
	return ctx->evp != NULL && aes_gcm() != NULL &&
		EVP_CipherInit_ex(ctx->evp, aes_gcm(), NULL, raw, NULL, ctx->encrypting ? 1 : 0) == 1 &&
		EVP_CIPHER_CTX_get_iv_length(ctx->evp) == CIPHER_NONCE_LEN;
}

/*
 * A GCM context keyed with `raw`.  A spare context of the same direction is re-keyed
 * in place (its old key schedule is overwritten), which costs a key expansion instead
 * of an allocation and a provider set-up.  It keeps its implementation, unless it is a
 * dispatch context and a test has asked for EVP: then it is replaced.
 */
static GcmContext *
gcm_context(const uint8_t raw[CIPHER_KEY_LEN], bool encrypting, GcmContext *spare)
{
	GcmContext *ctx = spare;
	bool		want_dispatch = gcm_path == CIPHER_GCM_DISPATCH;

	if (ctx != NULL && (want_dispatch || !gcm_context_is_dispatch(ctx)))
	{
		bool		ok;

		ctx->encrypting = encrypting;
		ok = gcm_context_is_dispatch(ctx) ?
			gcm_dispatch_rekey(&ctx->dispatch, raw, CIPHER_KEY_LEN, encrypting) :
			gcm_evp_key(ctx, raw);
		if (ok)
			return ctx;
	}
	gcm_context_free(ctx);

	ctx = calloc(1, sizeof(GcmContext));
	if (ctx == NULL)
		return NULL;
	ctx->encrypting = encrypting;
	/* Falls back to EVP when the provider's functions cannot be used. */
	if (want_dispatch && aes_gcm() != NULL &&
		gcm_dispatch_new(&ctx->dispatch, aes_gcm(), raw, CIPHER_KEY_LEN, encrypting))
		return ctx;
	if (gcm_evp_key(ctx, raw))
		return ctx;
	gcm_context_free(ctx);
	return NULL;
}

CipherGcmPath
cipher_key_gcm_path(const CipherKey *key, CipherUse use)
{
	const GcmContext *ctx = (const GcmContext *) (use == CIPHER_USE_ENCRYPT ? key->enc : key->dec);

	return ctx != NULL && gcm_context_is_dispatch(ctx) ? CIPHER_GCM_DISPATCH : CIPHER_GCM_EVP;
}

/* The AES-SIV key of deterministic values, its contexts re-initialised per value. */
static SivKey *
siv_context(const uint8_t raw[CIPHER_KEY_LEN])
{
	uint8_t		siv_key[CIPHER_SIV_KEY_LEN];
	SivKey	   *sk = NULL;

	if (derive_subkey(raw, siv_label, siv_key, sizeof(siv_key)))
		sk = siv_key_new(siv_key);
	cipher_wipe(siv_key, sizeof(siv_key));
	return sk;
}

/* The keyed HMAC template of the blind index. */
static EVP_MAC_CTX *
index_context(const uint8_t raw[CIPHER_KEY_LEN])
{
	uint8_t		index_key[32];
	EVP_MAC_CTX *mac = NULL;

	if (derive_subkey(raw, index_label, index_key, sizeof(index_key)))
		mac = new_index_mac(index_key, sizeof(index_key));
	cipher_wipe(index_key, sizeof(index_key));
	return mac;
}

bool
cipher_key_ready(const CipherKey *key, CipherUse use)
{
	switch (use)
	{
		case CIPHER_USE_ENCRYPT:
			return key->enc != NULL;
		case CIPHER_USE_DECRYPT:
			return key->dec != NULL;
		case CIPHER_USE_DETERMINISTIC:
			return key->siv != NULL;
		case CIPHER_USE_INDEX:
			return key->mac != NULL;
	}
	return false;
}

CipherStatus
cipher_key_add(CipherKey *key, CipherUse use, const uint8_t raw[CIPHER_KEY_LEN],
			   CipherKey *spare)
{
	switch (use)
	{
		case CIPHER_USE_ENCRYPT:
		case CIPHER_USE_DECRYPT:
			{
				bool		encrypting = use == CIPHER_USE_ENCRYPT;
				void	  **slot = encrypting ? &key->enc : &key->dec;
				void	  **spare_slot = spare == NULL ? NULL :
					encrypting ? &spare->enc : &spare->dec;
				GcmContext *reuse = spare_slot ? (GcmContext *) *spare_slot : NULL;

				if (*slot != NULL)
					return CIPHER_OK;
				if (spare_slot)
					*spare_slot = NULL;
				*slot = gcm_context(raw, encrypting, reuse);
				return *slot != NULL ? CIPHER_OK : CIPHER_ERR_INTERNAL;
			}
		case CIPHER_USE_DETERMINISTIC:
			if (key->siv == NULL)
				key->siv = siv_context(raw);
			return key->siv != NULL ? CIPHER_OK : CIPHER_ERR_INTERNAL;
		case CIPHER_USE_INDEX:
			if (key->mac == NULL)
				key->mac = index_context(raw);
			return key->mac != NULL ? CIPHER_OK : CIPHER_ERR_INTERNAL;
	}
	return CIPHER_ERR_INTERNAL;
}

CipherStatus
cipher_key_init(CipherKey *key, const uint8_t raw[CIPHER_KEY_LEN])
{
	memset(key, 0, sizeof(*key));
	if (cipher_key_add(key, CIPHER_USE_ENCRYPT, raw, NULL) != CIPHER_OK ||
		cipher_key_add(key, CIPHER_USE_DECRYPT, raw, NULL) != CIPHER_OK ||
		cipher_key_add(key, CIPHER_USE_DETERMINISTIC, raw, NULL) != CIPHER_OK ||
		cipher_key_add(key, CIPHER_USE_INDEX, raw, NULL) != CIPHER_OK)
	{
		/* The OpenSSL contexts cleanse their key material when freed. */
		cipher_key_free(key);
		return CIPHER_ERR_INTERNAL;
	}
	return CIPHER_OK;
}

CipherStatus
cipher_key_init_gcm(CipherKey *key, const uint8_t raw[CIPHER_KEY_LEN])
{
	memset(key, 0, sizeof(*key));
	if (cipher_key_add(key, CIPHER_USE_ENCRYPT, raw, NULL) != CIPHER_OK ||
		cipher_key_add(key, CIPHER_USE_DECRYPT, raw, NULL) != CIPHER_OK)
	{
		cipher_key_free(key);
		return CIPHER_ERR_INTERNAL;
	}
	return CIPHER_OK;
}

void
cipher_key_free(CipherKey *key)
{
	if (key == NULL)
		return;
	gcm_context_free((GcmContext *) key->enc);
	gcm_context_free((GcmContext *) key->dec);
	siv_key_free((SivKey *) key->siv);
	EVP_MAC_CTX_free((EVP_MAC_CTX *) key->mac);
	key->enc = key->dec = key->siv = key->mac = NULL;
}

static inline void
put_be32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t) (v >> 24);
	p[1] = (uint8_t) (v >> 16);
	p[2] = (uint8_t) (v >> 8);
	p[3] = (uint8_t) v;
}

static inline uint32_t
get_be32(const uint8_t *p)
{
	return ((uint32_t) p[0] << 24) | ((uint32_t) p[1] << 16) |
		((uint32_t) p[2] << 8) | (uint32_t) p[3];
}

/* Start a value under the context's key: only the IV changes. */
static bool
gcm_start(GcmContext *ctx, const uint8_t nonce[CIPHER_NONCE_LEN])
{
	if (gcm_context_is_dispatch(ctx))
		return gcm_dispatch_start(&ctx->dispatch, nonce, CIPHER_NONCE_LEN);
	return ctx->encrypting ? EVP_EncryptInit_ex(ctx->evp, NULL, NULL, NULL, nonce) == 1
		: EVP_DecryptInit_ex(ctx->evp, NULL, NULL, NULL, nonce) == 1;
}

/* Feed AAD to a GCM context in pieces; GCM concatenates them. */
static int
aad_update(GcmContext *ctx, bool encrypting, const uint8_t *data, size_t len)
{
	int			outl;

	if (len == 0)
		return 1;
	if (gcm_context_is_dispatch(ctx))
		return gcm_dispatch_aad(&ctx->dispatch, data, len);
	return encrypting ? EVP_EncryptUpdate(ctx->evp, NULL, &outl, data, (int) len)
		: EVP_DecryptUpdate(ctx->evp, NULL, &outl, data, (int) len);
}

/*
 * The AAD described in cipher.h: header, then tenant and context, length-prefixed.
 * Laid out in one buffer and fed in one update when it fits (the usual case): each
 * GCM AAD update has a fixed cost that shows per row.
 */
static int
feed_envelope_aad(GcmContext *ctx, bool encrypting, const uint8_t *header,
				  const CipherBinding *binding)
{
	uint8_t		buf[512];
	size_t		need = CIPHER_HEADER_LEN + 4 + binding->tenant_len + 1 +
		(binding->context ? 4 + binding->context_len : 0);
	uint8_t		len[4];
	uint8_t		present = binding->context != NULL ? 1 : 0;

	if (need <= sizeof(buf))
	{
		size_t		pos = CIPHER_HEADER_LEN;

		memcpy(buf, header, CIPHER_HEADER_LEN);
		put_be32(buf + pos, (uint32_t) binding->tenant_len);
		pos += 4;
		memcpy(buf + pos, binding->tenant, binding->tenant_len);
		pos += binding->tenant_len;
		buf[pos++] = present;
		if (present)
		{
			put_be32(buf + pos, (uint32_t) binding->context_len);
			pos += 4;
			memcpy(buf + pos, binding->context, binding->context_len);
			pos += binding->context_len;
		}
		return aad_update(ctx, encrypting, buf, pos);
	}

	if (!aad_update(ctx, encrypting, header, CIPHER_HEADER_LEN))
		return 0;
	put_be32(len, (uint32_t) binding->tenant_len);
	if (!aad_update(ctx, encrypting, len, 4) ||
		!aad_update(ctx, encrypting, (const uint8_t *) binding->tenant, binding->tenant_len))
		return 0;
	if (!aad_update(ctx, encrypting, &present, 1))
		return 0;
	if (present)
	{
		put_be32(len, (uint32_t) binding->context_len);
		if (!aad_update(ctx, encrypting, len, 4) ||
			!aad_update(ctx, encrypting, (const uint8_t *) binding->context,
						binding->context_len))
			return 0;
	}
	return 1;
}

/*
 * Get or set the GCM tag through OpenSSL 3's parameters directly: the legacy
 * EVP_CIPHER_CTX_ctrl() path translates each call into parameters by name, a cost
 * that shows per row.
 */
static int
gcm_tag_param(EVP_CIPHER_CTX *ctx, bool set, uint8_t *tag)
{
	OSSL_PARAM	params[2];

	params[0] = OSSL_PARAM_construct_octet_string(OSSL_CIPHER_PARAM_AEAD_TAG,
												  tag, CIPHER_TAG_LEN);
	params[1] = OSSL_PARAM_construct_end();
	return set ? EVP_CIPHER_CTX_set_params(ctx, params) == 1
		: EVP_CIPHER_CTX_get_params(ctx, params) == 1;
}

/*
 * The body of a GCM seal once the AAD is in: encrypt, finish, take the tag.  OpenSSL's
 * EVP takes int lengths; callers keep values under 1 GB (PostgreSQL's limit), well
 * within.
 */
static CipherStatus
gcm_seal_body(GcmContext *ctx, const uint8_t *plain, size_t plain_len,
			  uint8_t *out, uint8_t *tag)
{
	int			outl = 0;
	int			finl = 0;

	if (gcm_context_is_dispatch(ctx))
		return gcm_dispatch_update(&ctx->dispatch, plain, plain_len, out) &&
			gcm_dispatch_seal_final(&ctx->dispatch, tag, CIPHER_TAG_LEN) ?
			CIPHER_OK : CIPHER_ERR_INTERNAL;

	if (plain_len > 0 && EVP_EncryptUpdate(ctx->evp, out, &outl, plain, (int) plain_len) != 1)
		return CIPHER_ERR_INTERNAL;
	if (EVP_EncryptFinal_ex(ctx->evp, out + outl, &finl) != 1 ||
		!gcm_tag_param(ctx->evp, false, tag))
		return CIPHER_ERR_INTERNAL;
	return CIPHER_OK;
}

/* A failed update or tag set is an internal failure; only the final check is a mismatch. */
static CipherStatus
gcm_evp_open(EVP_CIPHER_CTX *ctx, const uint8_t *in, size_t in_len,
			 const uint8_t *tag, uint8_t *out)
{
	int			outl = 0;
	int			finl = 0;

	if ((in_len > 0 && EVP_DecryptUpdate(ctx, out, &outl, in, (int) in_len) != 1) ||
		!gcm_tag_param(ctx, true, (uint8_t *) tag))
		return CIPHER_ERR_INTERNAL;
	return EVP_DecryptFinal_ex(ctx, out + outl, &finl) == 1 ? CIPHER_OK : CIPHER_ERR_AUTH;
}

static CipherStatus
gcm_open_body(GcmContext *ctx, const uint8_t *in, size_t in_len,
			  const uint8_t *tag, uint8_t *out)
{
	CipherStatus status;

	if (gcm_context_is_dispatch(ctx))
	{
		switch (gcm_dispatch_open(&ctx->dispatch, in, in_len, tag, CIPHER_TAG_LEN, out))
		{
			case GCM_DISPATCH_OPENED:
				return CIPHER_OK;
			case GCM_DISPATCH_TAG_MISMATCH:
				status = CIPHER_ERR_AUTH;
				break;
			default:
				status = CIPHER_ERR_INTERNAL;
				break;
		}
	}
	else
		status = gcm_evp_open(ctx->evp, in, in_len, tag, out);
	if (status == CIPHER_OK)
		return CIPHER_OK;

	/* Not authenticated: nothing decrypted may leave this function. */
	cipher_wipe(out, in_len);
	return status;
}

CipherStatus
cipher_peek_version(const uint8_t *in, size_t in_len, uint32_t *version)
{
	if (in_len < 1 ||
		(in[0] == CIPHER_FORMAT_GCM_V1 && in_len < CIPHER_OVERHEAD) ||
		(in[0] == CIPHER_FORMAT_SIV_V1 && in_len < CIPHER_SIV_OVERHEAD) ||
		(in[0] != CIPHER_FORMAT_GCM_V1 && in[0] != CIPHER_FORMAT_SIV_V1))
		return CIPHER_ERR_FORMAT;
	*version = get_be32(in + 1);
	if (*version == 0)
		return CIPHER_ERR_FORMAT;
	return CIPHER_OK;
}

CipherStatus
cipher_plaintext_len(const uint8_t *in, size_t in_len, size_t *len)
{
	uint32_t	version;

	if (cipher_peek_version(in, in_len, &version) != CIPHER_OK)
		return CIPHER_ERR_FORMAT;
	*len = in_len - (in[0] == CIPHER_FORMAT_GCM_V1 ? CIPHER_OVERHEAD : CIPHER_SIV_OVERHEAD);
	return CIPHER_OK;
}

CipherStatus
cipher_encrypt(const CipherKey *key, uint32_t version,
			   const uint8_t nonce[CIPHER_NONCE_LEN],
			   const CipherBinding *binding,
			   const uint8_t *plain, size_t plain_len, uint8_t *out)
{
	GcmContext *ctx = (GcmContext *) key->enc;
	uint8_t    *header = out;

	if (ctx == NULL)
		return CIPHER_ERR_INTERNAL;
	header[0] = CIPHER_FORMAT_GCM_V1;
	put_be32(header + 1, version);
	memcpy(header + 5, nonce, CIPHER_NONCE_LEN);

	/* Only the IV changes: the key schedule set in cipher_key_init() is kept. */
	if (!gcm_start(ctx, nonce) ||
		!feed_envelope_aad(ctx, true, header, binding))
		return CIPHER_ERR_INTERNAL;
	return gcm_seal_body(ctx, plain, plain_len, out + CIPHER_HEADER_LEN,
						 out + CIPHER_HEADER_LEN + plain_len);
}

static CipherStatus siv_decrypt_envelope(const CipherKey *key, const CipherBinding *binding,
										 const uint8_t *in, size_t in_len, uint8_t *out);

CipherStatus
cipher_decrypt(const CipherKey *key, const CipherBinding *binding,
			   const uint8_t *in, size_t in_len, uint8_t *out)
{
	GcmContext *ctx = (GcmContext *) key->dec;
	uint32_t	version;
	size_t		body_len;

	if (cipher_peek_version(in, in_len, &version) != CIPHER_OK)
		return CIPHER_ERR_FORMAT;
	if (in[0] == CIPHER_FORMAT_SIV_V1)
		return siv_decrypt_envelope(key, binding, in, in_len, out);
	if (ctx == NULL)
		return CIPHER_ERR_INTERNAL;
	body_len = in_len - CIPHER_OVERHEAD;

	if (!gcm_start(ctx, in + 5) ||
		!feed_envelope_aad(ctx, false, in, binding))
		return CIPHER_ERR_INTERNAL;
	return gcm_open_body(ctx, in + CIPHER_HEADER_LEN, body_len,
						 in + CIPHER_HEADER_LEN + body_len, out);
}

CipherStatus
cipher_gcm_seal(const CipherKey *key, const uint8_t nonce[CIPHER_NONCE_LEN],
				const uint8_t *aad, size_t aad_len,
				const uint8_t *plain, size_t plain_len,
				uint8_t *out, uint8_t tag[CIPHER_TAG_LEN])
{
	GcmContext *ctx = (GcmContext *) key->enc;

	if (ctx == NULL || !gcm_start(ctx, nonce) ||
		!aad_update(ctx, true, aad, aad_len))
		return CIPHER_ERR_INTERNAL;
	return gcm_seal_body(ctx, plain, plain_len, out, tag);
}

CipherStatus
cipher_gcm_open(const CipherKey *key, const uint8_t nonce[CIPHER_NONCE_LEN],
				const uint8_t *aad, size_t aad_len,
				const uint8_t *in, size_t in_len,
				const uint8_t tag[CIPHER_TAG_LEN], uint8_t *out)
{
	GcmContext *ctx = (GcmContext *) key->dec;

	if (ctx == NULL || !gcm_start(ctx, nonce) ||
		!aad_update(ctx, false, aad, aad_len))
		return CIPHER_ERR_INTERNAL;
	return gcm_open_body(ctx, in, in_len, tag, out);
}

/* ---------------------------------------------------------------------------
 * Deterministic encryption (AES-256-SIV) and the blind index.
 */

/*
 * The deterministic format's AAD, as one contiguous S2V component:
 * header(5) || len(tenant) || tenant || presence [|| len(context) || context].
 */
#define SIV_STACK_AAD 512

static uint8_t *
build_siv_aad(const uint8_t *header, const CipherBinding *binding, size_t *aad_len,
			  uint8_t stack[SIV_STACK_AAD])
{
	size_t		len = CIPHER_SIV_HEADER_LEN + 4 + binding->tenant_len + 1 +
		(binding->context ? 4 + binding->context_len : 0);
	uint8_t    *aad = len <= SIV_STACK_AAD ? stack : malloc(len);
	size_t		pos = 0;

	if (aad == NULL)
		return NULL;
	memcpy(aad, header, CIPHER_SIV_HEADER_LEN);
	pos = CIPHER_SIV_HEADER_LEN;
	put_be32(aad + pos, (uint32_t) binding->tenant_len);
	pos += 4;
	memcpy(aad + pos, binding->tenant, binding->tenant_len);
	pos += binding->tenant_len;
	aad[pos++] = binding->context ? 1 : 0;
	if (binding->context)
	{
		put_be32(aad + pos, (uint32_t) binding->context_len);
		pos += 4;
		memcpy(aad + pos, binding->context, binding->context_len);
		pos += binding->context_len;
	}
	*aad_len = pos;
	return aad;
}

/*
 * The SIV input is 0x00 || plaintext (never empty: OpenSSL 3.0's AES-SIV refused empty
 * inputs when the format was fixed).  Short values are assembled on the stack.
 */
#define SIV_STACK_INPUT 256

CipherStatus
cipher_encrypt_deterministic(const CipherKey *key, uint32_t version,
							 const CipherBinding *binding,
							 const uint8_t *plain, size_t plain_len, uint8_t *out)
{
	uint8_t		stack_input[SIV_STACK_INPUT];
	uint8_t		stack_aad[SIV_STACK_AAD];
	uint8_t    *aad;
	uint8_t    *input;
	size_t		aad_len;
	CipherStatus status;

	out[0] = CIPHER_FORMAT_SIV_V1;
	put_be32(out + 1, version);
	aad = build_siv_aad(out, binding, &aad_len, stack_aad);
	input = plain_len + 1 <= sizeof(stack_input) ? stack_input : malloc(plain_len + 1);
	if (aad == NULL || input == NULL || key->siv == NULL)
		status = CIPHER_ERR_INTERNAL;
	else
	{
		input[0] = 0x00;
		memcpy(input + 1, plain, plain_len);
		status = siv_seal((SivKey *) key->siv, aad, aad_len, input, plain_len + 1,
						  out + CIPHER_SIV_HEADER_LEN + CIPHER_SIV_TAG_LEN,
						  out + CIPHER_SIV_HEADER_LEN);
	}
	if (input != NULL)
		cipher_wipe(input, plain_len + 1);
	if (input != stack_input)
		free(input);
	if (aad != stack_aad)
		free(aad);
	return status;
}

static CipherStatus
siv_decrypt_envelope(const CipherKey *key, const CipherBinding *binding,
					 const uint8_t *in, size_t in_len, uint8_t *out)
{
	size_t		body_len = in_len - CIPHER_SIV_HEADER_LEN - CIPHER_SIV_TAG_LEN;
	uint8_t		stack_buf[SIV_STACK_INPUT];
	uint8_t		stack_aad[SIV_STACK_AAD];
	uint8_t    *aad;
	uint8_t    *buf;
	uint8_t		tag[CIPHER_SIV_TAG_LEN];
	size_t		aad_len;
	CipherStatus status;

	memcpy(tag, in + CIPHER_SIV_HEADER_LEN, CIPHER_SIV_TAG_LEN);
	aad = build_siv_aad(in, binding, &aad_len, stack_aad);
	buf = body_len <= sizeof(stack_buf) ? stack_buf : malloc(body_len);
	if (aad == NULL || buf == NULL || key->siv == NULL)
		status = CIPHER_ERR_INTERNAL;
	else
	{
		status = siv_open((SivKey *) key->siv, aad, aad_len,
						  in + CIPHER_SIV_HEADER_LEN + CIPHER_SIV_TAG_LEN, body_len, buf, tag);
		if (status == CIPHER_OK && buf[0] != 0x00)
			status = CIPHER_ERR_AUTH;
		if (status == CIPHER_OK)
			memcpy(out, buf + 1, body_len - 1);
		else
			cipher_wipe(out, body_len - 1);
	}
	if (buf != NULL)
		cipher_wipe(buf, body_len);
	if (buf != stack_buf)
		free(buf);
	if (aad != stack_aad)
		free(aad);
	return status;
}

CipherStatus
cipher_blind_index(const CipherKey *key, const CipherBinding *binding,
				   const uint8_t *value, size_t value_len, uint8_t out[CIPHER_INDEX_LEN])
{
	/* The keyed context itself, re-initialised (same key): no copy per value. */
	EVP_MAC_CTX *ctx = (EVP_MAC_CTX *) key->mac;
	uint8_t		len[4];
	size_t		outl = 0;
	int			ok;

	if (ctx == NULL)
		return CIPHER_ERR_INTERNAL;
	put_be32(len, (uint32_t) binding->tenant_len);
	ok = EVP_MAC_init(ctx, NULL, 0, NULL) == 1 &&
		EVP_MAC_update(ctx, len, 4) == 1 &&
		EVP_MAC_update(ctx, (const uint8_t *) binding->tenant, binding->tenant_len) == 1 &&
		EVP_MAC_update(ctx, value, value_len) == 1 &&
		EVP_MAC_final(ctx, out, &outl, CIPHER_INDEX_LEN) == 1 && outl == CIPHER_INDEX_LEN;
	return ok ? CIPHER_OK : CIPHER_ERR_INTERNAL;
}

CipherStatus
cipher_blind_index_versioned(const CipherKey *key, uint32_t version,
							 const CipherBinding *binding,
							 const uint8_t *value, size_t value_len,
							 uint8_t *out, size_t *out_len)
{
	size_t		prefix = version >= 2 ? 4 : 0;

	if (version == 0)
		return CIPHER_ERR_FORMAT;
	if (prefix)
		put_be32(out, version);
	*out_len = prefix + CIPHER_INDEX_LEN;
	return cipher_blind_index(key, binding, value, value_len, out + prefix);
}

CipherStatus
cipher_blind_index_version(const uint8_t *in, size_t in_len, uint32_t *version)
{
	if (in_len == CIPHER_INDEX_LEN)
	{
		*version = 1;
		return CIPHER_OK;
	}
	if (in_len == CIPHER_INDEX_VERSIONED_MAX_LEN)
	{
		*version = ((uint32_t) in[0] << 24) | ((uint32_t) in[1] << 16) |
			((uint32_t) in[2] << 8) | (uint32_t) in[3];
		if (*version >= 2)
			return CIPHER_OK;
	}
	return CIPHER_ERR_FORMAT;
}

/* One SIV operation under a raw 64-byte key (the Wycheproof vectors). */
static CipherStatus
siv_raw(const uint8_t key[CIPHER_SIV_KEY_LEN], bool encrypting,
		const uint8_t *aad, size_t aad_len, const uint8_t *in, size_t in_len,
		uint8_t *out, uint8_t *tag)
{
	SivKey	   *sk = siv_key_new(key);
	CipherStatus status;

	if (sk == NULL)
		return CIPHER_ERR_INTERNAL;
	status = encrypting ? siv_seal(sk, aad, aad_len, in, in_len, out, tag) :
		siv_open(sk, aad, aad_len, in, in_len, out, tag);
	siv_key_free(sk);
	return status;
}

CipherStatus
cipher_siv_seal(const uint8_t key[CIPHER_SIV_KEY_LEN], const uint8_t *aad, size_t aad_len,
				const uint8_t *plain, size_t plain_len, uint8_t *out)
{
	return siv_raw(key, true, aad, aad_len, plain, plain_len, out + CIPHER_SIV_TAG_LEN, out);
}

CipherStatus
cipher_siv_open(const uint8_t key[CIPHER_SIV_KEY_LEN], const uint8_t *aad, size_t aad_len,
				const uint8_t *in, size_t in_len, uint8_t *out)
{
	uint8_t		tag[CIPHER_SIV_TAG_LEN];
	CipherStatus status;

	if (in_len < CIPHER_SIV_TAG_LEN)
		return CIPHER_ERR_FORMAT;
	memcpy(tag, in, CIPHER_SIV_TAG_LEN);
	status = siv_raw(key, false, aad, aad_len, in + CIPHER_SIV_TAG_LEN,
					 in_len - CIPHER_SIV_TAG_LEN, out, tag);
	if (status != CIPHER_OK)
		cipher_wipe(out, in_len - CIPHER_SIV_TAG_LEN);
	return status;
}
