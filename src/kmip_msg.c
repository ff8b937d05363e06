/*
 * kmip_msg.c — KMIP 1.4 request building and response reading (see kmip_msg.h).
 *
 * Plain C.  The server's Result Message is copied only as printable ASCII, truncated,
 * for debugging; the provider never puts it into an error, since a server could echo
 * part of a request (which may hold a DEK) in it.
 */
#include <stdio.h>
#include <string.h>

#include "kmip_msg.h"

static void
put_header(TtlvWriter *w, int batch_count)
{
	ttlv_begin_struct(w, KMIP_TAG_REQUEST_HEADER);
	ttlv_begin_struct(w, KMIP_TAG_PROTOCOL_VERSION);
	ttlv_put_integer(w, KMIP_TAG_PROTOCOL_VERSION_MAJOR, KMIP_PROTOCOL_MAJOR);
	ttlv_put_integer(w, KMIP_TAG_PROTOCOL_VERSION_MINOR, KMIP_PROTOCOL_MINOR);
	ttlv_end_struct(w);
	ttlv_put_integer(w, KMIP_TAG_MAXIMUM_RESPONSE_SIZE, KMIP_MAX_RESPONSE);
	ttlv_put_integer(w, KMIP_TAG_BATCH_COUNT, batch_count);
	ttlv_end_struct(w);
}

static void
begin_batch_item(TtlvWriter *w, uint32_t operation, uint8_t batch_id)
{
	ttlv_begin_struct(w, KMIP_TAG_BATCH_ITEM);
	ttlv_put_enum(w, KMIP_TAG_OPERATION, operation);
	ttlv_put_bytes(w, KMIP_TAG_UNIQUE_BATCH_ITEM_ID, &batch_id, 1);
	ttlv_begin_struct(w, KMIP_TAG_REQUEST_PAYLOAD);
}

static void
end_batch_item(TtlvWriter *w)
{
	ttlv_end_struct(w);			/* payload */
	ttlv_end_struct(w);			/* batch item */
}

static void
put_state_query(TtlvWriter *w, const char *uid)
{
	static const char state[] = "State";

	begin_batch_item(w, KMIP_OP_GET_ATTRIBUTES, KMIP_BATCH_STATE);
	ttlv_put_text(w, KMIP_TAG_UNIQUE_IDENTIFIER, uid, strlen(uid));
	ttlv_put_text(w, KMIP_TAG_ATTRIBUTE_NAME, state, sizeof(state) - 1);
	end_batch_item(w);
}

/* Payload fields in the order of KMIP 1.4 sections 4.29 (Encrypt) and 4.30 (Decrypt). */
static void
put_crypto(TtlvWriter *w, uint32_t operation, const KmipCryptoRequest *req)
{
	begin_batch_item(w, operation, KMIP_BATCH_CRYPTO);
	ttlv_put_text(w, KMIP_TAG_UNIQUE_IDENTIFIER, req->unique_identifier,
				  strlen(req->unique_identifier));
	ttlv_begin_struct(w, KMIP_TAG_CRYPTOGRAPHIC_PARAMETERS);
	ttlv_put_enum(w, KMIP_TAG_BLOCK_CIPHER_MODE, KMIP_MODE_GCM);
	ttlv_put_enum(w, KMIP_TAG_CRYPTOGRAPHIC_ALGORITHM, KMIP_ALG_AES);
	if (operation == KMIP_OP_ENCRYPT)
		ttlv_put_bool(w, KMIP_TAG_RANDOM_IV, true);
	ttlv_put_integer(w, KMIP_TAG_TAG_LENGTH, KMIP_GCM_TAG_LEN);
	ttlv_end_struct(w);
	ttlv_put_bytes(w, KMIP_TAG_DATA, req->data, req->data_len);
	if (operation == KMIP_OP_DECRYPT)
		ttlv_put_bytes(w, KMIP_TAG_IV_COUNTER_NONCE, req->iv, req->iv_len);
	ttlv_put_bytes(w, KMIP_TAG_AE_ADDITIONAL_DATA, req->aad, req->aad_len);
	if (operation == KMIP_OP_DECRYPT)
		ttlv_put_bytes(w, KMIP_TAG_AE_TAG, req->tag, KMIP_GCM_TAG_LEN);
	end_batch_item(w);
}

bool
kmip_build_crypto_request(uint32_t operation, const KmipCryptoRequest *req,
						  uint8_t *buf, size_t cap, size_t *len)
{
	TtlvWriter	w;

	if (operation != KMIP_OP_ENCRYPT && operation != KMIP_OP_DECRYPT)
		return false;
	ttlv_writer_init(&w, buf, cap);
	ttlv_begin_struct(&w, KMIP_TAG_REQUEST_MESSAGE);
	put_header(&w, 2);
	put_state_query(&w, req->unique_identifier);
	put_crypto(&w, operation, req);
	ttlv_end_struct(&w);
	return ttlv_writer_finish(&w, len);
}

/* ---------------------------------------------------------------------------
 * Responses
 */

static void
copy_printable(const char *s, size_t len, char *out, size_t out_len)
{
	size_t		n = 0;

	for (size_t i = 0; i < len && n + 1 < out_len; i++)
		out[n++] = (s[i] >= 0x20 && s[i] < 0x7f) ? s[i] : '?';
	out[n] = '\0';
}

static bool
read_protocol_version(const TtlvItem *header, KmipResponse *out)
{
	TtlvItem	pv,
				major,
				minor;
	int32_t		v;

	if (!ttlv_find(header, KMIP_TAG_PROTOCOL_VERSION, &pv) || pv.type != TTLV_STRUCTURE ||
		!ttlv_find(&pv, KMIP_TAG_PROTOCOL_VERSION_MAJOR, &major) ||
		!ttlv_find(&pv, KMIP_TAG_PROTOCOL_VERSION_MINOR, &minor) ||
		!ttlv_get_integer(&major, &v))
		return false;
	out->protocol_major = v;
	if (!ttlv_get_integer(&minor, &v))
		return false;
	out->protocol_minor = v;
	return true;
}

static bool
read_batch_item(const TtlvItem *item, KmipBatchResult *r, int *batch_id)
{
	TtlvItem	f;
	const uint8_t *id;
	size_t		id_len;
	const char *text;
	size_t		text_len;

	memset(r, 0, sizeof(*r));
	*batch_id = 0;
	if (ttlv_find(item, KMIP_TAG_UNIQUE_BATCH_ITEM_ID, &f))
	{
		if (!ttlv_get_bytes(&f, &id, &id_len) || id_len != 1)
			return false;
		*batch_id = id[0];
	}
	/* Operation may be absent in a failed item (KMIP 1.4, section 6.2). */
	if (ttlv_find(item, KMIP_TAG_OPERATION, &f) && !ttlv_get_enum(&f, &r->operation))
		return false;
	if (!ttlv_find(item, KMIP_TAG_RESULT_STATUS, &f) || !ttlv_get_enum(&f, &r->result_status))
		return false;
	if (ttlv_find(item, KMIP_TAG_RESULT_REASON, &f) && !ttlv_get_enum(&f, &r->result_reason))
		return false;
	if (ttlv_find(item, KMIP_TAG_RESULT_MESSAGE, &f))
	{
		if (!ttlv_get_text(&f, &text, &text_len))
			return false;
		copy_printable(text, text_len, r->result_message, sizeof(r->result_message));
	}
	if (ttlv_find(item, KMIP_TAG_RESPONSE_PAYLOAD, &r->payload))
	{
		if (r->payload.type != TTLV_STRUCTURE)
			return false;
		r->has_payload = true;
	}
	r->present = true;
	return true;
}

bool
kmip_read_response(const TtlvItem *msg, KmipResponse *out, char *why, size_t why_len)
{
	TtlvItem	header,
				child;
	size_t		pos = 0;
	int			items = 0;

	memset(out, 0, sizeof(*out));
	if (msg->tag != KMIP_TAG_RESPONSE_MESSAGE || msg->type != TTLV_STRUCTURE)
	{
		snprintf(why, why_len, "the answer is not a KMIP response message");
		return false;
	}
	if (!ttlv_find(msg, KMIP_TAG_RESPONSE_HEADER, &header) || header.type != TTLV_STRUCTURE ||
		!read_protocol_version(&header, out))
	{
		snprintf(why, why_len, "the response has no valid header");
		return false;
	}
	while (ttlv_next_child(msg, &pos, &child))
	{
		KmipBatchResult r;
		int			id;

		if (child.tag != KMIP_TAG_BATCH_ITEM)
			continue;
		if (child.type != TTLV_STRUCTURE || !read_batch_item(&child, &r, &id))
		{
			snprintf(why, why_len, "a batch item of the response is malformed");
			return false;
		}
		items++;

		/*
		 * A server answering a whole message with one error (bad message, failed
		 * authentication) sends a single item without an id: it stands for both.
		 */
		if (id == 0 && items == 1)
			out->state = out->crypto = r;
		else if (id == KMIP_BATCH_STATE)
			out->state = r;
		else if (id == KMIP_BATCH_CRYPTO)
			out->crypto = r;
		else
		{
			snprintf(why, why_len, "the response has a batch item this client did not send");
			return false;
		}
	}
	if (items == 0)
	{
		snprintf(why, why_len, "the response has no batch item");
		return false;
	}
	return true;
}

bool
kmip_payload_state(const TtlvItem *payload, uint32_t *state)
{
	TtlvItem	attr;
	size_t		pos = 0;

	while (ttlv_next_child(payload, &pos, &attr))
	{
		TtlvItem	name,
					value;
		const char *s;
		size_t		len;

		if (attr.tag != KMIP_TAG_ATTRIBUTE || attr.type != TTLV_STRUCTURE)
			continue;
		if (!ttlv_find(&attr, KMIP_TAG_ATTRIBUTE_NAME, &name) ||
			!ttlv_get_text(&name, &s, &len))
			return false;
		if (len != 5 || memcmp(s, "State", 5) != 0)
			continue;
		return ttlv_find(&attr, KMIP_TAG_ATTRIBUTE_VALUE, &value) &&
			ttlv_get_enum(&value, state);
	}
	return false;
}

bool
kmip_payload_uid_is(const TtlvItem *payload, const char *uid)
{
	TtlvItem	f;
	const char *s;
	size_t		len;

	return ttlv_find(payload, KMIP_TAG_UNIQUE_IDENTIFIER, &f) &&
		ttlv_get_text(&f, &s, &len) &&
		len == strlen(uid) && memcmp(s, uid, len) == 0;
}

bool
kmip_payload_encrypted(const TtlvItem *payload, const uint8_t **data, size_t *data_len,
					   const uint8_t **iv, size_t *iv_len,
					   const uint8_t **tag, size_t *tag_len)
{
	TtlvItem	f;

	return ttlv_find(payload, KMIP_TAG_DATA, &f) && ttlv_get_bytes(&f, data, data_len) &&
		ttlv_find(payload, KMIP_TAG_IV_COUNTER_NONCE, &f) && ttlv_get_bytes(&f, iv, iv_len) &&
		ttlv_find(payload, KMIP_TAG_AE_TAG, &f) && ttlv_get_bytes(&f, tag, tag_len);
}

bool
kmip_payload_decrypted(const TtlvItem *payload, const uint8_t **data, size_t *data_len)
{
	TtlvItem	f;

	return ttlv_find(payload, KMIP_TAG_DATA, &f) && ttlv_get_bytes(&f, data, data_len);
}

const char *
kmip_reason_name(uint32_t reason)
{
	switch (reason)
	{
		case KMIP_REASON_ITEM_NOT_FOUND:
			return "Item Not Found";
		case KMIP_REASON_RESPONSE_TOO_LARGE:
			return "Response Too Large";
		case KMIP_REASON_AUTHENTICATION_NOT_SUCCESSFUL:
			return "Authentication Not Successful";
		case KMIP_REASON_INVALID_MESSAGE:
			return "Invalid Message";
		case KMIP_REASON_OPERATION_NOT_SUPPORTED:
			return "Operation Not Supported";
		case KMIP_REASON_INVALID_FIELD:
			return "Invalid Field";
		case KMIP_REASON_FEATURE_NOT_SUPPORTED:
			return "Feature Not Supported";
		case KMIP_REASON_CRYPTOGRAPHIC_FAILURE:
			return "Cryptographic Failure";
		case KMIP_REASON_ILLEGAL_OPERATION:
			return "Illegal Operation";
		case KMIP_REASON_PERMISSION_DENIED:
			return "Permission Denied";
		case KMIP_REASON_GENERAL_FAILURE:
			return "General Failure";
		default:
			return "KMIP error";
	}
}

const char *
kmip_state_name(uint32_t state)
{
	switch (state)
	{
		case KMIP_STATE_PRE_ACTIVE:
			return "Pre-Active";
		case KMIP_STATE_ACTIVE:
			return "Active";
		case KMIP_STATE_DEACTIVATED:
			return "Deactivated";
		case KMIP_STATE_COMPROMISED:
			return "Compromised";
		case KMIP_STATE_DESTROYED:
			return "Destroyed";
		case KMIP_STATE_DESTROYED_COMPROMISED:
			return "Destroyed Compromised";
		default:
			return "unknown state";
	}
}
