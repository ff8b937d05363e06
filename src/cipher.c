/*
 * cipher.c — AES-256-GCM over OpenSSL EVP and pg_envelope's ciphertext format.
 *
 * Plain C: no PostgreSQL headers, no error reporting beyond a CipherStatus.  See
 * cipher.h for the format.  Every OpenSSL context is owned by a CipherKey, which keeps
 * the AES key schedule so that encrypting a value costs an IV reset, not a re-key.
 */
#include <string.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include "cipher.h"

/* Nonces drawn per RAND_bytes call: one syscall-free refill per this many values. */
#define NONCE_POOL_SIZE (CIPHER_NONCE_LEN * 512)

static uint8_t nonce_pool[NONCE_POOL_SIZE];
static size_t nonce_pool_used = NONCE_POOL_SIZE;
static pid_t nonce_pool_pid = 0;

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
	pid_t		pid = getpid();

	/*
	 * A child of fork() inherits the pool: discard it there, or parent and child would
	 * hand out the same nonces under the same keys.
	 */
	if (pid != nonce_pool_pid || nonce_pool_used + CIPHER_NONCE_LEN > NONCE_POOL_SIZE)
	{
		if (RAND_bytes(nonce_pool, NONCE_POOL_SIZE) != 1)
		{
			nonce_pool_used = NONCE_POOL_SIZE;
			return CIPHER_ERR_RANDOM;
		}
		nonce_pool_used = 0;
		nonce_pool_pid = pid;
	}
	memcpy(nonce, nonce_pool + nonce_pool_used, CIPHER_NONCE_LEN);
	/* A nonce is public, but the pool must never hand the same bytes out twice. */
	memset(nonce_pool + nonce_pool_used, 0, CIPHER_NONCE_LEN);
	nonce_pool_used += CIPHER_NONCE_LEN;
	return CIPHER_OK;
}

CipherStatus
cipher_key_init(CipherKey *key, const uint8_t raw[CIPHER_KEY_LEN])
{
	EVP_CIPHER_CTX *enc = EVP_CIPHER_CTX_new();
	EVP_CIPHER_CTX *dec = EVP_CIPHER_CTX_new();

	key->enc = key->dec = NULL;
	if (enc == NULL || dec == NULL)
		goto fail;

	/* Set the cipher and IV length first, then the key: the schedule is kept. */
	if (EVP_EncryptInit_ex(enc, EVP_aes_256_gcm(), NULL, NULL, NULL) != 1 ||
		EVP_CIPHER_CTX_ctrl(enc, EVP_CTRL_GCM_SET_IVLEN, CIPHER_NONCE_LEN, NULL) != 1 ||
		EVP_EncryptInit_ex(enc, NULL, NULL, raw, NULL) != 1)
		goto fail;
	if (EVP_DecryptInit_ex(dec, EVP_aes_256_gcm(), NULL, NULL, NULL) != 1 ||
		EVP_CIPHER_CTX_ctrl(dec, EVP_CTRL_GCM_SET_IVLEN, CIPHER_NONCE_LEN, NULL) != 1 ||
		EVP_DecryptInit_ex(dec, NULL, NULL, raw, NULL) != 1)
		goto fail;

	key->enc = enc;
	key->dec = dec;
	return CIPHER_OK;

fail:
	/* EVP_CIPHER_CTX_free cleanses the key schedule. */
	EVP_CIPHER_CTX_free(enc);
	EVP_CIPHER_CTX_free(dec);
	return CIPHER_ERR_INTERNAL;
}

void
cipher_key_free(CipherKey *key)
{
	if (key == NULL)
		return;
	EVP_CIPHER_CTX_free((EVP_CIPHER_CTX *) key->enc);
	EVP_CIPHER_CTX_free((EVP_CIPHER_CTX *) key->dec);
	key->enc = key->dec = NULL;
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

/* Feed AAD to a GCM context in pieces; GCM concatenates them. */
static int
aad_update(EVP_CIPHER_CTX *ctx, bool encrypting, const uint8_t *data, size_t len)
{
	int			outl;

	if (len == 0)
		return 1;
	return encrypting ? EVP_EncryptUpdate(ctx, NULL, &outl, data, (int) len)
		: EVP_DecryptUpdate(ctx, NULL, &outl, data, (int) len);
}

/* The AAD described in cipher.h: header, then tenant and context, length-prefixed. */
static int
feed_envelope_aad(EVP_CIPHER_CTX *ctx, bool encrypting, const uint8_t *header,
				  const CipherBinding *binding)
{
	uint8_t		len[4];
	uint8_t		present;

	if (!aad_update(ctx, encrypting, header, CIPHER_HEADER_LEN))
		return 0;
	put_be32(len, (uint32_t) binding->tenant_len);
	if (!aad_update(ctx, encrypting, len, 4) ||
		!aad_update(ctx, encrypting, (const uint8_t *) binding->tenant, binding->tenant_len))
		return 0;
	present = binding->context != NULL ? 1 : 0;
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
 * The body of a GCM seal once the AAD is in: encrypt, finish, take the tag.  OpenSSL
 * takes int lengths; callers keep values under 1 GB (PostgreSQL's limit), well within.
 */
static CipherStatus
gcm_seal_body(EVP_CIPHER_CTX *ctx, const uint8_t *plain, size_t plain_len,
			  uint8_t *out, uint8_t *tag)
{
	int			outl = 0;
	int			finl = 0;

	if (plain_len > 0 && EVP_EncryptUpdate(ctx, out, &outl, plain, (int) plain_len) != 1)
		return CIPHER_ERR_INTERNAL;
	if (EVP_EncryptFinal_ex(ctx, out + outl, &finl) != 1 ||
		EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, CIPHER_TAG_LEN, tag) != 1)
		return CIPHER_ERR_INTERNAL;
	return CIPHER_OK;
}

static CipherStatus
gcm_open_body(EVP_CIPHER_CTX *ctx, const uint8_t *in, size_t in_len,
			  const uint8_t *tag, uint8_t *out)
{
	int			outl = 0;
	int			finl = 0;

	if (in_len > 0 && EVP_DecryptUpdate(ctx, out, &outl, in, (int) in_len) != 1)
		goto fail;
	if (EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, CIPHER_TAG_LEN, (void *) tag) != 1)
		goto fail;
	if (EVP_DecryptFinal_ex(ctx, out + outl, &finl) != 1)
		goto fail;
	return CIPHER_OK;

fail:
	/* The tag did not verify: nothing decrypted may leave this function. */
	cipher_wipe(out, in_len);
	return CIPHER_ERR_AUTH;
}

CipherStatus
cipher_peek_version(const uint8_t *in, size_t in_len, uint32_t *version)
{
	if (in_len < CIPHER_OVERHEAD || in[0] != CIPHER_FORMAT_GCM_V1)
		return CIPHER_ERR_FORMAT;
	*version = get_be32(in + 1);
	if (*version == 0)
		return CIPHER_ERR_FORMAT;
	return CIPHER_OK;
}

CipherStatus
cipher_encrypt(const CipherKey *key, uint32_t version,
			   const uint8_t nonce[CIPHER_NONCE_LEN],
			   const CipherBinding *binding,
			   const uint8_t *plain, size_t plain_len, uint8_t *out)
{
	EVP_CIPHER_CTX *ctx = (EVP_CIPHER_CTX *) key->enc;
	uint8_t    *header = out;

	header[0] = CIPHER_FORMAT_GCM_V1;
	put_be32(header + 1, version);
	memcpy(header + 5, nonce, CIPHER_NONCE_LEN);

	/* Only the IV changes: the key schedule set in cipher_key_init() is kept. */
	if (EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, nonce) != 1 ||
		!feed_envelope_aad(ctx, true, header, binding))
		return CIPHER_ERR_INTERNAL;
	return gcm_seal_body(ctx, plain, plain_len, out + CIPHER_HEADER_LEN,
						 out + CIPHER_HEADER_LEN + plain_len);
}

CipherStatus
cipher_decrypt(const CipherKey *key, const CipherBinding *binding,
			   const uint8_t *in, size_t in_len, uint8_t *out)
{
	EVP_CIPHER_CTX *ctx = (EVP_CIPHER_CTX *) key->dec;
	uint32_t	version;
	size_t		body_len;

	if (cipher_peek_version(in, in_len, &version) != CIPHER_OK)
		return CIPHER_ERR_FORMAT;
	body_len = in_len - CIPHER_OVERHEAD;

	if (EVP_DecryptInit_ex(ctx, NULL, NULL, NULL, in + 5) != 1 ||
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
	EVP_CIPHER_CTX *ctx = (EVP_CIPHER_CTX *) key->enc;

	if (EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, nonce) != 1 ||
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
	EVP_CIPHER_CTX *ctx = (EVP_CIPHER_CTX *) key->dec;

	if (EVP_DecryptInit_ex(ctx, NULL, NULL, NULL, nonce) != 1 ||
		!aad_update(ctx, false, aad, aad_len))
		return CIPHER_ERR_INTERNAL;
	return gcm_open_body(ctx, in, in_len, tag, out);
}
