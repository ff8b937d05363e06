/*
 * fuzz_kmip_response.c — libFuzzer target for what a KMIP server sends back: the TTLV
 * decoder (lengths, types, padding, nesting) and the reading of a response message
 * (header, batch items, result status, the State, Encrypt and Decrypt payloads).
 *
 * The input is one response as it would arrive on the connection.  Asserted besides
 * ASan/UBSan: the message size announced by a header is what ttlv_parse accepts, every
 * field read out of a payload lies inside the input, and a result message holds only
 * printable ASCII.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kmip_msg.h"
#include "kmip_ttlv.h"

int			LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void
check_inside(const uint8_t *p, size_t len, const uint8_t *data, size_t size)
{
	if (len > 0 && (p < data || p + len > data + size))
		abort();
}

static void
check_result(const KmipBatchResult *r, const uint8_t *data, size_t size)
{
	const uint8_t *d,
			   *iv,
			   *tag;
	size_t		dlen,
				ivlen,
				taglen;
	uint32_t	state;

	if (memchr(r->result_message, '\0', sizeof(r->result_message)) == NULL)
		abort();
	for (const char *p = r->result_message; *p; p++)
		if (*p < 0x20 || *p > 0x7e)
			abort();
	if (!r->present || !r->has_payload)
		return;
	(void) kmip_payload_state(&r->payload, &state);
	if (kmip_payload_encrypted(&r->payload, &d, &dlen, &iv, &ivlen, &tag, &taglen))
	{
		check_inside(d, dlen, data, size);
		check_inside(iv, ivlen, data, size);
		check_inside(tag, taglen, data, size);
	}
	if (kmip_payload_decrypted(&r->payload, &d, &dlen))
		check_inside(d, dlen, data, size);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	TtlvItem	top;
	KmipResponse resp;
	char		why[256];

	if (size >= TTLV_HEADER_LEN)
		(void) ttlv_message_size(data);
	if (ttlv_parse(data, size, &top) != TTLV_OK)
		return 0;
	memset(&resp, 0, sizeof(resp));
	if (!kmip_read_response(&top, &resp, why, sizeof(why)))
	{
		if (memchr(why, '\0', sizeof(why)) == NULL)
			abort();
		return 0;
	}
	check_result(&resp.state, data, size);
	check_result(&resp.crypto, data, size);
	return 0;
}
