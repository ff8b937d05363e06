/*
 * test_kmip_ttlv.c — the KMIP TTLV encoder/decoder and the KMIP 1.4 message layer,
 * without a server.
 *
 * Vectors:
 *   - the encoding examples of the KMIP specification, "Key Management
 *     Interoperability Protocol Specification Version 1.0", OASIS Standard, section
 *     9.1.2 "Examples" (https://docs.oasis-open.org/kmip/spec/v1.0/kmip-spec-1.0.html;
 *     the same examples are in sections 9.1.2 of versions 1.1 to 1.4): one item of each
 *     type with tag 0x420020, and the structure of an Enumeration 254 (tag 0x420004)
 *     and an Integer 255 (tag 0x420005).  Each was also re-encoded with PyKMIP 0.10's
 *     kmip.core.primitives, which gives the same bytes;
 *   - whole messages produced by PyKMIP 0.10 (kmip.core.messages, written as KMIP 1.4;
 *     the script is in the comment above each), an independent encoder, for the
 *     request this client sends and the responses it reads;
 *   - malformed inputs built here: every way a length, a type or a nesting can be
 *     wrong.
 */
#include <stdbool.h>

#include "kmip_msg.h"
#include "kmip_ttlv.h"
#include "unit.h"

static size_t
hex_to_bytes(const char *hex, uint8_t *out, size_t cap)
{
	size_t		n = 0;

	while (hex[0] && hex[1] && n < cap)
	{
		unsigned int b;

		if (sscanf(hex, "%2x", &b) != 1)
			break;
		out[n++] = (uint8_t) b;
		hex += 2;
	}
	return n;
}

static bool
bytes_equal_hex(const uint8_t *got, size_t len, const char *hex)
{
	uint8_t		want[4096];
	size_t		n = hex_to_bytes(hex, want, sizeof(want));

	return n == len && memcmp(got, want, len) == 0;
}

/* ---- KMIP 1.0 specification, section 9.1.2 ---- */

#define SPEC_INTEGER_8		"42002002000000040000000800000000"
#define SPEC_LONG			"420020030000000801b69b4ba5749200"
#define SPEC_BIG_INTEGER	"42002004000000100000000003fd35eb6bc2df4618080000"
#define SPEC_ENUM_255		"4200200500000004000000ff00000000"
#define SPEC_BOOL_TRUE		"42002006000000080000000000000001"
#define SPEC_TEXT_HELLO		"420020070000000b48656c6c6f20576f726c640000000000"
#define SPEC_BYTES_010203	"42002008000000030102030000000000"
#define SPEC_DATETIME		"42002009000000080000000047da67f8"	/* 2008-03-14 11:56:40 GMT */
#define SPEC_INTERVAL_10D	"4200200a00000004000d2f0000000000"	/* 864000 s */
#define SPEC_STRUCTURE \
	"42002001000000204200040500000004000000fe000000004200050200000004000000ff00000000"

static void
test_spec_encodings(void)
{
	uint8_t		buf[256];
	TtlvWriter	w;
	size_t		len;
	static const uint8_t big[16] = {0, 0, 0, 0, 0x03, 0xfd, 0x35, 0xeb, 0x6b, 0xc2, 0xdf, 0x46, 0x18, 0x08, 0, 0};
	static const uint8_t b3[3] = {1, 2, 3};

#define ENCODES(stmt, hex) \
	do { \
		ttlv_writer_init(&w, buf, sizeof(buf)); \
		stmt; \
		CHECK(ttlv_writer_finish(&w, &len) && bytes_equal_hex(buf, len, hex), "encoding %s", #stmt); \
	} while (0)

	ENCODES(ttlv_put_integer(&w, 0x420020, 8), SPEC_INTEGER_8);
	ENCODES(ttlv_put_long(&w, 0x420020, 123456789000000000LL), SPEC_LONG);
	ENCODES(ttlv_put_big_integer(&w, 0x420020, big, sizeof(big)), SPEC_BIG_INTEGER);
	ENCODES(ttlv_put_enum(&w, 0x420020, 255), SPEC_ENUM_255);
	ENCODES(ttlv_put_bool(&w, 0x420020, true), SPEC_BOOL_TRUE);
	ENCODES(ttlv_put_text(&w, 0x420020, "Hello World", 11), SPEC_TEXT_HELLO);
	ENCODES(ttlv_put_bytes(&w, 0x420020, b3, 3), SPEC_BYTES_010203);
	ENCODES(ttlv_put_datetime(&w, 0x420020, 0x47DA67F8), SPEC_DATETIME);
	ENCODES(ttlv_put_interval(&w, 0x420020, 864000), SPEC_INTERVAL_10D);
	ENCODES((ttlv_begin_struct(&w, 0x420020), ttlv_put_enum(&w, 0x420004, 254),
			 ttlv_put_integer(&w, 0x420005, 255), ttlv_end_struct(&w)), SPEC_STRUCTURE);
#undef ENCODES
}

static void
test_spec_decodings(void)
{
	uint8_t		buf[256];
	size_t		n;
	TtlvItem	it,
				child;
	int32_t		i32;
	int64_t		i64;
	uint32_t	u32;
	bool		b;
	const char *s;
	const uint8_t *bytes;
	size_t		len;
	size_t		pos = 0;

	n = hex_to_bytes(SPEC_INTEGER_8, buf, sizeof(buf));
	CHECK(ttlv_parse(buf, n, &it) == TTLV_OK && it.tag == 0x420020 &&
		  ttlv_get_integer(&it, &i32) && i32 == 8, "spec integer");
	CHECK(!ttlv_get_enum(&it, &u32), "an integer is not read as an enumeration");
	n = hex_to_bytes(SPEC_LONG, buf, sizeof(buf));
	CHECK(ttlv_parse(buf, n, &it) == TTLV_OK && ttlv_get_long(&it, &i64) &&
		  i64 == 123456789000000000LL, "spec long integer");
	n = hex_to_bytes(SPEC_BIG_INTEGER, buf, sizeof(buf));
	CHECK(ttlv_parse(buf, n, &it) == TTLV_OK && it.type == TTLV_BIG_INTEGER && it.length == 16,
		  "spec big integer");
	n = hex_to_bytes(SPEC_ENUM_255, buf, sizeof(buf));
	CHECK(ttlv_parse(buf, n, &it) == TTLV_OK && ttlv_get_enum(&it, &u32) && u32 == 255, "spec enum");
	n = hex_to_bytes(SPEC_BOOL_TRUE, buf, sizeof(buf));
	CHECK(ttlv_parse(buf, n, &it) == TTLV_OK && ttlv_get_bool(&it, &b) && b, "spec boolean");
	n = hex_to_bytes(SPEC_TEXT_HELLO, buf, sizeof(buf));
	CHECK(ttlv_parse(buf, n, &it) == TTLV_OK && ttlv_get_text(&it, &s, &len) && len == 11 &&
		  memcmp(s, "Hello World", 11) == 0, "spec text string");
	n = hex_to_bytes(SPEC_BYTES_010203, buf, sizeof(buf));
	CHECK(ttlv_parse(buf, n, &it) == TTLV_OK && ttlv_get_bytes(&it, &bytes, &len) && len == 3 &&
		  bytes[0] == 1 && bytes[2] == 3, "spec byte string");
	n = hex_to_bytes(SPEC_DATETIME, buf, sizeof(buf));
	CHECK(ttlv_parse(buf, n, &it) == TTLV_OK && ttlv_get_datetime(&it, &i64) && i64 == 1205495800,
		  "spec date-time");
	n = hex_to_bytes(SPEC_INTERVAL_10D, buf, sizeof(buf));
	CHECK(ttlv_parse(buf, n, &it) == TTLV_OK && ttlv_get_interval(&it, &u32) && u32 == 864000,
		  "spec interval");
	n = hex_to_bytes(SPEC_STRUCTURE, buf, sizeof(buf));
	CHECK(ttlv_parse(buf, n, &it) == TTLV_OK && it.type == TTLV_STRUCTURE, "spec structure");
	CHECK(ttlv_next_child(&it, &pos, &child) && child.tag == 0x420004 &&
		  ttlv_get_enum(&child, &u32) && u32 == 254, "structure: first child");
	CHECK(ttlv_next_child(&it, &pos, &child) && child.tag == 0x420005 &&
		  ttlv_get_integer(&child, &i32) && i32 == 255, "structure: second child");
	CHECK(!ttlv_next_child(&it, &pos, &child), "structure: two children only");
	CHECK(ttlv_find(&it, 0x420005, &child) && !ttlv_find(&it, 0x420006, &child), "find by tag");
}

/* ---- malformed input ---- */

static TtlvStatus
parse_hex(const char *hex)
{
	uint8_t		buf[512];
	size_t		n = hex_to_bytes(hex, buf, sizeof(buf));
	TtlvItem	it;

	return ttlv_parse(buf, n, &it);
}

static void
test_malformed(void)
{
	uint8_t		buf[1024];
	TtlvItem	it;
	size_t		n;

	/* lengths */
	CHECK(parse_hex("") == TTLV_ERR_TRUNCATED, "empty input");
	CHECK(parse_hex("42002002000000") == TTLV_ERR_TRUNCATED, "header cut short");
	CHECK(parse_hex("420020020000000400000008") == TTLV_ERR_TRUNCATED, "integer without its padding");
	CHECK(parse_hex("42002002000000050000000800000000") == TTLV_ERR_LENGTH, "integer of 5 bytes");
	CHECK(parse_hex("420020020000000800000008000000000") == TTLV_ERR_LENGTH, "integer of 8 bytes");
	CHECK(parse_hex("4200200300000004000000080000000") == TTLV_ERR_LENGTH, "long integer of 4 bytes");
	CHECK(parse_hex("42002005000000080000000000000001") == TTLV_ERR_LENGTH, "enumeration of 8 bytes");
	CHECK(parse_hex("42002006000000040000000100000000") == TTLV_ERR_LENGTH, "boolean of 4 bytes");
	CHECK(parse_hex("42002009000000040000000000000000") == TTLV_ERR_LENGTH, "date-time of 4 bytes");
	CHECK(parse_hex("4200200a000000080000000000000000") == TTLV_ERR_LENGTH, "interval of 8 bytes");
	CHECK(parse_hex("42002004000000040000000100000000") == TTLV_ERR_LENGTH, "big integer of 4 bytes");
	CHECK(parse_hex("4200200400000000") == TTLV_ERR_LENGTH, "big integer of 0 bytes");
	CHECK(parse_hex("42002001000000040000000000000000") == TTLV_ERR_LENGTH, "structure length not a multiple of 8");
	CHECK(parse_hex("420020070000000b48656c6c6f20576f726c64") == TTLV_ERR_TRUNCATED, "text without padding");
	CHECK(parse_hex("42002007ffffffff48656c6c6f20576f726c640000000000") == TTLV_ERR_TRUNCATED,
		  "text length 0xffffffff");
	CHECK(parse_hex("42002008fffffff8") == TTLV_ERR_TRUNCATED, "byte string length near 4 GiB");
	CHECK(parse_hex(SPEC_INTEGER_8 "00") == TTLV_ERR_TRAILING, "a byte after the message");
	CHECK(parse_hex(SPEC_INTEGER_8 SPEC_INTEGER_8) == TTLV_ERR_TRAILING, "two messages");

	/* types */
	CHECK(parse_hex("42002000000000040000000800000000") == TTLV_ERR_TYPE, "type 0x00");
	CHECK(parse_hex("4200200b000000040000000800000000") == TTLV_ERR_TYPE, "type 0x0b");
	CHECK(parse_hex("420020ff000000040000000800000000") == TTLV_ERR_TYPE, "type 0xff");
	CHECK(parse_hex("42002006000000080000000000000002") == TTLV_ERR_VALUE, "boolean 2");
	CHECK(parse_hex("42002006000000080100000000000000") == TTLV_ERR_VALUE, "boolean with high bits");

	/* nesting: children must fill the structure exactly */
	CHECK(parse_hex("4200200100000018" "42000402000000040000000100000000") == TTLV_ERR_TRUNCATED,
		  "structure longer than the message");
	CHECK(parse_hex("4200200100000008" "4200040200000004") == TTLV_ERR_STRUCTURE,
		  "child longer than its structure");
	CHECK(parse_hex("4200200100000010" "4200040200000004") == TTLV_ERR_TRUNCATED,
		  "structure announces more than there is");
	CHECK(parse_hex("4200200100000010" "420004010000000842000502000000040000000100000000") ==
		  TTLV_ERR_TRAILING, "inner structure spilling over its parent's end is trailing data");
	CHECK(parse_hex("4200200100000018" "4200040100000008" "42000502000000040000000100000000") ==
		  TTLV_ERR_STRUCTURE, "inner structure too short for its child");
	CHECK(parse_hex("4200200100000010" "4200040b000000040000000100000000") == TTLV_ERR_TYPE,
		  "unknown type inside a structure");
	CHECK(parse_hex("4200200100000010" "42000406000000080000000000000005") == TTLV_ERR_VALUE,
		  "bad boolean inside a structure");
	CHECK(parse_hex("4200200100000000") == TTLV_OK, "empty structure is well-formed");

	/* nesting depth: TTLV_MAX_DEPTH structures inside each other is too deep */
	{
		TtlvWriter	w;
		int			depth;

		for (depth = TTLV_MAX_DEPTH - 1; depth <= TTLV_MAX_DEPTH + 1; depth++)
		{
			size_t		off = 0;

			memset(buf, 0, sizeof(buf));
			for (int d = 0; d < depth; d++)
			{
				uint32_t	len = (uint32_t) (8 * (depth - d - 1));

				buf[off] = 0x42;
				buf[off + 2] = 0x20;
				buf[off + 3] = TTLV_STRUCTURE;
				buf[off + 4] = (uint8_t) (len >> 24);
				buf[off + 5] = (uint8_t) (len >> 16);
				buf[off + 6] = (uint8_t) (len >> 8);
				buf[off + 7] = (uint8_t) len;
				off += 8;
			}
			n = off;
			if (depth <= TTLV_MAX_DEPTH)
				CHECK(ttlv_parse(buf, n, &it) == TTLV_OK, "nesting depth %d accepted", depth);
			else
				CHECK(ttlv_parse(buf, n, &it) == TTLV_ERR_DEPTH, "nesting depth %d refused", depth);
		}

		/* the writer refuses to nest deeper than it can close */
		ttlv_writer_init(&w, buf, sizeof(buf));
		for (depth = 0; depth <= TTLV_MAX_DEPTH; depth++)
			ttlv_begin_struct(&w, 0x420020);
		CHECK(!ttlv_writer_finish(&w, &n), "writer nesting overflow");
	}

	/* the writer: overflow, unbalanced structures */
	{
		TtlvWriter	w;
		uint8_t		small[20];

		ttlv_writer_init(&w, small, sizeof(small));
		ttlv_put_text(&w, 0x420020, "Hello World", 11);
		CHECK(!ttlv_writer_finish(&w, &n), "writer overflow detected");
		ttlv_writer_init(&w, buf, sizeof(buf));
		ttlv_begin_struct(&w, 0x420020);
		CHECK(!ttlv_writer_finish(&w, &n), "unclosed structure detected");
		ttlv_writer_init(&w, buf, sizeof(buf));
		ttlv_end_struct(&w);
		CHECK(!ttlv_writer_finish(&w, &n), "close without open detected");
		ttlv_writer_init(&w, buf, sizeof(buf));
		ttlv_put_big_integer(&w, 0x420020, buf, 5);
		CHECK(!ttlv_writer_finish(&w, &n), "big integer of 5 bytes refused");
	}

	/* message size from a header */
	n = hex_to_bytes(SPEC_TEXT_HELLO, buf, sizeof(buf));
	CHECK(ttlv_message_size(buf) == 24, "message size of a text item");
	n = hex_to_bytes("42002002000000050000000800000000", buf, sizeof(buf));
	CHECK(ttlv_message_size(buf) == 0, "message size of an impossible header");
	n = hex_to_bytes("420020ee00000008", buf, sizeof(buf));
	CHECK(ttlv_message_size(buf) == 0, "message size of an unknown type");

	/* every truncation of a valid message fails, none crashes */
	n = hex_to_bytes(SPEC_STRUCTURE, buf, sizeof(buf));
	for (size_t cut = 0; cut < n; cut++)
		CHECK(ttlv_parse(buf, cut, &it) != TTLV_OK, "truncated at %zu", cut);
}

/* ---- KMIP 1.4 messages, against PyKMIP 0.10 ---- */

/*
 * RequestMessage(RequestHeader(ProtocolVersion(1,4), MaximumResponseSize(16384),
 * BatchCount(2)), [GetAttributes(uid '7', ['State']) id 01, Encrypt(uid '7',
 * CryptographicParameters(GCM, AES, random_iv=True, tag_length=16), data 00..1f,
 * auth_additional_data b'aad') id 02]).write(kmip_version=KMIP_1_4)
 */
#define PYKMIP_ENCRYPT_REQUEST \
	"42007801000001604200770100000048420069010000002042006a0200000004000000010000000042006b02000000040000000400000000" \
	"4200500200000004000040000000000042000d0200000004000000020000000042000f010000004842005c05000000040000000b00000000" \
	"4200930800000001010000000000000042007901000000204200940700000001370000000000000042000a07000000055374617465000000" \
	"42000f01000000b842005c05000000040000001f000000004200930800000001020000000000000042007901000000904200940700000001" \
	"370000000000000042002b010000004042001105000000040000000900000000420028050000000400000003000000004200c50600000008" \
	"00000000000000014200ce020000000400000010000000004200c20800000020000102030405060708090a0b0c0d0e0f1011121314151617" \
	"18191a1b1c1d1e1f4200fe08000000036161640000000000"

/* The same with Decrypt(uid '7', (GCM, AES, 16), data 00..1f, iv 00..0f, aad b'aad', tag aa*16). */
#define PYKMIP_DECRYPT_REQUEST \
	"42007801000001804200770100000048420069010000002042006a0200000004000000010000000042006b02000000040000000400000000" \
	"4200500200000004000040000000000042000d0200000004000000020000000042000f010000004842005c05000000040000000b00000000" \
	"4200930800000001010000000000000042007901000000204200940700000001370000000000000042000a07000000055374617465000000" \
	"42000f01000000d842005c050000000400000020000000004200930800000001020000000000000042007901000000b04200940700000001" \
	"370000000000000042002b010000003042001105000000040000000900000000420028050000000400000003000000004200ce0200000004" \
	"00000010000000004200c20800000020000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f42003d0800000010" \
	"000102030405060708090a0b0c0d0e0f4200fe080000000361616400000000004200ff0800000010aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"

/*
 * ResponseMessage(ResponseHeader(1.4, TimeStamp(1700000000), BatchCount(2)),
 * [GetAttributes success id 01 (uid '7', State Deactivated), Encrypt success id 02
 * (uid '7', data 11*32, iv 22*16, tag 33*16)])
 */
#define PYKMIP_ENCRYPT_RESPONSE \
	"42007b010000017042007a0100000048420069010000002042006a0200000004000000010000000042006b02000000040000000400000000" \
	"4200920900000008000000006553f10042000d0200000004000000020000000042000f010000007042005c05000000040000000b00000000" \
	"4200930800000001010000000000000042007f0500000004000000000000000042007c010000003842009407000000013700000000000000" \
	"420008010000002042000a0700000005537461746500000042000b0500000004000000030000000042000f01000000a042005c0500000004" \
	"0000001f000000004200930800000001020000000000000042007f0500000004000000000000000042007c01000000684200940700000001" \
	"37000000000000004200c20800000020111111111111111111111111111111111111111111111111111111111111111142003d0800000010" \
	"222222222222222222222222222222224200ff080000001033333333333333333333333333333333"

/* The same state item, then Decrypt failed: Permission Denied with a result message. */
#define PYKMIP_FAILED_RESPONSE \
	"42007b010000014842007a0100000048420069010000002042006a0200000004000000010000000042006b02000000040000000400000000" \
	"4200920900000008000000006553f10042000d0200000004000000020000000042000f010000007042005c05000000040000000b00000000" \
	"4200930800000001010000000000000042007f0500000004000000000000000042007c010000003842009407000000013700000000000000" \
	"420008010000002042000a0700000005537461746500000042000b0500000004000000030000000042000f010000007842005c0500000004" \
	"00000020000000004200930800000001020000000000000042007f0500000004000000010000000042007e05000000040000000c00000000" \
	"42007d070000002e54686520656e6372797074696f6e206b6579206d75737420626520696e20746865204163746976652073746174650000"

static void
test_requests(void)
{
	uint8_t		buf[2048];
	uint8_t		data[32];
	uint8_t		iv[16];
	uint8_t		tag[16];
	size_t		len;
	KmipCryptoRequest req;

	for (int i = 0; i < 32; i++)
		data[i] = (uint8_t) i;
	for (int i = 0; i < 16; i++)
		iv[i] = (uint8_t) i;
	memset(tag, 0xaa, sizeof(tag));

	memset(&req, 0, sizeof(req));
	req.unique_identifier = "7";
	req.data = data;
	req.data_len = 32;
	req.aad = (const uint8_t *) "aad";
	req.aad_len = 3;
	CHECK(kmip_build_crypto_request(KMIP_OP_ENCRYPT, &req, buf, sizeof(buf), &len) &&
		  bytes_equal_hex(buf, len, PYKMIP_ENCRYPT_REQUEST), "Encrypt request as PyKMIP writes it");

	req.iv = iv;
	req.iv_len = 16;
	req.tag = tag;
	CHECK(kmip_build_crypto_request(KMIP_OP_DECRYPT, &req, buf, sizeof(buf), &len) &&
		  bytes_equal_hex(buf, len, PYKMIP_DECRYPT_REQUEST), "Decrypt request as PyKMIP writes it");

	CHECK(!kmip_build_crypto_request(KMIP_OP_ENCRYPT, &req, buf, 100, &len), "request overflow");
	CHECK(!kmip_build_crypto_request(KMIP_OP_GET_ATTRIBUTES, &req, buf, sizeof(buf), &len),
		  "only Encrypt and Decrypt");
}

static void
test_responses(void)
{
	uint8_t		buf[2048];
	size_t		n;
	TtlvItem	msg;
	KmipResponse resp;
	char		why[128];
	uint32_t	state;
	const uint8_t *ct,
			   *iv,
			   *tag;
	size_t		ct_len,
				iv_len,
				tag_len;

	n = hex_to_bytes(PYKMIP_ENCRYPT_RESPONSE, buf, sizeof(buf));
	CHECK(ttlv_parse(buf, n, &msg) == TTLV_OK, "PyKMIP Encrypt response parses");
	CHECK(kmip_read_response(&msg, &resp, why, sizeof(why)), "Encrypt response read: %s", why);
	CHECK(resp.protocol_major == 1 && resp.protocol_minor == 4, "protocol version 1.4");
	CHECK(resp.state.present && resp.state.result_status == KMIP_STATUS_SUCCESS &&
		  resp.state.has_payload && kmip_payload_state(&resp.state.payload, &state) &&
		  state == KMIP_STATE_DEACTIVATED, "state Deactivated read");
	CHECK(resp.crypto.present && resp.crypto.operation == KMIP_OP_ENCRYPT &&
		  kmip_payload_uid_is(&resp.crypto.payload, "7") &&
		  !kmip_payload_uid_is(&resp.crypto.payload, "70") &&
		  kmip_payload_encrypted(&resp.crypto.payload, &ct, &ct_len, &iv, &iv_len, &tag, &tag_len) &&
		  ct_len == 32 && ct[0] == 0x11 && iv_len == 16 && iv[0] == 0x22 && tag_len == 16 &&
		  tag[15] == 0x33, "Encrypt payload read");

	n = hex_to_bytes(PYKMIP_FAILED_RESPONSE, buf, sizeof(buf));
	CHECK(ttlv_parse(buf, n, &msg) == TTLV_OK &&
		  kmip_read_response(&msg, &resp, why, sizeof(why)) &&
		  resp.crypto.present && resp.crypto.result_status == KMIP_STATUS_OPERATION_FAILED &&
		  resp.crypto.result_reason == KMIP_REASON_PERMISSION_DENIED && !resp.crypto.has_payload &&
		  strcmp(resp.crypto.result_message, "The encryption key must be in the Active state") == 0,
		  "failed Decrypt read");

	/* a request is not a response */
	n = hex_to_bytes(PYKMIP_ENCRYPT_REQUEST, buf, sizeof(buf));
	CHECK(ttlv_parse(buf, n, &msg) == TTLV_OK && !kmip_read_response(&msg, &resp, why, sizeof(why)),
		  "a request message is refused as a response");

	/* a batch item with a wrong-typed Result Status */
	n = hex_to_bytes(PYKMIP_ENCRYPT_RESPONSE, buf, sizeof(buf));
	for (size_t i = 0; i + 4 < n; i++)
		if (buf[i] == 0x42 && buf[i + 1] == 0x00 && buf[i + 2] == 0x7f && buf[i + 3] == 0x05)
		{
			buf[i + 3] = TTLV_INTEGER;	/* same length, wrong type */
			break;
		}
	CHECK(ttlv_parse(buf, n, &msg) == TTLV_OK && !kmip_read_response(&msg, &resp, why, sizeof(why)),
		  "a Result Status of the wrong type is refused");

	/* a batch item id this client never sent */
	n = hex_to_bytes(PYKMIP_ENCRYPT_RESPONSE, buf, sizeof(buf));
	for (size_t i = 0; i + 9 < n; i++)
		if (buf[i] == 0x42 && buf[i + 1] == 0x00 && buf[i + 2] == 0x93 && buf[i + 8] == 0x02)
		{
			buf[i + 8] = 0x07;
			break;
		}
	CHECK(ttlv_parse(buf, n, &msg) == TTLV_OK && !kmip_read_response(&msg, &resp, why, sizeof(why)),
		  "an unknown batch item id is refused");
}

int
main(void)
{
	test_spec_encodings();
	test_spec_decodings();
	test_malformed();
	test_requests();
	test_responses();
	return unit_finish("test_kmip_ttlv");
}
