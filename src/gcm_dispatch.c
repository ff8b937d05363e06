/*
 * gcm_dispatch.c — AES-GCM through the provider's dispatch table (see gcm_dispatch.h
 * for why, what it relies on and when the caller falls back to EVP).
 *
 * Every call checks what EVP_EncryptUpdate and friends check for a provider cipher:
 * the return value, that an update produced exactly its input's length (outsize given
 * as the input length, as EVP gives it for a cipher of block size 1); and, stricter
 * than EVP for provider ciphers, that input and output do not partly overlap.
 */
#include <string.h>

#include <openssl/core_dispatch.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/params.h>
#include <openssl/provider.h>

#include "gcm_dispatch.h"

struct GcmDispatchTable
{
	OSSL_FUNC_cipher_newctx_fn *newctx;
	OSSL_FUNC_cipher_freectx_fn *freectx;
	OSSL_FUNC_cipher_encrypt_init_fn *encrypt_init;
	OSSL_FUNC_cipher_decrypt_init_fn *decrypt_init;
	OSSL_FUNC_cipher_update_fn *update;
	OSSL_FUNC_cipher_final_fn *final;
	OSSL_FUNC_cipher_get_ctx_params_fn *get_ctx_params;
	OSSL_FUNC_cipher_set_ctx_params_fn *set_ctx_params;
	void	   *provctx;		/* the provider's context, argument of newctx */
};

/*
 * The process's look-up, for one cipher (cipher.c fetches AES-256-GCM once), done once
 * per process image by the first gcm_dispatch_new.  A forked child shares it without
 * looking again: it runs the same image, so the provider's functions and context are
 * at the same addresses, and a new look-up could only find what is already there.
 * `table` is written once, before `usable` is set, and never after: contexts point at
 * it for as long as the process lives.
 */
static struct
{
	const EVP_CIPHER *cipher;	/* the cipher looked up (a reference held); NULL before */
	bool		usable;
	GcmDispatchTable table;
}			lookup;

/* ASCII case-insensitive compare of n bytes, whatever the process's locale. */
static bool
ascii_names_equal(const char *a, const char *b, size_t n)
{
	for (size_t i = 0; i < n; i++)
	{
		unsigned char x = (unsigned char) a[i];
		unsigned char y = (unsigned char) b[i];

		if (x >= 'A' && x <= 'Z')
			x += 'a' - 'A';
		if (y >= 'A' && y <= 'Z')
			y += 'a' - 'A';
		if (x != y)
			return false;
	}
	return true;
}

/*
 * Is `name` one of the colon-separated names of an algorithm?  Case-insensitive, as
 * OpenSSL compares algorithm names.
 */
static bool
names_include(const char *names, const char *name)
{
	size_t		len = strlen(name);

	for (const char *p = names; p != NULL && *p != '\0';)
	{
		const char *end = strchr(p, ':');
		size_t		n = end ? (size_t) (end - p) : strlen(p);

		if (n == len && ascii_names_equal(p, name, len))
			return true;
		p = end ? end + 1 : NULL;
	}
	return false;
}

/* Copy the functions this layer calls from one implementation; false if any is missing. */
static bool
table_from_dispatch(const OSSL_DISPATCH *fns, GcmDispatchTable *t)
{
	memset(t, 0, sizeof(*t));
	for (; fns->function_id != 0; fns++)
	{
		switch (fns->function_id)
		{
			case OSSL_FUNC_CIPHER_NEWCTX:
				t->newctx = OSSL_FUNC_cipher_newctx(fns);
				break;
			case OSSL_FUNC_CIPHER_FREECTX:
				t->freectx = OSSL_FUNC_cipher_freectx(fns);
				break;
			case OSSL_FUNC_CIPHER_ENCRYPT_INIT:
				t->encrypt_init = OSSL_FUNC_cipher_encrypt_init(fns);
				break;
			case OSSL_FUNC_CIPHER_DECRYPT_INIT:
				t->decrypt_init = OSSL_FUNC_cipher_decrypt_init(fns);
				break;
			case OSSL_FUNC_CIPHER_UPDATE:
				t->update = OSSL_FUNC_cipher_update(fns);
				break;
			case OSSL_FUNC_CIPHER_FINAL:
				t->final = OSSL_FUNC_cipher_final(fns);
				break;
			case OSSL_FUNC_CIPHER_GET_CTX_PARAMS:
				t->get_ctx_params = OSSL_FUNC_cipher_get_ctx_params(fns);
				break;
			case OSSL_FUNC_CIPHER_SET_CTX_PARAMS:
				t->set_ctx_params = OSSL_FUNC_cipher_set_ctx_params(fns);
				break;
		}
	}
	return t->newctx && t->freectx && t->encrypt_init && t->decrypt_init &&
		t->update && t->final && t->get_ctx_params && t->set_ctx_params;
}

/* The fault the next look-up meets (gcm_dispatch_inject_fault, for tests). */
static GcmDispatchFault injected_fault = GCM_DISPATCH_FAULT_NONE;

void
gcm_dispatch_inject_fault(GcmDispatchFault fault)
{
	injected_fault = fault;
}

/*
 * Is `prov` one of OpenSSL's own providers, whose AES-GCM this layer is written against
 * (gcm_dispatch.h says what it relies on in them)?
 */
static bool
openssl_own_provider(const OSSL_PROVIDER *prov)
{
	const char *name = OSSL_PROVIDER_get0_name(prov);

	if (injected_fault == GCM_DISPATCH_FAULT_FOREIGN_PROVIDER)
		name = "pg_envelope_test";
	return name != NULL && (strcmp(name, "default") == 0 || strcmp(name, "fips") == 0);
}

/*
 * Find the implementation of exactly `cipher` in the provider that EVP_CIPHER_fetch
 * took it from: the one algorithm of that provider with the cipher's name among its
 * names.  None, or more than one (implementations told apart by properties only), and
 * the caller uses EVP.  (Descriptions cannot tell them apart: OpenSSL 3.0's providers
 * leave algorithm_description NULL and EVP makes one up.)
 */
static bool
find_implementation(const EVP_CIPHER *cipher, GcmDispatchTable *t)
{
	const OSSL_PROVIDER *prov = EVP_CIPHER_get0_provider(cipher);
	const char *name = EVP_CIPHER_get0_name(cipher);
	const OSSL_ALGORITHM *algs;
	const OSSL_ALGORITHM *match = NULL;
	int			no_store = 0;
	int			matches = 0;
	bool		ok = false;

	if (prov == NULL || name == NULL || !openssl_own_provider(prov))
		return false;
	algs = OSSL_PROVIDER_query_operation(prov, OSSL_OP_CIPHER, &no_store);
	if (algs == NULL)
		return false;
	for (const OSSL_ALGORITHM *a = algs; a->algorithm_names != NULL; a++)
	{
		if (names_include(a->algorithm_names, name))
		{
			match = a;
			matches++;
		}
	}
	if (matches == 1)
	{
		ok = table_from_dispatch(match->implementation, t);
		t->provctx = OSSL_PROVIDER_get0_provider_ctx(prov);
	}
	OSSL_PROVIDER_unquery_operation(prov, OSSL_OP_CIPHER, algs);
	return ok;
}

static bool passes_known_answer(const GcmDispatchTable *t);

/* Look the table of `cipher` up, check it, and if it passes make it the process's. */
static void
look_up(const EVP_CIPHER *cipher)
{
	GcmDispatchTable found;

	/* Hold the provider (through its cipher) for as long as the table is used. */
	if (EVP_CIPHER_up_ref((EVP_CIPHER *) cipher) != 1)
		return;					/* nothing decided: tried again next time */
	lookup.cipher = cipher;
	if (find_implementation(cipher, &found) && passes_known_answer(&found))
	{
		lookup.table = found;
		lookup.usable = true;
	}
}

/* The table for `cipher` in this process, or NULL. */
static const GcmDispatchTable *
table_for(const EVP_CIPHER *cipher)
{
	if (cipher == NULL)
		return NULL;
	if (lookup.cipher == NULL)
		look_up(cipher);
	/* One cipher per process; any other goes through EVP. */
	return lookup.cipher == cipher && lookup.usable ? &lookup.table : NULL;
}

/* Key (or re-key) the provider context for one direction. */
static bool
key_context(GcmDispatchCtx *ctx, const uint8_t *key, size_t key_len, bool encrypting)
{
	int			(*init) (void *, const unsigned char *, size_t,
						 const unsigned char *, size_t, const OSSL_PARAM[]);

	init = encrypting ? ctx->fns->encrypt_init : ctx->fns->decrypt_init;
	ctx->encrypting = encrypting;
	return init(ctx->algctx, key, key_len, NULL, 0, NULL) == 1;
}

/* A new context of `fns`, keyed; false with `ctx` zeroed and nothing allocated. */
static bool
new_context(GcmDispatchCtx *ctx, const GcmDispatchTable *fns,
			const uint8_t *key, size_t key_len, bool encrypting)
{
	memset(ctx, 0, sizeof(*ctx));
	ctx->fns = fns;
	ctx->algctx = fns->newctx(fns->provctx);
	if (ctx->algctx != NULL && key_context(ctx, key, key_len, encrypting))
		return true;
	gcm_dispatch_free(ctx);
	return false;
}

/*
 * A new keyed context, or false with nothing allocated.  The caller tries EVP next, so
 * what a failure here pushed on OpenSSL's error queue is dropped (ERR_pop_to_mark):
 * it must not be read as the cause of a later, unrelated failure.
 */
bool
gcm_dispatch_new(GcmDispatchCtx *ctx, const EVP_CIPHER *cipher,
				 const uint8_t *key, size_t key_len, bool encrypting)
{
	const GcmDispatchTable *fns;
	bool		ok;

	memset(ctx, 0, sizeof(*ctx));
	if (key_len != GCM_DISPATCH_KEY_LEN)
		return false;			/* as gcm_dispatch_rekey: not handed to the provider */
	ERR_set_mark();
	fns = table_for(cipher);
	ok = fns != NULL && new_context(ctx, fns, key, key_len, encrypting);
	ERR_pop_to_mark();
	return ok;
}

/*
 * No error-queue mark here: a re-key is on the path of every tenant switch, and a mark
 * and its pop cost about 350 instructions, 40 % of a re-key.  The one refusal a caller
 * can cause, a key of another length, is caught before the provider sees it; what else
 * the provider could raise (a FIPS provider in its error state) fails EVP as well and
 * is the error worth reading.
 */
bool
gcm_dispatch_rekey(GcmDispatchCtx *ctx, const uint8_t *key, size_t key_len, bool encrypting)
{
	if (key_len != GCM_DISPATCH_KEY_LEN)
		return false;
	return key_context(ctx, key, key_len, encrypting);
}

bool
gcm_dispatch_start(GcmDispatchCtx *ctx, const uint8_t *iv, size_t iv_len)
{
	if (iv_len != GCM_DISPATCH_IV_LEN)
		return false;
	return (ctx->encrypting ? ctx->fns->encrypt_init : ctx->fns->decrypt_init)
		(ctx->algctx, NULL, 0, iv, iv_len, NULL) == 1;
}

bool
gcm_dispatch_aad(GcmDispatchCtx *ctx, const uint8_t *aad, size_t len)
{
	size_t		outl = 0;

	if (len == 0)
		return true;
	return ctx->fns->update(ctx->algctx, NULL, &outl, len, aad, len) == 1 && outl == len;
}

/*
 * Do the buffers overlap other than exactly (in place)?  OpenSSL's own ciphers do not
 * promise a right result then; EVP refuses it for legacy ciphers only.
 */
static bool
partially_overlapping(const uint8_t *in, const uint8_t *out, size_t len)
{
	uintptr_t	i = (uintptr_t) in;
	uintptr_t	o = (uintptr_t) out;

	return in != out && (i < o ? o - i < len : i - o < len);
}

bool
gcm_dispatch_update(GcmDispatchCtx *ctx, const uint8_t *in, size_t len, uint8_t *out)
{
	size_t		outl = 0;

	if (len == 0)
		return true;
	if (partially_overlapping(in, out, len))
		return false;
	return ctx->fns->update(ctx->algctx, out, &outl, len, in, len) == 1 && outl == len;
}

/* The final step: GCM writes nothing here (outsize 0, as EVP passes for it). */
static bool
dispatch_final(GcmDispatchCtx *ctx)
{
	unsigned char none[1];
	size_t		outl = 0;

	return ctx->fns->final(ctx->algctx, none, &outl, 0) == 1 && outl == 0;
}

bool
gcm_dispatch_seal_final(GcmDispatchCtx *ctx, uint8_t *tag, size_t tag_len)
{
	OSSL_PARAM	params[2];

	if (tag_len != GCM_DISPATCH_TAG_LEN || !dispatch_final(ctx))
		return false;
	params[0] = OSSL_PARAM_construct_octet_string(OSSL_CIPHER_PARAM_AEAD_TAG, tag, tag_len);
	params[1] = OSSL_PARAM_construct_end();
	return ctx->fns->get_ctx_params(ctx->algctx, params) == 1 &&
		params[0].return_size == tag_len;
}

/*
 * The tag goes in before the final step, which compares it in constant time.  The
 * context keeps the previous value's tag otherwise, so a failed set is a failure of its
 * own, not a mismatch.
 */
static GcmDispatchOpenResult
check_tag(GcmDispatchCtx *ctx, const uint8_t *tag, size_t tag_len)
{
	OSSL_PARAM	params[2];

	if (tag_len != GCM_DISPATCH_TAG_LEN)
		return GCM_DISPATCH_OPEN_FAILED;
	params[0] = OSSL_PARAM_construct_octet_string(OSSL_CIPHER_PARAM_AEAD_TAG,
												  (void *) tag, tag_len);
	params[1] = OSSL_PARAM_construct_end();
	if (ctx->fns->set_ctx_params(ctx->algctx, params) != 1)
		return GCM_DISPATCH_OPEN_FAILED;
	return dispatch_final(ctx) ? GCM_DISPATCH_OPENED : GCM_DISPATCH_TAG_MISMATCH;
}

GcmDispatchOpenResult
gcm_dispatch_open(GcmDispatchCtx *ctx, const uint8_t *in, size_t len,
				  const uint8_t *tag, size_t tag_len, uint8_t *out)
{
	GcmDispatchOpenResult result;

	result = gcm_dispatch_update(ctx, in, len, out) ?
		check_tag(ctx, tag, tag_len) : GCM_DISPATCH_OPEN_FAILED;
	if (result != GCM_DISPATCH_OPENED && len > 0)
		OPENSSL_cleanse(out, len);
	return result;
}

void
gcm_dispatch_free(GcmDispatchCtx *ctx)
{
	/*
	 * OpenSSL 3.0's AES-GCM freectx (providers/implementations/ciphers/
	 * cipher_aes_gcm.c, aes_gcm_freectx) is OPENSSL_clear_free of the whole context:
	 * the key schedule and the GHASH key are cleansed, as EVP_CIPHER_CTX_free does.
	 */
	if (ctx->algctx != NULL)
		ctx->fns->freectx(ctx->algctx);
	memset(ctx, 0, sizeof(*ctx));
}

/*
 * The known-answer self-test a table passes before it is used: Wycheproof
 * aes_gcm_test.json tcId 102 (AES-256, 96-bit IV, 16 bytes of AAD, 20 bytes of message
 * so that the last block is partial, 128-bit tag), run through this layer's own
 * functions as a value is.
 */
static const uint8_t kat_key[32] = {
	0xf3, 0x23, 0x64, 0xb1, 0xd3, 0x39, 0xd8, 0x2e, 0x4f, 0x13, 0x2d, 0x8f, 0x4a, 0x0e, 0xc1, 0xff,
	0x7e, 0x74, 0x65, 0x17, 0xfa, 0x07, 0xef, 0x1a, 0x7f, 0x42, 0x2f, 0x4e, 0x25, 0xa4, 0x81, 0x94};
static const uint8_t kat_iv[GCM_DISPATCH_IV_LEN] = {
	0x5a, 0x86, 0xa5, 0x0a, 0x0e, 0x8a, 0x17, 0x9c, 0x73, 0x4b, 0x99, 0x6d};
static const uint8_t kat_aad[16] = {
	0xab, 0x2a, 0xc7, 0xc4, 0x4c, 0x60, 0xbd, 0xf8, 0x22, 0x8c, 0x78, 0x84, 0xad, 0xb2, 0x01, 0x84};
static const uint8_t kat_plain[20] = {
	0x43, 0x89, 0x1b, 0xcc, 0xb5, 0x22, 0xb1, 0xe7, 0x2a, 0x6b, 0x53, 0xcf, 0x31, 0xc0, 0x74, 0xe9,
	0xd6, 0xc2, 0xdf, 0x8e};
static const uint8_t kat_cipher[20] = {
	0x43, 0xdd, 0xa8, 0x32, 0xe9, 0x42, 0xe2, 0x86, 0xda, 0x31, 0x4d, 0xaa, 0x99, 0xbe, 0xf5, 0x07,
	0x1d, 0x9d, 0x2c, 0x78};
static const uint8_t kat_tag[GCM_DISPATCH_TAG_LEN] = {
	0xc3, 0x92, 0x25, 0x83, 0x47, 0x6c, 0xed, 0x57, 0x54, 0x04, 0xdd, 0xb8, 0x5d, 0xd8, 0xcd, 0x44};

/* Seal the vector; true if ciphertext and tag are the expected ones. */
static bool
kat_seal(const GcmDispatchTable *t, const uint8_t *expect_cipher, const uint8_t *expect_tag)
{
	GcmDispatchCtx ctx;
	uint8_t		out[sizeof(kat_plain)];
	uint8_t		tag[GCM_DISPATCH_TAG_LEN];
	bool		ok;

	if (!new_context(&ctx, t, kat_key, sizeof(kat_key), true))
		return false;
	ok = gcm_dispatch_start(&ctx, kat_iv, sizeof(kat_iv)) &&
		gcm_dispatch_aad(&ctx, kat_aad, sizeof(kat_aad)) &&
		gcm_dispatch_update(&ctx, kat_plain, sizeof(kat_plain), out) &&
		gcm_dispatch_seal_final(&ctx, tag, sizeof(tag)) &&
		memcmp(out, expect_cipher, sizeof(out)) == 0 &&
		memcmp(tag, expect_tag, sizeof(tag)) == 0;
	gcm_dispatch_free(&ctx);
	return ok;
}

/*
 * Open the vector with `tag`: true if it opens to the plaintext (`expect_open`) or,
 * with a wrong tag, is refused as a mismatch with every output byte wiped.
 */
static bool
kat_open(const GcmDispatchTable *t, const uint8_t *tag, bool expect_open)
{
	GcmDispatchCtx ctx;
	uint8_t		out[sizeof(kat_cipher)];
	GcmDispatchOpenResult result;
	bool		ok;

	if (!new_context(&ctx, t, kat_key, sizeof(kat_key), false))
		return false;
	memset(out, 0xA5, sizeof(out));
	ok = gcm_dispatch_start(&ctx, kat_iv, sizeof(kat_iv)) &&
		gcm_dispatch_aad(&ctx, kat_aad, sizeof(kat_aad));
	result = ok ? gcm_dispatch_open(&ctx, kat_cipher, sizeof(kat_cipher), tag,
									GCM_DISPATCH_TAG_LEN, out) : GCM_DISPATCH_OPEN_FAILED;
	if (expect_open)
		ok = result == GCM_DISPATCH_OPENED && memcmp(out, kat_plain, sizeof(out)) == 0;
	else
	{
		ok = result == GCM_DISPATCH_TAG_MISMATCH;
		for (size_t i = 0; i < sizeof(out); i++)
			ok = ok && out[i] == 0;
	}
	gcm_dispatch_free(&ctx);
	return ok;
}

/*
 * Does the table seal the vector to the expected bytes, open it back, and refuse it
 * under a tag with one bit flipped?  (The faults of gcm_dispatch_inject_fault change
 * what it expects, or leave the "flipped" tag intact, to show a mismatch is refused.)
 */
static bool
passes_known_answer(const GcmDispatchTable *t)
{
	uint8_t		expect_cipher[sizeof(kat_cipher)];
	uint8_t		expect_tag[GCM_DISPATCH_TAG_LEN];
	uint8_t		flipped_tag[GCM_DISPATCH_TAG_LEN];

	memcpy(expect_cipher, kat_cipher, sizeof(expect_cipher));
	memcpy(expect_tag, kat_tag, sizeof(expect_tag));
	memcpy(flipped_tag, kat_tag, sizeof(flipped_tag));
	if (injected_fault == GCM_DISPATCH_FAULT_CIPHERTEXT)
		expect_cipher[sizeof(expect_cipher) - 1] ^= 0x01;
	if (injected_fault == GCM_DISPATCH_FAULT_TAG)
		expect_tag[0] ^= 0x80;
	if (injected_fault != GCM_DISPATCH_FAULT_TAG_NOT_FLIPPED)
		flipped_tag[GCM_DISPATCH_TAG_LEN - 1] ^= 0x01;

	return kat_seal(t, expect_cipher, expect_tag) &&
		kat_open(t, kat_tag, true) &&
		kat_open(t, flipped_tag, false);
}
