/*
 * test_cipher.c — the cipher layer without a server.
 *
 * 1. Wycheproof AES-GCM vectors (aes_gcm_test.json): every 256-bit key / 96-bit IV /
 *    128-bit tag vector must behave as published (39 valid decrypt and re-encrypt to the
 *    published ciphertext, 27 invalid are rejected).  Other parameter sets are counted
 *    as refused parameters, not silently skipped.
 * 2. The envelope format: round trip, binding to tenant, context and header, tamper and
 *    truncation detection, no plaintext released on failure, nonce freshness.
 *
 * The GCM tests run twice, once through each implementation of the GCM contexts (the
 * provider's dispatch functions, src/gcm_dispatch.c, and OpenSSL's EVP), and check that
 * the keys really use the one asked for: a dispatch path that quietly fell back to EVP
 * fails here rather than passing untested.
 *
 * 3. The dispatch layer's own guards: its process look-up refuses a provider other than
 *    OpenSSL's own and a table that fails the known-answer self-test (faults injected in
 *    children forked before the look-up), and a forked child keeps its parent's
 *    look-up; only 12-byte IVs and 16-byte tags pass; a failed decryption says whether
 *    the tag or something else failed, its output wiped; a failed set-up leaves
 *    OpenSSL's error queue empty.
 */

#include <json-c/json.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cipher.h"
#include "gcm_dispatch.h"
#include "unit.h"
#include "format_vectors.h"

#include <openssl/err.h>
#include <openssl/evp.h>

static const char *
gcm_path_name(CipherGcmPath path)
{
	return path == CIPHER_GCM_DISPATCH ? "provider dispatch" : "EVP";
}

static bool
all_zero(const uint8_t *p, size_t len)
{
	for (size_t i = 0; i < len; i++)
		if (p[i] != 0)
			return false;
	return true;
}

/* Both GCM contexts of `key` use `path` (the one the tests asked for). */
static bool
key_uses_path(const CipherKey *key, CipherGcmPath path)
{
	return cipher_key_gcm_path(key, CIPHER_USE_ENCRYPT) == path &&
		cipher_key_gcm_path(key, CIPHER_USE_DECRYPT) == path;
}

static void
test_wycheproof(CipherGcmPath gcm_path)
{
	char		path[1024];
	json_object *root;
	json_object *groups;
	int			valid_ok = 0,
				invalid_ok = 0,
				refused = 0,
				wrong_path = 0,
				total_valid = 0,
				total_invalid = 0;

	snprintf(path, sizeof(path), "%s/wycheproof/aes_gcm_test.json", UNIT_VECTORS_DIR);
	root = json_object_from_file(path);
	CHECK(root != NULL, "Wycheproof vectors not found at %s", path);
	if (root == NULL)
		return;
	groups = json_object_object_get(root, "testGroups");
	for (size_t g = 0; g < json_object_array_length(groups); g++)
	{
		json_object *group = json_object_array_get_idx(groups, g);
		int			key_size = json_object_get_int(json_object_object_get(group, "keySize"));
		int			iv_size = json_object_get_int(json_object_object_get(group, "ivSize"));
		int			tag_size = json_object_get_int(json_object_object_get(group, "tagSize"));
		json_object *tests = json_object_object_get(group, "tests");

		for (size_t t = 0; t < json_object_array_length(tests); t++)
		{
			json_object *tc = json_object_array_get_idx(tests, t);
			const char *result = json_object_get_string(json_object_object_get(tc, "result"));
			int			tc_id = json_object_get_int(json_object_object_get(tc, "tcId"));
			bool		valid = strcmp(result, "valid") == 0;
			uint8_t    *key = NULL, *iv = NULL, *aad = NULL, *msg = NULL, *ct = NULL, *tag = NULL;
			long		key_len, iv_len, aad_len, msg_len, ct_len, tag_len;
			CipherKey	ck;
			uint8_t    *out;
			CipherStatus st;

			if (key_size != 256 || iv_size != 96 || tag_size != 128)
			{
				refused++;
				continue;
			}
			if (valid)
				total_valid++;
			else
				total_invalid++;

			key_len = unit_unhex(json_object_get_string(json_object_object_get(tc, "key")), &key);
			iv_len = unit_unhex(json_object_get_string(json_object_object_get(tc, "iv")), &iv);
			aad_len = unit_unhex(json_object_get_string(json_object_object_get(tc, "aad")), &aad);
			msg_len = unit_unhex(json_object_get_string(json_object_object_get(tc, "msg")), &msg);
			ct_len = unit_unhex(json_object_get_string(json_object_object_get(tc, "ct")), &ct);
			tag_len = unit_unhex(json_object_get_string(json_object_object_get(tc, "tag")), &tag);
			CHECK(key_len == 32 && iv_len == 12 && tag_len == 16 && aad_len >= 0 &&
				  msg_len >= 0 && ct_len == msg_len, "tcId %d: malformed vector", tc_id);

			CHECK(cipher_key_init(&ck, key) == CIPHER_OK, "tcId %d: key init", tc_id);
			if (!key_uses_path(&ck, gcm_path))
				wrong_path++;
			out = malloc(ct_len + 1);
			st = cipher_gcm_open(&ck, iv, aad, aad_len, ct, ct_len, tag, out);
			if (valid)
			{
				uint8_t    *ct2 = malloc(msg_len + 1);
				uint8_t		tag2[CIPHER_TAG_LEN];

				if (st == CIPHER_OK && memcmp(out, msg, msg_len) == 0 &&
					cipher_gcm_seal(&ck, iv, aad, aad_len, msg, msg_len, ct2, tag2) == CIPHER_OK &&
					memcmp(ct2, ct, ct_len) == 0 && memcmp(tag2, tag, 16) == 0)
					valid_ok++;
				else
					CHECK(false, "tcId %d: valid vector failed", tc_id);
				free(ct2);
			}
			else
			{
				bool		wiped = true;

				for (long i = 0; i < ct_len; i++)
					wiped = wiped && out[i] == 0;
				if (st == CIPHER_ERR_AUTH && wiped)
					invalid_ok++;
				else
					CHECK(false, "tcId %d: invalid vector accepted or output not wiped", tc_id);
			}
			cipher_key_free(&ck);
			free(out);
			free(key);
			free(iv);
			free(aad);
			free(msg);
			free(ct);
			free(tag);
		}
	}
	json_object_put(root);
	printf("wycheproof AES-256-GCM (%s): %d/%d valid, %d/%d invalid rejected, %d vectors of other parameters refused\n",
		   gcm_path_name(gcm_path), valid_ok, total_valid, invalid_ok, total_invalid, refused);
	CHECK(wrong_path == 0, "%d keys did not use the %s implementation asked for",
		  wrong_path, gcm_path_name(gcm_path));
	CHECK(total_valid == 39 && valid_ok == 39, "expected 39/39 valid, got %d/%d", valid_ok, total_valid);
	CHECK(total_invalid == 27 && invalid_ok == 27, "expected 27/27 invalid, got %d/%d", invalid_ok, total_invalid);
}

static CipherBinding
binding(const char *tenant, const char *context)
{
	CipherBinding b = {tenant, strlen(tenant), context, context ? strlen(context) : 0};

	return b;
}

static void
test_envelope_format(void)
{
	uint8_t		raw[CIPHER_KEY_LEN];
	uint8_t		raw2[CIPHER_KEY_LEN];
	CipherKey	key, key2;
	const char *msg = "the quick brown fox";
	size_t		len = strlen(msg);
	uint8_t		ct[64], ct2[64], pt[64], nonce[CIPHER_NONCE_LEN];
	CipherBinding acme = binding("acme", NULL);
	CipherBinding acme_ctx = binding("acme", "users.email");
	CipherBinding acme_empty = binding("acme", "");
	CipherBinding globex = binding("globex", NULL);
	uint32_t	version;

	CHECK(CIPHER_OVERHEAD <= 40, "overhead %d exceeds 40 bytes", CIPHER_OVERHEAD);
	CHECK(cipher_random_bytes(raw, sizeof(raw)) == CIPHER_OK, "random");
	CHECK(cipher_random_bytes(raw2, sizeof(raw2)) == CIPHER_OK, "random");
	CHECK(cipher_key_init(&key, raw) == CIPHER_OK, "key init");
	CHECK(cipher_key_init(&key2, raw2) == CIPHER_OK, "key init");

	CHECK(cipher_next_nonce(nonce) == CIPHER_OK, "nonce");
	CHECK(cipher_encrypt(&key, 7, nonce, &acme, (const uint8_t *) msg, len, ct) == CIPHER_OK, "encrypt");
	CHECK(ct[0] == CIPHER_FORMAT_GCM_V1, "format byte");
	CHECK(cipher_peek_version(ct, len + CIPHER_OVERHEAD, &version) == CIPHER_OK && version == 7,
		  "version in header");
	CHECK(cipher_decrypt(&key, &acme, ct, len + CIPHER_OVERHEAD, pt) == CIPHER_OK &&
		  memcmp(pt, msg, len) == 0, "round trip");
	CHECK(memmem(ct, len + CIPHER_OVERHEAD, "quick", 5) == NULL, "plaintext visible in ciphertext");

	/* Bound to tenant, context, presence of a context, and key. */
	CHECK(cipher_decrypt(&key, &globex, ct, len + CIPHER_OVERHEAD, pt) == CIPHER_ERR_AUTH, "other tenant");
	CHECK(cipher_decrypt(&key, &acme_ctx, ct, len + CIPHER_OVERHEAD, pt) == CIPHER_ERR_AUTH, "added context");
	CHECK(cipher_decrypt(&key, &acme_empty, ct, len + CIPHER_OVERHEAD, pt) == CIPHER_ERR_AUTH,
		  "empty context must differ from no context");
	CHECK(cipher_decrypt(&key2, &acme, ct, len + CIPHER_OVERHEAD, pt) == CIPHER_ERR_AUTH, "other key");

	/* Length prefixes: ("ab", "c") and ("a", "bc") must not collide. */
	{
		CipherBinding ab_c = binding("ab", "c");
		CipherBinding a_bc = binding("a", "bc");

		CHECK(cipher_encrypt(&key, 1, nonce, &ab_c, (const uint8_t *) msg, len, ct2) == CIPHER_OK, "encrypt");
		CHECK(cipher_decrypt(&key, &a_bc, ct2, len + CIPHER_OVERHEAD, pt) == CIPHER_ERR_AUTH,
			  "tenant/context boundary is ambiguous");
	}

	/* Every single-bit flip anywhere is detected, and releases nothing. */
	{
		int			undetected = 0;

		for (size_t i = 0; i < len + CIPHER_OVERHEAD; i++)
			for (int bit = 0; bit < 8; bit++)
			{
				CipherStatus st;

				memcpy(ct2, ct, len + CIPHER_OVERHEAD);
				ct2[i] ^= (uint8_t) (1 << bit);
				memset(pt, 0xAA, sizeof(pt));
				st = cipher_decrypt(&key, &acme, ct2, len + CIPHER_OVERHEAD, pt);
				if (st == CIPHER_OK)
					undetected++;
				else if (st == CIPHER_ERR_AUTH)
				{
					for (size_t j = 0; j < len; j++)
						if (pt[j] != 0)
						{
							undetected++;
							break;
						}
				}
			}
		CHECK(undetected == 0, "%d bit flips not detected or leaked plaintext", undetected);
	}

	/* Truncation and an unknown format are format errors, not crashes. */
	for (size_t cut = 0; cut < CIPHER_OVERHEAD; cut++)
		CHECK(cipher_decrypt(&key, &acme, ct, cut, pt) == CIPHER_ERR_FORMAT, "truncated to %zu", cut);
	CHECK(cipher_decrypt(&key, &acme, ct, len + CIPHER_OVERHEAD - 1, pt) == CIPHER_ERR_AUTH, "short by one");
	memcpy(ct2, ct, len + CIPHER_OVERHEAD);
	ct2[0] = 0x7f;
	CHECK(cipher_decrypt(&key, &acme, ct2, len + CIPHER_OVERHEAD, pt) == CIPHER_ERR_FORMAT, "unknown format");

	/* Empty plaintext works. */
	CHECK(cipher_encrypt(&key, 1, nonce, &acme, (const uint8_t *) "", 0, ct2) == CIPHER_OK &&
		  cipher_decrypt(&key, &acme, ct2, CIPHER_OVERHEAD, pt) == CIPHER_OK, "empty plaintext");

	cipher_key_free(&key);
	cipher_key_free(&key2);
}

static int
compare_nonces(const void *a, const void *b)
{
	return memcmp(a, b, CIPHER_NONCE_LEN);
}

/* Nonces never repeat, also across a fork (the child must not reuse the parent's pool). */
static void
test_nonces(void)
{
	enum {N = 20000};
	static uint8_t seen[N][CIPHER_NONCE_LEN];
	int			dup = 0;
	int			pipefd[2];
	uint8_t		parent_next[CIPHER_NONCE_LEN], child_next[CIPHER_NONCE_LEN];
	pid_t		pid;

	for (int i = 0; i < N; i++)
		CHECK(cipher_next_nonce(seen[i]) == CIPHER_OK, "nonce %d", i);
	qsort(seen, N, CIPHER_NONCE_LEN, compare_nonces);
	for (int i = 1; i < N; i++)
		if (memcmp(seen[i - 1], seen[i], CIPHER_NONCE_LEN) == 0)
			dup++;
	CHECK(dup == 0, "%d repeated nonces", dup);

	CHECK(pipe(pipefd) == 0, "pipe");
	pid = fork();
	if (pid == 0)
	{
		cipher_next_nonce(child_next);
		if (write(pipefd[1], child_next, sizeof(child_next)) != sizeof(child_next))
			_exit(1);
		_exit(0);
	}
	cipher_next_nonce(parent_next);
	CHECK(read(pipefd[0], child_next, sizeof(child_next)) == sizeof(child_next), "read child nonce");
	waitpid(pid, NULL, 0);
	CHECK(memcmp(parent_next, child_next, CIPHER_NONCE_LEN) != 0, "child reused parent's nonce pool");
	close(pipefd[0]);
	close(pipefd[1]);
}

/*
 * Wycheproof AES-SIV (RFC 5297, 512-bit keys, one AAD component).  OpenSSL 3.0 cannot
 * process empty plaintexts with AES-SIV; those vectors are counted apart (the envelope
 * format never gives SIV an empty input), every other one must behave as published.
 */
static void
test_wycheproof_siv(void)
{
	char		path[1024];
	json_object *root;
	json_object *groups;
	int			valid_ok = 0, invalid_ok = 0, empty = 0, total_valid = 0, total_invalid = 0;

	snprintf(path, sizeof(path), "%s/wycheproof/aes_siv_cmac_test.json", UNIT_VECTORS_DIR);
	root = json_object_from_file(path);
	CHECK(root != NULL, "Wycheproof AES-SIV vectors not found at %s", path);
	if (root == NULL)
		return;
	groups = json_object_object_get(root, "testGroups");
	for (size_t g = 0; g < json_object_array_length(groups); g++)
	{
		json_object *group = json_object_array_get_idx(groups, g);
		json_object *tests = json_object_object_get(group, "tests");

		if (json_object_get_int(json_object_object_get(group, "keySize")) != 512)
			continue;
		for (size_t t = 0; t < json_object_array_length(tests); t++)
		{
			json_object *tc = json_object_array_get_idx(tests, t);
			bool		valid = strcmp(json_object_get_string(json_object_object_get(tc, "result")), "valid") == 0;
			int			tc_id = json_object_get_int(json_object_object_get(tc, "tcId"));
			uint8_t    *key = NULL, *aad = NULL, *msg = NULL, *ct = NULL, *out, *out2;
			long		key_len, aad_len, msg_len, ct_len;
			CipherStatus st;

			key_len = unit_unhex(json_object_get_string(json_object_object_get(tc, "key")), &key);
			aad_len = unit_unhex(json_object_get_string(json_object_object_get(tc, "aad")), &aad);
			msg_len = unit_unhex(json_object_get_string(json_object_object_get(tc, "msg")), &msg);
			ct_len = unit_unhex(json_object_get_string(json_object_object_get(tc, "ct")), &ct);
			CHECK(key_len == 64 && aad_len >= 0 && msg_len >= 0 && ct_len >= 0, "tcId %d: malformed", tc_id);
			out = malloc(ct_len + 16);
			out2 = malloc(msg_len + 16);
			if (valid)
			{
				total_valid++;
				st = cipher_siv_open(key, aad, aad_len, ct, ct_len, out);
				if (msg_len == 0 && st != CIPHER_OK)
					empty++;
				else if (st == CIPHER_OK && memcmp(out, msg, msg_len) == 0 &&
						 cipher_siv_seal(key, aad, aad_len, msg, msg_len, out2) == CIPHER_OK &&
						 memcmp(out2, ct, ct_len) == 0)
					valid_ok++;
				else
					CHECK(false, "AES-SIV tcId %d: valid vector failed", tc_id);
			}
			else
			{
				total_invalid++;
				if (cipher_siv_open(key, aad, aad_len, ct, ct_len, out) != CIPHER_OK)
					invalid_ok++;
				else
					CHECK(false, "AES-SIV tcId %d: invalid vector accepted", tc_id);
			}
			free(out);
			free(out2);
			free(key);
			free(aad);
			free(msg);
			free(ct);
		}
	}
	json_object_put(root);
	printf("wycheproof AES-256-SIV: %d/%d valid (%d empty-plaintext vectors refused by this OpenSSL), %d/%d invalid rejected\n",
		   valid_ok, total_valid, empty, invalid_ok, total_invalid);
	CHECK(total_valid == 39 && valid_ok + empty == 39 && empty <= 6,
		  "expected 39 valid (at most 6 empty refused), got %d + %d of %d", valid_ok, empty, total_valid);
	CHECK(total_invalid == 108 && invalid_ok == 108, "expected 108/108 invalid, got %d/%d", invalid_ok, total_invalid);
}

/*
 * AES-SIV is S2V and CTR over contexts keyed once and re-initialised per value
 * (cipher.c): every length around the block boundaries, and past the stack buffer,
 * must give what OpenSSL's own AES-SIV gives, and a key used for many values in turn
 * what a fresh key gives for each.
 */
static void
test_siv_reuse(void)
{
	uint8_t		sivkey[CIPHER_SIV_KEY_LEN], raw[CIPHER_KEY_LEN];
	uint8_t		aad[40], msg[600], ours[600 + CIPHER_SIV_TAG_LEN], ref[600], tag[16];
	uint8_t		a[600 + CIPHER_SIV_OVERHEAD], b[600 + CIPHER_SIV_OVERHEAD], pt[600];
	EVP_CIPHER *siv = EVP_CIPHER_fetch(NULL, "AES-256-SIV", NULL);
	CipherKey	reused;
	CipherBinding acme = binding("acme", "t.c");
	int			mismatches = 0, reuse_mismatches = 0, roundtrip_failures = 0;

	CHECK(siv != NULL, "OpenSSL has AES-256-SIV");
	cipher_random_bytes(sivkey, sizeof(sivkey));
	cipher_random_bytes(aad, sizeof(aad));
	cipher_random_bytes(raw, sizeof(raw));
	CHECK(cipher_key_init(&reused, raw) == CIPHER_OK, "key init");
	for (size_t len = 1; len <= 600 && siv != NULL; len += (len < 40 ? 1 : 37))
	{
		EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
		int			outl = 0, finl = 0;
		CipherKey	fresh;

		cipher_random_bytes(msg, len);
		/* Against OpenSSL's AES-SIV. */
		if (cipher_siv_seal(sivkey, aad, sizeof(aad), msg, len, ours) != CIPHER_OK ||
			EVP_EncryptInit_ex(ctx, siv, NULL, sivkey, NULL) != 1 ||
			EVP_EncryptUpdate(ctx, NULL, &outl, aad, (int) sizeof(aad)) != 1 ||
			EVP_EncryptUpdate(ctx, ref, &outl, msg, (int) len) != 1 ||
			EVP_EncryptFinal_ex(ctx, ref + outl, &finl) != 1 ||
			EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, 16, tag) != 1 ||
			memcmp(ours, tag, 16) != 0 || memcmp(ours + 16, ref, len) != 0)
			mismatches++;
		EVP_CIPHER_CTX_free(ctx);
		/* One key for many values against a fresh key per value. */
		if (cipher_key_init(&fresh, raw) != CIPHER_OK ||
			cipher_encrypt_deterministic(&reused, 2, &acme, msg, len, a) != CIPHER_OK ||
			cipher_encrypt_deterministic(&fresh, 2, &acme, msg, len, b) != CIPHER_OK ||
			memcmp(a, b, len + CIPHER_SIV_OVERHEAD) != 0)
			reuse_mismatches++;
		if (cipher_decrypt(&reused, &acme, a, len + CIPHER_SIV_OVERHEAD, pt) != CIPHER_OK ||
			memcmp(pt, msg, len) != 0)
			roundtrip_failures++;
		cipher_key_free(&fresh);
	}
	CHECK(mismatches == 0, "%d lengths differ from OpenSSL's AES-SIV", mismatches);
	CHECK(reuse_mismatches == 0, "%d values differ between a reused and a fresh key", reuse_mismatches);
	CHECK(roundtrip_failures == 0, "%d values did not decrypt with the reused key", roundtrip_failures);
	cipher_key_free(&reused);
	EVP_CIPHER_free(siv);
}

/* Deterministic values and blind indexes: equal in, equal out; bound like the rest. */
static void
test_deterministic(void)
{
	uint8_t		raw[CIPHER_KEY_LEN], raw2[CIPHER_KEY_LEN];
	CipherKey	key, key2;
	const char *msg = "alice@example.com";
	size_t		len = strlen(msg);
	uint8_t		a[64], b[64], pt[64], idx1[CIPHER_INDEX_LEN], idx2[CIPHER_INDEX_LEN];
	CipherBinding acme = binding("acme", "users.email");
	CipherBinding acme_other = binding("acme", "users.phone");
	CipherBinding globex = binding("globex", "users.email");
	uint32_t	version;
	size_t		plen;
	int			undetected = 0;

	cipher_random_bytes(raw, sizeof(raw));
	cipher_random_bytes(raw2, sizeof(raw2));
	CHECK(cipher_key_init(&key, raw) == CIPHER_OK && cipher_key_init(&key2, raw2) == CIPHER_OK, "key init");

	CHECK(cipher_encrypt_deterministic(&key, 3, &acme, (const uint8_t *) msg, len, a) == CIPHER_OK, "det encrypt");
	CHECK(cipher_encrypt_deterministic(&key, 3, &acme, (const uint8_t *) msg, len, b) == CIPHER_OK, "det encrypt");
	CHECK(memcmp(a, b, len + CIPHER_SIV_OVERHEAD) == 0, "deterministic: equal inputs give equal bytes");
	CHECK(a[0] == CIPHER_FORMAT_SIV_V1 && cipher_peek_version(a, len + CIPHER_SIV_OVERHEAD, &version) == CIPHER_OK &&
		  version == 3, "SIV header");
	CHECK(cipher_plaintext_len(a, len + CIPHER_SIV_OVERHEAD, &plen) == CIPHER_OK && plen == len, "plaintext length");
	CHECK(cipher_decrypt(&key, &acme, a, len + CIPHER_SIV_OVERHEAD, pt) == CIPHER_OK && memcmp(pt, msg, len) == 0,
		  "deterministic round trip through cipher_decrypt");
	CHECK(cipher_encrypt_deterministic(&key, 3, &acme_other, (const uint8_t *) msg, len, b) == CIPHER_OK &&
		  memcmp(a, b, len + CIPHER_SIV_OVERHEAD) != 0, "another context gives other bytes");
	CHECK(cipher_encrypt_deterministic(&key, 3, &globex, (const uint8_t *) msg, len, b) == CIPHER_OK &&
		  memcmp(a, b, len + CIPHER_SIV_OVERHEAD) != 0, "another tenant gives other bytes");
	CHECK(cipher_decrypt(&key, &globex, a, len + CIPHER_SIV_OVERHEAD, pt) == CIPHER_ERR_AUTH, "other tenant rejected");
	CHECK(cipher_decrypt(&key, &acme_other, a, len + CIPHER_SIV_OVERHEAD, pt) == CIPHER_ERR_AUTH, "other context rejected");
	CHECK(cipher_decrypt(&key2, &acme, a, len + CIPHER_SIV_OVERHEAD, pt) == CIPHER_ERR_AUTH, "other key rejected");
	for (size_t i = 0; i < len + CIPHER_SIV_OVERHEAD; i++)
	{
		memcpy(b, a, len + CIPHER_SIV_OVERHEAD);
		b[i] ^= 0x01;
		if (cipher_decrypt(&key, &acme, b, len + CIPHER_SIV_OVERHEAD, pt) == CIPHER_OK)
			undetected++;
	}
	CHECK(undetected == 0, "%d tampered deterministic bytes accepted", undetected);
	CHECK(cipher_encrypt_deterministic(&key, 1, &acme, (const uint8_t *) "", 0, b) == CIPHER_OK &&
		  cipher_decrypt(&key, &acme, b, CIPHER_SIV_OVERHEAD, pt) == CIPHER_OK, "empty plaintext, deterministic");

	CHECK(cipher_blind_index(&key, &acme, (const uint8_t *) msg, len, idx1) == CIPHER_OK &&
		  cipher_blind_index(&key, &acme, (const uint8_t *) msg, len, idx2) == CIPHER_OK &&
		  memcmp(idx1, idx2, CIPHER_INDEX_LEN) == 0, "blind index is stable");
	CHECK(cipher_blind_index(&key, &globex, (const uint8_t *) msg, len, idx2) == CIPHER_OK &&
		  memcmp(idx1, idx2, CIPHER_INDEX_LEN) != 0, "blind index differs per tenant");
	CHECK(cipher_blind_index(&key2, &acme, (const uint8_t *) msg, len, idx2) == CIPHER_OK &&
		  memcmp(idx1, idx2, CIPHER_INDEX_LEN) != 0, "blind index differs per key");
	CHECK(cipher_blind_index(&key, &acme, (const uint8_t *) "alice@example.con", len, idx2) == CIPHER_OK &&
		  memcmp(idx1, idx2, CIPHER_INDEX_LEN) != 0, "blind index differs per value");
	cipher_key_free(&key);
	cipher_key_free(&key2);

	/*
	 * Known answer, computed independently (Python's cryptography package): HKDF-SHA256
	 * of DEK 00..1f with info "pg_envelope blind index v1", then HMAC-SHA256 over
	 * be32(4) || "acme" || "alice".  Stored indexes depend on exactly this.
	 */
	{
		uint8_t		dek[CIPHER_KEY_LEN];
		uint8_t    *expected = NULL;
		CipherBinding acme_plain = binding("acme", NULL);

		for (int i = 0; i < CIPHER_KEY_LEN; i++)
			dek[i] = (uint8_t) i;
		unit_unhex("5611fad642cfc593c55982e5fe0c6592605b1e2963378e3bb559e560ef6091a7", &expected);
		CHECK(cipher_key_init(&key, dek) == CIPHER_OK &&
			  cipher_blind_index(&key, &acme_plain, (const uint8_t *) "alice", 5, idx1) == CIPHER_OK &&
			  memcmp(idx1, expected, CIPHER_INDEX_LEN) == 0, "blind index known answer");

		/*
		 * Versioned layout: version 1 is byte for byte the index above (stored indexes
		 * stay valid); version 2 and later are be32(version) || the same HMAC.
		 */
		{
			uint8_t		vidx[CIPHER_INDEX_VERSIONED_MAX_LEN];
			size_t		vlen = 0;
			uint32_t	v = 0;

			CHECK(cipher_blind_index_versioned(&key, 1, &acme_plain, (const uint8_t *) "alice", 5,
											   vidx, &vlen) == CIPHER_OK &&
				  vlen == CIPHER_INDEX_LEN && memcmp(vidx, expected, CIPHER_INDEX_LEN) == 0,
				  "versioned blind index, version 1, is the unversioned one");
			CHECK(cipher_blind_index_version(vidx, vlen, &v) == CIPHER_OK && v == 1,
				  "a 32-byte index is version 1");
			CHECK(cipher_blind_index_versioned(&key, 0x01020304, &acme_plain, (const uint8_t *) "alice", 5,
											   vidx, &vlen) == CIPHER_OK &&
				  vlen == CIPHER_INDEX_VERSIONED_MAX_LEN &&
				  vidx[0] == 1 && vidx[1] == 2 && vidx[2] == 3 && vidx[3] == 4 &&
				  memcmp(vidx + 4, expected, CIPHER_INDEX_LEN) == 0,
				  "versioned blind index, version >= 2: be32 version then the HMAC");
			CHECK(cipher_blind_index_version(vidx, vlen, &v) == CIPHER_OK && v == 0x01020304,
				  "the version of a 36-byte index");
			CHECK(cipher_blind_index_versioned(&key, 0, &acme_plain, (const uint8_t *) "alice", 5,
											   vidx, &vlen) == CIPHER_ERR_FORMAT,
				  "version 0 is refused");
			vidx[0] = vidx[1] = vidx[2] = 0;
			vidx[3] = 1;
			CHECK(cipher_blind_index_version(vidx, CIPHER_INDEX_VERSIONED_MAX_LEN, &v) == CIPHER_ERR_FORMAT,
				  "a 36-byte index may not claim version 1");
			CHECK(cipher_blind_index_version(vidx, 20, &v) == CIPHER_ERR_FORMAT,
				  "an index of another length is refused");
		}
		cipher_key_free(&key);
		free(expected);
	}
}

/* The formula of format_vectors.py's long_context(): printable, not periodic. */
static char *
long_context(size_t n)
{
	char	   *c = malloc(n + 1);

	for (size_t i = 0; i < n; i++)
		c[i] = (char) (0x61 + (i * 7 + i / 26) % 26);
	c[n] = '\0';
	return c;
}

/*
 * Frozen known answers of both stored formats (format_vectors.h, computed by
 * format_vectors.py with Python's cryptography package): every value ever stored must
 * decrypt byte-for-byte, deterministic values must stay equal, and the binding of
 * tenant and context must hold on both AAD paths (contexts up to a mebibyte, tenants
 * up to the longest allowed).
 */
static void
test_format_known_answers(void)
{
	uint8_t		dek[CIPHER_KEY_LEN];
	CipherKey	key;
	int			nvec = (int) (sizeof(format_vectors) / sizeof(format_vectors[0]));

	for (int i = 0; i < CIPHER_KEY_LEN; i++)
		dek[i] = (uint8_t) i;
	CHECK(cipher_key_init(&key, dek) == CIPHER_OK, "key init");

	for (int v = 0; v < nvec; v++)
	{
		const FormatVector *fv = &format_vectors[v];
		char	   *ctx = NULL;
		CipherBinding b = {fv->tenant, fv->tenant_len, NULL, 0};
		CipherBinding other;
		uint8_t		nonce[CIPHER_NONCE_LEN] = {0};
		size_t		max_len = fv->gcm_len > fv->siv_len ? fv->gcm_len : fv->siv_len;
		uint8_t    *out = malloc(max_len);
		uint8_t    *pt = malloc(max_len);
		uint8_t    *tampered_ctx;
		uint32_t	version;

		if (fv->context_len >= 0)
		{
			ctx = fv->context ? strdup(fv->context) : long_context((size_t) fv->context_len);
			b.context = ctx;
			b.context_len = (size_t) fv->context_len;
		}
		nonce[CIPHER_NONCE_LEN - 1] = (uint8_t) v;

		/* 0x01: the same bytes from the same nonce, and the stored bytes decrypt. */
		CHECK(cipher_encrypt(&key, 7, nonce, &b, (const uint8_t *) fv->plain, fv->plain_len, out) == CIPHER_OK &&
			  memcmp(out, fv->gcm, fv->gcm_len) == 0,
			  "vector %d: 0x01 value differs from the frozen one (context %ld bytes)", v, fv->context_len);
		CHECK(cipher_peek_version((const uint8_t *) fv->gcm, fv->gcm_len, &version) == CIPHER_OK && version == 7,
			  "vector %d: 0x01 version", v);
		memset(pt, 0, max_len);
		CHECK(cipher_decrypt(&key, &b, (const uint8_t *) fv->gcm, fv->gcm_len, pt) == CIPHER_OK &&
			  memcmp(pt, fv->plain, fv->plain_len) == 0,
			  "vector %d: the frozen 0x01 value does not decrypt (context %ld bytes)", v, fv->context_len);

		/* 0x02: deterministic values stay equal, and the stored ones decrypt. */
		CHECK(cipher_encrypt_deterministic(&key, 1, &b, (const uint8_t *) fv->plain, fv->plain_len, out) == CIPHER_OK &&
			  memcmp(out, fv->siv, fv->siv_len) == 0,
			  "vector %d: 0x02 value differs from the frozen one (context %ld bytes)", v, fv->context_len);
		memset(pt, 0, max_len);
		CHECK(cipher_decrypt(&key, &b, (const uint8_t *) fv->siv, fv->siv_len, pt) == CIPHER_OK &&
			  memcmp(pt, fv->plain, fv->plain_len) == 0,
			  "vector %d: the frozen 0x02 value does not decrypt (context %ld bytes)", v, fv->context_len);

		/* Each byte of the binding counts: the last context byte, the first, the tenant. */
		if (fv->context_len > 0)
		{
			size_t		positions[2] = {0, (size_t) fv->context_len - 1};

			tampered_ctx = malloc((size_t) fv->context_len);
			for (int p = 0; p < 2; p++)
			{
				memcpy(tampered_ctx, ctx, (size_t) fv->context_len);
				tampered_ctx[positions[p]] ^= 0x01;
				other = b;
				other.context = (const char *) tampered_ctx;
				CHECK(cipher_decrypt(&key, &other, (const uint8_t *) fv->gcm, fv->gcm_len, pt) == CIPHER_ERR_AUTH,
					  "vector %d: 0x01 value accepted under a context changed at byte %zu of %ld",
					  v, positions[p], fv->context_len);
				CHECK(cipher_decrypt(&key, &other, (const uint8_t *) fv->siv, fv->siv_len, pt) == CIPHER_ERR_AUTH,
					  "vector %d: 0x02 value accepted under a context changed at byte %zu of %ld",
					  v, positions[p], fv->context_len);
			}
			free(tampered_ctx);
		}
		other = b;
		other.tenant = "acmf";
		other.tenant_len = 4;
		if (fv->tenant_len == 4 && memcmp(fv->tenant, "acmf", 4) != 0)
		{
			CHECK(cipher_decrypt(&key, &other, (const uint8_t *) fv->gcm, fv->gcm_len, pt) == CIPHER_ERR_AUTH,
				  "vector %d: 0x01 value accepted for another tenant", v);
			CHECK(cipher_decrypt(&key, &other, (const uint8_t *) fv->siv, fv->siv_len, pt) == CIPHER_ERR_AUTH,
				  "vector %d: 0x02 value accepted for another tenant", v);
		}
		free(ctx);
		free(out);
		free(pt);
	}
	cipher_key_free(&key);
}

/*
 * Contexts set up per use: a key made for decrypting GCM values has no other context
 * and refuses the other uses rather than crash; a context taken over from a discarded
 * key (re-keyed in place) works for the new key only, and leaves the old key without it.
 */
static void
test_contexts_per_use(void)
{
	uint8_t		raw[CIPHER_KEY_LEN], raw2[CIPHER_KEY_LEN];
	CipherKey	full, lazy, spare, reused;
	const char *msg = "per-use contexts";
	size_t		len = strlen(msg);
	uint8_t		ct[64], ct2[64], pt[64], nonce[CIPHER_NONCE_LEN], index[CIPHER_INDEX_LEN];
	uint8_t		det[64], index2[CIPHER_INDEX_LEN];
	CipherBinding acme = binding("acme", NULL);

	CHECK(cipher_random_bytes(raw, sizeof(raw)) == CIPHER_OK &&
		  cipher_random_bytes(raw2, sizeof(raw2)) == CIPHER_OK, "random");
	CHECK(cipher_key_init(&full, raw) == CIPHER_OK, "key init");
	CHECK(cipher_next_nonce(nonce) == CIPHER_OK, "nonce");
	CHECK(cipher_encrypt(&full, 1, nonce, &acme, (const uint8_t *) msg, len, ct) == CIPHER_OK, "encrypt");

	memset(&lazy, 0, sizeof(lazy));
	CHECK(cipher_key_add(&lazy, CIPHER_USE_DECRYPT, raw, NULL) == CIPHER_OK, "decrypt context");
	CHECK(cipher_key_ready(&lazy, CIPHER_USE_DECRYPT) && !cipher_key_ready(&lazy, CIPHER_USE_ENCRYPT) &&
		  !cipher_key_ready(&lazy, CIPHER_USE_DETERMINISTIC) && !cipher_key_ready(&lazy, CIPHER_USE_INDEX),
		  "only the decrypt context is set up");
	CHECK(cipher_decrypt(&lazy, &acme, ct, len + CIPHER_OVERHEAD, pt) == CIPHER_OK &&
		  memcmp(pt, msg, len) == 0, "decrypt with the decrypt context alone");
	CHECK(cipher_encrypt(&lazy, 1, nonce, &acme, (const uint8_t *) msg, len, ct2) == CIPHER_ERR_INTERNAL,
		  "encrypt without its context is refused");
	CHECK(cipher_blind_index(&lazy, &acme, (const uint8_t *) msg, len, index) == CIPHER_ERR_INTERNAL,
		  "blind index without its context is refused");
	CHECK(cipher_encrypt_deterministic(&lazy, 1, &acme, (const uint8_t *) msg, len, det) == CIPHER_ERR_INTERNAL,
		  "deterministic encryption without its context is refused");
	CHECK(cipher_key_add(&lazy, CIPHER_USE_INDEX, raw, NULL) == CIPHER_OK &&
		  cipher_blind_index(&lazy, &acme, (const uint8_t *) msg, len, index) == CIPHER_OK &&
		  cipher_blind_index(&full, &acme, (const uint8_t *) msg, len, index2) == CIPHER_OK &&
		  memcmp(index, index2, sizeof(index)) == 0, "an index context added later matches the full key's");

	/* Take over the decrypt context of `lazy` for another key. */
	spare = lazy;
	memset(&lazy, 0, sizeof(lazy));
	memset(&reused, 0, sizeof(reused));
	CHECK(cipher_key_add(&reused, CIPHER_USE_DECRYPT, raw2, &spare) == CIPHER_OK, "re-keyed context");
	CHECK(spare.dec == NULL && spare.mac != NULL, "the spare gave up its decrypt context only");
	CHECK(cipher_key_gcm_path(&reused, CIPHER_USE_DECRYPT) == cipher_key_gcm_path(&full, CIPHER_USE_DECRYPT),
		  "the re-keyed context keeps its implementation");
	CHECK(cipher_decrypt(&reused, &acme, ct, len + CIPHER_OVERHEAD, pt) == CIPHER_ERR_AUTH,
		  "the re-keyed context no longer opens the old key's values");
	{
		CipherKey	full2;

		CHECK(cipher_key_init(&full2, raw2) == CIPHER_OK, "key init");
		CHECK(cipher_encrypt(&full2, 1, nonce, &acme, (const uint8_t *) msg, len, ct2) == CIPHER_OK, "encrypt");
		CHECK(cipher_decrypt(&reused, &acme, ct2, len + CIPHER_OVERHEAD, pt) == CIPHER_OK &&
			  memcmp(pt, msg, len) == 0, "and opens the new key's");
		cipher_key_free(&full2);
	}
	cipher_key_free(&spare);
	cipher_key_free(&reused);
	cipher_key_free(&full);
}

/*
 * A child of fork() uses both the contexts it inherited and contexts it sets up itself,
 * on values its parent sealed.  It keeps its parent's dispatch look-up: a fault
 * injected in the child, which a new look-up would meet and refuse the path for, does
 * not change the path of its new keys.
 */
static void
test_gcm_after_fork(CipherGcmPath path)
{
	uint8_t		raw[CIPHER_KEY_LEN];
	CipherKey	key;
	CipherBinding acme = binding("acme", NULL);
	const char *msg = "sealed before the fork";
	size_t		len = strlen(msg);
	uint8_t		ct[64], nonce[CIPHER_NONCE_LEN];
	int			status = -1;
	pid_t		pid;

	CHECK(cipher_random_bytes(raw, sizeof(raw)) == CIPHER_OK, "random");
	CHECK(cipher_key_init(&key, raw) == CIPHER_OK && key_uses_path(&key, path), "key init");
	CHECK(cipher_next_nonce(nonce) == CIPHER_OK &&
		  cipher_encrypt(&key, 1, nonce, &acme, (const uint8_t *) msg, len, ct) == CIPHER_OK, "encrypt");
	pid = fork();
	if (pid == 0)
	{
		CipherKey	fresh;
		uint8_t		pt[64], ct2[64];
		bool		ok;

		gcm_dispatch_inject_fault(GCM_DISPATCH_FAULT_CIPHERTEXT);
		ok = cipher_decrypt(&key, &acme, ct, len + CIPHER_OVERHEAD, pt) == CIPHER_OK &&
			memcmp(pt, msg, len) == 0 &&
			cipher_key_init(&fresh, raw) == CIPHER_OK && key_uses_path(&fresh, path) &&
			cipher_decrypt(&fresh, &acme, ct, len + CIPHER_OVERHEAD, pt) == CIPHER_OK &&
			memcmp(pt, msg, len) == 0 &&
			cipher_next_nonce(nonce) == CIPHER_OK &&
			cipher_encrypt(&fresh, 1, nonce, &acme, (const uint8_t *) msg, len, ct2) == CIPHER_OK &&
			cipher_decrypt(&key, &acme, ct2, len + CIPHER_OVERHEAD, pt) == CIPHER_OK;
		_exit(ok ? 0 : 1);
	}
	CHECK(pid > 0 && waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0,
		  "%s: a forked child could not use inherited or new GCM contexts", gcm_path_name(path));
	cipher_key_free(&key);
}

/*
 * In-place sealing works.  Partly overlapping buffers are refused on the dispatch path
 * (EVP checks that for legacy ciphers only, so its path is not asked to).
 */
static void
test_gcm_overlap(CipherGcmPath path)
{
	uint8_t		raw[CIPHER_KEY_LEN] = {7};
	uint8_t		nonce[CIPHER_NONCE_LEN] = {1};
	uint8_t		buf[80], copy[64], sealed[64], tag[CIPHER_TAG_LEN], tag2[CIPHER_TAG_LEN];
	CipherKey	key;

	for (size_t i = 0; i < sizeof(buf); i++)
		buf[i] = (uint8_t) i;
	memcpy(copy, buf, sizeof(copy));
	CHECK(cipher_key_init_gcm(&key, raw) == CIPHER_OK && key_uses_path(&key, path), "key init");
	CHECK(cipher_gcm_seal(&key, nonce, NULL, 0, copy, 64, sealed, tag) == CIPHER_OK, "seal");
	CHECK(cipher_gcm_seal(&key, nonce, NULL, 0, buf, 64, buf, tag2) == CIPHER_OK &&
		  memcmp(buf, sealed, 64) == 0 && memcmp(tag, tag2, sizeof(tag)) == 0,
		  "%s: in-place seal", gcm_path_name(path));
	memcpy(buf, copy, sizeof(copy));
	if (path == CIPHER_GCM_DISPATCH)
	{
		CHECK(cipher_gcm_seal(&key, nonce, NULL, 0, buf, 64, buf + 1, tag2) != CIPHER_OK,
			  "%s: partly overlapping buffers accepted", gcm_path_name(path));
		/* Decrypting into a shifted buffer is refused as an internal failure, not a bad tag. */
		memcpy(buf, sealed, 64);
		CHECK(cipher_gcm_open(&key, nonce, NULL, 0, buf, 64, tag, buf + 1) == CIPHER_ERR_INTERNAL &&
			  all_zero(buf + 1, 64),
			  "%s: partly overlapping decryption not an internal failure with its output wiped",
			  gcm_path_name(path));
	}
	memcpy(buf, sealed, 64);
	CHECK(cipher_gcm_open(&key, nonce, NULL, 0, buf, 64, tag, buf) == CIPHER_OK &&
		  memcmp(buf, copy, 64) == 0, "%s: in-place open", gcm_path_name(path));
	cipher_key_free(&key);
}

/*
 * In a child whose look-up meets `fault`: the dispatch path is refused (used, when there
 * is no fault), and a key then seals and opens through EVP.  0 if all holds.
 */
static int
child_after_fault(GcmDispatchFault fault)
{
	EVP_CIPHER *aes = EVP_CIPHER_fetch(NULL, "AES-256-GCM", NULL);
	CipherGcmPath expect = fault == GCM_DISPATCH_FAULT_NONE ? CIPHER_GCM_DISPATCH : CIPHER_GCM_EVP;
	uint8_t		raw[CIPHER_KEY_LEN] = {9}, nonce[CIPHER_NONCE_LEN] = {8};
	uint8_t		msg[24] = "after the look-up's end", ct[24], pt[24], tag[CIPHER_TAG_LEN];
	GcmDispatchCtx ctx;
	CipherKey	key;
	bool		dispatch_used, ok;

	gcm_dispatch_inject_fault(fault);
	dispatch_used = aes != NULL && gcm_dispatch_new(&ctx, aes, raw, sizeof(raw), true);
	if (dispatch_used)
		gcm_dispatch_free(&ctx);
	ok = dispatch_used == (expect == CIPHER_GCM_DISPATCH) &&
		cipher_key_init_gcm(&key, raw) == CIPHER_OK && key_uses_path(&key, expect) &&
		cipher_gcm_seal(&key, nonce, NULL, 0, msg, sizeof(msg), ct, tag) == CIPHER_OK &&
		cipher_gcm_open(&key, nonce, NULL, 0, ct, sizeof(ct), tag, pt) == CIPHER_OK &&
		memcmp(pt, msg, sizeof(msg)) == 0;
	return ok ? 0 : 1;
}

/*
 * The look-up refuses the dispatch path for the whole process, the keys falling back
 * to EVP, when the cipher's provider is not one of OpenSSL's own or when any step of
 * the known-answer self-test does not come out as published.  Each case runs in a
 * child forked before this process's own look-up (main calls this first): the look-up
 * is done once per process image.
 */
static void
test_dispatch_refusals(void)
{
	static const struct
	{
		GcmDispatchFault fault;
		const char *what;
	}			cases[] = {
		{GCM_DISPATCH_FAULT_NONE, "no fault: the dispatch path is used"},
		{GCM_DISPATCH_FAULT_FOREIGN_PROVIDER, "a provider other than default or fips is refused"},
		{GCM_DISPATCH_FAULT_CIPHERTEXT, "a self-test ciphertext mismatch is refused"},
		{GCM_DISPATCH_FAULT_TAG, "a self-test tag mismatch is refused"},
		{GCM_DISPATCH_FAULT_TAG_NOT_FLIPPED, "a self-test flipped tag that opens is refused"},
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
	{
		int			status = -1;
		pid_t		pid = fork();

		if (pid == 0)
			_exit(child_after_fault(cases[i].fault));
		CHECK(pid > 0 && waitpid(pid, &status, 0) == pid && WIFEXITED(status) &&
			  WEXITSTATUS(status) == 0, "dispatch look-up: %s (and EVP then works)",
			  cases[i].what);
	}
}

/*
 * The dispatch layer takes only pg_envelope's 12-byte IV and 16-byte tag: the provider
 * itself would take an 8-byte IV, hand out a truncated tag, and open a value against
 * the first 8 bytes of its tag alone.
 */
static void
test_dispatch_lengths(void)
{
	EVP_CIPHER *aes = EVP_CIPHER_fetch(NULL, "AES-256-GCM", NULL);
	uint8_t		key[32] = {3}, iv[GCM_DISPATCH_IV_LEN] = {4};
	uint8_t		msg[20] = "twenty bytes of text", ct[20], pt[20], tag[GCM_DISPATCH_TAG_LEN];
	GcmDispatchCtx enc, dec;

	CHECK(aes != NULL && gcm_dispatch_new(&enc, aes, key, sizeof(key), true) &&
		  gcm_dispatch_new(&dec, aes, key, sizeof(key), false), "dispatch contexts");
	if (enc.algctx == NULL || dec.algctx == NULL)
	{
		EVP_CIPHER_free(aes);
		return;
	}
	CHECK(!gcm_dispatch_start(&enc, iv, 8), "an 8-byte IV accepted");
	CHECK(!gcm_dispatch_start(&enc, iv, 16), "a 16-byte IV accepted");
	CHECK(gcm_dispatch_start(&enc, iv, sizeof(iv)) &&
		  gcm_dispatch_update(&enc, msg, sizeof(msg), ct) &&
		  !gcm_dispatch_seal_final(&enc, tag, 8), "an 8-byte tag handed out");
	CHECK(gcm_dispatch_start(&enc, iv, sizeof(iv)) &&
		  gcm_dispatch_update(&enc, msg, sizeof(msg), ct) &&
		  gcm_dispatch_seal_final(&enc, tag, sizeof(tag)), "seal");
	CHECK(gcm_dispatch_start(&dec, iv, sizeof(iv)) &&
		  gcm_dispatch_open(&dec, ct, sizeof(ct), tag, 8, pt) == GCM_DISPATCH_OPEN_FAILED &&
		  all_zero(pt, sizeof(pt)), "opened against 8 bytes of its tag (or not as a failure)");
	CHECK(gcm_dispatch_start(&dec, iv, sizeof(iv)) &&
		  gcm_dispatch_open(&dec, ct, sizeof(ct), tag, sizeof(tag), pt) == GCM_DISPATCH_OPENED &&
		  memcmp(pt, msg, sizeof(msg)) == 0, "open");
	tag[0] ^= 1;
	CHECK(gcm_dispatch_start(&dec, iv, sizeof(iv)) &&
		  gcm_dispatch_open(&dec, ct, sizeof(ct), tag, sizeof(tag), pt) == GCM_DISPATCH_TAG_MISMATCH &&
		  all_zero(pt, sizeof(pt)), "a flipped tag is a mismatch, the output wiped");
	gcm_dispatch_free(&enc);
	gcm_dispatch_free(&dec);
	EVP_CIPHER_free(aes);
}

/*
 * A dispatch set-up that fails (here a 16-byte key for AES-256) leaves nothing on
 * OpenSSL's error queue: the caller falls back to EVP, and a stale error would be read
 * as the cause of whatever fails next.
 */
static void
test_dispatch_error_queue(void)
{
	EVP_CIPHER *aes = EVP_CIPHER_fetch(NULL, "AES-256-GCM", NULL);
	uint8_t		key[32] = {5};
	GcmDispatchCtx ctx;

	ERR_clear_error();
	CHECK(aes != NULL && !gcm_dispatch_new(&ctx, aes, key, 16, true) && ctx.algctx == NULL,
		  "a 16-byte key accepted for AES-256-GCM");
	CHECK(ERR_peek_error() == 0, "a failed dispatch set-up left an error on the queue");
	CHECK(gcm_dispatch_new(&ctx, aes, key, sizeof(key), false), "dispatch context");
	if (ctx.algctx == NULL)
	{
		EVP_CIPHER_free(aes);
		return;
	}
	ERR_clear_error();
	CHECK(!gcm_dispatch_rekey(&ctx, key, 16, false), "a re-key with a 16-byte key accepted");
	CHECK(ERR_peek_error() == 0, "a failed dispatch re-key left an error on the queue");
	gcm_dispatch_free(&ctx);
	EVP_CIPHER_free(aes);
}

/*
 * A context of each implementation taken over as a spare by the other: a dispatch
 * context is replaced when EVP is asked for; an EVP context (as when the dispatch path
 * is not available) is re-keyed.  Values cross between the implementations.
 */
static void
test_gcm_paths_cross(void)
{
	uint8_t		raw[CIPHER_KEY_LEN], raw2[CIPHER_KEY_LEN];
	CipherKey	via_dispatch, via_evp, spare, rekeyed;
	CipherBinding acme = binding("acme", "ctx");
	const char *msg = "one format, two implementations";
	size_t		len = strlen(msg);
	uint8_t		ct[64], ct2[64], pt[64], nonce[CIPHER_NONCE_LEN];

	CHECK(cipher_random_bytes(raw, sizeof(raw)) == CIPHER_OK &&
		  cipher_random_bytes(raw2, sizeof(raw2)) == CIPHER_OK, "random");
	cipher_gcm_set_path(CIPHER_GCM_DISPATCH);
	CHECK(cipher_key_init_gcm(&via_dispatch, raw) == CIPHER_OK &&
		  key_uses_path(&via_dispatch, CIPHER_GCM_DISPATCH), "dispatch key");
	cipher_gcm_set_path(CIPHER_GCM_EVP);
	CHECK(cipher_key_init_gcm(&via_evp, raw) == CIPHER_OK &&
		  key_uses_path(&via_evp, CIPHER_GCM_EVP), "EVP key");

	CHECK(cipher_next_nonce(nonce) == CIPHER_OK &&
		  cipher_encrypt(&via_dispatch, 3, nonce, &acme, (const uint8_t *) msg, len, ct) == CIPHER_OK &&
		  cipher_encrypt(&via_evp, 3, nonce, &acme, (const uint8_t *) msg, len, ct2) == CIPHER_OK &&
		  memcmp(ct, ct2, len + CIPHER_OVERHEAD) == 0, "both implementations seal the same bytes");
	CHECK(cipher_decrypt(&via_evp, &acme, ct, len + CIPHER_OVERHEAD, pt) == CIPHER_OK &&
		  memcmp(pt, msg, len) == 0, "EVP opens a dispatch-sealed value");

	/* EVP asked for: the dispatch spare is replaced by an EVP context. */
	spare = via_dispatch;
	memset(&via_dispatch, 0, sizeof(via_dispatch));
	memset(&rekeyed, 0, sizeof(rekeyed));
	CHECK(cipher_key_add(&rekeyed, CIPHER_USE_DECRYPT, raw2, &spare) == CIPHER_OK &&
		  cipher_key_gcm_path(&rekeyed, CIPHER_USE_DECRYPT) == CIPHER_GCM_EVP &&
		  spare.dec == NULL, "a dispatch spare is replaced when EVP is asked for");
	cipher_key_free(&rekeyed);

	/* Dispatch asked for: an EVP spare is re-keyed and stays EVP. */
	cipher_gcm_set_path(CIPHER_GCM_DISPATCH);
	memset(&rekeyed, 0, sizeof(rekeyed));
	CHECK(cipher_key_add(&rekeyed, CIPHER_USE_DECRYPT, raw, &via_evp) == CIPHER_OK &&
		  cipher_key_gcm_path(&rekeyed, CIPHER_USE_DECRYPT) == CIPHER_GCM_EVP &&
		  via_evp.dec == NULL, "an EVP spare is re-keyed");
	CHECK(cipher_decrypt(&rekeyed, &acme, ct, len + CIPHER_OVERHEAD, pt) == CIPHER_OK &&
		  memcmp(pt, msg, len) == 0, "the re-keyed EVP spare opens the new key's value");

	cipher_key_free(&rekeyed);
	cipher_key_free(&spare);
	cipher_key_free(&via_evp);
}

int
main(void)
{
	static const CipherGcmPath paths[] = {CIPHER_GCM_DISPATCH, CIPHER_GCM_EVP};

	/* First: its children must each do the dispatch look-up themselves. */
	test_dispatch_refusals();

	for (size_t p = 0; p < sizeof(paths) / sizeof(paths[0]); p++)
	{
		cipher_gcm_set_path(paths[p]);
		test_wycheproof(paths[p]);
		test_envelope_format();
		test_format_known_answers();
		test_contexts_per_use();
		test_gcm_after_fork(paths[p]);
		test_gcm_overlap(paths[p]);
	}
	cipher_gcm_set_path(CIPHER_GCM_DISPATCH);
	test_gcm_paths_cross();
	test_dispatch_lengths();
	test_dispatch_error_queue();

	test_wycheproof_siv();
	test_siv_reuse();
	test_deterministic();
	test_nonces();
	return unit_finish("test_cipher");
}
