/*
 * fuzz_ciphertext.c — libFuzzer target for stored values: the header parser
 * (cipher_peek_version, cipher_plaintext_len) and cipher_decrypt of both formats.
 *
 * The input is: one byte choosing the binding (tenant and context, including none and
 * empty), then the stored value.  Asserted, so that a violation is a crash:
 *  - a header never promises more plaintext than the value carries;
 *  - a failed decrypt leaves the output wiped;
 *  - a value that decrypts is exactly what encrypting its plaintext again under the
 *    same version (and, for the randomized format, the same nonce) gives: no other
 *    byte string authenticates (the seeds are such values; mutations of them are not).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cipher.h"

static CipherKey key;
static int	key_ready;

static const CipherBinding bindings[] = {
	{"acme", 4, NULL, 0},
	{"acme", 4, "", 0},
	{"acme", 4, "customer.email", 14},
	{"", 0, NULL, 0},
};

int			LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const CipherBinding *binding;
	uint32_t	version;
	size_t		plain_len;
	uint8_t    *out;
	CipherStatus st;

	if (!key_ready)
	{
		uint8_t		raw[CIPHER_KEY_LEN];

		for (int i = 0; i < CIPHER_KEY_LEN; i++)
			raw[i] = (uint8_t) (0xA0 + i);
		if (cipher_key_init(&key, raw) != CIPHER_OK)
			abort();
		key_ready = 1;
	}
	if (size < 1)
		return 0;
	binding = &bindings[data[0] % (sizeof(bindings) / sizeof(bindings[0]))];
	data++;
	size--;

	(void) cipher_peek_version(data, size, &version);
	if (cipher_plaintext_len(data, size, &plain_len) != CIPHER_OK)
		return 0;
	if (plain_len > size)
		abort();				/* a header can never promise more than it carries */
	out = malloc(plain_len + 1);
	memset(out, 0x5A, plain_len + 1);
	st = cipher_decrypt(&key, binding, data, size, out);
	if (st == CIPHER_OK)
	{
		uint8_t    *again = malloc(size);

		if (cipher_peek_version(data, size, &version) != CIPHER_OK)
			abort();
		if (data[0] == CIPHER_FORMAT_GCM_V1)
			st = cipher_encrypt(&key, version, data + 5, binding, out, plain_len, again);
		else
			st = cipher_encrypt_deterministic(&key, version, binding, out, plain_len, again);
		if (st != CIPHER_OK || memcmp(again, data, size) != 0)
			abort();			/* something other than the canonical value authenticated */
		free(again);
	}
	else
	{
		for (size_t i = 0; i < plain_len; i++)
			if (out[i] != 0)
				abort();		/* a failed decrypt released bytes */
	}
	free(out);
	return 0;
}
