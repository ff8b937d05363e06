/*
 * kmip_msg.h — the KMIP 1.4 requests and responses the kmip provider needs.
 *
 * Plain C on top of kmip_ttlv.h: builds request messages into a caller's buffer and
 * reads response messages that passed ttlv_parse.  No I/O, no allocation.
 *
 * Operations (KMIP Specification 1.4, section 4):
 *   - Get Attributes (0x0B) with Attribute Name "State": the master key's life-cycle
 *     state, asked in the same request message as every Encrypt or Decrypt (one
 *     round trip), so a Deactivated, Compromised or Destroyed key is refused even by
 *     a key manager that would still decrypt under it;
 *   - Encrypt (0x1F) and Decrypt (0x20) with Cryptographic Parameters {Block Cipher
 *     Mode GCM, Cryptographic Algorithm AES, Random IV true, Tag Length 16} and
 *     Authenticated Encryption Additional Data.  Additional data and the
 *     Authenticated Encryption Tag exist only since KMIP 1.4, so every request says
 *     Protocol Version 1.4 (PyKMIP, for one, reads them only in 1.4 messages).
 *
 * Items of a payload are written in the order the specification lists them: servers
 * such as PyKMIP read fields positionally.
 */
#ifndef PG_ENVELOPE_KMIP_MSG_H
#define PG_ENVELOPE_KMIP_MSG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kmip_ttlv.h"

/* Tags (KMIP Specification 1.4, section 9.1.3.1) */
#define KMIP_TAG_ATTRIBUTE					0x420008
#define KMIP_TAG_ATTRIBUTE_NAME				0x42000A
#define KMIP_TAG_ATTRIBUTE_VALUE			0x42000B
#define KMIP_TAG_BATCH_COUNT				0x42000D
#define KMIP_TAG_BATCH_ITEM					0x42000F
#define KMIP_TAG_BLOCK_CIPHER_MODE			0x420011
#define KMIP_TAG_CRYPTOGRAPHIC_ALGORITHM	0x420028
#define KMIP_TAG_CRYPTOGRAPHIC_PARAMETERS	0x42002B
#define KMIP_TAG_IV_COUNTER_NONCE			0x42003D
#define KMIP_TAG_MAXIMUM_RESPONSE_SIZE		0x420050
#define KMIP_TAG_OPERATION					0x42005C
#define KMIP_TAG_PROTOCOL_VERSION			0x420069
#define KMIP_TAG_PROTOCOL_VERSION_MAJOR		0x42006A
#define KMIP_TAG_PROTOCOL_VERSION_MINOR		0x42006B
#define KMIP_TAG_REQUEST_HEADER				0x420077
#define KMIP_TAG_REQUEST_MESSAGE			0x420078
#define KMIP_TAG_REQUEST_PAYLOAD			0x420079
#define KMIP_TAG_RESPONSE_HEADER			0x42007A
#define KMIP_TAG_RESPONSE_MESSAGE			0x42007B
#define KMIP_TAG_RESPONSE_PAYLOAD			0x42007C
#define KMIP_TAG_RESULT_MESSAGE				0x42007D
#define KMIP_TAG_RESULT_REASON				0x42007E
#define KMIP_TAG_RESULT_STATUS				0x42007F
#define KMIP_TAG_STATE						0x42008D
#define KMIP_TAG_UNIQUE_BATCH_ITEM_ID		0x420093
#define KMIP_TAG_UNIQUE_IDENTIFIER			0x420094
#define KMIP_TAG_DATA						0x4200C2
#define KMIP_TAG_RANDOM_IV					0x4200C5
#define KMIP_TAG_TAG_LENGTH					0x4200CE
#define KMIP_TAG_AE_ADDITIONAL_DATA			0x4200FE
#define KMIP_TAG_AE_TAG						0x4200FF

/* Enumerations */
#define KMIP_OP_GET_ATTRIBUTES		0x0B
#define KMIP_OP_ENCRYPT				0x1F
#define KMIP_OP_DECRYPT				0x20
#define KMIP_ALG_AES				0x03
#define KMIP_MODE_GCM				0x09

#define KMIP_STATUS_SUCCESS			0
#define KMIP_STATUS_OPERATION_FAILED 1
#define KMIP_STATUS_PENDING			2
#define KMIP_STATUS_UNDONE			3

#define KMIP_REASON_ITEM_NOT_FOUND				0x01
#define KMIP_REASON_RESPONSE_TOO_LARGE			0x02
#define KMIP_REASON_AUTHENTICATION_NOT_SUCCESSFUL 0x03
#define KMIP_REASON_INVALID_MESSAGE				0x04
#define KMIP_REASON_OPERATION_NOT_SUPPORTED		0x05
#define KMIP_REASON_INVALID_FIELD				0x07
#define KMIP_REASON_FEATURE_NOT_SUPPORTED		0x08
#define KMIP_REASON_CRYPTOGRAPHIC_FAILURE		0x0A
#define KMIP_REASON_ILLEGAL_OPERATION			0x0B
#define KMIP_REASON_PERMISSION_DENIED			0x0C
#define KMIP_REASON_GENERAL_FAILURE				0x100

/* Key states (KMIP Specification 1.4, section 9.1.3.2.16) */
#define KMIP_STATE_PRE_ACTIVE		1
#define KMIP_STATE_ACTIVE			2
#define KMIP_STATE_DEACTIVATED		3
#define KMIP_STATE_COMPROMISED		4
#define KMIP_STATE_DESTROYED		5
#define KMIP_STATE_DESTROYED_COMPROMISED 6

#define KMIP_PROTOCOL_MAJOR			1
#define KMIP_PROTOCOL_MINOR			4

/* The GCM tag the provider asks for and accepts. */
#define KMIP_GCM_TAG_LEN			16

/* Largest response accepted (also sent as Maximum Response Size). */
#define KMIP_MAX_RESPONSE			16384

/* Batch item ids: the state query and the cryptographic operation. */
#define KMIP_BATCH_STATE			1
#define KMIP_BATCH_CRYPTO			2

/* What an Encrypt or Decrypt sends (pointers are the caller's). */
typedef struct KmipCryptoRequest
{
	const char *unique_identifier;
	const uint8_t *data;		/* plaintext for Encrypt, ciphertext for Decrypt */
	size_t		data_len;
	const uint8_t *iv;			/* Decrypt only */
	size_t		iv_len;
	const uint8_t *tag;			/* Decrypt only, KMIP_GCM_TAG_LEN bytes */
	const uint8_t *aad;
	size_t		aad_len;
} KmipCryptoRequest;

/*
 * Build a request message of two batch items: Get Attributes "State" of the key, then
 * `operation` (KMIP_OP_ENCRYPT or KMIP_OP_DECRYPT).  Returns false when it does not
 * fit in `cap` bytes.  The buffer holds the DEK for an Encrypt: the caller wipes it.
 */
extern bool kmip_build_crypto_request(uint32_t operation, const KmipCryptoRequest *req,
									  uint8_t *buf, size_t cap, size_t *len);

/* One batch item of a response. */
typedef struct KmipBatchResult
{
	bool		present;
	uint32_t	operation;
	uint32_t	result_status;
	uint32_t	result_reason;	/* 0 when absent */
	char		result_message[128];	/* printable ASCII only, "" when absent */
	bool		has_payload;
	TtlvItem	payload;
} KmipBatchResult;

typedef struct KmipResponse
{
	int			protocol_major;
	int			protocol_minor;
	KmipBatchResult state;		/* batch item KMIP_BATCH_STATE */
	KmipBatchResult crypto;		/* batch item KMIP_BATCH_CRYPTO */
} KmipResponse;

/*
 * Read a parsed response message.  False (with a reason in `why`) when it is not a
 * KMIP response, or a batch item lacks what every result must carry.  A batch item
 * the server did not process is left with present = false.
 */
extern bool kmip_read_response(const TtlvItem *msg, KmipResponse *out,
							   char *why, size_t why_len);

/* The State from a Get Attributes payload; false if absent or malformed. */
extern bool kmip_payload_state(const TtlvItem *payload, uint32_t *state);

/* Encrypt's answer: ciphertext, IV and tag point into the response. */
extern bool kmip_payload_encrypted(const TtlvItem *payload,
								   const uint8_t **data, size_t *data_len,
								   const uint8_t **iv, size_t *iv_len,
								   const uint8_t **tag, size_t *tag_len);

/* Decrypt's answer: the plaintext points into the response. */
extern bool kmip_payload_decrypted(const TtlvItem *payload,
								   const uint8_t **data, size_t *data_len);

/* The Unique Identifier a payload names, to check it is the key that was asked for. */
extern bool kmip_payload_uid_is(const TtlvItem *payload, const char *uid);

extern const char *kmip_reason_name(uint32_t reason);
extern const char *kmip_state_name(uint32_t state);

#endif							/* PG_ENVELOPE_KMIP_MSG_H */
