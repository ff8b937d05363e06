/*
 * kms_local.c — the `local` KMS provider: one master key in a file.
 *
 * For development, tests and the demo.  It is not a KMS: the master key sits in a file
 * on the database host, so anyone who can read that file and a backup can decrypt the
 * backup.  Production deployments use a real KMS (the `aws` provider).
 *
 * The file holds exactly 32 random bytes, raw or as 64 hex digits (an optional trailing
 * newline is allowed, so `openssl rand -hex 32 > file` works).  It must be a regular
 * file, unreadable by group and others, and outside the data directory, so that a copy
 * of PGDATA or a base backup never carries the key next to the data.
 *
 * The master key's identity is "local:" plus 16 hex digits of a SHA-256 over a label
 * and the key.  It is recorded with every DEK, so pointing the server at a different
 * key file gives a clear "wrong master key" error instead of a failed tag check.
 *
 * Wrapped DEK: 0x01 || nonce(12) || AES-256-GCM(master, DEK)(32) || tag(16), with
 * AAD = label || len(key id) || key id || len(tenant) || tenant || version, all lengths
 * 4-byte big-endian — the same binding to (tenant, version) a real KMS gives with its
 * encryption context.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/evp.h>

#include "cipher.h"
#include "kms.h"
#include "util.h"

#define LOCAL_WRAP_FORMAT	0x01
#define LOCAL_WRAPPED_LEN	(1 + CIPHER_NONCE_LEN + KMS_DEK_LEN + CIPHER_TAG_LEN)
#define LOCAL_KEY_ID_LEN	(6 + 16)	/* "local:" + 16 hex digits */

static const char wrap_label[] = "pg_envelope local wrap v1";
static const char key_id_label[] = "pg_envelope local master key id v1";

/* The master key and its identity, alive only for the duration of one call. */
typedef struct LocalMasterKey
{
	uint8_t		key[CIPHER_KEY_LEN];
	char		id[LOCAL_KEY_ID_LEN + 1];
} LocalMasterKey;

static KmsStatus
compute_key_id(LocalMasterKey *mk, KmsError *err)
{
	uint8_t		digest[EVP_MAX_MD_SIZE];
	unsigned int digest_len = 0;
	EVP_MD_CTX *md = EVP_MD_CTX_new();

	if (md == NULL ||
		EVP_DigestInit_ex(md, EVP_sha256(), NULL) != 1 ||
		EVP_DigestUpdate(md, key_id_label, sizeof(key_id_label)) != 1 ||
		EVP_DigestUpdate(md, mk->key, CIPHER_KEY_LEN) != 1 ||
		EVP_DigestFinal_ex(md, digest, &digest_len) != 1)
	{
		EVP_MD_CTX_free(md);
		return kms_set_error(err, KMS_ERR_INTERNAL, NULL, "could not compute the master key id");
	}
	EVP_MD_CTX_free(md);
	memcpy(mk->id, "local:", 6);
	for (int i = 0; i < 8; i++)
		snprintf(mk->id + 6 + 2 * i, 3, "%02x", digest[i]);
	return KMS_OK;
}

/*
 * Read and check the master key file.  Every buffer that held key material is wiped
 * before returning, on every path.
 */
static KmsStatus
load_master_key(const KmsConfig *cfg, LocalMasterKey *mk, KmsError *err)
{
	const char *path = cfg->local_master_key_file;
	uint8_t		buf[130];
	ssize_t		n;
	size_t		len;
	int			fd;
	KmsStatus	status = KMS_OK;

	memset(mk, 0, sizeof(*mk));
	if (path == NULL || path[0] == '\0')
		return kms_set_error(err, KMS_ERR_CONFIG, NULL,
							 "envelope.local_master_key_file is not set");
	fd = kms_open_secret_file(path, "envelope.local_master_key_file", "master key file",
							  cfg->data_directory, err);
	if (fd < 0)
		return err->status;

	n = read(fd, buf, sizeof(buf));
	close(fd);
	if (n < 0)
		return kms_set_error(err, KMS_ERR_CONFIG, NULL,
							 "could not read master key file \"%s\": %s", path, strerror(errno));
	len = (size_t) n;

	if (len == CIPHER_KEY_LEN)
		memcpy(mk->key, buf, CIPHER_KEY_LEN);
	else
	{
		/* 64 hex digits, then at most one newline (or CRLF). */
		size_t		digits = len;

		if (digits > 0 && buf[digits - 1] == '\n')
			digits--;
		if (digits > 0 && buf[digits - 1] == '\r')
			digits--;
		if (digits != 2 * CIPHER_KEY_LEN)
			status = KMS_ERR_CONFIG;
		for (size_t i = 0; status == KMS_OK && i < CIPHER_KEY_LEN; i++)
		{
			int			hi = util_hex_value((char) buf[2 * i]);
			int			lo = util_hex_value((char) buf[2 * i + 1]);

			if (hi < 0 || lo < 0)
				status = KMS_ERR_CONFIG;
			else
				mk->key[i] = (uint8_t) (hi << 4 | lo);
		}
		if (status != KMS_OK)
			kms_set_error(err, status, NULL,
						  "master key file \"%s\" must hold exactly 32 bytes, raw or as 64 hex digits",
						  path);
	}
	cipher_wipe(buf, sizeof(buf));
	if (status == KMS_OK)
		status = compute_key_id(mk, err);
	if (status != KMS_OK)
		cipher_wipe(mk, sizeof(*mk));
	return status;
}

/* Does the recorded key id name this master key?  "" and "local" mean "the file's key". */
static KmsStatus
check_key_id(const LocalMasterKey *mk, const char *key_id, KmsError *err)
{
	if (key_id == NULL || key_id[0] == '\0' || strcmp(key_id, "local") == 0 ||
		strcmp(key_id, mk->id) == 0)
		return KMS_OK;
	return kms_set_error(err, KMS_ERR_NOT_FOUND, NULL,
						 "master key %s is not the key in envelope.local_master_key_file, which is %s",
						 key_id, mk->id);
}

static void
put_len_prefixed(uint8_t *aad, size_t *pos, const void *data, size_t len)
{
	aad[(*pos)++] = (uint8_t) (len >> 24);
	aad[(*pos)++] = (uint8_t) (len >> 16);
	aad[(*pos)++] = (uint8_t) (len >> 8);
	aad[(*pos)++] = (uint8_t) len;
	memcpy(aad + *pos, data, len);
	*pos += len;
}

/* label || key id || tenant || version; returns a malloc'd buffer. */
static uint8_t *
build_wrap_aad(const LocalMasterKey *mk, const KmsEncryptionContext *ec, size_t *aad_len)
{
	size_t		tenant_len = strlen(ec->tenant);
	size_t		cap = sizeof(wrap_label) + 4 + LOCAL_KEY_ID_LEN + 4 + tenant_len + 4;
	uint8_t    *aad = malloc(cap);
	size_t		pos = 0;
	uint32_t	v = ec->version;

	if (aad == NULL)
		return NULL;
	memcpy(aad, wrap_label, sizeof(wrap_label));
	pos = sizeof(wrap_label);
	put_len_prefixed(aad, &pos, mk->id, LOCAL_KEY_ID_LEN);
	put_len_prefixed(aad, &pos, ec->tenant, tenant_len);
	aad[pos++] = (uint8_t) (v >> 24);
	aad[pos++] = (uint8_t) (v >> 16);
	aad[pos++] = (uint8_t) (v >> 8);
	aad[pos++] = (uint8_t) v;
	*aad_len = pos;
	return aad;
}

/* Wrap `dek` under the master key into LOCAL_WRAPPED_LEN bytes at `wrapped`. */
static KmsStatus
wrap_dek(const LocalMasterKey *mk, const KmsEncryptionContext *ec,
		 const uint8_t dek[KMS_DEK_LEN], uint8_t *wrapped, size_t *wrapped_len, KmsError *err)
{
	CipherKey	ck;
	uint8_t    *aad;
	size_t		aad_len;
	KmsStatus	status = KMS_OK;

	aad = build_wrap_aad(mk, ec, &aad_len);
	if (aad == NULL)
		return kms_set_error(err, KMS_ERR_INTERNAL, NULL, "out of memory");
	wrapped[0] = LOCAL_WRAP_FORMAT;
	if (cipher_key_init_gcm(&ck, mk->key) != CIPHER_OK)
	{
		free(aad);
		return kms_set_error(err, KMS_ERR_INTERNAL, NULL, "could not initialize AES-256-GCM");
	}
	if (cipher_random_bytes(wrapped + 1, CIPHER_NONCE_LEN) != CIPHER_OK ||
		cipher_gcm_seal(&ck, wrapped + 1, aad, aad_len, dek, KMS_DEK_LEN,
						wrapped + 1 + CIPHER_NONCE_LEN,
						wrapped + 1 + CIPHER_NONCE_LEN + KMS_DEK_LEN) != CIPHER_OK)
		status = kms_set_error(err, KMS_ERR_INTERNAL, NULL, "could not wrap the data key");
	cipher_key_free(&ck);
	free(aad);
	if (status == KMS_OK)
		*wrapped_len = LOCAL_WRAPPED_LEN;
	return status;
}

static KmsStatus
unwrap_dek(const LocalMasterKey *mk, const KmsEncryptionContext *ec,
		   const uint8_t *wrapped, size_t wrapped_len, uint8_t dek[KMS_DEK_LEN], KmsError *err)
{
	CipherKey	ck;
	uint8_t    *aad;
	size_t		aad_len;
	CipherStatus cs;

	if (wrapped_len != LOCAL_WRAPPED_LEN || wrapped[0] != LOCAL_WRAP_FORMAT)
		return kms_set_error(err, KMS_ERR_INVALID_CIPHERTEXT, NULL,
							 "the wrapped data key is not in the local provider's format");
	aad = build_wrap_aad(mk, ec, &aad_len);
	if (aad == NULL)
		return kms_set_error(err, KMS_ERR_INTERNAL, NULL, "out of memory");
	if (cipher_key_init_gcm(&ck, mk->key) != CIPHER_OK)
	{
		free(aad);
		return kms_set_error(err, KMS_ERR_INTERNAL, NULL, "could not initialize AES-256-GCM");
	}
	cs = cipher_gcm_open(&ck, wrapped + 1, aad, aad_len,
						 wrapped + 1 + CIPHER_NONCE_LEN, KMS_DEK_LEN,
						 wrapped + 1 + CIPHER_NONCE_LEN + KMS_DEK_LEN, dek);
	cipher_key_free(&ck);
	free(aad);
	/*
	 * Only a tag that does not verify is a refusal of the wrapped key (the master key
	 * recheck revokes on it); an OpenSSL failure is an internal error.
	 */
	if (cs == CIPHER_ERR_AUTH)
		return kms_set_error(err, KMS_ERR_INVALID_CIPHERTEXT, NULL,
							 "the wrapped data key does not unwrap for this tenant and version");
	if (cs != CIPHER_OK)
		return kms_set_error(err, KMS_ERR_INTERNAL, NULL, "AES-256-GCM failed");
	return KMS_OK;
}

static KmsStatus
local_generate_data_key(const KmsConfig *cfg, const char *key_id,
						const KmsEncryptionContext *ec, uint8_t dek[KMS_DEK_LEN],
						uint8_t *wrapped, size_t *wrapped_len, char *key_arn, KmsError *err)
{
	LocalMasterKey mk;
	KmsStatus	status;

	status = load_master_key(cfg, &mk, err);
	if (status == KMS_OK)
		status = check_key_id(&mk, key_id, err);
	if (status == KMS_OK && cipher_random_bytes(dek, KMS_DEK_LEN) != CIPHER_OK)
		status = kms_set_error(err, KMS_ERR_INTERNAL, NULL, "the random number generator failed");
	if (status == KMS_OK)
		status = wrap_dek(&mk, ec, dek, wrapped, wrapped_len, err);
	if (status == KMS_OK)
		snprintf(key_arn, KMS_KEY_ID_MAX, "%s", mk.id);
	else
		cipher_wipe(dek, KMS_DEK_LEN);
	cipher_wipe(&mk, sizeof(mk));
	return status;
}

static KmsStatus
local_decrypt(const KmsConfig *cfg, const char *key_id, const KmsEncryptionContext *ec,
			  const uint8_t *wrapped, size_t wrapped_len, uint8_t dek[KMS_DEK_LEN], KmsError *err)
{
	LocalMasterKey mk;
	KmsStatus	status;

	status = load_master_key(cfg, &mk, err);
	if (status == KMS_OK)
		status = check_key_id(&mk, key_id, err);
	if (status == KMS_OK)
		status = unwrap_dek(&mk, ec, wrapped, wrapped_len, dek, err);
	cipher_wipe(&mk, sizeof(mk));
	return status;
}

/*
 * The local provider holds a single master key, so a re-wrap can only target that same
 * key (which still gives the wrapped DEK a fresh nonce).  The DEK exists in plaintext
 * only inside this function, as it would inside a KMS.
 */
static KmsStatus
local_reencrypt(const KmsConfig *cfg, const char *source_key_id, const char *dest_key_id,
				const KmsEncryptionContext *ec, const uint8_t *wrapped, size_t wrapped_len,
				uint8_t *new_wrapped, size_t *new_wrapped_len, char *dest_key_arn, KmsError *err)
{
	LocalMasterKey mk;
	uint8_t		dek[KMS_DEK_LEN];
	KmsStatus	status;

	status = load_master_key(cfg, &mk, err);
	if (status == KMS_OK)
		status = check_key_id(&mk, source_key_id, err);
	if (status == KMS_OK)
		status = check_key_id(&mk, dest_key_id, err);
	if (status == KMS_OK)
		status = unwrap_dek(&mk, ec, wrapped, wrapped_len, dek, err);
	if (status == KMS_OK)
		status = wrap_dek(&mk, ec, dek, new_wrapped, new_wrapped_len, err);
	if (status == KMS_OK)
		snprintf(dest_key_arn, KMS_KEY_ID_MAX, "%s", mk.id);
	cipher_wipe(dek, sizeof(dek));
	cipher_wipe(&mk, sizeof(mk));
	return status;
}

const KmsProvider kms_local_provider = {
	.api_version = KMS_PROVIDER_API_VERSION,
	.name = "local",
	.generate_data_key = local_generate_data_key,
	.decrypt = local_decrypt,
	.reencrypt = local_reencrypt,
};
